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
# pytest-xdist workers for `make test` (each starts its own services on free ports; a test
# file stays on one worker so module fixtures are shared); 0 runs in one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
TESTS ?= tests

.PHONY: venv test demo bench lint clean chaos

venv: $(STAMP)

# Re-run the install whenever pyproject.toml changes; pip leaves what is already satisfied.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# Exit code 5 means pytest collected no tests: report it loudly, do not fail the target.
test: venv
	@tools/ensure_chromium.sh
	@rc=0; $(PY) -m pytest -q -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) $(XDIST) $(PYTEST_ARGS) $(TESTS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The chaos suite alone (tests/chaos plus the fault tests it reuses), then RELIABILITY.md from
# the figures the tests record; the exit code is pytest's.
CHAOS_RECORD := build/chaos-record.jsonl
CHAOS_REUSED := tests/test_breaker.py::test_flaky_sink_run_completes_exactly_once_with_breaker_cycles \
	tests/test_dead_letter.py::test_poison_rows_go_to_the_queue_and_replay_completes_the_output \
	tests/test_lock.py::test_two_concurrent_cli_runs_one_runs_the_other_waits_or_stops
chaos: venv
	@mkdir -p build && rm -f $(CHAOS_RECORD)
	@rc=0; DPIPELINE_CHAOS_RECORD=$(CURDIR)/$(CHAOS_RECORD) $(PY) -m pytest -q -p no:cacheprovider \
		-p tests.chaos.recorder --timeout=$(PYTEST_TIMEOUT) $(PYTEST_ARGS) tests/chaos $(CHAOS_REUSED) || rc=$$?; \
	$(PY) tests/chaos/report.py $(CHAOS_RECORD) RELIABILITY.md; exit $$rc

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
