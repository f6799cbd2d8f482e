"""Event-time windows and mergeable partial aggregates, vectorised with numpy / pandas.

Times are int64 nanoseconds since the epoch (UTC). Windows are half-open ``[start, end)``:

* **tumbling** (``size``): ``start = floor(t / size) * size``, epoch-aligned; one window per event.
* **sliding** (``size``, ``slide``): every ``start = k * slide`` with ``start <= t < start + size``;
  ``ceil(size / slide)`` windows per event at most.
* **session** (``gap``): per group key, events closer than ``gap`` to the previous one belong to
  the same session; a session covers ``[first event, last event + gap)``. Two sessions merge when
  one starts before the other ends (strictly): a pause of exactly ``gap`` ends a session.

A *partial* is one row per (window start, window end, group key) holding mergeable state, so
partials of different runs combine exactly into what one pass over all the events would give:

=========  ==========================  ==================
output     partial columns             merge
=========  ==========================  ==================
count      ``<col>__count``            sum
sum        ``<col>__sum``              sum
mean       ``<col>__sum``, ``__count``   sum, sum
min        ``<col>__min``              min (nulls skipped)
max        ``<col>__max``              max (nulls skipped)
=========  ==========================  ==================

``count`` counts non-null values and ``mean`` skips nulls, as pandas does. Sums, minima and
maxima are kept as float64 (integer columns included), counts as int64.

Column names used here: ``_ws`` / ``_we`` (window start / end, ns) in partials; the emitted
output has ``window_start`` / ``window_end`` (UTC timestamps), the key columns and one column
per aggregation named ``<col>_<agg>`` (``dep_delay_mean``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import WindowConfig, parse_duration
from .errors import ConfigError

__all__ = [
    "WindowSpec",
    "Aggregations",
    "assign_windows",
    "partials",
    "merge_partials",
    "sessionize",
    "finalize",
]

WS, WE = "_ws", "_we"


@dataclass(frozen=True)
class WindowSpec:
    """A window definition in nanoseconds (built from :class:`~dpipeline_prefect.config.WindowConfig`)."""

    kind: str
    size: int = 0
    slide: int = 0
    gap: int = 0

    @classmethod
    def from_config(cls, cfg: WindowConfig) -> "WindowSpec":
        def ns(v: str | None, name: str) -> int:
            return 0 if v is None else int(parse_duration(v, f"stream.window.{name}").value)

        return cls(cfg.kind, ns(cfg.size, "size"), ns(cfg.slide, "slide"), ns(cfg.gap, "gap"))


class Aggregations:
    """The configured aggregations and the partial columns they need."""

    def __init__(self, spec: Mapping[str, Sequence[str]]) -> None:
        self.spec = {c: list(dict.fromkeys(a)) for c, a in spec.items()}
        counts, sums, mins, maxs = [], [], [], []
        for col, aggs in self.spec.items():
            if "count" in aggs or "mean" in aggs:
                counts.append(col)
            if "sum" in aggs or "mean" in aggs:
                sums.append(col)
            if "min" in aggs:
                mins.append(col)
            if "max" in aggs:
                maxs.append(col)
        self.how: dict[str, str] = {}
        for c in counts:
            self.how[f"{c}__count"] = "sum"
        for c in sums:
            self.how[f"{c}__sum"] = "sum"
        for c in mins:
            self.how[f"{c}__min"] = "min"
        for c in maxs:
            self.how[f"{c}__max"] = "max"
        self._counts, self._sums, self._mins, self._maxs = counts, sums, mins, maxs

    @property
    def columns(self) -> list[str]:
        """Input columns the aggregations read."""
        return list(self.spec)

    @property
    def partial_columns(self) -> list[str]:
        return list(self.how)

    def output_columns(self) -> list[str]:
        return [f"{c}_{a}" for c, aggs in self.spec.items() for a in aggs]

    def row_partials(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Per-row partial values of ``df`` (each row is its own one-event partial)."""
        out: dict[str, np.ndarray] = {}
        for c in self._counts:
            out[f"{c}__count"] = df[c].notna().to_numpy(dtype=np.int64)
        for c in self._sums:
            out[f"{c}__sum"] = _numeric(df, c).fillna(0.0).to_numpy(dtype=np.float64)
        for c in self._mins:
            out[f"{c}__min"] = _numeric(df, c).to_numpy(dtype=np.float64)
        for c in self._maxs:
            out[f"{c}__max"] = _numeric(df, c).to_numpy(dtype=np.float64)
        return out


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    s = df[col]
    if s.dtype == bool:
        return s.astype("float64")
    if not pd.api.types.is_numeric_dtype(s.dtype):
        raise ConfigError(
            f"stream.aggregations.{col}: column {col!r} is {s.dtype}, not numeric; only count "
            "applies to it",
            field=f"stream.aggregations.{col}",
        )
    return s.astype("float64")


def assign_windows(t: np.ndarray, spec: WindowSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tumbling / sliding windows of each event time.

    Args:
        t: int64 event times (ns).
        spec: a tumbling or sliding window.

    Returns:
        ``(row, start, end)``: for every (event, window) pair, the event's position in ``t`` and
        the window's bounds. Pairs are ordered by event, then by window start.
    """
    t = np.asarray(t, dtype=np.int64)
    if spec.kind == "tumbling":
        start = np.floor_divide(t, spec.size) * spec.size
        return np.arange(len(t), dtype=np.int64), start, start + spec.size
    if spec.kind != "sliding":
        raise ValueError(f"assign_windows handles tumbling and sliding windows, not {spec.kind!r}")
    per = -(-spec.size // spec.slide)  # windows an event can fall in, at most
    last = np.floor_divide(t, spec.slide) * spec.slide  # the latest window start <= t
    rows, starts = [], []
    for j in range(per):
        s = last - j * spec.slide
        ok = t < s + spec.size
        rows.append(np.nonzero(ok)[0])
        starts.append(s[ok])
    row = np.concatenate(rows) if rows else np.empty(0, np.int64)
    start = np.concatenate(starts) if starts else np.empty(0, np.int64)
    order = np.lexsort((start, row))
    row, start = row[order].astype(np.int64), start[order]
    return row, start, start + spec.size


def partials(df: pd.DataFrame, row: np.ndarray, start: np.ndarray, end: np.ndarray,
             keys: Sequence[str], aggs: Aggregations) -> pd.DataFrame:
    """One partial row per (window, key) from (event, window) pairs; see :func:`assign_windows`."""
    values = aggs.row_partials(df)
    data = {WS: start, WE: end}
    for k in keys:
        data[k] = df[k].to_numpy()[row]
    for name, arr in values.items():
        data[name] = arr[row]
    return merge_partials(pd.DataFrame(data), keys, aggs)


def merge_partials(frame: pd.DataFrame, keys: Sequence[str], aggs: Aggregations,
                   extra: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Combine partial rows of the same (window, key) into one, sorted by window then key.

    ``extra`` adds columns with their merge function (e.g. ``{"_version": "max"}``).
    """
    how = {**aggs.how, **(extra or {})}
    if frame.empty:
        return frame.reindex(columns=[WS, WE, *keys, *how]).reset_index(drop=True)
    out = frame.groupby([WS, WE, *keys], dropna=False, sort=True, observed=True).agg(how)
    return out.reset_index()


def sessionize(frame: pd.DataFrame, keys: Sequence[str], aggs: Aggregations, gap: int,
               extra: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Merge session partials (open sessions and one-event sessions ``[t, t + gap)``) per key.

    Rows whose intervals overlap (the next starts strictly before the running end) become one
    session ``[min start, max end)``, their partials merged. Sorted by key, then start.
    """
    how = {**aggs.how, **(extra or {})}
    if frame.empty:
        return frame.reindex(columns=[WS, WE, *keys, *how]).reset_index(drop=True)
    f = frame.reset_index(drop=True)
    kid = (f.groupby(list(keys), dropna=False, sort=True, observed=True).ngroup().to_numpy()
           if keys else np.zeros(len(f), np.int64))
    order = np.lexsort((f[WE].to_numpy(), f[WS].to_numpy(), kid))
    f = f.iloc[order].reset_index(drop=True)
    kid = kid[order]
    ws = f[WS].to_numpy(np.int64)
    we = f[WE].to_numpy(np.int64)
    # running max of the ends before each row, within its key
    run_end = pd.Series(we).groupby(kid).cummax().to_numpy()
    prev_end = np.empty_like(run_end)
    prev_end[0] = np.iinfo(np.int64).min
    prev_end[1:] = run_end[:-1]
    first_of_key = np.ones(len(f), bool)
    first_of_key[1:] = kid[1:] != kid[:-1]
    new = first_of_key | (ws >= prev_end)
    sid = np.cumsum(new)
    agg = {WS: "min", WE: "max", **{k: "first" for k in keys}, **how}
    out = f.groupby(sid, sort=True).agg(agg)
    return out.reset_index(drop=True)


def finalize(frame: pd.DataFrame, keys: Sequence[str], aggs: Aggregations) -> pd.DataFrame:
    """Output rows from merged partials: window_start / window_end (UTC), keys, ``<col>_<agg>``."""
    out = pd.DataFrame({
        "window_start": pd.to_datetime(frame[WS].to_numpy(np.int64), utc=True),
        "window_end": pd.to_datetime(frame[WE].to_numpy(np.int64), utc=True),
    })
    for k in keys:
        out[k] = frame[k].to_numpy()
    for col, names in aggs.spec.items():
        for a in names:
            if a == "count":
                v = frame[f"{col}__count"].to_numpy(np.int64)
            elif a == "sum":
                v = frame[f"{col}__sum"].to_numpy(np.float64)
            elif a == "mean":
                n = frame[f"{col}__count"].to_numpy(np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    v = np.where(n > 0, frame[f"{col}__sum"].to_numpy(np.float64) / np.where(n > 0, n, 1), np.nan)
            else:
                v = frame[f"{col}__{a}"].to_numpy(np.float64)
            out[f"{col}_{a}"] = v
    return out
