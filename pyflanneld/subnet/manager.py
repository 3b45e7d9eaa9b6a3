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
from .lease import Lease, LeaseAttrs, LeaseFormatError, lease_from_record, parse_subnet_key, subnet_key
from .leasebook import Changes, LeaseBook
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
                 renew_retry: float = 60.0, prefix: str = "/coreos.com/network") -> None:
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
        # The validation gate: only its accepted leases reach the sink (the backend).
        self.book = LeaseBook(cfg, prefix)
        self._feed_lock = asyncio.Lock()  # one book change and its sink calls at a time
        self._sink: PeerSink | None = None

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
            leases = _parse_quietly(recs)  # the watch's LeaseBook warns about bad ones

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

            taken = Taken(self.cfg, _claimed_subnets(recs, self.cfg.network))
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
                    f"{self.book.subnets_path}) or enlarge Network/SubnetMin/SubnetMax"
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
            async with self._feed_lock:
                await self._feed(self.book.set_own(lease), self._sink)
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
    async def _feed(self, changes: Changes, sink: PeerSink | None) -> None:
        """Hand the book's changes to the sink: removals first (a VtepMAC or subnet may move from
        the removed lease to an added one), then additions."""
        if sink is None:
            return
        for le in changes.removed:
            await sink.removed(le)
        for le in changes.added:
            await sink.added(le)

    async def _relist(self, sink: PeerSink) -> int:
        recs, rev = await self.store.list_subnets()
        if self.lease and not any(r.key == self.lease.key for r in recs):
            self._lost.set()
        async with self._feed_lock:
            self._sink = sink
            self.book.reset(recs)
            await sink.snapshot(list(self.book.accepted.values()))
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
        own = self.lease
        if own is not None and rec.key == own.key:
            if kind == "delete":
                self._lost.set()
            else:
                try:
                    le = lease_from_record(rec)
                except LeaseFormatError:
                    le = None
                if le is not None and self.attrs and le.attrs.public_ip != self.attrs.public_ip:
                    log.warning("own subnet was taken over by another host", subnet=str(own.subnet),
                                other=str(le.attrs.public_ip))
                    self._lost.set()
                elif le is not None and le.reserved != own.reserved:
                    self._own_reservation_changed(le)
        async with self._feed_lock:
            changes = self.book.delete(rec.key) if kind == "delete" else self.book.put(rec)
            await self._feed(changes, sink)


def _parse_quietly(recs: list[Record]) -> list[Lease]:
    """The records that are well-formed leases (per-lease format only), without warnings."""
    out = []
    for r in recs:
        try:
            out.append(lease_from_record(r))
        except LeaseFormatError:
            pass
    return out


def _claimed_subnets(recs: list[Record], network: IPv4Network) -> list[IPv4Network]:
    """The subnets inside ``network`` claimed by keys that parse, whatever their value: a key with a
    bad value cannot be created again, so its subnet is not free."""
    out = []
    for r in recs:
        try:
            sn = parse_subnet_key(r.key)[0]
        except LeaseFormatError:
            continue
        if sn.overlaps(network):
            out.append(sn)
    return out


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
