"""Row -> shard assignment (Sharder): hash, range, time and custom strategies.

Pure logic on Arrow tables. Expected codes come from independent pandas/numpy computations
(``hash_pandas_object``, ``pd.cut``, timestamp arithmetic), and hash stability is checked
against a separate Python process with a different hash seed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dpipeline_prefect.config import ShardingConfig
from dpipeline_prefect.errors import ShardingError, TerminalError
from dpipeline_prefect.sharding import CATCH_ALL, CATCH_ALL_ID, Sharder

# shard ids become file names (sinks.py: part-<id>-<seq>) and checkpoint path segments
SAFE_ID = re.compile(r"[A-Za-z0-9]+")


def sharder(**kw) -> Sharder:
    return Sharder(ShardingConfig(**kw))


def expected_hash(values: pd.Series, n: int) -> np.ndarray:
    return (pd.util.hash_pandas_object(values, index=False).to_numpy() % np.uint64(n)).astype(np.int64)


def test_files_strategy_has_no_sharder():
    with pytest.raises(ValueError):
        Sharder(ShardingConfig())


# -- hash ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        list(range(-50, 50)),
        [f"carrier-{i}" for i in range(100)],
        [i * 0.25 for i in range(100)],
    ],
    ids=["int", "str", "float"],
)
def test_hash_matches_hash_pandas_object(values):
    s = sharder(strategy="hash", key="k", shards=7)
    codes = s.assign(pa.table({"k": values}))
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, expected_hash(pd.Series(values), 7))


_CHILD = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    from dpipeline_prefect.config import ShardingConfig
    from dpipeline_prefect.sharding import Sharder
    values = json.loads(sys.argv[1])
    out = {}
    for name, col in values.items():
        s = Sharder(ShardingConfig(strategy="hash", key="k", shards=13))
        out[name] = s.assign(pa.table({"k": col})).tolist()
    print(json.dumps(out))
    """
)


def test_hash_is_the_same_in_another_process():
    values = {
        "int": list(range(200)),
        "str": [f"k{i}" for i in range(200)],
        "mixed_null": [None if i % 5 == 0 else f"k{i}" for i in range(200)],
    }
    here = {
        name: sharder(strategy="hash", key="k", shards=13).assign(pa.table({"k": col})).tolist()
        for name, col in values.items()
    }
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's own hash() would differ
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(values)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    assert json.loads(out.stdout) == here


def test_hash_nulls_go_to_shard_zero():
    s = sharder(strategy="hash", key="k", shards=5)
    codes = s.assign(pa.table({"k": pa.array(["a", None, "b", None], pa.string())}))
    assert codes[1] == 0 and codes[3] == 0
    codes = s.assign(pa.table({"k": pa.array([None, None], pa.int64())}))
    assert codes.tolist() == [0, 0]


@pytest.mark.parametrize("typ", [pa.int64(), pa.int32(), pa.string(), pa.timestamp("us")])
def test_hash_of_a_value_does_not_depend_on_nulls_elsewhere_in_the_batch(typ):
    """The same key must land in the same shard whatever batch it is read in.

    Arrow int columns with nulls become float64 in pandas; hashing that would send key 5 to
    a different shard than in a null-free batch.
    """
    raw = [5, 17, 123456789, 2**30]
    if pa.types.is_string(typ):
        raw = [str(v) for v in raw]
    if pa.types.is_timestamp(typ):
        raw = [pd.Timestamp("2013-01-01") + pd.Timedelta(seconds=v % 10**6) for v in raw]
    s = sharder(strategy="hash", key="k", shards=16)
    clean = s.assign(pa.table({"k": pa.array(raw, typ)}))
    with_nulls = s.assign(pa.table({"k": pa.array(raw + [None], typ)}))
    np.testing.assert_array_equal(with_nulls[:-1], clean)
    assert with_nulls[-1] == 0
    np.testing.assert_array_equal(clean, expected_hash(pd.Series(raw), 16) if not pa.types.is_int32(typ)
                                  else expected_hash(pd.Series(raw, dtype="int32"), 16))


def test_hash_covers_all_shards_evenly():
    n = 16
    codes = sharder(strategy="hash", key="k", shards=n).assign(pa.table({"k": np.arange(20_000)}))
    counts = np.bincount(codes, minlength=n)
    assert len(counts) == n and counts.min() > 0
    mean = 20_000 / n
    assert counts.min() > 0.8 * mean and counts.max() < 1.2 * mean, counts


def test_hash_does_not_depend_on_chunking():
    s = sharder(strategy="hash", key="k", shards=9)
    t = pa.table({"k": [f"v{i}" for i in range(1000)]})
    whole = s.assign(t)
    pieces = np.concatenate([s.assign(t.slice(i, 77)) for i in range(0, 1000, 77)])
    chunked = s.assign(pa.Table.from_batches(t.to_batches(max_chunksize=100)))
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(whole, chunked)


def test_missing_key_column_is_named():
    s = sharder(strategy="hash", key="carrier", shards=4)
    with pytest.raises(ShardingError) as info:
        s.assign(pa.table({"origin": ["JFK"], "dest": ["LAX"]}))
    assert "'carrier'" in str(info.value) and "origin, dest" in str(info.value)
    assert info.value.key == "carrier"


# -- range -----------------------------------------------------------------------------------


def test_range_boundaries_semantics():
    b = [10, 20, 30]
    s = sharder(strategy="range", key="k", boundaries=b)
    values = [-5, 9, 10, 11, 19, 20, 29, 30, 31, 10**9]
    codes = s.assign(pa.table({"k": values}))
    expected = pd.cut(values, [-np.inf, *b, np.inf], right=False, labels=False)
    np.testing.assert_array_equal(codes, expected)
    assert set(codes) == {0, 1, 2, 3}  # n boundaries -> n + 1 shards
    assert s.expected_codes() == [0, 1, 2, 3]
    # a value equal to a boundary goes right
    assert codes[values.index(10)] == 1 and codes[values.index(30)] == 3


def test_range_float_key_and_int_boundaries():
    s = sharder(strategy="range", key="k", boundaries=[0, 2.5])
    values = np.linspace(-2, 5, 57)
    expected = pd.cut(values, [-np.inf, 0, 2.5, np.inf], right=False, labels=False)
    np.testing.assert_array_equal(s.assign(pa.table({"k": values})), expected)


def test_range_string_key():
    s = sharder(strategy="range", key="k", boundaries=["g", "p"])
    codes = s.assign(pa.table({"k": ["apple", "g", "grape", "pear", "p", "zebra"]}))
    assert codes.tolist() == [0, 1, 1, 2, 2, 2]


def test_range_timestamp_key_with_date_boundaries():
    s = sharder(strategy="range", key="t", boundaries=["2013-04-01", "2013-07-01"])
    ts = pd.to_datetime(["2013-01-05", "2013-04-01", "2013-06-30 23:59", "2013-07-01", "2013-12-31"], format="ISO8601")
    codes = s.assign(pa.table({"t": pa.array(ts, pa.timestamp("us"))}))
    assert codes.tolist() == [0, 1, 1, 2, 2]
    dates = pa.array([d.date() for d in ts], pa.date32())
    assert s.assign(pa.table({"t": dates})).tolist() == [0, 1, 1, 2, 2]


def test_range_tz_aware_key_compares_instants_in_utc():
    s = sharder(strategy="range", key="t", boundaries=["2013-07-01", "2013-07-02T00:00+02:00"])
    ts = pd.Series(pd.date_range("2013-06-30 12:00", "2013-07-02 12:00", freq="1h", tz="America/New_York"))
    utc = ts.dt.tz_convert("UTC")
    edges = [pd.Timestamp("2013-07-01", tz="UTC"), pd.Timestamp("2013-07-02T00:00+02:00")]
    expected = (utc >= edges[0]).astype(int) + (utc >= edges[1]).astype(int)
    np.testing.assert_array_equal(s.assign(pa.table({"t": ts})), expected.to_numpy())
    with pytest.raises(ShardingError, match="cannot be compared"):
        sharder(strategy="range", key="t", boundaries=[5]).assign(pa.table({"t": ts}))


@pytest.mark.parametrize(
    "values, typ",
    [([1, None, 30], pa.int64()), (["a", None, "z"], pa.string())],
    ids=["int", "str"],
)
def test_range_null_key_is_an_error_naming_the_key_unless_catch_all(values, typ):
    table = pa.table({"amount": pa.array(values, typ)})
    bounds = [10] if pa.types.is_integer(typ) else ["m"]
    with pytest.raises(ShardingError) as info:
        sharder(strategy="range", key="amount", boundaries=bounds).assign(table)
    msg = str(info.value)
    assert "'amount'" in msg and "null" in msg and "catch_all" in msg
    assert info.value.key == "amount"
    s = sharder(strategy="range", key="amount", boundaries=bounds, catch_all=True)
    codes = s.assign(table)
    assert codes.tolist() == [0, CATCH_ALL, 1]
    assert s.shard_id(CATCH_ALL) == CATCH_ALL_ID


def test_range_incomparable_key_is_a_sharding_error():
    s = sharder(strategy="range", key="k", boundaries=[1, 2])
    with pytest.raises(ShardingError, match="'k'"):
        s.assign(pa.table({"k": ["a", "b"]}))


def test_range_labels():
    s = sharder(strategy="range", key="k", boundaries=[10, 20])
    assert [s.label(c) for c in (0, 1, 2)] == ["[-inf, 10)", "[10, 20)", "[20, +inf)"]


# -- time ------------------------------------------------------------------------------------


def _time_expected(ts: pd.Series, start: str | None, every: str) -> np.ndarray:
    """Bucket numbers computed with pandas: whole ``every`` steps since start (or epoch), UTC."""
    utc = ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")
    origin = pd.Timestamp(start) if start else pd.Timestamp(0)
    origin = origin.tz_localize("UTC") if origin.tzinfo is None else origin.tz_convert("UTC")
    return ((utc - origin) // pd.Timedelta(every)).to_numpy(dtype=np.int64)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("start", [None, "2013-01-01", "2013-01-01 03:30"])
def test_time_buckets_naive(unit, start):
    rng = np.random.default_rng(1)
    ts = pd.Series(pd.Timestamp("2013-01-01 04:00") + pd.to_timedelta(rng.integers(0, 86400 * 40, 500), "s"))
    s = sharder(strategy="time", key="t", every="6h", start=start)
    codes = s.assign(pa.table({"t": pa.array(ts, pa.timestamp(unit))}))
    np.testing.assert_array_equal(codes, _time_expected(ts, start, "6h"))


@pytest.mark.parametrize("start", [None, "2013-01-01", "2013-01-01T00:00+02:00"])
def test_time_buckets_tz_aware(start):
    ts = pd.Series(pd.date_range("2013-03-09", "2013-03-12", freq="37min", tz="America/New_York"))
    s = sharder(strategy="time", key="t", every="1D", start=start)
    codes = s.assign(pa.table({"t": pa.array(ts)}))
    np.testing.assert_array_equal(codes, _time_expected(ts, start, "1D"))


def test_time_start_and_end_out_of_range_name_the_value():
    ts = pd.to_datetime(["2013-01-01 00:00", "2013-06-15 12:00", "2012-12-31 23:59:59"], format="ISO8601")
    s = sharder(strategy="time", key="time_hour", every="1D", start="2013-01-01", end="2014-01-01")
    with pytest.raises(ShardingError) as info:
        s.assign(pa.table({"time_hour": ts}))
    msg = str(info.value)
    assert "'time_hour'" in msg and "2012-12-31 23:59:59" in msg and "catch_all" in msg
    assert info.value.key == "time_hour"
    # end is exclusive
    with pytest.raises(ShardingError, match="2014-01-01"):
        s.assign(pa.table({"time_hour": pd.to_datetime(["2013-12-31 23:59", "2014-01-01 00:00"], format="ISO8601")}))
    ok = s.assign(pa.table({"time_hour": pd.to_datetime(["2013-01-01", "2013-12-31 23:59"], format="ISO8601")}))
    assert ok.tolist() == [0, 364]


def test_time_catch_all_collects_out_of_range_and_null():
    s = sharder(strategy="time", key="t", every="1D", start="2013-01-01", end="2013-01-03", catch_all=True)
    t = pa.table({"t": pa.array([pd.Timestamp("2013-01-01 05:00"), None, pd.Timestamp("2012-01-01"),
                                 pd.Timestamp("2013-01-02 23:00"), pd.Timestamp("2013-01-03")], pa.timestamp("us"))})
    assert s.assign(t).tolist() == [0, CATCH_ALL, CATCH_ALL, 1, CATCH_ALL]


def test_time_null_is_an_error_without_catch_all():
    s = sharder(strategy="time", key="t", every="1h")
    with pytest.raises(ShardingError, match="null"):
        s.assign(pa.table({"t": pa.array([pd.Timestamp("2013-01-01"), None], pa.timestamp("us"))}))


def test_time_before_epoch_without_start_is_not_the_catch_all_shard():
    """With no start, buckets count from the Unix epoch, so older rows get negative codes:
    they must stay distinct from the catch-all shard and keep file-name-safe ids."""
    ts = pd.Series(pd.to_datetime(["1969-12-31 12:00", "1969-12-30 01:00", "1970-01-01 00:00", "1950-06-01 00:00"]))
    s = sharder(strategy="time", key="t", every="1D")
    codes = s.assign(pa.table({"t": ts}))
    np.testing.assert_array_equal(codes, _time_expected(ts, None, "1D"))
    assert CATCH_ALL not in codes.tolist()
    ids = [s.shard_id(int(c)) for c in codes]
    assert CATCH_ALL_ID not in ids
    assert all(SAFE_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(set(codes.tolist()))
    assert s.label(int(codes[0])) == "1969-12-31T00:00"


def test_time_key_of_strings_and_dates():
    s = sharder(strategy="time", key="t", every="1D", start="2013-01-01")
    assert s.assign(pa.table({"t": ["2013-01-01T05:00:00Z", "2013-01-03T00:00:00Z"]})).tolist() == [0, 2]
    dates = pa.array([pd.Timestamp("2013-01-02").date(), pd.Timestamp("2013-02-01").date()], pa.date32())
    assert s.assign(pa.table({"t": dates})).tolist() == [1, 31]
    with pytest.raises(ShardingError, match="timestamp"):
        s.assign(pa.table({"t": ["yesterday"]}))
    with pytest.raises(ShardingError, match="timestamp"):
        s.assign(pa.table({"t": [1, 2]}))


def test_time_labels():
    s = sharder(strategy="time", key="t", every="6h", start="2013-01-01")
    assert [s.label(c) for c in (0, 1, 5)] == ["2013-01-01T00:00", "2013-01-01T06:00", "2013-01-02T06:00"]


# -- custom ----------------------------------------------------------------------------------


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """A fresh importable module with sharding functions (unique name: imports are cached)."""
    name = f"dp_custom_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def by_len(df):
                return df["k"].str.len().to_numpy()

            def as_list(df):
                return [int(v) % 3 for v in df["n"]]

            def too_short(df):
                return np.zeros(len(df) - 1, dtype=int)

            def negative(df):
                return np.full(len(df), -2)

            def floats(df):
                return np.full(len(df), 1.0)

            def strings(df):
                return ["a"] * len(df)

            def boom(df):
                raise KeyError("region")

            not_callable = 5
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_custom_function_codes(custom_module):
    s = sharder(strategy="custom", function=f"{custom_module}:by_len")
    t = pa.table({"k": ["a", "bbb", "cc", ""]})
    assert s.assign(t).tolist() == [1, 3, 2, 0]
    s = sharder(strategy="custom", function=f"{custom_module}:as_list")
    assert s.assign(pa.table({"n": [4, 5, 6]})).tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    "fn, needle",
    [
        ("too_short", "one integer per row"),
        ("negative", "negative"),
        ("floats", "one integer per row"),
        ("strings", "one integer per row"),
        ("boom", "KeyError"),
    ],
)
def test_custom_function_bad_output_is_a_clear_error(custom_module, fn, needle):
    s = sharder(strategy="custom", function=f"{custom_module}:{fn}")
    with pytest.raises(ShardingError) as info:
        s.assign(pa.table({"k": ["a", "b", "c"]}))
    assert needle in str(info.value)
    assert f"{custom_module}:{fn}" in str(info.value)


def test_custom_function_that_cannot_be_loaded(custom_module):
    with pytest.raises(TerminalError, match="no attribute"):
        sharder(strategy="custom", function=f"{custom_module}:nope")
    with pytest.raises(TerminalError, match="not callable"):
        sharder(strategy="custom", function=f"{custom_module}:not_callable")
    with pytest.raises(TerminalError, match="cannot be imported"):
        sharder(strategy="custom", function="dp_no_such_module_xyz:fn")


# -- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"strategy": "hash", "key": "k", "shards": 1000},
        {"strategy": "range", "key": "k", "boundaries": list(range(50))},
        {"strategy": "time", "key": "k", "every": "1h"},
        {"strategy": "custom", "function": "os.path:join"},
    ],
    ids=lambda kw: kw["strategy"],
)
def test_shard_ids_are_file_name_safe_and_unique(kw):
    s = sharder(**kw)
    codes = list(range(1000)) + [10**7, 2**40]
    if kw["strategy"] == "time":
        codes += [-1, -2, -999, -(10**7)]
    ids = [s.shard_id(c) for c in codes]
    assert len(set(ids)) == len(ids)
    assert all(SAFE_ID.fullmatch(i) for i in ids)
    assert s.shard_id(CATCH_ALL) == CATCH_ALL_ID and CATCH_ALL_ID not in ids
    # ids sort like their codes for the common range (the UI lists shards in id order)
    assert sorted(ids[:1000]) == ids[:1000]


def test_empty_table_gets_no_codes():
    s = sharder(strategy="hash", key="k", shards=4)
    assert s.assign(pa.table({"k": pa.array([], pa.int64())})).shape == (0,)
