"""TLS for S3 storage: a CA bundle option, no silent ``verify: false``, and test certificates.

In any section's ``storage_options`` (source, sink, checkpoint, dead_letter)::

    storage_options:
      client_kwargs: {endpoint_url: https://s3.internal:8443}
      tls:
        ca_bundle: /etc/ssl/internal-ca.pem   # trust this CA (PEM) for the endpoint
        # insecure: true                       # skip certificate checks (warns on every open)

:func:`apply_tls` turns ``tls`` into what s3fs / aiobotocore understand
(``client_kwargs.verify``) when a filesystem is opened. ``client_kwargs.verify: false`` written
by hand is refused unless ``tls.insecure: true`` says it was meant; then a warning names the
storage on every open. Certificate failures come out of ``storage.translate_errors`` as
:class:`~dpipeline_prefect.errors.StorageTLSError` (terminal, never retried) naming the endpoint
and "certificate verify failed".

:func:`make_certificates` writes a throw-away CA and a server certificate for ``127.0.0.1``
(``subjectAltName=IP:127.0.0.1``), for ``devservices.SeaweedFS(tls=True)`` and the tests.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["apply_tls", "check_tls_options", "make_certificates", "TLS_KEY"]

log = logging.getLogger("dpipeline_prefect.tls")

TLS_KEY = "tls"
_TLS_FIELDS = {"ca_bundle", "insecure"}
_S3_PROTOCOLS = ("s3", "s3a")


def _falsy(v: Any) -> bool:
    return v is False or (isinstance(v, str) and v.strip().lower() in ("false", "0", "no", "off"))


def check_tls_options(options: dict[str, Any], where: str = "storage_options") -> None:
    """Validate the ``tls`` entry of storage options (shape only; paths may be ``${VAR}``).

    Raises:
        ConfigError: naming ``where`` and the offending field.
    """
    tls = options.get(TLS_KEY)
    verify = (options.get("client_kwargs") or {}).get("verify") if isinstance(options.get("client_kwargs"), dict) else None
    if tls is None:
        if _falsy(verify):
            raise ConfigError(
                f"{where}.client_kwargs.verify: false turns TLS certificate checks off; refused "
                f"unless you also set {where}.tls.insecure: true",
                field=f"{where}.client_kwargs.verify",
            )
        return
    if not isinstance(tls, dict):
        raise ConfigError(f"{where}.tls must be a mapping with ca_bundle and/or insecure",
                          field=f"{where}.tls")
    unknown = set(tls) - _TLS_FIELDS
    if unknown:
        raise ConfigError(f"{where}.tls.{sorted(unknown)[0]}: unknown field; allowed here: ca_bundle, insecure",
                          field=f"{where}.tls")
    insecure = tls.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where}.tls.insecure must be true or false", field=f"{where}.tls.insecure")
    ca = tls.get("ca_bundle")
    if ca is not None and (not isinstance(ca, str) or not ca):
        raise ConfigError(f"{where}.tls.ca_bundle must be a path to a PEM file", field=f"{where}.tls.ca_bundle")
    if insecure and ca:
        raise ConfigError(f"{where}.tls: give ca_bundle or insecure, not both", field=f"{where}.tls")
    if _falsy(verify) and not insecure:
        raise ConfigError(
            f"{where}.client_kwargs.verify: false turns TLS certificate checks off; refused unless "
            f"{where}.tls.insecure: true", field=f"{where}.client_kwargs.verify")


def apply_tls(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Storage options (already ``${VAR}``-expanded) with ``tls`` turned into client settings.

    Returns a new dict; ``options`` is left as it is.

    Raises:
        ConfigError: bad ``tls`` entry, a CA bundle that does not exist, or ``tls`` on a
            storage that is not S3.
    """
    check_tls_options(options)
    tls = options.get(TLS_KEY)
    if tls is None:
        return options
    out = {k: v for k, v in options.items() if k != TLS_KEY}
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in _S3_PROTOCOLS:
        raise ConfigError(f"storage_options.tls applies to s3:// storage, not {protocol}:// ({url})",
                          field="storage_options.tls")
    ck = dict(out.get("client_kwargs") or {})
    if tls.get("insecure"):
        ck["verify"] = False
        log.warning("TLS certificate verification is OFF for %s (storage_options.tls.insecure: true)", url)
    elif tls.get("ca_bundle"):
        ca = os.path.expanduser(str(tls["ca_bundle"]))
        if not os.path.isfile(ca):
            raise ConfigError(f"storage_options.tls.ca_bundle {ca!r} does not exist (storage {url})",
                              field="storage_options.tls.ca_bundle", path=ca)
        ck["verify"] = ca
    out["client_kwargs"] = ck
    return out


def make_certificates(folder: str | os.PathLike[str], ip: str = "127.0.0.1",
                      name: str = "dpipeline test CA", days: int = 7) -> dict[str, Path]:
    """A fresh CA plus a server certificate for ``ip`` signed by it, as PEM files.

    Returns:
        ``{"ca": ca.pem, "cert": server.pem, "key": server-key.pem}`` under ``folder`` (the
        key file is mode 0600).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server-key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return paths
