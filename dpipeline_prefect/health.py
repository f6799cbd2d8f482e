"""``dpipeline health PIPELINE.yaml``: can this pipeline run now? One check per dependency.

* **Prefect API** (``PREFECT_API_URL``): reachable (``/health``) and its server version. Not
  set is healthy for ``dpipeline run`` (it starts Prefect's embedded server), but alerts,
  limits and the UI need a server, so the line says so.
* **Dask**: with ``runner.address``, the scheduler is reached and its workers listed with
  their memory (in use / limit); no workers is unhealthy. Without an address each run starts
  its own local cluster of ``runner.workers`` processes, so there is nothing to reach yet and
  health does not start one (it would prove little and cost seconds): the line says
  "local cluster: started on demand". The ``threads`` runner needs no cluster.
* **Storage**: the source is listed and its first file's first bytes read; the sink's folder
  (the part of ``sink.path`` before ``{run_key}``), the checkpoint folder and the dead-letter
  folder (when configured) each get a probe object written, read back, deleted and checked
  gone.
* **Limits**: every Prefect global concurrency limit the ``limits:`` section implies exists
  on the server, active, with the configured value (a run's start creates missing ones, so a
  missing one means no run has started since the config changed, or it was deleted).

Every check is independent: one failing does not hide the others. Error texts are passed
through :func:`_scrub`, which removes every string value of the pipeline's storage options
(keys, secrets, tokens), so no secret reaches the output.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import PipelineConfig

__all__ = ["Check", "check_health"]


@dataclass
class Check:
    """One line of the health table."""

    item: str
    ok: bool
    detail: str
    seconds: float = 0.0


def _secrets(cfg: PipelineConfig) -> list[str]:
    """Every string in every storage_options of ``cfg`` (before and after ``${VAR}``)."""
    from .config import expand_env

    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k != "block":  # a block's name is not secret; its resolved contents are
                    walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, str) and len(v) >= 4:
            found.append(v)

    opts = [cfg.source.storage_options, cfg.sink.storage_options, cfg.checkpoint.storage_options]
    if cfg.dead_letter is not None and cfg.dead_letter.storage_options:
        opts.append(cfg.dead_letter.storage_options)
    for o in opts:
        walk(o)
        try:
            resolved = expand_env(o, "storage_options")
            walk(resolved)
            if "block" in resolved:
                from .blocks import resolve_storage

                walk(resolve_storage("", resolved)[1])
        except Exception:  # noqa: BLE001 - unset variable, missing block: the storage check says so
            pass
    # endpoint URLs are not secret and make messages useful; keys and secrets are
    return sorted({s for s in found if "://" not in s}, key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


def _prefect(cfg: PipelineConfig) -> tuple[Check, bool]:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return Check("prefect api", True, "PREFECT_API_URL not set: each run starts Prefect's "
                     "embedded server (alerts, limits and the UI need a server)"), False
    from prefect import get_client

    with get_client(sync_client=True) as client:
        exc = client.api_healthcheck()
        if exc is not None:
            raise exc
        version = client.api_version()
    return Check(f"prefect api {url}", True, f"reachable, server version {version}"), True


def _dask(cfg: PipelineConfig) -> Check:
    r = cfg.runner
    if r.kind != "dask":
        return Check("dask", True, f"runner.kind {r.kind}: shards run in threads of the flow process")
    if not r.address:
        n = r.workers or "CPU cores"
        return Check("dask", True, f"local cluster: started on demand by each run ({n} worker "
                     "process(es)); nothing to reach now")
    from distributed import Client

    with Client(r.address, timeout=5, set_as_default=False) as client:
        try:
            info = client.scheduler_info(n_workers=-1)
        except TypeError:  # older distributed: no n_workers argument
            info = client.scheduler_info()
    workers = info.get("workers", {})
    if not workers:
        return Check(f"dask scheduler {r.address}", False, "reachable, but it has no workers")
    parts = []
    for addr, w in sorted(workers.items()):
        used = (w.get("metrics") or {}).get("memory") or 0
        limit = w.get("memory_limit") or 0
        parts.append(f"{addr} {used / 2**20:,.0f} MiB used of {limit / 2**20:,.0f} MiB, "
                     f"{w.get('nthreads', '?')} thread(s)")
    return Check(f"dask scheduler {r.address}", True,
                 f"reachable, {len(workers)} worker(s): " + "; ".join(parts))


def _source(cfg: PipelineConfig) -> str:
    from .sources import list_files
    from .storage import Storage

    st = Storage(cfg.source.path, cfg.source.storage_options)
    paths = list_files(st, cfg.source.format)
    if not paths:
        raise RuntimeError(f"no {cfg.source.format} files found")
    with st.open(paths[0], "rb") as f:
        head = f.read(4)
    if not head:
        raise RuntimeError(f"{st.unstrip(paths[0])} is empty")
    return f"readable: {len(paths)} file(s), first bytes of {st.unstrip(paths[0])} read"


def _probe(url: str, options: dict[str, Any]) -> str:
    """Write, read back, delete and check gone one probe object under ``url``."""
    from .storage import Storage

    st = Storage(url, options)
    p = st.path(f"_dpipeline_health_{uuid.uuid4().hex}")
    data = b"dpipeline health probe"
    st.write_bytes(p, data)
    try:
        if st.read_bytes(p) != data:
            raise RuntimeError("read back different bytes")
    finally:
        st.rm(p)
    if st.exists(p):
        raise RuntimeError("probe object still there after delete")
    return "writable, readable, deletable (probe object removed)"


def _folder(path: str) -> str:
    """The fixed part of a path that may hold ``{run_key}``."""
    return path.split("{", 1)[0] or "."


def _limits(cfg: PipelineConfig) -> list[Check]:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from .limits import _server_limits

    out: list[Check] = []
    with get_client(sync_client=True) as client:
        for resource, spec in cfg.limits.items():
            for name, limit, decay in _server_limits(cfg.name, resource, spec):
                try:
                    gcl = client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    out.append(Check(f"limit {name}", False, "missing on the server (a run's start "
                                     "creates it; `dpipeline run` or re-create it)"))
                    continue
                what = (f"rate {decay:g}/s" if decay else f"concurrency {limit}")
                wrong = []
                if gcl.limit != limit or abs(float(gcl.slot_decay_per_second or 0) - decay) > 1e-9:
                    wrong.append(f"server has limit {gcl.limit}, decay "
                                 f"{gcl.slot_decay_per_second or 0:g}/s; configured {what}")
                if not gcl.active:
                    wrong.append("inactive")
                out.append(Check(f"limit {name}", not wrong,
                                 "; ".join(wrong) if wrong else f"present, {what}, "
                                 f"{gcl.active_slots} slot(s) in use"))
    return out


def check_health(cfg: PipelineConfig) -> list[Check]:
    """Run every check of ``cfg``'s dependencies; never raises for an unhealthy one."""
    secrets = _secrets(cfg)
    checks: list[Check] = []

    def run(item: str, fn: Callable[[], str | Check | list[Check]]) -> Any:
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - reported as this item's failure
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            checks.append(Check(item, False, _scrub(f"{type(e).__name__}: {msg}"[:500], secrets),
                                time.perf_counter() - t0))
            return None
        took = time.perf_counter() - t0
        for c in res if isinstance(res, list) else [res]:
            if isinstance(c, Check):
                c.detail, c.seconds = _scrub(c.detail, secrets), took
                checks.append(c)
            else:
                checks.append(Check(item, True, _scrub(c, secrets), took))
        return res

    from prefect.settings import PREFECT_API_URL

    server = {"up": False}

    def prefect() -> Check:
        c, server["up"] = _prefect(cfg)
        return c

    run(f"prefect api {PREFECT_API_URL.value() or ''}".strip(), prefect)
    run(f"dask scheduler {cfg.runner.address}" if cfg.runner.address else "dask", lambda: _dask(cfg))
    run(f"source {cfg.source.path}", lambda: _source(cfg))
    sink = _folder(cfg.sink.path)
    run(f"sink {sink}", lambda: _probe(sink, cfg.sink.storage_options))
    run(f"checkpoint {cfg.checkpoint.path}", lambda: _probe(cfg.checkpoint.path, cfg.checkpoint.storage_options))
    if cfg.dead_letter is not None:
        from .dead_letter import dead_letter_url

        marker = "dpipeline-health-run-key"  # a valid run key, cut off again: the folder above it
        url, opts = dead_letter_url(cfg, marker)
        dl = url.split(marker, 1)[0].rstrip("/") + "/"
        run(f"dead letter {dl}", lambda: _probe(dl, opts))
    if cfg.limits:
        if server["up"]:
            run("limits", lambda: _limits(cfg))
        else:
            checks.append(Check("limits", False, "cannot be checked: no reachable Prefect server"))
    return checks
