"""``dpipeline run`` with JSON log lines, then ``dpipeline report``: end to end through the CLI.

The run goes on a local Dask cluster of worker processes with its checkpoints (so its metrics)
and output on the real S3 with credentials from the environment; its stderr must hold one JSON
object per dpipeline log line, from the flow process and from the workers, each with pipeline,
run key, shard and batch; the report must be one self-contained HTML page with the three
plots. Neither may contain the S3 key or secret.
"""

from __future__ import annotations

import json
import re
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dpipeline_prefect.metrics import LatencyHistogram
from dpipeline_prefect.report import render_html, throughput_series

from .pipeline_helpers import flights, load_summary, run_cli, write_parquet_files, write_yaml
from .test_events import POISON


def test_throughput_series_spreads_each_batch_over_its_interval():
    run = {"fields": ["t", "seq", "rows_in", "rows_out", "rows_dead", "bytes_written", "latency_s"],
           "shards": [{"records": [[10.0, 0, 100, 100, 0, 1, 1.0], [12.0, 1, 100, 100, 0, 1, 2.0]]},
                      {"records": [[12.0, 0, 400, 400, 0, 1, 2.0]]}]}
    t0, width, series = throughput_series([run], bins=3)
    assert t0 == 9.0 and width == pytest.approx(1.0)
    # 9-10: 100 rows/s (shard a); 10-12: 50 rows/s (a) + 200 rows/s (b)
    assert series == pytest.approx([100.0, 250.0, 250.0])
    assert sum(v * width for v in series) == pytest.approx(600)


def test_render_html_is_self_contained_svg():
    h = LatencyHistogram()
    for v in (0.01, 0.02, 0.02, 0.5):
        h.observe(v)
    run = {"pipeline": "p", "run_key": "k", "flow_run_id": "x", "started": 1.0, "ended": 3.0, "status": "completed",
           "totals": {"rows_in": 10, "batches": 4}, "hist": h.to_dict(), "workers": {"w:1": {"rss": 2**20, "cpu": 50}},
           "fields": ["t", "seq", "rows_in", "rows_out", "rows_dead", "bytes_written", "latency_s"],
           "shards": [{"shard": "s0", "label": "<b>", "status": "completed", "rows_in": 10, "rows_out": 9,
                       "rows_dead": 1, "batches": 4, "retries": 0, "duration_s": 2.0, "hist": h.to_dict(),
                       "records": [[2.0, 0, 5, 5, 0, 1, 0.5], [3.0, 1, 5, 4, 1, 1, 1.0]]}]}
    page = render_html("p", "k", [run], "s3://user:pw@ckpt/x")
    assert "<b>" not in page.split("<body>")[1].replace("<b", "") or "&lt;b&gt;" in page  # escaped label
    assert "user:pw" not in page and "s3://ckpt/x" in page
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # well-formed
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def _plots(page: str) -> dict[str, ET.Element]:
    return {ET.fromstring(s).get("data-plot"): ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", page, flags=re.S)}


@pytest.mark.prefect
@pytest.mark.s3
def test_cli_json_logs_and_html_report_without_secrets(tmp_path: Path, s3):
    creds = s3.storage_options()
    env = {"OBS_TEST_S3_KEY": creds["key"], "OBS_TEST_S3_SECRET": creds["secret"]}
    opts = {"key": "${OBS_TEST_S3_KEY}", "secret": "${OBS_TEST_S3_SECRET}",
            "client_kwargs": {"endpoint_url": s3.endpoint_url}}
    src = tmp_path / "in"
    write_parquet_files(flights(4000), src, files=2, row_group_size=500)
    name = "rep-" + uuid.uuid4().hex[:8]
    p = write_yaml(tmp_path / "p.yaml", {
        "name": name,
        "source": {"format": "parquet", "path": str(src)},
        "batching": {"rows": 500},
        "transforms": ["tests.test_events:reject_some"],
        "sink": {"format": "parquet", "path": f"s3://out/{name}/{{run_key}}/", "storage_options": opts},
        "checkpoint": {"path": f"s3://ckpt/{name}/", "storage_options": opts},
        "runner": {"kind": "dask", "workers": 2},
        "dead_letter": {},
        "monitoring": {"log_format": "json"},
    })
    # INFO: the tests run Prefect's loggers at WARNING, which would drop the flow's INFO lines
    res = run_cli("run", str(p), "--run-key", "r1", "--summary-json", str(tmp_path / "s.json"),
                  env={**env, "PREFECT_LOGGING_LEVEL": "INFO"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = load_summary(tmp_path / "s.json")
    assert summary["rows_dead_letter"] == len(POISON)

    lines = [ln for ln in res.stderr.splitlines() if ln.startswith('{"')]
    docs = [json.loads(ln) for ln in lines]  # every such line is one JSON object
    assert docs, res.stderr[-2000:]
    assert all(d["pipeline"] == name and d["run_key"] == "r1" for d in docs)
    assert all({"ts", "level", "logger", "message", "shard", "batch", "flow_run_id"} <= set(d) for d in docs)
    done = [d for d in docs if " done: 2000 row(s) in" in d["message"]]
    assert {d["shard"] for d in done} == {"part-000.parquet", "part-001.parquet"}  # from the workers
    assert all(d["task_run_id"] and d["flow_run_id"] == summary["flow_run_id"] for d in done)
    dead = [d for d in docs if "dead-letter store" in d["message"]]
    assert dead and all(isinstance(d["batch"], int) for d in dead)
    assert any(d["logger"] == "prefect.flow_runs" and d["shard"] is None for d in docs)  # the flow's own lines

    out = tmp_path / "report.html"
    rep = run_cli("report", str(p), "--run-key", "r1", "-o", str(out), env=env)
    assert rep.returncode == 0, rep.stderr
    page = out.read_text()
    plots = _plots(page)
    assert set(plots) == {"throughput", "latency", "shards"}
    ns = "{http://www.w3.org/2000/svg}"
    assert plots["throughput"].find(f"{ns}polyline") is not None
    bars = [r for r in plots["latency"].iter(f"{ns}rect")]
    assert sum(int(r.find(f"{ns}title").text.split(": ")[1].split()[0]) for r in bars) == 8  # 8 batches
    titles = [t.text for t in plots["shards"].iter(f"{ns}title")]
    assert "part-000.parquet rows_in: 2,000" in titles and "part-000.parquet rows_dead: 3" in titles
    assert "part-001.parquet" in page and "rows dead-lettered</th><td>4" in page
    for secret in (creds["key"], creds["secret"]):
        assert secret not in page and secret not in res.stderr and secret not in res.stdout

    missing = run_cli("report", str(p), "--run-key", "nope", "-o", str(tmp_path / "x.html"), env=env)
    assert missing.returncode == 1 and "no metrics for run key 'nope'" in missing.stderr
