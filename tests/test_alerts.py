"""Alerts end to end: Prefect automations on the session's real Prefect server (started by
``prefect server start``, so its triggers and actions services run), a webhook receiver on
loopback (``http.server`` in a thread), real pipeline runs.

* ``alerts install`` twice updates instead of duplicating; ``ls`` and ``remove``; the webhook
  URL (which carries a token in its path) is in no CLI output, automation, block read-back,
  event or flow-run log.
* A run whose sink fails often enough to open the circuit breaker makes the receiver get the
  "breaker opened" notification within a minute.
* A run whose transform raises a terminal error: the receiver gets "run ... Failed".
* The proactive "no completed run within" alert fires with nothing running.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .pipeline_helpers import flights, run_cli, write_parquet_files, write_yaml

CLEAN = "dpipeline_prefect.examples.flights:clean"
NOTIFY_WITHIN_S = 60.0  # the promise: the receiver hears within a minute

pytestmark = pytest.mark.prefect


class Receiver:
    """A webhook endpoint on loopback that records the JSON bodies POSTed to its secret path."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.got: list[dict] = []
        self.cond = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = self.path == f"/hook/{owner.token}"
                self.send_response(200 if ok else 404)
                self.end_headers()
                if ok:
                    with owner.cond:
                        owner.got.append(json.loads(body or b"{}"))
                        owner.cond.notify_all()

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/{self.token}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, pred, timeout: float = NOTIFY_WITHIN_S) -> dict | None:
        """The first notification matching ``pred`` received before ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.got:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def small_input(tmp_path):
    df = flights(8_000)
    folder = tmp_path / "in"
    write_parquet_files(df, folder, files=2, row_group_size=1000)
    return folder, df


def _cfg(tmp_path: Path, src: Path, **over) -> dict:
    cfg = {
        "name": "al-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "batching": {"rows": 1000},
        "transforms": [CLEAN],
        "sink": {"format": "parquet", "path": str(tmp_path / "out")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 2},
        "lock": {"enabled": False},
    }
    cfg.update(over)
    return cfg


def _automations(pipeline: str) -> list:
    from prefect import get_client

    from dpipeline_prefect.alerts import KINDS, automation_name

    with get_client(sync_client=True) as client:
        return [a for k in KINDS for a in client.read_automations_by_name(automation_name(pipeline, k))]


def _events_json(pipeline: str) -> str:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(
            resource=EventResourceFilter(id=[f"dpipeline.pipeline.{pipeline}"])), limit=50)
    return json.dumps([e.model_dump(mode="json") for e in page.events])


def _logs_json(flow_run_id: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert logs, "the run wrote logs to the server"
    return json.dumps([lg.model_dump(mode="json") for lg in logs])


def test_install_twice_updates_lists_and_removes_without_showing_the_url(tmp_path, small_input, receiver, prefect_server):
    from prefect import get_client

    from dpipeline_prefect.alerts import block_name

    cfg = _cfg(tmp_path, small_input[0])
    name = cfg["name"]
    y = write_yaml(tmp_path / "p.yaml", cfg)
    try:
        r1 = run_cli("alerts", "install", str(y), "--webhook", receiver.url, "--no-data-within", "1d")
        assert r1.returncode == 0, r1.stderr
        assert r1.stdout.count("created") == 5, r1.stdout
        first = {a.name: a.id for a in _automations(name)}
        assert len(first) == 5

        # again, the URL from the environment this time: same automations, updated in place
        r2 = run_cli("alerts", "install", str(y), "--no-data-within", "12h",
                     env={"DPIPELINE_ALERT_WEBHOOK": receiver.url})
        assert r2.returncode == 0, r2.stderr
        assert r2.stdout.count("updated") == 5 and "created" not in r2.stdout, r2.stdout
        again = _automations(name)
        assert {a.name: a.id for a in again} == first
        no_data = next(a for a in again if a.name.endswith("/no-completed-run"))
        assert no_data.trigger.within.total_seconds() == 12 * 3600

        # without --no-data-within the proactive alert goes away
        r3 = run_cli("alerts", "install", str(y), "--webhook", receiver.url)
        assert r3.returncode == 0, r3.stderr
        assert "deleted" in r3.stdout
        assert len(_automations(name)) == 4

        # the same from Python code (deployments/alerts.py): updated, still not duplicated
        import subprocess
        import sys

        root = Path(__file__).resolve().parents[1]
        code = subprocess.run([sys.executable, str(root / "deployments" / "alerts.py"), str(y)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "DPIPELINE_ALERT_WEBHOOK": receiver.url})
        assert code.returncode == 0, code.stderr
        assert code.stdout.count(": updated") == 4 and receiver.token not in code.stdout + code.stderr
        assert len(_automations(name)) == 4

        ls = run_cli("alerts", "ls", str(y))
        assert ls.returncode == 0, ls.stderr
        for kind in ("run-failed", "breaker-opened", "dead-letter-threshold", "crash-detection"):
            assert f"dpipeline/{name}/{kind}" in ls.stdout
        assert "no-completed-run" not in ls.stdout

        # the URL is a secret: not in any output, not in the automations, obfuscated in the block
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(block_name(name), "custom-webhook",
                                                     include_secrets=False)
            # the secret is there, for the server's actions service
            full = client.read_block_document_by_name(block_name(name), "custom-webhook")
            assert full.data["secrets"] == {"webhook_url": receiver.url}
            autos_json = json.dumps([a.model_dump(mode="json") for a in _automations(name)])
        for r in (r1, r2, r3, code, ls):
            assert receiver.token not in r.stdout + r.stderr
        assert receiver.token not in autos_json
        assert receiver.token not in json.dumps(doc.model_dump(mode="json"))
        assert doc.data["url"] == "{{webhook_url}}"

        # installs are audited (audit.py): the events name the pipeline, never the URL
        deadline = time.monotonic() + 30
        while (events := _events_json(name)).count('"dpipeline.audit.alerts-install"') < 2 * 4 \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert events.count('"dpipeline.audit.alerts-install"') == 2 * 4, events  # attempted + ok, x4
        assert receiver.token not in events

        # no Prefect server configured: alerts would go nowhere, so it is refused, naming why
        nosrv = run_cli("alerts", "install", str(y), "--webhook", receiver.url, env={"PREFECT_API_URL": ""})
        assert nosrv.returncode == 1 and "set PREFECT_API_URL" in nosrv.stderr, nosrv.stderr
        assert receiver.token not in nosrv.stdout + nosrv.stderr

        # a bad URL: one line that does not echo it
        bad = run_cli("alerts", "install", str(y), "--webhook", f"ftp://x/{receiver.token}")
        assert bad.returncode == 1 and "--webhook" in bad.stderr and receiver.token not in bad.stderr
    finally:
        rm = run_cli("alerts", "remove", str(y))
    assert rm.returncode == 0, rm.stderr
    assert "removed 5" in rm.stdout, rm.stdout  # 4 automations and the block
    assert _automations(name) == []


def test_breaker_opening_notifies_the_webhook_within_a_minute(tmp_path, small_input, receiver, prefect_server, monkeypatch):
    from dpipeline_prefect.alerts import install, remove
    from dpipeline_prefect.pipeline import Pipeline

    import fsspec

    from . import test_breaker

    # test_retry registers another flaky:// class; in a pytest worker that ran it after
    # importing test_breaker, the import above would leave that one in place
    fsspec.register_implementation("flaky", test_breaker.FlakyFileSystem, clobber=True)
    src, df = small_input
    monkeypatch.setenv("DPIPELINE_TEST_FLAKY_RATE", "0.5")
    cfg = _cfg(tmp_path, src,
               sink={"format": "parquet", "path": f"flaky://{tmp_path / 'out'}"},
               retry={"max_attempts": 30, "base_delay_s": 0.05, "max_delay_s": 0.3, "jitter": 0.2},
               breaker={"failure_rate": 0.35, "min_calls": 4, "window_s": 10.0, "open_s": 0.3,
                        "half_open_calls": 1, "sync_s": 0.1, "degraded_concurrency": 1})
    install(cfg["name"], receiver.url)
    try:
        t0 = time.monotonic()
        summary = Pipeline(cfg).run(run_key="flaky")
        assert summary["status"] == "completed" and summary["breaker_openings"] >= 1
        msg = receiver.wait_for(lambda m: "circuit breaker opened" in m.get("subject", ""))
        took = time.monotonic() - t0
        assert msg is not None, f"no breaker notification within {NOTIFY_WITHIN_S:.0f} s; got {receiver.got}"
        assert msg["pipeline"] == cfg["name"]
        assert "breaker sink opened in run key flaky" in msg["body"]
        assert "failure rate" in msg["body"]
        # one notification per quiet window, however often the breaker opened
        time.sleep(2)
        assert sum("breaker" in m["subject"] for m in receiver.got) == 1, receiver.got
        events = _events_json(cfg["name"])
        assert "dpipeline.breaker.opened" in events and receiver.token not in events
        assert receiver.token not in _logs_json(summary["flow_run_id"])
        print(f"breaker notification {took:.1f} s after the run started")
    finally:
        remove(cfg["name"])


def test_failed_run_notifies_the_webhook_within_a_minute(tmp_path, small_input, receiver, prefect_server):
    from dpipeline_prefect.alerts import install, remove

    src, _ = small_input
    cfg = _cfg(tmp_path, src, transforms=["tests.test_breaker:sometimes_fails", CLEAN])
    y = write_yaml(tmp_path / "p.yaml", cfg)
    install(cfg["name"], receiver.url)
    try:
        t0 = time.monotonic()
        r = run_cli("run", str(y), "--run-key", "bad", cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 1 and "enrichment service said no" in r.stderr, r.stderr
        msg = receiver.wait_for(lambda m: "Failed" in m.get("subject", ""))
        took = time.monotonic() - t0
        assert msg is not None, f"no failure notification within {NOTIFY_WITHIN_S:.0f} s; got {receiver.got}"
        assert msg["subject"] == f"dpipeline {cfg['name']}: run {cfg['name']}-bad Failed"
        assert "enrichment service said no" in msg["body"]
        assert receiver.token not in r.stdout + r.stderr
        print(f"failure notification {took:.1f} s after the run started")
    finally:
        remove(cfg["name"])


def poison_some(df):
    """clean(), but a row whose row_id ends in 007 makes the batch fail (a bad record)."""
    from dpipeline_prefect.examples.flights import clean

    bad = df["row_id"] % 1000 == 7
    if bad.any():
        raise ValueError(f"bad record {int(df.loc[bad, 'row_id'].iloc[0])}")
    return clean(df)


def test_dead_letter_threshold_notifies_the_webhook(tmp_path, small_input, receiver, prefect_server):
    from dpipeline_prefect.alerts import install, remove
    from dpipeline_prefect.pipeline import Pipeline

    src, _ = small_input
    cfg = _cfg(tmp_path, src, transforms=["tests.test_alerts:poison_some"],
               dead_letter={"path": str(tmp_path / "dlq")},
               monitoring={"dead_letter_alert_rows": 3})
    install(cfg["name"], receiver.url)
    try:
        summary = Pipeline(cfg).run(run_key="dl")
        assert summary["status"] == "completed" and summary["rows_dead_letter"] == 8
        msg = receiver.wait_for(lambda m: "dead-lettered rows" in m.get("subject", ""))
        assert msg is not None, f"no dead-letter notification within {NOTIFY_WITHIN_S:.0f} s; got {receiver.got}"
        assert "(threshold 3) in run key dl" in msg["body"], msg
    finally:
        remove(cfg["name"])


@pytest.mark.slow
def test_killed_run_is_marked_crashed_and_notified(tmp_path, small_input, receiver, prefect_server):
    """SIGKILL of the whole run (no state change is ever sent): crash detection sees its
    heartbeats stop, sets it Crashed, and the run-failed alert reports that."""
    from prefect import get_client

    from dpipeline_prefect.alerts import install, remove

    src, _ = small_input
    # ~4 s of shard work before the kill at finalize: the first heartbeat (sent at flow start
    # through Prefect's background events client) must reach the server before the SIGKILL;
    # on a loaded CI machine a 1 s run was killed before it was flushed
    cfg = _cfg(tmp_path, src, transforms=["tests.slow_transforms:slow_clean"])
    y = write_yaml(tmp_path / "p.yaml", cfg)
    install(cfg["name"], receiver.url, crashed_after="45s")  # heartbeats every 30 s below
    try:
        r = run_cli("run", str(y), "--run-key", "kill", "--summary-json", str(tmp_path / "s.json"),
                    env={"DPIPELINE_CRASHPOINT": "finalize", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                         "DPIPELINE_TEST_PAUSE_S": "1.0"})
        assert r.returncode == -9, (r.returncode, r.stderr)  # killed, so no summary
        msg = receiver.wait_for(lambda m: "Crashed" in m.get("subject", ""), timeout=150)
        assert msg is not None, f"no crash notification within 150 s; got {receiver.got}"
        assert msg["subject"] == f"dpipeline {cfg['name']}: run {cfg['name']}-kill Crashed"
        assert "no heartbeat for 0:00:45" in msg["body"]
        with get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"{cfg['name']}-kill"])))
        assert [fr.state.type.value for fr in runs] == ["CRASHED"]
    finally:
        remove(cfg["name"])


def test_no_completed_run_within_the_interval_notifies(tmp_path, small_input, receiver, prefect_server):
    from dpipeline_prefect.alerts import install, remove

    cfg = _cfg(tmp_path, small_input[0])
    install(cfg["name"], receiver.url, no_data_within="10s")
    try:
        msg = receiver.wait_for(lambda m: "no completed run" in m.get("subject", ""))
        assert msg is not None, f"no proactive notification within {NOTIFY_WITHIN_S:.0f} s"
        assert msg["pipeline"] == cfg["name"]
    finally:
        remove(cfg["name"])
