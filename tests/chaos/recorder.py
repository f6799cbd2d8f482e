"""Pytest plugin of ``make chaos``: records each test's outcome and output figures.

Loaded with ``-p tests.chaos.recorder`` and ``DPIPELINE_CHAOS_RECORD=<file>``. For every test
it appends one JSON line: node id, outcome, duration and, for each call the test made to
``pipeline_helpers.assert_exactly_once``, the rows expected and found, duplicates and rows
lost. That gives figures for the chaos cases whose tests live elsewhere (breaker, dead letters,
lock) without changing them. The wrapper only measures, then calls the real check.
"""

from __future__ import annotations

import json
import os
import time

_current: dict | None = None


def _record(line: dict) -> None:
    path = os.environ.get("DPIPELINE_CHAOS_RECORD")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")


def pytest_configure(config):  # noqa: ARG001 - pytest hook
    # Patched here, not at import: tests/conftest.py must set the Prefect environment before
    # anything imports prefect, and it is loaded before pytest_configure runs.
    from tests import pipeline_helpers as ph

    real = ph.assert_exactly_once

    def measured(out_path, want, storage_options=None, duckdb_check=True):
        if _current is not None:
            try:
                got = ph.read_output(out_path, storage_options)
                ids = got["row_id"]
                _current["checks"].append({
                    "rows_expected": int(len(want)), "rows_found": int(len(got)),
                    "duplicates": int(ids.duplicated().sum()),
                    "rows_lost": int(len(set(want["row_id"]) - set(ids)))})
            except Exception as exc:  # noqa: BLE001 - measuring must not change the outcome
                _current["checks"].append({"error": repr(exc)[:200]})
        return real(out_path, want, storage_options, duckdb_check)

    ph.assert_exactly_once = measured


def pytest_runtest_setup(item):
    global _current
    _current = {"node": item.nodeid, "checks": [], "outcome": "passed", "duration_s": 0.0}


def pytest_runtest_logreport(report):
    if _current is None or report.nodeid != _current["node"]:
        return
    _current["duration_s"] += report.duration
    if report.failed:
        _current["outcome"] = "failed"
    elif report.skipped and report.when != "teardown":
        _current["outcome"] = "skipped"
    if report.when == "teardown":
        _current["duration_s"] = round(_current["duration_s"], 1)
        _current["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _record(_current)
