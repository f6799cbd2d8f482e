"""The real-service launchers: ports isolated, credentials enforced, restarts keep data.

These are the services every other S3 / Prefect test stands on, so their promises are
checked against the live processes (listening sockets read with psutil, real S3 requests
through s3fs, the Prefect REST API), not assumed.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid

import psutil
import pytest
import s3fs
from botocore.exceptions import EndpointConnectionError

from dpipeline_prefect.devservices import (
    PrefectServer,
    SeaweedFS,
    ServiceStartError,
    free_port,
)
from dpipeline_prefect.storage import Storage


def _fs(**options) -> s3fs.S3FileSystem:
    # a private client: s3fs caches instances by arguments, and tests here change servers
    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


def _listening(pid: int) -> set[tuple[str, int]]:
    proc = psutil.Process(pid)
    return {
        (c.laddr.ip, c.laddr.port)
        for c in proc.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN or not c.raddr  # TCP listeners and bound UDP
    }


def test_free_port_is_bindable_and_not_repeated():
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert all(1024 < p < 32768 for p in ports)


@pytest.mark.s3
def test_two_seaweedfs_at_once_bind_only_their_own_loopback_ports(s3, seaweedfs_factory):
    other = seaweedfs_factory(buckets=("raw",))
    assert s3.running() and other.running()
    assert s3.endpoint_url != other.endpoint_url
    assert not set(s3.ports.values()) & set(other.ports.values())

    for srv in (s3, other):
        bound = _listening(srv.pid)
        assert bound, "weed mini listens on nothing?"
        assert {ip for ip, _ in bound} == {"127.0.0.1"}
        # every socket it opened is on a port we chose, none on a weed default like 8333
        assert {port for _, port in bound} <= set(srv.ports.values())

    # two separate stores: an object put in one is not in the other
    key = f"raw/{uuid.uuid4().hex}"
    _fs(**s3.storage_options()).pipe(key, b"in the session server")
    assert not _fs(**other.storage_options()).exists(key)
    assert _fs(**s3.storage_options()).cat(key) == b"in the session server"


@pytest.mark.s3
def test_credentials_are_enforced(s3):
    key = f"raw/{uuid.uuid4().hex}"
    _fs(**s3.storage_options()).pipe(key, b"secret data")

    wrong = _fs(key=s3.key, secret="not-the-secret", client_kwargs={"endpoint_url": s3.endpoint_url})
    with pytest.raises(PermissionError):
        wrong.cat(key)
    with pytest.raises(PermissionError):
        wrong.pipe(f"raw/{uuid.uuid4().hex}", b"x")

    anonymous = _fs(anon=True, client_kwargs={"endpoint_url": s3.endpoint_url})
    with pytest.raises(PermissionError):
        anonymous.cat(key)
    with pytest.raises(PermissionError):
        anonymous.ls("raw", refresh=True)

    # the server's log (kept next to its data) never holds the secret
    assert s3.secret not in s3.log_path.read_text(errors="replace")


@pytest.mark.s3
def test_scoped_identity_is_read_only_on_its_bucket(seaweedfs_factory):
    reader = SeaweedFS.make_identity("reader", ["Read:raw", "List:raw"])
    srv = seaweedfs_factory(buckets=("raw", "out"), identities=[reader])
    _fs(**srv.storage_options()).pipe("raw/a.txt", b"a")

    ro = _fs(**srv.storage_options("reader"))
    assert ro.cat("raw/a.txt") == b"a"
    assert ro.ls("raw", refresh=True) == ["raw/a.txt"]
    with pytest.raises(PermissionError):
        ro.pipe("raw/b.txt", b"b")
    with pytest.raises(PermissionError):
        ro.pipe("out/b.txt", b"b")


@pytest.mark.s3
def test_stop_and_start_keep_data_and_endpoint(seaweedfs_factory):
    srv = seaweedfs_factory(buckets=("ckpt",))
    endpoint, ports = srv.endpoint_url, dict(srv.ports)
    _fs(**srv.storage_options()).pipe("ckpt/run/state.json", b'{"batch": 7}')

    srv.stop(kill=True)  # a crash, not a clean shutdown
    assert not srv.running()
    down = _fs(**srv.storage_options(), config_kwargs={"retries": {"max_attempts": 1}})
    down.retries = 1  # s3fs's own retry loop, on top of botocore's
    with pytest.raises(EndpointConnectionError):  # connection refused while it is down
        down.cat("ckpt/run/state.json")

    srv.start()
    assert (srv.endpoint_url, srv.ports) == (endpoint, ports)
    assert _fs(**srv.storage_options()).cat("ckpt/run/state.json") == b'{"batch": 7}'


def test_start_failure_reports_log_tail_without_secret(tmp_path):
    srv = SeaweedFS(tmp_path / "bad", weed="/bin/false", startup_timeout=10)
    with pytest.raises(ServiceStartError) as err:
        srv.start()
    assert "exited with code 1" in str(err.value)
    assert str(srv.log_path) in str(err.value)
    assert srv.secret not in str(err.value) and srv.secret not in repr(srv)
    # the identities file holding the secret is private to the owner
    assert oct((tmp_path / "bad" / "s3-identities.json").stat().st_mode & 0o777) == "0o600"


def test_storage_url_fixture_gives_a_fresh_writable_location(storage_url):
    url, options = storage_url
    st = Storage(url, options)
    assert not st.fs.exists(st.path("probe.bin"))
    st.fs.pipe(st.path("probe.bin"), b"\x00\x01")
    assert st.fs.cat(st.path("probe.bin")) == b"\x00\x01"


@pytest.mark.prefect
def test_prefect_server_health_and_client_wiring(prefect_server):
    assert isinstance(prefect_server, PrefectServer) and prefect_server.running()
    with urllib.request.urlopen(prefect_server.api_url + "/health", timeout=10) as resp:
        assert json.loads(resp.read()) is True

    # the test process itself talks to this server, and its home is a throwaway directory
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    assert str(settings.api.url) == prefect_server.api_url
    assert str(settings.home) == os.environ["PREFECT_HOME"]
    assert not str(settings.home).startswith(os.path.expanduser("~/.prefect"))


@pytest.mark.prefect
def test_flow_run_is_recorded_on_the_test_server(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client

    marker = uuid.uuid4().hex

    @flow(name=f"devservices-probe-{marker[:8]}")
    def probe(x: int) -> int:
        return x + 1

    state = probe(41, return_state=True)
    assert state.is_completed() and state.result() == 42

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_completed()
    assert run.parameters == {"x": 41}
