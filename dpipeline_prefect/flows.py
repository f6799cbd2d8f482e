"""Prefect glue: the ``sharded-pipeline`` flow and its tasks. Thin on purpose.

plan (in the flow) -> [keyed strategies: one ``shuffle`` task per input file] ->
one ``shard`` task per shard on the task runner (Dask by default) -> finalize (in the flow).

The flow is an ordinary Prefect flow: it can be deployed, scheduled, run from the UI, or
called inside a user's own ``@flow`` as a subflow (``pipeline.run_pipeline``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import as_completed
from prefect.runtime import task_run as prefect_task_run

from . import degrade, limits, loglevel, logs, progress, tracing
from .audit import audited
from .checkpoint import CheckpointStore
from .config import PipelineConfig, validate_run_key
from .crypto import cipher_for
from .faults import crashpoint
from .locks import RunLock
from .monitor import RunMonitor
from .retry import RetryPolicy, prefect_task_options, retry_condition
from .errors import ConfigError, DPipelineError, PipelineChangedError, TerminalError
from .sharding import Sharder
from .shard import RunContext, ShardResult, ShardSpec, process_shard
from .shuffle import run_map, stage_seal
from .sinks import Sink
from .sources import InputFile, plan_source, schema_from_b64, schema_to_b64
from .storage import Storage, cached_storage, join
from .transforms import load_function, load_transforms

__all__ = ["sharded_pipeline", "execute"]

_emit = progress.emit


# Prefect retry_condition_fn: retry only transient errors (retry.is_transient). The decorator
# defaults below are replaced per run by the pipeline's retry section (_task_options).
_retry_transient = retry_condition


def _task_options(cfg: PipelineConfig) -> dict[str, Any]:
    """Prefect task options from ``cfg.retry``: retries, exponential delays, jitter, condition."""
    return prefect_task_options(RetryPolicy.from_config(cfg.retry))


@task(name="shuffle", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 4],
      retry_condition_fn=_retry_transient, task_run_name="shuffle-{split}")
def shuffle_task(ctx: RunContext, split: int, file: dict) -> dict:
    cfg = ctx.cfg
    source = cached_storage(cfg.source.path, cfg.source.storage_options, "source")
    work = cached_storage(ctx.work_url, cfg.checkpoint.storage_options, "checkpoint")
    ckpt = cached_storage(cfg.checkpoint.path, cfg.checkpoint.storage_options, "checkpoint")
    res = run_map(split, InputFile.from_dict(file), source, cfg.source.format,
                  schema_from_b64(ctx.schema_b64), Sharder(cfg.sharding), work,
                  seal=stage_seal(cfg, ctx.run_key))
    doc = {"done": True, "outputs": res.outputs, "sizes": res.sizes, "labels": res.labels,
           "rows_in": res.rows_in,
           "bytes_read": res.bytes_read}
    CheckpointStore(ckpt, cfg.name, ctx.run_key, cipher=cipher_for(cfg.encryption)).save_shard(
        f"m{split:05d}", doc)
    return {**doc, "split": split}


@task(name="stream-increment", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 4],
      retry_condition_fn=_retry_transient)
def stream_task(cfg: PipelineConfig, run_key: str, restart: bool) -> dict:
    """One increment of a stream pipeline (``stream.py``); a retry redoes the same increment."""
    from .stream import run_increment

    return run_increment(cfg, run_key, restart)


@task(name="shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 4],
      retry_condition_fn=_retry_transient, task_run_name="shard-{spec.label}")
def shard_task(ctx: RunContext, spec: ShardSpec) -> dict:
    res = asdict(process_shard(ctx, spec))
    # Prefect re-ran this task after transient failures: count those retries too.
    res["retries"] += max(0, int(prefect_task_run.run_count or 1) - 1)
    return res


def _check_storage_fits_runner(cfg: PipelineConfig) -> None:
    """memory:// lives inside one process: Dask worker processes would each see their own."""
    if cfg.runner.kind != "dask":
        return
    for field, url in (("source.path", cfg.source.path), ("sink.path", cfg.sink.path),
                       ("checkpoint.path", cfg.checkpoint.path)):
        if url.startswith("memory://"):
            raise ConfigError(
                f"{field} {url!r} is in-process memory, which Dask worker processes do not share; "
                "use runner.kind: threads with memory://, or a local path or s3:// URL",
                field=field,
            )


def _check_existing_cluster() -> None:
    """With ``runner.address``, check the cluster's workers now, before anything is planned
    or written (``runner.check_workers``); the runner would otherwise check at the first
    submit. A cluster the run started itself is not checked (its runner says so)."""
    runner = _task_runner()
    if getattr(runner, "address", None) and getattr(runner, "check_workers", False) is True:
        runner.client  # noqa: B018 - connecting checks the workers (FastDaskTaskRunner.client)


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _files_shards(files: list[dict], source: Storage) -> list[ShardSpec]:
    return [
        ShardSpec(f"f{i:05d}", f["path"].rsplit("/", 1)[-1], False, [f], f.get("rows"))
        for i, f in enumerate(files)
    ]


def execute(cfg: PipelineConfig, run_key: str = "default", restart: bool = False) -> dict[str, Any]:
    """Plan, shard, run and finalize one run of ``cfg``; must be called inside a flow run.

    The whole run - including ``--restart``'s deletions and the "already complete" check - holds
    the run lock of (pipeline, run key): a second run waits ``lock.wait_s`` or stops with
    :class:`~dpipeline_prefect.errors.RunLockedError` (see ``locks.py``).
    """
    validate_run_key(run_key)
    logs.configure(cfg.monitoring.log_format)
    tracing.configure()
    loglevel.poll(cfg)  # the live log level in the flow process too (again as shards finish)
    # The run's span: a child of Prefect's flow-run span when its telemetry is on; shards
    # join it through RunContext.trace (tracing.py).
    with logs.log_context(pipeline=cfg.name, run_key=run_key), \
            tracing.span("dpipeline.run", {"dpipeline.pipeline": cfg.name, "dpipeline.run_key": run_key,
                                           "dpipeline.restart": restart, "prefect.flow_run.id": _flow_run_id(),
                                           "process.pid": os.getpid()}) as sp:
        summary = _monitored(cfg, run_key, restart)
        if sp is not None:
            sp.set_attributes({"dpipeline.status": summary.get("status", ""),
                               "dpipeline.rows_in": int(summary.get("rows_in") or 0),
                               "dpipeline.rows_out": int(summary.get("rows_out") or 0),
                               "dpipeline.shards": int(summary.get("shards_total") or 0)})
        return summary


def _monitored(cfg: PipelineConfig, run_key: str, restart: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    mon = RunMonitor(cfg, run_key, _flow_run_id()).open()
    try:
        if cfg.stream is None:
            _check_storage_fits_runner(cfg)
            _check_existing_cluster()
        if cfg.stream is not None:  # one increment of a stream pipeline (stream.py)
            summary = _execute_stream(cfg, run_key, restart)
        elif not cfg.lock.enabled:
            summary = {**_execute(cfg, run_key, restart, mon), "lock_waited_s": None}
        else:
            lock = RunLock(cfg.name, run_key, wait_s=cfg.lock.wait_s, lease_s=cfg.lock.lease_s,
                           poll_s=cfg.lock.poll_s, flow_run_id=_flow_run_id())
            with lock:
                if lock.waited_s or lock.freed:
                    logs.run_logger(cfg.name, run_key).info("run lock %s taken after %.1f s%s", lock.name, lock.waited_s,
                                          "".join(f"; {f}" for f in lock.freed))
                summary = _execute(cfg, run_key, restart, mon)
            summary["lock_waited_s"] = lock.waited_s
    except BaseException as e:
        mon.failed(e, time.perf_counter() - t0)  # dpipeline.run.failed
        raise
    finally:
        mon.close()
    if cfg.stream is not None:
        # an increment has its own artifact (_stream_artifact); the batch metrics record, shard
        # table and progress artifact do not apply to it, the completion event does
        from .events import RUN_COMPLETED

        mon.emit(RUN_COMPLETED, {k: summary.get(k) for k in _STREAM_EVENT_KEYS if k in summary})
        return summary
    mon.completed(summary)  # dpipeline.run.completed (+ dpipeline.degraded)
    return summary


_STREAM_EVENT_KEYS = ("status", "mode", "seq", "resumed", "files_new", "rows_in", "rows_out", "windows_emitted",
                      "windows_reemitted", "windows_open", "rows_late", "late_rule", "rows_dead_letter",
                      "rows_late_dropped", "late_expired", "rows_no_event_time", "watermark",
                      "max_event_time", "state_bytes", "bytes_written", "duration_s")


def _execute_stream(cfg: PipelineConfig, run_key: str, restart: bool) -> dict[str, Any]:
    """A stream pipeline's run: one ``stream-increment`` task under the pipeline's stream lock.

    The state belongs to the pipeline, not to a run key, so the lock is taken for the run key
    ``stream`` whatever ``run_key`` labels this run: two increments never overlap.
    """
    from .stream import STREAM_RUN_KEY

    t0 = time.perf_counter()
    task_ = stream_task.with_options(**_task_options(cfg))
    if not cfg.lock.enabled:
        summary = task_(cfg, run_key, restart)
        summary["lock_waited_s"] = None
    else:
        lock = RunLock(cfg.name, STREAM_RUN_KEY, wait_s=cfg.lock.wait_s, lease_s=cfg.lock.lease_s,
                       poll_s=cfg.lock.poll_s, flow_run_id=_flow_run_id())
        with lock:
            summary = task_(cfg, run_key, restart)
        summary["lock_waited_s"] = lock.waited_s
    summary["flow_run_id"] = _flow_run_id()
    summary["duration_s"] = round(time.perf_counter() - t0, 3)
    _stream_artifact(cfg, summary)
    get_run_logger().info(
        "stream %s increment %s: %s, %d window(s) emitted, %d late row(s), watermark %s",
        cfg.name, summary.get("seq"), summary["status"], summary.get("windows_emitted", 0),
        summary.get("rows_late", 0), summary.get("watermark"))
    return summary


def _stream_artifact(cfg: PipelineConfig, summary: dict[str, Any]) -> None:
    """A markdown artifact ``dpipeline-<name>-stream`` on the flow run: what the increment did."""
    from prefect.artifacts import create_markdown_artifact

    from .artifacts import artifact_key

    rows = [("increment", summary.get("seq")), ("status", summary.get("status")),
            ("resumed an interrupted increment", summary.get("resumed")),
            ("new files", summary.get("files_new")), ("rows in", summary.get("rows_in")),
            ("windows emitted", summary.get("windows_emitted")),
            ("windows re-emitted (late: update)", summary.get("windows_reemitted")),
            ("windows still open", summary.get("windows_open")),
            (f"late rows ({summary.get('late_rule')})", summary.get("rows_late")),
            ("late rows dead-lettered", summary.get("rows_dead_letter")),
            ("rows without event time", summary.get("rows_no_event_time")),
            ("watermark", summary.get("watermark")), ("max event time", summary.get("max_event_time")),
            ("state object bytes", summary.get("state_bytes")), ("seconds", summary.get("duration_s"))]
    md = (f"### {cfg.name}: stream increment {summary.get('seq')}\n\n| | |\n|---|---|\n"
          + "".join(f"| {k} | {v} |\n" for k, v in rows if v is not None))
    try:
        create_markdown_artifact(md, key=artifact_key(cfg.name, "stream"),
                                 description=f"{cfg.name}: the latest stream increment")
    except Exception as exc:  # noqa: BLE001 - an artifact must not fail the increment
        get_run_logger().warning("could not create the stream artifact: %s", exc)


def _execute(cfg: PipelineConfig, run_key: str, restart: bool, mon: RunMonitor) -> dict[str, Any]:
    logger = logs.run_logger(cfg.name, run_key)
    t0 = time.perf_counter()
    started = time.time()  # breaker transitions from this moment on are this run's (degrade.py)
    ckpt_storage = Storage(cfg.checkpoint.path, cfg.checkpoint.storage_options, role="checkpoint")
    store = CheckpointStore(ckpt_storage, cfg.name, run_key, cipher=cipher_for(cfg.encryption))
    sink = Sink(cfg.sink, run_key)
    work_url = join(cfg.checkpoint.path, cfg.name, run_key, "work")
    fingerprints = cfg.fingerprints()
    flow_run_id = _flow_run_id()
    summary: dict[str, Any] = {
        "pipeline": cfg.name, "run_key": run_key, "status": "running", "rows_in": 0, "rows_out": 0,
        "rows_dead_letter": 0, "shards_total": 0, "shards_skipped": 0, "batches_reprocessed": 0, "retries": 0, "bytes_read": 0,
        "bytes_written": 0, "duration_s": 0.0, "rows_per_s": 0.0, "flow_run_id": flow_run_id,
        "sink": sink.storage.url,
        # degradation (degrade.py): breaker transitions and what they cost, skipped transforms
        "breaker_openings": 0, "breaker_closings": 0, "breaker_rejections": 0,
        "degraded_slot_waits": 0, "transforms_skipped": {}, "degraded": [],
        # concurrency / rate limits (limits.py): seconds shards spent getting slots, per resource
        "limit_wait_s": 0.0, "limits": {},
    }

    if restart:
        marker = sink.read_marker()
        if marker and marker.get("pipeline") != cfg.name:
            raise TerminalError(
                f"--restart refused: sink {sink.storage.url} holds output of another pipeline "
                f"({marker.get('pipeline')!r})", path=sink.storage.url)
        # Audited (audit.py): who discarded this run key's checkpoints and output, and whether
        # it worked; recorded as attempted before anything is deleted.
        with audited("restart", cfg.name, run_key, {"sink": sink.storage.url,
                                                    "checkpoint": cfg.checkpoint.path}) as rec:
            store.delete_run()
            removed = sink.clear()
            rec.details["output_files_removed"] = removed
            if cfg.dead_letter is not None:  # its rows come back when the run redoes every batch
                from .dead_letter import DeadLetterStore

                DeadLetterStore(cfg, run_key).clear()
                rec.details["dead_letters_cleared"] = True
        logger.info("restart: removed checkpoints of run key %r and %d output file(s)", run_key, removed)

    manifest = store.load_manifest()
    if manifest is not None:
        changed = _changed(manifest.get("fingerprints", {}), fingerprints)
        if changed:
            raise PipelineChangedError(
                f"pipeline {cfg.name!r} changed since run key {run_key!r} was started "
                f"({', '.join(changed)} differ from its checkpoints); run with --restart to discard "
                "them and start over, or use another --run-key",
                changed=changed,
            )
        if manifest.get("status") == "completed":
            logger.info("run key %r of %s already completed: nothing to do", run_key, cfg.name)
            done = dict(manifest.get("summary") or {})
            mon.started(shards_total=done.get("shards_total", 0), shards_done=done.get("shards_total", 0),
                        rows_total=done.get("rows_in", 0), rows_done=done.get("rows_in", 0),
                        restart=restart)
            done.update(status="already_complete", shards_skipped=done.get("shards_total", 0),
                        duration_s=time.perf_counter() - t0, rows_per_s=0.0, bytes_read=0,
                        batches_reprocessed=0, retries=0, flow_run_id=flow_run_id,
                        breaker_openings=0, breaker_closings=0, breaker_rejections=0,
                        degraded_slot_waits=0, transforms_skipped={}, degraded=[],
                        limit_wait_s=0.0, limits={})
            return done
    else:
        load_transforms(cfg.transforms)  # fail now, before anything is written, if one is missing
        if cfg.sharding.strategy == "custom":
            load_function(cfg.sharding.function, "sharding function")
        plan = plan_source(cfg.source)
        sink.claim(cfg.name)
        manifest = {
            "status": "planned",
            "fingerprints": fingerprints,
            "strategy": cfg.sharding.strategy,
            "schema": schema_to_b64(plan.schema),
            "files": [f.to_dict() for f in plan.files],
            "shards": None,
            "created": time.time(),
        }
        store.save_manifest(manifest)
        crashpoint("planned")
        logger.info("planned %d input file(s), %d bytes", len(plan.files), plan.bytes_total)

    ctx = RunContext(cfg, run_key, manifest["schema"], work_url, tracing.carrier())
    files = manifest["files"]
    bytes_read = 0
    docs = store.load_shards()

    if manifest.get("shards") is None:
        if cfg.sharding.keyed:
            bytes_read += _shuffle(ctx, files, docs, logger)
            docs = store.load_shards()
            shards = _keyed_shards(ctx, files, docs)
        else:
            shards = _files_shards(files, ckpt_storage)
        manifest = {**manifest, "status": "sharded", "shards": [s.to_dict() for s in shards]}
        store.save_manifest(manifest)
    shards = [ShardSpec.from_dict(s) for s in manifest["shards"]]
    summary["shards_total"] = len(shards)

    results: list[ShardResult] = []
    todo = []
    for s in shards:
        d = docs.get(s.id)
        if d and d.get("done"):
            results.append(ShardResult(s.id, s.label, skipped=True, rows_in=d["rows_in"],
                                       rows_out=d["rows_out"], batches=d["next_seq"],
                                       rows_dead_letter=int(d.get("rows_dead_letter", 0))))
        else:
            todo.append(s)
    summary["shards_skipped"] = len(results)
    _emit("start", {"shards_total": len(shards), "shards_done": len(results),
                    "rows_total": sum(s.rows or 0 for s in shards),
                    "rows_done": sum(r.rows_in for r in results)})
    mon.started(shards_total=len(shards), shards_done=len(results),
                rows_total=sum(s.rows or 0 for s in shards), rows_done=sum(r.rows_in for r in results),
                restart=restart)
    mon.skipped(results)
    if results:
        logger.info("%d of %d shard(s) already complete: skipped", len(results), len(shards))

    # Limits live on the Prefect server, shared by every run of this pipeline: create the
    # missing ones and apply changed values before any shard takes a slot (no API call when
    # none is configured).
    limits_set = limits.ensure_limits(cfg) if todo else {}
    errors: list[tuple[str, BaseException]] = []
    unsubscribe = progress.subscribe(_task_runner(), f"{cfg.name}/{run_key}")
    shard = shard_task.with_options(**_task_options(cfg))
    futures = {shard.submit(ctx, s): s for s in todo}
    for fut in as_completed(list(futures)):
        spec = futures.pop(fut)
        try:
            r = ShardResult(**fut.result())
        except BaseException as e:  # noqa: BLE001 - collected, the first one is raised below
            errors.append((spec.label, e))
            _emit("shard_failed", {"shard": spec.label, "error": str(e)})
            mon.shard_failed(spec.id, spec.label, e)
            continue
        results.append(r)
        _emit("shard_done", asdict(r))
        mon.shard_completed(r)
        loglevel.poll(cfg)
        del fut  # release the Dask future: a dead worker must not recompute finished shards
    unsubscribe()
    if errors:
        label, err = errors[0]
        more = f" (and {len(errors) - 1} other shard(s))" if len(errors) > 1 else ""
        if isinstance(err, DPipelineError):
            msg = str(err) if str(err).startswith(f"shard {label} ") else f"shard {label}: {err}"
            raise type(err)(f"{msg}{more}", **err.details)
        raise err

    # Finalize: idempotent, so a crash here is finished by the next run.
    crashpoint("finalize")
    sink.remove_temporaries()
    work = Storage(work_url, cfg.checkpoint.storage_options)
    work.rm(work.root, recursive=True)  # the shuffle's staged files
    summary.update(
        status="completed",
        rows_in=sum(r.rows_in for r in results),
        rows_out=sum(r.rows_out for r in results),
        rows_dead_letter=sum(r.rows_dead_letter for r in results),
        batches_reprocessed=sum(r.batches_reprocessed for r in results),
        retries=sum(r.retries for r in results),
        bytes_read=bytes_read + sum(r.bytes_read for r in results),
        # input read by this run (shuffle splits, or shards of the files strategy) vs staged data
        bytes_read_source=bytes_read + (0 if cfg.sharding.keyed else sum(r.bytes_read for r in results)),
        bytes_read_staged=sum(r.bytes_read for r in results) if cfg.sharding.keyed else 0,
        bytes_written=sum(r.bytes_written for r in results),
    )
    summary.update(_degradation(cfg, run_key, started, results, logger))
    summary.update(_limits_summary(cfg, results, limits_set))
    rows_now = sum(r.rows_in_now for r in results)
    summary["duration_s"] = round(time.perf_counter() - t0, 3)
    summary["rows_per_s"] = round(rows_now / summary["duration_s"], 1) if summary["duration_s"] else 0.0
    summary["shards"] = [
        {"shard": r.shard, "label": r.label, "rows_in": r.rows_in, "rows_out": r.rows_out,
         "rows_dead_letter": r.rows_dead_letter, "batches": r.batches, "skipped": r.skipped, "duration_s": round(r.duration_s, 3)}
        for r in sorted(results, key=lambda r: r.shard)
    ]
    store.save_manifest({**manifest, "status": "completed",
                         "summary": {k: v for k, v in summary.items() if k != "shards"},
                         "completed": time.time()})
    logger.info("run %s/%s completed: %d rows in, %d rows out in %.1f s",
                cfg.name, run_key, summary["rows_in"], summary["rows_out"], summary["duration_s"])
    return summary


def _degradation(cfg: PipelineConfig, run_key: str, started: float, results: list[ShardResult],
                 logger) -> dict[str, Any]:
    """The run summary's degradation fields: breaker transitions (read once from the shared
    state), fail-fast rejections, batches written under the degraded-writers limit, skipped
    optional transforms. The run's degraded-writers limits are deleted here."""
    rep = degrade.run_report(cfg, run_key, started)
    skipped: dict[str, int] = {}
    for r in results:
        for name, n in r.transforms_skipped.items():
            skipped[name] = skipped.get(name, 0) + n
    events = list(rep["degraded"])
    events += [{"event": "transform_skipped", "transform": name, "batches": n} for name, n in sorted(skipped.items())]
    if rep["breaker_state"]:
        degrade.cleanup(cfg, run_key, sorted(rep["breaker_state"]))
    if events:
        logger.warning("run %s/%s ran degraded: %d breaker opening(s), %d closing(s), skipped "
                       "optional transforms: %s", cfg.name, run_key, rep["breaker_openings"],
                       rep["breaker_closings"], skipped or "none")
    return {
        "breaker_openings": rep["breaker_openings"],
        "breaker_closings": rep["breaker_closings"],
        "breaker_rejections": sum(r.breaker_rejections for r in results),
        "degraded_slot_waits": sum(r.degraded_slot_waits for r in results),
        "transforms_skipped": skipped,
        "degraded": events,
    }


def _limits_summary(cfg: PipelineConfig, results: list[ShardResult],
                    limits_set: dict[str, str]) -> dict[str, Any]:
    """The run summary's limit fields: ``limit_wait_s`` (seconds all shards of this run spent
    getting limit slots, sink and user resources together) and ``limits`` (per configured
    resource: its settings, slots taken, seconds waited, and what run start did to its
    server limits)."""
    per: dict[str, dict[str, Any]] = {}
    for resource, spec in cfg.limits.items():
        server = {n: what for n, what in limits_set.items()
                  if n in (limits.concurrency_limit_name(cfg.name, resource),
                           limits.rate_limit_name(cfg.name, resource))}
        per[resource] = {"concurrency": spec.concurrency, "rate_per_s": spec.rate_per_s,
                         "slots": 0, "wait_s": 0.0, "server": server}
    for r in results:
        for resource, st in r.limits.items():
            e = per.setdefault(resource, {"slots": 0, "wait_s": 0.0})
            e["slots"] += int(st["slots"])
            e["wait_s"] = round(e["wait_s"] + float(st["wait_s"]), 3)
    return {"limit_wait_s": round(sum(e["wait_s"] for e in per.values()), 3), "limits": per}


def _shuffle(ctx: RunContext, files: list[dict], docs: dict, logger) -> int:
    pending = [i for i in range(len(files)) if not (docs.get(f"m{i:05d}") or {}).get("done")]
    if len(pending) < len(files):
        logger.info("shuffle: %d of %d split(s) already staged", len(files) - len(pending), len(files))
    bytes_read = 0
    shuffle = shuffle_task.with_options(**_task_options(ctx.cfg))
    futures = [shuffle.submit(ctx, i, files[i]) for i in pending]
    _emit("stage", {"stage": "shuffle", "splits": len(pending)})
    for fut in as_completed(futures):
        res = fut.result()
        bytes_read += res["bytes_read"]
        _emit("split_done", {"rows": res["rows_in"]})
    return bytes_read


def _keyed_shards(ctx: RunContext, files: list[dict], docs: dict) -> list[ShardSpec]:
    work = cached_storage(ctx.work_url, ctx.cfg.checkpoint.storage_options)
    from .shuffle import staged_path

    inputs: dict[str, list[dict]] = {}
    labels: dict[str, str] = {}
    for i in range(len(files)):
        d = docs[f"m{i:05d}"]
        labels.update(d.get("labels", {}))
        for sid, rows in sorted(d["outputs"].items()):
            p = staged_path(work, sid, i)
            size = d.get("sizes", {}).get(sid, 0)
            inputs.setdefault(sid, []).append({"path": p, "size": size, "rows": rows, "rg": []})
    specs = []
    for sid in sorted(inputs):
        specs.append(ShardSpec(sid, labels.get(sid, sid), True, inputs[sid],
                               sum(x["rows"] for x in inputs[sid])))
    return specs


def _task_runner():
    try:
        return getattr(get_run_context(), "task_runner", None)
    except Exception:  # noqa: BLE001
        return None


def _flow_run_id() -> str | None:
    try:
        ctx = get_run_context()
        return str(ctx.flow_run.id) if getattr(ctx, "flow_run", None) else None
    except Exception:  # noqa: BLE001 - outside a run
        return None


@flow(name="sharded-pipeline", log_prints=False, validate_parameters=True)
def sharded_pipeline(pipeline: PipelineConfig, run_key: str = "default", restart: bool = False) -> dict[str, Any]:
    """Run a sharded, checkpointed pipeline; re-running the same run key resumes it.

    Args:
        pipeline: the pipeline definition (the same model as the YAML file).
        run_key: identifies this run's checkpoints and output; re-use it to resume.
        restart: discard this run key's checkpoints and output and start over.
    """
    with _without_own_tag(pipeline.name):
        return execute(pipeline, run_key, restart)


def _without_own_tag(pipeline: str):
    """Task runs must not inherit the flow run's ``dpipeline:<pipeline>`` tag (``alerts.py``
    needs it on the flow run only): Prefect's task engine takes a tag-concurrency slot
    (``tag:<tag>``, an acquire and a release API call) for every task run that has tags."""
    from prefect.context import TagsContext

    from .alerts import pipeline_tag

    current = set(TagsContext.get().current_tags or ())
    return TagsContext(current_tags=current - {pipeline_tag(pipeline)})
