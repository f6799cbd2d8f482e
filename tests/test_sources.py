"""Sources: listing, one schema for all files, clear errors, exact resume offsets.

Runs on local disk and on fsspec's in-process ``memory://`` filesystem (no server). Expected
rows come from pandas/pyarrow reading the same files directly.
"""

from __future__ import annotations

import gzip
import io
import json
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpipeline_prefect.config import SourceConfig
from dpipeline_prefect.errors import SchemaMismatchError, SourceError, TerminalError
from dpipeline_prefect.sources import (
    InputFile,
    list_files,
    plan_source,
    read_batches,
    schema_from_b64,
    schema_to_b64,
)
from dpipeline_prefect.storage import Storage


class Loc:
    """A fresh folder on one filesystem, with helpers to put files in it."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.storage = Storage(self.url)

    def sub(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def put(self, rel: str, data: bytes) -> None:
        st = self.storage
        with st.open(st.path(rel), "wb") as f:
            f.write(data)

    def put_parquet(self, rel: str, table: pa.Table, **kw) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, **kw)
        self.put(rel, buf.getvalue())

    def rel(self, paths: list[str]) -> list[str]:
        root = self.storage.root
        return [p[len(root) + 1 :] for p in paths]


@pytest.fixture(params=["local", "memory"])
def loc(request, tmp_path) -> Loc:
    if request.param == "local":
        return Loc(str(tmp_path / "src"))
    return Loc(f"memory://dp-src-{uuid.uuid4().hex}")


def read_all(loc: Loc, url: str, fmt: str, skip: int = 0, chunk_rows: int = 65_536) -> pa.Table:
    """Plan ``url`` and read every file in order; ``skip`` applies to the first file."""
    plan = plan_source(SourceConfig(path=url, format=fmt))
    st = Storage(url)
    parts = []
    for i, f in enumerate(plan.files):
        parts += list(read_batches(st, f, fmt, plan.schema, skip if i == 0 else 0, chunk_rows))
    return pa.Table.from_batches(parts, schema=plan.schema)


T = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})


# -- listing ---------------------------------------------------------------------------------


def test_folder_listing_is_recursive_sorted_and_skips_hidden(loc):
    for rel in ["b.parquet", "a.parquet", "sub/c.parquet", "sub/deeper/d.pq",
                "_SUCCESS", "_meta.parquet", ".x.parquet", "_staging/s.parquet",
                ".hidden/h.parquet", "sub/.part-1.parquet.abc.tmp", "notes.txt", "data.csv"]:
        loc.put_parquet(rel, T) if rel.endswith((".parquet", ".pq")) else loc.put(rel, b"x")
    found = loc.rel(list_files(loc.storage, "parquet"))
    assert found == ["a.parquet", "b.parquet", "sub/c.parquet", "sub/deeper/d.pq"]


def test_single_file(loc):
    loc.put_parquet("one.parquet", T)
    plan = plan_source(SourceConfig(path=loc.sub("one.parquet")))
    assert len(plan.files) == 1 and plan.files[0].rows == 3
    assert plan.files[0].path.endswith("one.parquet")


def test_glob_skips_hidden_files_and_folders(loc):
    for rel in ["2013/01.parquet", "2013/02.parquet", "2014/01.parquet", "2013/_tmp.parquet",
                "2013/.x.parquet", "_staging/2013/03.parquet", ".cache/04.parquet"]:
        loc.put_parquet(rel, T)
    st = Storage(loc.sub("2013/*.parquet"))
    assert loc.rel(list_files(st, "parquet")) == ["2013/01.parquet", "2013/02.parquet"]
    st = Storage(loc.sub("**/*.parquet"))
    assert loc.rel(list_files(st, "parquet")) == ["2013/01.parquet", "2013/02.parquet", "2014/01.parquet"]


@pytest.mark.parametrize("rel", ["nope", "nope/", "nope/*.parquet", "no*/x.parquet"])
def test_missing_source_path_is_a_clear_error(loc, rel):
    loc.put_parquet("there.parquet", T)
    with pytest.raises(SourceError) as info:
        plan_source(SourceConfig(path=loc.sub(rel)))
    assert isinstance(info.value, TerminalError)
    assert "does not exist" in str(info.value) and rel.rstrip("/") in str(info.value)


def test_unreadable_parquet_names_the_file(loc):
    loc.put_parquet("good.parquet", T)
    loc.put("junk.parquet", b"this is not parquet at all")
    with pytest.raises(SourceError, match="junk.parquet"):
        plan_source(SourceConfig(path=loc.url))


# -- parquet schema --------------------------------------------------------------------------


def test_parquet_type_mismatch_names_both_files_and_the_column(loc):
    loc.put_parquet("p1.parquet", pa.table({"dep_delay": pa.array([1, 2], pa.int64()), "c": ["a", "b"]}))
    loc.put_parquet("p2.parquet", pa.table({"dep_delay": pa.array([1.5], pa.float64()), "c": ["z"]}))
    with pytest.raises(SchemaMismatchError) as info:
        plan_source(SourceConfig(path=loc.url))
    msg = str(info.value)
    assert "p1.parquet" in msg and "p2.parquet" in msg and "'dep_delay'" in msg
    assert "int64" in msg and "double" in msg
    assert info.value.column == "dep_delay"


@pytest.mark.parametrize("extra_in_second", [True, False])
def test_parquet_missing_column_names_both_files_and_the_column(loc, extra_in_second):
    wide = pa.table({"a": [1], "tailnum": ["N1"]})
    narrow = pa.table({"a": [2]})
    loc.put_parquet("p1.parquet", narrow if extra_in_second else wide)
    loc.put_parquet("p2.parquet", wide if extra_in_second else narrow)
    with pytest.raises(SchemaMismatchError) as info:
        plan_source(SourceConfig(path=loc.url))
    msg = str(info.value)
    assert "p1.parquet" in msg and "p2.parquet" in msg and "'tailnum'" in msg and "missing" in msg


def test_parquet_column_order_may_differ_and_is_read_in_planned_order(loc):
    loc.put_parquet("p1.parquet", pa.table({"a": [1, 2], "b": ["x", "y"]}))
    loc.put_parquet("p2.parquet", pa.table({"b": ["z"], "a": [3]}))
    got = read_all(loc, loc.url, "parquet")
    assert got.schema.names == ["a", "b"]
    assert got.to_pydict() == {"a": [1, 2, 3], "b": ["x", "y", "z"]}


def test_schema_survives_b64_round_trip(loc):
    loc.put_parquet("p.parquet", pa.table({"t": pa.array([0], pa.timestamp("us", "UTC")), "s": ["a"]}))
    schema = plan_source(SourceConfig(path=loc.url)).schema
    assert schema_from_b64(schema_to_b64(schema)) == schema
    f = InputFile("x", 3, 10, (4, 6))
    assert InputFile.from_dict(json.loads(json.dumps(f.to_dict()))) == f


# -- resume offsets --------------------------------------------------------------------------


def _numbers(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "i": np.arange(n, dtype=np.int64),
            "x": rng.normal(size=n),
            "s": [f"row-{seed}-{k}" if k % 7 else None for k in range(n)],
        }
    )


@pytest.mark.parametrize("skip", [0, 1, 96, 97, 98, 194, 500, 969, 970, 999, 1000, 1500])
@pytest.mark.parametrize("chunk_rows", [13, 97, 4096])
def test_parquet_skip_rows_equals_slicing(loc, skip, chunk_rows):
    df = _numbers(1000, 1)
    loc.put_parquet("p.parquet", pa.Table.from_pandas(df, preserve_index=False), row_group_size=97)
    plan = plan_source(SourceConfig(path=loc.url))
    f = plan.files[0]
    assert f.rows == 1000 and f.row_group_rows == (97,) * 10 + (30,)
    batches = list(read_batches(loc.storage, f, "parquet", plan.schema, skip, chunk_rows))
    assert all(b.num_rows <= chunk_rows for b in batches)
    got = pa.Table.from_batches(batches, schema=plan.schema).to_pandas()
    pd.testing.assert_frame_equal(got, df.iloc[skip:].reset_index(drop=True))


def test_parquet_skip_whole_row_groups_without_reading_them(loc):
    # row group 0 is corrupt on purpose: skipping past it must not touch it
    df = _numbers(300, 2)
    loc.put_parquet("p.parquet", pa.Table.from_pandas(df, preserve_index=False), row_group_size=100)
    plan = plan_source(SourceConfig(path=loc.url))
    f = plan.files[0]
    raw = bytearray(loc.storage.read_bytes(f.path))
    first_rg = pq.ParquetFile(io.BytesIO(bytes(raw))).metadata.row_group(0).column(0)
    start = first_rg.data_page_offset
    raw[start + 8 : start + 40] = b"\xff" * 32
    loc.put("p.parquet", bytes(raw))
    got = pa.Table.from_batches(list(read_batches(loc.storage, f, "parquet", plan.schema, 150)))
    pd.testing.assert_frame_equal(got.to_pandas(), df.iloc[150:].reset_index(drop=True))


# -- CSV / JSON lines ------------------------------------------------------------------------


def test_csv_files_are_read_with_one_schema(loc):
    # alone, the second file would be inferred as int64 / all-null; with the plan it is not
    loc.put("1.csv", b"flight,delay,tail\n1,1.5,N1\n2,-3.25,N2\n")
    loc.put("2.csv", b"flight,delay,tail\n3,7,\n4,8,\n")
    plan = plan_source(SourceConfig(path=loc.url, format="csv"))
    assert plan.schema.field("delay").type == pa.float64()
    assert plan.schema.field("tail").type == pa.string()
    st = loc.storage
    per_file = [pa.Table.from_batches(list(read_batches(st, f, "csv", plan.schema))) for f in plan.files]
    assert all(t.schema == plan.schema for t in per_file)
    got = pa.concat_tables(per_file).to_pandas()
    assert got["delay"].tolist() == [1.5, -3.25, 7.0, 8.0]
    assert got["flight"].tolist() == [1, 2, 3, 4]
    assert got["tail"].tolist() == ["N1", "N2", "", ""]  # pyarrow: empty text stays ""


def test_csv_gzip_is_read(loc):
    loc.put("a.csv.gz", gzip.compress(b"k,v\na,1\nb,2\n"))
    got = read_all(loc, loc.url, "csv")
    assert got.to_pydict() == {"k": ["a", "b"], "v": [1, 2]}


def test_csv_header_mismatch_names_both_files_and_the_column(loc):
    loc.put("1.csv", b"flight,delay\n1,2\n")
    loc.put("2.csv", b"flight,dep_delay\n1,2\n")
    with pytest.raises(SchemaMismatchError) as info:
        plan_source(SourceConfig(path=loc.url, format="csv"))
    msg = str(info.value)
    assert "1.csv" in msg and "2.csv" in msg and "'delay'" in msg


def test_jsonl_files_are_read_with_one_schema(loc):
    loc.put("1.jsonl", b'{"a": 1, "x": 0.5, "s": "p"}\n{"a": 2, "x": 1.5, "s": "q"}\n')
    loc.put("2.jsonl", b'{"a": 3, "x": 2, "s": null}\n{"a": 4, "s": "r"}\n')
    plan = plan_source(SourceConfig(path=loc.url, format="jsonl"))
    assert plan.schema.field("x").type == pa.float64()
    got = read_all(loc, loc.url, "jsonl")
    assert got.schema == plan.schema
    assert got.to_pydict() == {"a": [1, 2, 3, 4], "x": [0.5, 1.5, 2.0, None], "s": ["p", "q", None, "r"]}


def test_jsonl_unknown_key_names_both_files_and_the_column(loc):
    loc.put("1.jsonl", b'{"a": 1, "b": "x"}\n')
    loc.put("2.jsonl", b'{"a": 2, "b": "y", "surprise": true}\n')
    with pytest.raises(SchemaMismatchError) as info:
        plan_source(SourceConfig(path=loc.url, format="jsonl"))
    msg = str(info.value)
    assert "1.jsonl" in msg and "2.jsonl" in msg and "'surprise'" in msg


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("skip", [0, 1, 33, 999, 1000, 1200])
def test_text_skip_rows_equals_slicing(loc, fmt, skip):
    df = _numbers(1000, 3).drop(columns=["s"])
    if fmt == "csv":
        loc.put("d.csv", df.to_csv(index=False).encode())
    else:
        loc.put("d.jsonl", df.to_json(orient="records", lines=True).encode())
    plan = plan_source(SourceConfig(path=loc.url, format=fmt))
    got = pa.Table.from_batches(
        list(read_batches(loc.storage, plan.files[0], fmt, plan.schema, skip, chunk_rows=64)),
        schema=plan.schema,
    ).to_pandas()
    pd.testing.assert_frame_equal(got, df.iloc[skip:].reset_index(drop=True), check_exact=False)


def test_csv_bad_value_later_is_a_source_error_naming_the_file(loc):
    loc.put("1.csv", b"a\n1\n2\n")
    loc.put("2.csv", b"a\n3\nnot-a-number\n")
    plan = plan_source(SourceConfig(path=loc.url, format="csv"))
    with pytest.raises(SourceError, match="2.csv"):
        list(read_batches(loc.storage, plan.files[1], "csv", plan.schema))


def test_jsonl_first_line_not_an_object_is_a_clear_error(loc):
    loc.put("1.jsonl", b'{"a": 1}\n')
    loc.put("2.jsonl", b'[1, 2]\n')
    with pytest.raises(SourceError, match="2.jsonl: first line is not a JSON object"):
        plan_source(SourceConfig(path=loc.url, format="jsonl"))
