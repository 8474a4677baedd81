# bnexp developer commands. `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export BNEXP_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: help setup test test-fast bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(BIN)/bnexp  ## create .venv and install bnexp with its dev extras (torch 2.14.1 from the local cache)

$(BIN)/bnexp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

test: setup  ## run the whole test suite (CPU; real-data tests read BNEXP_DATA_DIR, default ../shared/data)
	$(BIN)/python -m pytest -q -m ""

test-fast: setup  ## only the fast tests (no slow, no real data)
	$(BIN)/python -m pytest -q

bench: setup  ## benchmarks on this machine: BN layer, training epoch and TensorBoard logging vs plain PyTorch
	$(BIN)/bnexp bench bn epoch log

clean:  ## remove caches (keeps .venv and results/)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
