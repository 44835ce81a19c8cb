# The two commands of the README: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

BENCH_VENV := .venv-bench

.PHONY: run test bench bench-aggregation bench-rounds demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13) and "fltraining needs Python 3.13 (see .python-version)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fltraining serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/api_bench.py

# Flower lives in its own venv so it never changes the service's packages.
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	touch $@

bench-aggregation: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/aggregation_bench.py $(ARGS)

bench-rounds: $(STAMP)
	$(PY) bench/round_latency_bench.py $(ARGS)

demo: $(STAMP)
	$(PY) examples/federated_digits.py $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info
