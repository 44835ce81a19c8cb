# The two commands of the README: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

BENCH_VENV := .venv-bench

.PHONY: run test docs bench bench-aggregation bench-rounds bench-scale bench-transfer bench-inference bench-dashboard demo demo-attack clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13) and "fltraining needs Python 3.13 (see .python-version)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fltraining serve $(ARGS)

# The docs site into site/ (served by `make run` at /docs/): the settings table regenerated from the Settings
# class, then built offline, every link and anchor checked (--strict).
docs: $(STAMP)
	$(PY) docs/settings_page.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# First the layers (import-linter, pyproject.toml) and the docs site as committed (strict); then
# the whole suite twice: on the `files` blob store (the embedded default) and on `gridfs`, side by
# side (each tier starts its own embedded store); the gridfs tier's output follows the files tier's.
# The dashboard's browser tests and the tests of pure functions (no service, no store) run in the files tier
# only: the blob store is nothing a page sees, and pure functions do not know it.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@rm -f .test-gridfs.log; \
	FLTRAINING_BLOB_STORE=gridfs $(PY) -m pytest -p no:cacheprovider -m "not browser and not store_independent" --durations=15 $(PYTEST_ARGS) > .test-gridfs.log 2>&1 & gridfs=$$!; \
	echo "== blob store tier: files (the gridfs tier runs beside it; its output follows) =="; \
	FLTRAINING_BLOB_STORE=files $(PY) -m pytest --durations=15 $(PYTEST_ARGS); files=$$?; \
	wait $$gridfs; gridfs_status=$$?; \
	echo "== files tier exit $$files, gridfs tier exit $$gridfs_status; the gridfs tier's output: =="; \
	cat .test-gridfs.log; \
	[ $$files -eq 0 ] && [ $$gridfs_status -eq 0 ]

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

# N simulated clients per round against `fltraining serve` (N = 10 / 100 / 300 / 1,000): ARGS="--mongodb-url URL" for MongoDB.
bench-scale: $(STAMP)
	$(PY) bench/scale_bench.py $(ARGS)

bench-transfer: $(STAMP)
	$(PY) bench/transfer_bench.py $(ARGS)

# 100 trainings: how soon the dashboard's pages are usable in headless chromium, and what they weigh.
bench-dashboard: $(STAMP)
	$(PY) bench/dashboard_bench.py $(ARGS)

bench-inference: $(STAMP)
	$(PY) bench/inference_bench.py $(ARGS)

demo: $(STAMP)
	$(PY) examples/federated_digits.py --method all $(ARGS)

# One of five clients sends −10× its update: accuracy per round under mean, median, trimmed mean, Krum; then DP.
demo-attack: $(STAMP)
	$(PY) examples/attack_demo.py $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build site *.egg-info
