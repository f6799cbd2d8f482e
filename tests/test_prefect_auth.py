"""A Prefect server protected by an auth string (Prefect's basic auth for self-hosted servers).

The server runs with ``PREFECT_SERVER_API_AUTH_STRING``; the CLI, the flow and the Dask worker
processes authenticate with ``PREFECT_API_AUTH_STRING``. Without it, or with a wrong one, the
CLI stops within seconds with one message saying which setting to fix, writes nothing, and
never prints an auth string.
"""

from __future__ import annotations

import base64
import time
import uuid

import httpx
import pytest

from dpipeline_prefect.devservices import PrefectServer

from .pipeline_helpers import assert_exactly_once, flights, load_summary, reference, run_cli, write_parquet_files, write_yaml

pytestmark = pytest.mark.prefect

AUTH = "dpipeline:" + uuid.uuid4().hex  # user:password


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-auth") / "home", ui=False,
                        extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH, "PREFECT_API_AUTH_STRING": AUTH})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory):
    base = tmp_path_factory.mktemp("auth-pipe")
    df = flights(8000)
    write_parquet_files(df, base / "in", files=4)

    def make(name: str):
        return write_yaml(base / f"{name}.yaml", {
            "name": name,
            "source": {"path": str(base / "in")},
            "batching": {"rows": 1000},
            "transforms": ["dpipeline_prefect.examples.flights:clean"],
            "sink": {"path": str(base / "out" / name / "{run_key}")},
            "checkpoint": {"path": str(base / "ckpt")},
            "runner": {"kind": "dask", "workers": 2},
        }), base / "out" / name

    return make, df


def _api(srv: PrefectServer, method: str, path: str, **kw) -> httpx.Response:
    h = {"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}
    return httpx.request(method, srv.api_url + path, headers=h, timeout=30, **kw)


def test_the_server_refuses_unauthenticated_requests(auth_server):
    assert httpx.get(auth_server.api_url + "/admin/version", timeout=10).status_code == 401
    assert _api(auth_server, "GET", "/admin/version").status_code == 200


@pytest.mark.slow
def test_cli_flow_and_dask_workers_authenticate(auth_server, pipeline_file, tmp_path):
    make, df = pipeline_file
    p, out = make("auth-ok-" + uuid.uuid4().hex[:6])
    r = run_cli("run", str(p), "--run-key", "r1", "--summary-json", str(tmp_path / "s.json"),
                env={"PREFECT_API_URL": auth_server.api_url, "PREFECT_API_AUTH_STRING": AUTH})
    assert r.returncode == 0, r.stderr[-3000:]
    assert AUTH not in r.stdout + r.stderr
    s = load_summary(tmp_path / "s.json")
    assert s["status"] == "completed" and s["rows_in"] == len(df)
    assert_exactly_once(str(out / "r1"), reference(df))
    # the shard task runs were reported by the worker processes to the protected server
    runs = _api(auth_server, "POST", "/task_runs/filter",
                json={"flow_runs": {"id": {"any_": [s["flow_run_id"]]}}, "limit": 200}).json()
    shards = [t for t in runs if t["name"].startswith("shard-")]
    assert len(shards) == 4 and {t["state"]["type"] for t in shards} == {"COMPLETED"}, \
        [(t["name"], t["state"]["type"]) for t in runs]


@pytest.mark.parametrize("given", ["missing", "wrong"])
def test_missing_or_wrong_auth_fails_fast_and_clearly(auth_server, pipeline_file, given):
    make, _ = pipeline_file
    p, out = make(f"auth-{given}-" + uuid.uuid4().hex[:6])
    env = {"PREFECT_API_URL": auth_server.api_url}
    wrong = "dpipeline:" + uuid.uuid4().hex
    if given == "wrong":
        env["PREFECT_API_AUTH_STRING"] = wrong
    t0 = time.monotonic()
    r = run_cli("run", str(p), "--run-key", "r1", env=env, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    text = r.stdout + r.stderr
    assert "401 Unauthorized" in text and auth_server.api_url in text
    if given == "missing":
        assert "requires authentication" in text and "set PREFECT_API_AUTH_STRING" in text
    else:
        assert "does not match the server's PREFECT_SERVER_API_AUTH_STRING" in text
    assert AUTH not in text and wrong not in text
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert took < 90, f"took {took:.1f} s"


def test_python_api_raises_prefect_auth_error(auth_server, pipeline_file, monkeypatch):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from dpipeline_prefect.errors import PrefectAuthError
    from dpipeline_prefect.pipeline import Pipeline

    make, _ = pipeline_file
    p, out = make("auth-py-" + uuid.uuid4().hex[:6])
    wrong = "dpipeline:" + uuid.uuid4().hex
    monkeypatch.setenv("PREFECT_API_URL", auth_server.api_url)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", wrong)
    with temporary_settings(updates={PREFECT_API_URL: auth_server.api_url, PREFECT_API_AUTH_STRING: wrong}):
        with pytest.raises(PrefectAuthError) as ei:
            Pipeline.from_yaml(p).run(run_key="r1")
    assert wrong not in str(ei.value) and "does not match" in str(ei.value)
    assert not out.exists()
