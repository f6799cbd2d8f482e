"""Sinks: deterministic names, safe partition folders, exact cleanup, ownership, invisible temps.

Runs on local disk and on fsspec's ``memory://`` (no server). Output is read back with the
tools users read it with: pandas, pyarrow datasets and DuckDB.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from dpipeline_prefect.config import SinkConfig
from dpipeline_prefect.errors import ConfigError, TerminalError
from dpipeline_prefect.sinks import MARKER, Sink


@pytest.fixture(params=["local", "memory"])
def out_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"memory://dp-sink-{uuid.uuid4().hex}"


def make_sink(url: str, run_key: str = "rk1", **kw) -> Sink:
    return Sink(SinkConfig(path=url, **kw), run_key)


def files_under(sink: Sink) -> list[str]:
    root = sink.storage.root
    return [p[len(root) + 1 :] for p in sink.storage.find(root)]


DF = pd.DataFrame({"carrier": ["AA", "UA", "AA"], "delay": [1.5, -2.0, 3.25], "n": [1, 2, 3]})


# -- names and content -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_write_batch_name_and_content(out_url, fmt):
    sink = make_sink(out_url, format=fmt)
    res = sink.write_batch("h000003", 12, DF)
    name = f"part-h000003-000012.{fmt}"
    assert files_under(sink) == [name]
    assert (res.files, res.rows) == (1, 3)
    data = sink.storage.read_bytes(sink.storage.path(name))
    assert res.bytes == len(data)
    back = {
        "parquet": lambda b: pd.read_parquet(io.BytesIO(b)),
        "csv": lambda b: pd.read_csv(io.BytesIO(b)),
        "jsonl": lambda b: pd.read_json(io.BytesIO(b), lines=True),
    }[fmt](data)
    pd.testing.assert_frame_equal(back, DF, check_dtype=False)


def test_rewrite_of_same_batch_replaces_it(out_url):
    sink = make_sink(out_url)
    sink.write_batch("t000001", 0, DF)
    sink.write_batch("t000001", 0, DF.iloc[:1])
    assert files_under(sink) == ["part-t000001-000000.parquet"]
    assert len(pd.read_parquet(io.BytesIO(sink.storage.read_bytes(sink.storage.path("part-t000001-000000.parquet"))))) == 1


def test_empty_batch_writes_nothing(out_url):
    sink = make_sink(out_url)
    assert sink.write_batch("h000000", 0, DF.iloc[:0]).files == 0
    assert files_under(sink) == []


def test_partition_column_must_exist(out_url):
    sink = make_sink(out_url, partition_by=["origin"])
    with pytest.raises(ConfigError, match="'origin'"):
        sink.write_batch("h000000", 0, DF)


# -- partitions ------------------------------------------------------------------------------

NASTY = ["a/b", "..", "../../escape", "../", "/abs", ".", "x y", "%2F", "ü=1", "", None, "ok"]


def test_partition_values_stay_inside_the_sink_and_read_back(out_url):
    sink = make_sink(out_url, partition_by=["p"])
    df = pd.DataFrame({"p": NASTY, "v": np.arange(len(NASTY))})
    res = sink.write_batch("h000001", 0, df)
    assert res.rows == len(df)
    rels = files_under(sink)
    assert len(rels) == res.files
    for rel in rels:
        parts = rel.split("/")
        assert len(parts) == 2, rel  # one partition folder, then the file
        assert parts[0].startswith("p=") and parts[0] not in (".", "..")
        assert parts[1] == "part-h000001-000000.parquet"
    if sink.storage.is_local:
        root = os.path.realpath(sink.storage.root)
        for dirpath, _, names in os.walk(os.path.dirname(root)):
            for n in names:
                assert os.path.realpath(os.path.join(dirpath, n)).startswith(root + os.sep)
    # every row comes back with its value (pyarrow decodes the percent-encoding)
    table = ds.dataset(
        sink.storage.root, filesystem=sink.storage.fs, format="parquet", partitioning="hive"
    ).to_table()
    got = dict(zip(table.column("v").to_pylist(), table.column("p").to_pylist()))
    assert got == dict(zip(range(len(NASTY)), NASTY))


def test_empty_string_and_null_partitions_keep_all_rows(out_url):
    sink = make_sink(out_url, partition_by=["p"])
    df = pd.DataFrame({"p": ["", None, "", None], "v": [0, 1, 2, 3]})
    res = sink.write_batch("h000001", 0, df)
    table = ds.dataset(sink.storage.root, filesystem=sink.storage.fs, partitioning="hive").to_table()
    assert sorted(table.column("v").to_pylist()) == [0, 1, 2, 3]
    assert res.rows == 4 and res.files == len(files_under(sink))


def test_values_with_the_same_folder_name_share_one_file(out_url):
    sink = make_sink(out_url, partition_by=["p"])
    df = pd.DataFrame({"p": pd.Series([1, "1", 2], dtype=object), "v": [10, 11, 12]})
    res = sink.write_batch("h000001", 0, df)
    assert sorted(files_under(sink)) == ["p=1/part-h000001-000000.parquet", "p=2/part-h000001-000000.parquet"]
    assert res.files == 2 and res.rows == 3
    table = ds.dataset(sink.storage.root, filesystem=sink.storage.fs, partitioning="hive").to_table()
    assert sorted(table.column("v").to_pylist()) == [10, 11, 12]


def test_partitioned_output_reads_back_with_pandas_and_duckdb(tmp_path):
    sink = make_sink(str(tmp_path / "out"), partition_by=["carrier", "origin"])
    df = pd.DataFrame(
        {
            "carrier": ["AA", "UA", "AA", "B6/X", "UA"],
            "origin": ["JFK", "LGA", "EWR", "JFK", "../etc"],
            "v": [1, 2, 3, 4, 5],
        }
    )
    sink.write_batch("h000002", 7, df)
    back = pd.read_parquet(sink.storage.root)
    back = back.astype({"carrier": str, "origin": str}).sort_values("v").reset_index(drop=True)
    pd.testing.assert_frame_equal(back[["carrier", "origin", "v"]], df, check_dtype=False)
    rows = duckdb.sql(
        f"SELECT carrier, origin, v FROM read_parquet('{sink.storage.root}/**/*.parquet', "
        "hive_partitioning = true) ORDER BY v"
    ).fetchall()
    assert rows == list(df.itertuples(index=False, name=None))


# -- cleanup ---------------------------------------------------------------------------------


def test_remove_uncommitted_removes_exactly_later_batches_of_that_shard(out_url):
    sink = make_sink(out_url, partition_by=["carrier"])
    for shard in ("h000001", "h000002", "h000011"):
        for seq in range(6):
            sink.write_batch(shard, seq, DF)
    before = set(files_under(sink))
    removed = sink.remove_uncommitted("h000001", 3)
    after = set(files_under(sink))
    gone = before - after
    expected = {
        f"carrier={c}/part-h000001-{s:06d}.parquet" for c in ("AA", "UA") for s in (3, 4, 5)
    }
    assert gone == expected
    assert removed == 3  # batches 3, 4, 5 had output
    assert sink.remove_uncommitted("h000001", 3) == 0
    assert sink.remove_uncommitted("h000002", 0) == 6
    assert all("h000002" not in p for p in files_under(sink))


def test_output_files_ignores_foreign_names(out_url):
    sink = make_sink(out_url)
    sink.write_batch("f00001", 2, DF)
    for rel in ["notes.txt", "part-x.parquet", "part-h1-12.parquet", ".part-f00001-000003.parquet.ab12.tmp"]:
        sink.storage.write_bytes(sink.storage.path(rel), b"x")
    assert [(s, q) for _, s, q in sink.output_files()] == [("f00001", 2)]


# -- ownership -------------------------------------------------------------------------------


def test_claim_marks_the_folder_and_accepts_the_same_run(out_url):
    sink = make_sink(out_url, run_key="2013-01-01")
    sink.claim("flights")
    marker = json.loads(sink.storage.read_bytes(sink.storage.path(MARKER)))
    assert marker == {"pipeline": "flights", "run_key": "2013-01-01"}
    sink.write_batch("h000000", 0, DF)
    make_sink(out_url, run_key="2013-01-01").claim("flights")  # a resume of the same run


@pytest.mark.parametrize("pipeline, run_key", [("flights", "2013-01-02"), ("other", "2013-01-01")])
def test_claim_refuses_another_runs_folder(out_url, pipeline, run_key):
    make_sink(out_url, run_key="2013-01-01").claim("flights")
    with pytest.raises(TerminalError) as info:
        make_sink(out_url, run_key=run_key).claim(pipeline)
    assert "2013-01-01" in str(info.value) and "{run_key}" in str(info.value)


@pytest.mark.parametrize("foreign", ["part-h000000-000000.parquet", "data.parquet", "sub/2013.csv"])
def test_claim_refuses_a_folder_with_foreign_output(out_url, foreign):
    st = make_sink(out_url).storage
    st.write_bytes(st.path(foreign), b"someone else's rows")
    with pytest.raises(TerminalError, match="already holds"):
        make_sink(out_url).claim("flights")
    assert not st.exists(st.path(MARKER))


def test_claim_accepts_a_folder_with_only_hidden_files(out_url):
    st = make_sink(out_url).storage
    st.write_bytes(st.path("_SUCCESS"), b"")
    st.write_bytes(st.path(".part-h000000-000000.parquet.1234abcd.tmp"), b"partial")
    make_sink(out_url).claim("flights")


# -- temp files ------------------------------------------------------------------------------


def _garbage_tmp(sink: Sink, rel_dir: str, name: str) -> str:
    """A half-written temp file as a crash mid-write leaves it (local disk only)."""
    d = os.path.join(sink.storage.root, rel_dir) if rel_dir else sink.storage.root
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(p, "wb") as f:
        f.write(b"PAR1 truncated")
    return p


@pytest.mark.parametrize("partition_by", [[], ["carrier"]])
def test_temp_files_are_invisible_to_readers(tmp_path, partition_by):
    sink = make_sink(str(tmp_path / "out"), partition_by=partition_by)
    sink.write_batch("h000001", 0, DF)
    rel_dir = "carrier=AA" if partition_by else ""
    tmps = [_garbage_tmp(sink, rel_dir, "part-h000001-000001.parquet"),
            _garbage_tmp(sink, rel_dir, "part-h000002-000000.parquet")]
    root = sink.storage.root
    got = pd.read_parquet(root).sort_values("n").reset_index(drop=True)
    assert got["n"].tolist() == [1, 2, 3]
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet')").fetchall()[0][0]
    assert n == 3
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/*.parquet')").fetchall()[0][0] if not partition_by else 3
    assert n == 3
    assert sink.remove_temporaries() == 2
    assert not any(os.path.exists(p) for p in tmps)
    assert pd.read_parquet(root)["n"].sum() == 6


def test_successful_writes_leave_no_temp_files(tmp_path):
    sink = make_sink(str(tmp_path / "out"), partition_by=["carrier"])
    for seq in range(5):
        sink.write_batch("h000001", seq, DF)
    assert all(not n.startswith(".") for _, _, names in os.walk(sink.storage.root) for n in names)


def test_clear_removes_our_output_and_marker_only(out_url):
    sink = make_sink(out_url)
    sink.claim("flights")
    sink.write_batch("h000001", 0, DF)
    st = sink.storage
    st.write_bytes(st.path("README.md"), b"keep me")
    assert sink.clear() == 1
    assert files_under(sink) == ["README.md"]


def test_written_parquet_round_trips_types(tmp_path):
    sink = make_sink(str(tmp_path / "out"))
    df = pd.DataFrame(
        {
            "t": pd.to_datetime(["2013-01-01 05:00", "2013-01-02 06:30"]).tz_localize("UTC"),
            "i": pd.array([1, None], dtype="Int64"),
            "s": ["a", None],
        }
    )
    sink.write_batch("h000000", 0, df)
    back = pq.read_table(os.path.join(sink.storage.root, "part-h000000-000000.parquet"))
    assert back.schema.field("t").type == pa.timestamp("us", "UTC") or pa.types.is_timestamp(back.schema.field("t").type)
    assert back.column("i").to_pylist() == [1, None]
    assert back.column("s").to_pylist() == ["a", None]
