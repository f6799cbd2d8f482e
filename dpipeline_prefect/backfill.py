"""Backfill: one run per run key over a time range, skipping keys that are already complete.

    dpipeline backfill pipeline.yaml --from 2026-11-01 --to 2026-11-30 --every 1D
    dpipeline backfill pipeline.yaml --from 2026-11-01 --to 2026-11-30 --every 1D \\
        --deployment run-pipeline/flights-clean-daily

Run keys are formatted the way a scheduled run of ``flows/pipeline_flow.py`` derives its own
from its scheduled time (``run_key_format``, default ``YYYY-MM-DD``; a deployment's own
``run_key_format`` parameter is used when it has one), so a backfilled day and the day's
scheduled run share checkpoints and output: whichever comes second resumes or does nothing.
Without a format, intervals shorter than a day, or range starts that are not midnight, give
``YYYY-MM-DDTHH:MM`` keys.

Which keys are complete is read from the checkpoint store (``checkpoint.list_runs``): a key
whose manifest says ``completed`` is skipped; any other key (never started, interrupted,
failed) runs, and a run of an interrupted key resumes from its checkpoints.

Without a deployment, the runs execute one after the other in this process, on one Dask
cluster started once for all of them (or the configured ``runner.address``). With a
deployment, every run is created through Prefect's ``run_deployment`` (parameters: the run key
and, when the deployment has no default for it, the pipeline file's path), so the work pool's
workers execute them under the deployment's concurrency limit; backfill then waits for each to
reach a final state.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

__all__ = ["BackfillItem", "parse_every", "parse_when", "run_keys", "completed_keys", "backfill"]

_EVERY_RE = re.compile(r"^\s*(\d+)\s*(W|D|H|M|MIN|S)\s*$", re.IGNORECASE)
_UNITS = {"W": timedelta(weeks=1), "D": timedelta(days=1), "H": timedelta(hours=1),
          "M": timedelta(minutes=1), "MIN": timedelta(minutes=1), "S": timedelta(seconds=1)}
# A backfill of more keys than this is almost certainly a typo (--every 1M for 1D...).
MAX_KEYS = 10_000


@dataclass
class BackfillItem:
    """What happened to one run key."""

    run_key: str
    action: str  # "skipped" (already complete) or "ran"
    status: str  # "already_complete", "completed", "failed", "crashed", "cancelled", ...
    rows_out: int | None = None
    duration_s: float | None = None
    flow_run: str | None = None  # flow run id (deployment path) or the run's flow_run_id
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def failed(self) -> bool:
        return self.status not in ("already_complete", "completed")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("summary")
        return d


def parse_every(every: str) -> timedelta:
    """``1D``, ``6H``, ``30M`` (or ``30min``), ``1W``, ``90S`` -> a positive timedelta."""
    m = _EVERY_RE.match(every or "")
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"--every {every!r} is not an interval: use a positive number and a unit "
                          "W, D, H, M (minutes) or S, e.g. 1D or 6H", field="every")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_when(value: str, option: str) -> datetime:
    """An ISO date or date-time (``2026-11-01``, ``2026-11-01T06:00``) as an aware UTC datetime.

    A value without a time zone is taken as UTC, like the keys of scheduled runs (Prefect
    schedules' ``scheduled_start_time`` is UTC unless the schedule names a time zone).
    """
    try:
        dt = datetime.fromisoformat(value.strip())
    except (ValueError, AttributeError):
        raise ConfigError(f"{option} {value!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM",
                          field=option.lstrip("-")) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _daily(start: datetime, step: timedelta) -> bool:
    return step % timedelta(days=1) == timedelta(0) and start.time() == datetime.min.time()


def run_keys(start: datetime, end: datetime, every: timedelta, fmt: str | None = None) -> list[str]:
    """The run keys from ``start`` to ``end`` inclusive, one per ``every``.

    ``fmt`` is a strftime format (a deployment's ``run_key_format``). Without it, whole-day
    steps from midnight give ``YYYY-MM-DD`` (the key a daily scheduled run of
    ``flows/pipeline_flow.py`` derives by default); anything finer gives ``YYYY-MM-DDTHH:MM``
    (``:SS`` added when the step has seconds).

    Raises:
        ConfigError: an empty range, too many keys, or a format that gives two points of the
            range the same key or an invalid key.
    """
    if end < start:
        raise ConfigError(f"--to {end.isoformat()} is before --from {start.isoformat()}", field="to")
    if every <= timedelta(0):
        raise ConfigError("--every must be positive", field="every")
    n = (end - start) // every + 1
    if n > MAX_KEYS:
        raise ConfigError(f"--from/--to/--every give {n:,} run keys (more than {MAX_KEYS:,}): "
                          "check the interval", field="every")
    if fmt:
        pass
    elif _daily(start, every):
        fmt = "%Y-%m-%d"
    elif every % timedelta(minutes=1) == timedelta(0) and start.second == 0:
        fmt = "%Y-%m-%dT%H:%M"
    else:
        fmt = "%Y-%m-%dT%H:%M:%S"
    keys = [(start + i * every).strftime(fmt) for i in range(n)]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"run key format {fmt!r} gives several points of the range the same "
                          f"key (e.g. {keys[0]!r}): use a finer format or a longer --every",
                          field="run_key_format")
    from .config import validate_run_key

    for k in keys:
        validate_run_key(k)
    return keys


def completed_keys(cfg) -> set[str]:
    """Run keys of ``cfg``'s pipeline whose checkpoint manifest says ``completed``."""
    from .checkpoint import list_runs
    from .crypto import cipher_for
    from .storage import Storage

    runs = list_runs(Storage(cfg.checkpoint.path, cfg.checkpoint.storage_options), cfg.name,
                     cipher=cipher_for(cfg.encryption))
    return {r.run_key for r in runs if r.status == "completed"}


def backfill(
    pipeline_path: str | Path,
    start: datetime | date | str,
    end: datetime | date | str,
    every: timedelta | str,
    *,
    deployment: str | None = None,
    run_key_format: str | None = None,
    on_item: Callable[[BackfillItem], None] | None = None,
    poll_s: float = 2.0,
) -> list[BackfillItem]:
    """Run the pipeline once per run key from ``start`` to ``end`` (inclusive), every ``every``.

    Keys already complete in the checkpoint store are skipped. A failing key is recorded
    (``status`` ``failed``, the error's first line in ``error``) and the others still run.

    Args:
        pipeline_path: the pipeline YAML file (read here to list completed keys; with a
            deployment it is also passed as ``pipeline_path`` if the deployment has no
            default for that parameter).
        start, end: first and last point of the range (dates, datetimes or ISO strings; UTC
            when naive).
        every: the step (``"1D"``, ``"6H"``... or a timedelta).
        deployment: ``flow-name/deployment-name`` to create the runs through; in-process
            runs without it.
        run_key_format: strftime format of the keys; default: the deployment's
            ``run_key_format`` parameter if it has one, else see :func:`run_keys`.
        on_item: called with each key's result as soon as it is known.
        poll_s: how often to poll the server for deployment runs' states.

    Returns:
        One :class:`BackfillItem` per run key, in key order.
    """
    from .config import load_config

    start_dt = parse_when(start, "--from") if isinstance(start, str) else _aware(start)
    end_dt = parse_when(end, "--to") if isinstance(end, str) else _aware(end)
    step = parse_every(every) if isinstance(every, str) else every
    cfg = load_config(pipeline_path)
    dep = _read_deployment(deployment) if deployment else None
    if dep is not None:
        _check_same_pipeline(cfg.name, dep, deployment)
    if run_key_format is None and dep is not None:
        run_key_format = (dep.parameters or {}).get("run_key_format")
    keys = run_keys(start_dt, end_dt, step, run_key_format)
    done = completed_keys(cfg)
    items: dict[str, BackfillItem] = {}
    todo: list[str] = []
    for k in keys:
        if k in done:
            items[k] = BackfillItem(k, "skipped", "already_complete")
            if on_item:
                on_item(items[k])
        else:
            todo.append(k)
    if todo:
        if deployment:
            results = _through_deployment(Path(pipeline_path), dep, deployment, todo, on_item, poll_s)
        else:
            results = _in_process(Path(pipeline_path), todo, on_item)
        items.update({r.run_key: r for r in results})
    return [items[k] for k in keys]


def _aware(v: datetime | date) -> datetime:
    if not isinstance(v, datetime):
        v = datetime(v.year, v.month, v.day)
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# ------------------------------------------------------------------------------ in-process


def _in_process(path: Path, keys: list[str], on_item) -> list[BackfillItem]:
    """Run each key as a flow run of this process; one Dask cluster serves all of them."""
    from contextlib import ExitStack

    from .pipeline import Pipeline, _flow_for, _make_importable, _run_tags, prefect_api

    p = Pipeline.from_yaml(path)
    _make_importable(p.base_dir)
    out: list[BackfillItem] = []
    with ExitStack() as stack:
        cluster = None
        if p.config.runner.kind == "dask" and not p.config.runner.address:
            from .cluster import EarlyCluster

            cluster = stack.enter_context(EarlyCluster(p.config.runner.workers,
                                                       p.config.runner.threads_per_worker))
        flow = _flow_for(p.config, cluster)
        stack.enter_context(prefect_api())
        stack.enter_context(_run_tags(p.config))  # as Pipeline.run tags its runs (alerts.py)
        for k in keys:
            t0 = time.perf_counter()
            try:
                s = flow(pipeline=p.config, run_key=k)
                item = BackfillItem(k, "ran", s["status"], s.get("rows_out"),
                                    round(time.perf_counter() - t0, 2), s.get("flow_run_id"), None, s)
            except Exception as e:  # noqa: BLE001 - recorded; the other keys still run
                item = BackfillItem(k, "ran", "failed", None, round(time.perf_counter() - t0, 2),
                                    None, _first_line(e))
            out.append(item)
            if on_item:
                on_item(item)
    return out


# ------------------------------------------------------------------------------ deployment


def _read_deployment(name: str):
    """The deployment ``FLOW/DEPLOYMENT`` from the server; it must take a ``run_key``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if "/" not in name:
        raise ConfigError(f"--deployment {name!r}: use FLOW_NAME/DEPLOYMENT_NAME "
                          "(as `prefect deployment ls` shows it)", field="deployment")
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"--deployment {name!r}: no such deployment on the Prefect server",
                              field="deployment") from None
    if "run_key" not in (dep.parameter_openapi_schema or {}).get("properties", {}):
        raise ConfigError(f"--deployment {name!r}: its flow takes no run_key parameter, so a "
                          "backfill cannot tell it which key to run", field="deployment")
    return dep


def _check_same_pipeline(name: str, dep, deployment: str) -> None:
    """Refuse a deployment whose default pipeline is another one than the file's.

    Completed keys are read from the file's checkpoint store: if the deployment ran another
    pipeline, keys would be skipped or run by mistake. The deployment's pipeline is known when
    it names a pipeline block, or a pipeline file that exists here too (a relative path is
    taken from the current folder, as a worker on this machine would); otherwise it is trusted.
    """
    defaults = dep.parameters or {}
    other: str | None = None
    where = ""
    try:
        if defaults.get("pipeline_block"):
            from .blocks import load_pipeline_block

            other = load_pipeline_block(defaults["pipeline_block"]).pipeline().name
            where = f"pipeline block {defaults['pipeline_block']!r}"
        elif defaults.get("pipeline_path") and Path(defaults["pipeline_path"]).is_file():
            from .config import load_config

            other = load_config(defaults["pipeline_path"]).name
            where = f"pipeline file {defaults['pipeline_path']!r}"
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - unreadable here (e.g. ${VAR}s unset): trust the user
        return
    if other is not None and other != name:
        raise ConfigError(
            f"--deployment {deployment!r} runs pipeline {other!r} ({where}), not {name!r} of the "
            "file given: backfill reads completed keys from the file's checkpoints, so both must "
            "be the same pipeline", field="deployment")


def _through_deployment(path: Path, dep, name: str, keys: list[str], on_item,
                        poll_s: float) -> list[BackfillItem]:
    """Create one flow run of deployment ``name`` per key, then wait for all of them."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    props = (dep.parameter_openapi_schema or {}).get("properties", {})
    defaults = dep.parameters or {}
    base: dict[str, Any] = {}
    # The deployment says which pipeline it runs (a file or a block); if it does not, the
    # file given to backfill is passed, as an absolute path (valid for a worker on this
    # machine or one that mounts the same path).
    if "pipeline_path" in props and not (defaults.get("pipeline_path") or defaults.get("pipeline_block")):
        base["pipeline_path"] = str(path.resolve())

    started: dict[str, tuple[Any, float]] = {}
    out: dict[str, BackfillItem] = {}
    for k in keys:
        try:
            fr = run_deployment(name, parameters={**base, "run_key": k}, timeout=0,
                                flow_run_name=f"backfill-{k}", tags=["backfill"],
                                as_subflow=False)
            started[k] = (fr.id, time.perf_counter())
        except Exception as e:  # noqa: BLE001 - recorded; the other keys still run
            out[k] = BackfillItem(k, "ran", "failed", error=f"could not create the run: {_first_line(e)}")
            if on_item:
                on_item(out[k])

    with get_client(sync_client=True) as client:
        while started:
            for k, (fid, t0) in list(started.items()):
                fr = client.read_flow_run(fid)
                if fr.state is None or not fr.state.is_final():
                    continue
                del started[k]
                status = "completed" if fr.state.is_completed() else fr.state.type.value.lower()
                item = BackfillItem(k, "ran", status, None, round(time.perf_counter() - t0, 2),
                                    str(fid), None if status == "completed" else
                                    (fr.state.message or fr.state.name))
                summary = _result(fr.state)
                if isinstance(summary, dict):
                    item.summary = summary
                    item.rows_out = summary.get("rows_out")
                    if summary.get("status") == "already_complete":
                        item.status = "already_complete"
                out[k] = item
                if on_item:
                    on_item(item)
            if started:
                time.sleep(poll_s)
    return [out[k] for k in keys]


def _result(state) -> Any:
    """The flow's return value if it was persisted where this process can read it."""
    try:
        return state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - results are optional (not persisted by default)
        return None
