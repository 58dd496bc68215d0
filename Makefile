# One-command setup, tests and demo. Everything installs into ./.venv.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

lint: setup
	$(VENV)/bin/ruff check blip_core components pipelines benchmarks tests
	$(VENV)/bin/ruff format --check blip_core components pipelines benchmarks tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
