"""Shared test fixtures: the real S3 (SeaweedFS) and Prefect servers, and storage URLs.

How Prefect is pointed at the test server, and why it is done at import time
--------------------------------------------------------------------------
Prefect 3.9 builds its root settings context when ``prefect.context`` is first imported
(``GLOBAL_SETTINGS_CONTEXT = root_settings_context()``), from the environment of that moment;
it also creates PREFECT_HOME then. ``prefect.settings.temporary_settings`` would only cover
the current process, but flows here run tasks in Dask worker *processes*, which read their
own environment. So this module, which pytest imports before any test module, sets the
environment first thing: PREFECT_HOME (a fresh temp dir, so nothing touches ~/.prefect),
PREFECT_API_URL (a port drawn now; the server is started on that port only when a test
needs it), analytics off and WARNING logging. Subprocesses inherit it all.

Services are started at most once per session and only if a collected test needs them
(through the ``s3`` / ``prefect_server`` / ``storage_url["s3"]`` fixtures or the ``s3`` /
``prefect`` markers). Their start-up overlaps with the first tests: they are spawned when the
session begins and waited for when first used.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid

# --- environment first: nothing below may import prefect before this -------------------------
for _var in [v for v in os.environ if v.startswith("PREFECT_")]:
    # a developer's profile, API key or URL must not leak into tests
    del os.environ[_var]
_PREFECT_CLIENT_HOME = tempfile.mkdtemp(prefix="dpipeline-test-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_CLIENT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
# never fall back to a hidden ephemeral server (it hit "database is locked" under load here)
os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"

from dpipeline_prefect.devservices import PrefectServer, SeaweedFS, free_port  # noqa: E402

_PREFECT_PORT = free_port()
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PREFECT_PORT}/api"

import pytest  # noqa: E402


class _Services:
    """The session's service instances, created on demand."""

    def __init__(self, base) -> None:
        self.base = base
        self.s3: SeaweedFS | None = None
        self.prefect: PrefectServer | None = None

    def get_s3(self) -> SeaweedFS:
        if self.s3 is None:
            self.s3 = SeaweedFS(self.base / "seaweedfs", buckets=("raw", "out", "ckpt"))
            self.s3.start(wait=False)
        return self.s3

    def get_prefect(self) -> PrefectServer:
        if self.prefect is None:
            self.prefect = PrefectServer(self.base / "prefect-server", port=_PREFECT_PORT, ui=False)
            self.prefect.start(wait=False)
        return self.prefect

    def stop(self) -> None:
        if self.prefect is not None:
            _drain_prefect_clients()
        for srv in (self.prefect, self.s3):
            if srv is not None:
                srv.stop()


def _drain_prefect_clients() -> None:
    """Flush Prefect's background log and event senders while the server still runs.

    Otherwise they flush at interpreter exit, after the server is gone, and print
    connection-refused tracebacks (prefect.testing's own harness drains the same way).
    """
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - best effort; never fail a session on teardown
            pass


def _needs(item: pytest.Item) -> set[str]:
    need = set()
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    if "s3" in names or item.get_closest_marker("s3"):
        need.add("s3")
    if callspec is not None and callspec.params.get("storage_url") == "s3":
        need.add("s3")
    if "prefect_server" in names or item.get_closest_marker("prefect"):
        need.add("prefect")
    return need


def pytest_collection_modifyitems(config, items):
    # tests that use a service get its marker, so `-m "not s3 and not prefect"` is a quick run
    for item in items:
        need = _needs(item)
        if "s3" in need and not item.get_closest_marker("s3"):
            item.add_marker(pytest.mark.s3)
        if "prefect" in need and not item.get_closest_marker("prefect"):
            item.add_marker(pytest.mark.prefect)


def pytest_unconfigure(config):
    shutil.rmtree(_PREFECT_CLIENT_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _dev_services(request, tmp_path_factory):
    """Spawn (without waiting) the services this session's tests need; stop them at the end."""
    services = _Services(tmp_path_factory.mktemp("services"))
    need: set[str] = set()
    for item in request.session.items:
        need |= _needs(item)
    if "prefect" in need:  # the slow one (about 10 s) first
        services.get_prefect()
    if "s3" in need:
        services.get_s3()
    yield services
    services.stop()


@pytest.fixture(autouse=True)
def _services_for_markers(request):
    """Tests marked ``s3`` / ``prefect`` get the server running even without the fixture."""
    if request.node.get_closest_marker("prefect"):
        request.getfixturevalue("prefect_server")
    if request.node.get_closest_marker("s3"):
        request.getfixturevalue("s3")


@pytest.fixture(scope="session")
def s3(_dev_services) -> SeaweedFS:
    """The session's SeaweedFS server with buckets ``raw``, ``out`` and ``ckpt``.

    Shared by all tests: use unique key prefixes, and do not stop it; outage tests start
    their own with ``seaweedfs_factory``. Credentials: ``s3.storage_options()``.
    """
    srv = _dev_services.get_s3()
    srv.start()  # waits; also restarts it should an earlier test have stopped it
    return srv


@pytest.fixture(scope="session")
def prefect_server(_dev_services) -> PrefectServer:
    """The session's Prefect server; PREFECT_API_URL already points at it.

    The environment was set when this conftest was imported (see the module docstring), so
    flows run in tests, and Dask workers they spawn, report to this server. If something
    imported prefect earlier anyway, its global settings context is refreshed here.
    """
    srv = _dev_services.get_prefect()
    srv.start()
    assert os.environ["PREFECT_API_URL"] == srv.api_url
    if "prefect.context" in sys.modules:
        import prefect.context
        from prefect.settings import get_current_settings

        if str(get_current_settings().api.url) != srv.api_url:
            prefect.context.refresh_global_settings_context()
    return srv


@pytest.fixture
def seaweedfs_factory(tmp_path):
    """Make private SeaweedFS servers (for outage tests); all are stopped after the test.

    Call as ``seaweedfs_factory(buckets=("raw",), identities=[...])``; it returns a started
    :class:`SeaweedFS` whose data lives under the test's ``tmp_path``.
    """
    made: list[SeaweedFS] = []

    def make(**kwargs) -> SeaweedFS:
        srv = SeaweedFS(tmp_path / f"seaweedfs-{len(made)}", **kwargs)
        made.append(srv)
        return srv.start()

    yield make
    for srv in made:
        srv.stop(kill=True)


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def storage_url(request, tmp_path):
    """``(url, storage_options)`` of a fresh, empty location, for storage conformance suites.

    local: a directory under ``tmp_path``; memory: ``memory://<uuid>`` (fsspec's in-process
    store: not visible from Dask worker processes); s3: ``s3://ckpt/<uuid>`` on the session's
    SeaweedFS with its credentials.
    """
    kind = request.param
    if kind == "local":
        path = tmp_path / "store"
        path.mkdir()
        return str(path), {}
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}", {}
    s3 = request.getfixturevalue("s3")
    return f"s3://ckpt/{uuid.uuid4().hex}", s3.storage_options()
