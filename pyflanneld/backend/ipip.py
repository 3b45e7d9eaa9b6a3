"""ipip: upstream ``pkg/backend/ipip/ipip.go`` + ``pkg/backend/route_network.go``, IPv4.

* Option: ``DirectRouting`` (false).
* Device ``flannel.ipip``: type ipip, ``local`` = the external interface's IP, remote any (the
  kernel's own ``tunl0`` appears too, as upstream documents). An existing ipip device with another
  local/remote is deleted and recreated; a device of that name that is not ipip is an error
  ("flannel.ipip isn't an ipip mode device, please remove device and try again"). MTU = interface
  MTU − 20 (also subnet.env's). Address: own subnet's network address ``/32`` (other Network
  addresses removed), link up.
* Lease: BackendType "ipip", no BackendData.
* Per remote ipip lease: route ``<subnet> via <PublicIP> dev flannel.ipip onlink``; with
  ``DirectRouting`` and a peer whose PublicIP is directly reachable: ``<subnet> via <PublicIP> dev
  <ext iface> onlink``. Removal deletes it. Leases of other types are ignored (one warning).
* Upstream re-adds missing routes every 10 s; here (kernelsync) stale routes are also removed at
  start, a deleted route or device comes back within ~100 ms of the netlink event.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import structlog

from .. import metrics
from ..netlink import Event, Link, NetlinkError, Route
from ..subnet.lease import Lease
from .base import BackendContext, BackendError, BackendInfo, register_backend
from .devaddr import ensure_own_address
from .direct import DirectRouting
from .kernelsync import KernelPeerBackend, backend_options

log = structlog.get_logger()

DEVICE = "flannel.ipip"
OVERHEAD = 20  # the outer IPv4 header


@register_backend
class IPIPBackend(KernelPeerBackend):
    """The ipip backend (upstream ``pkg/backend/ipip``): device ``flannel.ipip`` and a route per remote
    lease through it (or directly on the same L2 with DirectRouting); see the module docstring."""
    type_name = "ipip"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.direct_routing = False
        self.mtu = ctx.ext.mtu - OVERHEAD
        self.dev: Link | None = None
        self._direct = DirectRouting(self.nl, ctx.ext.index)

    # --- life cycle -----------------------------------------------------------------------------
    async def register(self) -> BackendInfo:
        self.direct_routing = backend_options(self.ctx, {"DirectRouting": (bool, False)}, "IPIP")["DirectRouting"]
        log.info("ipip config", direct_routing=self.direct_routing)
        if self.mtu <= 0:
            raise BackendError(f"MTU {self.ctx.ext.mtu} of iface {self.ctx.ext.name} is too small for ipip "
                               "mode to work")
        try:
            await self._ensure_device()
        except NetlinkError as e:
            raise BackendError(str(e)) from None
        return BackendInfo(mtu=self.mtu, backend_type="ipip")

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        self._direct.reset(self.ctx.ext.index)  # the external interface may have changed: look again
        try:
            await self._configure_device()
        except NetlinkError as e:
            raise BackendError(f"failed to configure interface {DEVICE}: {e}") from None
        self.start_monitor()

    # --- the device -----------------------------------------------------------------------------
    async def _ensure_device(self) -> bool:
        """Make ``flannel.ipip`` exist as configured; True if (re)created. A non-ipip device of
        that name is a BackendError (it is not ours to delete)."""
        link = await self.nl.link(name=DEVICE)
        if link is not None:
            if link.kind != "ipip":
                raise BackendError(f"{DEVICE} isn't an ipip mode device, please remove device and try again")
            local = link.info.get("IFLA_IPIP_LOCAL")
            remote = link.info.get("IFLA_IPIP_REMOTE") or "0.0.0.0"
            if local != str(self.ctx.ext.ip) or remote != "0.0.0.0":
                log.warning("device already exists with incompatible attributes; recreating device",
                            device=DEVICE, local=local, remote=remote)
                await self.nl.delete_link(link.index)
                link = None
        created = link is None
        if link is None:
            link = await self.nl.create_ipip(DEVICE, local=self.ctx.ext.ip, mtu=self.mtu)
            if self.dev is not None:
                metrics.KERNEL_REPAIRS.labels("device").inc()
                log.warning("ipip device recreated", device=DEVICE)
        elif link.mtu != self.mtu:
            log.info("setting the device's MTU", device=DEVICE, old_mtu=link.mtu, mtu=self.mtu)
            await self.nl.set_link(link.index, mtu=self.mtu)
        self.dev = link
        return created

    async def _configure_device(self) -> None:
        assert self.dev is not None and self.own_lease is not None
        self.dev = await ensure_own_address(self.nl, self.dev, self.own_lease.subnet, self.network,
                                            self.ctx.previous_network)

    # --- desired state --------------------------------------------------------------------------
    async def route(self, lease: Lease) -> Route | None:
        """Upstream GetRoute: via the peer's PublicIP, onlink, over the tunnel or (DirectRouting,
        peer on our link) over the external interface."""
        if self.skip_other_type(lease):
            return None
        assert self.dev is not None
        pub: IPv4Address = lease.attrs.public_ip
        oif = self.dev.index
        if self.direct_routing and await self._direct.reachable(pub):
            oif = self.ctx.ext.index
        return Route(lease.subnet, pub, oif, onlink=True)

    # --- the event path -------------------------------------------------------------------------
    async def ensure_peer(self, lease: Lease) -> None:
        r = await self.route(lease)
        if r is None:
            return
        log.info("subnet added", subnet=str(lease.subnet), via=str(r.gateway),
                 direct=r.oif == self.ctx.ext.index)
        await self.nl.replace_route(r)

    async def drop_peer(self, lease: Lease) -> None:
        if lease.attrs.backend_type != self.type_name:
            return
        r = await self.route(lease)
        if r is None:
            return
        log.info("subnet removed", subnet=str(lease.subnet))
        self.expect_deleted("route", r.dst.network_address)
        await self.nl.delete_route(r)

    # --- reconciliation -------------------------------------------------------------------------
    def _forget_gone(self) -> None:
        super()._forget_gone()
        self._direct.keep_only(le.attrs.public_ip for le in self.peers.values())

    async def sync_entries(self) -> dict[str, int]:
        changes = {"device_recreated": 0, "added": 0, "removed": 0}
        if await self._ensure_device():
            changes["device_recreated"] = 1
        if self.own_lease is None:
            return changes
        await self._configure_device()
        assert self.dev is not None
        want: dict = {}
        for lease in list(self.peers.values()):
            r = await self.route(lease)
            if r is not None:
                want[r.dst] = r
        await self.sync_routes(changes, want, {self.dev.index, self.ctx.ext.index})
        return changes

    def relevant(self, ev: Event) -> bool:
        if ev.kind == "overrun":
            return True
        dev = self.dev.index if self.dev is not None else None
        if ev.kind == "link":
            return ev.ifindex == dev or ev.name == DEVICE
        return ev.kind == "route" and ev.action == "del" and ev.ifindex in (dev, self.ctx.ext.index) \
            and ev.table in (None, 254)
