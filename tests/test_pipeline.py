"""End-to-end runs of the sharded-pipeline flow on a real Prefect server.

Each test compares the output, row for row, with a pandas computation of the same job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpipeline_prefect import DPipelineError
from dpipeline_prefect.checkpoint import CheckpointStore
from dpipeline_prefect.errors import (
    ConfigError,
    PipelineChangedError,
    SchemaMismatchError,
    ShardingError,
    SourceError,
    StoragePermissionError,
    StorageUnavailableError,
    TransformError,
)
from dpipeline_prefect.pipeline import Pipeline
from dpipeline_prefect.storage import Storage

from .pipeline_helpers import assert_exactly_once, flights, reference, run_cli, write_parquet_files, write_yaml

pytestmark = pytest.mark.prefect

CLEAN = "dpipeline_prefect.examples.flights:clean"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40k real flights rows in 4 Parquet files with small row groups."""
    df = flights(40_000)
    folder = tmp_path_factory.mktemp("small") / "in"
    write_parquet_files(df, folder, files=4, row_group_size=3000)
    return folder, df


def _cfg(tmp_path: Path, src: Path, **over) -> dict:
    cfg = {
        "name": "t-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": 4000},
        "transforms": [CLEAN],
        "sink": {"format": "parquet", "path": str(tmp_path / "out")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 2},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


STRATEGIES = {
    "files": {"strategy": "files"},
    "hash": {"strategy": "hash", "key": "carrier", "shards": 5},
    "range": {"strategy": "range", "key": "distance", "boundaries": [500, 1000, 2000]},
    "time": {"strategy": "time", "key": "time_hour", "every": "6h"},
    "custom": {"strategy": "custom", "function": "tests.shard_functions:by_origin"},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_gives_exactly_the_reference(tmp_path, small, strategy):
    src, df = small
    cfg = _cfg(tmp_path, src, sharding=STRATEGIES[strategy])
    summary = Pipeline(cfg).run(run_key="r1")
    assert summary["status"] == "completed"
    want = reference(df)
    got = assert_exactly_once(str(tmp_path / "out"), want)
    assert summary["rows_in"] == len(df) and summary["rows_out"] == len(got)
    assert summary["flow_run_id"]
    # every shard holds exactly the rows its strategy sends to it
    if strategy == "hash":
        assert summary["shards_total"] == 5
    if strategy == "range":
        assert summary["shards_total"] == 4
    if strategy == "time":
        n_buckets = df["time_hour"].dt.floor("6h").nunique()
        assert summary["shards_total"] == n_buckets
    if strategy == "custom":
        assert summary["shards_total"] == df["origin"].nunique()
    # keyed strategies read the input once plus the staged data once, not once per shard
    input_bytes = sum(p.stat().st_size for p in src.glob("*.parquet"))
    assert summary["bytes_read_source"] == input_bytes
    assert summary["bytes_read"] == input_bytes + summary["bytes_read_staged"]
    assert (summary["bytes_read_staged"] > 0) == (strategy != "files")


def test_hash_rows_land_in_their_shard_and_null_keys_in_one(tmp_path, small):
    src, df = small
    assert df["tailnum"].isna().sum() > 0  # the real data has null tail numbers
    cfg = _cfg(tmp_path, src, sharding={"strategy": "hash", "key": "tailnum", "shards": 4},
               transforms=[], sink={"partition_by": []})
    Pipeline(cfg).run(run_key="k")
    out = tmp_path / "out"
    shard_of = {}
    for f in out.glob("part-*.parquet"):
        ids = pd.read_parquet(f, columns=["row_id"])["row_id"]
        sid = f.name.split("-")[1]
        for r in ids:
            shard_of[r] = sid
    assert len(shard_of) == len(df)
    null_rows = df.loc[df["tailnum"].isna(), "row_id"]
    assert {shard_of[r] for r in null_rows} == {"h000000"}
    expected = pd.util.hash_pandas_object(df["tailnum"], index=False).to_numpy() % np.uint64(4)
    expected[df["tailnum"].isna().to_numpy()] = 0
    got = np.array([int(shard_of[r][1:]) for r in df["row_id"]])
    assert (got == expected.astype(int)).all()


def test_partitioned_output_and_dask_processes(tmp_path, small):
    """The default runner: a LocalCluster of worker processes; hive-partitioned output."""
    src, df = small
    cfg = _cfg(tmp_path, src, sharding={"strategy": "hash", "key": "carrier", "shards": 3},
               sink={"partition_by": ["origin"]}, runner={"kind": "dask", "workers": 2})
    from dpipeline_prefect import progress

    events: list[tuple[str, dict]] = []
    progress.hooks.append(lambda e, p: events.append((e, p)))
    try:
        summary = Pipeline(cfg).run(run_key="d")
    finally:
        progress.hooks.clear()
    assert summary["status"] == "completed"
    # live progress: every committed batch reported from the worker processes, rows add up
    batch_rows = [p["rows"] for e, p in events if e == "batch"]
    assert len(batch_rows) >= summary["shards_total"] and sum(batch_rows) == len(df)
    assert sum(1 for e, _ in events if e == "shard_done") == summary["shards_total"]
    assert sorted(p.name for p in (tmp_path / "out").glob("origin=*")) == sorted(
        f"origin={o}" for o in df["origin"].unique())
    assert_exactly_once(str(tmp_path / "out"), reference(df))


def test_rerun_is_a_noop_and_changed_pipeline_is_refused(tmp_path, small):
    src, df = small
    cfg = _cfg(tmp_path, src)
    first = Pipeline(cfg).run(run_key="same")
    again = Pipeline(cfg).run(run_key="same")
    assert again["status"] == "already_complete"
    assert again["shards_skipped"] == first["shards_total"]
    assert_exactly_once(str(tmp_path / "out"), reference(df))

    changed = dict(cfg, transforms=[])
    with pytest.raises(PipelineChangedError) as e:
        Pipeline(changed).run(run_key="same")
    assert "transforms" in str(e.value) and "--restart" in str(e.value)
    # --restart discards the old output and starts over with the new definition
    summary = Pipeline(changed).run(run_key="same", restart=True)
    assert summary["status"] == "completed"
    got = pd.read_parquet(tmp_path / "out")
    assert len(got) == len(df) and got["row_id"].is_unique


def test_empty_source_completes_with_no_rows(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = _cfg(tmp_path, tmp_path / "empty", sharding={"strategy": "hash", "key": "carrier"})
    summary = Pipeline(cfg).run(run_key="e")
    assert summary["status"] == "completed"
    assert summary["rows_in"] == 0 and summary["rows_out"] == 0 and summary["shards_total"] == 0
    assert not list((tmp_path / "out").glob("**/*.parquet"))


def test_range_null_key_is_an_error_naming_the_key_unless_catch_all(tmp_path, small):
    src, df = small
    cfg = _cfg(tmp_path, src, sharding={"strategy": "range", "key": "dep_time", "boundaries": [1200]})
    with pytest.raises(ShardingError) as e:
        Pipeline(cfg).run(run_key="n")
    assert "'dep_time'" in str(e.value) and "null" in str(e.value) and "catch_all" in str(e.value)
    assert not list((tmp_path / "out").glob("**/*.parquet"))

    cfg2 = _cfg(tmp_path, src, name="t-catch",
                sharding={"strategy": "range", "key": "dep_time", "boundaries": [1200], "catch_all": True},
                sink={"path": str(tmp_path / "out2")}, transforms=[])
    summary = Pipeline(cfg2).run(run_key="n")
    assert summary["shards_total"] == 3
    got = pd.read_parquet(tmp_path / "out2")
    assert len(got) == len(df) and got["row_id"].is_unique
    catch = pd.concat(pd.read_parquet(p) for p in (tmp_path / "out2").glob("part-catchall-*.parquet"))
    assert set(catch["row_id"]) == set(df.loc[df["dep_time"].isna(), "row_id"])


def test_time_outside_range_names_the_value(tmp_path, small):
    src, df = small
    cfg = _cfg(tmp_path, src, sharding={"strategy": "time", "key": "time_hour", "every": "1D",
                                        "start": "2013-01-01", "end": "2013-01-10"})
    with pytest.raises(ShardingError) as e:
        Pipeline(cfg).run(run_key="t")
    assert "'time_hour'" in str(e.value) and "2013-01-1" in str(e.value)


def test_memory_storage_with_thread_runner(tmp_path, small):
    src, df = small
    root = f"memory://{uuid.uuid4().hex}"
    cfg = _cfg(tmp_path, src, sink={"path": f"{root}/out"}, checkpoint={"path": f"{root}/ckpt"})
    summary = Pipeline(cfg).run(run_key="m")
    assert summary["status"] == "completed"
    assert_exactly_once(f"{root}/out", reference(df))


@pytest.mark.s3
def test_everything_on_s3_with_credentials_from_the_environment(tmp_path, small, s3, monkeypatch):
    """Source, sink and checkpoints on SeaweedFS; keys come from ${VAR}s, read in the workers."""
    src, df = small
    prefix = uuid.uuid4().hex
    fs = Storage("s3://raw", s3.storage_options()).fs
    for p in sorted(src.glob("*.parquet")):
        fs.put_file(str(p), f"raw/{prefix}/{p.name}")
    monkeypatch.setenv("TEST_S3_KEY", s3.key)
    monkeypatch.setenv("TEST_S3_SECRET", s3.secret)
    opts = {"key": "${TEST_S3_KEY}", "secret": "${TEST_S3_SECRET}",
            "client_kwargs": {"endpoint_url": s3.endpoint_url}}
    cfg = _cfg(tmp_path, src,
               source={"path": f"s3://raw/{prefix}/", "storage_options": opts},
               sharding={"strategy": "hash", "key": "origin", "shards": 3},
               sink={"path": f"s3://out/{prefix}/", "storage_options": opts, "partition_by": ["carrier"]},
               checkpoint={"path": f"s3://ckpt/{prefix}/", "storage_options": opts},
               runner={"kind": "dask", "workers": 2})
    summary = Pipeline(cfg).run(run_key="s3")
    assert summary["status"] == "completed"
    assert_exactly_once(f"s3://out/{prefix}/", reference(df), s3.storage_options())
    # the run's temporary shuffle data is gone; the checkpoints remain and say completed
    ckpt = Storage(f"s3://ckpt/{prefix}/", s3.storage_options())
    assert not [p for p in ckpt.find(ckpt.root) if "/work/" in p]
    assert CheckpointStore(ckpt, cfg["name"], "s3").load_manifest()["status"] == "completed"
    # the secret never appears in the summary
    assert s3.secret not in str(summary)


# -- bad input: one clear error, nothing written ---------------------------------------------

def _nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and p.name != "_dpipeline.json"]


def test_missing_source_path(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "nope")
    with pytest.raises(SourceError) as e:
        Pipeline(cfg).run(run_key="x")
    assert "nope" in str(e.value) and "does not exist" in str(e.value)
    _nothing_written(tmp_path)


def test_transform_that_cannot_be_imported(tmp_path, small):
    src, _ = small
    cfg = _cfg(tmp_path, src, transforms=["no_such_module_xyz:clean"])
    with pytest.raises(TransformError) as e:
        Pipeline(cfg).run(run_key="x")
    assert "no_such_module_xyz:clean" in str(e.value)
    _nothing_written(tmp_path)


def test_schema_mismatch_names_both_files_and_the_column(tmp_path, small):
    _, df = small
    folder = tmp_path / "mixed"
    write_parquet_files(df.iloc[:1000], folder, files=1)
    bad = df.iloc[1000:2000].copy()
    bad["distance"] = bad["distance"].astype(str)
    bad.to_parquet(folder / "part-zzz.parquet", index=False)
    cfg = _cfg(tmp_path, folder)
    with pytest.raises(SchemaMismatchError) as e:
        Pipeline(cfg).run(run_key="x")
    msg = str(e.value)
    assert "'distance'" in msg and "part-000.parquet" in msg and "part-zzz.parquet" in msg
    _nothing_written(tmp_path)


@pytest.mark.s3
def test_wrong_s3_credentials(tmp_path, small, s3):
    src, _ = small
    opts = {"key": s3.key, "secret": "wrong-secret-value", "client_kwargs": {"endpoint_url": s3.endpoint_url}}
    cfg = _cfg(tmp_path, src, source={"path": "s3://raw/whatever/", "storage_options": opts})
    with pytest.raises(StoragePermissionError) as e:
        Pipeline(cfg).run(run_key="x")
    assert "access denied" in str(e.value) and "wrong-secret-value" not in str(e.value)
    _nothing_written(tmp_path)


def test_unreachable_endpoint(tmp_path, small):
    from dpipeline_prefect.devservices import free_port

    src, _ = small
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    cfg = _cfg(tmp_path, src, checkpoint={"path": "s3://ckpt/x/", "storage_options": opts})
    with pytest.raises(StorageUnavailableError) as e:
        Pipeline(cfg).run(run_key="x")
    assert "unreachable" in str(e.value)
    _nothing_written(tmp_path)


def test_cli_bad_config_is_one_line_naming_the_field(tmp_path, small):
    src, _ = small
    cfg = _cfg(tmp_path, src)
    cfg["sink"]["colour"] = "blue"
    cfg["batching"]["rows"] = "many"
    p = write_yaml(tmp_path / "p.yaml", cfg)
    r = run_cli("run", str(p), timeout=120)
    assert r.returncode == 1
    assert "sink.colour" in r.stderr and "allowed here: format, path, partition_by, storage_options" in r.stderr
    assert "batching.rows" in r.stderr
    assert "Traceback" not in r.stderr
    _nothing_written(tmp_path)


def test_cli_run_summary_json_and_checkpoint_commands(tmp_path, small):
    src, df = small
    cfg = _cfg(tmp_path, src, sharding={"strategy": "hash", "key": "carrier", "shards": 2})
    p = write_yaml(tmp_path / "p.yaml", cfg)
    r = run_cli("run", str(p), "--run-key", "key-c1", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    import json

    s = json.loads((tmp_path / "s.json").read_text())
    for k in ("pipeline", "run_key", "status", "rows_in", "rows_out", "shards_total", "shards_skipped",
              "batches_reprocessed", "bytes_read", "duration_s", "rows_per_s", "flow_run_id"):
        assert k in s
    assert s["rows_in"] == len(df) and s["status"] == "completed"
    r = run_cli("run", str(p), "--run-key", "key-c1")
    assert r.returncode == 0 and "already complete" in r.stdout
    r = run_cli("checkpoints", "ls", str(p))
    assert r.returncode == 0 and "key-c1" in r.stdout and "completed" in r.stdout
    r = run_cli("checkpoints", "gc", str(p), "--keep", "0")
    assert r.returncode == 0, r.stderr
    r = run_cli("checkpoints", "ls", str(p))
    assert "key-c1" not in r.stdout
    r = run_cli("validate", str(p))
    assert r.returncode == 0, r.stdout + r.stderr


def test_pipelines_compose_as_subflows_of_a_user_flow(tmp_path, small):
    """run_pipeline inside a user's @flow: two pipelines, the second reading the first's output."""
    import sys

    from prefect.client.orchestration import get_client

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.compose_two_pipelines import two_pipelines

    src, df = small
    first = _cfg(tmp_path, src, sink={"path": str(tmp_path / "stage1")})
    second = _cfg(tmp_path, tmp_path / "stage1", name="t-second", transforms=[],
                  sharding={"strategy": "hash", "key": "dest", "shards": 2},
                  sink={"path": str(tmp_path / "stage2")})
    p1, p2 = write_yaml(tmp_path / "a.yaml", first), write_yaml(tmp_path / "b.yaml", second)
    state = two_pipelines(str(p1), str(p2), run_key="c", return_state=True)
    a, b = state.result()
    assert a["status"] == b["status"] == "completed"
    assert_exactly_once(str(tmp_path / "stage2"), reference(df))
    with get_client(sync_client=True) as client:
        for summary in (a, b):
            run = client.read_flow_run(summary["flow_run_id"])
            assert run.parent_task_run_id is not None  # a subflow, not a separate flow run
            parent = client.read_task_run(run.parent_task_run_id)
            assert parent.flow_run_id == state.state_details.flow_run_id


def test_memory_storage_is_refused_with_dask_processes(tmp_path, small):
    src, _ = small
    cfg = _cfg(tmp_path, src, sink={"path": "memory://x/out"}, runner={"kind": "dask"})
    with pytest.raises(ConfigError) as e:
        Pipeline(cfg).run(run_key="m")
    assert "sink.path" in str(e.value) and "threads" in str(e.value)


def test_cli_validate_reports_each_problem(tmp_path, small):
    src, _ = small
    cfg = _cfg(tmp_path, src, transforms=[CLEAN, "no_such_module_xyz:fn"],
               checkpoint={"path": "s3://ckpt/x/", "storage_options": {
                   "key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}})
    p = write_yaml(tmp_path / "p.yaml", cfg)
    r = run_cli("validate", str(p), timeout=120)
    assert r.returncode == 1
    assert "no_such_module_xyz:fn" in r.stderr and "checkpoint" in r.stderr
    assert f"transform {CLEAN}" in r.stdout and "ok" in r.stdout  # the good one passes
    assert "source" in r.stdout and "4 file(s)" in r.stdout


def test_cli_runs_on_the_embedded_server_without_prefect_api_url(tmp_path, small):
    """`make demo`'s situation: no PREFECT_API_URL, a local Dask cluster of processes."""
    import os

    src, df = small
    cfg = _cfg(tmp_path, src, sharding={"strategy": "hash", "key": "carrier", "shards": 2},
               runner={"kind": "dask", "workers": 2})
    p = write_yaml(tmp_path / "p.yaml", cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    r = subprocess.run([sys.executable, "-m", "dpipeline_prefect.cli", "run", str(p), "--run-key", "emb",
                        "--summary-json", str(tmp_path / "s.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["status"] == "completed" and s["flow_run_id"]
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    # the flow and its shard task runs were recorded by that embedded server's database
    assert (tmp_path / "prefect-home" / "prefect.db").exists()
