"""Tracing: run > shard > batch > (sink write, checkpoint save) spans, joined to Prefect's
flow-run span, across Dask worker processes, exported with the standard OTLP settings.

* In this process (threads runner): an SDK provider with an in-memory exporter; the tree and
  its parent links are checked, and that Prefect's flow-run span is the run span's parent.
* With the real CLI and Dask worker processes: ``OTEL_EXPORTER_OTLP_ENDPOINT`` points at a
  small OTLP/HTTP receiver in this test, which decodes the protobuf export requests the real
  exporters (flow process and workers) send.
* Off (no provider, no endpoint): no span objects are made at all.
"""

from __future__ import annotations

import collections
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dpipeline_prefect import tracing

from .pipeline_helpers import flights, load_summary, run_cli, write_parquet_files, write_yaml

ROWS, FILES, BATCH = 6000, 2, 1000  # 2 shards of 3 batches


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tracing") / "in"
    write_parquet_files(flights(ROWS), folder, files=FILES, row_group_size=1000)
    return folder


def _cfg(tmp_path: Path, src: Path, runner: str) -> dict:
    return {
        "name": "trace-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": BATCH},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"format": "parquet", "path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": runner, "workers": 2},
    }


def _check_tree(spans: list[dict], flow_run_id: str, links_same_trace: bool = True) -> dict:
    """spans: {name, id, parent, trace, attrs, links}. Returns the spans by name."""
    by_name = collections.defaultdict(list)
    for s in spans:
        by_name[s["name"]].append(s)
    by_id = {s["id"]: s for s in spans}
    (run,) = by_name["dpipeline.run"]
    assert run["attrs"]["prefect.flow_run.id"] == flow_run_id
    # joined to Prefect's own flow-run span
    flow_span = by_id.get(run["parent"])
    assert flow_span is not None, "the run span has no parent among the exported spans"
    assert flow_span["attrs"].get("prefect.run.type") == "flow"
    assert flow_span["attrs"].get("prefect.run.id") == flow_run_id
    shards = by_name["dpipeline.shard"]
    assert len(shards) == FILES
    assert all(s["parent"] == run["id"] and s["trace"] == run["trace"] for s in shards)
    batches = by_name["dpipeline.batch"]
    assert len(batches) == FILES * ROWS // FILES // BATCH
    for sh in shards:
        mine = sorted((b for b in batches if b["parent"] == sh["id"]), key=lambda b: b["attrs"]["dpipeline.batch.seq"])
        assert [b["attrs"]["dpipeline.batch.seq"] for b in mine] == [0, 1, 2], sh
        # each shard links to the Prefect task-run span it ran in (in a Dask worker, Prefect
        # starts that span in a trace of its own: see the README's tracing section)
        assert len(sh["links"]) == 1, sh
        if links_same_trace:
            assert sh["links"] == [run["trace"]], sh
    for b in batches:
        kids = [s["name"] for s in spans if s["parent"] == b["id"]]
        assert sorted(kids) == ["dpipeline.checkpoint.save", "dpipeline.sink.write"], (b, kids)
    assert all(s["trace"] == run["trace"] for s in spans if s["name"].startswith("dpipeline."))
    return by_name


@pytest.fixture
def memory_spans():
    """A process-wide SDK provider with an in-memory exporter, removed after the test."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    saved = trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    assert tracing.refresh()
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved
        tracing.refresh()


def test_off_makes_no_spans():
    assert not tracing.refresh()
    assert tracing.span("x") is tracing.span("y")  # the one shared no-op context manager
    items = [1, 2]
    assert tracing.traced_batches(items) is items
    sentinel = object()
    assert tracing.checkpoint_spans(sentinel) is sentinel
    assert tracing.carrier() is None


@pytest.mark.prefect
def test_span_tree_in_memory_threads_runner(tmp_path, src, memory_spans):
    from dpipeline_prefect.pipeline import Pipeline

    summary = Pipeline(_cfg(tmp_path, src, "threads")).run(run_key="t1")
    assert summary["status"] == "completed" and summary["rows_in"] == ROWS
    spans = [{
        "name": s.name, "id": s.context.span_id, "trace": s.context.trace_id,
        "parent": s.parent.span_id if s.parent else None, "attrs": dict(s.attributes or {}),
        "links": [lk.context.trace_id for lk in s.links],
    } for s in memory_spans.get_finished_spans()]
    by_name = _check_tree(spans, summary["flow_run_id"])
    (run,) = by_name["dpipeline.run"]
    assert run["attrs"]["dpipeline.rows_in"] == ROWS and run["attrs"]["dpipeline.status"] == "completed"


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes ExportTraceServiceRequest protobufs."""

    spans: list = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        with self.lock:
            for rs in req.resource_spans:
                res = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs = {}
                        for kv in s.attributes:
                            v = kv.value
                            attrs[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
                        self.spans.append({
                            "name": s.name, "id": s.span_id.hex(), "trace": s.trace_id.hex(),
                            "parent": s.parent_span_id.hex() or None, "attrs": attrs,
                            "links": [lk.trace_id.hex() for lk in s.links], "service": res.get("service.name"),
                            "path": self.path,
                        })
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):  # quiet
        pass


@pytest.mark.prefect
@pytest.mark.slow
def test_otlp_export_from_cli_and_dask_workers(tmp_path, src):
    _Receiver.spans = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        p = write_yaml(tmp_path / "p.yaml", _cfg(tmp_path, src, "dask"))
        r = run_cli("run", str(p), "--run-key", "t2", "--summary-json", str(tmp_path / "s.json"), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{srv.server_address[1]}",
            "OTEL_SERVICE_NAME": "dpipeline-test"})
        assert r.returncode == 0, r.stderr
    finally:
        srv.shutdown()
        srv.server_close()
    s = load_summary(tmp_path / "s.json")
    spans = list(_Receiver.spans)
    assert all(x["path"] == "/v1/traces" and x["service"] == "dpipeline-test" for x in spans)
    by_name = _check_tree(spans, s["flow_run_id"], links_same_trace=False)
    (run,) = by_name["dpipeline.run"]
    worker_pids = {x["attrs"]["process.pid"] for x in by_name["dpipeline.shard"]}
    assert run["attrs"]["process.pid"] not in worker_pids  # shards ran in Dask worker processes
