# Two commands do all set-up: `make demo` and `make test`. `make docs` builds the site into site/, `make dist` the
# wheel and sdist into dist/ (both run by `make test`).
# A virtual environment is created in .venv if missing. On a machine with no torch, the CPU build is installed
# first (TORCH_SPEC); a python that already has torch (a GPU box) gets a venv that sees it and keeps it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sdebatch-installed

.PHONY: install demo demo-mlp test test-all lint docs dist bench clean

$(BIN)/python:
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	  echo "creating $(VENV) (sees the torch already installed)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[all,dev,docs]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.main_demo

demo-mlp: $(STAMP)
	$(BIN)/python -m experiments.demo

test: $(STAMP) lint docs dist
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check sdebatch experiments paper_figures benchmarks tests examples docs

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

data/tiny/index.json: | $(STAMP)
	$(BIN)/sdebatch data prepare --preset tiny --out data/tiny

bench: $(STAMP) data/tiny/index.json
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) *.egg-info site dist
