"""The subnet manager: network config, lease acquisition, renewal and the peer watch.

Datastore-neutral (talks to a :class:`~pyflanneld.subnet.store.Store`) and netlink-free: it speaks
in NetworkConfig and Lease objects and hands peers to a sink (the daemon, which feeds the backend).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network
from typing import Protocol

import structlog

from ..config import ConfigError, NetworkConfig, parse_config
from .allocate import Taken, choose_subnet, pool_size
from .lease import Lease, LeaseAttrs, LeaseFormatError, parse_subnet_key, subnet_key
from .store import CompactedError, Record, Store, StoreError

log = structlog.get_logger()


class PoolExhausted(Exception):
    pass


class PeerSink(Protocol):
    async def snapshot(self, leases: list[Lease]) -> None: ...
    async def added(self, lease: Lease) -> None: ...
    async def removed(self, lease: Lease) -> None: ...


class Backoff:
    def __init__(self, first: float, limit: float) -> None:
        self.first, self.limit, self.delay = first, limit, first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.limit)
        return d

    def reset(self) -> None:
        self.delay = self.first


class SubnetManager:
    def __init__(self, store: Store, cfg: NetworkConfig, *, ttl: int, renew_margin: float,
                 prev_subnet: IPv4Network | None = None, rng: random.Random | None = None,
                 renew_retry: float = 60.0) -> None:
        self.store = store
        self.cfg = cfg
        self.ttl = ttl
        self.renew_margin = renew_margin
        self.renew_retry = renew_retry
        self.prev_subnet = prev_subnet
        self.rng = rng or random.Random()
        self.lease: Lease | None = None
        self.attrs: LeaseAttrs | None = None
        self.store_ok = True
        self.store_error = ""
        self.last_revision = 0
        self._lost = asyncio.Event()
        self._replan = asyncio.Event()  # the own key was reserved or released: plan the renewal again
        self._warned: set[tuple[str, int]] = set()

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, rec: Record) -> Lease | None:
        """A record as a Lease; bad data (not a subnet key, not JSON) → one warning, skipped."""
        try:
            sn, sn6 = parse_subnet_key(rec.key)
            attrs = LeaseAttrs.from_json(rec.value)
        except LeaseFormatError as e:
            if (rec.key, rec.revision) not in self._warned:
                self._warned.add((rec.key, rec.revision))
                log.warning("ignoring bad lease entry in etcd", key=rec.key, error=str(e))
            return None
        return Lease(subnet=sn, subnet6=sn6, attrs=attrs, expiration=rec.expiration,
                     reserved=not rec.has_ttl, revision=rec.revision)

    def _decode_all(self, recs: list[Record]) -> list[Lease]:
        return [le for le in (self.decode(r) for r in recs) if le is not None]

    def _mark(self, ok: bool, error: str = "") -> None:
        if ok and not self.store_ok:
            log.info("datastore reachable again")
        self.store_ok, self.store_error = ok, error

    # -- acquisition ---------------------------------------------------------------------------
    def _lease_from_record(self, rec: Record, attrs: LeaseAttrs) -> Lease:
        sn, sn6 = parse_subnet_key(rec.key)
        return Lease(sn, attrs, rec.expiration, not rec.has_ttl, sn6, rec.revision)

    async def try_acquire(self, attrs: LeaseAttrs) -> Lease:
        """One pass of upstream's algorithm; retries lost races itself. Raises PoolExhausted/StoreError."""
        value = attrs.to_json().encode()
        for _attempt in range(1000):
            recs, _rev = await self.store.list_subnets()
            leases = self._decode_all(recs)

            # 1. A lease that already carries our PublicIP: reuse it.
            for le in leases:
                if le.attrs.public_ip != attrs.public_ip:
                    continue
                if self.cfg.contains_subnet(le.subnet):
                    ttl = None if le.reserved else self.ttl
                    rec = await self.store.put_subnet(le.key, value, ttl)
                    log.info("found lease for current IP, reusing", subnet=str(le.subnet),
                             public_ip=str(attrs.public_ip), reservation=le.reserved)
                    return self._lease_from_record(rec, attrs)
                if not le.reserved:
                    log.info("deleting lease not compatible with the network config",
                             subnet=str(le.subnet), public_ip=str(attrs.public_ip))
                    await self.store.delete_subnet(le.key)

            taken = Taken(self.cfg, (le.subnet for le in leases))
            # 2. The subnet we had before (subnet.env), if nobody holds it.
            cand: IPv4Network | None = None
            prev = self.prev_subnet
            if prev is not None:
                if not self.cfg.contains_subnet(prev):
                    log.info("previous subnet not compatible with the network config, ignoring", subnet=str(prev))
                    self.prev_subnet = prev = None
                elif prev not in taken:
                    cand = prev
            # 3. A random one of the first 100 free subnets.
            if cand is None:
                cand = choose_subnet(self.cfg, taken, self.rng)
            if cand is None:
                raise PoolExhausted(
                    f"out of subnets: all {pool_size(self.cfg)} /{self.cfg.subnet_len} subnets of "
                    f"{self.cfg.network} are leased; free one (delete a dead host's key under "
                    f"{'<prefix>'}/subnets/) or enlarge Network/SubnetMin/SubnetMax"
                )
            rec = await self.store.create_subnet(subnet_key(cand), value, self.ttl)
            if rec is None:
                log.info("lost the race for a subnet, trying another", subnet=str(cand))
                if cand == prev:
                    self.prev_subnet = None
                continue
            reason = "previous subnet" if cand == prev else "new subnet"
            log.info("allocated lease", subnet=str(cand), public_ip=str(attrs.public_ip), reason=reason)
            return self._lease_from_record(rec, attrs)
        raise StoreError("could not acquire a subnet after 1000 lost races")

    async def acquire(self, attrs: LeaseAttrs, on_error: Callable[[str], None] | None = None) -> Lease:
        """Acquire, retrying store errors and pool exhaustion with backoff; never gives up."""
        self.attrs = attrs
        backoff = Backoff(1.0, 30.0)
        last_err = ""
        while True:
            try:
                lease = await self.try_acquire(attrs)
            except (StoreError, PoolExhausted) as e:
                msg = str(e)
                if msg != last_err:
                    log.error("failed to acquire lease", error=msg)
                    last_err = msg
                self._mark(isinstance(e, PoolExhausted), msg if isinstance(e, StoreError) else "")
                if on_error:
                    on_error(msg)
                await asyncio.sleep(backoff.next())
                continue
            self._mark(True)
            self.lease = lease
            self.prev_subnet = lease.subnet
            self._lost.clear()
            return lease

    # -- renewal -------------------------------------------------------------------------------
    async def keep_lease(self, on_changed: Callable[[Lease], Awaitable[None]]) -> None:
        """Renew before expiry; if the lease is lost, acquire again (same subnet if still free).
        `on_changed` is called only when the re-acquired subnet differs."""
        assert self.lease is not None and self.attrs is not None
        while True:
            self._replan.clear()
            lease = self.lease
            if lease.reserved or lease.expiration is None:
                wait = None
            else:
                wait = max(0.0, lease.expiration - self.renew_margin - time.time())
                log.debug("waiting to renew lease", subnet=str(lease.subnet), seconds=round(wait, 1))
            lost = await self._wait_lost(wait)
            if not lost and self._replan.is_set():
                continue
            if not lost:
                try:
                    rec = await self.store.renew_subnet(lease.key, self.attrs.to_json().encode(), self.ttl)
                except StoreError as e:
                    self._mark(False, str(e))
                    log.warning("error renewing lease, trying again", subnet=str(lease.subnet),
                                retry_in=self.renew_retry, error=str(e))
                    if await self._wait_lost(self.renew_retry):
                        lost = True
                    else:
                        continue
                else:
                    if rec is not None:
                        self._mark(True)
                        self.lease = self._lease_from_record(rec, self.attrs)
                        log.info("lease renewed", subnet=str(lease.subnet),
                                 expires_in=round(self.ttl))
                        continue
                    lost = True
            log.warning("own lease lost (expired or deleted); acquiring again", subnet=str(lease.subnet))
            self.prev_subnet = lease.subnet
            new = await self.acquire(self.attrs)
            if new.subnet == lease.subnet:
                log.info("lease re-acquired, same subnet", subnet=str(new.subnet))
                continue  # the kernel, the rules and subnet.env are all still right
            log.warning("subnet changed after re-acquiring the lease; restart docker/CNI to move pods",
                        old=str(lease.subnet), new=str(new.subnet))
            await on_changed(new)

    async def _wait_lost(self, timeout: float | None) -> bool:
        """True when the lease was lost; False after `timeout` s, or earlier when the own key was
        reserved or released (`_replan`)."""
        waits = {asyncio.ensure_future(self._lost.wait()), asyncio.ensure_future(self._replan.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self._lost.is_set()

    def _own_reservation_changed(self, le: Lease) -> None:
        """An operator reserved our subnet (its key lost the TTL: no more renewals, which would give
        it one back) or released it (TTL again: renew now with ours, as a v3 event does not carry
        the expiration). See `pyflanneld lease reserve|release`."""
        assert self.lease is not None
        if le.reserved:
            log.info("own lease is now a reservation; renewals stop", subnet=str(le.subnet))
            self.lease = dataclasses.replace(self.lease, reserved=True, expiration=None)
        else:
            log.info("own reservation released; renewing it as a lease", subnet=str(le.subnet))
            self.lease = dataclasses.replace(self.lease, reserved=False, expiration=time.time())
        self._replan.set()

    # -- watch ---------------------------------------------------------------------------------
    def _peers(self, leases: list[Lease]) -> list[Lease]:
        own = self.lease.subnet if self.lease else None
        return [le for le in leases if le.subnet != own]

    async def _relist(self, sink: PeerSink) -> int:
        recs, rev = await self.store.list_subnets()
        leases = self._decode_all(recs)
        if self.lease and not any(le.subnet == self.lease.subnet for le in leases):
            self._lost.set()
        await sink.snapshot(self._peers(leases))
        return rev

    async def watch(self, sink: PeerSink) -> None:
        """List, then watch from that revision + 1; relist on compaction or reconnect. Forever."""
        backoff = Backoff(0.1, 5.0)
        rev: int | None = None
        while True:
            try:
                if rev is None:
                    rev = await self._relist(sink)
                    self._mark(True)
                    backoff.reset()
                async for ev in self.store.watch_subnets(rev + 1):
                    rev = ev.record.revision
                    self.last_revision = rev
                    await self._on_event(ev.kind, ev.record, sink)
                    backoff.reset()
            except CompactedError as e:
                log.info("watch revision compacted; relisting", error=str(e))
                rev = None
            except StoreError as e:
                self._mark(False, str(e))
                delay = backoff.next()
                log.warning("watch failed; reconnecting", error=str(e), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                rev = None  # relist on reconnect: the diff covers anything missed, even data loss

    async def _on_event(self, kind: str, rec: Record, sink: PeerSink) -> None:
        own = self.lease.subnet if self.lease else None
        if kind == "delete":
            try:
                sn, sn6 = parse_subnet_key(rec.key)
            except LeaseFormatError:
                return
            if sn == own:
                self._lost.set()
                return
            await sink.removed(Lease(sn, LeaseAttrs(public_ip=_ZERO), subnet6=sn6, revision=rec.revision))
            return
        le = self.decode(rec)
        if le is None:
            return
        if le.subnet == own:
            if self.attrs and le.attrs.public_ip != self.attrs.public_ip:
                log.warning("own subnet was taken over by another host", subnet=str(own),
                            other=str(le.attrs.public_ip))
                self._lost.set()
            elif self.lease is not None and le.reserved != self.lease.reserved:
                self._own_reservation_changed(le)
            return
        await sink.added(le)


_ZERO = LeaseAttrs.from_json('{"PublicIP":"0.0.0.0"}').public_ip


# -- config ------------------------------------------------------------------------------------
HOW_TO_SET = ("etcdctl put {prefix}/config '{{\"Network\":\"10.5.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'"
              " (v3) or curl -X PUT -d value=... <etcd>/v2/keys{prefix}/config (v2)")


async def read_config(store: Store) -> NetworkConfig | None:
    """The parsed config, or None if the key is absent; raises ConfigError/StoreError."""
    raw = await store.get_config()
    if raw is None:
        return None
    return parse_config(raw)


__all__ = ["SubnetManager", "PoolExhausted", "PeerSink", "read_config", "ConfigError", "Backoff"]
