# Two commands for a fresh clone (README "Quickstart"):
#   make quickstart   set up .venv and run the default federated fine-tuning simulation
#   make test         set up .venv and run the test suite (what CI runs; it lists the 25 slowest tests,
#                     CI has 20 minutes)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The install is redone only when pyproject.toml changes.
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-all benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/fedtune simulate configs/quickstart.yaml --compare-scratch

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=25

test-all: setup
	$(BIN)/python -m pytest -q -m ""

benchmarks: setup
	$(BIN)/python benchmarks/transfer.py configs/antsbees.yaml --out benchmarks/results/antsbees
	$(BIN)/python benchmarks/transfer.py configs/quickstart.yaml --out benchmarks/results/digits

clean:
	rm -rf $(VENV) runs
