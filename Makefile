# Each target sets itself up: the first run creates .venv and installs gcl into it.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-unit lint format bench clean browser

# Quiet: one line, pip's output in .venv/install.log (its last lines on the terminal if it fails).
# The distribution was called `gcl` before it became gcl-retrieval: an older .venv loses that one.
$(STAMP): pyproject.toml constraints.txt
	@echo "setting up .venv: gcl and its pinned dependencies (about 3 minutes; log: $(VENV)/install.log)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install -q --upgrade pip && \
	   $(BIN)/python -m pip uninstall -q -y gcl && \
	   $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' ) > $(VENV)/install.log 2>&1 \
	   || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

## The main job on embedded defaults: local Ray, MLflow on SQLite in ./mlruns.db, generated data.
demo: $(STAMP)
	$(BIN)/gcl demo

## Lint, then the test suite (unit and local-Ray integration tests; GPU tests skip without CUDA),
## without the slow tier.
test: $(STAMP)
	$(BIN)/ruff check gcl workflows tests experiments/*.py
	$(BIN)/ruff format --check gcl workflows tests experiments/*.py
	$(BIN)/python -m pytest -q -m "not slow"

## The slow tier: killed workers and drivers, resumes, MLflow outages, two trainings at once,
## a Ray head and two nodes, a model installed afresh, the search page in a browser.
test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m slow

## Headless Chromium for the search page's browser test, from Debian's packages where this machine
## can install them (as root, or with sudo that asks no password); elsewhere that test skips, saying why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ echo "installing chromium and chromium-driver (Debian packages; log: $(VENV)/apt.log)"; \
	  { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium chromium-driver; \
	    else sudo -n apt-get install -y -q chromium chromium-driver; fi; } > $(VENV)/apt.log 2>&1 || \
	  echo "chromium could not be installed (see $(VENV)/apt.log): the browser test will skip"; }

## Only the fast unit tests.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check gcl workflows tests experiments/*.py
	$(BIN)/ruff format --check gcl workflows tests experiments/*.py

format: $(STAMP)
	$(BIN)/ruff format gcl workflows tests experiments/*.py
	$(BIN)/ruff check --fix gcl workflows tests experiments/*.py

bench: $(STAMP)
	$(BIN)/gcl bench

clean:
	rm -rf $(VENV) .pytest_cache gcl_runs mlruns.db mlruns.db.lock mlartifacts
