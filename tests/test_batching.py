"""Batching: every batch within ``rows`` and ``max_bytes``, nothing lost, reordered or doubled.

Sizes are measured on the produced batches themselves (``table.nbytes``, Arrow's count of
the buffer ranges a table references), on inputs built to defeat a per-chunk average:
rows of very different widths within one chunk, in either order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dpipeline_prefect.batching import batches


def run(table: pa.Table, rows: int, max_bytes: int, chunk: int | None = None, start: int = 0):
    chunks = table.to_batches(max_chunksize=chunk) if chunk else table.to_batches()
    return list(batches(chunks, rows, max_bytes, table.schema, start_offset=start))


def check_invariants(table: pa.Table, out, rows: int, max_bytes: int, start: int = 0) -> None:
    offset = start
    for b in out:
        assert b.offset == offset, "offsets must be contiguous"
        assert 1 <= b.num_rows <= rows
        assert b.table.schema == table.schema
        if b.num_rows > 1:
            assert b.table.nbytes <= max_bytes, (b.offset, b.num_rows, b.table.nbytes)
        offset += b.num_rows
    assert offset - start == table.num_rows
    if out:
        got = pa.concat_tables([b.table for b in out])
        assert got.equals(table), "all rows, in order"


def skewed(n_small: int, n_big: int, big_width: int, big_first: bool, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    small = [f"s{i}" for i in range(n_small)]
    big = ["x" * int(big_width * rng.uniform(0.5, 1.5)) for _ in range(n_big)]
    values = big + small if big_first else small + big
    return pa.table({"id": np.arange(len(values)), "s": values})


@pytest.mark.parametrize("big_first", [True, False], ids=["big-first", "small-first"])
def test_rows_of_uneven_width_never_exceed_max_bytes(big_first):
    t = skewed(900, 100, 1000, big_first)
    out = run(t, rows=10_000, max_bytes=20_000)
    check_invariants(t, out, 10_000, 20_000)


@pytest.mark.parametrize("seed", range(6))
def test_random_inputs_and_chunkings(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    widths = rng.choice([0, 1, 5, 50, 2000], size=n, p=[0.1, 0.4, 0.3, 0.15, 0.05])
    t = pa.table(
        {
            "id": np.arange(n),
            "v": rng.normal(size=n),
            "s": pa.array(["y" * int(w) if rng.random() > 0.05 else None for w in widths]),
        }
    )
    rows = int(rng.integers(1, 700))
    max_bytes = int(rng.integers(1024, 60_000))
    chunk = int(rng.integers(1, 1200))
    start = int(rng.integers(0, 10**6))
    out = run(t, rows, max_bytes, chunk=chunk, start=start)
    check_invariants(t, out, rows, max_bytes, start)


def test_fixed_width_rows_fill_batches_exactly():
    # int64 without nulls: 8 bytes a row, so a batch holds min(rows, max_bytes // 8) rows
    n = 10_000
    t = pa.table({"a": np.arange(n, dtype=np.int64)})
    for rows, max_bytes, chunk in [(1000, 64 * 1024, 333), (5000, 4096, 777), (10**6, 4000, None)]:
        out = run(t, rows, max_bytes, chunk=chunk)
        per = min(rows, max_bytes // 8)
        assert [b.num_rows for b in out] == [per] * (n // per) + ([n % per] if n % per else [])
        check_invariants(t, out, rows, max_bytes)


def test_rows_limit_alone():
    t = pa.table({"a": np.arange(1001)})
    out = run(t, rows=100, max_bytes=1 << 30, chunk=37)
    assert [b.num_rows for b in out] == [100] * 10 + [1]
    check_invariants(t, out, 100, 1 << 30)


def test_single_row_larger_than_max_bytes_still_moves():
    t = pa.table({"id": [0, 1, 2, 3], "s": ["a", "z" * 50_000, "b", "z" * 70_000]})
    out = run(t, rows=100, max_bytes=4096)
    check_invariants(t, out, 100, 4096)
    sizes = {b.table.column("id")[0].as_py(): b.num_rows for b in out}
    assert sizes[1] == 1 and sizes[3] == 1  # the huge rows travel alone


def test_deterministic_for_same_input():
    t = skewed(3000, 300, 700, big_first=False, seed=3)
    a = run(t, 500, 30_000, chunk=256)
    b = run(t, 500, 30_000, chunk=256)
    assert [(x.offset, x.num_rows) for x in a] == [(x.offset, x.num_rows) for x in b]
    assert all(x.table.equals(y.table) for x, y in zip(a, b))


def test_empty_input_and_empty_chunks():
    schema = pa.schema([("a", pa.int64())])
    assert list(batches([], 10, 4096, schema)) == []
    empty = pa.record_batch([pa.array([], pa.int64())], schema=schema)
    full = pa.record_batch([pa.array([1, 2, 3])], schema=schema)
    out = list(batches([empty, full, empty], 10, 4096, schema, start_offset=7))
    assert [(b.offset, b.num_rows) for b in out] == [(7, 3)]
