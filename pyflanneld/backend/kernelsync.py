"""What the kernel-programming backends (vxlan, host-gw) share beyond upstream: reconciliation.

Upstream applies lease events and (host-gw only) re-adds missing routes every 10 s. Here every
backend built on :class:`KernelPeerBackend` keeps one desired state — "the entries the current
peer leases justify" — and one function, :meth:`KernelPeerBackend.sync`, the full pass, that makes
the kernel match it. The full pass runs

* with every full snapshot (start, relist, own-lease or interface change: ``update_peers(...,
  resync=True)``) — stale entries of peers that vanished while the daemon was down are removed
  (flannel #2554);
* ~100 ms after a netlink notification that something of ours changed: an entry deleted, one
  added or replaced by someone else (a permanent ARP/FDB entry, a route inside the Network on one
  of our devices), our device or its address changed, or the monitor's socket overran (events
  may be lost). Our own changes are expected (:meth:`KernelPeerBackend.expect`) and ignored;
* every ``reconcile_interval`` seconds (the daemon's converger calls it) — the safety net for what
  no notification reports. Backends whose monitor sees every change of their entries (vxlan,
  host-gw) set it to :data:`SAFETY_NET_INTERVAL` (a minute); the pass reads the kernel through raw
  netlink dumps (~10 ms per 15,000 entries, :func:`pyflanneld.netlink.read_routes`), so it costs
  next to nothing when nothing changed.

Peer changes between full passes (lease events, a burst of 5,000 joins) are programmed without
reading the kernel: :meth:`KernelPeerBackend.program` sends every changed peer's entries in one
netlink batch (many requests per message, ~7× cheaper per entry than single calls), each peer's in
upstream's order (vxlan: ARP → FDB → route; a failure rolls the peer's other entries back), from
the backend's :meth:`KernelPeerBackend.peer_ops`. Everything runs under the backend's one lock, so
a full pass never interleaves with an event. The route part of a full pass is the same for every
kernel backend: :meth:`KernelPeerBackend.sync_routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from ipaddress import ip_address
from itertools import islice
from typing import Any

import structlog

from .. import metrics
from ..config import json_type
from ..netlink import (
    MAIN_TABLE,
    RTNH_F_ONLINK,
    RTPROT_KERNEL,
    BatchOp,
    Event,
    IPNetwork,
    Netlink,
    NetlinkError,
    NetlinkMonitor,
    Route,
    event_key,
    read_routes,
)
from ..subnet.lease import Lease
from .base import BackendContext, BackendError, PeerId, PeerSetBackend

log = structlog.get_logger()

RECONCILE_INTERVAL = 10.0  # the full pass's period for a backend whose monitor misses changes
SAFETY_NET_INTERVAL = 60.0  # … and for one whose monitor sees every change of its entries
EVENT_DEBOUNCE = 0.1
LOG_EACH_PEER = 10  # batches up to this size log a line per peer (upstream's); larger ones a summary
APPLY_CHUNK = 1024  # requests built and sent at a time by a full pass (see apply)


def backend_options(ctx: BackendContext, spec: dict[str, tuple[type, Any]], label: str) -> dict[str, Any]:
    """Read typed ``Backend`` options like Go's json.Unmarshal into a struct (case-insensitive keys).

    spec: {"VNI": (int, 1), "Mode": (str, "separate"), ...} (int, bool or str). A wrong JSON type is
    upstream's decode error, one line.
    """
    out = {}
    for name, (typ, default) in spec.items():
        v = ctx.config.backend_option(name, None)
        if v is None:
            out[name] = default
            continue
        if typ is bool or typ is str:
            ok = isinstance(v, typ)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and int(v) == v
        if not ok:
            go_type = {bool: "bool", str: "string"}.get(typ, "int")
            raise BackendError(
                f"error decoding {label} backend config: json: cannot unmarshal {json_type(v)} into Go struct "
                f"field .{name} of type {go_type}"
            )
        out[name] = typ(v)
    return out


class KernelPeerBackend(PeerSetBackend):
    """A PeerSetBackend whose peers become kernel entries, kept in place by reconciliation.

    Subclasses implement ``sync_entries`` (the full pass: make the kernel equal to the desired
    state of ``self.peers``) and ``relevant(event)``, and either ``peer_ops`` (the entries of one
    peer as netlink batch requests: peer changes are then programmed in batches) or
    ``ensure_peer``/``drop_peer`` (one peer at a time).
    """

    reconcile_interval = RECONCILE_INTERVAL

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.nl = Netlink()
        self._monitor_task: asyncio.Task | None = None
        self._repairs: set[asyncio.Task] = set()
        self._armed = False  # a repair pass is scheduled and has not started yet
        self._warned: set[PeerId] = set()
        # netlink.event_key of the notifications our own changes cause: they are not drift. Without
        # this every peer removal set off a full repair pass, and removing thousands of peers took
        # hours. Cleared by every full pass.
        self._expected: set[bytes] = set()
        self._closed = False
        self.sync_error = ""  # the last full pass's failure ("" when it succeeded): readiness

    # --- the daemon's interface -----------------------------------------------------------------
    async def update_peers(self, changed: Sequence[Lease], removed: Sequence[Lease], **kw: Any) -> None:
        await super().update_peers(changed, removed, **kw)
        for le in removed:
            self._forget(le.peer_id)  # O(1): a burst of removals must not be quadratic

    def needs_full_pass(self, changes: int, resync: bool) -> bool:
        # with peer_ops, a batch of any size is one netlink batch: no need to read the kernel
        if self.batched:
            return resync
        return super().needs_full_pass(changes, resync)

    async def apply_peers(self, stale: Sequence[Lease], changed: Sequence[Lease]) -> None:
        if self.batched:
            await self.program(stale, changed)
        else:
            await super().apply_peers(stale, changed)

    async def ensure_peer(self, lease: Lease) -> None:
        await self.program([], [lease])

    async def drop_peer(self, lease: Lease) -> None:
        await self.program([lease], [])

    async def resync(self, reason: str) -> None:
        await self._sync(reason)

    def readiness(self) -> tuple[bool, str]:
        if self.sync_error:
            return False, f"{self.type_name} backend: {self.sync_error}"
        return True, ""

    async def close(self) -> None:
        self._closed = True
        for t in [*self._repairs, self._monitor_task]:
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        await self.nl.close()

    # --- for subclasses -------------------------------------------------------------------------
    async def sync_entries(self) -> dict[str, int]:
        """Make the kernel match ``self.peers``; return counters of what changed."""
        raise NotImplementedError

    def relevant(self, ev: Event) -> bool:
        """Does this netlink event (possibly) undo something of ours? (Our own changes never get here.)"""
        raise NotImplementedError

    async def peer_ops(self, lease: Lease, remove: bool) -> list[BatchOp] | None:
        """The kernel changes that program (``remove`` False) or remove one peer, in upstream's
        order; [] for a lease this backend does not program. None (the default): this backend
        programs peers with ``ensure_peer``/``drop_peer`` instead."""
        return None

    def log_peer(self, lease: Lease, ops: Sequence[BatchOp], remove: bool) -> None:
        """Upstream's log line for one peer programmed or removed (small batches only)."""
        log.info("removing subnet" if remove else "adding subnet", subnet=str(lease),
                 public_ip=str(lease.attrs.public_ip))

    def skip_other_type(self, lease: Lease) -> bool:
        """Upstream ignores leases of another BackendType, with a warning; here once per subnet."""
        if lease.attrs.backend_type == self.type_name:
            return False
        if lease.peer_id not in self._warned:
            self._warned.add(lease.peer_id)
            log.warning(f"ignoring non-{self.type_name} subnet", subnet=str(lease), type=lease.attrs.backend_type)
        return True

    def expect_deleted(self, kind: str, dst: object) -> None:
        """Call before deleting an entry of ours (kind "route"/"neigh"/"fdb", dst as in Event.dst)."""
        self._expected.add(event_key("del", kind, str(dst)))

    def expect(self, op: BatchOp) -> None:
        """The notification ``op`` will cause is ours (``apply`` calls this for every op)."""
        self._expected.add(op.event_key())

    def _owns(self, dst: int, plen: int, gw: int, oif: int, proto: int, devices: set[int], version: int = 4) -> bool:
        """Is this main-table route (a raw dump's row: addresses as ints of IP ``version``, gw 0
        for none) one of ours: not the kernel's, inside the flannel Network of its family (IPv4:
        Network, IPv6: IPv6Network) or that family's previous run's Network
        (``ctx.previous_network``/``previous_network6``), not the own subnet (that one is on
        docker0/cni0), and on one of ``devices``? Routes on the external interface count only with a
        gateway and a destination strictly inside the (previous) Network."""
        if proto == RTPROT_KERNEL or oif not in devices:
            return False
        net_plen = self._inside_family(dst, plen, version)
        if net_plen is None:
            return False
        own = self._family_nets(version)[2]
        if own is not None and dst == int(own.network_address) and plen == own.prefixlen:
            return False
        if oif == self.ctx.ext.index:
            return gw != 0 and plen > net_plen
        return True

    def route_event_inside(self, ev: Event) -> bool:
        """Is this route notification (IPv4 or IPv6) about a destination inside the (previous)
        Network of its family, not the kernel's own route? (Changes of other routes on the external
        interface are not ours.)"""
        if ev.proto == RTPROT_KERNEL or ev.dst is None or ev.plen is None:
            return False
        try:
            addr = ip_address(ev.dst)
        except ValueError:
            return False
        return self._inside_family(int(addr), ev.plen, addr.version) is not None

    def _family_nets(self, version: int) -> tuple[IPNetwork | None, IPNetwork | None, IPNetwork | None]:
        """(Network, previous run's Network, own subnet) of IP version 4 or 6 (None: not in use)."""
        cfg, ctx, own = self.ctx.config, self.ctx, self.own_lease
        if version == 4:
            return cfg.network, ctx.previous_network, own.subnet if own is not None else None
        return cfg.ipv6_network, ctx.previous_network6, own.subnet6 if own is not None else None

    def _inside_family(self, dst: int, plen: int, version: int) -> int | None:
        """The prefix length of the Network (or else the previous run's) of ``version`` holding
        dst/plen (an address as an int of that version), or None."""
        net, prev, _ = self._family_nets(version)
        n = _inside(dst, plen, net) if net is not None else None
        if n is None and prev is not None:
            n = _inside(dst, plen, prev)
        return n

    async def sync_routes(self, changes: dict[str, int], want: Mapping[IPNetwork, Route], devices: set[int],
                          removed_what: str = "stale route removed", added_what: str = "route set",
                          family: int = socket.AF_INET) -> set[IPNetwork]:
        """The route part of a full pass for one IP family (``want``'s), shared by the kernel
        backends: routes of ours (see ``_owns``) on ``devices`` that ``want`` does not hold
        exactly are deleted, wanted routes that are missing or differ are set (one batch each;
        counted in ``changes``). Returns the destinations that were already in place. The kernel is
        read with one raw dump of the main table's routes of ``family``."""
        version = 6 if family == socket.AF_INET6 else 4
        wanted = {int(r.dst.network_address) << 8 | r.dst.prefixlen: r for r in want.values()}  # one family: no clash
        ok: set[IPNetwork] = set()
        stale = []
        for dst, plen, gw, oif, flags, proto in await asyncio.to_thread(read_routes, MAIN_TABLE, family):
            if not self._owns(dst, plen, gw, oif, proto, devices, version):
                continue
            w = wanted.get(dst << 8 | plen)
            if w is not None and _route_matches(w, gw, oif, flags):
                ok.add(w.dst)
            else:
                stale.append(BatchOp.delete_route_raw(dst, plen, gw, oif, bool(flags & RTNH_F_ONLINK), family=family))
        await self.apply(changes, "removed", removed_what, stale)
        await self.apply(changes, "added", added_what,
                         (BatchOp.replace_route(r) for dst, r in want.items() if dst not in ok))
        return ok

    async def attempt(self, what: str, fn: Callable[[], Awaitable[Any]], **ctx: Any) -> bool:
        """Run one kernel change; log and return False on failure (one bad entry never stops the rest)."""
        try:
            await fn()
            return True
        except NetlinkError as e:
            self.entry_failed(what, e, ctx)
            return False

    def entry_failed(self, what: str, err: NetlinkError, ctx: dict[str, Any]) -> None:
        """One kernel change of ``attempt``/``apply`` failed: one warning line ("<what> failed").
        A backend overrides this to explain failures whose cause is the host (see host-gw)."""
        log.warning(f"{what} failed", error=str(err), **ctx)

    async def apply(self, changes: dict[str, int], kind: str, what: str, ops: Iterable[BatchOp]) -> None:
        """Many independent kernel changes at once (Netlink.batch), all described by ``what`` (e.g.
        "stale ARP entry removed"): a failure goes to ``entry_failed`` (with the entry's fields) and
        never stops the others; each success counts in ``changes[kind]``. Their notifications are
        expected (not drift). ``ops`` is consumed APPLY_CHUNK at a time (a generator: a first sync's
        15,000 requests never exist at once)."""
        it = iter(ops)
        done = 0
        while chunk := list(islice(it, APPLY_CHUNK)):
            for op in chunk:
                self.expect(op)
            results = await self.nl.batch(chunk)
            for op, err in zip(chunk, results, strict=True):
                if err is None:
                    done += 1
                    if self.repairing:
                        metrics.KERNEL_REPAIRS.labels(op.entry).inc()
                else:
                    self.entry_failed(what, err, op.log_context())
        if done:
            changes[kind] += done
            log.debug(what, entries=done)

    async def program(self, stale: Sequence[Lease], changed: Sequence[Lease]) -> None:
        """Remove the entries of ``stale`` leases and program those of ``changed`` ones (the lock is
        held), without reading the kernel: one netlink batch, removals first, then each stage of
        ``peer_ops`` for every peer (vxlan: every ARP entry, then every FDB entry, then every route:
        each peer's entries in upstream's order). A peer whose entry failed is rolled back (its
        other new entries removed), each failed entry is one ``entry_failed("peer programming")``
        line; the other peers are not affected."""
        few = len(stale) + len(changed) <= LOG_EACH_PEER
        removals: list[BatchOp] = []
        for le in stale:
            ops = await self.peer_ops(le, remove=True) or []
            if few and ops:
                self.log_peer(le, ops, remove=True)
            removals += ops
        per_peer: list[tuple[Lease, list[BatchOp]]] = []
        for le in changed:
            ops = await self.peer_ops(le, remove=False) or []
            if ops:
                if few:
                    self.log_peer(le, ops, remove=False)
                per_peer.append((le, ops))
        stages = max((len(ops) for _, ops in per_peer), default=0)
        adds = [ops[i] for i in range(stages) for _, ops in per_peer if i < len(ops)]
        todo = removals + adds
        if not todo:
            return
        for op in todo:
            self.expect(op)
        results = await self.nl.batch(todo)
        for op, err in zip(removals, results, strict=False):
            if err is not None:
                self.entry_failed("peer removal", err, op.log_context())
        failed: dict[int, NetlinkError] = {}
        for op, err in zip(adds, results[len(removals):], strict=True):
            if err is not None:
                failed[id(op)] = err
        if not failed:
            if not few:
                log.info("peers programmed", added=len(per_peer), removed=len(stale))
            return
        rollback: list[BatchOp] = []
        bad = 0
        for le, ops in per_peer:
            errs = [(op, failed[id(op)]) for op in ops if id(op) in failed]
            if not errs:
                continue
            bad += 1
            undo = await self.peer_ops(le, remove=True) or []
            rollback += [u for op, u in zip(ops, undo, strict=False) if id(op) not in failed]
            for op, err in errs:
                self.entry_failed("peer programming", err, {"subnet": str(le),
                                                            "public_ip": str(le.attrs.public_ip), **op.log_context()})
        for op in rollback:
            self.expect(op)
        if rollback:
            await self.nl.batch(rollback)
        if not few:
            log.info("peers programmed", added=len(per_peer) - bad, removed=len(stale), failed=bad)

    def start_monitor(self) -> None:
        """Start following the kernel's notifications (once; a second call does nothing): entries of ours
        that are deleted or changed, and the devices' addresses, are repaired within ~100 ms; an overrun
        makes a full pass. The task ends with :meth:`close`."""
        if self._monitor_task is None:
            self._monitor_task = asyncio.create_task(self._watch_kernel(), name=f"{self.type_name}-netlink")

    @property
    def batched(self) -> bool:
        """Does this backend describe its peers' entries as batch requests (``peer_ops``)?"""
        return type(self).peer_ops is not KernelPeerBackend.peer_ops

    # --- internals ------------------------------------------------------------------------------
    def _forget_gone(self) -> None:
        self._warned &= set(self.peers)

    def _forget(self, peer: PeerId) -> None:
        """What _forget_gone does, for one removed peer (the full pass runs with every reconcile)."""
        self._warned.discard(peer)

    async def _sync(self, reason: str) -> None:
        """One full pass (the lock is held). Until the first snapshot we do not know which entries
        are stale: a timer or event pass before it would remove every peer of the previous run."""
        if not self.have_snapshot:
            log.debug("reconcile skipped: no lease snapshot yet", reason=reason)
            return
        self._expected.clear()  # a full pass settles everything; stale expectations must not linger
        self._forget_gone()
        try:
            changes = await self.sync_entries()
        except (NetlinkError, BackendError) as e:
            if str(e) != self.sync_error:
                log.warning("reconcile failed", reason=reason, error=str(e))
            self.sync_error = str(e)
            return
        if self.sync_error:
            log.info("reconcile succeeded again", reason=reason)
            self.sync_error = ""
        if any(changes.values()):
            log.info("kernel state reconciled", reason=reason, **changes)

    async def _watch_kernel(self) -> None:
        groups = NetlinkMonitor.GROUPS | NetlinkMonitor.LINKS_AND_ADDRESSES
        if self.ctx.config.enable_ipv6:
            groups |= NetlinkMonitor.IPV6_ROUTES | NetlinkMonitor.IPV6_ADDRESSES
        mon = NetlinkMonitor(groups=groups)
        expected = self._expected
        try:
            async for ev in mon.events():
                key = event_key(ev.action, ev.kind, ev.dst)
                if key in expected:
                    expected.discard(key)
                    continue
                if not self._closed and self.relevant(ev):
                    self._schedule()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - never let the monitor die silently
            log.error("netlink monitor stopped", error=str(e))
        finally:
            mon.close()

    def _schedule(self) -> None:
        if self._armed:
            return
        self._armed = True
        task = asyncio.create_task(self._delayed_sync(), name=f"{self.type_name}-repair")
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _delayed_sync(self) -> None:
        await asyncio.sleep(EVENT_DEBOUNCE)
        self._armed = False  # events arriving from now on schedule another pass
        async with self.lock:
            if not self._closed:
                self.repairing = True
                await self._sync("netlink event")


def _inside(dst: int, plen: int, net: IPNetwork) -> int | None:
    """``net``'s prefix length if dst/plen (an address of ``net``'s version as an int) lies inside
    ``net``, else None."""
    n = net.prefixlen
    if plen < n or (n and (dst ^ int(net.network_address)) >> (net.max_prefixlen - n)):
        return None
    return n


def _route_matches(r: Route, gw: int, oif: int, flags: int) -> bool:
    """Is a kernel route (gateway, oif, rtm_flags as ints) the same as ``r`` (dst and table equal)?"""
    return (int(r.gateway) if r.gateway is not None else 0) == gw and (r.oif or 0) == oif \
        and r.onlink == bool(flags & RTNH_F_ONLINK)
