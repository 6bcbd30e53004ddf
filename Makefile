# The two commands of the README: `make run` (the whole pipeline on the embedded default) and `make test`.
# Both go through `make setup`, which builds .venv with uv from one of two locks of the same pins (about 30 s):
#   TORCH=cpu   requirements/lock.txt: the Linux CPU build of torch (2.13.0+cpu), from $PIP_FIND_LINKS (a local
#               wheel folder) when it is set, else from PyTorch's CPU index.
#   TORCH=pypi  requirements/lock-pypi.txt: torch from PyPI: the CUDA build and its NVIDIA libraries on Linux (GPU
#               nodes), the CPU build on macOS and Windows.
# Default: pypi where nvidia-smi is found or the system is not Linux, else cpu. `make check-install` resolves the
# GPU node's install without downloading it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),pypi,$(if $(filter Linux,$(shell uname -s)),cpu,pypi))
LOCK := requirements/$(if $(filter pypi,$(TORCH)),lock-pypi.txt,lock.txt)
# The CPU build's source: without it uv would resolve torch to PyPI's multi-GB CUDA build.
CPU_TORCH := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
TORCH_SOURCE := $(if $(filter pypi,$(TORCH)),,$(CPU_TORCH))

ifeq ($(TORCH),cpu)
export DS_ACCELERATOR ?= cpu
endif
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds its CPU shared-memory comm op (~1 min) into this folder: one per checkout, so two clones on one
# machine do not rebuild it over each other (a shared ~/.cache/torch_extensions is invalidated by each venv's paths).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup run test test-fast check check-install lock clean-venv

setup: $(VENV)/.installed-$(TORCH)

$(VENV)/.installed-$(TORCH): $(LOCK) pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.9
	$(UV) pip install --python $(PY) $(TORCH_SOURCE) --compile-bytecode -q -r $(LOCK)
	$(UV) pip install --python $(PY) --no-deps --compile-bytecode -q -e .
	rm -f $(VENV)/.installed-*
	touch $@

# `dvc repro` under one parent MLflow run (each stage logs a child run); a second `make run` reruns nothing.
run: setup
	$(VENV)/bin/cheetah pipeline run

# Two pytest-xdist workers, one per core of the CI machine; whole files per worker, so a file's module fixtures
# (a pipeline run, a Prefect server) are built once. `pytest tests/x.py` alone runs in one process. In the order
# tests/conftest.py gives (longest files first; pytest-randomly off, and xdist's own reorder by number of tests off,
# which sent the 2-test Prefect scenario out among the last): the tests also pass shuffled (`-p randomly`, README
# "Tests"), but a fixed order keeps the timing stable.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -p no:randomly

# The edit-test loop: the tests not marked `slow` (no pipeline, launcher, Prefect or study runs), both cores.
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" -p no:randomly

# The committed dvc.lock, data.dvc and metrics/ are those of the committed code and parameters (what .ci/run enforces).
check: setup
	$(VENV)/bin/cheetah pipeline check

# Both locks from requirements/requirements.in (uv keeps the versions already locked unless a pin moved).
lock:
	$(UV) pip compile -q --python-version 3.11 $(CPU_TORCH) requirements/requirements.in -o requirements/lock.txt
	$(UV) pip compile -q --universal --python-version 3.11 requirements/requirements.in -o requirements/lock-pypi.txt

# A GPU node's install resolved here, from the package index's metadata (nothing downloaded): every pin of
# requirements/lock-pypi.txt exists for Linux x86_64 and Python 3.11, torch comes with its CUDA libraries, and the
# resolution needs nothing the lock lacks.
check-install: setup
	$(UV) pip compile -q --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate \
		requirements/lock-pypi.txt -o $(VENV)/resolved-linux-x86_64.txt
	@missing=$$(comm -13 <(grep -oE '^[A-Za-z0-9._-]+==' requirements/lock-pypi.txt | sort) \
		<(grep -oE '^[A-Za-z0-9._-]+==' $(VENV)/resolved-linux-x86_64.txt | sort)); \
	if [ -n "$$missing" ]; then echo "requirements/lock-pypi.txt lacks: $$missing"; exit 1; fi; \
	grep -qE '^torch==2[.0-9]+$$' $(VENV)/resolved-linux-x86_64.txt && grep -q '^nvidia-cudnn' $(VENV)/resolved-linux-x86_64.txt \
		|| { echo "torch does not resolve to the CUDA build"; exit 1; }; \
	echo "check-install: requirements/lock-pypi.txt resolves on Linux x86_64 with CUDA torch" \
		"($$(grep -c '==' $(VENV)/resolved-linux-x86_64.txt) packages, none missing from the lock)"

clean-venv:
	rm -rf $(VENV)
