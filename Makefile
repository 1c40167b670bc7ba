# Quick start: `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-openvino-env clean

# torch is pinned first so that pip takes the CPU build instead of several GB of CUDA wheels;
# open-clip-torch only provides the CLIP BPE vocabulary (--no-deps keeps torchvision out).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps open-clip-torch
	touch $(STAMP)

# The default model is shapes-turbo, shipped in the package (docs/results.md): no download, no network.
demo: $(STAMP)
	$(VENV)/bin/turbokit generate "a red circle on a blue background" --steps 1 --seed 0 -o demo.png
	@echo "wrote demo.png (64x64, from turbokit's own 1-step model; -m takes any SD-Turbo/SDXL-Turbo model)"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# The web page's tests drive Debian's Chromium (.ci/run installs it); without it they skip, saying why.
# Two or more workers (pytest-xdist), one thread each: tests are small (subprocess launches, compilation, tiny
# models) and two single-thread workers keep 2 cores busy. On 2 cores pytest takes 6–16.5 min, machine-dependent
# (2026-12-07: the test times sum to 32 min on an AVX2 machine, of which the two inductor tests in test_compile.py
# take 7; 11.7 min and 6 min 45 s of pytest on a fast AVX512-BF16 one, the inductor tests 2.3 of it).
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses=8 --durations=15

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py

# OpenVINO's own pipeline (optimum-intel) for issue 6's side-by-side benchmark, in a venv of its own because its
# pins conflict with ours: benchmarks/openvino-requirements.txt says which and why. torch first, as above;
# optimum-intel --no-deps, to leave out the CUDA-only torchvision it lists.
OV_VENV := .venv-openvino
OV_PY := $(OV_VENV)/bin/python
OV_STAMP := $(OV_VENV)/.installed

$(OV_STAMP): benchmarks/openvino-requirements.txt
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_PY) -m pip install -q --upgrade pip
	$(OV_PY) -m pip install -q torch==2.13.0
	$(OV_PY) -m pip install -q --no-deps optimum-intel==2.2.0
	$(OV_PY) -m pip install -q -r benchmarks/openvino-requirements.txt
	$(OV_PY) -c "from optimum.intel import OVStableDiffusionPipeline"
	touch $(OV_STAMP)

bench-openvino-env: $(OV_STAMP)

clean:
	rm -rf $(VENV) $(OV_VENV) build demo.png
