# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLES := sample_checkpoints

.PHONY: run test test-timing lint bench samples clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,test]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/svdrank diff $(SAMPLES)/base.safetensors $(SAMPLES)/tuned-sharded --format table
	$(BIN)/svdrank recommend --preset balanced -o ranks.json
	$(BIN)/svdrank recommend --format table

# The linters, then the tests and the docstring examples; wall-clock timings are left out.
test: $(VENV)/.installed-dev
	$(BIN)/ruff check svdrank tests benchmarks $(SAMPLES)
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not timing"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check svdrank tests benchmarks $(SAMPLES)
	$(BIN)/mypy

# Wall-clock tests: run on a quiet machine, apart from the rest.
test-timing: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m timing

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks

samples: $(VENV)/.installed
	$(BIN)/python $(SAMPLES)/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
