"""``dpipeline health``: against the real SeaweedFS S3, the real Prefect server and a real Dask
scheduler. Healthy: every item ok, exit 0, the probe objects are gone. Unhealthy: a wrong S3
secret, a missing limit, a dead Dask scheduler, a Prefect URL to a dead port: exit 1, each
failing item named, the others still checked, no secret in the output.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dpipeline_prefect.devservices import free_port

from .pipeline_helpers import flights, run_cli, write_yaml

pytestmark = [pytest.mark.s3, pytest.mark.prefect]


def _cfg(s3, prefix: str, **over) -> dict:
    opts = s3.storage_options()
    cfg = {
        "name": "hl-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": f"s3://raw/{prefix}/in/", "storage_options": opts},
        "sink": {"format": "parquet", "path": f"s3://out/{prefix}/{{run_key}}/", "storage_options": opts},
        "checkpoint": {"path": f"s3://ckpt/{prefix}/", "storage_options": opts},
        "dead_letter": {"path": f"s3://ckpt/{prefix}/dlq/", "storage_options": opts},
        "limits": {"sink": {"concurrency": 2, "rate_per_s": 5}},
        "runner": {"kind": "threads"},
    }
    cfg.update(over)
    return cfg


@pytest.fixture
def s3_input(s3):
    import s3fs

    prefix = uuid.uuid4().hex[:10]
    fs = s3fs.S3FileSystem(**s3.storage_options())
    with fs.open(f"raw/{prefix}/in/part-0.parquet", "wb") as f:
        flights(500).to_parquet(f)
    return prefix, fs


def _health(cfg: dict, tmp_path: Path, env: dict | None = None, table: bool = False):
    """``health --json`` (and, with ``table``, the table form too): result, table result, checks."""
    y = write_yaml(tmp_path / f"{cfg['name']}.yaml", cfg)
    r = run_cli("health", str(y), "--json", env=env, timeout=180)
    table = run_cli("health", str(y), env=env, timeout=180) if table else r
    checks = {c["item"].split(" ")[0] + (" " + c["item"].split(" ")[1] if c["item"].startswith("limit ") else ""): c
              for c in json.loads(r.stdout or "[]")}
    return r, table, checks


def test_healthy_pipeline_every_item_ok_and_probes_removed(tmp_path, s3, s3_input, prefect_server):
    distributed = pytest.importorskip("distributed")
    from dpipeline_prefect.config import parse_config
    from dpipeline_prefect.limits import ensure_limits

    prefix, fs = s3_input
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp", host="127.0.0.1", dashboard_address=None) as cluster:
        cfg = _cfg(s3, prefix, runner={"kind": "dask", "address": cluster.scheduler_address})
        ensure_limits(parse_config(cfg))  # what a run's start does
        r, table, checks = _health(cfg, tmp_path, table=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert table.returncode == 0 and "healthy" in table.stdout, table.stdout + table.stderr
    assert all(c["ok"] for c in checks.values()), checks
    assert "server version 3.9" in checks["prefect"]["detail"]
    assert "1 worker(s)" in checks["dask"]["detail"] and "MiB used of" in checks["dask"]["detail"]
    assert "first bytes of" in checks["source"]["detail"]
    for item in ("sink", "checkpoint", "dead"):
        assert checks[item]["detail"] == "writable, readable, deletable (probe object removed)"
    limits = {k: c for k, c in checks.items() if k.startswith("limit")}
    assert len(limits) == 2 and all("present" in c["detail"] for c in limits.values()), limits
    # the probes are gone (SeaweedFS may keep the emptied folder itself: that is not a probe)
    fs.invalidate_cache()
    left = [p for b in ("raw", "out", "ckpt") for p in fs.find(f"{b}/{prefix}")]
    assert f"raw/{prefix}/in/part-0.parquet" in left
    assert not [p for p in left if "_dpipeline_health_" in p], left
    opts = s3.storage_options()
    for out in (r.stdout + r.stderr, table.stdout + table.stderr):
        assert opts["secret"] not in out and opts["key"] not in out


def test_unhealthy_items_are_named_and_secrets_stay_out(tmp_path, s3, s3_input, prefect_server):
    prefix, _ = s3_input
    good = s3.storage_options()
    wrong = {**good, "secret": "not-the-secret-" + uuid.uuid4().hex}
    dead_dask = f"tcp://127.0.0.1:{free_port()}"
    cfg = _cfg(s3, prefix, runner={"kind": "dask", "address": dead_dask})
    cfg["checkpoint"]["storage_options"] = wrong
    r, table, checks = _health(cfg, tmp_path)  # the limits were never created
    assert r.returncode == 1
    failed = {k for k, c in checks.items() if not c["ok"]}
    assert failed == {"checkpoint", "dask", f"limit dpipeline-limit:{cfg['name']}:sink",
                      f"limit dpipeline-rate:{cfg['name']}:sink"}, checks
    assert "missing on the server" in checks[f"limit dpipeline-limit:{cfg['name']}:sink"]["detail"]
    unhealthy = table.stderr.split("unhealthy:", 1)[1]
    for item in (f"checkpoint s3://ckpt/{prefix}/", f"dask scheduler {dead_dask}",
                 f"limit dpipeline-limit:{cfg['name']}:sink"):
        assert item in unhealthy, table.stderr
    assert checks["source"]["ok"] and checks["sink"]["ok"] and checks["dead"]["ok"]
    for out in (r.stdout + r.stderr, table.stdout + table.stderr):
        assert wrong["secret"] not in out and good["secret"] not in out

    # a Prefect API on a dead port: named, and the limits cannot be checked without it
    dead = f"http://127.0.0.1:{free_port()}/api"
    r2, table2, checks2 = _health(_cfg(s3, prefix, runner={"kind": "dask", "workers": 2}), tmp_path,
                                  env={"PREFECT_API_URL": dead})
    assert r2.returncode == 1
    assert not checks2["prefect"]["ok"] and checks2["prefect"]["item"] == f"prefect api {dead}"
    assert not checks2["limits"]["ok"] and "no reachable Prefect server" in checks2["limits"]["detail"]
    assert {k for k, c in checks2.items() if not c["ok"]} == {"prefect", "limits"}
    # no runner.address: each run starts its own cluster, so there is nothing to reach yet
    assert checks2["dask"]["detail"].startswith("local cluster: started on demand by each run (2 worker")
    assert f"prefect api {dead}" in table2.stderr
    assert good["secret"] not in r2.stdout + r2.stderr + table2.stdout + table2.stderr
