# The few targets people expect. Run inside the venv of README "The two commands".
PY ?= python

.PHONY: test test-full lint docs bench help

help:
	@echo "make test       the fast tier (what to run before every commit)"
	@echo "make test-full  the full suite, slow tests included (what .ci/run runs)"
	@echo "make lint       ruff and the import-linter layer contracts"
	@echo "make docs       the docs site, strictly (a dead link or a missing page fails), into site/"
	@echo "make bench      the benchmarks under bench/ (minutes; results in bench/results, BENCHMARKS.md)"

test:
	$(PY) -m pytest

test-full:
	$(PY) -m pytest -m "" -n 2

lint:
	$(PY) -m ruff check sem hydra_plugins tests bench launch.py
	lint-imports

docs:
	$(PY) -m mkdocs build --strict

bench:
	$(PY) -m bench.run
