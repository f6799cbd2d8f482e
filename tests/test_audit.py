"""Audit trail: every destructive action is a Prefect event naming who did what, listed by
``dpipeline audit``.

The end-to-end test runs each destructive action (``run --restart``, ``checkpoints gc``,
``dlq replay``, ``backfill``, ``alerts install``) with the real CLI against the session's real Prefect server and finds
them with ``dpipeline audit``: OS user, host, the Prefect client and server, the flow run,
the run key and what was removed. Prefect delivers events asynchronously, so reads poll.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from pathlib import Path

import pytest

from dpipeline_prefect.audit import audited, parse_since, read_audit, safe_url, scrub

from .pipeline_helpers import flights, load_summary, run_cli, write_parquet_files, write_yaml


def test_scrub_drops_secrets_and_url_credentials():
    got = scrub({
        "run_key": "r1", "keep": 2, "aws_secret_access_key": "SEKRET1", "password": "SEKRET2",
        "key": "SEKRET3", "webhook_url": "https://hooks.example/SEKRET4",
        "sink": "https://user:SEKRET5@host:9000/bucket/x?X-Amz-Signature=SEKRET6",
        "nested": {"token": "SEKRET7", "rows": 3, "paths": ["s3://b/x"]},
    })
    assert "SEKRET" not in json.dumps(got)
    assert got["run_key"] == "r1" and got["keep"] == 2 and got["nested"]["rows"] == 3
    assert got["sink"] == "https://host:9000/bucket/x" and got["nested"]["paths"] == ["s3://b/x"]
    assert safe_url("http://a:b@127.0.0.1:4200/api?x=1") == "http://127.0.0.1:4200/api"


def test_parse_since():
    from dpipeline_prefect.errors import ConfigError

    now = time.time()
    assert abs(parse_since("7d").timestamp() - (now - 7 * 86400)) < 5
    assert abs(parse_since("30m").timestamp() - (now - 1800)) < 5
    assert parse_since("2026-01-02T03:04:05").year == 2026
    with pytest.raises(ConfigError, match="since"):
        parse_since("last tuesday")


def _wait_audit(pipeline: str, want: int, timeout: float = 30.0) -> list[dict]:
    """The pipeline's audit entries once ``want`` of them have their final outcome."""
    deadline = time.time() + timeout
    while True:
        entries = read_audit(pipeline, parse_since("1h"))
        if sum(e["outcome"] in ("ok", "failed") for e in entries) >= want or time.time() > deadline:
            return entries
        time.sleep(0.5)


@pytest.mark.prefect
def test_a_failed_action_is_recorded_as_attempted_then_failed_without_secrets():
    name = "audit-unit-" + uuid.uuid4().hex[:8]
    with pytest.raises(RuntimeError):
        with audited("backfill", name, "k1", {"sink": "s3://u:SEKRET@h/b", "secret_key": "SEKRET"}) as a:
            a.details["partitions"] = 3
            raise RuntimeError("storage exploded")
    with audited("checkpoints-gc", name, None, {"keep": 1}):
        pass
    entries = _wait_audit(name, 2)
    assert [(e["action"], e["outcome"]) for e in entries] == [("backfill", "failed"), ("checkpoints-gc", "ok")]
    failed = entries[0]
    assert failed["details"]["error"] == "RuntimeError" and failed["details"]["message"] == "storage exploded"
    assert failed["details"]["partitions"] == 3 and failed["run_key"] == "k1"
    assert len(failed["event_ids"]) == 2  # attempted + failed, merged by audit_id
    assert failed["who"]["user"] == getpass.getuser()
    assert "SEKRET" not in json.dumps(entries)


@pytest.fixture
def pipeline_file(tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "in"
    write_parquet_files(flights(6000), src, files=2, row_group_size=2000)
    cfg = {
        "name": "audit-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": 2000},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"format": "parquet", "path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "dead_letter": {},
        "runner": {"kind": "threads", "workers": 2},
    }
    return write_yaml(tmp_path / "p.yaml", cfg), cfg


@pytest.mark.prefect
@pytest.mark.slow
def test_destructive_cli_actions_are_listed_with_who_and_what(tmp_path, pipeline_file, prefect_server):
    p, cfg = pipeline_file
    r = run_cli("run", str(p), "--run-key", "a")
    assert r.returncode == 0, r.stderr
    written = len(list((tmp_path / "out" / "a").rglob("*.parquet")))
    assert written >= 2
    r = run_cli("run", str(p), "--run-key", "a", "--restart", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    flow_run_id = load_summary(tmp_path / "s.json")["flow_run_id"]
    r = run_cli("dlq", "replay", str(p), "--run-key", "a")
    assert r.returncode == 0, r.stderr
    r = run_cli("checkpoints", "gc", str(p), "--keep", "0")
    assert r.returncode == 0, r.stderr
    r = run_cli("dlq", "replay", str(p), "--run-key", "a")  # its checkpoints are gone now
    assert r.returncode == 1 and "no checkpoints" in r.stderr, r.stderr
    r = run_cli("backfill", str(p), "--from", "2026-01-01", "--to", "2026-01-01")
    assert r.returncode == 0, r.stderr
    r = run_cli("alerts", "install", str(p), "--webhook", "http://127.0.0.1:9/hook/SEKRETHOOK")
    assert r.returncode == 0, r.stderr

    entries = _wait_audit(cfg["name"], 6)
    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("restart", "ok"), ("dlq-replay", "ok"), ("checkpoints-gc", "ok"), ("dlq-replay", "failed"),
        ("backfill", "ok"), ("alerts-install", "ok")], entries
    assert "no checkpoints" in entries[3]["details"]["message"]
    assert entries[4]["details"]["ran"] == 1 and entries[4]["details"]["failed"] == []
    assert entries[5]["details"]["automations"] and "SEKRETHOOK" not in json.dumps(entries)
    r = run_cli("alerts", "remove", str(p))
    assert r.returncode == 0, r.stderr
    by_action = {e["action"]: e for e in entries[:3]}
    for e in entries:
        w = e["who"]  # the CLI's OS user and the Prefect client it used
        assert w["user"] == getpass.getuser() and w["host"] == socket.gethostname(), w
        assert w["prefect_api"] == prefect_server.api_url and w["prefect_client_version"], w
        assert w["prefect_server_version"] not in ("", "unknown"), w
        assert len(e["event_ids"]) == 2  # attempted, then the outcome
    restart = by_action["restart"]
    assert restart["run_key"] == "a" and restart["who"]["flow_run_id"] == flow_run_id
    assert restart["details"]["output_files_removed"] == written  # the first run's output
    gc = by_action["checkpoints-gc"]
    assert gc["details"]["keep"] == 0 and gc["details"]["runs_deleted"] == ["a"]
    assert by_action["dlq-replay"]["run_key"] == "a" and by_action["dlq-replay"]["details"]["files"] == 0

    # the CLI lists them, as JSON and as a table
    r = run_cli("audit", str(p), "--since", "1h", "--json")
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [e["action"] for e in listed][:6] == ["restart", "dlq-replay", "checkpoints-gc", "dlq-replay",
                                                 "backfill", "alerts-install"]
    r = run_cli("audit", str(p))
    assert r.returncode == 0, r.stderr
    for word in ("restart", "checkpoints-gc", "dlq-replay", "failed", getpass.getuser(), flow_run_id):
        assert word in r.stdout, (word, r.stdout)
    r = run_cli("audit", str(p), "--since", "yesterday-ish")
    assert r.returncode == 1 and "--since" in r.stderr
