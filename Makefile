# Developer and CI entry points. Everything runs from the project's own venv (.venv), which
# `make venv` creates and keeps in step with pyproject.toml (a stamp file records the install).
# The services the tests need (SeaweedFS, Prefect server) are started by the tests themselves
# (tests/conftest.py, dpipeline_prefect/devservices.py) on free ports: nothing to start by hand.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dpipeline-install.stamp
# per-test limit (pytest-timeout): a hung service or flow fails its test instead of the run
PYTEST_TIMEOUT ?= 900
PYTEST_ARGS ?=
TESTS ?= tests

.PHONY: venv test demo bench lint clean

venv: $(STAMP)

# Re-run the install whenever pyproject.toml changes; pip leaves what is already satisfied.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# Exit code 5 means pytest collected no tests: report it loudly, do not fail the target.
test: venv
	@rc=0; $(PY) -m pytest -q -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) $(PYTEST_ARGS) $(TESTS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

demo: venv
	$(PY) examples/flights/run_demo.py

bench: venv
	$(PY) benchmarks/run.py

lint:
	@if [ -x $(VENV)/bin/ruff ]; then $(VENV)/bin/ruff check dpipeline_prefect tests; \
	elif command -v ruff >/dev/null 2>&1; then ruff check dpipeline_prefect tests; \
	else echo "ruff not installed (pip install ruff): lint skipped"; fi

# Build and test leftovers only; the venv stays (remove it with: rm -rf .venv).
clean:
	rm -rf build .pytest_cache benchmarks/work
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print | xargs rm -rf
