# edgequant: `make demo` runs the main job on the default model; `make test` runs the tests.
# Both set everything up first (virtualenv, torch CPU wheel, the rest) and are safe to re-run.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.edgequant-setup
DEMO   ?= out/demo
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-all test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a bare "torch" would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,llama,peers,report,serve]'
	# headless Chromium + driver for the HTML report's browser test (Debian packages)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }
	touch $(STAMP)

demo: setup
	$(VENV)/bin/edgequant zoo pull smollm2-135m
	$(VENV)/bin/edgequant compare smollm2-135m --preset quick -o $(DEMO)
	@echo "report: $(DEMO)/report.html (and $(DEMO)/report.md)"

test: setup
	$(PY) -m pytest -q --durations=25 -m "not heavy"

test-all: setup
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
