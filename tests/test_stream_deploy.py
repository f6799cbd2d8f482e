"""The stream deployment of prefect.yaml: its entrypoint flow, parameters and example pipeline work.

Runs the deployment's flow (``flows/pipeline_flow.py:run_pipeline_flow``) twice on the real
Prefect server, in a copy of the example folder, after ``examples/stream/feed.py`` dropped a
new slice each time: the second run processes only the second slice.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.prefect


def test_prefect_yaml_stream_deployment_runs_the_example(tmp_path, monkeypatch, prefect_server):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    dep = next(d for d in spec["deployments"] if d["name"] == "flights-stream-every-5-min")
    assert dep["schedules"][0]["interval"] > 0 and dep["schedules"][0]["active"]
    pipeline_path = dep["parameters"]["pipeline_path"]
    module, func = dep["entrypoint"].split(":")
    (tmp_path / "examples").mkdir()
    shutil.copytree(ROOT / "examples" / "stream", tmp_path / "examples" / "stream")
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(ROOT))
    try:
        import importlib

        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
    finally:
        sys.path.remove(str(ROOT))
    summaries = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "examples/stream/feed.py", "--hours", "24"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        summaries.append(flow(pipeline_path=pipeline_path, run_key="deploy-test"))
    assert [s["seq"] for s in summaries] == [1, 2] and [s["files_new"] for s in summaries] == [1, 1]
    assert summaries[1]["windows_emitted"] > 0
    # each increment's completion is a Prefect event carrying the stream figures
    from .test_events import read_events

    evs = read_events("flights-stream", lambda got: sum(e.event == "dpipeline.run.completed" and
                                                        e.payload.get("mode") == "stream" for e in got) >= 2)
    done = sorted((e.payload["seq"], e.payload["windows_emitted"]) for e in evs
                  if e.event == "dpipeline.run.completed" and e.payload.get("mode") == "stream")
    assert done[-2:] == [(1, summaries[0]["windows_emitted"]), (2, summaries[1]["windows_emitted"])]
    out = pd.read_parquet(tmp_path / "out" / "flights-stream")
    assert not out.duplicated(["window_start", "origin"]).any()
    assert set(out["origin"].astype(str)) == {"EWR", "JFK", "LGA"}
