"""A stream pipeline through ``dpipeline run``: real Prefect server, SeaweedFS S3, a SIGKILL.

Four increments, each after a new slice lands in an S3 prefix; one run is killed between its
sink write and its commit, the next run redoes that increment. The emitted windows must equal
the pandas reference, credentials must not appear in anything the run prints or returns, and
the runs must be Prefect flow runs with a ``stream-increment`` task run.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from .pipeline_helpers import load_summary, run_cli, write_yaml
from .test_stream import assert_windows_equal, explode, groupby_ref, late_mask, make_slices, watermarks

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.slow]


def test_stream_runs_through_the_cli_on_s3_and_survives_a_kill(tmp_path, s3, prefect_server):
    opts = s3.storage_options()
    fs = s3fs.S3FileSystem(**opts)
    prefix = uuid.uuid4().hex[:10]
    env = {"S3_KEY": opts["key"], "S3_SECRET": opts["secret"]}
    so = {"key": "${S3_KEY}", "secret": "${S3_SECRET}", "client_kwargs": opts["client_kwargs"]}
    cfg = {
        "name": f"stream-cli-{prefix}",
        "source": {"path": f"s3://raw/{prefix}/", "storage_options": so},
        "sink": {"path": f"s3://out/{prefix}/", "storage_options": so, "partition_by": ["origin"]},
        "checkpoint": {"path": f"s3://ckpt/{prefix}/", "storage_options": so},
        "stream": {
            "event_time": "time_hour", "watermark_delay": "1D", "window": {"kind": "tumbling", "size": "1h"},
            "key": ["origin"], "aggregations": {"dep_delay": ["mean", "max", "count"], "distance": ["sum"]},
            "late": "dead_letter",
        },
    }
    p = write_yaml(tmp_path / "stream.yaml", cfg)
    slices = make_slices(n_rows=8_000, n_slices=5)[:4]
    sums = []
    for i, s in enumerate(slices):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(s, preserve_index=False), buf)
        fs.pipe(f"raw/{prefix}/slice-{i:03d}.parquet", buf.getvalue())
        if i == 2:
            r = run_cli("run", str(p), env={**env, "DPIPELINE_CRASHPOINT": "stream_after_write"})
            assert r.returncode == -signal.SIGKILL, r.stderr
        out_json = tmp_path / f"s{i}.json"
        r = run_cli("run", str(p), "--summary-json", str(out_json), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        for text in (r.stdout, r.stderr, out_json.read_text()):
            assert opts["secret"] not in text and opts["key"] not in text
        sums.append(load_summary(out_json))
    assert [s["seq"] for s in sums] == list(range(1, 5))
    assert sums[2]["resumed"] and sums[2]["batches_reprocessed"] >= 1
    assert "windows_emitted" in r.stdout and "watermark" in r.stdout

    wms = watermarks(slices)
    pairs = explode(slices, pd.Timedelta("1h"))
    late = late_mask(pairs, wms)
    got = pd.read_parquet(f"s3://out/{prefix}/", storage_options=opts)
    got["origin"] = got["origin"].astype(str)
    assert_windows_equal(got, groupby_ref(pairs[~late], wms[-1]))
    assert sum(s["rows_late"] for s in sums) == pairs.loc[late, "row_id"].nunique()

    # Prefect saw each run as a flow run with one stream-increment task run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def check() -> None:
        async with get_client() as client:
            ids = [uuid.UUID(s["flow_run_id"]) for s in sums]
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            assert len(runs) == 4 and all(r.state.is_completed() for r in runs)
            for r in runs:
                params = json.dumps(r.parameters, default=str)
                assert opts["secret"] not in params
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            assert sorted(t.name.split("-")[0] + "-" + t.name.split("-")[1] for t in tasks) == ["stream-increment"] * 4

            # each increment left a markdown artifact on its flow run
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"dpipeline-stream-cli-{prefix}-stream"])))
            assert {str(a.flow_run_id) for a in arts} == {str(i) for i in ids}
            assert any("windows emitted" in a.data for a in arts)

    asyncio.run(check())
