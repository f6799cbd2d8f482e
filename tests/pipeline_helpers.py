"""Helpers for end-to-end pipeline tests: small real datasets, a CLI runner, output checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import yaml

from dpipeline_prefect.examples.flights import clean, load_flights

FLIGHTS = None


def flights(n: int | None = None) -> pd.DataFrame:
    global FLIGHTS
    if FLIGHTS is None:
        FLIGHTS = load_flights()
    df = FLIGHTS if n is None else FLIGHTS.iloc[:n]
    df = df.copy()
    df.insert(0, "row_id", range(len(df)))
    df["row_id"] = df["row_id"].astype("int64")
    return df


def write_parquet_files(df: pd.DataFrame, folder: Path, files: int, row_group_size: int = 5000) -> list[str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(np.array_split(np.arange(len(df)), files)):
        p = folder / f"part-{i:03d}.parquet"
        pq.write_table(pa.Table.from_pandas(df.iloc[idx], preserve_index=False), p, row_group_size=row_group_size)
        paths.append(str(p))
    return paths


def reference(df: pd.DataFrame) -> pd.DataFrame:
    return clean(df).sort_values("row_id").reset_index(drop=True)


def read_output(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    df = pd.read_parquet(path, storage_options=storage_options or None)
    for c in df.columns:
        if isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(str)
    return df.sort_values("row_id").reset_index(drop=True)


def assert_exactly_once(out_path: str, want: pd.DataFrame, storage_options: dict | None = None,
                        duckdb_check: bool = True) -> pd.DataFrame:
    """The output holds every reference row exactly once, with the same values."""
    got = read_output(out_path, storage_options)
    assert got["row_id"].is_unique, f"duplicated rows: {got['row_id'][got['row_id'].duplicated()].head().tolist()}"
    missing = set(want["row_id"]) - set(got["row_id"])
    extra = set(got["row_id"]) - set(want["row_id"])
    assert not missing and not extra, f"missing {len(missing)} rows, unexpected {len(extra)} rows"
    cols = [c for c in want.columns if c in got.columns]
    pd.testing.assert_frame_equal(
        got[cols].reset_index(drop=True), want[cols].reset_index(drop=True),
        check_dtype=False, check_categorical=False,
    )
    if duckdb_check and not str(out_path).startswith(("s3://", "memory://")):
        n, d = duckdb.sql(
            f"select count(*), count(distinct row_id) from read_parquet('{out_path.rstrip('/')}/**/*.parquet')"
        ).fetchall()[0]
        assert n == d == len(want), (n, d, len(want))
    return got


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            new_session: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dpipeline_prefect.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
        start_new_session=new_session,
    )


def load_summary(path: Path) -> dict:
    return json.loads(Path(path).read_text())
