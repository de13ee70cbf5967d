# The README's quick start: `make demo` and `make test`. Both create .venv on first use and
# install what they need; torch is pinned (constraints.txt) so no resolver pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flora-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install demo test lint bench clean lock

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt constraints.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -c constraints.lock -e '.[dev,flower,quant,tensorboard,wandb,mlflow]'
	$(BIN)/flora models install smollm2 --if-missing
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flora run configs/default.toml --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lock:  # regenerate constraints.lock from a fresh environment (scripts/lock.sh)
	PYTHON=$(PYTHON) scripts/lock.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
