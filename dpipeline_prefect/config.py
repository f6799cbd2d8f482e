"""The pipeline definition: one validated pydantic model.

The same model backs the YAML file, the Python API (``Pipeline(...)``) and the Prefect
parameter form of the ``sharded-pipeline`` flow, so a field means the same thing everywhere.

``${VAR}`` in a string is read from the environment. In ``storage_options`` the reference is
kept as written and resolved only where a filesystem is opened (see ``storage.py``), so
credentials never travel in flow-run parameters, logs or fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = [
    "PipelineConfig",
    "SourceConfig",
    "ShardingConfig",
    "BatchingConfig",
    "SinkConfig",
    "CheckpointConfig",
    "RunnerConfig",
    "DeadLetterConfig",
    "RetryConfig",
    "LockConfig",
    "BreakerConfig",
    "LimitConfig",
    "TransformConfig",
    "MonitoringConfig",
    "WindowConfig",
    "StreamConfig",
    "parse_duration",
    "EncryptionConfig",
    "load_config",
    "parse_config",
    "validate_run_key",
    "parse_bytes",
    "redact",
]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
_RESOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=+-]{0,127}$")
_SECRET_WORDS = ("secret", "password", "token", "key", "credential", "session")
# In the sharding section "key" is a column name, not a credential: it must stay readable.
_SHARDING_SECRET_WORDS = tuple(w for w in _SECRET_WORDS if w != "key")
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3,
}


def parse_bytes(value: int | str) -> int:
    """Parse ``64MiB``, ``100MB``, ``1_000_000`` or an int into a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9_.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size; use bytes or a unit such as 64MiB or 500MB")
    return int(float(m.group(1).replace("_", "")) * _UNITS[m.group(2).lower()])


def expand_env(value: Any, where: str = "") -> Any:
    """Replace ``${VAR}`` in every string of ``value`` (recursively) from the environment."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"{where or 'config'}: environment variable {name} is not set",
                    field=where or None,
                    key=name,
                )
            return os.environ[name]

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _expand_except_storage(value: Any, where: str = "") -> Any:
    if isinstance(value, dict):
        return {
            k: (v if k == "storage_options" else _expand_except_storage(v, f"{where}.{k}" if where else k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand_except_storage(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return expand_env(value, where)


def redact(value: Any, _words: tuple[str, ...] = _SECRET_WORDS) -> Any:
    """A copy of ``value`` with secret-looking entries of dicts replaced by ``***``.

    ``${VAR}`` references are kept: they reveal nothing.
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            lk = str(k).lower()
            if isinstance(v, str) and any(w in lk for w in _words) and not _ENV_RE.fullmatch(v):
                out[k] = "***"
            else:
                out[k] = redact(v, _SHARDING_SECRET_WORDS if lk == "sharding" else _SECRET_WORDS)
        return out
    if isinstance(value, list):
        return [redact(v, _words) for v in value]
    return value


def validate_run_key(run_key: str) -> str:
    # fullmatch: with match(), '$' also matches before a trailing newline, letting "key\n" in
    if not isinstance(run_key, str) or not _RUN_KEY_RE.fullmatch(run_key) or ".." in run_key:
        raise ConfigError(
            f"run key {run_key!r} is not allowed: use 1-128 characters from letters, digits and "
            "_ . : = + -, starting with a letter or digit, without '..'",
            field="run_key",
        )
    return run_key


_BLOCK_FIELD_DESCRIPTION = (
    "Name of a dpipeline-storage Prefect block holding the endpoint and credentials (instead of "
    "inline storage_options); a relative path is joined to the block's base_url."
)


def _block_into_options(data: Any, section: str) -> Any:
    """``block: NAME`` of a storage section, also recorded as ``storage_options['block']``.

    The storage layer resolves the block where it opens the filesystem (``blocks.py``), so
    only the name travels in flow-run parameters.
    """
    if not isinstance(data, dict) or data.get("block") is None:
        return data
    name = data["block"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,99}", name):
        raise ValueError(
            f"{section}.block {name!r} is not a block name; use lowercase letters, digits and '-'"
        )
    options = data.get("storage_options")
    options = dict(options) if isinstance(options, dict) else {}
    if options.get("block", name) != name:
        raise ValueError(
            f"{section}.block {name!r} and {section}.storage_options.block "
            f"{options['block']!r} differ; give the block once"
        )
    options["block"] = name
    return {**data, "storage_options": options}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _tls_checked(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """storage_options: refuse a bad ``tls`` entry or a bare ``verify: false`` (see tls.py)."""
    from .tls import check_tls_options

    if v:
        try:
            check_tls_options(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
    return v


class SourceConfig(_Model):
    """Where the input is and how to read it."""

    format: Literal["parquet", "csv", "jsonl"] = "parquet"
    path: str = Field(description="A file, folder or glob; any fsspec URL or a local path.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    block: str | None = Field(None, description=_BLOCK_FIELD_DESCRIPTION)

    @model_validator(mode="before")
    @classmethod
    def _block(cls, data: Any) -> Any:
        return _block_into_options(data, "source")

    @field_validator("storage_options")
    @classmethod
    def _storage_tls(cls, v: Any) -> Any:
        return _tls_checked(v)


class ShardingConfig(_Model):
    """How input rows are split into shards; one Prefect task run per shard."""

    strategy: Literal["files", "hash", "range", "time", "custom"] = "files"
    key: str | None = Field(None, description="Column for hash, range and time.")
    shards: int | None = Field(None, ge=1, le=100_000, description="Number of hash shards (default 8).")
    boundaries: list[float | int | str] | None = Field(
        None, description="Range: n sorted boundaries make n+1 shards."
    )
    every: str | None = Field(None, description="Time: a fixed pandas frequency such as 1D, 6h, 15min.")
    start: str | None = Field(None, description="Time: first bucket start; earlier rows are out of range.")
    end: str | None = Field(None, description="Time: end (exclusive); later rows are out of range.")
    function: str | None = Field(None, description="Custom: module:function, DataFrame -> shard ids.")
    catch_all: bool = Field(
        False,
        description="Send rows with a null key or outside every range/time shard to one extra shard "
        "instead of failing.",
    )

    @model_validator(mode="after")
    def _check(self) -> "ShardingConfig":
        s = self.strategy
        if s in ("hash", "range", "time") and not self.key:
            raise ValueError(f"sharding.key is required for strategy {s!r}")
        if s == "hash" and self.shards is None:
            self.shards = 8
        if s == "range":
            if not self.boundaries:
                raise ValueError("sharding.boundaries is required for strategy 'range'")
            try:
                ordered = all(a < b for a, b in zip(self.boundaries, self.boundaries[1:]))
            except TypeError:
                raise ValueError("sharding.boundaries must all be of one type") from None
            if not ordered:
                raise ValueError("sharding.boundaries must be strictly increasing")
        if s == "time":
            if not self.every:
                raise ValueError("sharding.every is required for strategy 'time' (e.g. 1D, 6h)")
            import pandas as pd

            try:
                td = pd.Timedelta(self.every)
            except (ValueError, TypeError):
                raise ValueError(
                    f"sharding.every {self.every!r} is not a fixed frequency; use e.g. 1D, 6h, 15min"
                ) from None
            if td <= pd.Timedelta(0):
                raise ValueError("sharding.every must be positive")
            for name in ("start", "end"):
                v = getattr(self, name)
                if v is not None:
                    try:
                        pd.Timestamp(v)
                    except (ValueError, TypeError):
                        raise ValueError(f"sharding.{name} {v!r} is not a timestamp") from None
        if s == "custom" and not self.function:
            raise ValueError("sharding.function is required for strategy 'custom' (module:function)")
        return self

    @property
    def keyed(self) -> bool:
        """True when rows must be regrouped (one shuffle pass) before shards run."""
        return self.strategy != "files"


class BatchingConfig(_Model):
    """How a shard's rows are cut into batches; each batch is written and checkpointed once."""

    rows: int = Field(100_000, ge=1, description="Rows per batch.")
    max_bytes: int = Field(64 * 1024**2, ge=1024, description="A batch never exceeds this in memory.")

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int:
        return parse_bytes(v)


class SinkConfig(_Model):
    """Where the output goes. ``path`` may contain ``{run_key}``."""

    format: Literal["parquet", "csv", "jsonl"] = "parquet"
    path: str
    partition_by: list[str] = Field(default_factory=list)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    block: str | None = Field(None, description=_BLOCK_FIELD_DESCRIPTION)

    @model_validator(mode="before")
    @classmethod
    def _block(cls, data: Any) -> Any:
        return _block_into_options(data, "sink")

    @field_validator("storage_options")
    @classmethod
    def _storage_tls(cls, v: Any) -> Any:
        return _tls_checked(v)

    def resolved_path(self, run_key: str) -> str:
        return self.path.replace("{run_key}", run_key)


class CheckpointConfig(_Model):
    """Where per-shard progress (and shuffle staging data) is kept."""

    path: str = "./.dpipeline/checkpoints/"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    block: str | None = Field(None, description=_BLOCK_FIELD_DESCRIPTION)
    per_batch: bool = Field(
        True,
        description="Save progress after every batch (a crashed shard resumes after its last batch). "
        "False saves only when a shard finishes: a crashed shard is redone from its start.",
    )

    @field_validator("storage_options")
    @classmethod
    def _storage_tls(cls, v: Any) -> Any:
        return _tls_checked(v)

    @model_validator(mode="before")
    @classmethod
    def _block(cls, data: Any) -> Any:
        return _block_into_options(data, "checkpoint")


class DeadLetterConfig(_Model):
    """Where rows that a transform or the sink rejects go, and how many a shard may reject.

    Present (even empty, ``dead_letter: {}``) turns row isolation on; absent keeps the strict
    default: a terminal error fails the shard. Off by default because isolation assumes
    row-independent transforms (see ``dead_letter.py``) and because a run that completes
    with rows missing from its output must be something the user asked for.
    """

    path: str | None = Field(
        None,
        description="Folder of dead-letter files; may contain {run_key}. Default: "
        "<checkpoint.path>/<pipeline>.dead_letter/<run_key>/ (beside the run's checkpoints, "
        "outside what `checkpoints gc` deletes). Without {run_key}, <pipeline>/<run_key>/ is appended.",
    )
    storage_options: dict[str, Any] | None = Field(
        None, description="Default: checkpoint.storage_options when path is unset, else {}."
    )
    block: str | None = Field(None, description=_BLOCK_FIELD_DESCRIPTION)

    @field_validator("storage_options")
    @classmethod
    def _storage_tls(cls, v: Any) -> Any:
        return _tls_checked(v)

    @model_validator(mode="before")
    @classmethod
    def _block(cls, data: Any) -> Any:
        return _block_into_options(data, "dead_letter")

    max_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="A shard whose rejected rows pass this fraction of its rows fails instead of "
        "draining into the queue.",
    )
    keep_columns: list[str] | None = Field(
        None,
        description="Keep only these source columns of a rejected row (plus hash_columns and the "
        "_dlq_* columns). Redacted queues cannot be replayed.",
    )
    hash_columns: list[str] = Field(
        default_factory=list,
        description="Store these columns as the hex sha256 of their value instead of the value "
        "(lets you match rows without keeping them). Redacted queues cannot be replayed.",
    )

    @property
    def redacts(self) -> bool:
        """True when dead rows are stored incomplete (keep_columns or hash_columns)."""
        return self.keep_columns is not None or bool(self.hash_columns)


class EncryptionConfig(_Model):
    """Client-side AES-256-GCM encryption of checkpoints and dead-letter files (``crypto.py``).

    Give exactly one key source. The key itself never appears in the pipeline definition.
    """

    key_env: str | None = Field(
        None, description="Environment variable holding the 256-bit key (base64 or 64 hex digits)."
    )
    key_secret_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the key (base64 or 64 hex digits)."
    )

    @model_validator(mode="after")
    def _check(self) -> "EncryptionConfig":
        if (self.key_env is None) == (self.key_secret_block is None):
            raise ValueError("give exactly one of encryption.key_env or encryption.key_secret_block")
        if self.key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.key_env):
            raise ValueError(f"encryption.key_env {self.key_env!r} is not an environment variable name")
        return self


class RetryConfig(_Model):
    """How transient failures (network, timeouts, S3 5xx/SlowDown, a lost worker) are retried.

    Applies twice, with the same schedule: to each sink write inside a shard (so a flaky sink
    does not restart a shard from its beginning) and, through Prefect's task options, to a
    whole shard or shuffle task. Terminal errors are never retried.
    """

    max_attempts: int = Field(4, ge=1, le=50, description="Attempts in all, the first included.")
    base_delay_s: float = Field(1.0, ge=0.0, le=3600.0, description="Delay before the first retry.")
    max_delay_s: float = Field(30.0, ge=0.0, le=3600.0, description="No delay exceeds this, jitter included.")
    multiplier: float = Field(2.0, ge=1.0, le=10.0, description="Each delay is the previous one times this.")
    jitter: float = Field(0.2, ge=0.0, le=1.0, description="Delays vary randomly by up to this fraction.")

    @model_validator(mode="after")
    def _check(self) -> "RetryConfig":
        if self.max_delay_s < self.base_delay_s:
            raise ValueError("retry.max_delay_s must be at least retry.base_delay_s")
        return self


class LoggingConfig(_Model):
    """The level of the pipeline's own loggers (``dpipeline_prefect.*``), changeable mid-run."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = Field(
        None, description="Level at the start of a run; default: as the process configured it.")
    poll_s: float = Field(
        5.0, ge=0.1, description="How often (at most) a running process reads the live level "
        "set by `dpipeline loglevel` (Prefect Variable dpipeline-log-level-<name>).")


class LockConfig(_Model):
    """Only one run of a pipeline and run key at a time (a Prefect global concurrency limit).

    A run killed while holding the lock does not block the next one for longer than
    ``lease_s`` (Prefect expires its lease), and at once when the holder was a process on
    this machine that no longer exists (see ``locks.py``).
    """

    enabled: bool = Field(True, description="False runs without the lock (you guarantee one run at a time).")
    wait_s: float | None = Field(
        0.0, ge=0.0,
        description="How long a second run waits for the lock: 0 exits at once with an error naming "
        "the holder; null waits as long as it takes.",
    )
    lease_s: float = Field(
        60.0, ge=60.0, le=86400.0,
        description="Lease of the lock on the Prefect server, renewed while the run lives; a killed "
        "holder's lease expires after this (the server's minimum is 60 s).",
    )
    poll_s: float = Field(1.0, gt=0.0, le=60.0, description="How often a waiting run tries again.")


class BreakerConfig(_Model):
    """Circuit breaker for the sink and for named resources (see ``breaker.py``).

    The window is time-based: rates are taken over the calls of the last ``window_s``
    seconds, so the time a breaker needs to notice trouble does not depend on how fast
    batches go. Every worker process keeps its own window; the open/closed state is shared
    by all shards of a run through a small object in the checkpoint storage, read at most
    every ``sync_s`` (so every worker stops calling within ``sync_s`` of an opening).
    """

    enabled: bool = Field(True, description="False calls the sink without a breaker.")
    failure_rate: float = Field(
        0.5, gt=0.0, le=1.0, description="Open when this fraction of the window's calls failed (transient errors)."
    )
    slow_call_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="Open when this fraction of the window's calls took slow_call_s or longer."
    )
    slow_call_s: float = Field(60.0, gt=0.0, description="A call this long or longer counts as slow.")
    window_s: float = Field(10.0, gt=0.0, le=3600.0, description="Sliding window, in seconds.")
    min_calls: int = Field(10, ge=1, description="No rate is judged on fewer calls than this in the window.")
    open_s: float = Field(5.0, ge=0.0, le=3600.0, description="How long an open breaker fails fast before trial calls.")
    half_open_calls: int = Field(2, ge=1, description="Successful trial calls (per worker) that close the breaker.")
    sync_s: float = Field(
        1.0, gt=0.0, le=60.0, description="Read the shared state at most this often per worker process."
    )
    degraded_concurrency: int = Field(
        1, ge=1,
        description="While a breaker is open or half-open, at most this many shards write to it at once "
        "(a Prefect global concurrency limit); the limit is lifted when it closes.",
    )

    @model_validator(mode="after")
    def _check(self) -> "BreakerConfig":
        if self.sync_s > self.window_s:
            raise ValueError("breaker.sync_s must not exceed breaker.window_s")
        return self


class LimitConfig(_Model):
    """Concurrency and rate limit of the sink or of a named resource (see ``limits.py``).

    Enforced with Prefect global concurrency limits named per pipeline and resource (not per
    run key), so they hold across Dask workers *and* across concurrent runs of the pipeline.
    """

    concurrency: int | None = Field(
        None, ge=1, le=1_000_000, description="At most this many calls at once (null: no cap)."
    )
    rate_per_s: float | None = Field(
        None, gt=0.0, le=100_000.0,
        description="Calls start at most this many times per second, evenly spaced (null: no cap).",
    )

    @model_validator(mode="after")
    def _check(self) -> "LimitConfig":
        if self.concurrency is None and self.rate_per_s is None:
            raise ValueError("set concurrency, rate_per_s or both (an empty limit limits nothing)")
        return self


class TransformConfig(_Model):
    """A transform with options; a plain ``module:function`` string is the same with defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    function: str = Field(description="module:function import path.")
    optional: bool = Field(
        False, description="Skip this transform for a batch when it raises or times out, instead of failing."
    )
    timeout_s: float | None = Field(
        None, gt=0.0, description="A call taking longer counts as a failure (skipped if optional)."
    )

    def __str__(self) -> str:
        return self.function


class MonitoringConfig(_Model):
    """What a run reports about itself besides its summary (see ``metrics.py``, ``events.py``).

    None of these change the output, so they are not part of the checkpoint fingerprints.
    """

    metrics: bool = Field(
        True,
        description="Collect per-batch metrics (rows, bytes, latency, worker RSS/CPU), keep them beside "
        "the run's checkpoints (for `dpipeline report`) and show them as Prefect artifacts.",
    )
    prometheus_port: int | None = Field(
        None, ge=0, le=65535,
        description="Serve the run's metrics for all workers at http://<flow host>:<port>/metrics while "
        "it runs (0: any free port, logged).",
    )
    prometheus_addr: str = Field("127.0.0.1", description="Address the /metrics server listens on.")
    prometheus_linger_s: float = Field(
        0.0, ge=0.0, le=3600.0,
        description="Keep serving /metrics this long after the run ends, so that a scraper sees "
        "the final figures of a run shorter than its scrape interval.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: dpipeline log lines on the console as one JSON object per line."
    )
    dead_letter_alert_rows: int | None = Field(
        None, ge=1,
        description="When the run's dead-lettered rows reach this many, emit one "
        "dpipeline.rows.dead_letter_threshold event (for an alert).",
    )


class RunnerConfig(_Model):
    """Where shards execute."""

    kind: Literal["dask", "threads"] = "dask"
    workers: int | None = Field(None, ge=1, description="Local Dask cluster size; default: CPU cores.")
    threads_per_worker: int = Field(1, ge=1)
    address: str | None = Field(None, description="tcp://host:8786 to use an existing Dask cluster.")


def parse_duration(value: Any, field: str) -> "Any":
    """``2h``, ``15min``, ``30s``, ``1D`` (a fixed pandas Timedelta) -> ``pd.Timedelta``.

    Raises ValueError naming ``field`` when the value is not a fixed, non-negative duration.
    """
    import pandas as pd

    if isinstance(value, bool) or value is None:
        raise ValueError(f"{field} must be a duration such as 2h, 15min or 30s, got {value!r}")
    try:
        td = pd.Timedelta(value) if not isinstance(value, (int, float)) else pd.Timedelta(seconds=value)
    except (ValueError, TypeError):
        raise ValueError(f"{field} {value!r} is not a duration; use e.g. 2h, 15min, 30s, 1D") from None
    if td < pd.Timedelta(0):
        raise ValueError(f"{field} must not be negative, got {value!r}")
    return td


class WindowConfig(_Model):
    """Event-time windows: tumbling (size), sliding (size, slide) or session (gap)."""

    kind: Literal["tumbling", "sliding", "session"] = "tumbling"
    size: str | None = Field(None, description="Tumbling and sliding: window length, e.g. 1h.")
    slide: str | None = Field(None, description="Sliding: distance between window starts, e.g. 15min.")
    gap: str | None = Field(None, description="Session: a pause this long or longer ends a session.")

    @model_validator(mode="after")
    def _check(self) -> "WindowConfig":
        need = {"tumbling": ("size",), "sliding": ("size", "slide"), "session": ("gap",)}[self.kind]
        for name in ("size", "slide", "gap"):
            value = getattr(self, name)
            if name in need:
                if value is None:
                    raise ValueError(f"stream.window.{name} is required for kind {self.kind!r}")
                if parse_duration(value, f"stream.window.{name}").value <= 0:
                    raise ValueError(f"stream.window.{name} must be positive, got {value!r}")
            elif value is not None:
                raise ValueError(f"stream.window.{name} does not apply to kind {self.kind!r}")
        if self.kind == "sliding":
            size = parse_duration(self.size, "stream.window.size")
            slide = parse_duration(self.slide, "stream.window.slide")
            if slide > size:
                raise ValueError("stream.window.slide must not exceed stream.window.size (windows would leave gaps)")
            if (size.value // slide.value) > 1000:
                raise ValueError("stream.window: size / slide must be at most 1000 windows per event")
        return self


_AGGREGATIONS = ("count", "sum", "min", "max", "mean")


class StreamConfig(_Model):
    """Incremental, event-time processing (see ``stream.py``): each run reads only new input
    files, aggregates them into windows whose state lives in the checkpoint store, and emits a
    window once, when the watermark (max event time seen - ``watermark_delay``) passes its end."""

    event_time: str = Field(description="Timestamp column (naive timestamps are read as UTC).")
    watermark_delay: str = Field("0s", description="How late an event may be and still count, e.g. 2h.")
    window: WindowConfig
    key: list[str] = Field(default_factory=list, description="Group key columns within a window.")
    aggregations: dict[str, list[Literal["count", "sum", "min", "max", "mean"]]] = Field(
        description="column -> aggregations among count, sum, min, max, mean.")
    late: Literal["dead_letter", "drop_with_count", "update"] = Field(
        "dead_letter",
        description="Events for windows already emitted: dead_letter (to the dead-letter store), "
        "drop_with_count, or update (re-emit the window with _version + 1).",
    )
    update_ttl: str = Field(
        "1D",
        description="late: update keeps an emitted window's state this long past the watermark; "
        "later events for it are dropped and counted as expired.",
    )
    incremental: Literal["files", "event_time"] = Field(
        "files",
        description="files: each run reads the source files no earlier run consumed. event_time "
        "(Parquet only): each run reads the rows whose event time is past the last run's mark, "
        "from every file (row groups skipped by their statistics); rows that arrive with an event "
        "time at or before the mark are never read.",
    )
    max_file_age: str | None = Field(
        None,
        description="Forget consumed input files whose mtime is this much older than the newest "
        "consumed one (bounds the file list); files older than that are ignored. Null: remember all.",
    )

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        parse_duration(self.watermark_delay, "stream.watermark_delay")
        parse_duration(self.update_ttl, "stream.update_ttl")
        if self.max_file_age is not None:
            parse_duration(self.max_file_age, "stream.max_file_age")
        if not self.aggregations:
            raise ValueError("stream.aggregations must name at least one column, e.g. {dep_delay: [mean]}")
        for col, aggs in self.aggregations.items():
            if not aggs:
                raise ValueError(f"stream.aggregations.{col}: list at least one of {', '.join(_AGGREGATIONS)}")
        if len(set(self.key)) != len(self.key):
            raise ValueError("stream.key lists a column twice")
        if self.event_time in self.key:
            raise ValueError(f"stream.key: the event time column {self.event_time!r} cannot be a group key")
        if self.window.kind == "session" and self.late == "update":
            raise ValueError(
                "stream.late: update is not supported for session windows (a late event can join "
                "sessions that were already emitted); use dead_letter or drop_with_count")
        return self


class PipelineConfig(_Model):
    """A whole pipeline: source -> sharding -> batching -> transforms -> sink, with checkpoints."""

    name: str
    source: SourceConfig
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    transforms: list[str | TransformConfig] = Field(
        default_factory=list,
        description="module:function import paths, or {function, optional, timeout_s} mappings.",
    )
    sink: SinkConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    lock: LockConfig = Field(default_factory=LockConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    dead_letter: DeadLetterConfig | None = Field(
        None, description="Isolate rejected rows into a dead-letter store (off when absent)."
    )
    encryption: EncryptionConfig | None = Field(
        None, description="Encrypt checkpoints and dead-letter files client-side (off when absent)."
    )
    limits: dict[str, LimitConfig] = Field(
        default_factory=dict,
        description="Concurrency / rate limits: 'sink' for sink writes, any other name for "
        "calls wrapped with limits.limited(name).",
    )
    monitoring: MonitoringConfig = Field(
        default_factory=MonitoringConfig,
        description="Metrics, Prometheus endpoint, log format, dead-letter alert threshold.",
    )
    stream: StreamConfig | None = Field(
        None, description="Incremental event-time processing (windows, watermark, late data); "
        "absent: a batch pipeline.",
    )

    @model_validator(mode="after")
    def _stream_fits(self) -> "PipelineConfig":
        if self.stream is None:
            return self
        if "{run_key}" in self.sink.path:
            raise ValueError(
                "sink.path: a stream pipeline's output and state belong to the pipeline, not to a "
                "run key; remove {run_key} from the path")
        if self.sharding.strategy != "files":
            raise ValueError("sharding: a stream pipeline runs each increment as one task; remove the "
                             "sharding section")
        if self.stream.incremental == "event_time" and self.source.format != "parquet":
            raise ValueError(
                "stream.incremental: event_time needs a source that can filter rows by time "
                "(format: parquet); use incremental: files for csv and jsonl")
        return self
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v) or len(v) > 100:
            raise ValueError("name must match [a-z0-9_-]+ (at most 100 characters)")
        return v

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict[str, LimitConfig]) -> dict[str, LimitConfig]:
        for name in v:
            if not _RESOURCE_RE.fullmatch(name):
                raise ValueError(
                    f"limit name {name!r} must be 1-100 characters from letters, digits and _ . -, "
                    "starting with a letter or digit"
                )
        return v

    @field_validator("transforms")
    @classmethod
    def _transforms(cls, v: list[str | TransformConfig]) -> list[str | TransformConfig]:
        for t in v:
            path = t if isinstance(t, str) else t.function
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", path):
                raise ValueError(f"transform {path!r} must be an import path module:function")
        return v

    def transform_specs(self) -> list[TransformConfig]:
        """Every transform as a :class:`TransformConfig` (plain strings get the defaults)."""
        return [TransformConfig(function=t) if isinstance(t, str) else t for t in self.transforms]

    def fingerprints(self) -> dict[str, str]:
        """Content hashes of the parts whose change invalidates existing checkpoints.

        Storage options (credentials) are left out on purpose: rotating a key must not
        invalidate a run.
        """
        parts = {
            "source": {"format": self.source.format, "path": self.source.path},
            "sharding": self.sharding.model_dump(mode="json"),
            # A plain entry hashes as its path, as before mappings existed; optional ones add
            # the flag (a skipped transform changes the output). timeout_s is an operating
            # knob: changing it does not invalidate a run.
            "transforms": [
                t.function if not t.optional else {"function": t.function, "optional": True}
                for t in self.transform_specs()
            ],
            "sink": {
                "format": self.sink.format,
                "path": self.sink.path,
                "partition_by": list(self.sink.partition_by),
            },
        }
        if self.stream is not None:  # only when set: batch pipelines keep their fingerprints
            parts["stream"] = self.stream.model_dump(mode="json", exclude={"max_file_age", "update_ttl"})
        return {
            k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in parts.items()
        }


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation such as ``X | None`` or ``list[str | X]``."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            model: type[BaseModel] = PipelineConfig
            for part in e["loc"][:-1]:
                field = model.model_fields.get(str(part))
                if field is None:
                    continue  # a list index or a union member's tag
                found = _models_in(field.annotation)
                if found:
                    model = next((m for m in found if m.__name__ in map(str, e["loc"])), found[0])
            allowed = ", ".join(model.model_fields)
            msg = f"unknown field; allowed here: {allowed}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return f"{origin}: invalid pipeline definition\n  " + "\n  ".join(lines)


def parse_config(data: dict[str, Any], origin: str = "pipeline") -> PipelineConfig:
    """Validate a mapping into a :class:`PipelineConfig`, raising one clear :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    data = _expand_except_storage(data)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise ConfigError(
            _format_validation_error(e, origin), field=".".join(map(str, first)) or None
        ) from None


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and validate a pipeline YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"pipeline file {str(p)!r} does not exist", path=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}", path=str(p)) from None
    return parse_config(data, origin=str(p))
