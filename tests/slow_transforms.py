"""A slow transform for tests that kill Dask workers while shards run.

``slow_clean`` is the flights example's ``clean`` plus a pause per batch, so shards are still
running when a test kills a worker. When ``DPIPELINE_TEST_MARKERS`` names a folder, each
batch leaves a file ``<pid>-<n>`` there first: the test sees which worker processes are busy.
Workers import it as ``tests.slow_transforms`` (the repository root is on their PYTHONPATH).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pandas as pd

from dpipeline_prefect.examples.flights import clean

_count = itertools.count()
PAUSE_S = float(os.environ.get("DPIPELINE_TEST_PAUSE_S", "0.4"))


def slow_clean(df: pd.DataFrame) -> pd.DataFrame:
    markers = os.environ.get("DPIPELINE_TEST_MARKERS")
    if markers:
        (Path(markers) / f"{os.getpid()}-{next(_count)}").touch()
    time.sleep(PAUSE_S)
    return clean(df)
