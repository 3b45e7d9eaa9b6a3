"""vxlan: upstream ``pkg/backend/vxlan`` (device.go, vxlan.go, vxlan_network.go), IPv4 and IPv6.

* Device ``flannel.<VNI>``: type vxlan, id VNI, ``local`` = the external interface's IP, ``dev`` =
  the external interface, dstport ``Port`` (0 → the kernel default 8472), nolearning unless
  ``Learning``, ``gbp`` if ``GBP``; MTU = (``MTU`` or interface MTU) − 50; a random locally
  administered unicast MAC set at creation (#1155/#1795). An existing compatible device is reused
  with its MAC; an incompatible one is deleted and recreated. ``accept_ra = 0``.
* Address: own subnet's network address /32; other addresses inside the Network are removed.
* BackendData ``{"VNI": n, "VtepMAC": "<mac>"}`` (VNI as Go's uint16).
* Per remote vxlan lease, in this order: ARP ``<subnet addr> lladdr <VtepMAC> PERMANENT``, FDB
  ``<VtepMAC> dst <PublicIP> self permanent``, route ``<subnet> via <subnet addr> dev flannel.N
  onlink``; a failure rolls back the others. Removal deletes ARP, FDB, route. Sent as netlink
  batches (``peer_ops``): a burst of joins is one batch, each peer's entries in this order.
* ``DirectRouting``: a peer whose PublicIP ``ip route get`` resolves without a gateway (on the
  external interface) gets ``<subnet> via <PublicIP> dev <ext>`` instead.
* IPv6 (``EnableIPv6``; IPv6-only with ``EnableIPv4: false``): a second device ``flannel-v6.<VNI>``
  over the IPv6 underlay (``local`` = the interface's IPv6 address, same VNI/port/learning/GBP, its
  own random MAC, the kernel's MTU as upstream leaves it, ``accept_ra = 0``), address own IPv6
  subnet's network address ``/128``; BackendV6Data ``{"VNI": n, "VtepMAC": "<its mac>"}``. Per
  remote lease with an IPv6 subnet, PublicIPv6 and BackendV6Data, the same three entries on it:
  permanent neighbour, FDB ``dst <PublicIPv6>``, route ``<subnet6> via <subnet6 addr> dev
  flannel-v6.N onlink`` (DirectRouting: ``via <PublicIPv6> dev <ext>``). IPv6-only: only this
  device, no BackendData (upstream's IPv6-only lease).

Beyond upstream (see kernelsync): stale entries are removed at start; entries deleted or changed by
someone else, the devices' addresses, and a deleted device (recreated with the same MAC) come back
within ~100 ms of the netlink event; a full pass every minute is the safety net.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

import structlog

from .. import metrics
from ..netlink import (
    NUD_PERMANENT,
    VXLAN_DEFAULT_PORT,
    BatchOp,
    Event,
    IPAddress,
    IPNetwork,
    Link,
    NetlinkError,
    Route,
    read_fdb,
    read_neighbours,
    write_sysctl,
)
from ..subnet.lease import Lease, vtep_mac
from .base import BackendContext, BackendError, BackendInfo, PeerId, register_backend
from .devaddr import ensure_own_address
from .direct import DirectRouting
from .kernelsync import SAFETY_NET_INTERVAL, KernelPeerBackend, backend_options

log = structlog.get_logger()

ENCAP_OVERHEAD = 50
MIN_DEVICE_MTU = 68  # the kernel's minimum for an IPv4 device


def random_mac() -> str:
    """A random locally administered unicast MAC (upstream pkg/mac: first byte &0xfe|0x02)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True, slots=True)
class PeerEntries:
    """The kernel entries one remote lease justifies on one device."""

    route: Route
    arp: tuple[IPAddress, str] | None = None  # subnet network address → VtepMAC (ARP or NDP)
    fdb: tuple[str, IPAddress] | None = None  # VtepMAC → PublicIP (PublicIPv6)


@dataclass
class Vtep:
    """One vxlan device: ``flannel.<VNI>`` over the IPv4 underlay (``version`` 4) or
    ``flannel-v6.<VNI>`` over the IPv6 one (6). ``mac`` is chosen once and kept for the daemon's
    life (a recreated device gets it again: the lease carries it)."""

    version: int
    name: str = ""
    mac: str | None = None
    dev: Link | None = None
    family: int = field(init=False)

    def __post_init__(self) -> None:
        self.family = socket.AF_INET6 if self.version == 6 else socket.AF_INET


@register_backend
class VXLANBackend(KernelPeerBackend):
    """The vxlan backend (upstream ``pkg/backend/vxlan``): devices ``flannel.<VNI>`` (and
    ``flannel-v6.<VNI>``), and per remote lease a neighbour, an FDB entry and a route (or a direct
    route with DirectRouting); see the module docstring."""
    type_name = "vxlan"
    ipv6 = True
    reconcile_interval = SAFETY_NET_INTERVAL  # the monitor sees every change of ARP, FDB, routes, devices

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.vni = 1
        self.port = VXLAN_DEFAULT_PORT
        self.gbp = self.learning = self.direct_routing = False
        self.mtu = ctx.ext.mtu - ENCAP_OVERHEAD
        self.v4 = Vtep(4, "flannel.1")
        self.v6 = Vtep(6, "flannel-v6.1")
        cfg = ctx.config
        self.vteps = [v for v, on in ((self.v4, cfg.enable_ipv4), (self.v6, cfg.enable_ipv6)) if on]
        self._direct = DirectRouting(self.nl, ctx.ext.index)
        self._bad_data: set[PeerId] = set()

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
        self.v4.name, self.v6.name = f"flannel.{self.vni}", f"flannel-v6.{self.vni}"
        log.info("vxlan config", vni=self.vni, port=o["Port"], gbp=self.gbp, learning=self.learning,
                 direct_routing=self.direct_routing)

    # --- life cycle -----------------------------------------------------------------------------
    async def register(self) -> BackendInfo:
        self._read_config()
        for v in self.vteps:
            try:
                if not await self._ensure_device(v):  # a reused device: accept_ra too (a new one has it)
                    write_sysctl(f"net/ipv6/conf/{v.name}/accept_ra", "0")
            except NetlinkError as e:
                raise BackendError(str(e)) from None
        data = {"VNI": self.vni & 0xFFFF}
        return BackendInfo(mtu=self.mtu, backend_type="vxlan",
                           backend_data=data | {"VtepMAC": self.v4.mac} if self.v4 in self.vteps else None,
                           backend_v6_data=data | {"VtepMAC": self.v6.mac} if self.v6 in self.vteps else None)

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        self._direct.reset(self.ctx.ext.index)  # the external interface may have changed: look again
        for v in self.vteps:
            try:
                await self._configure_device(v)
            except NetlinkError as e:
                raise BackendError(f"failed to configure interface {v.name}: {e}") from None
        self.start_monitor()

    # --- the devices ----------------------------------------------------------------------------
    def _local(self, v: Vtep) -> IPAddress:
        """The device's underlay address: the external interface's address of its family."""
        local = self.ctx.ext.ip6 if v.version == 6 else self.ctx.ext.ip
        assert local is not None, f"no IPv{v.version} address on the external interface"
        return local

    def _incompatible(self, v: Vtep, link: Link) -> str:
        """Upstream vxlanLinksIncompat (+ learning): why an existing device can't be reused, or ""."""
        if link.kind != "vxlan":
            return f"link type: {link.kind or 'unknown'} vs vxlan"
        i = link.info
        local = str(self._local(v))
        checks = [
            ("vni", i.get("IFLA_VXLAN_ID"), self.vni),
            ("vtep (external) interface", i.get("IFLA_VXLAN_LINK") or self.ctx.ext.index, self.ctx.ext.index),
            ("vtep (external) IP", _address_text(i.get("IFLA_VXLAN_LOCAL6" if v.version == 6 else "IFLA_VXLAN_LOCAL"))
             or local, local),
            ("l2miss", bool(i.get("IFLA_VXLAN_L2MISS")), False),
            ("port", i.get("IFLA_VXLAN_PORT") or self.port, self.port),
            ("gbp", bool(i.get("IFLA_VXLAN_GBP")), self.gbp),
            ("learning", bool(i.get("IFLA_VXLAN_LEARNING")), self.learning),
        ]
        for what, have, want in checks:
            if have != want:
                return f"{what}: {have} vs {want}"
        return ""

    async def _ensure_device(self, v: Vtep) -> bool:
        """Make the device exist as configured (MAC, and for IPv4 the MTU, included); True if
        (re)created."""
        link = await self.nl.link(name=v.name)
        if link is not None:
            why = self._incompatible(v, link)
            if why:
                log.warning("device exists with incompatible configuration; recreating",
                            device=v.name, reason=why)
                await self.nl.delete_link(link.index)
                link = None
        created = link is None
        mtu = self.mtu if v.version == 4 else None  # upstream leaves flannel-v6.<VNI>'s to the kernel
        if link is None:
            mac = v.mac or random_mac()
            link = await self.nl.create_vxlan(
                v.name, vni=self.vni, local=self._local(v), dev_index=self.ctx.ext.index,
                port=self.port, learning=self.learning, gbp=self.gbp, mac=mac, mtu=mtu)
            if link.mac != mac:
                raise BackendError(f"{v.name}'s mac address wanted: {mac}, but got: {link.mac}")
            if v.mac is not None:
                metrics.KERNEL_REPAIRS.labels("device").inc()
                log.warning("vxlan device recreated", device=v.name, mac=mac)
        else:
            if v.mac is not None and link.mac != v.mac:  # someone changed our VtepMAC
                await self.nl.set_link(link.index, address=v.mac)
            if mtu is not None and link.mtu != mtu:
                await self.nl.set_link(link.index, mtu=mtu)
        v.mac = v.mac or link.mac
        v.dev = link
        if created:
            write_sysctl(f"net/ipv6/conf/{v.name}/accept_ra", "0")
        return created

    async def _configure_device(self, v: Vtep) -> None:
        """Upstream Configure: own subnet address /32 (IPv6: /128; others of the Network, or of the
        previous run's Network, removed), link up."""
        assert v.dev is not None and self.own_lease is not None
        if v.version == 6:
            assert self.own_lease.subnet6 is not None and self.ctx.config.ipv6_network is not None
            v.dev = await ensure_own_address(self.nl, v.dev, self.own_lease.subnet6, self.ctx.config.ipv6_network,
                                             self.ctx.previous_network6)
        else:
            v.dev = await ensure_own_address(self.nl, v.dev, self.own_lease.subnet, self.network,
                                             self.ctx.previous_network)

    # --- desired state --------------------------------------------------------------------------
    async def entries(self, lease: Lease) -> list[tuple[Vtep, PeerEntries]]:
        """What this remote lease justifies in the kernel, per device (none: not a usable vxlan
        lease). An IPv4-only peer in a dual-stack network gets the IPv4 entries only."""
        if self.skip_other_type(lease):
            return []
        out = []
        for v in self.vteps:
            if v.version == 6:
                sn, pub, data = lease.subnet6, lease.attrs.public_ipv6, lease.attrs.backend_v6_data
            else:
                sn, pub, data = lease.subnet, lease.attrs.public_ip, lease.attrs.backend_data
            if sn is None or pub is None:
                continue
            mac = vtep_mac(data)
            if mac is None:
                if lease.peer_id not in self._bad_data:
                    self._bad_data.add(lease.peer_id)
                    field_name = "BackendV6Data" if v.version == 6 else "BackendData"
                    log.error(f"error decoding subnet lease JSON: no valid VtepMAC in {field_name}",
                              subnet=str(lease), backend_data=data)
                return []  # upstream skips the whole lease (the gate rejects such leases before)
            if self.direct_routing and await self._direct.reachable(pub):
                out.append((v, PeerEntries(Route(sn, pub, self.ctx.ext.index))))
                continue
            assert v.dev is not None
            gw = sn.network_address
            out.append((v, PeerEntries(Route(sn, gw, v.dev.index, onlink=True), arp=(gw, mac), fdb=(mac, pub))))
        return out

    # --- the event path (upstream order) --------------------------------------------------------
    async def peer_ops(self, lease: Lease, remove: bool) -> list[BatchOp]:
        """Per device, upstream's order: ARP, FDB, route (removal: the same order); a direct route
        alone."""
        if remove and lease.attrs.backend_type != self.type_name:
            return []
        ops = []
        for _v, e in await self.entries(lease):
            if e.arp is None or e.fdb is None:
                ops.append(BatchOp.delete_route(e.route) if remove else BatchOp.replace_route(e.route))
                continue
            idx = e.route.oif
            assert idx is not None
            if remove:
                ops += [BatchOp.delete_neighbour(idx, e.arp[0]), BatchOp.delete_fdb(idx, *e.fdb),
                        BatchOp.delete_route(e.route)]
            else:
                ops += [BatchOp.replace_neighbour(idx, *e.arp), BatchOp.replace_fdb(idx, *e.fdb),
                        BatchOp.replace_route(e.route)]
        return ops

    def log_peer(self, lease: Lease, ops: list[BatchOp], remove: bool) -> None:
        """Upstream's line per device: "adding subnet" (with the remote VTEP's PublicIP and MAC) or
        "adding direct route to subnet" (and their "removing" forms), read back from ``ops``."""
        fdb = None
        for op in ops:
            f = op.fields()
            if f["kind"] == "fdb":
                fdb = f
            elif f["kind"] == "route":
                subnet = f"{f['dst']}/{f['plen']}"
                if fdb is None:
                    log.info("removing direct route to subnet" if remove else "adding direct route to subnet",
                             subnet=subnet, public_ip=str(f["gateway"]))
                else:
                    log.info("removing subnet" if remove else "adding subnet", subnet=subnet,
                             public_ip=str(fdb["dst"]), vtep_mac=fdb["mac"])
                fdb = None

    # --- reconciliation -------------------------------------------------------------------------
    def _forget(self, peer: PeerId) -> None:
        super()._forget(peer)
        self._bad_data.discard(peer)

    def _forget_gone(self) -> None:
        super()._forget_gone()
        self._bad_data &= set(self.peers)
        self._direct.keep_only(ip for le in self.peers.values() for ip in (le.attrs.public_ip, le.attrs.public_ipv6)
                               if ip is not None)

    async def sync_entries(self) -> dict[str, int]:
        changes = {"device_recreated": 0, "added": 0, "removed": 0}
        for v in self.vteps:
            if await self._ensure_device(v):
                changes["device_recreated"] += 1
        if self.own_lease is None:
            return changes
        for v in self.vteps:
            await self._configure_device(v)
        # the wanted state per IP version, addresses as ints and MACs as bytes (a raw dump's form)
        arp: dict[int, dict[int, bytes]] = {v.version: {} for v in self.vteps}  # IP → VtepMAC
        fdb: dict[int, set[tuple[bytes, int]]] = {v.version: set() for v in self.vteps}  # (VtepMAC, PublicIP)
        routes: dict[int, dict[IPNetwork, Route]] = {v.version: {} for v in self.vteps}
        for lease in list(self.peers.values()):
            for v, e in await self.entries(lease):
                routes[v.version][e.route.dst] = e.route
                if e.arp is not None and e.fdb is not None:
                    mac = bytes.fromhex(e.arp[1].replace(":", ""))
                    arp[v.version][int(e.arp[0])] = mac
                    fdb[v.version].add((mac, int(e.fdb[1])))
        for v in self.vteps:
            await self._sync_device(v, changes, arp[v.version], fdb[v.version], routes[v.version])
        return changes

    async def _sync_device(self, v: Vtep, changes: dict[str, int], arp: dict[int, bytes],
                           fdb: set[tuple[bytes, int]], routes: dict[IPNetwork, Route]) -> None:
        """One device's part of a full pass: its neighbours, FDB entries and routes (and the direct
        routes of its family on the external interface) made equal to the wanted ones. The kernel
        is read with raw dumps (addresses as ints of the device's family)."""
        assert v.dev is not None
        idx = v.dev.index
        addr = IPv6Address if v.version == 6 else int  # what BatchOp takes (IPv4: the int itself)
        # 1. ARP/NDP entries on the device (only permanent ones are ours; the kernel's own come and go)
        have_arp = {ip: (mac, state) for ip, mac, state in await asyncio.to_thread(read_neighbours, idx, v.family)}
        await self.apply(changes, "removed", "stale ARP entry removed", (
            BatchOp.delete_neighbour(idx, addr(ip)) for ip, (_, state) in have_arp.items()
            if state & NUD_PERMANENT and ip not in arp))
        await self.apply(changes, "added", "ARP entry set", (
            BatchOp.replace_neighbour(idx, addr(ip), mac) for ip, mac in arp.items()
            if not _same_permanent(have_arp.get(ip), mac)))
        # 2. FDB entries (remote VTEPs)
        have_fdb = {(mac, dst) for mac, dst, state in await asyncio.to_thread(read_fdb, idx, v.family)
                    if dst and state & NUD_PERMANENT}
        await self.apply(changes, "removed", "stale FDB entry removed",
                         (BatchOp.delete_fdb(idx, mac, addr(dst)) for mac, dst in have_fdb - fdb))
        await self.apply(changes, "added", "FDB entry set",
                         (BatchOp.replace_fdb(idx, mac, addr(dst)) for mac, dst in fdb - have_fdb))
        # 3. routes: on the device, or direct routes on the external interface
        await self.sync_routes(changes, routes, {idx, self.ctx.ext.index}, family=v.family)

    def relevant(self, ev: Event) -> bool:
        if ev.kind == "overrun":
            return True
        devs = {v.dev.index for v in self.vteps if v.dev is not None}
        if ev.kind == "link":
            return ev.ifindex in devs or ev.name in {v.name for v in self.vteps}
        if ev.kind == "addr":
            return ev.ifindex in devs
        if ev.kind == "route":
            if (ev.ifindex not in devs and ev.ifindex != self.ctx.ext.index) or ev.table not in (None, 254):
                return False
            return ev.action == "del" or self.route_event_inside(ev)
        if ev.ifindex not in devs:  # neigh / fdb
            return False
        return ev.action == "del" or bool((ev.state or 0) & NUD_PERMANENT)


def _same_permanent(have: tuple[bytes, int] | None, mac: bytes) -> bool:
    """Is a kernel ARP entry (lladdr, state) already the permanent entry for ``mac``?"""
    return have is not None and have[0] == mac and bool(have[1] & NUD_PERMANENT)


def _address_text(value: object) -> str | None:
    """An address attribute of a link's info as text in ``ipaddress``'s form (pyroute2 gives IPv6
    ones as the kernel's text), or None when absent."""
    if not value:
        return None
    try:
        return str(IPv6Address(value) if ":" in str(value) else IPv4Address(value))
    except ValueError:
        return str(value)
