"""Client-side encryption of what the pipeline keeps besides its output: checkpoints, dead letters.

AES-256-GCM from the ``cryptography`` package (no home-made crypto). An encrypted object is::

    b"DPEN" + version byte (1) + key id (8 bytes) + nonce (12 bytes) + ciphertext + GCM tag

* **Key.** 32 bytes, from an environment variable (``encryption.key_env``: base64 or 64 hex
  digits) or a Prefect Secret block (``encryption.key_secret_block``; same text formats). The
  key is read where a store is opened (the flow, every Dask worker, the CLI), is never part of
  a flow-run parameter, log, event or error message. ``dpipeline keygen`` prints a fresh one.
* **Key id.** The first 8 bytes of ``sha256("dpipeline-key-id" + key)``: a wrong key is named as
  such ("encrypted with key id X, the configured key is Y") instead of a bare tag failure.
  It reveals nothing usable about the key.
* **Associated data (AAD).** Every caller binds an object to where it belongs: a checkpoint to
  its pipeline, run key, kind, shard and generation; a dead-letter file to its pipeline, run key
  and file name. An object copied from another run, pipeline, shard or generation, or with any
  bit flipped, fails authentication and is refused (:class:`DecryptionError`).
* **Nonce.** 12 random bytes per object (``os.urandom``); a key encrypts far fewer than the
  2**32 objects at which random GCM nonces start to be a concern.

Whether a stored object is encrypted is decided by its magic, not by the configuration alone:
with encryption on, a plaintext object where an encrypted one belongs is refused too (it could
have been planted), and with encryption off an encrypted object gives a clear "configure the
key" error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, EncryptionError

if TYPE_CHECKING:
    from .config import EncryptionConfig

__all__ = [
    "ENC_MAGIC",
    "Cipher",
    "DecryptionError",
    "aad",
    "cipher_for",
    "is_encrypted",
    "new_key",
    "parse_key",
]

ENC_MAGIC = b"DPEN"
ENC_VERSION = 1
_KEY_ID_LEN = 8
_NONCE_LEN = 12
_HEADER_LEN = len(ENC_MAGIC) + 1 + _KEY_ID_LEN + _NONCE_LEN
_TAG_LEN = 16


class DecryptionError(EncryptionError):
    """An encrypted object could not be authenticated (``path``): tampered, misplaced or wrong key."""


def is_encrypted(data: bytes) -> bool:
    """True when ``data`` starts like an object written by :meth:`Cipher.encrypt`."""
    return bytes(data[: len(ENC_MAGIC)]) == ENC_MAGIC


def aad(**parts: Any) -> bytes:
    """Canonical associated data from named parts (sorted JSON: unambiguous, order-independent)."""
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()


def new_key() -> str:
    """A fresh random 256-bit key, base64-encoded (what ``key_env`` / the Secret block hold)."""
    return base64.b64encode(os.urandom(32)).decode()


def parse_key(text: str, where: str) -> bytes:
    """32 key bytes from base64 (standard or URL-safe) or 64 hex digits.

    The error names ``where`` (the variable or block), never the value.
    """
    s = (text or "").strip()
    raw: bytes | None = None
    if len(s) == 64:
        try:
            raw = bytes.fromhex(s)
        except ValueError:
            raw = None
    if raw is None:
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decode(s + "=" * (-len(s) % 4))
                break
            except (binascii.Error, ValueError):
                continue
    if raw is None or len(raw) != 32:
        raise ConfigError(
            f"encryption key from {where} is not a 256-bit key: give 32 bytes as base64 or 64 hex "
            "digits (`dpipeline keygen` prints one)",
            field="encryption", key=where,
        )
    return raw


class Cipher:
    """AES-256-GCM with a key id in the header and caller-supplied associated data.

    Args:
        key: 32 bytes.
        source: Where the key came from (``env DPIPELINE_KEY``, ``secret block x``), for messages.
    """

    def __init__(self, key: bytes, source: str = "key") -> None:
        if len(key) != 32:
            raise ConfigError(f"encryption key from {source} must be 32 bytes", field="encryption")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"dpipeline-key-id" + key).digest()[:_KEY_ID_LEN]
        self.source = source

    def __repr__(self) -> str:  # never the key
        return f"Cipher(key_id={self.key_id.hex()}, source={self.source!r})"

    def encrypt(self, data: bytes, associated: bytes) -> bytes:
        """``data`` sealed under this key, bound to ``associated``."""
        nonce = os.urandom(_NONCE_LEN)
        header = ENC_MAGIC + bytes([ENC_VERSION]) + self.key_id + nonce
        return header + self._aead.encrypt(nonce, bytes(data), header + associated)

    def decrypt(self, blob: bytes, associated: bytes, path: str) -> bytes:
        """The plaintext of ``blob``, or :class:`DecryptionError` naming ``path`` and the reason."""
        blob = bytes(blob)

        def bad(why: str) -> DecryptionError:
            return DecryptionError(f"{path}: encrypted object refused: {why}", path=path)

        if len(blob) < _HEADER_LEN + _TAG_LEN or not is_encrypted(blob):
            raise bad(f"{len(blob)} bytes, not a complete encrypted object (truncated?)")
        if blob[len(ENC_MAGIC)] != ENC_VERSION:
            raise bad(f"encryption format version {blob[len(ENC_MAGIC)]}, this library reads {ENC_VERSION}")
        key_id = blob[len(ENC_MAGIC) + 1 : len(ENC_MAGIC) + 1 + _KEY_ID_LEN]
        if key_id != self.key_id:
            raise bad(
                f"it was encrypted with key id {key_id.hex()}, the configured key ({self.source}) "
                f"has id {self.key_id.hex()}: wrong key"
            )
        header = blob[:_HEADER_LEN]
        nonce = header[-_NONCE_LEN:]
        try:
            return self._aead.decrypt(nonce, blob[_HEADER_LEN:], header + associated)
        except InvalidTag:
            raise bad(
                "AES-GCM authentication failed: the bytes were modified, or the object was copied "
                "here from another pipeline, run key, shard or generation"
            ) from None


_cache: dict[tuple[str, str], Cipher] = {}
_cache_lock = threading.Lock()


def _load_secret_block(name: str) -> str:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name, _sync=True).get()  # type: ignore[call-arg]
    except ValueError as exc:
        raise ConfigError(
            f"encryption.key_secret_block: no Secret block named {name!r} on the Prefect server "
            f"({type(exc).__name__})",
            field="encryption.key_secret_block", key=name,
        ) from None
    return value if isinstance(value, str) else str(value)


def cipher_for(cfg: "EncryptionConfig | None") -> Cipher | None:
    """The :class:`Cipher` of a pipeline's ``encryption`` section, or None when it has none.

    Environment keys are re-read on every call (cheap; a rotated variable takes effect);
    Secret blocks are read once per process and block name.
    """
    if cfg is None:
        return None
    if cfg.key_env:
        text = os.environ.get(cfg.key_env)
        if not text:
            raise ConfigError(
                f"encryption.key_env: environment variable {cfg.key_env} is not set (it must hold "
                "the 256-bit key as base64 or hex)",
                field="encryption.key_env", key=cfg.key_env,
            )
        where = f"environment variable {cfg.key_env}"
        ident = ("env", hashlib.sha256(text.encode()).hexdigest())
        with _cache_lock:
            c = _cache.get(ident)
        if c is None:
            c = Cipher(parse_key(text, where), where)
            with _cache_lock:
                _cache[ident] = c
        return c
    assert cfg.key_secret_block is not None
    ident = ("block", cfg.key_secret_block)
    with _cache_lock:
        c = _cache.get(ident)
    if c is None:
        where = f"Secret block {cfg.key_secret_block!r}"
        c = Cipher(parse_key(_load_secret_block(cfg.key_secret_block), where), where)
        with _cache_lock:
            _cache[ident] = c
    return c
