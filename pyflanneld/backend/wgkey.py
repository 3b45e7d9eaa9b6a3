"""The wireguard backend's private key file (upstream ``pkg/backend/wireguard/device.go`` setupKeys).

The key is generated once and kept in ``$WIREGUARD_KEY_FILE`` (default ``/run/flannel/wgkey``):
the base64 of 32 bytes, as ``wg genkey`` prints it (upstream writes it without a newline; a
trailing newline is accepted when reading). A restart reads the same key, so the public key in the
lease stays the same and peers keep working. Keys are X25519 (Curve25519), the private key
clamped as WireGuard does; the public key is derived with the ``cryptography`` library.

Beyond upstream: the file is created with mode 0600 from the start (upstream creates it with the
default umask, then chmods it 0400), written atomically, and a group- or world-readable existing
file is made 0600 (logged).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..subnet.lease import parse_wg_key as parse_key  # the key format, shared with the lease check

log = structlog.get_logger()

DEFAULT_KEY_FILE = "/run/flannel/wgkey"
KEY_FILE_ENV = "WIREGUARD_KEY_FILE"


class WgKeyError(ValueError):
    """A key file or key string that cannot be used; ``str()`` is one line naming the fix."""


@dataclass(frozen=True)
class KeyPair:
    """Base64 private and public key (44 characters each, as ``wg`` prints them)."""

    private: str
    public: str


def key_file_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$WIREGUARD_KEY_FILE`` if set (even empty, like Go's LookupEnv), else /run/flannel/wgkey."""
    return Path(env[KEY_FILE_ENV]) if KEY_FILE_ENV in env else Path(DEFAULT_KEY_FILE)


def encode_key(raw: bytes) -> str:
    """``raw`` key bytes as WireGuard writes keys: standard base64 text."""
    return base64.b64encode(raw).decode()


def generate_private_key() -> bytes:
    """32 random bytes, clamped for Curve25519 (what ``wg genkey`` and upstream's wgtypes do)."""
    k = bytearray(X25519PrivateKey.generate().private_bytes_raw())
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (``wg pubkey``)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def load_or_create(path: Path) -> tuple[KeyPair, bool]:
    """The key pair from ``path``, generating and writing a new private key when the file does not
    exist. Returns (keys, created). Raises WgKeyError naming the file and the fix."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raw = generate_private_key()
        _write_new(path, encode_key(raw))
        return KeyPair(encode_key(raw), encode_key(public_key(raw))), True
    except OSError as e:
        raise WgKeyError(f"could not read the wireguard private key file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        text = "\0"
    try:
        raw = parse_key(text)
    except ValueError as e:
        raise WgKeyError(f"could not parse the wireguard private key from {path} ({e}): delete the file "
                        "to have a new key generated (peers learn it from the lease)") from None
    _tighten_mode(path)
    return KeyPair(encode_key(raw), encode_key(public_key(raw))), False


def _write_new(path: Path, content: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, content.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise WgKeyError(f"could not write the wireguard private key file {path}: {e.strerror}; set "
                        f"{KEY_FILE_ENV} to a writable path") from None
    log.info("generated wireguard private key", key_file=str(path))


def _tighten_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(0o600)
            log.warning("wireguard private key file was readable by others; made it 0600",
                        key_file=str(path), old_mode=oct(mode))
    except OSError as e:
        log.warning("could not check the wireguard key file's mode", key_file=str(path), error=e.strerror)
