"""The fsspec bridge: every storage is a URL plus ``storage_options``.

What this adds on top of fsspec, and why:

* ``${VAR}`` references in storage_options are resolved here, at the moment a filesystem is
  opened, so credentials never sit in flow parameters or fingerprints. So is ``block: NAME``
  (a ``dpipeline-storage`` Prefect block, see ``blocks.py``): only the name travels.
* :func:`atomic_write` - readers never see half an object. On object stores a PUT is atomic;
  on local disk we write a temporary sibling and ``os.replace`` it.
* :func:`translate_errors` - botocore / s3fs / OS errors become our errors with the path named
  and no credential in the text. A TLS certificate failure is terminal
  (:class:`StorageTLSError`, naming the endpoint and "certificate verify failed"), not retried.
* ``storage_options.tls`` (``ca_bundle`` / ``insecure``) is applied here (``tls.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import uuid
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from .config import expand_env
from .errors import (
    DPipelineError,
    SourceError,
    StorageError,
    StoragePermissionError,
    StorageTLSError,
    StorageUnavailableError,
)
from .tls import apply_tls

__all__ = ["Storage", "open_storage", "atomic_write", "translate_errors", "join"]


def join(*parts: str) -> str:
    """Join path parts with ``/`` (all fsspec paths use forward slashes)."""
    out = parts[0].rstrip("/")
    for p in parts[1:]:
        if p:
            out = out + "/" + p.strip("/")
    return out


class Storage:
    """A filesystem plus the root path under it, opened from a URL and storage_options.

    ``root`` is the path in the filesystem's own form (no protocol for s3fs: ``bucket/key``).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 role: str | None = None) -> None:
        """
        Args:
            url: Root URL or local path.
            storage_options: fsspec options; ``${VAR}`` resolved here, ``tls`` applied (tls.py).
            role: What this storage is to the pipeline (``source``, ``sink``, ``checkpoint``,
                ``dead_letter``); named in error messages, so a refused permission says whose
                credentials to check.
        """
        self.url = url
        self.role = role
        self._options = dict(storage_options or {})
        with translate_errors(url, role=role):
            options = expand_env(self._options, "storage_options")
            if "block" in options:  # ``block: NAME``: endpoint and credentials from a Prefect block
                from .blocks import resolve_storage

                url, options = resolve_storage(url, options)
            options = apply_tls(url, options)
            self.fs, root = url_to_fs(url, **options)
        self.root = root.rstrip("/") if root not in ("/",) else root
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        self.is_local = self.protocol in ("file", "local")

    # picklable: rebuilt (and env re-read) in the worker process
    def __reduce__(self):
        return (Storage, (self.url, self._options, self.role))

    def _errors(self, path: str, op: str):
        return translate_errors(path, op=op, role=self.role)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts) if parts else self.root

    def unstrip(self, path: str) -> str:
        """A full URL for ``path`` (as fsspec returns it), for messages and readers."""
        return self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        with self._errors(path, "read"):
            return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        with self._errors(path, "read"):
            return self.fs.cat_file(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        atomic_write(self, path, data)

    def find(self, path: str, withdirs: bool = False) -> list[str]:
        with self._errors(path, "list"):
            try:
                return sorted(self.fs.find(path, withdirs=withdirs))
            except FileNotFoundError:
                return []

    def ls(self, path: str) -> list[str]:
        with self._errors(path, "list"):
            try:
                return sorted(self.fs.ls(path, detail=False))
            except FileNotFoundError:
                return []

    def rm(self, path: str, recursive: bool = False) -> None:
        with self._errors(path, "delete"):
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

    def rm_many(self, paths: list[str]) -> None:
        if not paths:
            return
        with self._errors(paths[0], "delete"):
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                for p in paths:
                    self.rm(p)

    def makedirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)

    def open(self, path: str, mode: str = "rb", **kwargs: Any):
        with self._errors(path, "write" if "w" in mode or "a" in mode else "read"):
            if "w" in mode:
                self.makedirs(posixpath.dirname(path))
            return self.fs.open(path, mode, **kwargs)

    def size(self, path: str) -> int:
        with self._errors(path, "read"):
            return int(self.fs.size(path))

    def probe(self) -> None:
        """Write, read and delete a small object under the root; raise a clear error if any fails."""
        p = self.path(f"_dpipeline_probe_{uuid.uuid4().hex}")
        self.write_bytes(p, b"probe")
        if self.read_bytes(p) != b"probe":
            raise StorageError(f"{self.unstrip(p)}: read back different bytes", path=p)
        self.rm(p)


def open_storage(url: str, storage_options: dict[str, Any] | None = None, role: str | None = None) -> Storage:
    return Storage(url, storage_options, role)


def atomic_write(storage: Storage, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that no reader ever sees a partial object."""
    with translate_errors(path, op="write", role=getattr(storage, "role", None)):
        if storage.is_local:
            d = os.path.dirname(path)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            storage.fs.pipe_file(path, data)


_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
    "500", "502", "503", "504", "429",
}
_PERMISSION_CODES = {
    "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403", "Forbidden",
    "InvalidToken", "ExpiredToken", "AllAccessDisabled", "AccountProblem",
}
# errno values that mean "try again later": s3fs turns SlowDown / 503 into EBUSY and
# InternalError / 500 into EREMOTEIO (s3fs/errors.py), the kernel reports network trouble
# with the rest.
_TRANSIENT_ERRNOS = {
    errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.ENETDOWN, errno.EPIPE, errno.EAGAIN,
}
# Network failures of botocore (HTTPClientError family) and aiohttp (ClientConnectionError
# family), matched by class name anywhere in the exception's MRO so neither is imported here.
_NETWORK_CLASSES = {
    "HTTPClientError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ProxyConnectionError", "ClientConnectionError",
    "ServerTimeoutError", "ServerDisconnectedError", "ClientPayloadError",
    "ResponseStreamingError", "IncompleteReadError",
}
_TRANSIENT_WORDS = (
    "could not connect", "connect timeout", "endpoint url", "connection refused", "read timeout",
    "slowdown", "slow down", "service unavailable", "max retries", "connection reset",
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from (s3fs wraps botocore's ClientError)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 6:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _response_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ClientError, or ("", 0)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str((response.get("Error") or {}).get("Code", "") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    try:
        return code, int(status)
    except (TypeError, ValueError):
        return code, 0


def _is_permission(exc: BaseException, code: str, status: int) -> bool:
    lowered = f"{type(exc).__name__}: {exc}".lower()
    return (
        isinstance(exc, PermissionError) or code in _PERMISSION_CODES or status == 403
        or ("signature" in lowered and "match" in lowered) or "access denied" in lowered
        or "invalidaccesskeyid" in lowered
    )


def _is_transient(exc: BaseException, code: str, status: int) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)) or code in _TRANSIENT_CODES:
        return True
    if status >= 500 or status == 429:
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if any(c.__name__ in _NETWORK_CLASSES for c in type(exc).__mro__):
        return True
    lowered = f"{type(exc).__name__}: {exc}".lower()
    return any(w in lowered for w in _TRANSIENT_WORDS)


def _tls_failure(chain: list[BaseException]) -> str | None:
    """A message for a TLS certificate failure anywhere in ``chain``, else None.

    Names the endpoint (host:port, which aiohttp's connector errors carry) and the verifier's
    reason; never the request itself.
    """
    import ssl

    hit = None
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError) or "certificate verify failed" in str(e).lower() \
                or any(c.__name__ in ("ClientConnectorCertificateError", "SSLError") for c in type(e).__mro__):
            hit = e
            break
    if hit is None:
        return None
    host = port = None
    reason = ""
    for e in chain:
        host = host or getattr(e, "host", None)
        port = port or getattr(e, "port", None)
        if isinstance(e, ssl.SSLCertVerificationError) and not reason:
            reason = str(getattr(e, "verify_message", "") or "")
        cert_error = getattr(e, "certificate_error", None)
        if isinstance(cert_error, ssl.SSLCertVerificationError) and not reason:
            reason = str(cert_error.verify_message or "")
    if not reason:
        text = " ".join(str(e) for e in chain).lower()
        for known in ("self-signed certificate in certificate chain", "self signed certificate",
                      "unable to get local issuer certificate", "certificate has expired",
                      "hostname mismatch", "ip address mismatch"):
            if known in text:
                reason = known
                break
    endpoint = f"https://{host}:{port}" if host else "the storage endpoint"
    return (f"TLS certificate verify failed for {endpoint}" + (f" ({reason})" if reason else "")
            + ": set storage_options.tls.ca_bundle to the CA that signed its certificate")


def _classify(exc: BaseException, path: str, op: str | None = None, role: str | None = None) -> DPipelineError | None:
    """Our error for a storage client error, or None to let it through unchanged.

    Permission problems are terminal, network trouble, timeouts, S3 5xx / SlowDown and
    throttling are transient (retried). The message names ``path`` and the error's type and
    code, never the client's own text: botocore and aiohttp messages can echo request
    details, and a credential must never reach a log.
    """
    chain = _chain(exc)
    codes = [_response_code(e) for e in chain]
    tls = _tls_failure(chain)
    if tls is not None:
        return StorageTLSError(f"{role + ' ' if role else ''}{path}: {tls}", path=path)
    if any(_is_permission(e, c, st) for e, (c, st) in zip(chain, codes)):
        whose = f"{role}.storage_options credentials" if role else "credentials"
        return StoragePermissionError(
            f"{role + ' ' if role else ''}{path}: access denied by the storage"
            f"{' for ' + op if op else ''}: check the {whose} and their permissions "
            f"({type(exc).__name__})",
            path=path, **({"operation": op} if op else {}), **({"role": role} if role else {}),
        )
    if isinstance(exc, FileNotFoundError):
        return None  # callers decide what a missing object means
    if any(_is_transient(e, c, st) for e, (c, st) in zip(chain, codes)):
        code = next((c for c, _ in codes if c), "")
        return StorageUnavailableError(
            f"{path}: storage unreachable or unavailable ({type(exc).__name__}"
            f"{': ' + code if code else ''}); it may come back, the operation can be retried",
            path=path,
            code=code or None,
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
        return StorageError(f"{path}: {os.strerror(exc.errno)}", path=path)
    return None


@contextlib.contextmanager
def translate_errors(path: str, op: str | None = None, role: str | None = None) -> Iterator[None]:
    """Turn storage client errors into our errors, naming ``path`` and never a credential.

    ``op`` (read, write, list, delete) and ``role`` (source, sink, ...) are named in a
    permission error, so it says which credentials lack which permission.
    """
    try:
        yield
    except DPipelineError:
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated or re-raised
        ours = _classify(exc, path, op, role)
        if ours is None:
            raise
        raise ours from None


@lru_cache(maxsize=64)
def _cached(url: str, options_key: str, role: str | None = None) -> Storage:  # pragma: no cover - thin cache
    import json

    return Storage(url, json.loads(options_key), role)


def cached_storage(url: str, storage_options: dict[str, Any] | None = None, role: str | None = None) -> Storage:
    """A per-process cached :class:`Storage` (workers reuse connections across shards)."""
    import json

    return _cached(url, json.dumps(storage_options or {}, sort_keys=True), role)


def missing_source(path: str) -> SourceError:
    return SourceError(f"source path {path!r} does not exist or matches no file", path=path)


__all__ += ["cached_storage", "missing_source", "fsspec"]
