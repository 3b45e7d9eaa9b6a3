"""etcd v3 store over aetcd (gRPC, asyncio), with TLS, auth and endpoint failover.

Leases are etcd leases: each create/renew grants a fresh lease of `ttl` seconds and writes the key
with it (upstream's behaviour); we also revoke the lease we replaced, so none pile up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import aetcd
import grpc
import structlog
from aetcd import exceptions as aex
from aetcd import rpc

from .etcd_common import Endpoint, EtcdSettings
from .store import AuthError, CompactedError, Record, StoreError, WatchEvent

log = structlog.get_logger()

_GRPC_OPTIONS = {
    # Notice a dead connection (partition, killed member) within ~15 s even when idle.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2_000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}


class _Client(aetcd.Client):
    """aetcd.Client plus TLS: same connect(), with a secure channel when credentials are given."""

    def __init__(self, *a, credentials: grpc.ChannelCredentials | None = None, **kw):
        super().__init__(*a, **kw)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            opts = list(self._options.items())
            if self._credentials is not None:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options=opts)
            else:
                self.channel = grpc.aio.insecure_channel(target, options=opts)
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                try:
                    resp = await self.auth_stub.Authenticate(
                        rpc.AuthenticateRequest(name=self._username, password=self._password),
                        timeout=self._timeout,
                    )
                except rpc.AioRpcError as e:
                    await self.channel.close()
                    self.channel = None
                    aex._handle_exception(e)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def _describe(e: BaseException, ep: Endpoint, settings: EtcdSettings) -> str:
    text = str(e) or type(e).__name__
    low = text.lower()
    # "TSI_DATA_CORRUPTED" (Unwrap failed): the server dropped the session, e.g. no client certificate
    if any(w in low for w in ("certificate", "ssl", "handshake", "tsi_")):
        return f"TLS handshake with etcd {ep.url} failed ({text}); {settings.tls_advice()}"
    return f"etcd {ep.url} unreachable: {text}"


class EtcdV3Store:
    api = "v3"

    def __init__(self, settings: EtcdSettings) -> None:
        self.s = settings
        self._prefix = settings.prefix.rstrip("/")
        self._subnets = f"{self._prefix}/subnets/".encode()
        self._idx = 0
        self._client_obj: _Client | None = None
        self._lease_ids: dict[str, int] = {}
        self._creds: grpc.ChannelCredentials | None = None
        self._creds_loaded = False

    # -- connection management -------------------------------------------------------------
    @property
    def endpoint(self) -> Endpoint:
        return self.s.endpoints[self._idx % len(self.s.endpoints)]

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if not self.s.tls:
            return None
        ca, key, cert = self.s.read_tls_files()  # re-read each connect: fixes on disk are picked up
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    async def _client(self) -> _Client:
        if self._client_obj is None:
            ep = self.endpoint
            self._client_obj = _Client(
                host=ep.host,
                port=ep.port,
                username=self.s.username or None,
                password=self.s.password if self.s.username else None,
                timeout=self.s.timeout,
                options=dict(_GRPC_OPTIONS),
                credentials=self._credentials(),
            )
        return self._client_obj

    async def _drop_client(self, rotate: bool) -> None:
        c, self._client_obj = self._client_obj, None
        if c is not None:
            try:
                await asyncio.wait_for(c.close(), 2)
            except Exception:  # noqa: BLE001 - closing a broken channel may fail; we drop it anyway
                pass
        if rotate and len(self.s.endpoints) > 1:
            self._idx += 1
            log.info("etcd endpoint failover", endpoint=self.endpoint.url)

    async def _call(self, op):
        """Run op(client); on a transport failure try the next endpoint, then give up (StoreError)."""
        last: str = ""
        for _ in range(len(self.s.endpoints)):
            ep = self.endpoint
            try:
                client = await self._client()
                return await op(client)
            except aex.UnauthenticatedError as e:
                await self._drop_client(rotate=False)
                raise AuthError(f"etcd {ep.url} refused the credentials ({e}); check --etcd-username/--etcd-password") from None
            except aex.InvalidArgumentError as e:
                if "authentication failed" in str(e) or "user name" in str(e):
                    await self._drop_client(rotate=False)
                    raise AuthError(f"etcd {ep.url} refused the credentials ({e}); check --etcd-username/--etcd-password") from None
                raise StoreError(f"etcd {ep.url}: {e}") from None
            except (TimeoutError, aex.ConnectionFailedError, aex.ConnectionTimeoutError, aex.InternalError, aex.WatchTimeoutError) as e:
                last = _describe(e, ep, self.s)
                await self._drop_client(rotate=True)
            except aex.ClientError as e:
                raise StoreError(f"etcd {ep.url}: {e}") from None
        raise StoreError(last)

    # -- Store interface ---------------------------------------------------------------------
    async def get_config(self) -> bytes | None:
        key = f"{self._prefix}/config".encode()
        r = await self._call(lambda c: c.get(key))
        return None if r is None else r.value

    def _record(self, kv) -> Record:
        key = kv.key.decode("utf-8", "replace").rsplit("/", 1)[-1]
        return Record(key=key, value=kv.value, has_ttl=kv.lease != 0, expiration=None, revision=kv.mod_revision)

    async def list_subnets(self) -> tuple[list[Record], int]:
        r = await self._call(lambda c: c.get_prefix(self._subnets))
        recs = [self._record(kv) for kv in r.kvs]
        for kv in r.kvs:
            if kv.lease:
                self._lease_ids[self._record(kv).key] = kv.lease
        return recs, r.header.revision

    async def get_subnet(self, key: str) -> Record | None:
        r = await self._call(lambda c: c.get(self._subnets + key.encode()))
        return None if r is None else self._record(r)

    async def _grant(self, c: _Client, ttl: int | None) -> int:
        if not ttl:
            return 0
        lease = await c.lease(int(ttl))
        return lease.id

    async def create_subnet(self, key: str, value: bytes, ttl: int | None) -> Record | None:
        k = self._subnets + key.encode()

        async def op(c: _Client):
            lease_id = await self._grant(c, ttl)
            t0 = time.time()
            ok, resp = await c.transaction(
                compare=[c.transactions.version(k) == 0],
                success=[c.transactions.put(k, value, lease=lease_id)],
                failure=[],
            )
            if not ok:
                if lease_id:
                    await c.revoke_lease(lease_id)
                return None
            if lease_id:
                self._lease_ids[key] = lease_id
            rev = resp[0].response_put.header.revision
            return Record(key, value, bool(ttl), t0 + ttl if ttl else None, rev)

        return await self._call(op)

    async def put_subnet(self, key: str, value: bytes, ttl: int | None) -> Record:
        k = self._subnets + key.encode()

        async def op(c: _Client):
            lease_id = await self._grant(c, ttl)
            t0 = time.time()
            r = await c.put(k, value, lease=lease_id)
            old = self._lease_ids.pop(key, 0)
            if lease_id:
                self._lease_ids[key] = lease_id
            if old and old != lease_id:
                try:
                    await c.revoke_lease(old)
                except aex.ClientError:
                    pass  # already expired, or granted by another daemon
            return Record(key, value, bool(ttl), t0 + ttl if ttl else None, r.header.revision)

        return await self._call(op)

    async def renew_subnet(self, key: str, value: bytes, ttl: int | None) -> Record | None:
        k = self._subnets + key.encode()

        async def op(c: _Client):
            lease_id = await self._grant(c, ttl)
            t0 = time.time()
            ok, resp = await c.transaction(
                compare=[c.transactions.value(k) == value],
                success=[c.transactions.put(k, value, lease=lease_id)],
                failure=[],
            )
            if not ok:
                if lease_id:
                    await c.revoke_lease(lease_id)
                return None
            old = self._lease_ids.pop(key, 0)
            if lease_id:
                self._lease_ids[key] = lease_id
            if old and old != lease_id:
                try:
                    await c.revoke_lease(old)
                except aex.ClientError:
                    pass
            return Record(key, value, bool(ttl), t0 + ttl if ttl else None, resp[0].response_put.header.revision)

        return await self._call(op)

    async def delete_subnet(self, key: str) -> None:
        await self._call(lambda c: c.delete(self._subnets + key.encode()))
        self._lease_ids.pop(key, None)

    async def put_config(self, value: bytes) -> None:
        """AdminStore: write <prefix>/config without a lease."""
        key = f"{self._prefix}/config".encode()
        await self._call(lambda c: c.put(key, value))

    async def fill_expirations(self, records: list[Record]) -> list[Record]:
        """AdminStore: expiration from LeaseTimeToLive for every record listed with a lease (the
        lease ids come from the last list_subnets); a lease already gone reads as expiring now."""

        async def one(rec: Record) -> Record:
            lease_id = self._lease_ids.get(rec.key, 0)
            if not rec.has_ttl or not lease_id or rec.expiration is not None:
                return rec
            info = await self._call(lambda c: c.get_lease_info(lease_id, keys=False))
            return dataclasses.replace(rec, expiration=time.time() + max(int(info.TTL), 0))

        return list(await asyncio.gather(*(one(r) for r in records)))

    async def watch_subnets(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        ep = self.endpoint
        try:
            client = await self._client()
            w = await client.watch_prefix(self._subnets, start_revision=start_revision)
        except aex.RevisionCompactedError as e:
            raise CompactedError(str(e)) from None
        except aex.UnauthenticatedError as e:
            await self._drop_client(rotate=False)
            raise AuthError(f"etcd {ep.url} refused the credentials ({e})") from None
        except (TimeoutError, aex.ClientError) as e:
            await self._drop_client(rotate=True)
            raise StoreError(_describe(e, ep, self.s)) from None
        try:
            async for ev in w:
                rec = self._record(ev.kv)
                if ev.kind == "PUT":
                    yield WatchEvent("put", rec)
                else:
                    self._lease_ids.pop(rec.key, None)
                    yield WatchEvent("delete", rec)
            raise StoreError(f"etcd {ep.url}: watch ended")
        except aex.RevisionCompactedError as e:
            raise CompactedError(str(e)) from None
        except aex.ClientError as e:
            await self._drop_client(rotate=True)
            raise StoreError(_describe(e, ep, self.s)) from None
        finally:
            try:
                await asyncio.wait_for(w.cancel(), 1)
            except Exception:  # noqa: BLE001 - stream may already be gone
                pass

    async def close(self) -> None:
        await self._drop_client(rotate=False)
