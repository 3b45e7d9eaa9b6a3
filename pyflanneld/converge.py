"""One convergence path: desired state against actual state, repaired by the same code whatever
changed (Felix-style: the datastore reader signals, the converger coalesces and applies a batch).

Desired state: the own lease and the peer set (``manager.lease``, ``manager.book.accepted``), the
config, and the external interface as the operator's rule resolves it *now*. Actual state: what
the backend has applied (``backend.peers`` and its data plane), subnet.env on disk, the device
and its lower NIC. :meth:`Converger.converge` compares and repairs, for

* startup (the first pass), a relist and a new own lease (``full``: the backend resyncs its whole
  data plane, stale entries included) — a subnet change is a relist plus a convergence;
* single lease events (only the differences: a join is programmed within milliseconds), however
  many arrived while the previous pass ran (one batch: a burst of 5,000 joins is one pass);
* a link or address change (``iface``: re-resolve the interface; on a change the backend is
  registered and started again — VTEP on the new ifindex/address — and the lease's PublicIP
  follows, keeping the subnet);
* the safety-net timer (everything, every ``period_s``; sooner while a fact is false).

Readiness is a conjunction of named facts (:data:`FACTS`): the first false one is /readyz's
answer. READY=1 (``on_ready``) is sent the first time all hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network, IPv6Network

import structlog

from . import memtrim, metrics, subnetenv
from .backend.base import Backend, BackendError, BackendInfo, ExternalInterface, lease_attrs
from .subnet.lease import Lease, LeaseAttrs
from .subnet.manager import SubnetManager, wait_event
from .subnet.store import StoreError

log = structlog.get_logger()

# The facts readiness is made of, in the order /readyz reports the first false one.
FACTS = ("lease", "interface", "backend", "subnet.env", "converged")
RETRY_S = 1.0  # a false fact is retried this soon (doubling up to RETRY_MAX_S)
RETRY_MAX_S = 10.0  # … and at least this often, however long the safety-net period
LOG_EACH_PEER = 10  # batches up to this size log one line per lease; larger ones one summary
IFACE_PERIOD_S = 10.0  # the interface is resolved again at least this often (and on link/address events)
TRIM_AFTER_PEERS = 100  # a batch of more peer changes than this gives freed memory back (memtrim)


class Converger:
    """Drives a backend, subnet.env and readiness from a :class:`SubnetManager` (see module doc).

    resolve_ext: the operator's interface rule, evaluated now (raises on no match — the message is
    the fact's reason). on_subnet(lease, previous_lease): called after the backend was started for
    a new own subnet (traffic rules, blackhole route). on_ready(): the first time all facts hold.
    period_s: the safety-net timer; retry_s: the first retry of a false fact (doubling to
    RETRY_MAX_S or period_s, the shorter). The interface is resolved again every IFACE_PERIOD_S.
    network/network6: the config's Network and IPv6Network for subnet.env (None: the family is off).
    """

    def __init__(self, manager: SubnetManager, backend: Backend, info: BackendInfo, *,
                 network: IPv4Network | None, subnet_file: str, ip_masq: bool, period_s: float,
                 network6: IPv6Network | None = None,
                 resolve_ext: Callable[[], Awaitable[ExternalInterface]] | None = None,
                 on_subnet: Callable[[Lease, Lease | None], Awaitable[None]] | None = None,
                 on_ready: Callable[[], None] | None = None, retry_s: float = RETRY_S) -> None:
        self.m = manager
        self.retry_s = retry_s
        self.backend = backend
        self.mtu = info.mtu
        self.network = network
        self.network6 = network6
        self.subnet_file = subnet_file
        self.ip_masq = ip_masq
        self.period_s = period_s
        self.resolve_ext = resolve_ext
        self.on_subnet = on_subnet
        self.on_ready = on_ready
        self.facts: dict[str, str] = {f: "starting" for f in FACTS}  # fact → why it is false ("" = true)
        self.applied: Lease | None = None  # the own lease the backend and subnet.env were set up for
        self.ready = False  # all facts held at least once (READY=1 sent)
        self.passes = 0
        self._running = False  # a pass is under way
        self._event = asyncio.Event()
        self._full = True
        self._iface = True
        self._restart = True  # the backend must be (re)started for the own lease
        self._register = False  # the backend must be registered again (a failed attempt)
        self._peers_done = False
        self._last_full = 0.0
        self._last_iface = 0.0
        self._reported = ""
        self._env_verified = ""  # the subnet.env content last written or read back
        self._applied: dict[str, Lease] = {}  # book key → the lease handed to the backend
        self._attrs: LeaseAttrs | None = None  # lease data registered for a new interface, not yet written

    # -- signals ---------------------------------------------------------------------------------
    def wake(self, full: bool = False, iface: bool = False) -> None:
        """Something may have changed: run a pass soon (coalesced with whatever else arrives)."""
        self._full |= full
        self._iface |= iface
        self._event.set()

    def started(self, lease: Lease) -> None:
        """The daemon started the backend for ``lease`` itself (at startup, where errors are fatal)."""
        self.applied = lease
        self._restart = False
        self._set("backend")

    # -- readiness -------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """(ready, reason naming the first false fact), live: the lease fact is asked each time."""
        return self.first_false()[1:]

    def first_false(self) -> tuple[str, bool, str]:
        """(fact, ready, why): the first fact that does not hold, or ("", True, "")."""
        ok, why = self.m.lease_state()
        if not ok:
            return "lease", False, why
        for fact in FACTS[1:]:
            if self.facts[fact]:
                return fact, False, self.facts[fact]
        ok, why = self.backend.readiness()
        return ("", True, "") if ok else ("backend", False, why)

    def _set(self, fact: str, why: str = "") -> None:
        self.facts[fact] = why

    # -- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Wait for a signal or the timer, converge, repeat. Forever (cancel to stop)."""
        retry = self.retry_s
        while True:
            healthy = self.readiness()[0]
            now = time.monotonic()
            timeout = max(0.0, min(self._last_full + self.period_s,  # the safety net is due
                                   self._last_iface + IFACE_PERIOD_S) - now)  # … or the interface check
            if not healthy:
                timeout = min(timeout, retry)
            woken = await wait_event(self._event, timeout)
            now = time.monotonic()
            if now >= self._last_full + self.period_s:
                self._full = True  # the safety net, however busy the events keep us
            if (not woken and not healthy) or now >= self._last_iface + IFACE_PERIOD_S:
                self._iface = True  # a retry while a fact is false; the interface every 10 s
            retry = self.retry_s if healthy else min(retry * 2, RETRY_MAX_S, self.period_s)
            self._event.clear()
            full, iface = self._full, self._iface
            self._full = self._iface = False
            self._running = True
            try:
                await self.converge(full=full, iface=iface)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug must not stop convergence; retried
                log.error("convergence failed", error=repr(e))
                self._set("converged", f"convergence failed: {e!r}")
                self._full = True
            finally:
                self._running = False

    async def converge(self, full: bool = False, iface: bool = False) -> None:
        """One pass: interface, own lease, peers, subnet.env, readiness (see the module docstring)."""
        self.passes += 1
        if full:
            self._last_full = time.monotonic()
        if iface:
            self._last_iface = time.monotonic()
            await self._check_interface()
        lease = self.m.lease
        if lease is not None and not self.m.lost_reason:
            if self._attrs is not None:
                await self._update_lease()
                lease = self.m.lease
            if self._restart or self.applied is None or lease.key != self.applied.key:
                full |= await self._apply_own(lease)
            if self.applied is not None and self.applied.key == lease.key:
                await self._subnet_env(lease, check=full or iface)
        if self.m.synced and self.applied is not None and not self._restart:
            await self._apply_peers(full or not self._peers_done)
        self._report()

    # -- the parts -------------------------------------------------------------------------------
    async def _check_interface(self) -> None:
        if self.resolve_ext is None:
            self._set("interface")
            return
        try:
            ext = await self.resolve_ext()
        except Exception as e:  # noqa: BLE001 - InterfaceError and its kin: the reason is the message
            why = f"external interface: {e}"
            if self.facts["interface"] != why:
                log.warning("external interface not usable; waiting for it", error=str(e))
            self._set("interface", why)
            return
        if self.facts["interface"] and self._attrs is None:
            self._set("interface")
        old = self.backend.ctx.ext
        if ext == old and not self._register:
            return
        if ext != old:
            log.warning("external interface changed; moving the overlay to it", name=ext.name, index=ext.index,
                        address=str(ext.ip), public_ip=str(ext.public_ip), old_index=old.index,
                        old_address=str(old.ip), **({"address6": str(ext.ip6), "public_ipv6": str(ext.public_ipv6),
                                                     "old_address6": str(old.ip6)} if ext.ip6 else {}))
            self.backend.ctx.ext = ext
            self.m.book.set_host_networks(ext.networks)
            if (ext.ip, ext.ip6) != (old.ip, old.ip6):
                # the datastore connections from the old address are dead: new ones at once, not
                # after a keepalive or request deadline (10-20 s of "no answer from etcd")
                await self.m.store.reconnect()
        try:
            async with self.backend.lock:
                info = await self.backend.register()
        except BackendError as e:
            self._set("backend", f"{self.backend.type_name} backend: {e}")
            self._register = self._restart = True
            return
        self.mtu = info.mtu
        self._register = False
        self._restart = True
        self._attrs = lease_attrs(ext, info)

    async def _update_lease(self) -> None:
        """The lease carries what the backend registered last (PublicIP, VtepMAC), same subnet."""
        if self._attrs is None or self._attrs == self.m.attrs:
            self._attrs = None
            return
        try:
            await self.m.set_attrs(self._attrs)
        except StoreError as e:
            metrics.DATASTORE_ERRORS.labels("update").inc()
            why = f"the lease does not carry the new interface address yet: {e}"
            if self.facts["interface"] != why:
                log.warning("cannot update the lease; retrying", error=str(e))
            self._set("interface", why)
            return
        self._attrs = None
        self._set("interface")

    async def _apply_own(self, lease: Lease) -> bool:
        """(Re)start the backend for the own lease; True when it was done (a full pass follows)."""
        previous = self.applied
        try:
            async with self.backend.lock:
                await self.backend.start(lease)
        except Exception as e:  # noqa: BLE001 - BackendError, netlink errors: a false fact, retried
            why = str(e) or type(e).__name__
            if self.facts["backend"] != why:
                log.error("backend setup failed; retrying", subnet=str(lease), error=why)
            self._set("backend", f"{self.backend.type_name} backend: {why}")
            self._restart = True
            return False
        if previous is not None and previous.key != lease.key:
            log.info("backend moved to the new subnet", subnet=str(lease), old=str(previous))
            if self.on_subnet is not None:
                try:
                    await self.on_subnet(lease, previous)
                except Exception as e:  # noqa: BLE001 - the rules keep their own resync loop
                    log.error("traffic rules for the new subnet failed", subnet=str(lease), error=str(e))
        self._set("backend")
        self.applied = lease
        self._restart = False
        return True

    async def _apply_peers(self, full: bool) -> None:
        """Hand the backend the difference between the book's accepted leases and what it has, by
        key and object identity: over every key for a full pass (O(peers) string lookups, ~2 ms for
        5,000), else over the keys touched since the last pass (one event: O(1))."""
        arrived = metrics.LEASE_EVENTS.take()  # every event before now is in this batch
        claiming = self.m.claiming
        accepted = self.m.book.accepted
        applied = self._applied
        touched = self.m.take_touched()
        keys = [*accepted, *(k for k in applied if k not in accepted)] if full else touched
        changed_items = []
        removed_keys = []
        for key in keys:
            le = accepted.get(key)
            old = applied.get(key)
            if le is None or key in claiming:
                if old is not None:
                    removed_keys.append(key)
                continue
            if old is le:
                continue
            if old is not None and old == le:
                applied[key] = le  # the same lease as a new object (a relist): no change
                continue
            changed_items.append((key, le))
        changed = [le for _, le in changed_items]
        if not (changed or removed_keys or full):
            return
        removed = [applied[key] for key in removed_keys]
        if len(changed) + len(removed) <= LOG_EACH_PEER:
            for le in changed:
                log.info("lease added", subnet=str(le), public_ip=str(le.attrs.public_ip),
                         backend=le.attrs.backend_type or "-",
                         **({"public_ipv6": str(le.attrs.public_ipv6)} if le.attrs.public_ipv6 else {}))
            for le in removed:
                log.info("lease removed", subnet=str(le))
        else:
            log.info("peer leases changed", added=len(changed), removed=len(removed), peers=len(accepted))
        for key in removed_keys:
            del applied[key]
        applied.update(changed_items)
        await self.backend.update_peers(changed, removed, resync=full, reason="converge")
        metrics.LEASE_EVENTS.programmed(arrived, (key for key, _ in changed_items))
        if full or len(changed) + len(removed) > TRIM_AFTER_PEERS:
            memtrim.trim()  # what the pass built and dropped (a relist's records, a burst) goes back
        if not self._peers_done:
            self._peers_done = True
            self._set("converged")

    async def _subnet_env(self, lease: Lease, check: bool) -> None:
        """Write subnet.env when it does not hold the lease, and verify by reading it back.
        check: read the file even when it was verified with this content before (timer, repair)."""
        want = subnetenv.render(self.network, lease.subnet, self.mtu, self.ip_masq, ipv6_network=self.network6,
                                ipv6_subnet=lease.subnet6)
        if want == self._env_verified and not check:
            return
        try:
            if subnetenv.read_text(self.subnet_file) != want:
                subnetenv.write(self.subnet_file, want)
                if subnetenv.read_text(self.subnet_file) != want:
                    raise OSError(f"{self.subnet_file} does not hold what was written")
                log.info("wrote subnet file", path=self.subnet_file, subnet=str(lease), mtu=self.mtu)
        except OSError as e:
            self._env_verified = ""
            why = f"cannot write the subnet file {self.subnet_file}: {e.strerror or e}; fix it (pyflanneld retries)"
            if self.facts["subnet.env"] != why:
                log.error("failed to write subnet file; retrying", path=self.subnet_file, error=str(e.strerror or e))
            self._set("subnet.env", why)
            return
        self._env_verified = want
        self._set("subnet.env")

    def _report(self) -> None:
        """READY=1 the first time all facts hold; afterwards one line per change of the first
        false fact (its reason was logged where it arose)."""
        fact, ok, _why = self.first_false()
        if ok and not self.ready:
            self.ready = True
            self._reported = ""
            if self.on_ready is not None:
                self.on_ready()
            return
        if not self.ready:
            return
        if fact != self._reported:
            if ok:
                log.info("ready again")
            else:
                log.warning("not ready", fact=fact)
            self._reported = fact
