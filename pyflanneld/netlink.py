"""A thin asyncio adapter over pyroute2's ``AsyncIPRoute`` for the kernel state backends program.

What it adds to pyroute2, so that backends read as the upstream behaviour they implement:

* **retries** of transient netlink errors (ENOBUFS, EBUSY, EAGAIN, EINTR — upstream flannel #958/#779
  lost routes to ENOBUFS until it retried), and a fresh socket when pyroute2's socket broke;
* **idempotent deletes**: deleting something already gone (ESRCH/ENOENT/ENODEV/EADDRNOTAVAIL) is fine;
* **error translation** into one user-facing line (:class:`NetlinkError`; not root, missing kernel
  feature), instead of ``NetlinkError(95, 'Operation not supported')``;
* plain **dataclasses** for links, routes, neighbours and FDB entries, and dumps collected into lists;
* :meth:`Netlink.batch`, many neighbour/FDB/route changes at once: :class:`BatchOp` messages built
  with ``struct`` (the same bytes pyroute2 sends for the single calls), 256 per ``sendmsg`` on a
  raw socket of its own, acks matched by sequence number, per-op errors (~7× cheaper per entry);
* WireGuard devices (the kernel's ``wireguard`` generic-netlink family, through pyroute2's
  ``AsyncWireGuard``) as :class:`WgDevice`/:class:`WgPeer` values;
* IPsec policies (:class:`XfrmPolicy`; ``NETLINK_XFRM`` messages built with ``struct``, pyroute2
  has no XFRM support): dump, update, delete;
* :class:`NetlinkMonitor`, an async iterator over link/route/neighbour events (raw socket, decoded
  with ``struct``) that survives socket overruns (it reports them as an ``overrun`` event: the caller then reconciles everything);
* :func:`write_sysctl` (``/proc/sys``: the devices' ``accept_ra``, the TUN's ``accept_local``) and
  :class:`HostView`, a blocking read of the host's links, addresses and routes for choosing the
  external interface (:mod:`pyflanneld.iface`, in a thread) — the only other ways pyflanneld
  touches the kernel's network state are the rule tools (:mod:`pyflanneld.rulecmd`) and the TUN
  ioctls (:mod:`pyflanneld.udpfwd.tun`).

IPv4 and IPv6: addresses, routes, neighbours and FDB destinations are ``ipaddress`` values of
either family, and the family of each call follows from them (an IPv6 vxlan ``local``, neighbour,
FDB ``dst``, route, ``/128`` address or route lookup is the same call with IPv6 values); listings
take ``family=`` (default IPv4, what the IPv4 backends reconcile).

All single calls go through one socket, serialised by a lock: the daemon is one asyncio loop and netlink
replies must not interleave. Only the namespace of the calling process is touched.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any, TypeVar

import structlog
from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError
from pyroute2.netlink.generic.wireguard import AsyncWireGuard
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_NOARP, NUD_PERMANENT

log = structlog.get_logger()

T = TypeVar("T")
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

MAIN_TABLE = 254
RTPROT_KERNEL = 2
RTPROT_BOOT = 3  # what iproute2 and Go's netlink use by default ("ip route" does not show it)
RTNH_F_ONLINK = 4
RTN_BLACKHOLE = 6
AF_BRIDGE = 7
VXLAN_DEFAULT_PORT = 8472  # the kernel's default when IFLA_VXLAN_PORT is absent (flannel's "Port": 0)

RETRY_ERRNOS = frozenset({errno.ENOBUFS, errno.EBUSY, errno.EAGAIN, errno.EINTR})
GONE_ERRNOS = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV, errno.EADDRNOTAVAIL})
RETRIES = 10
RETRY_BASE_DELAY = 0.02
RETRY_MAX_DELAY = 1.0


class NetlinkError(Exception):
    """A kernel operation failed for good; ``str()`` is one line naming the cause and the fix."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def _hint(code: int, what: str) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return f"{what}: operation not permitted: run pyflanneld as root (it needs CAP_NET_ADMIN)"
    if code == errno.EOPNOTSUPP:
        return f"{what}: the kernel does not support it (Operation not supported)"
    return f"{what}: {os.strerror(code) if code > 0 else 'netlink error'} (errno {code})"


# --- value types ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    """A network device as the kernel lists it: ifindex, name, kind (IFLA_INFO_KIND, "" for none), MAC
    (lowercase ``aa:bb:…``), MTU in bytes, administratively up, and the kind's IFLA_INFO_DATA
    attributes (``IFLA_VXLAN_ID`` …)."""
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND ("vxlan", "veth", ...; "" for none)
    mac: str
    mtu: int
    up: bool
    info: dict[str, Any] = field(default_factory=dict, compare=False)  # IFLA_INFO_DATA as a dict


@dataclass(frozen=True, slots=True)
class Route:
    """A route (IPv4 or IPv6: ``dst`` and ``gateway`` of one family)."""

    dst: IPNetwork
    gateway: IPAddress | None = None
    oif: int | None = None
    onlink: bool = False
    table: int = MAIN_TABLE
    proto: int = 0

    @property
    def key(self) -> tuple:
        """What makes two routes "the same" for reconciliation (not proto)."""
        return (self.dst, self.gateway, self.oif, self.onlink)


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A neighbour entry (ARP for IPv4, NDP for IPv6) of one device: the address, its MAC and the NUD
    state bits."""
    ip: IPAddress  # IPv4 (ARP) or IPv6 (NDP)
    mac: str
    state: int

    @property
    def permanent(self) -> bool:
        """Static entries (ours, NUD_PERMANENT); learned ones are the kernel's."""
        return bool(self.state & NUD_PERMANENT)


@dataclass(frozen=True, slots=True)
class FdbEntry:
    """A bridge FDB entry of a vxlan device: the MAC, its remote VTEP and the NUD state bits."""
    mac: str
    dst: IPAddress | None  # remote VTEP (NDA_DST, IPv4 or IPv6); None for entries without one
    state: int = NUD_PERMANENT

    @property
    def permanent(self) -> bool:
        """Static entries (ours); learned ones (``Learning: true``) are the kernel's."""
        return bool(self.state & NUD_PERMANENT)


@dataclass(frozen=True)
class WgPeer:
    """One WireGuard peer as flannel programs it (``wg set DEV peer KEY endpoint IP:PORT
    allowed-ips NET [persistent-keepalive S] [preshared-key K]``); keys are base64 strings."""

    public_key: str
    endpoint: tuple[IPv4Address, int] | None = None
    allowed_ips: tuple[IPv4Network, ...] = ()
    keepalive_s: int = 0
    preshared_key: str | None = None  # None: none (the kernel reports all zeros)


@dataclass(frozen=True)
class WgDevice:
    """A WireGuard device's configuration (``wg show DEV``); keys are base64 strings."""

    name: str
    public_key: str | None
    listen_port: int
    peers: tuple[WgPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """A netlink notification, reduced to what reconcilers look at."""

    kind: str  # "link" | "route" | "neigh" | "fdb" | "addr" | "overrun"
    action: str  # "new" | "del" | "" (overrun)
    ifindex: int | None = None
    name: str | None = None
    dst: str | None = None
    table: int | None = None
    plen: int | None = None  # route: destination prefix length
    proto: int | None = None  # route: rtm_protocol (RTPROT_KERNEL for the kernel's own)
    state: int | None = None  # neigh/fdb: NUD state (NUD_PERMANENT for static entries)


# --- the adapter ----------------------------------------------------------------------------------


class Netlink:
    """Kernel calls for one network namespace (the caller's). Open lazily; ``close()`` when done."""

    def __init__(self, retries: int = RETRIES) -> None:
        self._ipr: AsyncIPRoute | None = None
        self._wg: AsyncWireGuard | None = None  # opened on first use (needs the wireguard module)
        self._lock = asyncio.Lock()
        self.retries = retries
        self._bsock: socket.socket | None = None  # small batches (see batch)
        self._bseq = 0

    async def __aenter__(self) -> Netlink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the sockets (the next call opens them again)."""
        if self._bsock is not None:
            self._bsock.close()
            self._bsock = None
        socks, self._ipr, self._wg = (self._ipr, self._wg), None, None
        for sock in socks:
            if sock is not None:
                try:
                    sock.close()
                except Exception:  # noqa: BLE001 - closing a broken socket
                    pass

    async def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            ipr = AsyncIPRoute()
            await ipr.setup_endpoint()
            self._ipr = ipr
        return self._ipr

    async def _wg_socket(self) -> AsyncWireGuard:
        if self._wg is None:
            wg = AsyncWireGuard()
            try:
                await wg.setup_endpoint()  # resolves the "wireguard" generic-netlink family
            except BaseException:
                wg.close()
                raise
            self._wg = wg
        return self._wg

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]], *,
                    ok_if_gone: bool = False, socket_of: Callable[[], Awaitable[Any]] | None = None) -> T | None:
        """Run ``fn(sock)`` (sock: the rtnetlink socket, or ``await socket_of()``), retrying transient
        errors; a vanished object is None if ok_if_gone."""
        delay = RETRY_BASE_DELAY
        attempt = 0
        async with self._lock:
            while True:
                attempt += 1
                try:
                    sock = await (socket_of or self._socket)()
                    return await fn(sock)
                except PyNetlinkError as e:
                    code = e.code or 0
                    if ok_if_gone and code in GONE_ERRNOS:
                        return None
                    if code not in RETRY_ERRNOS or attempt >= self.retries:
                        raise NetlinkError(_hint(code, what), code) from None
                    log.debug("netlink retry", op=what, error=str(e), attempt=attempt)
                except OSError as e:  # the socket itself failed (e.g. ENOBUFS on receive): reopen
                    await self.close()
                    code = e.errno or 0
                    if attempt >= self.retries:
                        raise NetlinkError(_hint(code, what), code) from None
                    log.debug("netlink socket reopened", op=what, error=str(e), attempt=attempt)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)

    async def _dump(self, what: str, fn: Callable[[AsyncIPRoute], Awaitable[Any]]) -> list:
        async def collect(ipr: AsyncIPRoute) -> list:
            return [m async for m in await fn(ipr)]

        return await self._call(what, collect) or []

    async def batch(self, ops: Sequence[BatchOp]) -> list[NetlinkError | None]:
        """Apply many neighbour/FDB/route changes at once (see :class:`BatchOp`), in order, on a raw
        socket of their own, in a worker thread (the loop keeps running). One result per op: None
        when applied (for deletes: or already gone), else the op's NetlinkError; one failing op
        never stops the others. Transient errors are retried like the single calls."""
        ops = list(ops)
        if not ops:
            return []
        if len(ops) > INLINE_BATCH:
            return await asyncio.to_thread(run_batch, ops, self.retries)
        # A few ops (a lease event): rtnetlink handles requests within the sender's sendmsg, so the
        # acks are queued when send returns — one round on the loop, without a thread's round trip.
        # What needs a retry (or an ack that is not there) goes the threaded way.
        if self._bsock is None:
            self._bsock = _batch_socket()
            self._bsock.setblocking(False)
        results: list[NetlinkError | None] = [None] * len(ops)
        again, self._bseq = _batch_round(self._bsock, ops, list(range(len(ops))), results, self._bseq, final=False)
        if self._bseq > 1 << 30:
            self._bseq = 0
        if again:
            retried = await asyncio.to_thread(run_batch, ops, self.retries, again)
            for k in again:
                results[k] = retried[k]
        return results

    # --- links ------------------------------------------------------------------------------------
    async def link(self, name: str | None = None, index: int | None = None) -> Link | None:
        """The link by name or index, or None when it does not exist."""
        kw = {"ifname": name} if name is not None else {"index": index}
        msgs = await self._call(f"get link {name or index}", lambda i: i.link("get", **kw), ok_if_gone=True)
        return _link(msgs[0]) if msgs else None

    async def _create_link(self, name: str, kind: str, **kw: Any) -> Link:
        """``ip link add NAME type KIND ...``; a kernel without the device type is one line naming
        the module to load (named like the type). Raises NetlinkError (EEXIST if the name is taken)."""
        what = f"create {kind} device {name}"
        try:
            await self._call(what, lambda i: i.link("add", ifname=name, kind=kind, **kw))
        except NetlinkError as e:
            if e.code == errno.EOPNOTSUPP:
                raise NetlinkError(
                    f"{what}: the kernel has no {kind} device type (Operation not supported): load the "
                    f"{kind} module (modprobe {kind}) or choose another backend (e.g. host-gw, udp)", e.code
                ) from None
            raise
        link = await self.link(name=name)
        if link is None:
            raise NetlinkError(f"{what}: the device vanished right after creation", errno.ENODEV)
        return link

    async def create_vxlan(self, name: str, *, vni: int, local: IPAddress, dev_index: int, port: int,
                           learning: bool, gbp: bool, mac: str, mtu: int | None) -> Link:
        """``ip link add NAME type vxlan id VNI local IP dev DEV dstport PORT [no]learning [gbp]``
        with the MAC and MTU set at creation (``mtu`` None: the kernel's, as upstream leaves the
        IPv6 device's). ``local`` IPv6: an IPv6 underlay (IFLA_VXLAN_LOCAL6, upstream's
        ``flannel-v6.<VNI>``). Raises NetlinkError (EEXIST if it exists)."""
        kw: dict[str, Any] = dict(
            vxlan_id=vni, vxlan_link=dev_index,
            vxlan_port=port, vxlan_learning=1 if learning else 0, address=mac,
        )
        kw["vxlan_local6" if local.version == 6 else "vxlan_local"] = str(local)
        if mtu is not None:
            kw["mtu"] = mtu
        if gbp:
            kw["vxlan_gbp"] = True
        return await self._create_link(name, "vxlan", **kw)

    async def create_ipip(self, name: str, *, local: IPv4Address, mtu: int) -> Link:
        """``ip link add NAME txqueuelen 0 mtu MTU type ipip mode any local IP nopmtudisc`` (remote
        any): the attributes upstream's Go netlink sets (``ip -d link`` shows the same line).
        Raises NetlinkError."""
        return await self._create_link(name, "ipip", ipip_local=str(local), ipip_proto=0,
                                       ipip_pmtudisc=0, mtu=mtu, txqlen=0)

    async def create_wireguard(self, name: str, *, mtu: int) -> Link:
        """``ip link add NAME txqueuelen 0 mtu MTU type wireguard`` (as upstream's Go netlink); keys
        and peers: :meth:`wg_set_device`, :meth:`wg_set_peer`. Raises NetlinkError."""
        return await self._create_link(name, "wireguard", mtu=mtu, txqlen=0)

    async def set_link(self, index: int, **attrs: Any) -> None:
        """``ip link set`` (e.g. ``mtu=1450``, ``address=MAC``, ``state="up"``)."""
        desc = " ".join(f"{k} {v}" for k, v in attrs.items())
        await self._call(f"set link {index} {desc}", lambda i: i.link("set", index=index, **attrs))

    async def delete_link(self, index: int) -> None:
        """``ip link del``; a device already gone is no error. Raises NetlinkError."""
        await self._call(f"delete link {index}", lambda i: i.link("del", index=index), ok_if_gone=True)

    # --- addresses --------------------------------------------------------------------------------
    async def addresses(self, index: int, family: int = socket.AF_INET) -> list[IPInterface]:
        """The link's addresses of ``family`` (AF_INET6: link-local ones included)."""
        msgs = await self._dump(f"list addresses of link {index}",
                                lambda i: i.addr("dump", index=index, family=family))
        # IFA_LOCAL first: for a point-to-point address IFA_ADDRESS is the peer's (see iface.address_of)
        return [ip_interface(f"{m.get('local') or m.get('address')}/{m['prefixlen']}") for m in msgs
                if m.get("index") == index and m.get("family") == family and (m.get("local") or m.get("address"))]

    async def add_address(self, index: int, addr: IPInterface) -> None:
        """``ip addr add ADDR/LEN dev IDX`` (IPv4, or IPv6 e.g. the vxlan device's ``/128``); already
        there is fine."""
        async def add(i: AsyncIPRoute) -> None:
            try:
                await i.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
            except PyNetlinkError as e:
                if e.code != errno.EEXIST:
                    raise

        await self._call(f"add address {addr} to link {index}", add)

    async def delete_address(self, index: int, addr: IPInterface) -> None:
        """``ip addr del ADDR/LEN dev IDX``; an address already gone is no error. Raises NetlinkError."""
        await self._call(f"delete address {addr} from link {index}",
                         lambda i: i.addr("del", index=index, address=str(addr.ip),
                                          prefixlen=addr.network.prefixlen),
                         ok_if_gone=True)

    # --- routes -----------------------------------------------------------------------------------
    async def routes(self, table: int = MAIN_TABLE, family: int = socket.AF_INET) -> list[Route]:
        """Routes of ``family`` (IPv4 by default) in a table (main by default); multipath/unusual
        routes are skipped."""
        msgs = await self._dump("list routes", lambda i: i.route("dump", family=family, table=table))
        out = []
        for m in msgs:
            if (m.get("table") or m.get("RTA_TABLE")) != table:
                continue
            r = _route(m)
            if r is not None:
                out.append(r)
        return out

    async def route_get(self, dst: IPAddress) -> list[Route]:
        """``ip route get DST`` (IPv4 or IPv6): what the kernel would use."""
        msgs = await self._call(f"route get {dst}", lambda i: i.route("get", dst=str(dst))) or []
        return [r for r in (_route(m) for m in msgs) if r is not None]

    async def replace_route(self, r: Route, *, scope: int | None = None) -> None:
        """``ip route replace``; ``scope`` e.g. RT_SCOPE_LINK (default: the kernel's, universe)."""
        kw = _route_kw(r)
        if scope is not None:
            kw["scope"] = scope
        await self._call(f"replace route {_route_str(r)}", lambda i: i.route("replace", **kw))

    async def add_route(self, r: Route, *, scope: int | None = None) -> bool:
        """``ip route add`` (proto boot; ``scope`` as :meth:`replace_route`): unlike
        :meth:`replace_route` a route to the same destination that is already there is kept
        (upstream's udp backend: "there might be a route for a subnet already installed by
        Docker"). True when added, False when one was there. Raises NetlinkError."""
        kw = _route_kw(r)
        if scope is not None:
            kw["scope"] = scope

        async def add(i: AsyncIPRoute) -> bool:
            try:
                await i.route("add", **kw)
            except PyNetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
                return False
            return True

        return bool(await self._call(f"add route {_route_str(r)}", add))

    async def delete_route(self, r: Route) -> None:
        """``ip route del`` of ``r`` (any proto); a route already gone is no error. Raises NetlinkError."""
        kw = _route_kw(r, add=False)
        await self._call(f"delete route {_route_str(r)}", lambda i: i.route("del", **kw), ok_if_gone=True)

    async def ensure_blackhole(self, dst: IPNetwork) -> bool:
        """``ip [-6] route replace blackhole DST`` unless it is there; True when it was (re)added."""
        msgs = await self._dump("list routes", lambda i: i.route("dump", family=_family(dst), table=MAIN_TABLE))
        for m in msgs:
            if m.get("type") == RTN_BLACKHOLE and m.get("dst_len") == dst.prefixlen and \
                    m.get("RTA_DST") and ip_address(m.get("RTA_DST")) == dst.network_address:
                return False
        await self._call(f"add blackhole route {dst}", lambda i: i.route(
            "replace", dst=str(dst), type=RTN_BLACKHOLE, table=MAIN_TABLE, proto=RTPROT_BOOT))
        return True

    async def delete_blackhole(self, dst: IPNetwork) -> None:
        """``ip [-6] route del blackhole DST``; nothing when it is not there."""
        await self._call(f"delete blackhole route {dst}", lambda i: i.route(
            "del", dst=str(dst), type=RTN_BLACKHOLE, table=MAIN_TABLE), ok_if_gone=True)

    # --- neighbours (ARP) -------------------------------------------------------------------------
    async def neighbours(self, index: int, family: int = socket.AF_INET) -> list[Neighbour]:
        """The link's ARP (AF_INET, default) or NDP (AF_INET6) entries."""
        msgs = await self._dump(f"list neighbours of link {index}",
                                lambda i: i.neigh("dump", ifindex=index, family=family))
        return [Neighbour(ip_address(m.get("dst")), (m.get("lladdr") or "").lower(), m["state"])
                for m in msgs if m.get("ifindex") == index and m.get("family") == family and m.get("dst")]

    async def replace_neighbour(self, index: int, ip: IPAddress, mac: str) -> None:
        """``ip [-6] neigh replace IP lladdr MAC dev IDX nud permanent``."""
        await self._call(f"replace neighbour {ip} lladdr {mac} dev {index}",
                         lambda i: i.neigh("replace", ifindex=index, dst=str(ip), lladdr=mac,
                                           state=NUD_PERMANENT, family=_family(ip)))

    async def delete_neighbour(self, index: int, ip: IPAddress) -> None:
        """``ip neigh del IP dev IDX`` (IPv4 or IPv6); an entry already gone is no error. Raises
        NetlinkError."""
        await self._call(f"delete neighbour {ip} dev {index}",
                         lambda i: i.neigh("del", ifindex=index, dst=str(ip), family=_family(ip)), ok_if_gone=True)

    # --- bridge FDB (vxlan remote VTEPs) ----------------------------------------------------------
    async def fdb(self, index: int, family: int = socket.AF_INET) -> list[FdbEntry]:
        """The link's FDB entries whose remote (dst) is of ``family`` (IPv4 by default; AF_INET6
        for an IPv6 vxlan device), and those without a remote."""
        msgs = await self._dump(f"list fdb of link {index}", lambda i: i.fdb("dump", ifindex=index))
        out = []
        for m in msgs:
            if m.get("ifindex") != index or m.get("family") != AF_BRIDGE:
                continue
            dst = m.get("dst")
            try:
                dst_ip = ip_address(dst) if dst else None
            except ValueError:
                continue
            if dst_ip is not None and _family(dst_ip) != family:  # the other family's remote: not asked for
                continue
            out.append(FdbEntry((m.get("lladdr") or "").lower(), dst_ip, m.get("state", 0)))
        return out

    async def replace_fdb(self, index: int, mac: str, dst: IPAddress) -> None:
        """``bridge fdb replace MAC dev IDX dst DST self permanent``."""
        await self._call(f"replace fdb {mac} dst {dst} dev {index}",
                         lambda i: i.fdb("replace", ifindex=index, lladdr=mac, dst=str(dst),
                                         state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF))

    async def delete_fdb(self, index: int, mac: str, dst: IPAddress | None) -> None:
        """``bridge fdb del MAC [dst DST] dev IDX self``; an entry already gone is no error. Raises
        NetlinkError."""
        kw: dict[str, Any] = {"ifindex": index, "lladdr": mac}
        if dst is not None:
            kw["dst"] = str(dst)
        await self._call(f"delete fdb {mac} dst {dst} dev {index}", lambda i: i.fdb("del", **kw),
                         ok_if_gone=True)


    # --- WireGuard (generic netlink) ---------------------------------------------------------------
    async def _wg_call(self, what: str, fn: Callable[[AsyncWireGuard], Awaitable[T]], *,
                       ok_if_gone: bool = False) -> T | None:
        if self._wg is None:  # resolve the family first: its ENOENT is not "object gone"
            async def noop(_: AsyncWireGuard) -> None:
                return None

            try:
                await self._call(what, noop, socket_of=self._wg_socket)
            except NetlinkError as e:
                if e.code == errno.ENOENT:
                    raise NetlinkError(f"{what}: the kernel has no wireguard support (generic netlink family "
                                       "wireguard missing): load the wireguard module (modprobe wireguard)",
                                       e.code) from None
                raise
        return await self._call(what, fn, ok_if_gone=ok_if_gone, socket_of=self._wg_socket)

    async def wg_device(self, name: str) -> WgDevice | None:
        """``wg show NAME``: the device's public key, listen port and peers; None if no such device."""
        async def get(wg: AsyncWireGuard) -> list:
            return [m async for m in await wg.info(name)]

        msgs = await self._wg_call(f"get wireguard device {name}", get, ok_if_gone=True)
        return _wg_device(name, msgs) if msgs else None

    async def wg_set_device(self, name: str, *, private_key: str, listen_port: int) -> None:
        """``wg set NAME private-key K listen-port P`` (key: base64)."""
        await self._wg_call(f"configure wireguard device {name}",
                            lambda wg: wg.set(name, private_key=private_key, listen_port=listen_port))

    async def wg_set_peer(self, name: str, peer: WgPeer) -> None:
        """Add or update one peer; its allowed IPs replace the old ones (``wg set NAME peer ...``)."""
        spec: dict[str, Any] = {"public_key": peer.public_key, "replace_allowed_ips": True,
                                "allowed_ips": [str(n) for n in peer.allowed_ips],
                                "persistent_keepalive": peer.keepalive_s}
        if peer.endpoint is not None:
            spec["endpoint_addr"], spec["endpoint_port"] = str(peer.endpoint[0]), peer.endpoint[1]
        if peer.preshared_key is not None:
            spec["preshared_key"] = peer.preshared_key
        await self._wg_call(f"set wireguard peer {peer.public_key} on {name}", lambda wg: wg.set(name, peer=spec))

    async def wg_remove_peer(self, name: str, public_key: str) -> None:
        """``wg set NAME peer KEY remove`` (a peer already gone is fine)."""
        await self._wg_call(f"remove wireguard peer {public_key} from {name}",
                            lambda wg: wg.set(name, peer={"public_key": public_key, "remove": True}),
                            ok_if_gone=True)


# --- batches of raw messages ----------------------------------------------------------------------

NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR = 2
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
BATCH_SIZE = 256  # messages per sendmsg
BATCH_RCVBUF = 4 * 1024 * 1024
BATCH_ACK_TIMEOUT = 5.0
INLINE_BATCH = 32  # batches up to this many ops are sent from the event loop itself (see Netlink.batch)


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _nlmsg(kind: int, flags: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, 0, 0) + body


def _mac(mac: str | bytes) -> bytes:
    """A MAC as its 6 bytes (``aa:bb:…`` / ``aa-bb-…`` strings, or already bytes)."""
    if isinstance(mac, bytes):
        return mac
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def mac_str(mac: bytes) -> str:
    """6 bytes → ``aa:bb:cc:dd:ee:ff`` (lower case, as iproute2 prints it)."""
    return mac.hex(":")


def _ip_bytes(ip: IPAddress | int) -> bytes:
    """An address (IPv4 or IPv6 object, or an IPv4 address as a 32-bit int) in network order."""
    return _BE32.pack(ip) if isinstance(ip, int) else ip.packed


def _af(addr: bytes) -> int:
    """The address family of an address in network order (4 or 16 bytes)."""
    return socket.AF_INET6 if len(addr) == 16 else socket.AF_INET


_REPLACE = NLM_F_REPLACE | NLM_F_CREATE
_BE32 = struct.Struct("!I")
_U32 = struct.Struct("=I")
_NLA_HDR = struct.Struct("=HH")


class BatchOp:
    """One kernel change for :meth:`Netlink.batch`: a complete request message (sequence number 0,
    set at send); ``delete``: a vanished object counts as done. Build them with the constructors
    below: the messages are byte for byte what the single calls (pyroute2) send. An op holds only
    its bytes (a first sync builds thousands); ``what`` (the one-line description of errors) and
    ``event_key()`` (the monitor's name of the notification it causes) are decoded from them when
    asked for.

    Addresses are IPv4 or IPv6 ``ipaddress`` objects (the message's family follows), or IPv4
    addresses as 32-bit ints; MACs strings or 6 bytes."""

    __slots__ = ("msg", "delete")

    def __init__(self, msg: bytes, delete: bool = False) -> None:
        self.msg = msg
        self.delete = delete

    def __repr__(self) -> str:
        return f"BatchOp({self.what!r})"

    @property
    def entry(self) -> str:
        """The kind of kernel entry this changes: "route", "neigh" (ARP) or "fdb" (read from the
        message: its type, and the family of a neighbour message)."""
        if struct.unpack_from("=H", self.msg, 4)[0] in (RTM_NEWROUTE, RTM_DELROUTE):
            return "route"
        return "fdb" if self.msg[16] == AF_BRIDGE else "neigh"

    @staticmethod
    def replace_neighbour(index: int, ip: IPAddress | int, mac: str | bytes) -> BatchOp:
        """``ip [-6] neigh replace IP lladdr MAC dev IDX nud permanent``."""
        addr = _ip_bytes(ip)
        body = struct.pack("=BxxxiHBB", _af(addr), index, NUD_PERMANENT, 0, 0)
        body += _nla(NDA_DST, addr) + _nla(NDA_LLADDR, _mac(mac))
        return BatchOp(_nlmsg(RTM_NEWNEIGH, _REPLACE, body))

    @staticmethod
    def delete_neighbour(index: int, ip: IPAddress | int) -> BatchOp:
        """The batch message deleting the neighbour ``ip`` (address or its int) of device ``index``."""
        addr = _ip_bytes(ip)
        body = struct.pack("=BxxxiHBB", _af(addr), index, NUD_PERMANENT, 0, 0) + _nla(NDA_DST, addr)
        return BatchOp(_nlmsg(RTM_DELNEIGH, 0, body), delete=True)

    @staticmethod
    def replace_fdb(index: int, mac: str | bytes, dst: IPAddress | int) -> BatchOp:
        """``bridge fdb replace MAC dev IDX dst DST self permanent`` (DST IPv4 or IPv6)."""
        body = struct.pack("=BxxxiHBB", AF_BRIDGE, index, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
        body += _nla(NDA_LLADDR, _mac(mac)) + _nla(NDA_DST, _ip_bytes(dst))
        return BatchOp(_nlmsg(RTM_NEWNEIGH, _REPLACE, body))

    @staticmethod
    def delete_fdb(index: int, mac: str | bytes, dst: IPAddress | int | None) -> BatchOp:
        """The batch message deleting the FDB entry ``mac`` (text or 6 bytes) with remote ``dst`` (None:
        without one) of device ``index``."""
        body = struct.pack("=BxxxiHBB", AF_BRIDGE, index, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
        body += _nla(NDA_LLADDR, _mac(mac))
        if dst is not None:
            body += _nla(NDA_DST, _ip_bytes(dst))
        return BatchOp(_nlmsg(RTM_DELNEIGH, 0, body), delete=True)

    @staticmethod
    def replace_route(r: Route) -> BatchOp:
        """``ip [-6] route replace DST via GW dev OIF [onlink] proto boot`` (a gateway is required)."""
        if r.gateway is None:
            raise ValueError(f"batched route {r.dst} needs a gateway")
        return BatchOp(_nlmsg(RTM_NEWROUTE, _REPLACE, _rtmsg(
            r.dst.network_address.packed, r.dst.prefixlen, r.gateway.packed, r.oif or 0, r.onlink, r.table,
            RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST)))

    @staticmethod
    def delete_route(r: Route) -> BatchOp:
        # any proto and type; any scope for a route without gateway (it may be scope link)
        """The batch message deleting route ``r`` (any proto and type; any scope for a route without
        gateway, which may be scope link)."""
        scope = RT_SCOPE_UNIVERSE if r.gateway is not None else RT_SCOPE_NOWHERE
        gw = r.gateway.packed if r.gateway is not None else None
        return BatchOp(_nlmsg(RTM_DELROUTE, 0, _rtmsg(r.dst.network_address.packed, r.dst.prefixlen, gw, r.oif or 0,
                                                      r.onlink, r.table, 0, scope, 0)), delete=True)

    @staticmethod
    def delete_route_raw(dst: int, plen: int, gateway: int, oif: int, onlink: bool,
                         table: int = MAIN_TABLE, family: int = socket.AF_INET) -> BatchOp:
        """:meth:`delete_route` of a route of ``family`` given as ints (a raw dump's row; gateway/oif
        0: none)."""
        size = 16 if family == socket.AF_INET6 else 4
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_NOWHERE
        return BatchOp(_nlmsg(RTM_DELROUTE, 0, _rtmsg(dst.to_bytes(size, "big"), plen,
                                                      gateway.to_bytes(size, "big") if gateway else None,
                                                      oif, onlink, table, 0, scope, 0)), delete=True)

    # -- decoding (errors, expectations) --------------------------------------------------------
    def fields(self) -> dict[str, Any]:
        """The request decoded: ``kind`` ("route" | "neigh" | "fdb"), ``index`` (device; a route's
        output device, None when absent), ``dst`` (route destination / neighbour IP / FDB remote,
        as a string; None when absent), and ``plen``, ``gateway``, ``onlink`` (routes) or ``mac``
        (neighbours, FDB)."""
        m = self.msg
        mtype = struct.unpack_from("=H", m, 4)[0]
        if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
            plen, flags = m[17], _U32.unpack_from(m, 24)[0]
            a = _attrs(m, 28, len(m))
            oif = a.get(RTA_OIF)
            return {"kind": "route", "dst": _ip_str(a.get(RTA_DST)) or "0.0.0.0", "plen": plen,
                    "gateway": _ip_str(a.get(RTA_GATEWAY)), "index": _U32.unpack(oif)[0] if oif else None,
                    "onlink": bool(flags & RTNH_F_ONLINK)}
        family, index = m[16], struct.unpack_from("=i", m, 20)[0]
        a = _attrs(m, 28, len(m))
        mac = a.get(NDA_LLADDR)
        return {"kind": "fdb" if family == AF_BRIDGE else "neigh", "index": index, "dst": _ip_str(a.get(NDA_DST)),
                "mac": mac_str(mac) if mac else None}

    def log_context(self) -> dict[str, Any]:
        """Log fields naming the entry: routes ``dst`` (CIDR) and ``via``, neighbours ``ip`` and
        ``mac``, FDB entries ``mac`` and ``dst``."""
        f = self.fields()
        if f["kind"] == "route":
            return {"dst": f"{f['dst']}/{f['plen']}", "via": str(f["gateway"])}
        if f["kind"] == "fdb":
            return {"mac": f["mac"], "dst": str(f["dst"])}
        return {"ip": f["dst"], "mac": f["mac"]} if f["mac"] else {"ip": f["dst"]}

    def event_key(self) -> bytes:
        """:func:`event_key` of the notification this op causes (a few bytes: a full pass expects
        thousands)."""
        kind = self.entry
        dst = _attrs(self.msg, 28, len(self.msg)).get(RTA_DST if kind == "route" else NDA_DST, b"")
        return _EVENT_CODES["del" if self.delete else "new", kind] + dst

    @property
    def what(self) -> str:
        """One line: ``replace route 10.5.2.0/24 via 10.5.2.0 dev 4 onlink``,
        ``delete neighbour 10.5.2.0 dev 4``, ``replace fdb MAC dst 192.168.1.2 dev 4``."""
        f = self.fields()
        verb = "delete" if self.delete else "replace"
        if f["kind"] == "route":
            s = f"{verb} route {f['dst']}/{f['plen']}"
            if f["gateway"] is not None:
                s += f" via {f['gateway']}"
            if f["index"] is not None:
                s += f" dev {f['index']}"
            return s + (" onlink" if f["onlink"] else "")
        if f["kind"] == "fdb":
            return f"{verb} fdb {f['mac']} dst {f['dst']} dev {f['index']}"
        lladdr = f" lladdr {f['mac']}" if f["mac"] else ""
        return f"{verb} neighbour {f['dst']}{lladdr} dev {f['index']}"


_EVENT_CODES = {(a, k): bytes([n]) for n, (a, k) in enumerate(
    (a, k) for a in ("new", "del") for k in ("route", "neigh", "fdb", "link", "addr", "overrun"))}


def event_key(action: str, kind: str, dst: str | None) -> bytes:
    """A compact key naming a notification: its action, kind and destination (as in :class:`Event`)."""
    code = _EVENT_CODES.get((action, kind), b"?")
    if dst is None:
        return code
    try:
        return code + socket.inet_pton(socket.AF_INET6 if ":" in dst else socket.AF_INET, dst)
    except OSError:
        return code


def _rtmsg(dst: bytes, plen: int, gateway: bytes | None, oif: int, onlink: bool, table: int, proto: int,
           scope: int, kind: int) -> bytes:
    """An rtmsg body (family from ``dst``'s length; oif 0: none)."""
    rtm_table = table if table < 256 else 252  # RT_TABLE_COMPAT; RTA_TABLE carries the real one
    body = struct.pack("=BBBBBBBBI", _af(dst), plen, 0, 0, rtm_table, proto, scope, kind,
                       RTNH_F_ONLINK if onlink else 0)
    body += _nla(RTA_DST, dst) + _nla(RTA_TABLE, _U32.pack(table))
    if gateway is not None:
        body += _nla(RTA_GATEWAY, gateway)
    if oif:
        body += _nla(RTA_OIF, struct.pack("=i", oif))
    return body


def _batch_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        try:  # root may exceed net.core.rmem_max: 256 acks in flight must never overrun the queue
            s.setsockopt(socket.SOL_SOCKET, 33, BATCH_RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BATCH_RCVBUF)
        try:  # error acks without a copy of the request
            s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass
        s.bind((0, 0))
        s.settimeout(BATCH_ACK_TIMEOUT)
    except BaseException:
        s.close()
        raise
    return s


def _send_chunk(s: socket.socket, msgs: list[bytes], first_seq: int) -> dict[int, int]:
    """Send msgs with sequence numbers first_seq.. in one sendmsg; {seq: errno (0 = done)} of the acks
    that came back (a socket error or timeout ends the wait: the rest count as lost)."""
    buf = bytearray()
    for n, m in enumerate(msgs):
        buf += m[:8]
        buf += struct.pack("=I", first_seq + n)
        buf += m[12:]
    codes: dict[int, int] = {}
    last = first_seq + len(msgs)
    try:
        s.send(buf)
        while len(codes) < len(msgs):
            data = s.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, seq = struct.unpack_from("=IHHI", data, off)
                if length < 16:
                    break
                if kind == NLMSG_ERROR and first_seq <= seq < last:
                    codes[seq] = -struct.unpack_from("=i", data, off + 16)[0]
                off += (length + 3) & ~3
    except OSError as e:  # ENOBUFS (acks dropped), timeout: unacked ops are retried
        log.debug("netlink batch acks lost", error=str(e), acked=len(codes), sent=len(msgs))
    return codes


def _batch_round(s: socket.socket, ops: Sequence[BatchOp], pending: list[int], results: list[NetlinkError | None],
                 seq: int, final: bool) -> tuple[list[int], int]:
    """Send ``ops[k]`` for k in ``pending`` once (BATCH_SIZE per sendmsg, sequence numbers from
    seq + 1) and record each result; returns (the indices worth retrying, the last sequence number).
    ``final``: nothing is retried (transient errors and lost acks become the op's error)."""
    again: list[int] = []
    for i in range(0, len(pending), BATCH_SIZE):
        chunk = pending[i:i + BATCH_SIZE]
        first = seq + 1
        seq += len(chunk)
        codes = _send_chunk(s, [ops[k].msg for k in chunk], first)
        for n, k in enumerate(chunk):
            code = codes.get(first + n, errno.ETIMEDOUT)
            op = ops[k]
            if code == 0 or (op.delete and code in GONE_ERRNOS):
                results[k] = None
            elif (code in RETRY_ERRNOS or code == errno.ETIMEDOUT) and not final:
                again.append(k)
            else:
                results[k] = NetlinkError(_hint(code, op.what), code)
    return again, seq


def run_batch(ops: Sequence[BatchOp], retries: int = RETRIES,
              pending: list[int] | None = None) -> list[NetlinkError | None]:
    """Blocking: apply ops in order, BATCH_SIZE per sendmsg; one result per op (None: applied).
    Transient errors (and lost acks) are retried, up to ``retries`` rounds, for the failed ops only.
    ``pending``: only these indices (the others' results are None)."""
    results: list[NetlinkError | None] = [None] * len(ops)
    pending = list(range(len(ops))) if pending is None else pending
    delay = RETRY_BASE_DELAY
    seq = 0
    s = _batch_socket()
    try:
        for attempt in range(1, retries + 1):
            pending, seq = _batch_round(s, ops, pending, results, seq, final=attempt >= retries)
            if not pending:
                break
            log.debug("netlink batch retry", ops=len(pending), attempt=attempt)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)
    finally:
        s.close()
    return results


# --- IPsec policies (NETLINK_XFRM) ----------------------------------------------------------------

NETLINK_XFRM = 6
XFRM_MSG_NEWPOLICY, XFRM_MSG_DELPOLICY, XFRM_MSG_GETPOLICY, XFRM_MSG_UPDPOLICY = 19, 20, 21, 25
XFRMA_TMPL = 5
XFRM_DIRS = {"in": 0, "out": 1, "fwd": 2}
XFRM_MODE_TUNNEL = 1
IPPROTO_ESP = 50
XFRM_INF = 0xFFFFFFFFFFFFFFFF
NLMSG_DONE = 3
NLM_F_DUMP = 0x300
_SELECTOR = struct.Struct("=16s16sHHHHHBBB3xiI")  # struct xfrm_selector (56 bytes)
_POLICY_TAIL = struct.Struct("=IIBBBB4x")  # priority, index, dir, action, flags, share (+ pad): 168 in all
_TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")  # struct xfrm_user_tmpl (64 bytes)


@dataclass(frozen=True)
class XfrmPolicy:
    """``ip xfrm policy ... src SRC dst DST dir DIR tmpl src TSRC dst TDST proto esp reqid R mode
    tunnel`` (IPv4): what upstream's ipsec backend installs, three per peer (out, in, fwd)."""

    src: IPv4Network
    dst: IPv4Network
    dir: str  # "in" | "out" | "fwd"
    tmpl_src: IPv4Address
    tmpl_dst: IPv4Address
    reqid: int
    proto: int = IPPROTO_ESP
    mode: int = XFRM_MODE_TUNNEL
    priority: int = 0

    def __str__(self) -> str:
        return (f"{self.src} -> {self.dst} dir {self.dir} tmpl {self.tmpl_src} -> {self.tmpl_dst} "
                f"reqid {self.reqid}")


def _selector(p: XfrmPolicy) -> bytes:
    return _SELECTOR.pack(p.dst.network_address.packed.ljust(16, b"\0"), p.src.network_address.packed.ljust(16, b"\0"),
                          0, 0, 0, 0, socket.AF_INET, p.dst.prefixlen, p.src.prefixlen, 0, 0, 0)


def _policy_msg(p: XfrmPolicy) -> bytes:
    """XFRM_MSG_UPDPOLICY as Go's netlink.XfrmPolicyUpdate builds it (infinite limits, all algorithms)."""
    lft = struct.pack("=8Q", XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0) + bytes(32)  # cfg + cur
    body = _selector(p) + lft + _POLICY_TAIL.pack(p.priority, 0, XFRM_DIRS[p.dir], 0, 0, 0)
    tmpl = _TMPL.pack(p.tmpl_dst.packed.ljust(16, b"\0"), 0, p.proto, socket.AF_INET,
                      p.tmpl_src.packed.ljust(16, b"\0"), p.reqid, p.mode, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return body + _nla(XFRMA_TMPL, tmpl)


def _parse_policy(body: bytes) -> XfrmPolicy | None:
    """An XFRM_MSG_NEWPOLICY (dump) body → XfrmPolicy; None for IPv6, template-less or unusual ones."""
    if len(body) < _SELECTOR.size + 96 + _POLICY_TAIL.size:
        return None
    daddr, saddr, _, _, _, _, family, plen_d, plen_s, _, _, _ = _SELECTOR.unpack_from(body, 0)
    priority, _, dir_, _, _, _ = _POLICY_TAIL.unpack_from(body, _SELECTOR.size + 96)
    dirs = {v: k for k, v in XFRM_DIRS.items()}
    tmpl = _attrs(body, _SELECTOR.size + 96 + _POLICY_TAIL.size, len(body)).get(XFRMA_TMPL, b"")
    if family != socket.AF_INET or dir_ not in dirs or len(tmpl) != _TMPL.size:
        return None
    tdst, _, proto, tfamily, tsrc, reqid, mode, _, _, _, _, _ = _TMPL.unpack(tmpl)
    if tfamily != socket.AF_INET or plen_d > 32 or plen_s > 32:
        return None
    return XfrmPolicy(IPv4Network((IPv4Address(saddr[:4]), plen_s), strict=False),
                      IPv4Network((IPv4Address(daddr[:4]), plen_d), strict=False), dirs[dir_],
                      IPv4Address(tsrc[:4]), IPv4Address(tdst[:4]), reqid, proto, mode, priority)


def _xfrm_request(kind: int, flags: int, body: bytes, what: str, ok_if_gone: bool = False) -> list[bytes]:
    """Blocking: one request on a fresh NETLINK_XFRM socket; the bodies of the replies (a dump's
    messages, none for an ack). Raises NetlinkError (one line)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    try:
        s.settimeout(BATCH_ACK_TIMEOUT)
        s.bind((0, 0))
        s.send(struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, 1, 0) + body)
        out: list[bytes] = []
        while True:
            data = s.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + 16)[0]
                    if code == 0 or (ok_if_gone and code in GONE_ERRNOS):
                        return out
                    raise NetlinkError(_hint(code, what), code)
                out.append(data[off + 16:off + length])
                off += (length + 3) & ~3
    except OSError as e:
        raise NetlinkError(_hint(e.errno or 0, what), e.errno or 0) from None
    finally:
        s.close()


async def xfrm_policies() -> list[XfrmPolicy]:
    """``ip xfrm policy list``: the IPv4 policies with one template, in the caller's namespace."""
    bodies = await asyncio.to_thread(_xfrm_request, XFRM_MSG_GETPOLICY, NLM_F_DUMP, bytes(64), "list xfrm policies")
    return [p for p in (_parse_policy(b) for b in bodies) if p is not None]


async def xfrm_update_policy(p: XfrmPolicy) -> None:
    """``ip xfrm policy update ...`` (added if absent; upstream's XfrmPolicyAdd/Update)."""
    await asyncio.to_thread(_xfrm_request, XFRM_MSG_UPDPOLICY, NLM_F_ACK, _policy_msg(p), f"update xfrm policy {p}")


async def xfrm_delete_policy(p: XfrmPolicy) -> None:
    """``ip xfrm policy delete src .. dst .. dir ..`` (already gone is fine)."""
    body = _selector(p) + struct.pack("=IB3x", 0, XFRM_DIRS[p.dir])
    await asyncio.to_thread(_xfrm_request, XFRM_MSG_DELPOLICY, NLM_F_ACK, body, f"delete xfrm policy {p}",
                            ok_if_gone=True)


# --- raw dumps (what a full pass reads) -------------------------------------------------------------
#
# A full pass compares thousands of kernel entries with the desired state. Decoded by pyroute2 that
# cost ~0.6 s of CPU and 15,000 message objects a pass (the arena fragmentation that made the daemon
# grow); here a dump is read on a raw socket and each entry decoded, with ``struct``, into a tuple of
# the few fields the comparison needs (~10 ms for 15,000 entries). The kernel filters by device
# where it can (NETLINK_GET_STRICT_CHK, Linux ≥ 4.20); the rows are filtered here as well.

NLM_F_DUMP_INTR = 0x10
RTM_GETROUTE, RTM_GETNEIGH = 26, 30
NETLINK_GET_STRICT_CHK = 12
NDA_IFINDEX = 8
RTA_MULTIPATH = 9
DUMP_RCVBUF = 4 * 1024 * 1024
DUMP_ATTEMPTS = 5
_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")

# Addresses in rows are ints (IPv4: 32 bits, IPv6: 128 bits; one family per dump).
RouteRow = tuple[int, int, int, int, int, int]  # dst, prefix length, gateway (0: none), oif (0: none), rtm_flags, proto
NeighRow = tuple[int, bytes, int]  # address, lladdr (b"" if none), NUD state
FdbRow = tuple[bytes, int, int]  # lladdr, remote VTEP (NDA_DST; 0 if none), NUD state


def _dump(what: str, kind: int, body: bytes) -> list[bytes]:
    """Blocking: the datagrams answering one dump request (the caller decodes them). A dump the
    kernel marks inconsistent (NLM_F_DUMP_INTR: the table changed meanwhile) is read again.
    Raises NetlinkError."""
    for _attempt in range(DUMP_ATTEMPTS):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            try:
                s.setsockopt(socket.SOL_SOCKET, 33, DUMP_RCVBUF)  # SO_RCVBUFFORCE
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DUMP_RCVBUF)
            try:
                s.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            except OSError:  # older kernels: no filtering by the kernel, the rows are filtered anyway
                pass
            s.bind((0, 0))
            s.settimeout(BATCH_ACK_TIMEOUT)
            s.send(_HDR.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
            chunks: list[bytes] = []
            intr = False
            while True:
                data = s.recv(1 << 20)
                chunks.append(data)
                off, n = 0, len(data)
                done = False
                while off + 16 <= n:
                    length, mtype, flags, _seq, _pid = _HDR.unpack_from(data, off)
                    if length < 16:
                        break
                    intr |= bool(flags & NLM_F_DUMP_INTR)
                    if mtype == NLMSG_DONE:
                        done = True
                        break
                    if mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        raise NetlinkError(_hint(code, what), code)
                    off += (length + 3) & ~3
                if done:
                    break
        except OSError as e:
            raise NetlinkError(_hint(e.errno or 0, what), e.errno or 0) from None
        finally:
            s.close()
        if not intr:
            return chunks
    return chunks  # still changing after several reads: the next pass reads again


def _messages(chunks: list[bytes], want: int):
    """(datagram, offset of the body, end) of every message of type ``want`` in a dump's datagrams."""
    for data in chunks:
        off, n = 0, len(data)
        while off + 16 <= n:
            length, mtype = _HDR.unpack_from(data, off)[:2]
            if length < 16 or off + length > n:
                break
            if mtype == want:
                yield data, off + 16, off + length
            off += (length + 3) & ~3


def _addr_int(data: bytes, off: int, alen: int, size: int) -> int | None:
    """The address in the attribute at ``off`` (length ``alen``, header included) as an int, if it
    has ``size`` bytes (4: IPv4, 16: IPv6); else None."""
    if alen != 4 + size:
        return None
    return _BE32.unpack_from(data, off + 4)[0] if size == 4 else int.from_bytes(data[off + 4:off + 20], "big")


def read_routes(table: int = MAIN_TABLE, family: int = socket.AF_INET) -> list[RouteRow]:
    """Blocking: the unicast routes of ``family`` (AF_INET or AF_INET6) in ``table`` (multipath
    routes skipped), as :data:`RouteRow`."""
    body = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 0, 0, 0, 0, 0)
    size = 16 if family == socket.AF_INET6 else 4
    out = []
    unpack_nla, u32 = _NLA_HDR.unpack_from, _U32.unpack_from
    for data, b, end in _messages(_dump("list routes", RTM_GETROUTE, body), RTM_NEWROUTE):
        fam, plen, _src, _tos, tbl, proto, _scope, rtype, flags = _RTMSG.unpack_from(data, b)
        if fam != family or rtype != RTN_UNICAST:
            continue
        dst = gw = oif = 0
        multipath = False
        a = b + 12
        while a + 4 <= end:
            alen, atype = unpack_nla(data, a)
            if alen < 4:
                break
            if atype == RTA_DST:
                dst = _addr_int(data, a, alen, size) or 0
            elif atype == RTA_GATEWAY:
                gw = _addr_int(data, a, alen, size) or 0
            elif atype == RTA_OIF and alen == 8:
                oif = u32(data, a + 4)[0]
            elif atype == RTA_TABLE and alen == 8:
                tbl = u32(data, a + 4)[0]
            elif atype == RTA_MULTIPATH:
                multipath = True
            a += (alen + 3) & ~3
        if tbl == table and not multipath:
            out.append((dst, plen, gw, oif, flags, proto))
    return out


def _neigh_rows(chunks: list[bytes], family: int, index: int, size: int) -> list[tuple[int, bytes, int]]:
    """(NDA_DST as an int or 0, NDA_LLADDR or b"", state) of ``index``'s entries of ``family``
    whose NDA_DST, if any, has ``size`` bytes (4: IPv4, 16: IPv6; others are left out)."""
    out = []
    unpack_nla = _NLA_HDR.unpack_from
    for data, b, end in _messages(chunks, RTM_NEWNEIGH):
        fam, ifindex, state, _flags, _type = _NDMSG.unpack_from(data, b)
        if fam != family or ifindex != index:
            continue
        ip: int | None = 0
        mac = b""
        a = b + 12
        while a + 4 <= end:
            alen, atype = unpack_nla(data, a)
            if alen < 4:
                break
            if atype == NDA_DST:
                ip = _addr_int(data, a, alen, size)
            elif atype == NDA_LLADDR:
                mac = data[a + 4:a + alen]
            a += (alen + 3) & ~3
        if ip is not None:
            out.append((ip, mac, state))
    return out


def read_neighbours(index: int, family: int = socket.AF_INET) -> list[NeighRow]:
    """Blocking: the neighbour entries (AF_INET: ARP, AF_INET6: NDP) of device ``index``, as
    :data:`NeighRow`."""
    body = _NDMSG.pack(family, 0, 0, 0, 0) + _nla(NDA_IFINDEX, _U32.pack(index))
    size = 16 if family == socket.AF_INET6 else 4
    return [r for r in _neigh_rows(_dump(f"list neighbours of link {index}", RTM_GETNEIGH, body),
                                   family, index, size) if r[0]]


def read_fdb(index: int, family: int = socket.AF_INET) -> list[FdbRow]:
    """Blocking: the bridge FDB entries of device ``index`` (a vxlan device's remote VTEPs) whose
    remote, if any, is of ``family`` (AF_INET: flannel.N's, AF_INET6: flannel-v6.N's), as
    :data:`FdbRow`."""
    body = _NDMSG.pack(AF_BRIDGE, index, 0, 0, 0)
    size = 16 if family == socket.AF_INET6 else 4
    return [(mac, ip, state) for ip, mac, state in
            _neigh_rows(_dump(f"list fdb of link {index}", RTM_GETNEIGH, body), AF_BRIDGE, index, size)]


def write_sysctl(key: str, value: str, *, warning: str = "", **fields: Any) -> bool:
    """Write ``value`` to /proc/sys/<key with '/' separators> (``net/ipv6/conf/flannel.1/accept_ra``)
    in the caller's network namespace; False if impossible. A failure is a debug line, or with
    ``warning`` a warning line of that text (with ``fields`` and the error)."""
    try:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)
        return True
    except OSError as e:
        if warning:
            log.warning(warning, **fields, error=str(e))
        else:
            log.debug("sysctl not written", key=key, error=str(e))
        return False


# --- events ---------------------------------------------------------------------------------------


class NetlinkMonitor:
    """Link, route and neighbour (incl. FDB) notifications of the caller's namespace, IPv4 and
    IPv6 (``Event.dst`` is the address's text either way).

    ``async for ev in NetlinkMonitor().events(): ...`` — runs until cancelled. When the socket
    fails (typically ENOBUFS: the kernel dropped notifications) it reopens and yields an
    ``Event("overrun", "")`` first, meaning "something may have been missed: reconcile all".

    A raw socket: messages are decoded with ``struct`` and only as far as :class:`Event` needs.
    ``skip_new_entries=True`` drops RTM_NEWROUTE/RTM_NEWNEIGH after reading their 16-byte header
    (reconcilers only care about deletions and link changes; a sync of thousands of peers causes
    as many "new" notifications of its own).
    """

    GROUPS = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_NEIGH
    LINKS_AND_ADDRESSES = RTMGRP_LINK | RTMGRP_IPV4_IFADDR  # for following the external interface
    IPV6_ROUTES, IPV6_ADDRESSES = RTMGRP_IPV6_ROUTE, RTMGRP_IPV6_IFADDR  # added when the overlay runs IPv6

    def __init__(self, rcvbuf: int = 8 * 1024 * 1024, skip_new_entries: bool = False,
                 groups: int | None = None) -> None:
        self.rcvbuf = rcvbuf
        self.groups = self.GROUPS if groups is None else groups
        self.skip = frozenset({RTM_NEWROUTE, RTM_NEWNEIGH}) if skip_new_entries else frozenset()
        self._sock: socket.socket | None = None

    def _open(self) -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            try:  # as root beyond net.core.rmem_max, so that bursts do not overrun the queue
                s.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf)  # SO_RCVBUFFORCE
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            s.bind((0, self.groups))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    def close(self) -> None:
        """Close the socket; a running :meth:`events` opens a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def events(self) -> AsyncIterator[Event]:
        """The notifications as :class:`Event` objects, until cancelled; after a socket failure the
        socket is reopened and ``Event("overrun", "")`` comes first."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        failed = False
        try:
            while True:
                try:
                    if self._sock is None:
                        self._sock = self._open()
                        if failed:
                            yield Event("overrun", "")
                    sock = self._sock
                    drained = 0
                    while True:
                        try:
                            data = sock.recv(65536)
                        except BlockingIOError:
                            data = await loop.sock_recv(sock, 65536)
                            drained = 0
                        else:
                            drained += 1
                            if drained >= 256:  # a flood must not starve the loop
                                drained = 0
                                await asyncio.sleep(0)
                        for ev in _raw_events(data, self.skip):
                            yield ev
                        delay = 0.05
                except OSError as e:
                    code = e.errno or 0
                    log.warning("netlink monitor restarted; reconciling", error=os.strerror(code) if code else str(e))
                    self.close()
                    failed = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self.close()


RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
IFLA_IFNAME = 3
_RAW_EVENTS = {
    RTM_NEWLINK: ("link", "new"), RTM_DELLINK: ("link", "del"),
    RTM_NEWADDR: ("addr", "new"), RTM_DELADDR: ("addr", "del"),
    RTM_NEWROUTE: ("route", "new"), RTM_DELROUTE: ("route", "del"),
    RTM_NEWNEIGH: ("neigh", "new"), RTM_DELNEIGH: ("neigh", "del"),
}


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out = {}
    while off + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, off)
        if n < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + n]
        off += (n + 3) & ~3
    return out


def _ip_str(b: bytes | None) -> str | None:
    if b is None:
        return None
    if len(b) == 4:
        return socket.inet_ntop(socket.AF_INET, b)
    if len(b) == 16:
        return str(IPv6Address(b))  # the text str() of an address gives (expect_deleted compares them)
    return None


def _raw_events(data: bytes, skip: frozenset[int] = frozenset()) -> list[Event]:
    """The Events in one datagram of rtnetlink notifications (others and ``skip`` types dropped)."""
    out = []
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16 or off + length > len(data):
            break
        end = off + length
        body = off + 16
        ka = _RAW_EVENTS.get(kind)
        off += (length + 3) & ~3
        if ka is None or kind in skip:
            continue
        what, action = ka
        if what == "link" and end >= body + 16:
            index = struct.unpack_from("=i", data, body + 4)[0]
            name = _attrs(data, body + 16, end).get(IFLA_IFNAME)
            out.append(Event(what, action, ifindex=index,
                             name=name.split(b"\0", 1)[0].decode(errors="replace") if name is not None else None))
        elif what == "addr" and end >= body + 8:
            if data[body] not in (socket.AF_INET, socket.AF_INET6):
                continue
            out.append(Event(what, action, ifindex=struct.unpack_from("=i", data, body + 4)[0]))
        elif what == "route" and end >= body + 12:
            family, table = data[body], data[body + 4]
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            a = _attrs(data, body + 12, end)
            oif = struct.unpack("=i", a[RTA_OIF])[0] if len(a.get(RTA_OIF, b"")) == 4 else None
            if len(a.get(RTA_TABLE, b"")) == 4:
                table = struct.unpack("=I", a[RTA_TABLE])[0] or table
            out.append(Event(what, action, ifindex=oif, dst=_ip_str(a.get(RTA_DST)), table=table,
                             plen=data[body + 1], proto=data[body + 5]))
        elif what == "neigh" and end >= body + 12:
            family = data[body]
            index, state = struct.unpack_from("=iH", data, body + 4)
            if family == AF_BRIDGE:
                what = "fdb"
            elif family not in (socket.AF_INET, socket.AF_INET6):
                continue
            out.append(Event(what, action, ifindex=index, dst=_ip_str(_attrs(data, body + 12, end).get(NDA_DST)),
                             state=state))
    return out

# --- pyroute2 message decoding --------------------------------------------------------------------


def _link(m: Any) -> Link:
    linkinfo = m.get("IFLA_LINKINFO")
    kind, info = "", {}
    if linkinfo is not None:
        kind = linkinfo.get("IFLA_INFO_KIND") or ""
        data = linkinfo.get("IFLA_INFO_DATA")
        if data is not None and hasattr(data, "get"):
            info = {a[0]: a[1] for a in data.get("attrs", []) if a[0] != "UNKNOWN"}
    return Link(
        index=m["index"],
        name=m.get("IFLA_IFNAME"),
        kind=kind,
        mac=(m.get("IFLA_ADDRESS") or "").lower(),
        mtu=m.get("IFLA_MTU") or 0,
        up=bool(m["flags"] & 1),
        info=info,
    )


_ZERO_KEY = "A" * 43 + "="  # base64 of 32 zero bytes: the kernel's "no preshared key"


def _b64(v: Any) -> str | None:
    if isinstance(v, bytes):
        v = v.decode()
    return v or None


def _wg_device(name: str, msgs: list) -> WgDevice:
    """Merge a WG_CMD_GET_DEVICE dump (a peer's allowed IPs may continue in the next message)."""
    pub, port = None, 0
    peers: dict[str, dict[str, Any]] = {}
    for m in msgs:
        pub = _b64(m.get("WGDEVICE_A_PUBLIC_KEY")) or pub
        port = m.get("WGDEVICE_A_LISTEN_PORT") or port
        for p in m.get("WGDEVICE_A_PEERS") or []:
            key = _b64(p.get("WGPEER_A_PUBLIC_KEY"))
            if key is None:
                continue
            d = peers.setdefault(key, {"allowed": []})
            ep = p.get("WGPEER_A_ENDPOINT")
            if ep and ep.get("family") == socket.AF_INET:
                d["endpoint"] = (IPv4Address(ep["addr"]), int(ep["port"]))
            if p.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") is not None:
                d["keepalive"] = p.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            psk = _b64(p.get("WGPEER_A_PRESHARED_KEY"))
            if psk is not None:
                d["psk"] = None if psk == _ZERO_KEY else psk
            for a in p.get("WGPEER_A_ALLOWEDIPS") or []:
                addr = a.get("addr") if hasattr(a, "get") else None
                if addr and ":" not in addr:
                    d["allowed"].append(IPv4Network(addr, strict=False))
    return WgDevice(name, pub, port, tuple(
        WgPeer(k, d.get("endpoint"), tuple(d["allowed"]), d.get("keepalive") or 0, d.get("psk"))
        for k, d in peers.items()))


def _route(m: Any) -> Route | None:
    family = m.get("family")
    if family not in (socket.AF_INET, socket.AF_INET6) or m.get("RTA_MULTIPATH") is not None:
        return None
    dst = m.get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    gw = m.get("RTA_GATEWAY")
    try:
        net = ip_network(f"{dst}/{m['dst_len']}", strict=False)
        gw_ip = ip_address(gw) if gw else None
    except ValueError:
        return None
    if net.version != (4 if family == socket.AF_INET else 6):
        return None
    return Route(
        dst=net,
        gateway=gw_ip,
        oif=m.get("RTA_OIF"),
        onlink=bool(m.get("flags", 0) & RTNH_F_ONLINK),
        table=m.get("RTA_TABLE") or m.get("table") or 0,
        proto=m.get("proto", 0),
    )


def _family(x: IPAddress | IPNetwork) -> int:
    """AF_INET or AF_INET6 for an address or network."""
    return socket.AF_INET6 if x.version == 6 else socket.AF_INET


def _route_kw(r: Route, add: bool = True) -> dict[str, Any]:
    kw: dict[str, Any] = {"dst": str(r.dst), "table": r.table}
    if add:
        kw["proto"] = RTPROT_BOOT  # on delete, no proto: it would have to match
    if r.gateway is not None:
        kw["gateway"] = str(r.gateway)
    if r.oif is not None:
        kw["oif"] = r.oif
    if r.onlink:
        kw["flags"] = ["onlink"]
    return kw


def _route_str(r: Route) -> str:
    s = str(r.dst)
    if r.gateway is not None:
        s += f" via {r.gateway}"
    if r.oif is not None:
        s += f" dev {r.oif}"
    if r.onlink:
        s += " onlink"
    return s


# --- the host's links, addresses and routes, read synchronously (iface.py) ------------------------


@dataclass(frozen=True)
class HostAddress:
    """One address of the host (an RTM_NEWADDR): the link's index, the host's own address
    (IFA_LOCAL, else IFA_ADDRESS: for a point-to-point address ``ip addr add 10.99.0.2 peer
    10.99.0.254/32`` IFA_ADDRESS is the *peer's*, as vishvananda/netlink's AddrList reads it too;
    an IPv6 zone dropped), its scope (RT_SCOPE_*: 0 universe, 253 link) and its IFA_F_* flags."""

    index: int
    ip: IPAddress
    scope: int
    flags: int


class HostView:
    """A blocking netlink socket that reads the host's links, addresses and routes (pyroute2's
    IPRoute, which runs its own event loop: call it from a thread, never on the daemon's loop).
    ``with HostView() as host: ...``; every method raises NetlinkError."""

    def __init__(self) -> None:
        self._ipr = IPRoute()

    def __enter__(self) -> HostView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self._ipr.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except PyNetlinkError as e:
            raise NetlinkError(_hint(e.code or 0, what), e.code or 0) from None
        except OSError as e:
            raise NetlinkError(_hint(e.errno or 0, what), e.errno or 0) from None

    def links(self) -> dict[int, tuple[str, int]]:
        """Every link: index → (name, MTU in bytes)."""
        return {ln["index"]: (ln.get_attr("IFLA_IFNAME"), ln.get_attr("IFLA_MTU"))
                for ln in self._call("list links", self._ipr.get_links)}

    def addresses(self, family: int = socket.AF_INET) -> list[HostAddress]:
        """Every address of ``family`` (AF_INET or AF_INET6) on every link, in the kernel's order."""
        out = []
        for a in self._call("list addresses", lambda: self._ipr.get_addr(family=family)):
            text = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if text:
                out.append(HostAddress(a["index"], ip_address(text.split("%")[0]), a["scope"],
                                       a.get_attr("IFA_FLAGS") or a["flags"]))
        return out

    def prefixes(self, index: int) -> list[tuple[IPAddress, IPNetwork]]:
        """(own address, the network it is on) for each address of link ``index``, IPv4 and IPv6:
        the network is IFA_ADDRESS/prefixlen, which for a point-to-point address is the peer's."""
        out = []
        for a in self._call("list addresses", lambda: self._ipr.get_addr(index=index)):
            local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            peer = a.get_attr("IFA_ADDRESS") or local
            if local:
                out.append((ip_address(local.split("%")[0]),
                            ip_network(f"{peer.split('%')[0]}/{a['prefixlen']}", strict=False)))
        return out

    def route_to(self, dst: IPAddress) -> tuple[int | None, IPAddress | None]:
        """``ip route get DST``: (the outgoing link's index, the preferred source address; each None
        when the route has none). Raises NetlinkError (e.g. ENETUNREACH: no route)."""
        routes = self._call(f"ip route get {dst}", lambda: self._ipr.route("get", dst=str(dst)))
        if not routes:
            raise NetlinkError(_hint(errno.ENETUNREACH, f"ip route get {dst}"), errno.ENETUNREACH)
        src = routes[0].get_attr("RTA_PREFSRC")
        return routes[0].get_attr("RTA_OIF"), ip_address(src) if src else None

    def default_route_oifs(self, family: int = socket.AF_INET) -> list[int]:
        """The outgoing links of the default routes of ``family`` that have a single next hop, in
        the kernel's order."""
        routes = self._call("list default routes", lambda: self._ipr.get_default_routes(family=family))
        return [oif for r in routes if (oif := r.get_attr("RTA_OIF")) is not None]
