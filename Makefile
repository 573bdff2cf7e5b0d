# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On the CPU machines a local CPU build of torch 2.13.0 is installed first, so the range in
# pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-all bench clean

$(BIN)/lorasb: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/lorasb

demo: install
	HF_HUB_OFFLINE=1 bash examples/demo.sh demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/estimate.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/decompose.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/train.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/merge.py

clean:
	rm -rf $(VENV) demo build *.egg-info
