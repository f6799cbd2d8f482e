"""Window assignment and partial aggregates against plain pandas computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpipeline_prefect.config import WindowConfig
from dpipeline_prefect.windows import (
    WE, WS, Aggregations, WindowSpec, assign_windows, finalize, merge_partials, partials, sessionize,
)

from .pipeline_helpers import flights

H = 3600 * 10**9
AGGS = {"dep_delay": ["mean", "max", "count", "min"], "distance": ["sum"]}


def _ns(s: pd.Series) -> np.ndarray:
    return s.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").view(np.int64)


def _ref(exploded: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    g = exploded.groupby(["window_start", "window_end", *keys], dropna=False, sort=True)
    out = g.agg(dep_delay_mean=("dep_delay", "mean"), dep_delay_max=("dep_delay", "max"),
                dep_delay_count=("dep_delay", "count"), dep_delay_min=("dep_delay", "min"),
                distance_sum=("distance", "sum")).reset_index()
    return out


def _compare(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> None:
    cols = ["window_start", "window_end", *keys, "dep_delay_mean", "dep_delay_max", "dep_delay_count",
            "dep_delay_min", "distance_sum"]
    got = got[cols].sort_values(cols[: 2 + len(keys)]).reset_index(drop=True)
    want = want[cols].sort_values(cols[: 2 + len(keys)]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-9)


def test_tumbling_in_pieces_equals_one_groupby():
    df = flights(30_000)
    aggs, keys = Aggregations(AGGS), ["origin"]
    spec = WindowSpec.from_config(WindowConfig(kind="tumbling", size="1h"))
    pieces = []
    for idx in np.array_split(np.random.default_rng(1).permutation(len(df)), 7):
        part = df.iloc[idx].reset_index(drop=True)
        row, ws, we = assign_windows(_ns(part["time_hour"]), spec)
        pieces.append(partials(part, row, ws, we, keys, aggs))
    got = finalize(merge_partials(pd.concat(pieces, ignore_index=True), keys, aggs), keys, aggs)
    ref = df.assign(window_start=df["time_hour"].dt.floor("1h"))
    ref["window_end"] = ref["window_start"] + pd.Timedelta("1h")
    _compare(got, _ref(ref, keys), keys)


def test_sliding_windows_equal_exploded_groupby():
    df = flights(8_000)
    aggs, keys = Aggregations(AGGS), ["origin", "carrier"]
    spec = WindowSpec.from_config(WindowConfig(kind="sliding", size="3h", slide="1h"))
    t = _ns(df["time_hour"])
    row, ws, we = assign_windows(t, spec)
    assert len(row) == 3 * len(df)  # whole-hour times: each falls in exactly size/slide windows
    got = finalize(partials(df, row, ws, we, keys, aggs), keys, aggs)
    # reference: every window [s, s+3h) with s on the hour containing t, by explicit offsets
    parts = []
    for k in range(3):
        start = df["time_hour"].dt.floor("1h") - pd.Timedelta(hours=k)
        parts.append(df.assign(window_start=start, window_end=start + pd.Timedelta("3h")))
    _compare(got, _ref(pd.concat(parts), keys), keys)


def test_sliding_with_uneven_slide_keeps_only_covering_windows():
    spec = WindowSpec("sliding", size=int(2.5 * H), slide=H)
    t = np.array([0, int(0.5 * H), int(1.7 * H)], dtype=np.int64)
    row, ws, we = assign_windows(t, spec)
    pairs = sorted(zip(row.tolist(), ws.tolist()))
    want = sorted((i, s) for i, x in enumerate(t.tolist()) for s in range(-5 * H, 5 * H, H) if s <= x < s + spec.size)
    assert pairs == want
    assert (we - ws == spec.size).all()


def _ref_sessions(df: pd.DataFrame, keys: list[str], gap: pd.Timedelta) -> pd.DataFrame:
    rows = []
    for kv, g in df.sort_values("time_hour").groupby(keys, dropna=False, sort=True):
        g = g.sort_values("time_hour", kind="stable")
        new = g["time_hour"].diff() >= gap
        sid = new.cumsum()
        for _, s in g.groupby(sid):
            rows.append({**dict(zip(keys, kv if isinstance(kv, tuple) else (kv,))),
                         "window_start": s["time_hour"].min(), "window_end": s["time_hour"].max() + gap,
                         "dep_delay_mean": s["dep_delay"].mean(), "dep_delay_max": s["dep_delay"].max(),
                         "dep_delay_count": s["dep_delay"].count(), "dep_delay_min": s["dep_delay"].min(),
                         "distance_sum": s["distance"].sum()})
    return pd.DataFrame(rows)


def test_sessions_merged_in_pieces_equal_one_pass():
    # a thin stream with real pauses: one carrier's flights out of one airport
    df = flights(60_000)
    df = df[(df["origin"] == "EWR") & df["carrier"].isin(["AA", "US"])].reset_index(drop=True)
    aggs, keys, gap = Aggregations(AGGS), ["carrier"], pd.Timedelta("2h")
    rp = aggs.row_partials(df)
    t = _ns(df["time_hour"])
    ev = pd.DataFrame({WS: t, WE: t + gap.value, "carrier": df["carrier"].to_numpy(), **rp})
    state = ev.iloc[:0]
    for idx in np.array_split(np.random.default_rng(3).permutation(len(ev)), 5):  # any arrival order
        state = sessionize(pd.concat([state, ev.iloc[idx]], ignore_index=True), keys, aggs, gap.value)
    got = finalize(state, keys, aggs)
    want = _ref_sessions(df, keys, gap)
    assert len(got) == len(want) > 20
    _compare(got, want, keys)


def test_session_pause_of_exactly_gap_starts_a_new_session():
    aggs = Aggregations({"v": ["sum", "count"]})
    t = np.array([0, H, 3 * H], dtype=np.int64)  # gap 2h: 0 and 1h together; 3h - 1h = 2h -> new
    ev = pd.DataFrame({WS: t, WE: t + 2 * H, "v__count": [1, 1, 1], "v__sum": [1.0, 2.0, 4.0]})
    out = sessionize(ev, [], aggs, 2 * H)
    assert out[WS].tolist() == [0, 3 * H] and out[WE].tolist() == [3 * H, 5 * H]
    assert out["v__sum"].tolist() == [3.0, 4.0]


def test_null_values_follow_pandas_count_and_mean():
    aggs = Aggregations({"x": ["count", "mean", "min"]})
    df = pd.DataFrame({"x": [1.0, None, 3.0, None], "k": ["a", "a", "a", "b"]})
    p = partials(df, np.arange(4), np.zeros(4, np.int64), np.ones(4, np.int64), ["k"], aggs)
    out = finalize(p, ["k"], aggs).set_index("k")
    assert out.loc["a", "x_count"] == 2 and out.loc["a", "x_mean"] == 2.0 and out.loc["a", "x_min"] == 1.0
    assert out.loc["b", "x_count"] == 0 and np.isnan(out.loc["b", "x_mean"]) and np.isnan(out.loc["b", "x_min"])


@pytest.mark.parametrize("bad, msg", [
    ({"kind": "tumbling"}, "stream.window.size is required"),
    ({"kind": "sliding", "size": "1h"}, "stream.window.slide is required"),
    ({"kind": "sliding", "size": "1h", "slide": "2h"}, "must not exceed"),
    ({"kind": "session", "gap": "soon"}, "stream.window.gap 'soon' is not a duration"),
    ({"kind": "tumbling", "size": "1h", "gap": "1h"}, "stream.window.gap does not apply"),
])
def test_window_config_errors_name_the_field(bad, msg):
    with pytest.raises(ValueError, match=msg):
        WindowConfig(**bad)
