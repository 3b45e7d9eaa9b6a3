"""Checks of the etcd client certificate and key, so that a TLS failure names its cause.

etcd answers an expired client certificate or a key that does not belong to it with a bare TLS
alert ("bad certificate", "Unwrap failed"), which says nothing about which file is wrong. Checked
before each connect with the `cryptography` package (imported only when a client certificate is
configured): the validity period, that the key is the certificate's, and — as a warning, once per
file — that the key is not readable by group or others. The CA file must hold PEM certificates
(checked with the stdlib's ssl).
"""

from __future__ import annotations

import datetime
import os
import ssl
import stat

import structlog

from .store import StoreError

log = structlog.get_logger()

_warned_modes: set[tuple[str, int]] = set()


def _fmt(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_ca_file(cafile: str, ca_pem: bytes) -> None:
    """Raise StoreError (one line naming the flag, the file and the fix) unless ``ca_pem`` holds PEM
    certificates the TLS library loads. A DER file (what Windows and some CAs hand out) or an empty
    one otherwise surfaced as an internal error (v2) or as gRPC's "Failed to create security
    handshaker" (v3), neither naming the file's format."""
    fix = "give the CA certificate(s) that signed etcd's server certificate, in PEM (BEGIN CERTIFICATE)"
    if not ca_pem.strip():
        raise StoreError(f"--etcd-cafile {cafile} is empty; {fix}")
    if ca_pem[:1] == b"\x30":  # an ASN.1 SEQUENCE: a DER certificate
        raise StoreError(f"--etcd-cafile {cafile} is a DER (binary) certificate, not PEM; convert it: "
                         f"openssl x509 -inform DER -in {cafile} -out {cafile}.pem")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca_pem.decode("ascii", "ignore"))
    except (ssl.SSLError, ValueError) as e:
        raise StoreError(f"--etcd-cafile {cafile} holds no usable PEM certificate ({e}); {fix}") from None


def check_tls_files(certfile: str, cert_pem: bytes | None, keyfile: str, key_pem: bytes | None,
                    now: datetime.datetime | None = None) -> None:
    """Raise StoreError (one line naming the flag, the file and the fix) when the client certificate
    cannot be parsed, has expired, is not valid yet, or `key_pem` is not its private key. Logs one
    warning per (file, mode) when keyfile is readable by group or others. Does nothing without a
    client certificate and key. `now` (UTC, for tests) defaults to the current time."""
    if keyfile:
        _warn_key_mode(keyfile)
    if not (cert_pem and key_pem):
        return
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)  # the first (leaf) certificate of the file
    except ValueError:
        raise StoreError(f"--etcd-certfile {certfile} holds no PEM certificate; give the client "
                         "certificate (BEGIN CERTIFICATE)") from None
    now = now or datetime.datetime.now(datetime.UTC)
    if now > cert.not_valid_after_utc:
        raise StoreError(f"client certificate --etcd-certfile {certfile} expired on "
                         f"{_fmt(cert.not_valid_after_utc)}; etcd refuses it: renew it")
    if now < cert.not_valid_before_utc:
        raise StoreError(f"client certificate --etcd-certfile {certfile} is not valid before "
                         f"{_fmt(cert.not_valid_before_utc)}; check this host's clock or the certificate")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise StoreError(f"--etcd-keyfile {keyfile} is encrypted; give the key unencrypted "
                         "(openssl pkey -in KEY -out KEY.plain), readable by root only") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise StoreError(f"--etcd-keyfile {keyfile} holds no usable PEM private key ({e}); give the "
                         "key of the client certificate") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise StoreError(f"--etcd-keyfile {keyfile} does not match the certificate --etcd-certfile "
                         f"{certfile} (key does not match certificate); give the key the certificate "
                         "was made for")


def _warn_key_mode(keyfile: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(keyfile).st_mode)
    except OSError:
        return  # unreadable: the caller names it
    if mode & 0o044 and (keyfile, mode) not in _warned_modes:
        _warned_modes.add((keyfile, mode))
        log.warning("--etcd-keyfile is readable by group or others: anyone who reads it can act as this "
                    "host towards etcd; chmod 600 it", keyfile=keyfile, mode=f"{mode:04o}")
