"""etcd v2 store over the HTTP API (httpx), for clusters configured the v2 way (the seed's curl).

Create-if-absent is `PUT …?prevExist=false`; TTLs are key TTLs; the watch is a long poll with
`wait=true&recursive=true&waitIndex=N`; errorCode 401 ("event index cleared") means relist.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import structlog

from .etcd_common import EtcdSettings
from .store import AuthError, CompactedError, Record, StoreError, WatchEvent

log = structlog.get_logger()

_PUT_ACTIONS = {"set", "create", "update", "compareAndSwap"}
_DEL_ACTIONS = {"delete", "expire", "compareAndDelete"}


def _expiration(node: dict) -> float | None:
    exp = node.get("expiration")
    if not exp:
        return None
    try:
        return datetime.fromisoformat(exp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class EtcdV2Store:
    api = "v2"

    def __init__(self, settings: EtcdSettings) -> None:
        self.s = settings
        self._prefix = settings.prefix.rstrip("/")
        self._idx = 0
        self._http: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            verify: ssl.SSLContext | bool = True
            cert = None
            if self.s.tls:
                ca, _key, _cert = self.s.read_tls_files()  # validates readability, names the flag
                ctx = ssl.create_default_context(cadata=ca.decode() if ca else None)
                if self.s.certfile and self.s.keyfile:
                    ctx.load_cert_chain(self.s.certfile, self.s.keyfile)
                verify = ctx
            auth = (self.s.username, self.s.password) if self.s.username else None
            # trust_env=False: REQUESTS_CA_BUNDLE & proxies from the environment must not interfere.
            self._http = httpx.AsyncClient(verify=verify, cert=cert, auth=auth, trust_env=False,
                                           timeout=httpx.Timeout(self.s.timeout))
        return self._http

    async def _reset_client(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def _url(self, path: str) -> str:
        ep = self.s.endpoints[self._idx % len(self.s.endpoints)]
        return f"{ep.url}/v2/keys{self._prefix}/{path}"

    async def _request(self, method: str, path: str, *, params=None, data=None, timeout=None) -> httpx.Response:
        last = ""
        for _ in range(len(self.s.endpoints)):
            url = self._url(path)
            try:
                kw = {"params": params, "data": data}
                if timeout is not None:
                    kw["timeout"] = timeout
                r = await self._client().request(method, url, **kw)
            except (httpx.TransportError, ssl.SSLError) as e:
                text = str(e) or type(e).__name__
                if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
                    last = f"TLS handshake with etcd {url.split('/v2/')[0]} failed ({text}); {self.s.tls_advice()}"
                    await self._reset_client()  # re-read the TLS files next time (fixed or rotated on disk)
                else:
                    last = f"etcd {url.split('/v2/')[0]} unreachable: {text}"
                if len(self.s.endpoints) > 1:
                    self._idx += 1
                    log.info("etcd endpoint failover", endpoint=self._url("").split("/v2/")[0])
                continue
            if r.status_code == 401:
                raise AuthError(f"etcd {url.split('/v2/')[0]} refused the credentials; check --etcd-username/--etcd-password")
            return r
        raise StoreError(last)

    @staticmethod
    def _json(r: httpx.Response) -> dict:
        try:
            return r.json()
        except ValueError:
            raise StoreError(f"etcd answered HTTP {r.status_code} with a non-JSON body") from None

    def _record(self, node: dict) -> Record:
        key = node["key"].rsplit("/", 1)[-1]
        val = (node.get("value") or "").encode()
        return Record(key, val, "ttl" in node or "expiration" in node, _expiration(node),
                      int(node.get("modifiedIndex", 0)))

    async def get_config(self) -> bytes | None:
        r = await self._request("GET", "config")
        if r.status_code == 404:
            return None
        d = self._json(r)
        if r.status_code != 200:
            raise StoreError(f"etcd v2 get config: {d.get('message')}")
        return (d["node"].get("value") or "").encode()

    async def list_subnets(self) -> tuple[list[Record], int]:
        r = await self._request("GET", "subnets", params={"recursive": "true", "quorum": "true"})
        index = int(r.headers.get("X-Etcd-Index", "0"))
        if r.status_code == 404:
            return [], index
        d = self._json(r)
        if r.status_code != 200:
            raise StoreError(f"etcd v2 list subnets: {d.get('message')}")
        nodes = [n for n in d["node"].get("nodes", []) if not n.get("dir")]
        return [self._record(n) for n in nodes], index

    async def get_subnet(self, key: str) -> Record | None:
        r = await self._request("GET", f"subnets/{key}", params={"quorum": "true"})
        if r.status_code == 404:
            return None
        d = self._json(r)
        if r.status_code != 200:
            raise StoreError(f"etcd v2 get {key}: {d.get('message')}")
        return self._record(d["node"])

    async def create_subnet(self, key: str, value: bytes, ttl: int | None) -> Record | None:
        data = {"value": value.decode()}
        if ttl:
            data["ttl"] = str(int(ttl))
        r = await self._request("PUT", f"subnets/{key}", params={"prevExist": "false"}, data=data)
        d = self._json(r)
        if r.status_code == 412 or d.get("errorCode") == 105:
            return None
        if r.status_code not in (200, 201):
            raise StoreError(f"etcd v2 create {key}: {d.get('message')}")
        return self._record(d["node"])

    async def put_subnet(self, key: str, value: bytes, ttl: int | None) -> Record:
        data = {"value": value.decode()}
        if ttl:
            data["ttl"] = str(int(ttl))
        r = await self._request("PUT", f"subnets/{key}", data=data)
        d = self._json(r)
        if r.status_code not in (200, 201):
            raise StoreError(f"etcd v2 put {key}: {d.get('message')}")
        return self._record(d["node"])

    async def renew_subnet(self, key: str, value: bytes, ttl: int | None) -> Record | None:
        data = {"value": value.decode()}
        if ttl:
            data["ttl"] = str(int(ttl))  # without it, the compare-and-swap leaves the key without TTL
        r = await self._request("PUT", f"subnets/{key}", params={"prevValue": value.decode()}, data=data)
        d = self._json(r)
        if d.get("errorCode") in (100, 101):  # key not found / compare failed
            return None
        if r.status_code not in (200, 201):
            raise StoreError(f"etcd v2 renew {key}: {d.get('message')}")
        return self._record(d["node"])

    async def delete_subnet(self, key: str) -> None:
        r = await self._request("DELETE", f"subnets/{key}")
        if r.status_code not in (200, 404):
            raise StoreError(f"etcd v2 delete {key}: {self._json(r).get('message')}")

    async def put_config(self, value: bytes) -> None:
        """AdminStore: write <prefix>/config without a TTL."""
        r = await self._request("PUT", "config", data={"value": value.decode()})
        if r.status_code not in (200, 201):
            raise StoreError(f"etcd v2 put config: {self._json(r).get('message')}")

    async def fill_expirations(self, records: list[Record]) -> list[Record]:
        """AdminStore: v2 nodes carry their expiration already."""
        return records

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        index = start_revision
        while True:
            # Long poll; etcd v2 holds it until an event (or ~5 min); no read timeout on purpose.
            r = await self._request("GET", "subnets", timeout=httpx.Timeout(self.s.timeout, read=None),
                                    params={"wait": "true", "recursive": "true", "waitIndex": str(index)})
            if r.status_code == 200 and not r.content:
                continue  # server closed an idle poll
            d = self._json(r)
            if d.get("errorCode") == 401:
                raise CompactedError(d.get("message", "event index cleared"))
            if r.status_code == 404:
                # The subnets directory does not exist yet: wait on it from the current index.
                index = max(index, int(r.headers.get("X-Etcd-Index", index)) + 1)
                continue
            if r.status_code != 200:
                raise StoreError(f"etcd v2 watch: {d.get('message')}")
            node = d.get("node", {})
            index = int(node.get("modifiedIndex", index)) + 1
            if node.get("dir"):
                continue
            action = d.get("action")
            if action in _PUT_ACTIONS:
                yield WatchEvent("put", self._record(node))
            elif action in _DEL_ACTIONS:
                yield WatchEvent("delete", self._record(node))

    async def close(self) -> None:
        await self._reset_client()
