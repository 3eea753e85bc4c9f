# Each target sets itself up: the first run creates .venv and installs gcl into it.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## The main job on embedded defaults: local Ray, MLflow on SQLite in ./mlruns.db, generated data.
demo: $(STAMP)
	$(BIN)/gcl demo

## Lint, then the whole test suite (unit and local-Ray integration tests; GPU tests skip without CUDA).
test: $(STAMP)
	$(BIN)/ruff check gcl workflows tests
	$(BIN)/python -m pytest -q

## Only the fast unit tests.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check gcl workflows tests
	$(BIN)/ruff format --check gcl workflows tests

format: $(STAMP)
	$(BIN)/ruff format gcl workflows tests
	$(BIN)/ruff check --fix gcl workflows tests

bench: $(STAMP)
	$(BIN)/gcl bench

clean:
	rm -rf $(VENV) .pytest_cache gcl_runs mlruns.db mlruns.db.lock mlartifacts
