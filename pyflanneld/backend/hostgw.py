"""host-gw: upstream ``pkg/backend/hostgw`` + ``pkg/backend/route_network.go``, IPv4 and IPv6.

* Refuses to start when the PublicIP differs from the interface IP (NAT), with upstream's message.
* MTU = interface MTU; lease BackendType "host-gw", no BackendData.
* Per remote host-gw lease: route ``<subnet> via <PublicIP> dev <ext iface>``; a route to the same
  destination with another gateway/device is replaced. Removal deletes it.
* IPv6 (``EnableIPv6``, dual stack or IPv6-only): route ``<subnet6> via <PublicIPv6> dev <ext
  iface>`` per remote lease with an IPv6 subnet. Beyond upstream, a PublicIPv6 other than the
  interface's IPv6 address (``--public-ipv6``) is refused like the IPv4 NAT case.
* Upstream re-adds missing routes every 10 s ("Route recovered"); here the shared reconciliation
  (kernelsync) also removes stale routes at start and repairs deletions and changes within ~100 ms
  of the netlink event (a full pass every minute is the safety net).
* A peer on another L3 segment (the kernel refuses ``via <PublicIP>``: Network is unreachable) is
  explained once per peer — host-gw needs all hosts on one L2 segment — instead of a failure line
  every 10 s (upstream logs the error at every retry); the route is still retried silently.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import ip_network
from typing import Any

import structlog

from ..netlink import BatchOp, Event, IPNetwork, NetlinkError, Route
from ..subnet.lease import Lease
from .base import BackendError, BackendInfo, register_backend
from .kernelsync import SAFETY_NET_INTERVAL, KernelPeerBackend

log = structlog.get_logger()

NAT_ERROR = ("your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
             "which is not supported by host-gw backend")
NAT_ERROR6 = ("your PublicIPv6 (--public-ipv6) differs from the interface's IPv6 address: peers route to it "
              "directly, so host-gw needs the interface's own address; drop --public-ipv6 or use vxlan")
OTHER_SEGMENT_HINT = ("host-gw cannot route to this peer: its PublicIP is not on a network of this host's "
                      "interface (Network is unreachable). host-gw needs all hosts on one L2 segment; "
                      "use vxlan, or vxlan with DirectRouting")


@register_backend
class HostGWBackend(KernelPeerBackend):
    """The host-gw backend (upstream ``pkg/backend/hostgw``): a route ``<subnet> via <PublicIP>`` per
    remote lease, IPv4 and IPv6; see the module docstring."""
    type_name = "host-gw"
    ipv6 = True
    reconcile_interval = SAFETY_NET_INTERVAL  # the monitor sees every change of a route of ours

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._unreachable: set[IPNetwork] = set()  # peers already explained (OTHER_SEGMENT_HINT)

    async def register(self) -> BackendInfo:
        ext = self.ctx.ext
        if ext.public_ip != ext.ip:  # upstream checks this in New()
            raise BackendError(NAT_ERROR)
        if ext.public_ipv6 != ext.ip6:
            raise BackendError(NAT_ERROR6)
        return BackendInfo(mtu=ext.mtu, backend_type="host-gw")

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        self.start_monitor()

    def routes(self, lease: Lease) -> list[Route]:
        """The routes a remote lease justifies: one per family the network runs and the lease has."""
        if self.skip_other_type(lease):
            return []
        cfg, idx, a = self.ctx.config, self.ctx.ext.index, lease.attrs
        out = []
        if cfg.enable_ipv4:
            out.append(Route(lease.subnet, a.public_ip, idx))
        if cfg.enable_ipv6 and lease.subnet6 is not None and a.public_ipv6 is not None:
            out.append(Route(lease.subnet6, a.public_ipv6, idx))
        return out

    # --- the event path -------------------------------------------------------------------------
    async def peer_ops(self, lease: Lease, remove: bool) -> list[BatchOp]:
        if remove:
            if lease.attrs.backend_type != self.type_name:
                return []
            self._unreachable.discard(lease.subnet)
            if lease.subnet6 is not None:
                self._unreachable.discard(lease.subnet6)
        # NLM_F_REPLACE: a route to the same dst via another gw is replaced
        return [BatchOp.delete_route(r) if remove else BatchOp.replace_route(r) for r in self.routes(lease)]

    def log_peer(self, lease: Lease, ops: list[BatchOp], remove: bool) -> None:
        for op in ops:
            f = op.fields()
            subnet = f"{f['dst']}/{f['plen']}"
            if remove:
                log.info("subnet removed", subnet=subnet)
            else:
                log.info("subnet added", subnet=subnet, via=str(f["gateway"]))

    # --- reconciliation -------------------------------------------------------------------------
    async def sync_entries(self) -> dict[str, int]:
        changes = {"added": 0, "removed": 0}
        want: dict[IPNetwork, Route] = {r.dst: r for le in list(self.peers.values()) for r in self.routes(le)}
        ok: set[IPNetwork] = set()
        for version, family, on in ((4, socket.AF_INET, self.ctx.config.enable_ipv4),
                                    (6, socket.AF_INET6, self.ctx.config.enable_ipv6)):
            if on:
                ok |= await self.sync_routes(changes, {d: r for d, r in want.items() if d.version == version},
                                             {self.ctx.ext.index}, "stale route removal", "route recovery",
                                             family=family)
        self._unreachable &= set(want) - ok  # a peer that is routed (or gone) is explained again next time
        return changes

    def entry_failed(self, what: str, err: NetlinkError, ctx: dict[str, Any]) -> None:
        if what in ("route recovery", "peer programming") and "via" in ctx and \
                self._other_segment(ip_network(ctx["dst"]), ctx["via"], err):
            return
        super().entry_failed(what, err, ctx)

    def _other_segment(self, dst: IPNetwork, via: str, err: NetlinkError) -> bool:
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
        if ev.kind != "route" or ev.ifindex != self.ctx.ext.index or ev.table not in (None, 254):
            return False
        return ev.action == "del" or self.route_event_inside(ev)
