"""Sharding strategies: which shard each row belongs to.

Pure logic, no I/O: tested without any server.

* ``files``  - one shard per input file; no regrouping.
* ``hash``   - a stable 64-bit hash of the key (pandas' ``hash_pandas_object``, the same in
               every process and run, unlike Python's ``hash()``) modulo ``shards``.
               Null keys all go to shard 0.
* ``range``  - n sorted boundaries make n+1 shards: (-inf, b0), [b0, b1), ..., [bn-1, +inf).
* ``time``   - fixed-width buckets of ``every`` on a timestamp key, aligned to ``start`` (or the
               Unix epoch); rows before ``start`` / at or after ``end`` are out of range.
* ``custom`` - a user function ``DataFrame -> sequence of non-negative ints``.

Keyed strategies return integer *codes*; :meth:`Sharder.shard_id` turns a code into a stable,
file-name-safe shard id, and :meth:`Sharder.label` into what the UI shows. A row that fits no
shard (a null range/time key, a time outside [start, end)) raises :class:`ShardingError` naming
the key and the value, unless ``catch_all`` sends it to the extra ``catchall`` shard.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import ShardingConfig
from .errors import ShardingError
from .transforms import load_function

__all__ = ["Sharder", "CATCH_ALL", "CATCH_ALL_ID"]

# The smallest int64: no real code can be it. Time codes count buckets from the Unix epoch
# when no start is set, so rows before 1970 have negative codes (-1 is the day before).
CATCH_ALL = int(np.iinfo(np.int64).min)
CATCH_ALL_ID = "catchall"


class Sharder:
    """Assigns rows of a keyed strategy to shard codes."""

    def __init__(self, cfg: ShardingConfig) -> None:
        if not cfg.keyed:
            raise ValueError("files sharding assigns no keys")
        self.cfg = cfg
        self.strategy = cfg.strategy
        if cfg.strategy == "time":
            self.every_ns = pd.Timedelta(cfg.every).value
            self.origin_ns = pd.Timestamp(cfg.start, tz="UTC").value if cfg.start else 0
            self.end_ns = pd.Timestamp(cfg.end, tz="UTC").value if cfg.end else None
            if cfg.start and pd.Timestamp(cfg.start).tzinfo is not None:
                self.origin_ns = pd.Timestamp(cfg.start).tz_convert("UTC").value
            if cfg.end and pd.Timestamp(cfg.end).tzinfo is not None:
                self.end_ns = pd.Timestamp(cfg.end).tz_convert("UTC").value
        if cfg.strategy == "custom":
            self.fn = load_function(cfg.function, "sharding function")

    # -- naming ------------------------------------------------------------------------------
    def shard_id(self, code: int) -> str:
        if code == CATCH_ALL:
            return CATCH_ALL_ID
        prefix = {"hash": "h", "range": "r", "time": "t", "custom": "c"}[self.strategy]
        code = int(code)
        if code < 0:  # time buckets before the epoch; '-' is not allowed in a shard id
            return f"{prefix}n{-code:06d}"
        return f"{prefix}{code:06d}"

    def label(self, code: int) -> str:
        if code == CATCH_ALL:
            return CATCH_ALL_ID
        if self.strategy == "time":
            ts = pd.Timestamp(self.origin_ns + int(code) * self.every_ns, tz="UTC")
            return ts.strftime("%Y-%m-%dT%H:%M")
        if self.strategy == "range":
            b = self.cfg.boundaries or []
            lo = "-inf" if code == 0 else b[code - 1]
            hi = "+inf" if code == len(b) else b[code]
            return f"[{lo}, {hi})"
        return f"{self.strategy}-{int(code)}"

    def expected_codes(self) -> list[int] | None:
        """Codes known before reading any data (hash and range); None when data decides."""
        if self.strategy == "hash":
            return list(range(self.cfg.shards or 8))
        if self.strategy == "range":
            return list(range(len(self.cfg.boundaries or []) + 1))
        return None

    # -- assignment --------------------------------------------------------------------------
    def _column(self, table: pa.Table | pa.RecordBatch) -> pa.Array:
        key = self.cfg.key
        idx = table.schema.get_field_index(key)
        if idx < 0:
            raise ShardingError(
                f"sharding key {key!r} is not a column of the input; columns are: "
                + ", ".join(table.schema.names),
                key=key,
            )
        col = table.column(idx)
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col

    def _out_of_range(self, mask: np.ndarray, values, what: str) -> None:
        if self.cfg.catch_all or not mask.any():
            return
        bad = values[int(np.argmax(mask))]
        raise ShardingError(
            f"sharding key {self.cfg.key!r}: value {bad!r} {what}; set sharding.catch_all: true "
            "to collect such rows in a 'catchall' shard",
            key=self.cfg.key,
            value=str(bad),
        )

    def assign(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        """Shard code per row (int64), CATCH_ALL for rows sent to the catch-all shard."""
        n = table.num_rows
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        s = self.strategy
        if s == "custom":
            df = table.to_pandas()
            try:
                codes = np.asarray(self.fn(df))
            except Exception as e:  # noqa: BLE001 - user code, reported with its name
                raise ShardingError(
                    f"sharding function {self.cfg.function!r} failed: {type(e).__name__}: {e}"
                ) from None
            if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
                raise ShardingError(
                    f"sharding function {self.cfg.function!r} must return one integer per row "
                    f"({n}); got shape {codes.shape} of {codes.dtype}"
                )
            if (codes < 0).any():
                raise ShardingError(
                    f"sharding function {self.cfg.function!r} returned a negative shard id "
                    f"{int(codes[codes < 0][0])}; ids must be >= 0"
                )
            return codes.astype(np.int64, copy=False)
        col = self._column(table)
        nulls = np.asarray(col.is_null(), dtype=bool) if col.null_count else np.zeros(n, dtype=bool)
        if s == "hash":
            # Hash the non-null values only: an Arrow int column with nulls becomes float64 in
            # pandas, and 5.0 hashes differently from 5, so one key would land in different
            # shards depending on whether its batch happened to contain a null.
            codes = np.zeros(n, dtype=np.int64)  # nulls -> shard 0
            valid = col.drop_null() if col.null_count else col
            if len(valid):
                h = pd.util.hash_pandas_object(valid.to_pandas(), index=False).to_numpy()
                codes[~nulls] = (h % np.uint64(self.cfg.shards)).astype(np.int64)
            return codes
        if s == "range":
            if nulls.any() and not self.cfg.catch_all:
                self._out_of_range(nulls, [None] * n, "is null and fits no range shard")
            b = self.cfg.boundaries or []
            # Compare non-null values only: a null (None in an object array) cannot be
            # compared with string boundaries, even when catch_all takes the row.
            valid = col.drop_null() if col.null_count else col
            codes = np.full(n, CATCH_ALL, dtype=np.int64)
            try:
                if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
                    # Boundaries written as dates ("2013-07-01") compare as instants, in UTC
                    # ns like the time strategy (naive values and boundaries read as UTC).
                    if not all(isinstance(x, str) for x in b):
                        raise TypeError("boundaries of a timestamp key must be dates")
                    bounds = np.array([_utc_ns(x) for x in b], dtype=np.int64)
                    tz = getattr(col.type, "tz", None)
                    values = valid.cast(pa.timestamp("ns", tz)).cast(pa.int64()).to_numpy()
                else:
                    bounds = np.asarray(b)
                    values = valid.to_numpy(zero_copy_only=False)
                codes[~nulls] = np.searchsorted(bounds, values, side="right")
            except (TypeError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ShardingError(
                    f"sharding key {self.cfg.key!r} of type {col.type} cannot be compared with "
                    f"boundaries {b!r}",
                    key=self.cfg.key,
                ) from None
            return codes
        # time
        if not (pa.types.is_timestamp(col.type) or pa.types.is_date(col.type)):
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                try:
                    parsed = pd.to_datetime(col.to_pandas(), utc=True)
                    col = pa.array(parsed, type=pa.timestamp("ns", "UTC"))
                except (ValueError, TypeError, pa.ArrowInvalid):
                    raise ShardingError(
                        f"sharding key {self.cfg.key!r} holds text that is not a timestamp",
                        key=self.cfg.key,
                    ) from None
            else:
                raise ShardingError(
                    f"sharding key {self.cfg.key!r} is {col.type}; strategy 'time' needs a timestamp "
                    "or date column",
                    key=self.cfg.key,
                )
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        ts = col.cast(pa.timestamp("ns", getattr(col.type, "tz", None)))
        ns = np.asarray(ts.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        codes = np.floor_divide(ns - self.origin_ns, self.every_ns).astype(np.int64)
        bad = nulls.copy()
        if self.cfg.start is not None:
            bad |= ns < self.origin_ns
        if self.end_ns is not None:
            bad |= ns >= self.end_ns
        if bad.any() and not self.cfg.catch_all:
            if nulls.any():
                self._out_of_range(nulls, [None] * n, "is null and fits no time shard")
            shown = pd.to_datetime(ns, utc=True)
            self._out_of_range(bad, shown, f"is outside [{self.cfg.start}, {self.cfg.end})")
        codes[bad] = CATCH_ALL
        return codes


def _utc_ns(value) -> int:
    """``value`` (a date or timestamp, naive read as UTC) as nanoseconds since the epoch."""
    ts = pd.Timestamp(value)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).value
