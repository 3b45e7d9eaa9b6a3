"""What the kernel-programming backends (vxlan, host-gw) share beyond upstream: reconciliation.

Upstream applies lease events and (host-gw only) re-adds missing routes every 10 s. Here every
backend built on :class:`KernelPeerBackend` keeps one desired state — "the entries the current
peer leases justify" — and one function, :meth:`KernelPeerBackend.sync`, that makes the kernel
match it. That function runs

* with every full snapshot (start, relist, own-lease or interface change: ``update_peers(...,
  resync=True)``) — stale entries of peers that vanished while the daemon was down are removed
  (flannel #2554) — and for a large batch of changes (a burst of joins);
* every ``reconcile_interval`` seconds (the daemon calls ``reconcile()``);
* ~100 ms after a netlink notification that something of ours was deleted (route, ARP, FDB,
  the device itself), so hand-deleted entries come back well within the 10 s period.

The passes send their changes in batches (``apply``: many requests per netlink message, ~7×
cheaper per entry), so a start with thousands of peers programs them in well under a second.
Single lease events still go the upstream way (``ensure_peer``/``drop_peer``, in upstream's order).
Everything runs under the backend's one lock, so a reconcile never interleaves with an event.
The route part of a pass is the same for every kernel backend: :meth:`KernelPeerBackend.sync_routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog

from .. import metrics
from ..config import json_type
from ..netlink import (
    MAIN_TABLE,
    RTPROT_KERNEL,
    BatchOp,
    Event,
    IPNetwork,
    Netlink,
    NetlinkError,
    NetlinkMonitor,
    Route,
)
from ..subnet.lease import Lease
from .base import BackendContext, BackendError, PeerId, PeerSetBackend

log = structlog.get_logger()

RECONCILE_INTERVAL = 10.0
EVENT_DEBOUNCE = 0.1


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

    Subclasses implement ``ensure_peer``/``drop_peer`` (the event path) and ``sync_entries`` (make
    the kernel equal to the desired state of ``self.peers``), plus ``relevant(event)``.
    """

    reconcile_interval = RECONCILE_INTERVAL

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.nl = Netlink()
        self._monitor_task: asyncio.Task | None = None
        self._repairs: set[asyncio.Task] = set()
        self._armed = False  # a repair pass is scheduled and has not started yet
        self._warned: set[PeerId] = set()
        # (kind, dst) of entries we are deleting ourselves: their notifications are not drift. Without
        # this every peer removal set off a full repair pass (3 dumps), and removing thousands of
        # peers took hours.
        self._own_deletes: set[tuple[str, str]] = set()
        self._closed = False
        self.sync_error = ""  # the last full pass's failure ("" when it succeeded): readiness

    # --- the daemon's interface -----------------------------------------------------------------
    async def update_peers(self, changed: Sequence[Lease], removed: Sequence[Lease], **kw: Any) -> None:
        await super().update_peers(changed, removed, **kw)
        for le in removed:
            self._forget(le.peer_id)  # O(1): a burst of removals must not be quadratic

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
        """Does this netlink event (possibly) undo something of ours?"""
        raise NotImplementedError

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
        self._own_deletes.add((kind, str(dst)))

    def owns_route(self, r: Route, devices: set[int]) -> bool:
        """Is this a route of ours: main table, not the kernel's, inside the flannel Network of its
        family (IPv4: Network, IPv6: IPv6Network) or that family's previous run's Network
        (``ctx.previous_network``/``previous_network6``), not the own subnet (that one is on
        docker0/cni0), and on one of ``devices``? Routes on the external interface count only with a
        gateway and a destination strictly inside the (previous) Network."""
        if r.table != MAIN_TABLE or r.proto == RTPROT_KERNEL or r.oif not in devices:
            return False
        cfg, ctx = self.ctx.config, self.ctx
        if r.dst.version == 4:
            net, prev, own = cfg.network, ctx.previous_network, self.own_lease.subnet if self.own_lease else None
        else:
            net, prev, own = cfg.ipv6_network, ctx.previous_network6, self.own_lease.subnet6 if self.own_lease else None
        now = net is not None and r.dst.subnet_of(net)  # type: ignore[arg-type]
        if not now and not (prev is not None and r.dst.subnet_of(prev)):  # type: ignore[arg-type]
            return False
        if r.dst == own:
            return False
        if r.oif == self.ctx.ext.index:
            inside = net if now else prev
            assert inside is not None
            return r.gateway is not None and r.dst.prefixlen > inside.prefixlen
        return True

    async def sync_routes(self, changes: dict[str, int], want: Mapping[IPNetwork, Route], devices: set[int],
                          removed_what: str = "stale route removed", added_what: str = "route set",
                          family: int = socket.AF_INET) -> set[IPNetwork]:
        """The route part of a full pass for one IP family (``want``'s), shared by the kernel
        backends: routes of ours (see ``owns_route``) on ``devices`` that ``want`` does not hold
        exactly are deleted, wanted routes that are missing or differ are set (one batch each;
        counted in ``changes``). Returns the destinations that were already in place."""
        ok = set()
        stale = []
        for r in await self.nl.routes(family=family):
            if not self.owns_route(r, devices):
                continue
            w = want.get(r.dst)
            if w is not None and w.key == r.key:
                ok.add(r.dst)
            else:
                stale.append((BatchOp.delete_route(r), removed_what, {"dst": str(r.dst), "via": str(r.gateway)}))
        await self.apply(changes, "removed", stale)
        await self.apply(changes, "added", [
            (BatchOp.replace_route(r), added_what, {"dst": str(dst), "via": str(r.gateway)})
            for dst, r in want.items() if dst not in ok])
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

    async def apply(self, changes: dict[str, int], kind: str,
                    ops: list[tuple[BatchOp, str, dict[str, Any]]]) -> None:
        """Many independent kernel changes at once (Netlink.batch): ``(op, what, log context)`` each.
        What ``attempt`` does per change: a failure goes to ``entry_failed`` and never stops the
        others; each success counts in ``changes[kind]``."""
        if not ops:
            return
        results = await self.nl.batch([op for op, _, _ in ops])
        for (op, what, ctx), err in zip(ops, results, strict=True):
            if err is None:
                changes[kind] += 1
                log.debug(what, **ctx)
                if self.repairing:
                    metrics.KERNEL_REPAIRS.labels(op.entry).inc()
            else:
                self.entry_failed(what, err, ctx)

    def start_monitor(self) -> None:
        if self._monitor_task is None:
            self._monitor_task = asyncio.create_task(self._watch_kernel(), name=f"{self.type_name}-netlink")

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
        self._own_deletes.clear()  # a full pass settles everything; stale expectations must not linger
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
        groups = NetlinkMonitor.GROUPS | (NetlinkMonitor.IPV6_ROUTES if self.ctx.config.enable_ipv6 else 0)
        mon = NetlinkMonitor(skip_new_entries=True, groups=groups)  # only deletions and link changes undo ours
        try:
            async for ev in mon.events():
                if ev.action == "del" and (ev.kind, ev.dst) in self._own_deletes:
                    self._own_deletes.discard((ev.kind, ev.dst))
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
