"""A Dask task runner for Prefect whose per-task orchestration cost is a few milliseconds.

prefect-dask's :class:`~prefect_dask.DaskTaskRunner` costs about 0.1-0.2 s per task on a small
machine, almost all of it spent moving the *same* Prefect context again and again:

* in the flow process, ``prefect.context.serialize_context`` dumps the flow-run and the
  settings contexts through pydantic and ``visit_collection`` for every submit, and Dask
  then tokenizes that payload to name the task;
* in the worker, ``prefect.context.hydrated_context`` rebuilds a ``SettingsContext`` for
  every task, and pydantic-settings re-reads the environment, the profiles file and ``.env``
  for each of the ~54 nested settings models; and the task engine builds a new Prefect
  client per task (about 30 ms: httpx builds an SSL context even for http URLs).

:class:`FastDaskTaskRunner` is a drop-in subclass that keeps every Prefect semantic (each
task is a real task run created by Prefect's own engine: states, retries, logs, names,
results, ``wait_for``, futures usable by ``prefect.futures.wait``/``as_completed``) and
removes the repetition:

* submit side: the flow-run part and the settings part of the context are serialized once
  and re-used until the context objects change (a new flow run, ``temporary_settings``...),
  as pickled bytes plus a content hash; only the task-specific parts (task-run id, asset
  context, tags, a parent task-run context) are built per task. Tasks get an explicit Dask
  key, so Dask does not tokenize the payload.
* worker side: each worker process hydrates a ``SettingsContext`` once per settings hash and
  validates the ``FlowRunContext`` once per flow-context hash; per task it only copies them
  (fresh per-task bookkeeping dicts) and enters them around Prefect's ``run_task_sync``;
  each worker thread keeps one open Prefect client per settings hash, which the engine picks
  up as the current client context. (Async tasks still get a client per task: Prefect's
  async client is bound to the event loop that ``asyncio.run`` creates per task.)

With an embedded (ephemeral) Prefect server -- no ``PREFECT_API_URL`` set -- the stock runner
leaves worker processes without an API URL, so each worker starts its own ephemeral server
on the same SQLite file. Here the flow's serialized settings carry the URL of the flow
process's ephemeral server, so workers report to the same server as the flow.

When connecting to an existing cluster (``address=...``), the runner checks once that every
worker can import this package, is configured with the same ``PREFECT_API_URL`` as the flow
and can reach the flow's API; otherwise it raises :class:`~dpipeline_prefect.errors.ConfigError`
naming the workers and what differs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import threading
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable
from uuid import UUID, uuid4

import cloudpickle
import distributed
from prefect_dask.task_runners import DaskTaskRunner, PrefectDaskFuture

from .errors import ConfigError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import RunInput
    from prefect.tasks import Task
    from prefect.task_runners import TaskRunner

    from .config import RunnerConfig

__all__ = ["FastDaskTaskRunner", "make_task_runner", "check_workers", "worker_cache_stats"]

logger = logging.getLogger(__name__)

# How many distinct serialized settings / flow contexts a worker process keeps hydrated.
# One flow run needs one of each; a few more cover concurrent flow runs sharing a cluster.
_WORKER_CACHE_SIZE = 16


# ---------------------------------------------------------------------------------------
# Submit side (flow process)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """Pickled context part plus its content hash (the worker-side cache key)."""

    digest: str
    data: bytes

    @classmethod
    def of(cls, obj: Any) -> _Blob:
        data = cloudpickle.dumps(obj)
        return cls(hashlib.blake2b(data, digest_size=16).hexdigest(), data)


@dataclass
class _SharedContext:
    """The serialized context parts that are the same for every task of a flow run.

    ``sources`` holds the very objects the blobs were made from; the cache is valid only
    while the current contexts are *these* objects (identity, not equality, so a second flow
    run never sees the first run's context even if a memory address is reused: the cache
    keeps the old objects alive, so their ids cannot be recycled meanwhile).
    """

    sources: tuple[Any, ...]
    settings: _Blob
    flow: _Blob


def _current_sources() -> tuple[Any, ...]:
    """Objects whose identity decides whether the cached shared context is still valid."""
    from prefect.context import (
        EngineContext,
        SettingsContext,
        _deployment_id,
        _deployment_parameters,
    )

    frc = EngineContext.get()
    return (
        frc,
        getattr(frc, "flow_run", None),
        getattr(frc, "result_store", None),
        getattr(frc, "parameters", None),
        SettingsContext.get(),
        _deployment_id.get(),
        _deployment_parameters.get(),
        _ephemeral_api_url(),
    )


def _ephemeral_api_url() -> str | None:
    """URL of the ephemeral Prefect server this process started, if it runs one.

    ``prefect.client.orchestration.get_client`` starts a ``SubprocessASGIServer`` (keyed by
    port ``None``) when no API URL is configured; its URL is not written to any setting.
    """
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    # Never import the server package here (heavy): if no one imported it, none runs.
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return None
    server = server_module.SubprocessASGIServer._instances.get(None)  # no public accessor
    if server is not None and server.running and server.port:
        return server.api_url
    return None


def _serialize_shared(sources: tuple[Any, ...]) -> _SharedContext:
    """Serialize the flow-run and settings contexts once (what ``serialize_context`` does
    for every task in the stock runner)."""
    frc, _, _, _, settings_ctx, deployment_id, deployment_params, ephemeral_url = sources
    settings = settings_ctx.serialize() if settings_ctx else {}
    if ephemeral_url and settings:
        # Workers must talk to the flow's ephemeral server, not start their own.
        api = dict(settings.get("settings", {}).get("api") or {})
        api["url"] = ephemeral_url
        settings = {**settings, "settings": {**settings["settings"], "api": api}}
    flow = {
        "flow_run_context": frc.serialize() if frc else {},
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": deployment_params,
    }
    return _SharedContext(sources, _Blob.of(settings), _Blob.of(flow))


def _per_task_context(
    task: Task[Any, Any], task_run_id: UUID, task_inputs: dict[str, Any]
) -> dict[str, Any]:
    """The context parts that differ per task (cheap to build)."""
    from prefect.context import AssetContext, TagsContext, TaskRunContext

    parent = TaskRunContext.get()
    return {
        "task_run_context": parent.serialize() if parent else {},
        "tags": sorted(TagsContext.get().current_tags),
        "asset_context": AssetContext.from_task_and_inputs(
            task=task, task_run_id=task_run_id, task_inputs=task_inputs, copy_to_child_ctx=True
        ).serialize(),
    }


class FastDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's ``DaskTaskRunner`` with context serialization and hydration cached.

    Same constructor arguments and behaviour as :class:`prefect_dask.DaskTaskRunner`; only
    the cost per task differs (a few milliseconds instead of 0.1-0.2 s). See the module
    docstring for what is cached and why that keeps Prefect's semantics.

    Args:
        cluster: A running ``distributed`` cluster object to use.
        address: Address of a running Dask scheduler. When given, the workers are checked
            once, at the first submit (see :func:`check_workers`).
        cluster_class: Cluster class (or its qualified name) for a temporary cluster.
        cluster_kwargs: Keyword arguments for ``cluster_class``.
        adapt_kwargs: Keyword arguments for ``cluster.adapt``.
        client_kwargs: Keyword arguments for the ``distributed.Client``.
        performance_report_path: Where to write a Dask performance report, if anywhere.

    Example:
        ```python
        from prefect import flow, task
        from dpipeline_prefect.runner import FastDaskTaskRunner

        @task
        def double(x):
            return 2 * x

        @flow(task_runner=FastDaskTaskRunner(cluster_kwargs={"n_workers": 2}))
        def doubles():
            return double.map(range(10)).result()
        ```
    """

    def __init__(self, *args: Any, check_workers: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared: _SharedContext | None = None
        self._shared_lock = threading.Lock()
        # A cluster this package started itself (``cluster.EarlyCluster``) needs no check:
        # its workers import this package by preload and get the flow's API URL with the
        # serialized settings, even when the flow's (embedded) server started after them.
        self.check_workers = check_workers
        self._workers_checked = not check_workers

    def duplicate(self) -> "FastDaskTaskRunner":
        """A new runner with the same settings (the flow engine makes one per flow run)."""
        dup = super().duplicate()
        dup.check_workers = self.check_workers
        dup._workers_checked = not self.check_workers
        return dup

    # ``__eq__`` is inherited (same settings => equal).

    def __getstate__(self) -> dict[str, Any]:
        # The runner travels to workers inside the pickled Flow; the lock cannot be pickled
        # and the cached context is meaningless there.
        state = self.__dict__.copy()
        state.update(_shared=None, _shared_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shared_lock = threading.Lock()

    @property
    def client(self):  # type: ignore[override]
        """The Dask client; on first use with ``address=...`` the workers are checked."""
        try:
            client = super().client
        except RuntimeError as exc:
            if "Nanny failed to start" not in str(exc):
                raise
            from .cluster import spawn_error

            raise spawn_error() from None
        if self.address and not self._workers_checked:
            # A task submitting tasks from inside a worker (the stock client property then
            # sets ``address``) runs on the cluster already: nothing to check there.
            if not _in_dask_worker():
                check_workers(client, cached=True)
            self._workers_checked = True
        return client

    def _shared_context(self) -> _SharedContext:
        sources = _current_sources()
        shared = self._shared
        if shared is None or not _same(shared.sources, sources):
            with self._shared_lock:
                shared = self._shared
                if shared is None or not _same(shared.sources, sources):
                    shared = self._shared = _serialize_shared(sources)
        return shared

    def submit(  # type: ignore[override]
        self,
        task: Task[Any, Any],
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectDaskFuture[Any]] | None = None,
        dependencies: dict[str, set[RunInput]] | None = None,
    ) -> PrefectDaskFuture[Any]:
        """Submit one task run to Dask; same contract as ``DaskTaskRunner.submit``."""
        from prefect.utilities.engine import collect_task_run_inputs_sync

        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")

        parameters = self._optimize_futures(parameters)
        wait_for = self._optimize_futures(wait_for) if wait_for else None
        client = self.client

        task_run_id = uuid4()
        task_inputs = {
            k: collect_task_run_inputs_sync(v, future_cls=distributed.Future)
            for k, v in parameters.items()
        }
        if dependencies:
            # as prefect-dask does: extra dependencies only for keys that are parameters
            task_inputs = {
                k: v.union(dependencies.get(k, set())) for k, v in task_inputs.items()
            }

        shared = self._shared_context()
        future = client.submit(
            _run_task_in_worker,
            task,
            shared.settings,
            shared.flow,
            _per_task_context(task, task_run_id, task_inputs),
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=wait_for,
            dependencies=task_inputs,
            # An explicit, unique key: Dask would otherwise tokenize the whole payload.
            key=f"{_key_prefix(task)}-{task_run_id.hex}",
            pure=False,
        )
        future.task_run_id = task_run_id
        return PrefectDaskFuture(wrapped_future=future, task_run_id=task_run_id)


def _in_dask_worker() -> bool:
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        x is y or (isinstance(x, str) and x == y) for x, y in zip(a, b)
    )


def _key_prefix(task: Task[Any, Any]) -> str:
    # Dask groups keys by the text before the first "-"; keep the task name readable there.
    return "".join(c if c.isalnum() or c == "_" else "_" for c in task.name) or "task"


# ---------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------

_worker_lock = threading.Lock()
_settings_cache: OrderedDict[str, Any] = OrderedDict()  # digest -> SettingsContext
_flow_cache: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()  # -> hydrated parts
# Per worker thread: settings digest -> an open SyncClientContext. A SyncPrefectClient costs
# ~30 ms to build (httpx builds an SSL context even for http URLs) and the engine builds one
# per task; an open client per thread also keeps its HTTP connection alive between tasks.
_thread_clients = threading.local()
# How often this process hydrated each part (what the caches save; read by tests and
# benchmarks through ``client.run(worker_cache_stats)``).
_stats = {"settings_hydrations": 0, "flow_hydrations": 0, "clients": 0, "tasks": 0}


def worker_cache_stats() -> dict[str, int]:
    """Counters of this process's context caches: hydrations, clients built, tasks run.

    Meant to be called on Dask workers, e.g. ``client.run(worker_cache_stats)``.
    """
    return dict(_stats)


def _cached(cache: OrderedDict, key: Any, build) -> Any:
    with _worker_lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = build()  # outside the lock: building settings takes tens of milliseconds
    with _worker_lock:
        cache[key] = value
        while len(cache) > _WORKER_CACHE_SIZE:
            cache.popitem(last=False)
    return value


def _hydrate_settings(blob: _Blob):
    from prefect.context import SettingsContext

    _stats["settings_hydrations"] += 1
    data = cloudpickle.loads(blob.data)
    return SettingsContext(**data) if data else None


def _hydrate_flow(blob: _Blob, client: Any) -> dict[str, Any]:
    """Validate the flow-run context once; per task only a shallow copy is made."""
    from prefect._internal.result_records import ResultRecordMetadata
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.flows import Flow
    from prefect.tasks import Task

    # Same rebuild as prefect.context.hydrated_context: the models reference these types.
    types = {"Flow": Flow, "Task": Task, "ResultRecordMetadata": ResultRecordMetadata}
    FlowRunContext.model_rebuild(_types_namespace=types)
    TaskRunContext.model_rebuild(_types_namespace=types)

    _stats["flow_hydrations"] += 1
    data = cloudpickle.loads(blob.data)
    template = None
    if frc := data.get("flow_run_context"):
        # client and task_runner are placeholders: each task sets its own (see below).
        template = FlowRunContext(
            **frc, client=client, task_runner=frc["flow"].task_runner.duplicate(), detached=True
        )
        # Fields the serialized context does not carry are per-task bookkeeping (results
        # seen, dynamic keys, pauses...): each task must start with fresh ones, as it does
        # when hydrated_context builds a new FlowRunContext.
        fresh = [
            name
            for name, field in FlowRunContext.model_fields.items()
            if name not in frc and field.default_factory is not None
        ]
        template = (template, fresh)
    return {
        "flow_run": template,
        "deployment_id": data.get("deployment_id"),
        "deployment_parameters": data.get("deployment_parameters"),
    }


def _thread_client_context(digest: str) -> Any:
    """An open ``SyncClientContext`` for this thread and these settings (built in them)."""
    from prefect.context import SyncClientContext

    clients: OrderedDict[str, Any] | None = getattr(_thread_clients, "by_digest", None)
    if clients is None:
        clients = _thread_clients.by_digest = OrderedDict()
    ctx = clients.get(digest)
    if ctx is None:
        ctx = SyncClientContext()
        _stats["clients"] += 1
        # Entered once (opens the client, checks the API version) and never exited while
        # cached: exiting would close the client. The context variable that entering sets
        # is undone at once; each task sets it for its own duration only.
        ctx.__enter__()
        SyncClientContext.__var__.reset(ctx._token)
        ctx._token = None
        clients[digest] = ctx
        while len(clients) > _WORKER_CACHE_SIZE:
            _, old = clients.popitem(last=False)
            try:
                old.client.__exit__(None, None, None)
            except Exception:  # closing an idle client must not fail a task
                logger.debug("closing an idle Prefect client failed", exc_info=True)
    else:
        clients.move_to_end(digest)
    return ctx


def _enter_contexts(
    stack: ExitStack, settings_blob: _Blob, flow_blob: _Blob, per_task: dict[str, Any]
) -> None:
    """Enter the same contexts ``prefect.context.hydrated_context`` would, from the caches."""
    from prefect.context import (
        AssetContext,
        FlowRunContext,
        SyncClientContext,
        TaskRunContext,
        _deployment_id,
        _deployment_parameters,
        tags,
    )
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    settings_ctx = _cached(
        _settings_cache, settings_blob.digest, lambda: _hydrate_settings(settings_blob)
    )
    if settings_ctx is not None:
        # A copy per task: a context object can be entered by one thread at a time.
        stack.enter_context(settings_ctx.model_copy())
    client_ctx = _thread_client_context(settings_blob.digest)
    # Make it the current client context for this task only: the engine's
    # ``SyncClientContext.get_or_create()`` and ``get_client(sync_client=True)`` then reuse it.
    token = SyncClientContext.__var__.set(client_ctx)
    stack.callback(SyncClientContext.__var__.reset, token)
    client = client_ctx.client
    flow = _cached(
        _flow_cache,
        (settings_blob.digest, flow_blob.digest),
        lambda: _hydrate_flow(flow_blob, client),
    )
    if flow["flow_run"] is not None:
        template, fresh = flow["flow_run"]
        task_runner = stack.enter_context(template.flow.task_runner.duplicate())
        update = {name: FlowRunContext.model_fields[name].default_factory() for name in fresh}
        update.update(client=client, task_runner=task_runner)
        stack.enter_context(template.model_copy(update=update))
    if parent := per_task.get("task_run_context"):
        stack.enter_context(TaskRunContext(**parent, client=client))
    if per_task.get("tags"):
        stack.enter_context(tags(*per_task["tags"]))
    if asset := per_task.get("asset_context"):
        stack.enter_context(AssetContext(**asset))
    if deployment_id := flow["deployment_id"]:
        token = _deployment_id.set(UUID(deployment_id))
        stack.callback(_deployment_id.reset, token)
    if deployment_params := flow["deployment_parameters"]:
        token = _deployment_parameters.set(deployment_params)
        stack.callback(_deployment_parameters.reset, token)


def _run_task_in_worker(
    task: Task[Any, Any],
    settings_blob: _Blob,
    flow_blob: _Blob,
    per_task: dict[str, Any],
    *,
    task_run_id: UUID,
    parameters: dict[str, Any],
    wait_for: Any,
    dependencies: dict[str, set[RunInput]],
) -> Any:
    """Run one Prefect task run in a Dask worker and return its final State.

    Prefect's own engine runs the task; the contexts it would hydrate from the serialized
    context are entered here from the per-process caches instead (``context=None``).
    """
    from prefect.task_engine import run_task_async, run_task_sync

    kwargs = dict(
        task=task,
        task_run_id=task_run_id,
        parameters=parameters,
        wait_for=wait_for,
        dependencies=dependencies,
        return_type="state",
        context=None,
    )
    _stats["tasks"] += 1
    with ExitStack() as stack:
        _enter_contexts(stack, settings_blob, flow_blob, per_task)
        if task.isasync:
            return asyncio.run(run_task_async(**kwargs))
        return run_task_sync(**kwargs)


# ---------------------------------------------------------------------------------------
# Start-up check of an existing cluster
# ---------------------------------------------------------------------------------------


def _worker_facts(flow_api_url: str | None, effective_api_url: str | None) -> dict[str, Any]:
    """Run on each worker: its configured Prefect API URL and whether the flow's API answers."""
    import httpx
    from prefect.settings import get_current_settings

    facts: dict[str, Any] = {"api_url": get_current_settings().api.url, "reachable": None}
    if effective_api_url:
        try:
            response = httpx.get(f"{effective_api_url.rstrip('/')}/health", timeout=5.0)
            facts["reachable"] = response.status_code == 200 or f"HTTP {response.status_code}"
        except Exception as exc:  # any failure to connect is the answer we report
            facts["reachable"] = f"{type(exc).__name__}: {exc}"
    return facts


# (scheduler address, worker addresses, flow API URL) already found fine in this process: the
# runner is duplicated for every flow run, and the check costs a few round trips.
_checked_clusters: set[tuple[str, frozenset[str], str | None]] = set()


def check_workers(client: distributed.Client, cached: bool = False) -> None:
    """Check that every worker of ``client``'s cluster can run this flow's tasks.

    Each worker must import ``dpipeline_prefect``, be configured with the same
    ``PREFECT_API_URL`` as the flow process (both unset is fine with an ephemeral server: the
    runner sends its URL along), and reach the flow's Prefect API.

    Args:
        client: A connected Dask client.
        cached: Skip the check if the same workers were found fine for the same API URL
            earlier in this process.

    Raises:
        ConfigError: naming each worker that fails and what differs (``field`` is
            ``runner.address``).
    """
    from prefect.settings import get_current_settings

    flow_api_url = get_current_settings().api.url
    effective = flow_api_url or _ephemeral_api_url()
    workers = frozenset(client.scheduler_info().get("workers", {}))
    key = (client.scheduler.address, workers, effective)
    if cached and key in _checked_clusters:
        return
    problems: list[str] = []
    # ``exec`` is pickled by reference, so the import is tried on the worker without the
    # worker having to unpickle anything from this package first.
    imports = client.run(exec, "import dpipeline_prefect", on_error="return")
    if not imports:
        logger.warning(
            "Dask cluster at %s has no workers yet; nothing to check", client.scheduler.address
        )
        return
    for worker, result in sorted(imports.items()):
        if isinstance(result, BaseException):
            problems.append(
                f"{worker}: cannot import dpipeline_prefect ({type(result).__name__}: {result})"
            )
    ok = [w for w, r in imports.items() if not isinstance(r, BaseException)]
    if ok:
        facts = client.run(_worker_facts, flow_api_url, effective, workers=ok, on_error="return")
        for worker, fact in sorted(facts.items()):
            if isinstance(fact, BaseException):
                problems.append(f"{worker}: check failed ({type(fact).__name__}: {fact})")
                continue
            if fact["api_url"] != flow_api_url:
                problems.append(
                    f"{worker}: PREFECT_API_URL={fact['api_url'] or '(unset)'} "
                    f"but the flow uses {flow_api_url or '(unset: ephemeral server)'}"
                )
            if fact["reachable"] is not True and fact["reachable"] is not None:
                problems.append(
                    f"{worker}: cannot reach the Prefect API at {effective}: {fact['reachable']}"
                )
    if problems:
        raise ConfigError(
            f"Dask workers at {client.scheduler.address} cannot run this flow's tasks:\n  "
            + "\n  ".join(problems),
            field="runner.address",
        )
    _checked_clusters.add(key)


# ---------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------


def make_task_runner(runner_cfg: RunnerConfig, address: str | None = None) -> TaskRunner[Any]:
    """Build the Prefect task runner described by a :class:`~dpipeline_prefect.config.RunnerConfig`.

    Args:
        runner_cfg: ``kind="threads"`` gives Prefect's ``ThreadPoolTaskRunner`` with
            ``workers`` threads (default: CPU count). ``kind="dask"`` gives a
            :class:`FastDaskTaskRunner` connected to ``address`` if set, else one that starts
            a ``distributed.LocalCluster`` of ``workers`` processes (default: CPU count) with
            ``threads_per_worker`` threads each, no dashboard (the scheduler's HTTP endpoint
            on a random port), Dask logs at WARNING.
        address: a cluster this package started itself (``cluster.EarlyCluster``), used
            instead of starting one; its workers are not checked.

    Returns:
        A task runner to pass as ``@flow(task_runner=...)`` or ``flow.with_options``.
    """
    from .cluster import local_cluster_kwargs

    if runner_cfg.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner_cfg.workers or os.cpu_count() or 1)
    if address:
        return FastDaskTaskRunner(address=address, check_workers=False)
    if runner_cfg.address:
        return FastDaskTaskRunner(address=runner_cfg.address)
    return FastDaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=local_cluster_kwargs(runner_cfg.workers, runner_cfg.threads_per_worker),
    )
