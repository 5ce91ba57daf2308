# emotion-stream: every target installs what it needs first (uv + the locked dependencies).
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV ?= python3 -m uv
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: help setup demo test chaos bench bench-gpu lint format schemas docs clean

help:
	@echo "make demo    - start a local Kafka, stream sample posts through the worker, show a summary"
	@echo "make test    - the test suite against a real Kafka broker (started locally if needed)"
	@echo "make chaos   - long fault-injection tests (kills, rebalances, broker restarts, load)"
	@echo "make bench   - throughput/latency/fidelity benchmark; writes bench/results/"
	@echo "make bench-gpu - the inference benchmark sized for a CUDA GPU (no Kafka needed)"
	@echo "make lint    - ruff and mypy"

.venv/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv || python3 -m pip install --quiet --user uv
	$(UV) sync --frozen --all-extras
	@touch $@

setup: .venv/.synced

demo: setup
	$(PY) -m worker.demo

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

chaos: setup
	$(PY) -m pytest -m slow -v $(PYTEST_ARGS)

# GOEMOTIONS=DIR: a folder with GoEmotions' dev.tsv (default: `emoworker data fetch goemotions`'s)
GOEMOTIONS ?=
bench: setup
	$(PY) -m worker.cli bench $(if $(GOEMOTIONS),--data $(GOEMOTIONS)/dev.tsv)

bench-gpu: setup
	$(PY) -m worker.cli bench-gpu

lint: setup
	.venv/bin/ruff format --check worker schemas tests bench
	.venv/bin/ruff check worker schemas tests bench
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format worker schemas tests bench
	.venv/bin/ruff check --fix worker schemas tests bench

schemas: setup
	$(PY) -m worker.cli schema --write

docs: setup
	$(PY) -m worker.docs

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
