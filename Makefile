# One command runs everything a contributor needs: `make check` (the README's test command).
PY ?= python

.PHONY: check lint typecheck test bench

check: lint typecheck test

lint:
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

typecheck:
	$(PY) -m mypy

test:
	$(PY) -m pytest

bench:
	$(PY) bench/run_all.py
