"""The Python API: ``Pipeline`` and ``run_pipeline``.

    from dpipeline_prefect import Pipeline
    summary = Pipeline.from_yaml("pipeline.yaml").run(run_key="2026-11-29")

Inside a user's own flow, ``run_pipeline(pipeline, run_key=...)`` runs it as a subflow.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import PipelineConfig, load_config, parse_config

__all__ = ["Pipeline", "run_pipeline", "prefect_api", "check_prefect_auth", "translate_prefect_error"]


class Pipeline:
    """A validated pipeline definition plus where it came from."""

    def __init__(self, config: PipelineConfig | dict[str, Any] | None = None, *, base_dir: str | None = None, **fields: Any) -> None:
        if config is None:
            config = fields
        self.config = config if isinstance(config, PipelineConfig) else parse_config(dict(config))
        self.base_dir = base_dir

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "Pipeline":
        """Load a pipeline file; its folder is importable, so ``transforms.py`` beside it works."""
        return cls(load_config(path), base_dir=str(Path(path).resolve().parent))

    @property
    def name(self) -> str:
        return self.config.name

    def run(self, run_key: str = "default", restart: bool = False) -> dict[str, Any]:
        """Run (or resume) this pipeline under ``run_key``; return the run summary.

        Raises the pipeline's error (a :class:`~dpipeline_prefect.errors.DPipelineError`) if
        the run fails; re-running the same run key resumes from the checkpoints.
        """
        _make_importable(self.base_dir)
        try:
            return self._run(run_key, restart)
        except Exception as exc:
            ours = translate_prefect_error(exc)
            if ours is exc:
                raise
            raise ours from None

    def _run(self, run_key: str, restart: bool) -> dict[str, Any]:
        _configure_tracing()
        runner = self.config.runner
        if runner.kind == "dask" and not runner.address and self.config.stream is None:
            # Start the workers now: they import what shards need while this process imports
            # Prefect and creates the flow run (see cluster.py).
            from .cluster import EarlyCluster

            with EarlyCluster(runner.workers, runner.threads_per_worker) as cluster:
                flow = _flow_for(self.config, cluster)
                with prefect_api(), _run_tags(self.config):
                    return flow(pipeline=self.config, run_key=run_key, restart=restart)
        flow = _flow_for(self.config)
        with prefect_api(), _run_tags(self.config):
            return flow(pipeline=self.config, run_key=run_key, restart=restart)


def run_pipeline(pipeline: Pipeline | PipelineConfig | str, run_key: str = "default", restart: bool = False) -> dict[str, Any]:
    """Run a pipeline as a subflow of the calling flow (or as a flow on its own)."""
    if isinstance(pipeline, str):
        pipeline = Pipeline.from_yaml(pipeline)
    if isinstance(pipeline, PipelineConfig):
        pipeline = Pipeline(pipeline)
    _make_importable(pipeline.base_dir)
    _configure_tracing()
    with _run_tags(pipeline.config):
        return _flow_for(pipeline.config)(pipeline=pipeline.config, run_key=run_key, restart=restart)


def _run_tags(cfg: PipelineConfig):
    """Tag the flow run ``dpipeline:<pipeline>`` when it is created: ``alerts.py`` matches
    Prefect's own flow-run state events (Failed, Crashed) by that tag. It must be there from
    the start: the server caches a run's related resources (tags included) for its events."""
    from prefect import tags

    from .alerts import pipeline_tag

    return tags(pipeline_tag(cfg.name))


def _flow_for(cfg: PipelineConfig, cluster=None):
    from .flows import sharded_pipeline
    from .runner import make_task_runner

    if cfg.stream is not None:
        # one increment is one task in this process: no Dask cluster to start (stream.py)
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = ThreadPoolTaskRunner(max_workers=1)
    else:
        runner = make_task_runner(cfg.runner, address=cluster.address() if cluster else None)
    return sharded_pipeline.with_options(
        task_runner=runner,
        flow_run_name=f"{cfg.name}-{{run_key}}",
    )


def _configure_tracing() -> None:
    """OTLP export from the OTEL_* environment, before Prefect starts the flow run's span."""
    from .tracing import configure

    configure()


def _make_importable(base_dir: str | None) -> None:
    """Let transforms in the pipeline's folder import here and in local Dask workers."""
    if not base_dir:
        return
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if base_dir not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([base_dir, *parts])


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Make sure a Prefect API is reachable by this process and by worker processes.

    With ``PREFECT_API_URL`` set, that server is used. Without it, Prefect's embedded server
    is started once (``SubprocessASGIServer``, the same one Prefect's ephemeral mode uses) and
    its URL is exported, so Dask worker processes report to the same server instead of each
    starting their own on the same SQLite file.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        check_prefect_auth(url)
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


def _auth_hint(url: str) -> str:
    from prefect.settings import PREFECT_API_AUTH_STRING

    if PREFECT_API_AUTH_STRING.value():
        return (f"the Prefect API at {url} refused this client's credentials (401 Unauthorized): "
                "PREFECT_API_AUTH_STRING does not match the server's PREFECT_SERVER_API_AUTH_STRING")
    return (f"the Prefect API at {url} requires authentication (401 Unauthorized): set "
            "PREFECT_API_AUTH_STRING to the server's auth string (user:password) in the environment "
            "or the Prefect profile")


def check_prefect_auth(url: str, timeout: float = 10.0) -> None:
    """Fail fast, with one clear message, when the Prefect API refuses this client.

    One ``GET /admin/version`` with the client's own credentials (``PREFECT_API_AUTH_STRING``,
    Prefect's basic auth for self-hosted servers, or ``PREFECT_API_KEY``). A 401/403 raises
    :class:`~dpipeline_prefect.errors.PrefectAuthError`; anything else (an unreachable server
    included) is left to the normal path. The auth string is exported to the environment so
    local Dask worker processes authenticate too; it never appears in a message.
    """
    import base64

    import httpx
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    from .errors import PrefectAuthError

    auth = PREFECT_API_AUTH_STRING.value()
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        os.environ.setdefault("PREFECT_API_AUTH_STRING", auth)  # for worker processes
    elif PREFECT_API_KEY.value():
        headers["Authorization"] = f"Bearer {PREFECT_API_KEY.value()}"
    try:
        resp = httpx.get(url.rstrip("/") + "/admin/version", headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return
    if resp.status_code in (401, 403):
        raise PrefectAuthError(_auth_hint(url), url=url, status=resp.status_code)


def translate_prefect_error(exc: BaseException) -> BaseException:
    """A Prefect client 401/403 as :class:`~dpipeline_prefect.errors.PrefectAuthError`; else ``exc``."""
    from .errors import PrefectAuthError

    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, PrefectAuthError):
            return e
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403) and type(e).__name__ in ("PrefectHTTPStatusError", "HTTPStatusError"):
            url = str(getattr(getattr(e, "request", None), "url", "") or "")
            base = url.split("/api/", 1)[0] + "/api" if "/api/" in url else url
            return PrefectAuthError(_auth_hint(base or "(configured)"), status=status)
        e = e.__cause__ or e.__context__
        seen += 1
    return exc
