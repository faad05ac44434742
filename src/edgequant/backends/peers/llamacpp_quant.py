"""llama.cpp's own quantizer (``llama_model_quantize``), from an F32 GGUF of the source.

Steps of ``make``:

1. an F32 GGUF of the source: ``edgequant.exporters.gguf.export(folder, path, "F32")`` when that
   module exists, otherwise llama.cpp's ``convert_hf_to_gguf.py`` from the llama-cpp-python
   sdist of the installed version (fetched once with ``pip download --no-deps`` into
   ``<cache>/llama-cpp-src/``; ``$EDGEQUANT_LLAMA_CPP_SRC`` may point at a llama.cpp checkout);
2. with ``imatrix``: an importance matrix from the calibration windows — per input column of
   every linear layer, the mean of ``x²`` over all calibration tokens (what ``llama-imatrix``
   computes), taken with forward hooks on the fp32 source in torch and keyed by GGUF tensor
   names (gguf-py's ``TensorNameMap``);
3. ``llama_model_quantize(f32, out, params)`` with ``params.ftype`` the file type, llama.cpp's
   own mixture and fallbacks included; its log is captured and quoted if it fails.

The artifact is ``model-<TYPE>.gguf``; ``open`` runs it with the llama.cpp backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...cache import cache_root, pip_download
from ...errors import ModelLoadError
from ..llamacpp import LlamaCppRunnable
from ._common import PeerError, Source
from .runnable import peer_identity

if TYPE_CHECKING:
    import torch

    from . import PeerMethod

GGUF_NAME = "model-{}.gguf"
TAKES_THREADS = True  # open() passes ``threads`` to llama.cpp, not to torch
_SRC_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


# --- 1. the F32 GGUF ---------------------------------------------------------------------------


def f32_gguf(src: Source, path: Path) -> str:
    """Write the source as an F32 GGUF at ``path``; returns which converter did it."""
    export: Any
    try:
        from ...exporters.gguf import export
    except ImportError:  # the exporter is optional: llama.cpp's converter does the same job
        export = None
    if export is not None:
        export(str(src.folder), str(path), "F32")
        return "edgequant.exporters.gguf"
    script = convert_script()
    res = subprocess.run([sys.executable, str(script), str(src.folder), "--outfile", str(path),
                          "--outtype", "f32"], capture_output=True, text=True, check=False)
    if res.returncode != 0 or not path.is_file():
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-2:])
        raise PeerError(f"llama.cpp's convert_hf_to_gguf.py could not convert {src.folder}: "
                        f"{tail}")
    return f"convert_hf_to_gguf.py (llama.cpp of llama-cpp-python {_llama_version()})"


def _llama_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def convert_script() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` matching the installed llama-cpp-python."""
    env = os.environ.get("EDGEQUANT_LLAMA_CPP_SRC")
    if env:
        script = Path(env).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise ModelLoadError(f"$EDGEQUANT_LLAMA_CPP_SRC={env} has no convert_hf_to_gguf.py")
        return script
    version = _llama_version()
    root = cache_root() / "llama-cpp-src" / version
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory(prefix="edgequant-llsrc-") as tmp:
        try:
            got = pip_download(f"llama-cpp-python=={version}", Path(tmp), sdist=True,
                               error=PeerError)
        except PeerError as e:
            raise PeerError(f"{e}; it is needed for convert_hf_to_gguf.py, or set "
                            "EDGEQUANT_LLAMA_CPP_SRC to a llama.cpp checkout") from None
        sdists = [p for p in got if p.name.startswith("llama_cpp_python-")
                  and p.name.endswith(".tar.gz")]
        if not sdists:
            raise PeerError(f"pip gave no llama-cpp-python {version} sdist "
                            f"({', '.join(p.name for p in got)}); set EDGEQUANT_LLAMA_CPP_SRC "
                            "to a llama.cpp checkout")
        _extract_converter(sdists[0], root)
    return script


def _extract_converter(sdist: Path, root: Path) -> None:
    marker = "/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(prefix=".llsrc-", dir=_mkdir(root.parent)))
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if marker not in m.name or not m.isfile():
                continue
            rel = m.name.split(marker, 1)[1]
            if not rel.startswith(_SRC_MEMBERS):
                continue
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(m)
            assert f is not None
            dest.write_bytes(f.read())
    if root.exists():  # another process won the race
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        return
    os.replace(staging, root)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# --- 2. the importance matrix ------------------------------------------------------------------


def importance_matrix(folder: Path, tokens: torch.Tensor, gguf_path: Path
                      ) -> dict[str, Any]:
    """``{gguf tensor name: float32 array (in_features,)}``: mean ``x²`` per input column."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    reader = gguf.GGUFReader(str(gguf_path))
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_blocks = int(reader.fields[f"{arch_name}.block_count"].parts[-1][0])
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    names = {t.name for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for hf_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        gname = tmap.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
        if gname is None or gname not in names:
            continue

        def hook(_m: Any, args: tuple[Any, ...], key: str = gname) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for row in tokens:
                model(input_ids=row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).float().numpy().astype(np.float32) for k in sums}


# --- 3. llama_model_quantize -----------------------------------------------------------------


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Path]:
    """Route file descriptor 2 (llama.cpp's log) to a temporary file for the duration."""
    sys.stderr.flush()
    with tempfile.NamedTemporaryFile(prefix="edgequant-llq-", suffix=".log", delete=False) as f:
        log = Path(f.name)
    saved = os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield log
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantize_gguf(f32: Path, out: Path, ftype: str, threads: int | None,
                  imatrix: dict[str, Any] | None) -> None:
    import llama_cpp

    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if code is None:
        raise PeerError(f"llama-cpp-python {llama_cpp.__version__} knows no file type {ftype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = threads or os.cpu_count() or 1
    keep: list[Any] = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = (ctypes.c_float * len(values))(*values.tolist())
            keep += [name.encode(), arr]
            entries[i].name = keep[-2]
            entries[i].data = ctypes.cast(arr, ctypes.POINTER(ctypes.c_float))
            entries[i].size = len(values)
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    llama_cpp.llama_backend_init()
    with _captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(),
                                            ctypes.byref(params))
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if rc != 0 or not out.is_file():
        lines = [s for s in text.splitlines() if s.strip()]
        errors = [s for s in lines if "error" in s.lower() or "ERROR" in s] or lines[-3:]
        raise PeerError(f"llama_model_quantize to {ftype} failed (rc {rc}): "
                        f"{' | '.join(s.strip() for s in errors[-3:])}")


# --- the adapter -------------------------------------------------------------------------------


def make(method: PeerMethod, src: Source, out: Path, tokens: torch.Tensor | None,
         opts: dict[str, Any]) -> dict[str, Any]:
    ftype = str(opts["ftype"]).upper()
    f32 = out / "model-F32.gguf"
    converter = f32_gguf(src, f32)
    imat = None
    if opts["imatrix"]:
        if tokens is None:
            raise PeerError(f"{method.name} needs calibration windows for its importance matrix")
        imat = importance_matrix(src.folder, tokens, f32)
    target = out / GGUF_NAME.format(ftype)
    try:
        quantize_gguf(f32, target, ftype, opts["threads"], imat)
    finally:
        if not opts["keep_f32"]:
            f32.unlink(missing_ok=True)
    return {"config": {"ftype": ftype, "imatrix_entries": len(imat) if imat else 0,
                       "converter": converter},
            "reload": "native", "runtime": "llama.cpp (llama-cpp-python)",
            "gguf": target.name}


class PeerLlamaRunnable(LlamaCppRunnable):
    """A peer's GGUF run by llama.cpp, with the peer record in ``identity``/``size_info``."""

    def __init__(self, gguf_file: Path, path: Path, record: dict[str, Any],
                 **options: Any) -> None:
        super().__init__(gguf_file, **options)
        self.artifact = path
        self.record = record
        self.name = peer_identity(path, record)["name"]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), **peer_identity(self.artifact, self.record),
                "gguf": str(self.path)}

    def size_info(self) -> dict[str, Any]:
        return {**super().size_info(), "reload": self.record.get("reload"),
                "runtime": self.record.get("runtime"), "peer": self.record["method"]}


def open(method: PeerMethod, path: Path, record: dict[str, Any],  # noqa: A001
         **options: Any) -> PeerLlamaRunnable:
    gguf_file = path / record["gguf"]
    if not gguf_file.is_file():
        raise ModelLoadError(f"{path}: {record['gguf']} is missing")
    return PeerLlamaRunnable(gguf_file, path, record, **options)
