"""etcd v3 store over aetcd (gRPC, asyncio), with TLS, auth and endpoint failover.

Leases are etcd leases: each create/renew grants a fresh lease of `ttl_s` seconds and writes the key
with it (upstream's behaviour); we also revoke the lease we replaced, so none pile up.
"""

from __future__ import annotations

import os

# gRPC's C core logs TLS and connection failures itself, raw and several times a second
# ("E1130 … ssl_transport_security…"); the store's one structured line says it better. Read by
# grpc when it is first imported, so set before that; GRPC_VERBOSITY=ERROR (or DEBUG) in the
# environment brings its lines back for debugging.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402

import aetcd  # noqa: E402
import grpc  # noqa: E402
import structlog  # noqa: E402
from aetcd import exceptions as aex  # noqa: E402
from aetcd import rpc  # noqa: E402
from aetcd.watcher import Watcher  # noqa: E402

from .etcd_common import Endpoint, EtcdSettings, RequestDeadline, go_path_join  # noqa: E402
from .store import RECONNECTED, AdminStore, AuthError, CompactedError, Record, StoreError, WatchEvent  # noqa: E402

log = structlog.get_logger()

_GRPC_OPTIONS = {
    # Notice a dead connection (partition, killed member) within ~20 s even when idle: a ping every
    # 10 s, unanswered for keepalive_timeout_ms (2 × the request deadline, so a slow link is not
    # mistaken for a dead one; set per channel in EtcdV3Store._client).
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2_000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}

# etcd's answers that mean "fetch a new token" (rpctypes.ErrGRPCInvalidAuthToken: a simple token
# unused for --auth-token-ttl, or lost with an etcd restart; ErrGRPCAuthOldRevision: auth changed).
_STALE_TOKEN = ("invalid auth token", "revision of auth store is old")
_BAD_CREDENTIALS = ("authentication failed", "user name")
_auth_disabled_said: set[str] = set()


class _Watcher(Watcher):
    """aetcd's Watcher, plus: a watch etcd cancels (at creation — permission denied, a stale token —
    or later) ends with an error instead of silently delivering nothing for ever."""

    async def _handle_response(self, response):
        if not response.canceled or response.compact_revision:
            await super()._handle_response(response)  # events, compaction (aetcd handles it)
            return
        err = aex.ClientError(f"watch canceled by etcd: {response.cancel_reason or 'no reason given'}")
        async with self._lock:
            if response.created and self._new_callback is not None:
                self._new_callback.error = err
                self._new_callback_ready.notify_all()
                return
            callback = self._callbacks.pop(response.watch_id, None)
        if callback is not None:  # None: a watch we cancelled ourselves
            await self._process_callback(callback, err)


class _Client(aetcd.Client):
    """aetcd.Client plus TLS (a secure channel when credentials are given), re-authentication with
    the same channel, and a fresh watch stream on demand (carrying the current token)."""

    def __init__(self, *a, credentials: grpc.ChannelCredentials | None = None, **kw):
        super().__init__(*a, **kw)
        self._credentials = credentials

    def set_timeout(self, seconds: float) -> None:
        """The deadline of every following call (aetcd reads it per call)."""
        self._timeout = seconds
        self._connect_wait_timeout = seconds

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
            try:
                await self.authenticate()
            except aex.ClientError:
                await self.channel.close()
                self.channel = None
                raise
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = self._new_watcher()
            self._connected.set()
        finally:
            self._is_connecting = False

    async def authenticate(self) -> None:
        """Fetch a token for username/password into self.metadata (no-op without a username).

        An etcd without authentication answers "authentication is not enabled": go on without a
        token, as etcd's Go client (and so upstream flanneld) does. Raises aetcd ClientErrors."""
        if self._username is None:
            return
        if self.auth_stub is None:
            self.auth_stub = rpc.AuthStub(self.channel)
        try:
            resp = await self.auth_stub.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password or ""),
                timeout=self._timeout,
            )
        except rpc.AioRpcError as e:
            if "authentication is not enabled" in (e.details() or ""):
                self.metadata = None
                target = f"{self._host}:{self._port}"
                if target not in _auth_disabled_said:
                    _auth_disabled_said.add(target)
                    log.info("etcd has authentication disabled; going on without the credentials given", endpoint=target)
                return
            aex._handle_exception(e)
        self.metadata = (("token", resp.token),)

    def _new_watcher(self) -> Watcher:
        return _Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)

    async def renew_watcher(self) -> None:
        """Close the watch stream (there must be no live watch on it) and open the next watches on
        a new one: it carries the current token and deadline (a stream authenticates once, when
        it starts, and etcd refuses new watches on a stream whose token has expired)."""
        await self.connect()
        old, self._watcher = self._watcher, self._new_watcher()
        if old is not None:
            await old.shutdown()


def _describe(e: BaseException, ep: Endpoint, settings: EtcdSettings) -> str:
    text = str(e) or type(e).__name__
    low = text.lower()
    # "TSI_DATA_CORRUPTED" (Unwrap failed): the server dropped the session, e.g. no client certificate
    if any(w in low for w in ("certificate", "ssl", "handshake", "tsi_")):
        return f"etcd v3 API at {ep.url}: TLS handshake failed ({text}); {settings.tls_advice()}"
    return f"etcd v3 API at {ep.url}: unreachable: {text}"


class EtcdV3Store(AdminStore):
    """The Store interface (store.py) over etcd's v3 API; mirrors upstream v0.20's
    pkg/subnet/etcd registry (keys: Go path.Join(prefix, ...), no slash added). Every StoreError
    message starts with "etcd v3 API at <endpoint>"."""

    api = "v3"

    def __init__(self, settings: EtcdSettings) -> None:
        self.s = settings
        self._config_key = go_path_join(settings.prefix, "config").encode()
        self._subnets = (go_path_join(settings.prefix, "subnets") + "/").encode()
        self._idx = 0
        self._client_obj: _Client | None = None
        self._lease_ids: dict[str, int] = {}
        self.deadline = RequestDeadline(settings.timeout_s)
        self._reconnects = 0  # reconnect() calls: a watch broken by one says so

    # -- connection management -------------------------------------------------------------
    @property
    def endpoint(self) -> Endpoint:
        """The endpoint in use now (the next one is tried after a connection failure)."""
        return self.s.endpoints[self._idx % len(self.s.endpoints)]

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if not self.s.tls:
            return None
        ca, key, cert = self.s.read_tls_files()  # re-read each connect: fixes on disk are picked up
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    async def _client(self) -> _Client:
        if self._client_obj is None:
            ep = self.endpoint
            options = dict(_GRPC_OPTIONS)
            options["grpc.keepalive_timeout_ms"] = int(2_000 * self.deadline.value_s)
            self._client_obj = _Client(
                host=ep.host,
                port=ep.port,
                username=self.s.username or None,
                password=self.s.password if self.s.username else None,
                timeout=self.deadline.value_s,
                options=options,
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
            log.info("etcd endpoint failover", api="v3", endpoint=self.endpoint.url)

    @staticmethod
    def _problem(ep: Endpoint, what: str) -> str:
        return f"etcd v3 API at {ep.url}: {what}"

    async def _call(self, op):
        """Run op(client) under the current deadline and return its result.

        A stale auth token is renewed (one info line) and op run again, once. A timeout lengthens
        the deadline and, like a transport failure, moves on to the next endpoint; when every
        endpoint failed: StoreError. Refused credentials: AuthError. A compacted watch start
        revision: CompactedError."""
        last = ""
        tries = len(self.s.endpoints)
        stale_token = reauthenticated = False
        while tries > 0:
            ep = self.endpoint
            timeout_s = self.deadline.value_s
            t0 = time.monotonic()
            try:
                client = await self._client()
                client.set_timeout(timeout_s)
                if stale_token:
                    # etcd forgot our token (unused for its --auth-token-ttl, or etcd restarted):
                    # a new one on the same channel, and the call again
                    await client.authenticate()
                    log.info("etcd auth token expired; authenticated again", endpoint=ep.url)
                    stale_token, reauthenticated = False, True
                result = await op(client)
            except aex.RevisionCompactedError as e:
                raise CompactedError(str(e)) from None
            except (aex.UnauthenticatedError, aex.InvalidArgumentError) as e:
                text = str(e)
                if any(m in text for m in _STALE_TOKEN) and not reauthenticated:
                    stale_token = True
                    continue
                if isinstance(e, aex.UnauthenticatedError) or any(m in text for m in _BAD_CREDENTIALS):
                    await self._drop_client(rotate=False)
                    raise AuthError(self._problem(ep, f"refused the credentials ({text}); check "
                                                      "--etcd-username/--etcd-password")) from None
                raise StoreError(self._problem(ep, text)) from None
            except (TimeoutError, aex.ConnectionTimeoutError, aex.WatchTimeoutError):
                last = self._problem(ep, f"no answer within {timeout_s:g}s")
                longer = self.deadline.timed_out()
                if longer:
                    log.warning("no answer from etcd in time; allowing longer per request from now on",
                                api="v3", endpoint=ep.url, timeout_s=longer)
                if len(self.s.endpoints) > 1:  # alone, keep the channel: it goes on connecting
                    await self._drop_client(rotate=True)
                tries -= 1
            except (aex.ConnectionFailedError, aex.InternalError) as e:
                last = _describe(e, ep, self.s)
                await self._drop_client(rotate=True)
                tries -= 1
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this task is being cancelled (shutdown)
                # grpc cancels the calls in flight on a channel that is closed (another call found
                # the connection dead and dropped it). Raised on, it ended the caller's task as if
                # cancelled — the converger or the lease keeper stopped for good.
                last = self._problem(ep, "unreachable: the connection was closed during the call")
                tries -= 1
            except aex.ClientError as e:
                raise StoreError(self._problem(ep, str(e) or type(e).__name__)) from None
            else:
                self.deadline.answered(time.monotonic() - t0)
                return result
        raise StoreError(last)

    # -- Store interface ---------------------------------------------------------------------
    async def get_config(self) -> bytes | None:
        r = await self._call(lambda c: c.get(self._config_key))
        return None if r is None else r.value

    def _record(self, kv) -> Record:
        key = kv.key[len(self._subnets):].decode("utf-8", "replace")
        return Record(key=key, value=kv.value, has_ttl=kv.lease != 0, expiration=None, revision=kv.mod_revision,
                      create_revision=kv.create_revision)

    def _is_lease(self, kv) -> bool:
        """Only direct children of ``<prefix>/subnets/`` are leases. A key nested deeper
        (``subnets/x/10.5.1.0-24``) is none: read by its last path element it would stand in for the
        real lease of that name (peers' traffic redirected, the own lease "taken over")."""
        return b"/" not in kv.key[len(self._subnets):]

    async def list_subnets(self) -> tuple[list[Record], int]:
        r = await self._call(lambda c: c.get_prefix(self._subnets))
        recs = []
        for kv in r.kvs:
            if not self._is_lease(kv):
                continue
            recs.append(self._record(kv))
            if kv.lease:
                key = recs[-1].key
                self._lease_ids.pop(key, None)  # keep this list's key string: not a second copy per lease
                self._lease_ids[key] = kv.lease
        return recs, r.header.revision

    async def _grant(self, c: _Client, ttl_s: int | None) -> int:
        if not ttl_s:
            return 0
        lease = await c.lease(int(ttl_s))
        return lease.id

    async def create_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record | None:
        k = self._subnets + key.encode()

        async def op(c: _Client):
            lease_id = await self._grant(c, ttl_s)
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
            return Record(key, value, bool(ttl_s), t0 + ttl_s if ttl_s else None, rev, create_revision=rev)

        return await self._call(op)

    async def put_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record:
        k = self._subnets + key.encode()

        async def op(c: _Client):
            lease_id = await self._grant(c, ttl_s)
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
            return Record(key, value, bool(ttl_s), t0 + ttl_s if ttl_s else None, r.header.revision)

        return await self._call(op)

    async def renew_subnet(self, key: str, value: bytes, ttl_s: int | None) -> Record | None:
        k = self._subnets + key.encode()

        async def op(c: _Client):
            lease_id = await self._grant(c, ttl_s)
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
            return Record(key, value, bool(ttl_s), t0 + ttl_s if ttl_s else None, resp[0].response_put.header.revision)

        return await self._call(op)

    async def delete_subnet(self, key: str) -> None:
        await self._call(lambda c: c.delete(self._subnets + key.encode()))
        self._lease_ids.pop(key, None)

    async def put_config(self, value: bytes) -> None:
        """AdminStore: write <prefix>/config without a lease."""
        await self._call(lambda c: c.put(self._config_key, value))

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
        async def start(c: _Client):
            await c.renew_watcher()
            return await c.watch_prefix(self._subnets, start_revision=start_revision)

        w = await self._call(start)
        ep, reconnects = self.endpoint, self._reconnects
        try:
            async for ev in w:
                if not self._is_lease(ev.kv):
                    continue  # a key nested under subnets/: no lease (list_subnets skips it too)
                rec = self._record(ev.kv)
                if ev.kind == "PUT":
                    yield WatchEvent("put", rec)
                else:
                    self._lease_ids.pop(rec.key, None)
                    yield WatchEvent("delete", rec)
            raise StoreError(self._problem(ep, "watch ended" if reconnects == self._reconnects else RECONNECTED))
        except aex.RevisionCompactedError as e:
            raise CompactedError(str(e)) from None
        except aex.ClientError as e:
            if reconnects != self._reconnects:
                raise StoreError(self._problem(ep, RECONNECTED)) from None
            await self._drop_client(rotate=True)
            raise StoreError(_describe(e, ep, self.s)) from None
        finally:
            try:
                await asyncio.wait_for(w.cancel(), 1)
            except Exception:  # noqa: BLE001 - stream may already be gone
                pass

    async def reconnect(self) -> None:
        self._reconnects += 1
        await self._drop_client(rotate=False)

    async def close(self) -> None:
        await self._drop_client(rotate=False)
