"""vxlan: upstream ``pkg/backend/vxlan`` (device.go, vxlan.go, vxlan_network.go), IPv4.

* Device ``flannel.<VNI>``: type vxlan, id VNI, ``local`` = the external interface's IP, ``dev`` =
  the external interface, dstport ``Port`` (0 → the kernel default 8472), nolearning unless
  ``Learning``, ``gbp`` if ``GBP``; MTU = (``MTU`` or interface MTU) − 50; a random locally
  administered unicast MAC set at creation (#1155/#1795). An existing compatible device is reused
  with its MAC; an incompatible one is deleted and recreated. ``accept_ra = 0``.
* Address: own subnet's network address /32; other addresses inside the Network are removed.
* BackendData ``{"VNI": n, "VtepMAC": "<mac>"}`` (VNI as Go's uint16).
* Per remote vxlan lease, in this order: ARP ``<subnet addr> lladdr <VtepMAC> PERMANENT``, FDB
  ``<VtepMAC> dst <PublicIP> self permanent``, route ``<subnet> via <subnet addr> dev flannel.N
  onlink``; a failure rolls back the earlier ones. Removal deletes ARP, FDB, route.
* ``DirectRouting``: a peer whose PublicIP ``ip route get`` resolves without a gateway (on the
  external interface) gets ``<subnet> via <PublicIP> dev <ext>`` instead.

Beyond upstream (see kernelsync): stale entries are removed at start, deleted entries and a deleted
device (recreated with the same MAC) come back within ~100 ms of the netlink event, or at the next
10 s reconcile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Address

import structlog

from .. import metrics
from ..netlink import VXLAN_DEFAULT_PORT, BatchOp, Event, Link, NetlinkError, Route, write_sysctl
from ..subnet.lease import Lease, vtep_mac
from .base import BackendContext, BackendError, BackendInfo, register_backend
from .devaddr import ensure_own_address
from .direct import DirectRouting
from .kernelsync import KernelPeerBackend, backend_options

log = structlog.get_logger()

ENCAP_OVERHEAD = 50
MIN_DEVICE_MTU = 68  # the kernel's minimum for an IPv4 device


def random_mac() -> str:
    """A random locally administered unicast MAC (upstream pkg/mac: first byte &0xfe|0x02)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True)
class PeerEntries:
    """The kernel entries one remote lease justifies."""

    route: Route
    arp: tuple[IPv4Address, str] | None = None  # subnet network address → VtepMAC
    fdb: tuple[str, IPv4Address] | None = None  # VtepMAC → PublicIP


@register_backend
class VXLANBackend(KernelPeerBackend):
    type_name = "vxlan"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.vni = 1
        self.port = VXLAN_DEFAULT_PORT
        self.gbp = self.learning = self.direct_routing = False
        self.mtu = ctx.ext.mtu - ENCAP_OVERHEAD
        self.dev_name = "flannel.1"
        self.dev: Link | None = None
        self.mac: str | None = None
        self._direct = DirectRouting(self.nl, ctx.ext.index)
        self._bad_data: set = set()

    def _read_config(self) -> None:
        """Upstream RegisterNetwork's config struct; a wrong JSON type is a BackendError."""
        o = backend_options(self.ctx, {
            "VNI": (int, 1), "Port": (int, 0), "GBP": (bool, False), "Learning": (bool, False),
            "DirectRouting": (bool, False), "MTU": (int, 0),
        }, "VXLAN")
        # Out of range, these reached the netlink encoder (struct.error: "internal error" and
        # pyroute2's traceback) or came back as a bare ERANGE/EINVAL.
        for name, low, high, what in (("VNI", 0, 0xFFFFFF, "a 24-bit VXLAN id"),
                                      ("Port", 0, 0xFFFF, "a UDP port, 0 for the kernel's 8472"),
                                      ("MTU", 0, 0xFFFF, "the underlay MTU, 0 for the interface's")):
            if not low <= o[name] <= high:
                raise BackendError(f"VXLAN backend config: {name} {o[name]} is out of range {low}-{high} ({what})")
        if o["MTU"] and o["MTU"] - ENCAP_OVERHEAD < MIN_DEVICE_MTU:
            raise BackendError(f"VXLAN backend config: MTU {o['MTU']} leaves the device less than "
                               f"{MIN_DEVICE_MTU} after the {ENCAP_OVERHEAD}-byte VXLAN header; give the "
                               "underlay's MTU (e.g. 1500), or 0 for the interface's")
        self.vni = o["VNI"]
        self.port = o["Port"] or VXLAN_DEFAULT_PORT
        self.gbp, self.learning, self.direct_routing = o["GBP"], o["Learning"], o["DirectRouting"]
        self.mtu = (o["MTU"] or self.ctx.ext.mtu) - ENCAP_OVERHEAD
        self.dev_name = f"flannel.{self.vni}"
        log.info("vxlan config", vni=self.vni, port=o["Port"], gbp=self.gbp, learning=self.learning,
                 direct_routing=self.direct_routing)

    # --- life cycle -----------------------------------------------------------------------------
    async def register(self) -> BackendInfo:
        self._read_config()
        try:
            if not await self._ensure_device():  # a reused device: accept_ra too (a new one has it)
                write_sysctl(f"net/ipv6/conf/{self.dev_name}/accept_ra", "0")
        except NetlinkError as e:
            raise BackendError(str(e)) from None
        return BackendInfo(mtu=self.mtu, backend_type="vxlan",
                           backend_data={"VNI": self.vni & 0xFFFF, "VtepMAC": self.mac})

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        self._direct.reset(self.ctx.ext.index)  # the external interface may have changed: look again
        try:
            await self._configure_device()
        except NetlinkError as e:
            raise BackendError(f"failed to configure interface {self.dev_name}: {e}") from None
        self.start_monitor()

    # --- the device -----------------------------------------------------------------------------
    def _incompatible(self, link: Link) -> str:
        """Upstream vxlanLinksIncompat (+ learning): why an existing device can't be reused, or ""."""
        if link.kind != "vxlan":
            return f"link type: {link.kind or 'unknown'} vs vxlan"
        i = link.info
        checks = [
            ("vni", i.get("IFLA_VXLAN_ID"), self.vni),
            ("vtep (external) interface", i.get("IFLA_VXLAN_LINK") or self.ctx.ext.index, self.ctx.ext.index),
            ("vtep (external) IP", i.get("IFLA_VXLAN_LOCAL") or str(self.ctx.ext.ip), str(self.ctx.ext.ip)),
            ("l2miss", bool(i.get("IFLA_VXLAN_L2MISS")), False),
            ("port", i.get("IFLA_VXLAN_PORT") or self.port, self.port),
            ("gbp", bool(i.get("IFLA_VXLAN_GBP")), self.gbp),
            ("learning", bool(i.get("IFLA_VXLAN_LEARNING")), self.learning),
        ]
        for what, have, want in checks:
            if have != want:
                return f"{what}: {have} vs {want}"
        return ""

    async def _ensure_device(self) -> bool:
        """Make ``flannel.<VNI>`` exist as configured (MAC and MTU included); True if (re)created."""
        link = await self.nl.link(name=self.dev_name)
        if link is not None:
            why = self._incompatible(link)
            if why:
                log.warning("device exists with incompatible configuration; recreating",
                            device=self.dev_name, reason=why)
                await self.nl.delete_link(link.index)
                link = None
        created = link is None
        if link is None:
            mac = self.mac or random_mac()
            link = await self.nl.create_vxlan(
                self.dev_name, vni=self.vni, local=self.ctx.ext.ip, dev_index=self.ctx.ext.index,
                port=self.port, learning=self.learning, gbp=self.gbp, mac=mac, mtu=self.mtu)
            if link.mac != mac:
                raise BackendError(f"{self.dev_name}'s mac address wanted: {mac}, but got: {link.mac}")
            if self.mac is not None:
                metrics.KERNEL_REPAIRS.labels("device").inc()
                log.warning("vxlan device recreated", device=self.dev_name, mac=mac)
        else:
            if self.mac is not None and link.mac != self.mac:  # someone changed our VtepMAC
                await self.nl.set_link(link.index, address=self.mac)
            if link.mtu != self.mtu:
                await self.nl.set_link(link.index, mtu=self.mtu)
        self.mac = self.mac or link.mac
        self.dev = link
        if created:
            write_sysctl(f"net/ipv6/conf/{self.dev_name}/accept_ra", "0")
        return created

    async def _configure_device(self) -> None:
        """Upstream Configure: own subnet address /32 (others of the Network, or of the previous
        run's Network, removed), link up."""
        assert self.dev is not None and self.own_lease is not None
        self.dev = await ensure_own_address(self.nl, self.dev, self.own_lease.subnet, self.network,
                                            self.ctx.previous_network)

    # --- desired state --------------------------------------------------------------------------
    async def entries(self, lease: Lease) -> PeerEntries | None:
        """What this remote lease justifies in the kernel (None: not a usable vxlan lease)."""
        if self.skip_other_type(lease):
            return None
        mac = vtep_mac(lease.attrs.backend_data)
        if mac is None:
            if lease.subnet not in self._bad_data:
                self._bad_data.add(lease.subnet)
                log.error("error decoding subnet lease JSON: no valid VtepMAC in BackendData",
                          subnet=str(lease.subnet), backend_data=lease.attrs.backend_data)
            return None
        sn, pub = lease.subnet, lease.attrs.public_ip
        if self.direct_routing and await self._direct.reachable(pub):
            return PeerEntries(Route(sn, pub, self.ctx.ext.index))
        assert self.dev is not None
        gw = sn.network_address
        return PeerEntries(Route(sn, gw, self.dev.index, onlink=True), arp=(gw, mac), fdb=(mac, pub))

    # --- the event path (upstream order) --------------------------------------------------------
    async def ensure_peer(self, lease: Lease) -> None:
        e = await self.entries(lease)
        if e is None:
            return
        nl = self.nl
        if e.arp is None:
            log.info("adding direct route to subnet", subnet=str(lease.subnet), public_ip=str(e.route.gateway))
            await nl.replace_route(e.route)
            return
        assert e.fdb is not None
        log.info("adding subnet", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip),
                 vtep_mac=e.arp[1])
        await nl.replace_neighbour(e.route.oif, *e.arp)
        try:
            await nl.replace_fdb(e.route.oif, *e.fdb)
        except NetlinkError:
            await self.attempt("DelARP", lambda: nl.delete_neighbour(e.route.oif, e.arp[0]))
            raise
        try:
            await nl.replace_route(e.route)
        except NetlinkError:
            await self.attempt("DelARP", lambda: nl.delete_neighbour(e.route.oif, e.arp[0]))
            await self.attempt("DelFDB", lambda: nl.delete_fdb(e.route.oif, *e.fdb))
            raise

    async def drop_peer(self, lease: Lease) -> None:
        if lease.attrs.backend_type != self.type_name:
            return
        e = await self.entries(lease)
        if e is None:
            return
        ctx = {"subnet": str(lease.subnet)}
        if e.arp is None:
            log.info("removing direct route to subnet", subnet=str(lease.subnet),
                     public_ip=str(e.route.gateway))
            self.expect_deleted("route", e.route.dst.network_address)
            await self.attempt("route delete", lambda: self.nl.delete_route(e.route), **ctx)
            return
        assert e.fdb is not None
        log.info("removing subnet", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip),
                 vtep_mac=e.arp[1])
        idx = e.route.oif
        self.expect_deleted("neigh", e.arp[0])
        self.expect_deleted("fdb", e.fdb[1])
        self.expect_deleted("route", e.route.dst.network_address)
        await self.attempt("DelARP", lambda: self.nl.delete_neighbour(idx, e.arp[0]), **ctx)
        await self.attempt("DelFDB", lambda: self.nl.delete_fdb(idx, *e.fdb), **ctx)
        await self.attempt("route delete", lambda: self.nl.delete_route(e.route), **ctx)

    # --- reconciliation -------------------------------------------------------------------------
    def _forget(self, subnet) -> None:
        super()._forget(subnet)
        self._bad_data.discard(subnet)

    def _forget_gone(self) -> None:
        super()._forget_gone()
        self._bad_data &= set(self.peers)
        self._direct.keep_only(le.attrs.public_ip for le in self.peers.values())

    async def sync_entries(self) -> dict[str, int]:
        changes = {"device_recreated": 0, "added": 0, "removed": 0}
        if await self._ensure_device():
            changes["device_recreated"] = 1
        if self.own_lease is None:
            return changes
        await self._configure_device()
        assert self.dev is not None
        idx = self.dev.index
        nl = self.nl
        arp: dict[IPv4Address, str] = {}
        fdb: set[tuple[str, IPv4Address]] = set()
        routes: dict = {}
        for lease in list(self.peers.values()):
            e = await self.entries(lease)
            if e is None:
                continue
            routes[e.route.dst] = e.route
            if e.arp is not None and e.fdb is not None:
                arp[e.arp[0]] = e.arp[1]
                fdb.add(e.fdb)

        # 1. ARP entries on our device (only permanent ones are ours; the kernel's own come and go)
        have_arp = {n.ip: n for n in await nl.neighbours(idx)}
        await self.apply(changes, "removed", [
            (BatchOp.delete_neighbour(idx, ip), "stale ARP entry removed", {"ip": str(ip)})
            for ip, n in have_arp.items() if n.permanent and ip not in arp])
        ops = []
        for ip, mac in arp.items():
            n = have_arp.get(ip)
            if n is None or n.mac != mac or not n.permanent:
                ops.append((BatchOp.replace_neighbour(idx, ip, mac), "ARP entry set", {"ip": str(ip), "mac": mac}))
        await self.apply(changes, "added", ops)
        # 2. FDB entries (remote VTEPs)
        entries = [f for f in await nl.fdb(idx) if f.dst is not None]
        have_fdb = {(f.mac, f.dst) for f in entries if f.permanent}
        await self.apply(changes, "removed", [
            (BatchOp.delete_fdb(idx, mac, dst), "stale FDB entry removed", {"mac": mac, "dst": str(dst)})
            for mac, dst in have_fdb - fdb])
        await self.apply(changes, "added", [
            (BatchOp.replace_fdb(idx, mac, dst), "FDB entry set", {"mac": mac, "dst": str(dst)})
            for mac, dst in fdb - have_fdb])
        # 3. routes: on our device, or direct routes on the external interface
        await self.sync_routes(changes, routes, {idx, self.ctx.ext.index})
        return changes

    def relevant(self, ev: Event) -> bool:
        if ev.kind == "overrun":
            return True
        dev = self.dev.index if self.dev is not None else None
        if ev.kind == "link":
            return ev.ifindex == dev or ev.name == self.dev_name
        if ev.action != "del":
            return False
        if ev.kind == "route":
            return ev.ifindex in (dev, self.ctx.ext.index) and (ev.table in (None, 254))
        return ev.ifindex == dev  # neigh / fdb
