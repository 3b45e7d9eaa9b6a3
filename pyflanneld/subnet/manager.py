"""The subnet manager: lease acquisition, renewal, the own key's fate, and the datastore reader.

Datastore-neutral (talks to a :class:`~pyflanneld.subnet.store.Store`) and netlink-free. It keeps
two things current and tells its listener (``notify(full)``) whenever either changed:

* the own lease (``lease``): acquired, renewed before expiry, followed when an operator reserves
  it (no TTL: renewals stop) or un-reserves it, re-acquired when lost (deleted, expired, taken
  over) — the same subnet when still free;
* the book (:class:`~pyflanneld.subnet.leasebook.LeaseBook`): every subnet record of the store,
  from a list and then the watch (a relist after compaction or a broken watch). ``book.accepted``
  is the peer set; the own lease is never in it.

The daemon's converger (:mod:`pyflanneld.converge`) turns that into kernel state; this module
knows nothing of it. ``notify(True)`` asks for a full convergence (after a relist or a new own
lease), ``notify(False)`` for the changes since the last one.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import structlog

from .. import metrics
from ..config import ConfigError, NetworkConfig
from .allocate import (
    IPV4_OFF_SUBNET,
    Taken,
    Taken6,
    choose_subnet,
    choose_subnet6,
    lease_compatible,
    pool_size,
    pool_size6,
)
from .lease import (
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    lease_from_record,
    parse_subnet_key,
    subnet_key,
    vtep_mac,
)
from .leasebook import LeaseBook
from .store import CompactedError, Record, Store, StoreError

log = structlog.get_logger()


class PoolExhausted(Exception):
    """Every subnet of the pool is leased (the message says how to free one)."""


class Backoff:
    """Exponential backoff: ``next()`` gives the next delay in seconds — first_s, 2×first_s, …
    up to limit_s; ``reset()`` starts again at first_s."""

    def __init__(self, first_s: float, limit_s: float) -> None:
        self.first_s, self.limit_s, self.delay_s = first_s, limit_s, first_s

    def next(self) -> float:
        """The delay to wait now (seconds); the one after it is doubled, up to ``limit_s``."""
        d = self.delay_s
        self.delay_s = min(self.delay_s * 2, self.limit_s)
        return d

    def reset(self) -> None:
        """Start again at ``first_s`` (after a success)."""
        self.delay_s = self.first_s


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed (None: no limit); True if it was set.
    Unlike ``wait_for`` on Python 3.11, a cancellation is never lost when both happen at once."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()


def backend_identity(attrs: LeaseAttrs) -> tuple[str, str]:
    """What tells two hosts with the same PublicIP apart: BackendType and BackendData, as JSON,
    with BackendV6Data when there is one (an IPv6-only vxlan lease has its VtepMAC there only)."""
    data = attrs.backend_data if attrs.backend_v6_data is None else [attrs.backend_data, attrs.backend_v6_data]
    return attrs.backend_type, json.dumps(data, sort_keys=True)


def same_vtep(a: LeaseAttrs, b: LeaseAttrs) -> bool:
    """Do two lease values name the same vxlan VTEP (IPv4's, or IPv6's)? Its VtepMAC is random
    per device (no two hosts share one: the lease book rejects duplicates), so a lease carrying
    ours is ours even with another PublicIP — an older value of ours (e.g. etcd restored from a
    snapshot taken before the address changed)."""
    if a.backend_type != "vxlan" or b.backend_type != "vxlan":
        return False
    return any((mac := vtep_mac(x)) is not None and mac == vtep_mac(y)
               for x, y in ((a.backend_data, b.backend_data), (a.backend_v6_data, b.backend_v6_data)))


class SubnetManager:
    """The own lease and the book of all leases (see the module docstring).

    ``ttl_s``: the lease TTL written to etcd; ``renew_margin_s``: renew this long before expiry;
    ``renew_retry_s``: wait after a failed renewal (all seconds). ``notify(full)`` is called
    (synchronously, it must not block) after every change of the own lease or the book.
    """

    ACQUIRE_BACKOFF_S = (1.0, 30.0)  # (first, limit) between failed acquisitions
    WRITE_BOUND_S = 30.0  # a renewal without an answer for this long counts as failed
    WATCH_BACKOFF_S = (0.1, 5.0)  # between failed watches (upstream's)

    def __init__(self, store: Store, cfg: NetworkConfig, *, ttl_s: int, renew_margin_s: float,
                 prev_subnet: IPv4Network | None = None, prev_subnet6: IPv6Network | None = None,
                 rng: random.Random | None = None,
                 renew_retry_s: float = 60.0, prefix: str = "/coreos.com/network",
                 notify: Callable[[bool], None] | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.ttl_s = ttl_s
        self.renew_margin_s = renew_margin_s
        self.renew_retry_s = renew_retry_s
        self.prev_subnet = prev_subnet
        self.prev_subnet6 = prev_subnet6
        self.rng = rng or random.Random()
        self.notify: Callable[[bool], None] = notify or (lambda full: None)
        self.book = LeaseBook(cfg, prefix)
        self.lease: Lease | None = None
        self.attrs: LeaseAttrs | None = None
        self.store_ok = True
        self.store_error = ""
        self.synced = False  # the book holds a complete list (at least one relist succeeded)
        self.problem = ""  # why there is no (new) lease yet: the last acquisition error
        self.lost_reason = ""  # non-empty while the own lease is lost and being acquired again
        # keys we are writing to acquire a lease: their watch events may come before the write
        # returns, and must not make us our own peer; they are held until the write settled
        self.claiming: set[str] = set()
        # book keys whose peer may have changed since the listener last took them (take_touched):
        # a convergence after one event looks at those keys only, not at every peer
        self.touched: set[str] = set()
        self._held: list[tuple[str, Record]] = []
        # subnet keys that another host with our PublicIP took from us: not reused (no flip-flop)
        self.foreign: dict[str, tuple[str, str]] = {}
        # own keys reserved with another backend identity, whose value we put back once: the same
        # identity writing it again is a live host, not an operator
        self._contested: dict[str, tuple[str, str]] = {}
        self._kick = asyncio.Event()
        self._lost = asyncio.Event()  # set while lost_reason is
        self._renew_now = False
        self._rewrite = False  # the own key must get our value again (put, keeping TTL or reservation)
        # other keys holding a lease with our VtepMAC and a TTL (an older lease of ours, e.g. from a
        # restored snapshot): every peer rejects the later of two leases with one VTEP, which may
        # be ours, so they are deleted (keep_lease). key -> the value seen.
        self._stale: dict[str, bytes] = {}
        self._seen_rev = 0  # the highest store revision seen (lists, watch events); see _relist

    # -- state for readiness -------------------------------------------------------------------
    def lease_state(self) -> tuple[bool, str]:
        """(the lease is held and renewable, why not) — one fact of the daemon's readiness."""
        if self.lease is None:
            return False, self.problem or "acquiring a subnet lease"
        if self.lost_reason:
            why = f"own lease {self.lease.subnet} lost ({self.lost_reason}); acquiring a lease again"
            return False, why + (f": {self.problem}" if self.problem else "")
        if not self.store_ok:
            return False, f"datastore unreachable: {self.store_error}"
        return True, ""

    def _mark(self, ok: bool, error: str = "") -> None:
        if ok and not self.store_ok:
            log.info("datastore reachable again")
        self.store_ok, self.store_error = ok, error

    # -- acquisition ---------------------------------------------------------------------------
    def _foreign_twin(self, le: Lease, attrs: LeaseAttrs) -> bool:
        """A lease with our PublicIP that another host holds (it took it from us with another
        backend identity): warned about once, never reused."""
        seen = self.foreign.get(le.key)
        return seen is not None and seen == backend_identity(le.attrs) != backend_identity(attrs)

    async def _claim(self, key: str, write) -> Record | None:
        """Write ``key`` (``write()``); its watch events meanwhile are held. Written, they are
        applied once the caller made it the own lease (_release_held); else at once."""
        self.claiming.add(key)
        rec = None
        try:
            rec = await write()
            return rec
        finally:
            if rec is None:  # applied while still claimed: the book hears of them, _own_record not
                self._release_held()
            self.claiming.discard(key)
            self.touched.add(key)
            self.notify(False)

    def _release_held(self) -> None:
        """Apply the watch events held while a key was being claimed (in order)."""
        held, self._held = self._held, []
        for kind, rec in held:
            self._apply_event(kind, rec)

    def _host_address(self, attrs: LeaseAttrs) -> IPv4Address | IPv6Address | None:
        """The address that says "this lease is the host's with ``attrs``": its PublicIP, or with
        IPv4 off its PublicIPv6 (every IPv6-only lease has PublicIP 0.0.0.0: upstream, which
        compares PublicIP alone, takes another host's lease then)."""
        return attrs.public_ip if self.cfg.enable_ipv4 else attrs.public_ipv6

    async def try_acquire(self, attrs: LeaseAttrs) -> Lease:
        """One pass of upstream's algorithm (local_manager.go tryAcquireLease) for every enabled
        family; retries lost races itself. Raises PoolExhausted/StoreError."""
        value = attrs.to_json().encode()
        mine = self._host_address(attrs)
        cfg = self.cfg
        reserve = False  # the new key replaces a reservation of ours: it is one too (no TTL)
        for _attempt in range(1000):
            recs, _rev = await self.store.list_subnets()
            leases = _parse_quietly(recs)  # the book warns about bad ones

            # 1. A lease that already carries our PublicIP (IPv6-only: PublicIPv6) or our VTEP: reuse it.
            deleted = False
            for le in leases:
                if (self._host_address(le.attrs) != mine and not same_vtep(le.attrs, attrs)) or self._foreign_twin(le, attrs):
                    continue
                if lease_compatible(cfg, le.subnet, le.subnet6):
                    ttl = None if le.reserved else self.ttl_s
                    rec = await self._claim(le.key, lambda le=le, ttl=ttl: self.store.put_subnet(le.key, value, ttl))
                    log.info("found lease for current IP, reusing", subnet=str(le),
                             public_ip=str(mine), reservation=le.reserved)
                    return lease_from_record(rec, attrs)
                # Only its IPv6 part does not fit (EnableIPv6 switched on or off): a reservation too is
                # replaced, by a reservation of the same IPv4 subnet with the IPv6 part as it must be.
                family_switch = cfg.enable_ipv4 and cfg.contains_subnet(le.subnet)
                if le.reserved and not family_switch:
                    continue  # an operator's reservation this config cannot use: left alone
                log.info("deleting lease not compatible with the network config", subnet=str(le),
                         public_ip=str(mine), reservation=le.reserved)
                await self.store.delete_subnet(le.key)
                deleted = True
                reserve |= le.reserved
                # its parts the config can still hand out are asked for again (enabling IPv6
                # keeps the IPv4 subnet, disabling it too)
                self.prev_subnet = self.prev_subnet or le.subnet
                self.prev_subnet6 = self.prev_subnet6 or le.subnet6
            if deleted:
                continue  # list again: its subnets are free now

            # 2. The subnets we had before (subnet.env), if nobody holds them; each family on its own
            # (upstream uses neither unless both fit).
            # the host's underlay networks are no subnet for it either (the gate rejects them as peers)
            under = self.book.host_networks
            taken = Taken(cfg, _claimed_subnets(recs, cfg.network) + _inside(under, cfg.network))
            taken6 = Taken6(cfg, _claimed_subnets(recs, cfg.ipv6_network) + _inside(under, cfg.ipv6_network))
            prev, prev6 = self._previous(taken, taken6)
            # 3. Else a random one of the first 100 free subnets, per family.
            sn: IPv4Network | None = IPV4_OFF_SUBNET if not cfg.enable_ipv4 else prev or choose_subnet(
                cfg, taken, self.rng)
            sn6 = (prev6 or choose_subnet6(cfg, taken6, self.rng)) if cfg.enable_ipv6 else None
            if sn is None or (cfg.enable_ipv6 and sn6 is None):
                raise PoolExhausted(self._exhausted(ipv6=sn is not None))
            key = subnet_key(sn, sn6)
            ttl = None if reserve and sn == prev else self.ttl_s
            rec = await self._claim(key, lambda key=key, ttl=ttl: self.store.create_subnet(key, value, ttl))
            if rec is None:
                log.info("lost the race for a subnet, trying another", subnet=key)
                if prev is not None:
                    self.prev_subnet = None
                if prev6 is not None:
                    self.prev_subnet6 = None
                continue
            reason = "previous subnet" if (prev, prev6) != (None, None) else "new subnet"
            lease = lease_from_record(rec, attrs)
            log.info("allocated lease", subnet=str(lease), public_ip=str(mine), reason=reason)
            return lease
        raise StoreError("could not acquire a subnet after 1000 lost races")

    def _previous(self, taken: Taken, taken6: Taken6) -> tuple[IPv4Network | None, IPv6Network | None]:
        """The previous run's subnets (subnet.env) to ask for again, per enabled family: each one
        the config could hand out and nobody holds, else None (an incompatible one is forgotten,
        with a line)."""
        cfg = self.cfg
        prev: IPv4Network | None = None
        prev6: IPv6Network | None = None
        if cfg.enable_ipv4 and self.prev_subnet is not None:
            if not cfg.contains_subnet(self.prev_subnet):
                log.info("previous subnet not compatible with the network config, ignoring",
                         subnet=str(self.prev_subnet))
                self.prev_subnet = None
            elif self.prev_subnet not in taken:
                prev = self.prev_subnet
        if cfg.enable_ipv6 and self.prev_subnet6 is not None:
            if not cfg.contains_subnet6(self.prev_subnet6):
                log.info("previous IPv6 subnet not compatible with the network config, ignoring",
                         subnet=str(self.prev_subnet6))
                self.prev_subnet6 = None
            elif self.prev_subnet6 not in taken6:
                prev6 = self.prev_subnet6
        return prev, prev6

    def _exhausted(self, ipv6: bool) -> str:
        """Upstream's "out of subnets", naming the family whose pool is full and how to free one."""
        cfg = self.cfg
        free = f"free one (delete a dead host's key under {self.book.subnets_path}) or enlarge "
        under = ",".join(map(str, _inside(self.book.host_networks, cfg.ipv6_network if ipv6 else cfg.network)))
        leased = f"are leased or in this host's underlay {under}" if under else "are leased"
        if not ipv6:
            return (f"out of subnets: all {pool_size(cfg)} /{cfg.subnet_len} subnets of {cfg.network} {leased}; "
                    f"{free}Network/SubnetMin/SubnetMax")
        return (f"out of subnets: all {pool_size6(cfg)} /{cfg.ipv6_subnet_len} IPv6 subnets of {cfg.ipv6_network} "
                f"{leased}; {free}IPv6Network/IPv6SubnetMin/IPv6SubnetMax")

    async def acquire(self, attrs: LeaseAttrs, on_error: Callable[[str], None] | None = None) -> Lease:
        """Acquire, retrying store errors and pool exhaustion with backoff; never gives up.
        The new lease becomes ``lease`` (and the book's own lease) before the listener is told."""
        self.attrs = attrs
        backoff = Backoff(*self.ACQUIRE_BACKOFF_S)
        last_err = ""
        while True:
            try:
                lease = await self.try_acquire(attrs)
            except (StoreError, PoolExhausted) as e:
                msg = str(e)
                if isinstance(e, StoreError):
                    metrics.DATASTORE_ERRORS.labels("acquire").inc()
                if msg != last_err:
                    log.error("failed to acquire lease", error=msg)
                    last_err = msg
                else:  # -v 1 shows each of the silent retries
                    log.debug("still no lease; retrying", error=msg)
                self._mark(isinstance(e, PoolExhausted), msg if isinstance(e, StoreError) else "")
                self.problem = msg
                if on_error:
                    on_error(msg)
                self.notify(False)
                await asyncio.sleep(backoff.next())
                continue
            self._mark(True)
            self.problem = ""
            self.lease = lease
            self.prev_subnet, self.prev_subnet6 = lease.subnet, lease.subnet6
            self.lost_reason = ""
            self._lost.clear()
            self._rewrite = self._renew_now = False
            self.book.set_own(lease)
            self._release_held()
            self.notify(True)
            return lease

    # -- the own key ---------------------------------------------------------------------------
    def lose(self, reason: str) -> None:
        """The own lease is gone (deleted, expired, taken over): acquire again (keep_lease)."""
        if self.lease is None or self.lost_reason:
            return
        self.lost_reason = reason
        self._lost.set()
        self._kick.set()
        self.notify(False)

    def renew_now(self) -> None:
        """Renew at once (e.g. the operator gave the key a TTL again); a reservation stays as is."""
        self._renew_now = True
        self._kick.set()

    def _note_stale(self, rec: Record) -> None:
        """Remember ``rec`` if it is an older lease of ours under another key (see ``_stale``)."""
        lease, attrs = self.lease, self.attrs
        if lease is None or attrs is None or rec.key == lease.key or rec.key in self.claiming or not rec.has_ttl:
            return
        mac = vtep_mac(attrs.backend_data) if attrs.backend_type == "vxlan" else None
        if mac is None or mac.encode() not in rec.value.lower():  # the common case, without decoding
            return
        try:
            theirs = LeaseAttrs.from_json(rec.value)
        except LeaseFormatError:
            return
        if same_vtep(theirs, attrs):
            self._stale[rec.key] = rec.value
            self._kick.set()

    async def _delete_stale(self) -> None:
        """Delete one remembered older lease of ours if it still holds what we saw (one line)."""
        key, value = next(iter(self._stale.items()))
        try:
            recs, _rev = await self.store.list_subnets()
            now = next((r for r in recs if r.key == key), None)
            if now is not None and now.value == value and now.has_ttl and (
                    self.lease is None or key != self.lease.key):
                log.warning("another lease carries our VtepMAC (an older lease of ours: datastore restored?); "
                            "deleting it so that peers accept ours", subnet=key, own=str(self.lease))
                await self.store.delete_subnet(key)
        except StoreError as e:
            log.warning("could not delete an older lease of ours, trying again", subnet=key, error=str(e),
                        retry_in=self.renew_retry_s)
            await self._sleep(self.renew_retry_s)
            return
        if self._stale.get(key) == value:
            del self._stale[key]

    def _own_record(self, rec: Record | None, revision: int) -> None:
        """What the store says about our key at ``revision`` (rec None: absent): follow it. News
        older than our own last write of the key is stale and ignored."""
        lease, attrs = self.lease, self.attrs
        if lease is None or attrs is None or self.lost_reason or lease.key in self.claiming:
            return
        if revision < lease.revision:
            return
        if rec is None:
            self.lose("deleted or expired")
            return
        try:
            theirs = LeaseAttrs.from_json(rec.value)
        except LeaseFormatError:
            log.warning("own lease key overwritten with bad data; acquiring a lease again", subnet=str(lease))
            self.lose("overwritten with bad data")
            return
        mine = same_vtep(theirs, attrs)  # an older value of ours: put the current one back
        if self._host_address(theirs) != self._host_address(attrs) and not mine:
            other = self._host_address(theirs)
            log.warning("own subnet was taken over by another host", subnet=str(lease), other=str(other))
            self.lose(f"taken over by {other}")
            return
        if rec.value != attrs.to_json().encode():
            ident = backend_identity(theirs)
            # Another live host with our PublicIP (a copied --public-ip): its lease has a TTL, or it
            # wrote its value without TTL again after we put ours back (it holds our reservation;
            # two hosts putting theirs back in turn would flip-flop for ever).
            if not mine and (rec.has_ttl or self._contested.get(lease.key) == ident):
                if self.foreign.get(lease.key) != ident:
                    log.warning("another host with the same PublicIP took over our lease; two hosts share "
                                "--public-ip? not taking it back", subnet=str(lease),
                                public_ip=str(self._host_address(attrs)), ours=backend_identity(attrs)[1],
                                theirs=ident[1])
                self.foreign[lease.key] = ident
                self.lose(f"taken over by another host with PublicIP {self._host_address(theirs)}")
                return
            # reserved by the operator with another value, or an older value of ours: ours goes back
            # in (without TTL when reserved)
            if not mine and ident != backend_identity(attrs):
                log.warning("own lease reserved with another backend identity; writing ours back, keeping the "
                            "reservation (if it is rewritten again, another host has our PublicIP)",
                            subnet=str(lease), public_ip=str(self._host_address(attrs)),
                            ours=backend_identity(attrs)[1], theirs=ident[1])
                self._contested[lease.key] = ident
            elif mine:
                log.warning("own lease holds an older value of ours (datastore restored?); writing the current one",
                            subnet=str(lease), public_ip=str(self._host_address(attrs)),
                            old=str(self._host_address(theirs)))
            self._rewrite = True
            self._kick.set()
        reserved = not rec.has_ttl
        if reserved != lease.reserved:
            if reserved:
                log.info("own lease is now a reservation; renewals stop", subnet=str(lease))
            else:
                log.info("own reservation released; renewing it as a lease", subnet=str(lease))
                self._renew_now = True
            self.lease = replace(lease, reserved=reserved, expiration=None if reserved else lease.expiration,
                                 revision=rec.revision)
            self._kick.set()

    # -- renewal -------------------------------------------------------------------------------
    async def _sleep(self, seconds: float | None) -> None:
        await wait_event(self._kick, seconds)
        self._kick.clear()

    async def keep_lease(self) -> None:
        """Renew before expiry, follow reservations, and acquire again when the lease is lost
        (the same subnet if still free; the listener hears of every new lease). Forever."""
        assert self.lease is not None and self.attrs is not None
        while True:
            lease = self.lease
            if self.lost_reason:
                await self._reacquire(lease)
                continue
            if self._stale:
                await self._delete_stale()
                continue
            if self._rewrite:
                self._rewrite = False  # cleared first: a rewrite asked for while we write is not lost
                reserved = lease.reserved
                await self._write(lease, None if reserved else self.ttl_s,
                                  "own lease rewritten" + (" as a reservation" if reserved else ""), put=True)
                continue
            due = lease.expiration is not None and time.time() >= lease.expiration - self.renew_margin_s
            if lease.reserved:
                self._renew_now = False  # a reservation is never renewed (that would give it a TTL)
            elif self._renew_now or due:
                await self._write(lease, self.ttl_s, "lease renewed")
                continue
            if lease.reserved or lease.expiration is None:
                wait = None
            else:
                wait = max(0.0, lease.expiration - self.renew_margin_s - time.time())
                log.debug("waiting to renew lease", subnet=str(lease), seconds=round(wait, 1))
            await self._sleep(wait)

    async def _write(self, lease: Lease, ttl: int | None, what: str, put: bool = False) -> None:
        """Renew (ttl) the own key if it still holds our value, or (put, or ttl None: without TTL)
        write our value whatever it holds.
        A store error waits ``renew_retry_s`` (a loss noticed meanwhile cuts the wait short)."""
        assert self.attrs is not None
        value = self.attrs.to_json().encode()
        if ttl is None or put:
            call = asyncio.ensure_future(self.store.put_subnet(lease.key, value, ttl))
        else:
            call = asyncio.ensure_future(self.store.renew_subnet(lease.key, value, ttl))
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            # bounded, and cut short by a loss the watch noticed: a store call that never returns
            # must not keep the lease keeper from acquiring again
            await asyncio.wait({call, lost}, timeout=self.WRITE_BOUND_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not call.done():
                call.cancel()
        try:
            if not call.done() or call.cancelled():  # cut off (a cancelled task is done only later)
                if self.lost_reason:
                    return
                raise StoreError(f"no answer from the datastore within {self.WRITE_BOUND_S:.0f}s")
            rec = call.result()
        except StoreError as e:
            metrics.DATASTORE_ERRORS.labels("renew").inc()
            self._rewrite |= put
            self._mark(False, str(e))
            log.warning("error renewing lease, trying again", subnet=str(lease),
                        retry_in=self.renew_retry_s, error=str(e))
            await self._sleep(self.renew_retry_s)
            return
        self._mark(True)
        if self.lease is not lease or self.lost_reason:
            return  # changed while we wrote: the loop looks again
        if rec is None:
            self.lose("expired, deleted or overwritten")
            return
        self._renew_now = False
        if not put and ttl is not None:
            metrics.LEASE_RENEWALS.inc()
        self.lease = lease_from_record(rec, self.attrs)
        log.info(what, subnet=str(lease), expires_in=ttl)

    async def _reacquire(self, lease: Lease) -> None:
        log.warning("own lease lost (expired or deleted); acquiring again", subnet=str(lease),
                    reason=self.lost_reason)
        self.prev_subnet, self.prev_subnet6 = lease.subnet, lease.subnet6
        assert self.attrs is not None
        new = await self.acquire(self.attrs)
        if new.key == lease.key:
            log.info("lease re-acquired, same subnet", subnet=str(new))
        else:
            log.warning("subnet changed after re-acquiring the lease; restart docker/CNI to move pods",
                        old=str(lease), new=str(new))

    async def set_attrs(self, attrs: LeaseAttrs) -> None:
        """New lease data for the same subnet (e.g. a new PublicIP after an address change):
        written to the own key at once, keeping the subnet and the reservation. Raises StoreError."""
        lease = self.lease
        if lease is None or self.lost_reason:
            self.attrs = attrs  # the next acquisition uses it
            return
        if attrs == self.attrs:
            return
        value = attrs.to_json().encode()
        rec = await self._claim(lease.key, lambda: self.store.put_subnet(
            lease.key, value, None if lease.reserved else self.ttl_s))
        self.attrs = attrs
        self.lease = lease_from_record(rec, attrs)
        self._release_held()
        log.info("lease updated", subnet=str(lease), public_ip=str(self._host_address(attrs)))
        self._kick.set()

    # -- the datastore reader ------------------------------------------------------------------
    async def _relist(self) -> int:
        recs, rev = await self.store.list_subnets()
        self.book.reset(recs)
        self.synced = True
        log.info("peer leases listed", peers=len(self.book.accepted))
        seen = max(self._seen_rev, self.lease.revision if self.lease is not None else 0)
        if rev < seen:
            # A linearizable list never goes back: the store was restored from a snapshot or lost
            # its data. What it holds now is the truth; our own key's news is no longer "stale".
            log.warning("datastore revision went back (restored from a snapshot or lost its data); "
                        "following what it holds now", revision=rev, seen=seen)
            if self.lease is not None:
                self.lease = replace(self.lease, revision=0)
        self._seen_rev = rev
        if self.lease is not None:
            key = self.lease.key
            self._own_record(next((r for r in recs if r.key == key), None), rev)
        self._stale.clear()
        for r in recs:
            self._note_stale(r)
        self.notify(True)
        return rev

    async def watch(self) -> None:
        """List, then watch from that revision + 1; relist on compaction or reconnect. Forever."""
        backoff = Backoff(*self.WATCH_BACKOFF_S)
        rev: int | None = None
        while True:
            try:
                if rev is None:
                    rev = await self._relist()
                    self._mark(True)
                    backoff.reset()
                async for ev in self.store.watch_subnets(rev + 1):
                    rev = ev.record.revision
                    self._on_event(ev.kind, ev.record)
                    backoff.reset()
            except CompactedError as e:
                log.info("watch revision compacted; relisting", error=str(e))
                rev = None
            except StoreError as e:
                metrics.DATASTORE_ERRORS.labels("watch").inc()
                metrics.WATCH_RECONNECTS.inc()
                self._mark(False, str(e))
                self.notify(False)
                delay = backoff.next()
                log.warning("watch failed; reconnecting", error=str(e), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                rev = None  # relist on reconnect: the diff covers anything missed, even data loss

    def take_touched(self) -> set[str]:
        """The keys touched since the last call (events, claims; see ``touched``), forgotten here."""
        touched, self.touched = self.touched, set()
        return touched

    def _on_event(self, kind: str, rec: Record) -> None:
        self._seen_rev = max(self._seen_rev, rec.revision)
        if rec.key in self.claiming:
            self._held.append((kind, rec))  # our write's echo (or news of the key): after the write
            return
        self._apply_event(kind, rec)

    def _apply_event(self, kind: str, rec: Record) -> None:
        if kind == "delete":
            self._stale.pop(rec.key, None)
            ch = self.book.delete(rec.key)
        else:
            self._note_stale(rec)
            metrics.LEASE_EVENTS.arrived(rec.key)
            ch = self.book.put(rec)
        self.touched.add(rec.key)
        if ch:  # a put or delete may also accept or reject other keys (conflicts)
            self.touched.update(le.key for le in ch.added)
            self.touched.update(le.key for le in ch.removed)
        if self.lease is not None and rec.key == self.lease.key:
            self._own_record(None if kind == "delete" else rec, rec.revision)
        self.notify(False)


def _parse_quietly(recs: list[Record]) -> list[Lease]:
    """The records that are well-formed leases (per-lease format only), without warnings."""
    out = []
    for r in recs:
        try:
            out.append(lease_from_record(r))
        except LeaseFormatError:
            pass
    return out


def _claimed_subnets(recs: list[Record], network: IPv4Network | IPv6Network | None) -> list:
    """The subnets of ``network``'s family inside it (none for None: the family is off) claimed by
    keys that parse, whatever their value: a key with a bad value cannot be created again, so its
    subnets are not free."""
    if network is None:
        return []
    out = []
    for r in recs:
        try:
            sn, sn6 = parse_subnet_key(r.key)
        except LeaseFormatError:
            continue
        part = sn if network.version == 4 else sn6
        if part is not None and part.overlaps(network):
            out.append(part)
    return out


def _inside(nets, network: IPv4Network | IPv6Network | None) -> list:
    """The networks of ``nets`` that overlap ``network`` (none for None: the family is off)."""
    return [n for n in nets if network is not None and n.version == network.version and n.overlaps(network)]


# -- config ------------------------------------------------------------------------------------
HOW_TO_SET = ("etcdctl put {prefix}/config '{{\"Network\":\"10.5.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'"
              " (v3) or curl -X PUT -d value=... <etcd>/v2/keys{prefix}/config (v2)")


__all__ = ["SubnetManager", "PoolExhausted", "ConfigError", "Backoff", "backend_identity"]
