"""host-gw: upstream ``pkg/backend/hostgw`` + ``pkg/backend/route_network.go``, IPv4.

* Refuses to start when the PublicIP differs from the interface IP (NAT), with upstream's message.
* MTU = interface MTU; lease BackendType "host-gw", no BackendData.
* Per remote host-gw lease: route ``<subnet> via <PublicIP> dev <ext iface>``; a route to the same
  destination with another gateway/device is replaced. Removal deletes it.
* Upstream re-adds missing routes every 10 s ("Route recovered"); here the shared reconciliation
  (kernelsync) also removes stale routes at start and repairs deletions within ~100 ms.
* A peer on another L3 segment (the kernel refuses ``via <PublicIP>``: Network is unreachable) is
  explained once per peer — host-gw needs all hosts on one L2 segment — instead of a failure line
  every 10 s (upstream logs the error at every retry); the route is still retried silently.
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Network
from typing import Any

import structlog

from ..netlink import Event, NetlinkError, Route
from ..subnet.lease import Lease
from .base import BackendError, BackendInfo, register_backend
from .kernelsync import KernelPeerBackend

log = structlog.get_logger()

NAT_ERROR = ("your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
             "which is not supported by host-gw backend")
OTHER_SEGMENT_HINT = ("host-gw cannot route to this peer: its PublicIP is not on a network of this host's "
                      "interface (Network is unreachable). host-gw needs all hosts on one L2 segment; "
                      "use vxlan, or vxlan with DirectRouting")


@register_backend
class HostGWBackend(KernelPeerBackend):
    type_name = "host-gw"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._unreachable: set[IPv4Network] = set()  # peers already explained (OTHER_SEGMENT_HINT)

    async def register(self) -> BackendInfo:
        if self.ctx.ext.public_ip != self.ctx.ext.ip:  # upstream checks this in New()
            raise BackendError(NAT_ERROR)
        return BackendInfo(mtu=self.ctx.ext.mtu, backend_type="host-gw")

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        self.start_monitor()

    def route(self, lease: Lease) -> Route | None:
        if self.skip_other_type(lease):
            return None
        return Route(lease.subnet, lease.attrs.public_ip, self.ctx.ext.index)

    # --- the event path -------------------------------------------------------------------------
    async def ensure_peer(self, lease: Lease) -> None:
        r = self.route(lease)
        if r is None:
            return
        log.info("subnet added", subnet=str(lease.subnet), via=str(lease.attrs.public_ip))
        try:
            await self.nl.replace_route(r)  # NLM_F_REPLACE: a route to the same dst via another gw is replaced
        except NetlinkError as e:
            if not self._other_segment(r.dst, str(r.gateway), e):
                raise
            return
        self._unreachable.discard(r.dst)

    async def drop_peer(self, lease: Lease) -> None:
        if lease.attrs.backend_type != self.type_name:
            return
        r = self.route(lease)
        if r is None:
            return
        log.info("subnet removed", subnet=str(lease.subnet))
        self._unreachable.discard(r.dst)
        self.expect_deleted("route", r.dst.network_address)
        await self.nl.delete_route(r)

    # --- reconciliation -------------------------------------------------------------------------
    async def sync_entries(self) -> dict[str, int]:
        changes = {"added": 0, "removed": 0}
        want = {r.dst: r for r in (self.route(le) for le in list(self.peers.values())) if r is not None}
        ok = await self.sync_routes(changes, want, {self.ctx.ext.index}, "stale route removal", "route recovery")
        self._unreachable &= set(want) - ok  # a peer that is routed (or gone) is explained again next time
        return changes

    def entry_failed(self, what: str, err: NetlinkError, ctx: dict[str, Any]) -> None:
        if what == "route recovery" and self._other_segment(IPv4Network(ctx["dst"]), ctx["via"], err):
            return
        super().entry_failed(what, err, ctx)

    def _other_segment(self, dst: IPv4Network, via: str, err: NetlinkError) -> bool:
        """Is ``err`` the kernel refusing gateway ``via`` (a peer's PublicIP) as off our segments?
        Then explain it once per peer subnet ``dst`` (later failures are debug lines); True."""
        if err.code != errno.ENETUNREACH:
            return False
        if dst in self._unreachable:
            log.debug("route to peer still unreachable", subnet=str(dst), public_ip=via)
        else:
            self._unreachable.add(dst)
            log.warning(OTHER_SEGMENT_HINT, subnet=str(dst), public_ip=via, iface=self.ctx.ext.name)
        return True

    def relevant(self, ev: Event) -> bool:
        if ev.kind == "overrun":
            return True
        return ev.kind == "route" and ev.action == "del" and ev.ifindex == self.ctx.ext.index \
            and ev.table in (None, 254)
