#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` for benchmarks/bench_serve.py.
#
# The sources come from the llama-cpp-python sdist (the same llama.cpp that the project's
# llama-cpp-python runs), so the comparison is against the exact same kernels. Only the
# `llama-server` target is built: CPU only, Release, native CPU flags, no curl / SSL.
# Not part of `make setup`: only the serving benchmark needs it.
#
# Idempotent: when the binary exists it only prints its path. Prints the binary path last.
# Env: PYTHON (default: the project's venv python, else python3), LLAMA_CPP_PYTHON_VERSION.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/.llama-server"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
bin="$root/build/bin/llama-server"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then
        PYTHON="$here/../.venv/bin/python"
    else
        PYTHON="$(command -v python3)"
    fi
fi
for tool in cmake tar; do
    command -v "$tool" >/dev/null || { echo "setup_llama_server: $tool not found; install it" >&2; exit 1; }
done

mkdir -p "$root/sdist"
sdist="$root/sdist/llama_cpp_python-$version.tar.gz"
if [[ ! -f "$sdist" ]]; then
    echo "setup_llama_server: downloading the llama-cpp-python==$version sdist" >&2
    # --no-binary only for llama-cpp-python: pip prepares the sdist's metadata, and with
    # `:all:` it would build scikit-build-core and the other build requirements from source too
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        --dest "$root/sdist" "llama-cpp-python==$version"
fi
[[ -f "$sdist" ]] || { echo "setup_llama_server: no sdist at $sdist after pip download" >&2; exit 1; }

src="$root/src/llama_cpp_python-$version"
if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$root/src"
    mkdir -p "$root/src"
    tar -xzf "$sdist" -C "$root/src"
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
echo "setup_llama_server: configuring llama.cpp (CPU, Release, native)" >&2
cmake -S "$src/vendor/llama.cpp" -B "$root/build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_TOOLS=ON >&2
echo "setup_llama_server: building llama-server with $(nproc) jobs (minutes)" >&2
cmake --build "$root/build" --target llama-server -j "$(nproc)" >&2
[[ -x "$bin" ]] || { echo "setup_llama_server: build finished but $bin is missing" >&2; exit 1; }
echo "$bin"
