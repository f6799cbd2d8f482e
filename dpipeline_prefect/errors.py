"""One exception root for everything the library raises on purpose.

Two kinds matter to callers and to the retry machinery:

* :class:`TransientError` - the same call may succeed later (network, timeouts, S3 5xx,
  a lost worker). Retried.
* :class:`TerminalError` - retrying cannot help (bad config, schema mismatch, permission
  denied, a bug in a transform). Never retried; reported once, clearly.

Every error carries structured attributes (``field``, ``path``, ``key``...) so the message
names what is wrong. They are picklable across Dask processes: ``__reduce__`` rebuilds them
from their message and attributes.

This module imports nothing from the package: it is the ground floor.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DPipelineError",
    "TransientError",
    "TerminalError",
    "ConfigError",
    "SourceError",
    "SchemaMismatchError",
    "StorageError",
    "StoragePermissionError",
    "StorageUnavailableError",
    "ShardingError",
    "TransformError",
    "CheckpointError",
    "CheckpointCorruptError",
    "PipelineChangedError",
    "RunLockedError",
    "EncryptionError",
    "StorageTLSError",
    "PrefectAuthError",
]


class DPipelineError(Exception):
    """Root of every error the library raises on purpose.

    Attributes given as keyword arguments are kept in ``self.details`` and exposed as
    attributes, so ``err.path`` or ``err.field`` work when they were given.
    """

    transient: bool = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = {k: v for k, v in details.items() if v is not None}

    def __getattr__(self, name: str) -> Any:
        details = self.__dict__.get("details", {})
        if name in details:
            return details[name]
        raise AttributeError(name)

    def __reduce__(self):  # picklable across Dask worker processes
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[DPipelineError], message: str, details: dict[str, Any]) -> DPipelineError:
    return cls(message, **details)


class TransientError(DPipelineError):
    """The operation may succeed if tried again later."""

    transient = True


class TerminalError(DPipelineError):
    """Retrying cannot help; the message says what to change."""

    transient = False


class ConfigError(TerminalError):
    """The pipeline definition is invalid. ``field`` names the offending field."""


class SourceError(TerminalError):
    """The input cannot be read as configured (missing path, unreadable file)."""


class SchemaMismatchError(SourceError):
    """Two input files disagree on a column (``column``, ``path``, ``other_path``)."""


class ShardingError(TerminalError):
    """A row cannot be assigned to a shard (``key``, ``value``)."""


class TransformError(TerminalError):
    """A transform could not be imported or raised an error (``transform``)."""


class StorageError(DPipelineError):
    """Base for storage failures; ``path`` names the object."""


class StoragePermissionError(StorageError, TerminalError):
    """Credentials were refused or lack a permission (``path``)."""


class StorageTLSError(StorageError, TerminalError):
    """The storage endpoint's TLS certificate could not be verified (``path``); not retried."""


class StorageUnavailableError(StorageError, TransientError):
    """The storage endpoint could not be reached or answered with a server error."""


class CheckpointError(TerminalError):
    """Checkpoint state is unusable."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint object failed its checksum or could not be decoded (``path``)."""


class PipelineChangedError(TerminalError):
    """Checkpoints exist for a different definition of this pipeline (``changed``)."""


class RunLockedError(TerminalError):
    """Another run of the same pipeline and run key holds the lock."""


class EncryptionError(TerminalError):
    """An encrypted object cannot be read, or encryption is misconfigured (``path``)."""


class PrefectAuthError(TerminalError):
    """The Prefect API refused this client's credentials (a missing or wrong auth string)."""
