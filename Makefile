# The two commands of the README: `make run` (the whole pipeline on the embedded default) and `make test`.
# Both go through `make setup`, which builds .venv from requirements/lock.txt with uv (about 30 s).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# uv must see the local CPU torch wheel, or it resolves torch to the multi-GB CUDA build.
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)
UV := $(VENV)/bin/uv

export DS_ACCELERATOR ?= cpu
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds its CPU shared-memory comm op (~1 min) into this folder: one per checkout, so two clones on one
# machine do not rebuild it over each other (a shared ~/.cache/torch_extensions is invalidated by each venv's paths).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup run test test-fast check lock clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv==0.13.9
	$(UV) pip install --python $(PY) $(FIND_LINKS) --compile-bytecode -q -r requirements/lock.txt
	$(UV) pip install --python $(PY) --no-deps --compile-bytecode -q -e .
	touch $@

# `dvc repro` under one parent MLflow run (each stage logs a child run); a second `make run` reruns nothing.
run: setup
	$(VENV)/bin/cheetah pipeline run

# Two pytest-xdist workers, one per core of the CI machine; whole files per worker, so a file's module fixtures
# (a pipeline run, a Prefect server) are built once. `pytest tests/x.py` alone runs in one process. In file order
# (pytest-randomly off): the tests also pass shuffled (`-p randomly`, README "Tests"), but a fixed order keeps the
# slow files first and the timing stable.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -p no:randomly

# The edit-test loop: the tests not marked `slow` (no pipeline, launcher, Prefect or study runs), both cores.
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" -p no:randomly

# The committed dvc.lock, data.dvc and metrics/ are those of the committed code and parameters (what .ci/run enforces).
check: setup
	$(VENV)/bin/cheetah pipeline check

lock:
	$(UV) pip compile --python-version 3.11 $(FIND_LINKS) requirements/requirements.in -o requirements/lock.txt

clean-venv:
	rm -rf $(VENV)
