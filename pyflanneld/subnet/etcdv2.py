"""etcd v2 store over the HTTP API (httpx), for clusters configured the v2 way (the seed's curl).

Create-if-absent is `PUT …?prevExist=false`; TTLs are key TTLs; the watch is a long poll with
`wait=true&recursive=true&waitIndex=N`; errorCode 401 ("event index cleared") means relist.
Keys are upstream v0.17's: `path.Join("/v2/keys", prefix, "config")`, so `--etcd-prefix net`,
`net/` and `/net/` all read `/v2/keys/net/config`.

A silent partition (packets dropped, no RST) cannot hang the long poll: the sockets send TCP
keepalives (a dead path fails the read within ~25 s), and a poll that stays silent for
WATCH_IDLE_S is re-issued from the same index (which fails, and makes the manager relist, when
etcd is gone).

createdIndex is no creation time in v2: a plain set on an existing key (upstream v0.17 renews and
reuses its lease that way) replaces the node and gives it a new one. A newer index would make a
host's own lease lose a conflict (LeaseBook: the first created wins) against a bad entry written
since. So this store reports, as ``Record.create_revision``, the lowest createdIndex it has seen
for a key while the key existed, and writes its own updates in place (``prevExist=true``, which
keeps the index) — the behaviour of v3's create_revision.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from datetime import datetime
from urllib.parse import quote

import httpx
import structlog

from ..jsondecode import JSONValueError, decode_json
from .etcd_common import EtcdSettings, RequestDeadline, go_path_join
from .store import RECONNECTED, AdminStore, AuthError, CompactedError, Record, StoreError, WatchEvent

log = structlog.get_logger()

_MAX_RESPONSE_BYTES = 256 << 20  # a listing of every lease, far beyond any real cluster
_PUT_ACTIONS = {"set", "create", "update", "compareAndSwap"}
_DEL_ACTIONS = {"delete", "expire", "compareAndDelete"}

# A long poll silent for this long is re-issued from the same index (etcd v2 itself keeps an idle
# one open: its watch timeout is unbounded).
WATCH_IDLE_S = 60.0
# TCP keepalive on every connection: first probe after 10 s idle, then every 5 s, dead after 3
# unanswered ones — a silently dropped path is noticed within ~25 s even while a poll waits.
_KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
              (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10),
              (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
              (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]
# Characters Go's url.URL keeps unescaped in a path (upstream's v2 client builds its URLs that way).
_PATH_SAFE = "/$&+,:;=@"


def _why(e: BaseException) -> str:
    """The first non-empty message along e's causes (httpx's ReadError is often empty while the
    OSError under it says "Connection timed out"), else e's type name."""
    seen: BaseException | None = e
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(e).__name__


def _expiration(node: dict) -> float | None:
    exp = node.get("expiration")
    if not exp:
        return None
    try:
        return datetime.fromisoformat(exp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class EtcdV2Store(AdminStore):
    """The Store interface (store.py) over etcd's v2 keys API; mirrors upstream v0.17's
    subnet/etcdv2 registry. Every StoreError message starts with "etcd v2 API at <endpoint>"."""

    api = "v2"

    def __init__(self, settings: EtcdSettings) -> None:
        self.s = settings
        self._idx = 0
        self._http: httpx.AsyncClient | None = None
        self.deadline = RequestDeadline(settings.timeout_s)
        self._created: dict[str, int] = {}  # key → lowest createdIndex seen while the key existed
        self._reconnects = 0  # reconnect() calls: a watch broken by one says so

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            verify: ssl.SSLContext | bool = True
            if self.s.tls:
                ca, _key, _cert = self.s.read_tls_files()  # names the flag and file of any problem
                ctx = ssl.create_default_context(cadata=ca.decode("ascii", "ignore") if ca else None)
                if self.s.certfile and self.s.keyfile:
                    ctx.load_cert_chain(self.s.certfile, self.s.keyfile)
                verify = ctx
            auth = (self.s.username, self.s.password) if self.s.username else None
            # trust_env=False: REQUESTS_CA_BUNDLE & proxies from the environment must not interfere.
            transport = httpx.AsyncHTTPTransport(verify=verify, trust_env=False, socket_options=_KEEPALIVE)
            self._http = httpx.AsyncClient(transport=transport, auth=auth, trust_env=False)
        return self._http

    async def _reset_client(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    @property
    def _endpoint(self) -> str:
        return self.s.endpoints[self._idx % len(self.s.endpoints)].url

    def _url(self, path: str) -> str:
        return self._endpoint + quote(go_path_join("/v2/keys", self.s.prefix, path), safe=_PATH_SAFE)

    def _problem(self, what: str) -> str:
        return f"etcd v2 API at {self._endpoint}: {what}"

    async def _send(self, method: str, path: str, *, params=None, data=None, stream: bool = False) -> httpx.Response:
        """One request, failing over through the endpoints. stream=True returns once the headers are
        in (the caller reads and closes the body). Raises StoreError/AuthError naming the API."""
        last = ""
        for _ in range(len(self.s.endpoints)):
            timeout_s = self.deadline.value_s
            t0 = time.monotonic()
            try:
                client = self._client()
                req = client.build_request(method, self._url(path), params=params, data=data,
                                           timeout=httpx.Timeout(timeout_s, read=None if stream else timeout_s))
                r = await asyncio.wait_for(client.send(req, stream=stream), timeout_s)
            except (TimeoutError, httpx.TimeoutException):
                last = self._problem(f"no answer within {timeout_s:g}s")
                longer = self.deadline.timed_out()
                if longer:
                    log.warning("no answer from etcd in time; allowing longer per request from now on",
                                api="v2", endpoint=self._endpoint, timeout_s=longer)
                await self._reset_client()  # the request may have left a half-used connection
            except (httpx.TransportError, ssl.SSLError) as e:
                text = _why(e)
                if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
                    last = self._problem(f"TLS handshake failed ({text}); {self.s.tls_advice()}")
                    await self._reset_client()  # re-read the TLS files next time (fixed or rotated on disk)
                else:
                    last = self._problem(f"unreachable: {text}")
            else:
                self.deadline.answered(time.monotonic() - t0)
                if r.status_code == 401:
                    await r.aclose()
                    raise AuthError(self._problem("refused the credentials; check --etcd-username/--etcd-password"))
                if r.status_code == 404 and "json" not in r.headers.get("content-type", ""):
                    await r.aclose()
                    raise StoreError(self._problem(
                        "not served (HTTP 404 \"page not found\" on /v2/keys): etcd 3.4 and 3.5 serve the v2 "
                        "API only when started with --enable-v2=true, 3.6 not at all; enable it, or put the "
                        "config in v3 and use --etcd-api v3 (or auto)"))
                return r
            if len(self.s.endpoints) > 1:
                self._idx += 1
                log.info("etcd endpoint failover", api="v2", endpoint=self._endpoint)
        raise StoreError(last)

    def _json(self, r: httpx.Response) -> dict:
        # Bounded: directories nested under subnets/ nest the recursive listing (RecursionError).
        try:
            d = decode_json(r.content, max_bytes=_MAX_RESPONSE_BYTES)
        except JSONValueError as e:
            raise StoreError(self._problem(f"HTTP {r.status_code} with a non-JSON body ({e})")) from None
        if not isinstance(d, dict):
            raise StoreError(self._problem(f"HTTP {r.status_code} with an unexpected JSON body"))
        return d

    def _failed(self, what: str, d: dict) -> StoreError:
        return StoreError(self._problem(f"{what}: {d.get('message') or d.get('errorCode') or 'error'}"))

    def _record(self, node: dict, older: int | None = None) -> Record:
        """A node as a Record. ``older``: a createdIndex the key had before this node replaced it
        (the key never went away), kept when lower."""
        key = node["key"].rsplit("/", 1)[-1]
        val = (node.get("value") or "").encode()
        created = int(node.get("createdIndex", 0))
        if older is not None:
            created = min(created, older)
        self._created[key] = created
        return Record(key, val, "ttl" in node or "expiration" in node, _expiration(node),
                      int(node.get("modifiedIndex", 0)), create_revision=created)

    def _answer_record(self, d: dict) -> Record:
        """The Record of a write's or a watch event's answer: with a ``prevNode`` the key existed
        before, and the lowest createdIndex known for it stays."""
        node, prev = d["node"], d.get("prevNode")
        if not isinstance(prev, dict):
            return self._record(node)
        known = [int(prev.get("createdIndex", 0)) or None, self._created.get(node["key"].rsplit("/", 1)[-1])]
        return self._record(node, min((i for i in known if i is not None), default=None))

    async def get_config(self) -> bytes | None:
        r = await self._send("GET", "config")
        if r.status_code == 404:
            return None
        d = self._json(r)
        if r.status_code != 200:
            raise self._failed("get config", d)
        return (d["node"].get("value") or "").encode()

    async def list_subnets(self) -> tuple[list[Record], int]:
        # Not recursive: leases are direct children (listed with their values). Directories nested
        # under subnets/ are no leases, and listed recursively they nest the answer without bound.
        r = await self._send("GET", "subnets", params={"quorum": "true"})
        index = int(r.headers.get("X-Etcd-Index", "0"))
        if r.status_code == 404:
            return [], index
        d = self._json(r)
        if r.status_code != 200:
            raise self._failed("list subnets", d)
        nodes = [n for n in d["node"].get("nodes", []) if not n.get("dir")]
        known, self._created = self._created, {}
        return [self._record(n, known.get(n["key"].rsplit("/", 1)[-1])) for n in nodes], index

    async def create_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record | None:
        data = {"value": value.decode()}
        if ttl_s:
            data["ttl"] = str(int(ttl_s))
        r = await self._send("PUT", f"subnets/{key}", params={"prevExist": "false"}, data=data)
        d = self._json(r)
        if r.status_code == 412 or d.get("errorCode") == 105:
            return None
        if r.status_code not in (200, 201):
            raise self._failed(f"create {key}", d)
        return self._answer_record(d)

    async def put_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record:
        """Update the key in place when it exists (a plain set would replace the node and give it
        a new createdIndex), else create it."""
        data = {"value": value.decode()}
        if ttl_s:
            data["ttl"] = str(int(ttl_s))
        for exists in ("true", "false", "true"):
            r = await self._send("PUT", f"subnets/{key}", params={"prevExist": exists}, data=data)
            d = self._json(r)
            if d.get("errorCode") in (100, 105):  # not found / already exists: it just went or came
                continue
            if r.status_code not in (200, 201):
                raise self._failed(f"put {key}", d)
            return self._answer_record(d)
        raise self._failed(f"put {key}", d)

    async def renew_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record | None:
        data = {"value": value.decode()}
        if ttl_s:
            data["ttl"] = str(int(ttl_s))  # without it, the compare-and-swap leaves the key without TTL
        r = await self._send("PUT", f"subnets/{key}", params={"prevValue": value.decode()}, data=data)
        d = self._json(r)
        if d.get("errorCode") in (100, 101):  # key not found / compare failed
            return None
        if r.status_code not in (200, 201):
            raise self._failed(f"renew {key}", d)
        return self._answer_record(d)

    async def delete_subnet(self, key: str) -> None:
        r = await self._send("DELETE", f"subnets/{key}")
        if r.status_code not in (200, 404):
            raise self._failed(f"delete {key}", self._json(r))

    async def _poll(self, index: int) -> httpx.Response | None:
        """One long poll from index: the response with its body read, or None when it stayed
        silent for WATCH_IDLE_S (the caller re-issues it)."""
        r = await self._send("GET", "subnets", stream=True,
                             params={"wait": "true", "recursive": "true", "waitIndex": str(index)})
        reconnects = self._reconnects
        try:
            await asyncio.wait_for(r.aread(), WATCH_IDLE_S)
        except TimeoutError:
            log.debug("etcd v2 watch silent; polling again", seconds=WATCH_IDLE_S, wait_index=index)
            return None
        except httpx.TransportError as e:  # e.g. TCP keepalive found the path dead
            if reconnects != self._reconnects:
                raise StoreError(self._problem(RECONNECTED)) from None
            raise StoreError(self._problem(f"watch connection lost: {_why(e)}")) from None
        finally:
            await r.aclose()
        return r

    async def put_config(self, value: bytes) -> None:
        """AdminStore: write <prefix>/config without a TTL."""
        r = await self._send("PUT", "config", data={"value": value.decode()})
        if r.status_code not in (200, 201):
            raise self._failed("put config", self._json(r))

    async def fill_expirations(self, records: list[Record]) -> list[Record]:
        """AdminStore: v2 nodes carry their expiration already."""
        return records

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        index = start_revision
        while True:
            r = await self._poll(index)
            if r is None or (r.status_code == 200 and not r.content):
                continue  # silent for WATCH_IDLE_S, or etcd ended the poll without an event (empty 200)
            d = self._json(r)
            if d.get("errorCode") == 401:
                raise CompactedError(d.get("message", "event index cleared"))
            if r.status_code == 404:
                # The subnets directory does not exist yet: wait on it from the current index.
                index = max(index, int(r.headers.get("X-Etcd-Index", index)) + 1)
                continue
            if r.status_code != 200:
                raise self._failed("watch", d)
            node = d.get("node", {})
            index = int(node.get("modifiedIndex", index)) + 1
            if node.get("dir") or not str(node.get("key", "")).rsplit("/", 1)[0].endswith("/subnets"):
                continue  # a directory, or a key nested deeper: not a lease (the list skips them too)
            action = d.get("action")
            if action in _PUT_ACTIONS:
                yield WatchEvent("put", self._answer_record(d))
            elif action in _DEL_ACTIONS:
                rec = self._record(node)
                self._created.pop(rec.key, None)
                yield WatchEvent("delete", rec)

    async def reconnect(self) -> None:
        self._reconnects += 1
        await self._reset_client()

    async def close(self) -> None:
        await self._reset_client()
