"""What both etcd stores share: endpoint parsing and TLS/auth settings."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from .store import StoreError


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "http" or "https"
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[Endpoint, ...]
    prefix: str
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = ""  # never logged: see __repr__
    timeout: float = 5.0

    def __repr__(self) -> str:
        return (f"EtcdSettings(endpoints={[e.url for e in self.endpoints]}, prefix={self.prefix!r}, "
                f"cafile={self.cafile!r}, certfile={self.certfile!r}, keyfile={self.keyfile!r}, "
                f"username={self.username!r}, password={'***' if self.password else ''!r})")

    @property
    def tls(self) -> bool:
        """TLS when an endpoint says https, or a client certificate is configured (as upstream)."""
        return any(e.scheme == "https" for e in self.endpoints) or bool(self.certfile and self.keyfile)

    def tls_advice(self) -> str:
        """What to check after a failed TLS handshake: the files given, or the client cert flags."""
        files = ", ".join(f"{flag} {path}" for flag, path in (("--etcd-cafile", self.cafile),
                                                               ("--etcd-certfile", self.certfile),
                                                               ("--etcd-keyfile", self.keyfile)) if path)
        advice = f"check {files or 'the TLS flags (none given)'}"
        if not (self.certfile and self.keyfile):
            advice += ("; if etcd requires client certificates (--client-cert-auth), set --etcd-certfile "
                       "and --etcd-keyfile")
        return advice

    def read_tls_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(ca, key, cert) bytes; a missing/unreadable file is a StoreError naming the flag and file."""
        out = []
        for flag, path in (("--etcd-cafile", self.cafile), ("--etcd-keyfile", self.keyfile),
                           ("--etcd-certfile", self.certfile)):
            if not path:
                out.append(None)
                continue
            try:
                with open(path, "rb") as f:
                    out.append(f.read())
            except OSError as e:
                raise StoreError(f"cannot read {flag} {path}: {e.strerror}; fix the path or the file's permissions") from None
        return out[0], out[1], out[2]


def parse_endpoints(spec: str) -> tuple[Endpoint, ...]:
    """`http://a:2379,https://b:2379` → endpoints; raises ValueError with a clear text."""
    eps = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            continue
        u = urlsplit(raw if "://" in raw else f"http://{raw}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"invalid etcd endpoint {raw!r}: expected http(s)://host:port")
        try:
            port = u.port or 2379
        except ValueError:
            raise ValueError(f"invalid etcd endpoint {raw!r}: bad port") from None
        eps.append(Endpoint(u.scheme, u.hostname, port))
    if not eps:
        raise ValueError("no etcd endpoint given: set --etcd-endpoints")
    return tuple(eps)
