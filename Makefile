# Every target makes the venv it needs; nothing has to be installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
SCENARIO ?= flash_crowd
DURATION ?= 60s
USERS ?= 2000

.PHONY: run test lint mypy check loadtest bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed  ## the whole service on throwaway servers (or REDIS_URL / DATABASE_URL)
	$(BIN)/flashsale dev

test: $(VENV)/.installed  ## the test suite with coverage
	$(BIN)/coverage erase
	$(BIN)/pytest --cov --cov-report=term $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check service tests loadtest
	$(BIN)/ruff format --check service tests loadtest

mypy: $(VENV)/.installed
	$(BIN)/mypy

check: lint mypy test

clean:
	rm -rf $(VENV) .coverage* htmlcov .pytest_cache .mypy_cache .ruff_cache
