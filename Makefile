# One-command setup, tests and demo. Everything installs into ./.venv (Python 3.11).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test test-fast lint format demo demo-clean clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[workflow,dev]'
	@touch $(STAMP)

## the whole suite (unit, parity, integration, slow end-to-end tests), in TEST_WORKERS processes (pytest-xdist)
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal

## everything except the tests marked slow
test-fast: setup
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal -m "not slow"

lint: setup
	$(VENV)/bin/ruff check blip_core components pipelines benchmarks tests

format: setup
	$(VENV)/bin/ruff format blip_core components pipelines benchmarks tests

## the whole BLIP + CapFilt workflow on the embedded toy-web data (CPU): dvc repro, then the comparison table
demo: setup
	@start=$$(date +%s); \
	export BLIP_PARENT_RUN_ID=$$($(PY) -m components.tracking start --name "make demo") || exit 1; \
	if dvc repro; then status=FINISHED; else status=FAILED; fi; \
	$(PY) -m components.tracking end --status $$status >/dev/null; \
	test $$status = FINISHED || { echo "demo failed: see the stage output above"; exit 1; }; \
	echo; cat outputs/evaluate/report.md; echo; \
	echo "demo finished in $$(( $$(date +%s) - start )) s"; \
	echo "Review the runs:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  then open"; \
	$(PY) -m components.tracking url

## remove the demo's data, outputs and local MLflow store
demo-clean:
	rm -rf data outputs mlflow.db mlruns

clean: demo-clean
	rm -rf $(VENV) .pytest_cache build *.egg-info
