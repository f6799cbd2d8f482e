"""Dask worker preload: import what a shard task needs while the worker starts.

Imported by each worker of a cluster started by ``cluster.EarlyCluster``, so the first shard
does not pay for importing Prefect's task engine, pandas and pyarrow.
"""

import fsspec  # noqa: F401
import pandas  # noqa: F401
import prefect.task_engine  # noqa: F401
import pyarrow.parquet  # noqa: F401

import dpipeline_prefect.runner  # noqa: F401
import dpipeline_prefect.shard  # noqa: F401
import dpipeline_prefect.tracing

# OTLP export from the OTEL_* environment before the first task, so Prefect's task-run
# spans in this worker are recorded too (a no-op when tracing is not configured).
dpipeline_prefect.tracing.configure()
