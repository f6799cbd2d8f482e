"""Prefect Blocks: the two block types, ``block: NAME`` in a pipeline, the create script, and
secrets that never reach flow-run parameters, logs, events or artifacts.

The end-to-end test runs a pipeline whose source, sink and checkpoints are on SeaweedFS (S3)
and whose credentials exist only in a storage block on the real Prefect server; the shards run
in a Dask worker process, which loads the block itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from dpipeline_prefect.blocks import PipelineBlock, StorageBlock, resolve_storage
from dpipeline_prefect.config import PipelineConfig, parse_config
from dpipeline_prefect.errors import ConfigError

from .pipeline_helpers import assert_exactly_once, flights, reference, write_parquet_files, write_yaml

ROOT = Path(__file__).resolve().parents[1]
CREATE = ROOT / "blocks" / "create_blocks.py"


# --- Prefect's own checks of a block type --------------------------------------------------
class TestStorageBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return StorageBlock

    def test_has_a_valid_image(self, block):  # downloads the logo: needs the internet
        pytest.skip("logo download needs the internet")


class TestPipelineBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return PipelineBlock

    def test_has_a_valid_image(self, block):
        pytest.skip("logo download needs the internet")


def test_block_types_are_a_prefect_collection():
    """Prefect finds the types through the ``prefect.collections`` entry point (pyproject)."""
    from prefect.blocks.core import Block
    from prefect.plugins import load_prefect_collections

    assert "dpipeline_prefect" in load_prefect_collections()
    assert Block.get_block_class_from_key("dpipeline-storage") is StorageBlock
    assert Block.get_block_class_from_key("dpipeline-pipeline") is PipelineBlock


# --- the configuration side: only the name travels ------------------------------------------
def _cfg(**over) -> dict:
    cfg = {"name": "blk", "source": {"path": "in/", "block": "my-s3"},
           "sink": {"path": "out/{run_key}/", "block": "my-s3"}}
    cfg.update(over)
    return cfg


def test_block_name_is_recorded_in_storage_options_and_survives_a_round_trip():
    cfg = parse_config(_cfg(checkpoint={"path": "s3://ckpt/x/", "block": "other-s3"},
                            dead_letter={"block": "dlq"}))
    assert cfg.source.block == "my-s3" and cfg.source.storage_options == {"block": "my-s3"}
    assert cfg.checkpoint.storage_options == {"block": "other-s3"}
    assert cfg.dead_letter.storage_options == {"block": "dlq"}
    # the flow-run parameter is the JSON dump of the model: it re-validates to the same model
    again = PipelineConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg
    # changing which block holds the credentials does not invalidate checkpoints
    moved = parse_config(_cfg(source={"path": "in/", "block": "rotated"}))
    assert moved.fingerprints() == parse_config(_cfg()).fingerprints()


def test_bad_block_references_are_refused_naming_the_field():
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(sink={"path": "o/", "block": "My_S3"}))
    assert "sink.block" in str(e.value) and "'My_S3'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(source={"path": "i/", "block": "a", "storage_options": {"block": "b"}}))
    assert "source.block" in str(e.value) and "differ" in str(e.value)


def test_storage_block_options_and_paths():
    b = StorageBlock(base_url="s3://raw/base/", endpoint_url="http://h:1", key="AK", secret="SK",
                     region="eu", options={"use_ssl": False, "client_kwargs": {"verify": False}})
    assert b.storage_options() == {
        "key": "AK", "secret": "SK", "use_ssl": False,
        "client_kwargs": {"endpoint_url": "http://h:1", "region_name": "eu", "verify": False}}
    assert b.url_for("x/{run_key}/") == "s3://raw/base/x/{run_key}/"
    assert b.url_for("./x") == "s3://raw/base/x"
    assert b.url_for("s3://elsewhere/y") == "s3://elsewhere/y"
    assert b.url_for("/abs/local") == "/abs/local"
    assert "SK" not in repr(b) and "AK" not in str(b)
    assert resolve_storage("s3://a/b", {"anon": True}) == ("s3://a/b", {"anon": True})


def test_pipeline_block_validates_and_keeps_references(tmp_path, monkeypatch):
    monkeypatch.setenv("BLK_T_BUCKET", "bucket-from-env")
    p = write_yaml(tmp_path / "p.yaml", {"name": "pb", "source": {"path": "s3://${BLK_T_BUCKET}/in/"},
                                         "sink": {"path": "out/", "block": "my-s3"}})
    blk = PipelineBlock.from_yaml(p)
    assert blk.definition["source"]["path"] == "s3://${BLK_T_BUCKET}/in/"  # not expanded when stored
    assert blk.config().source.path == "s3://bucket-from-env/in/"  # expanded where it runs
    with pytest.raises(ConfigError) as e:
        PipelineBlock(definition={"name": "pb", "source": {"path": "x"}, "sink": {"pth": "o"}})
    assert "sink.pth" in str(e.value) and "unknown field" in str(e.value)
    # a credential written out would be readable in the UI: refused, naming where it is
    with pytest.raises(ConfigError) as e:
        PipelineBlock(definition={"name": "pb", "source": {"path": "s3://b/in/", "storage_options": {
            "key": "${K}", "secret": "wJalrXUtnFEMI", "client_kwargs": {"endpoint_url": "http://h"}}},
            "sink": {"path": "out/"}})
    assert "source.storage_options.secret" in str(e.value) and "wJalrXUtnFEMI" not in str(e.value)
    ok = PipelineBlock(definition={"name": "pb", "sharding": {"strategy": "hash", "key": "carrier"},
                                   "source": {"path": "x", "storage_options": {"secret": "${S}"}},
                                   "sink": {"path": "o"}})
    assert ok.definition["sharding"]["key"] == "carrier"  # a column called key is no credential
    with pytest.raises(ConfigError) as e:
        PipelineBlock.from_yaml(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(e.value)


def test_the_deployable_flow_needs_exactly_one_pipeline_source(tmp_path):
    sys.path.insert(0, str(ROOT))
    from flows.pipeline_flow import load_pipeline

    for args in ({}, {"pipeline_path": "p.yaml", "pipeline_block": "b"}):
        with pytest.raises(ConfigError) as e:
            load_pipeline(**args)
        assert "exactly one of pipeline_path" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_pipeline(pipeline_block="Not A Name")
    assert "pipeline_block" in str(e.value) and "'Not A Name'" in str(e.value)


# --- on the real Prefect server and S3 -------------------------------------------------------
def _create(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CREATE), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, cwd=ROOT)


def _server_records(flow_run_ids: list[str], expect_event: str, timeout: float = 30.0) -> str:
    """Everything the server holds about these flow runs, as one text: the runs (with their
    parameters), their task runs, logs, artifacts and events (waiting for ``expect_event``,
    since Prefect delivers events asynchronously)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId, LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.events.filters import EventAnyResourceFilter, EventFilter

    resources = [f"prefect.flow-run.{i}" for i in flow_run_ids]
    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                filter=EventFilter(any_resource=EventAnyResourceFilter(id=resources)), limit=50)
            events = list(page.events)
            while page.next_page:
                page = client.read_events_page(page.next_page)
                events += page.events
            if any(e.event == expect_event for e in events) or time.time() > deadline:
                break
            time.sleep(0.5)
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
    assert any(e.event == expect_event for e in events), [e.event for e in events]
    assert len(runs) == len(flow_run_ids) and logs
    parts = [r.model_dump_json() for r in runs] + [t.model_dump_json() for t in tasks]
    parts += [lg.model_dump_json() for lg in logs] + [a.model_dump_json() for a in artifacts]
    parts += [e.model_dump_json() for e in events]
    return "\n".join(parts)


@pytest.mark.s3
@pytest.mark.prefect
def test_pipeline_on_s3_with_credentials_only_in_storage_blocks(tmp_path, s3, prefect_server):
    """Blocks created by the script; a pipeline block run by the deployable flow; shards in a
    Dask worker load the storage block themselves; secrets appear nowhere on the server."""
    from prefect import get_client

    sys.path.insert(0, str(ROOT))
    from flows.pipeline_flow import run_pipeline_flow

    tag = uuid.uuid4().hex[:8]
    df = flights(3000)
    src = tmp_path / "src"
    write_parquet_files(df, src, files=3, row_group_size=500)
    raw = StorageBlock(endpoint_url=s3.endpoint_url, key=s3.key, secret=s3.secret)
    fs = raw.storage_options()
    from dpipeline_prefect.storage import Storage

    st = Storage(f"s3://raw/{tag}", fs)
    for p in sorted(src.glob("*.parquet")):
        st.fs.put_file(str(p), f"raw/{tag}/{p.name}")

    r = _create("register")
    assert r.returncode == 0 and "registered block type dpipeline-storage" in r.stdout, r.stderr
    with get_client(sync_client=True) as client:
        for slug in ("dpipeline-storage", "dpipeline-pipeline"):
            assert client.read_block_type_by_slug(slug).documentation_url
    creds = {"DPIPELINE_S3_KEY": s3.key, "DPIPELINE_S3_SECRET": s3.secret}
    r = _create("storage", f"raw-{tag}", "--endpoint", s3.endpoint_url, "--base-url", "s3://raw/",
                env=creds)
    assert r.returncode == 0, r.stderr
    r2 = _create("storage", f"out-{tag}", "--endpoint", s3.endpoint_url, "--base-url", "s3://out/",
                 "--option", "use_ssl=false", env=creds)
    assert r2.returncode == 0, r2.stderr
    for out in (r, r2):
        assert "with credentials" in out.stdout
        assert s3.secret not in out.stdout + out.stderr and s3.key not in out.stdout + out.stderr
    # a name already taken is refused without --overwrite, with one line
    r3 = _create("storage", f"out-{tag}", env=creds)
    assert r3.returncode == 1 and r3.stderr.startswith("error:") and s3.secret not in r3.stderr

    pipe = write_yaml(tmp_path / "p.yaml", {
        "name": f"blk-{tag}",
        "source": {"path": f"{tag}/", "block": f"raw-{tag}"},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sharding": {"strategy": "hash", "key": "origin", "shards": 2},
        "batching": {"rows": 700},
        "sink": {"path": f"{tag}/{{run_key}}/", "block": f"out-{tag}"},
        "checkpoint": {"path": f"s3://ckpt/{tag}/", "block": f"raw-{tag}"},
        "runner": {"kind": "dask", "workers": 1},
    })
    r = _create("pipeline", f"pipe-{tag}", "--file", str(pipe))
    assert r.returncode == 0, r.stderr

    # the session logs at WARNING; let this flow's INFO records reach the server to be checked
    import logging

    from prefect.logging.handlers import APILogWorker

    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    try:
        state = run_pipeline_flow(pipeline_block=f"pipe-{tag}", run_key="b1", return_state=True)
        APILogWorker.drain_all(timeout=10)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    summary = state.result()
    assert summary["status"] == "completed" and summary["rows_in"] == len(df)
    assert_exactly_once(f"s3://out/{tag}/b1/", reference(df), fs)
    assert st.fs.exists(f"ckpt/{tag}/blk-{tag}")  # checkpoints under the absolute path

    parent = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        child = client.read_flow_run(summary["flow_run_id"])
    assert child.parameters["pipeline"]["source"]["storage_options"] == {"block": f"raw-{tag}"}
    text = _server_records([parent, str(child.id)], "prefect.flow-run.Completed")
    assert f"raw-{tag}" in text and "rows out" in text  # the records are there (logs too) ...
    assert s3.secret not in text and s3.key not in text  # ... and no credential


@pytest.mark.prefect
def test_unknown_storage_block_is_one_clear_error(tmp_path, prefect_server):
    from dpipeline_prefect.pipeline import Pipeline

    df = flights(200)
    write_parquet_files(df, tmp_path / "src", files=1)
    cfg = {"name": "blk-missing", "source": {"path": str(tmp_path / "src"), "block": "no-such-store"},
           "sink": {"path": str(tmp_path / "out")}, "runner": {"kind": "threads", "workers": 1},
           "checkpoint": {"path": str(tmp_path / "ckpt")}}
    with pytest.raises(ConfigError) as e:
        Pipeline(cfg).run(run_key="x")
    assert "storage block 'no-such-store'" in str(e.value) and "does not exist" in str(e.value)
