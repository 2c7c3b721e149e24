# Every target makes the venv it needs; nothing has to be installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
SCENARIO ?= flash_crowd
DURATION ?= 60s
USERS ?= 2000

.PHONY: run test lint mypy check loadtest bench bench-cluster clean

# Two stamps: the service alone (what `make run` needs), and the service with the development
# tools (tests, linters, load tests, benchmarks) on top.
$(VENV)/.service: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.service
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.service  ## the whole service on throwaway servers (or REDIS_URL / DATABASE_URL)
	$(BIN)/flashsale dev

TEST_WORKERS ?= 3
test: $(VENV)/.installed  ## the test suite with coverage, in TEST_WORKERS processes (pytest-xdist)
	$(BIN)/coverage erase
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup --cov --cov-report=term $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check service tests loadtest bench
	$(BIN)/ruff format --check service tests loadtest bench

mypy: $(VENV)/.installed
	$(BIN)/mypy

check: lint mypy test

loadtest: $(VENV)/.installed  ## a locust scenario against the whole service; last line PASS or FAIL: ...
	$(PY) -m loadtest.run --scenario $(SCENARIO) --duration $(DURATION) --users $(USERS) $(if $(PROCESSES),--processes $(PROCESSES))

bench: $(VENV)/.installed  ## throughput and latency against reference designs, with wrk (installed if missing)
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk (Debian package)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null; } \
	  || { echo "make bench needs wrk: apt-get install wrk"; exit 1; }
	$(PY) -m loadtest.bench $(BENCH_ARGS)

bench-cluster: $(VENV)/.installed  ## one hot item with 1, 2, 3 shards on a throwaway 3-master cluster (needs redis-benchmark)
	@command -v redis-benchmark >/dev/null 2>&1 || { echo "installing redis-benchmark (Debian package redis-tools)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-tools >/dev/null; } \
	  || { echo "make bench-cluster needs redis-benchmark: apt-get install redis-tools"; exit 1; }
	$(PY) -m loadtest.cluster_bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .coverage* htmlcov .pytest_cache .mypy_cache .ruff_cache
