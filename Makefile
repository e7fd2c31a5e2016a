# Two commands do everything: `make repro` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A machine with a local CPU torch wheel (/opt/wheels) uses it; elsewhere the PyTorch CPU index.
# Either way torch never resolves to a multi-GB CUDA build on a CPU machine.
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
# Stage commands run bin/py, which finds .venv itself: no PATH change needed.
export DVC_NO_ANALYTICS := 1
export DS_BUILD_OPS := 0
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING ?= false

.PHONY: install test test-fast repro lint format lock clean cluster-up cluster-down

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.9
	@# --compile-bytecode: uv writes no .pyc by default, so with PYTHONDONTWRITEBYTECODE set (or a
	@# read-only venv) every stage, test and Ray worker process compiled torch, Ray and MLflow anew.
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode $(TORCH_SOURCE) -r requirements.lock
	@# Prebuild DeepSpeed's CPU shared-memory comm op once, instead of a JIT build in every process.
	$(BIN)/python -c "from deepspeed.git_version_info import installed_ops as o; assert o.get('deepspeed_shm_comm')" 2>/dev/null || \
	  DS_BUILD_SHM_COMM=1 $(BIN)/uv pip install -q --python $(BIN)/python --no-build-isolation --no-deps \
	    --no-cache --compile-bytecode --reinstall-package deepspeed "$$(grep '^deepspeed==' requirements.lock)"
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

repro: install
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm "init")
	$(BIN)/dvc repro

# A 3-node Ray cluster, moto S3 and an authenticated MLflow server on 127.0.0.1 (README "Scaling out").
cluster-up: install
	$(BIN)/python -m ray_jobs.local_cluster up

cluster-down:
	$(BIN)/python -m ray_jobs.local_cluster down

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# Re-resolve the full pinned closure after editing pyproject.toml.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra platform --extra dev --python-version 3.11 $(TORCH_SOURCE) -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
