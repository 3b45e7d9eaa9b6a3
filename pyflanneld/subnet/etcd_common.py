"""What both etcd stores share: endpoints and their credentials, key paths, TLS/auth settings and
the adaptive per-request deadline."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..options import mask_url_passwords, split_urls, split_userinfo
from .etcd_tls import check_ca_file, check_tls_files
from .store import StoreError

# Upper bound of the adaptive request deadline (RequestDeadline): a link slower than this is down.
MAX_REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """One etcd client URL without its credentials (those go to EtcdSettings.username/password)."""

    scheme: str  # "http" or "https"
    host: str
    port: int

    @property
    def url(self) -> str:
        """The endpoint as a URL without credentials: ``scheme://host:port`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd (the daemon's ``--etcd-*`` flags): the endpoints tried in turn, the key prefix
    (``--etcd-prefix``), TLS files, basic-auth credentials (the password never shown by ``repr``),
    and the first per-request deadline in seconds. Build it with :meth:`from_flags`."""
    endpoints: tuple[Endpoint, ...]
    prefix: str
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = ""  # never logged: see __repr__
    timeout_s: float = 5.0  # first per-request deadline; adapts (RequestDeadline)

    def __repr__(self) -> str:
        return (f"EtcdSettings(endpoints={[e.url for e in self.endpoints]}, prefix={self.prefix!r}, "
                f"cafile={self.cafile!r}, certfile={self.certfile!r}, keyfile={self.keyfile!r}, "
                f"username={self.username!r}, password={'***' if self.password else ''!r})")

    @classmethod
    def from_flags(cls, *, endpoints: str, prefix: str, cafile: str = "", certfile: str = "", keyfile: str = "",
                   username: str = "", password: str = "") -> EtcdSettings:
        """Settings from the --etcd-* flag values. Credentials may also come inside the endpoint URLs
        (`http://user:password@host:2379`, percent-encoded, as etcdctl users write them): they are used
        for every endpoint. Raises ValueError (one line, no password in it) when the endpoints are
        malformed or carry credentials that contradict each other or --etcd-username/--etcd-password."""
        eps, url_user, url_password = parse_endpoints(endpoints)
        if url_user is not None:
            if username and username != url_user:
                raise ValueError(f"--etcd-endpoints names user {url_user!r} but --etcd-username says "
                                 f"{username!r}: give the credentials in one place")
            username = url_user
        if url_password is not None:
            if password and password != url_password:
                raise ValueError("--etcd-endpoints carries a password that differs from --etcd-password: "
                                 "give the credentials in one place")
            password = url_password
        return cls(endpoints=eps, prefix=prefix, cafile=cafile, certfile=certfile, keyfile=keyfile,
                   username=username, password=password)

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
        """(ca, key, cert) bytes, read afresh (a file fixed or rotated on disk is picked up).

        Raises StoreError naming the flag and file when one cannot be read, when the CA file holds
        no PEM certificate, when the client certificate has expired or is not valid yet, or when
        the key does not belong to it (checked here because etcd's TLS alert does not say which);
        warns once when the key is readable by group or others (etcd_tls)."""
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
        ca, key, cert = out
        if ca is not None:
            check_ca_file(self.cafile, ca)
        check_tls_files(self.certfile, cert, self.keyfile, key)
        return ca, key, cert


def parse_endpoints(spec: str) -> tuple[tuple[Endpoint, ...], str | None, str | None]:
    """`http://a:2379,https://user:pw@b:2379` → (endpoints, username, password).

    username/password are the (percent-decoded) credentials found in the URLs, None when no URL
    has any. The userinfo runs to the last '@' of an endpoint, so an unencoded '@', '/', ' ' or ','
    in a password is read as part of it (options.split_urls/split_userinfo). Raises ValueError with
    a clear text, passwords masked, when an endpoint is malformed, carries a password without a
    user name, or two endpoints carry different credentials."""
    eps = []
    creds: set[tuple[str, str | None]] = set()
    for raw in split_urls(spec):
        raw = raw.strip()
        if not raw:
            continue
        shown = mask_url_passwords(raw)
        userinfo, hostpart = split_userinfo(raw)
        u = urlsplit(hostpart if "://" in hostpart else f"http://{hostpart}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"invalid etcd endpoint {shown!r}: expected http(s)://host:port")
        try:
            port = u.port or 2379
        except ValueError:
            raise ValueError(f"invalid etcd endpoint {shown!r}: bad port") from None
        if userinfo is not None:
            user, colon, password = userinfo.partition(":")
            if not user:
                raise ValueError(f"etcd endpoint {shown!r} carries a password but no user name: write "
                                 "http://USER:PASSWORD@host:port, or use --etcd-username/--etcd-password")
            creds.add((unquote(user), unquote(password) if colon else None))
        eps.append(Endpoint(u.scheme, u.hostname, port))
    if not eps:
        raise ValueError("no etcd endpoint given: set --etcd-endpoints")
    if len(creds) > 1:
        raise ValueError("the --etcd-endpoints URLs carry different credentials; etcd has one set per "
                         "cluster: give the same user:password in each, or use --etcd-username/--etcd-password")
    user, password = creds.pop() if creds else (None, None)
    return tuple(eps), user, password


def go_path_join(*parts: str) -> str:
    """Go's path.Join: join the non-empty parts with "/" and clean the result ("" when all are empty).

    Upstream builds every etcd key this way (path.Join(prefix, "config")): `net/a` → `net/a/config`,
    `/net/b/` → `/net/b/config` (no slash added or removed at the front)."""
    joined = "/".join(p for p in parts if p)
    if not joined:
        return ""
    cleaned = posixpath.normpath(joined)
    # Go's Clean also folds a leading "//" (POSIX keeps it) and never returns "." for a real path.
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


class RequestDeadline:
    """The per-request deadline of one store, following the round trip etcd really has.

    It starts at `base_s` (5 s). A request that runs out of time doubles it (up to
    MAX_REQUEST_TIMEOUT_S), so a link with a 6 s round trip works after a retry or two instead of
    never; an answer brings it back towards max(base_s, 4 × that answer's time), so one slow
    moment does not slow the detection of a dead member for good. Not thread-safe (one event loop).
    """

    def __init__(self, base_s: float, max_s: float = MAX_REQUEST_TIMEOUT_S) -> None:
        self.base_s = base_s
        self.max_s = max(max_s, base_s)
        self.value_s = base_s

    def timed_out(self) -> float | None:
        """Record a request that ran out of time; the new, longer deadline (seconds) or None at the cap."""
        if self.value_s >= self.max_s:
            return None
        self.value_s = min(self.value_s * 2, self.max_s)
        return self.value_s

    def answered(self, elapsed_s: float) -> None:
        """Record a request answered after elapsed_s seconds."""
        self.value_s = max(self.base_s, min(self.value_s, 4 * elapsed_s))
