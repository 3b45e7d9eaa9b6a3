"""wireguard: upstream ``pkg/backend/wireguard`` (wireguard.go, device.go, wireguard_network.go), IPv4.

* Options (``Backend`` object, keys case-insensitive): ``ListenPort`` (51820), ``ListenPortV6``
  (51821), ``PSK`` (a base64 WireGuard key, optional), ``PersistentKeepaliveInterval`` (seconds,
  0 = off), ``Mode`` (``separate`` default | ``auto`` | ``ipv4`` | ``ipv6``; anything else: "No valid
  Mode configured"), ``MTU`` (v0.21.3+; default the interface MTU).
* Private key: ``$WIREGUARD_KEY_FILE`` or ``/run/flannel/wgkey``, generated once (see wgkey).
* Device ``flannel-wg``, type wireguard, MTU = (``MTU`` or interface MTU) − 80 (also subnet.env's);
  an existing device of that name is deleted and recreated (upstream); private key and listen port
  set through the kernel's ``wireguard`` generic-netlink family. Address: own subnet's network
  address ``/32`` (other Network addresses removed), link up, route ``<Network> dev flannel-wg
  scope link``.
* Lease: BackendType "wireguard", BackendData ``{"PublicKey":"<base64>"}``.
* Per remote wireguard lease: one peer, public key from its BackendData, endpoint
  ``<PublicIP>:<our ListenPort>`` (upstream dials every peer on its own listen port), allowed IPs
  = the peer's subnet, the PSK and keepalive. Removal removes the peer.
* On shutdown the device is deleted (upstream); the key file stays, so a restarted host comes
  back with the same public key and its peers reconnect.
* Beyond upstream (kernelsync): peers of leases gone while the daemon was down are removed at
  start; a removed peer, a deleted device (recreated with key, port, address, route and peers) or
  route comes back within ~100 ms of the netlink event, or at the next 10 s reconcile. A peer's
  endpoint is left as WireGuard roams it (only a lease change moves it).
* IPv4 only: ``EnableIPv6`` is refused (``Backend.ipv6``), and so is ``Mode: ipv6`` (upstream's
  ``flannel-wg-v6`` on ``ListenPortV6``, IPv6 endpoints and BackendV6Data are not built; this
  machine's kernel has no wireguard to test them on).
"""

from __future__ import annotations

from ipaddress import IPv4Network

import structlog

from .. import metrics
from ..netlink import RT_SCOPE_LINK, Event, Link, NetlinkError, Route, WgPeer
from ..subnet.lease import Lease, wg_public_key
from .base import BackendContext, BackendError, BackendInfo, register_backend
from .devaddr import ensure_own_address
from .kernelsync import KernelPeerBackend, backend_options
from .wgkey import WgKeyError, key_file_path, load_or_create, parse_key

log = structlog.get_logger()

DEVICE = "flannel-wg"
OVERHEAD = 80  # IPv6 header 40 (upstream reserves the larger one) + UDP 8 + WireGuard 32
MODES = ("separate", "auto", "ipv4", "ipv6")


@register_backend
class WireGuardBackend(KernelPeerBackend):
    """The wireguard backend (upstream ``pkg/backend/wireguard``): device ``flannel-wg`` with a peer
    per remote lease (its PublicKey from BackendData); see the module docstring."""
    type_name = "wireguard"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.listen_port = 51820
        self.listen_port_v6 = 51821
        self.psk: str | None = None
        self.keepalive_s = 0
        self.mode = "separate"
        self.mtu = ctx.ext.mtu - OVERHEAD
        self.private_key = ""
        self.public_key = ""
        self.dev: Link | None = None
        self._bad_data: set[IPv4Network] = set()
        self._dup_keys: set[IPv4Network] = set()

    def _read_config(self) -> None:
        """Upstream RegisterNetwork's config struct; a wrong JSON type or value is a BackendError."""
        o = backend_options(self.ctx, {
            "ListenPort": (int, 51820), "ListenPortV6": (int, 51821), "PSK": (str, ""),
            "PersistentKeepaliveInterval": (int, 0), "Mode": (str, "separate"), "MTU": (int, 0),
        }, "wireguard")
        if o["Mode"] not in MODES:
            raise BackendError(f"No valid Mode configured: {o['Mode']!r} (use one of {', '.join(MODES)})")
        for name in ("ListenPort", "ListenPortV6"):
            if not 0 < o[name] < 65536:
                raise BackendError(f"{name} {o[name]} is not a UDP port (1-65535)")
        if not 0 <= o["PersistentKeepaliveInterval"] < 65536:
            raise BackendError(f"PersistentKeepaliveInterval {o['PersistentKeepaliveInterval']} is out of "
                               "range (0-65535 seconds)")
        if o["PSK"]:
            try:
                parse_key(o["PSK"])
            except ValueError as e:
                raise BackendError(f"could not parse psk ({e}): PSK must be a base64 WireGuard key "
                                   "(wg genpsk)") from None
        self.listen_port, self.listen_port_v6 = o["ListenPort"], o["ListenPortV6"]
        self.psk = o["PSK"] or None
        self.keepalive_s = o["PersistentKeepaliveInterval"]
        self.mode = o["Mode"]
        self.mtu = (o["MTU"] or self.ctx.ext.mtu) - OVERHEAD
        if self.mode == "ipv6":
            raise BackendError("Mode ipv6 needs IPv6 endpoints, which pyflanneld's wireguard backend does not "
                               "carry (IPv4 only): use Mode separate, auto or ipv4")
        log.info("wireguard config", listen_port=self.listen_port, mode=self.mode, psk=self.psk is not None,
                 persistent_keepalive_s=self.keepalive_s, mtu=self.mtu)

    # --- life cycle -----------------------------------------------------------------------------
    async def register(self) -> BackendInfo:
        self._read_config()
        try:
            keys, _ = load_or_create(key_file_path())
        except WgKeyError as e:
            raise BackendError(str(e)) from None
        self.private_key, self.public_key = keys.private, keys.public
        try:
            await self._ensure_device(recreate=True)
        except NetlinkError as e:
            raise BackendError(str(e)) from None
        return BackendInfo(mtu=self.mtu, backend_type="wireguard", backend_data={"PublicKey": self.public_key})

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        try:
            await self._configure_device()
        except NetlinkError as e:
            raise BackendError(f"failed to configure interface {DEVICE}: {e}") from None
        self.start_monitor()

    async def close(self) -> None:
        """Upstream removes its device when it stops; the key file stays."""
        await super().close()
        if self.dev is not None:
            try:
                await self.nl.delete_link(self.dev.index)
                log.info("removed wireguard device", device=DEVICE)
            except NetlinkError as e:
                log.warning("could not remove the wireguard device", device=DEVICE, error=str(e))
            finally:
                await self.nl.close()

    # --- the device -----------------------------------------------------------------------------
    async def _ensure_device(self, recreate: bool = False) -> bool:
        """Make ``flannel-wg`` exist with our key, listen port and MTU; True if (re)created.
        ``recreate``: an existing device is deleted first (upstream's start)."""
        link = await self.nl.link(name=DEVICE)
        if link is not None and (recreate or link.kind != "wireguard"):
            log.warning("device already exists; recreating device", device=DEVICE, kind=link.kind)
            await self.nl.delete_link(link.index)
            link = None
        created = link is None
        if link is None:
            link = await self.nl.create_wireguard(DEVICE, mtu=self.mtu)
            if self.dev is not None:
                metrics.KERNEL_REPAIRS.labels("device").inc()
                log.warning("wireguard device recreated", device=DEVICE)
        elif link.mtu != self.mtu:
            await self.nl.set_link(link.index, mtu=self.mtu)
        self.dev = link
        wg = None if created else await self.nl.wg_device(DEVICE)
        if wg is None or wg.public_key != self.public_key or wg.listen_port != self.listen_port:
            await self.nl.wg_set_device(DEVICE, private_key=self.private_key, listen_port=self.listen_port)
        return created

    async def _configure_device(self) -> None:
        """Upstream Configure: address /32, link up, route for the Network via the device."""
        assert self.dev is not None and self.own_lease is not None
        self.dev = await ensure_own_address(self.nl, self.dev, self.own_lease.subnet, self.network,
                                            self.ctx.previous_network)
        for r in await self.nl.routes():
            if r.dst == self.network and r.oif == self.dev.index and r.gateway is None:
                return
        await self.nl.replace_route(Route(self.network, None, self.dev.index), scope=RT_SCOPE_LINK)

    # --- desired state --------------------------------------------------------------------------
    def peer(self, lease: Lease) -> WgPeer | None:
        """The WireGuard peer this remote lease justifies (None: not a usable wireguard lease)."""
        if self.skip_other_type(lease):
            return None
        key = wg_public_key(lease.attrs.backend_data)
        if key is None:
            if lease.subnet not in self._bad_data:
                self._bad_data.add(lease.subnet)
                log.error("failed to unmarshal BackendData: no valid PublicKey", subnet=str(lease.subnet),
                          backend_data=lease.attrs.backend_data)
            return None
        return WgPeer(key, (lease.attrs.public_ip, self.listen_port), (lease.subnet,), self.keepalive_s, self.psk)

    def desired(self) -> dict[str, WgPeer]:
        """Public key → peer for every usable lease; a key claimed by two leases goes to the lower
        subnet (WireGuard has one peer per key), the other is logged once."""
        out: dict[str, WgPeer] = {}
        for sn in sorted(self.peers):
            p = self.peer(self.peers[sn])
            if p is None:
                continue
            if p.public_key in out or p.public_key == self.public_key:
                if sn not in self._dup_keys:
                    self._dup_keys.add(sn)
                    log.error("wireguard PublicKey already used by another host; peer ignored",
                              subnet=str(sn), public_key=p.public_key)
                continue
            out[p.public_key] = p
        return out

    # --- the event path -------------------------------------------------------------------------
    async def ensure_peer(self, lease: Lease) -> None:
        p = self.peer(lease)
        if p is None or self.desired().get(p.public_key) != p:
            return
        assert p.endpoint is not None
        log.info("subnet added", subnet=str(lease.subnet), endpoint=f"{p.endpoint[0]}:{p.endpoint[1]}")
        await self.nl.wg_set_peer(DEVICE, p)

    async def drop_peer(self, lease: Lease) -> None:
        if lease.attrs.backend_type != self.type_name:
            return
        key = wg_public_key(lease.attrs.backend_data)
        if key is None or any(wg_public_key(le.attrs.backend_data) == key  # another lease still uses it
                              for sn, le in self.peers.items() if sn != lease.subnet):
            return
        log.info("subnet removed", subnet=str(lease.subnet))
        await self.nl.wg_remove_peer(DEVICE, key)

    # --- reconciliation -------------------------------------------------------------------------
    def _forget(self, subnet: IPv4Network) -> None:
        super()._forget(subnet)
        self._bad_data.discard(subnet)
        self._dup_keys.discard(subnet)

    def _forget_gone(self) -> None:
        super()._forget_gone()
        self._bad_data &= set(self.peers)
        self._dup_keys &= set(self.peers)

    async def sync_entries(self) -> dict[str, int]:
        changes = {"device_recreated": 0, "added": 0, "removed": 0}
        if await self._ensure_device():
            changes["device_recreated"] = 1
        if self.own_lease is None:
            return changes
        await self._configure_device()
        want = self.desired()
        have = await self.nl.wg_device(DEVICE)
        current = {p.public_key: p for p in (have.peers if have is not None else ())}
        for key in current.keys() - want.keys():
            if await self.attempt("stale peer removal", lambda k=key: self.nl.wg_remove_peer(DEVICE, k), public_key=key):
                changes["removed"] += 1
        for key, p in want.items():
            cur = current.get(key)
            if cur is not None and set(cur.allowed_ips) == set(p.allowed_ips) and \
                    cur.keepalive_s == p.keepalive_s and cur.preshared_key == p.preshared_key:
                continue
            if await self.attempt("peer set", lambda p=p: self.nl.wg_set_peer(DEVICE, p),
                                  subnet=str(p.allowed_ips[0]), public_key=key):
                changes["added"] += 1
        return changes

    def relevant(self, ev: Event) -> bool:
        if ev.kind == "overrun":
            return True
        dev = self.dev.index if self.dev is not None else None
        if ev.kind == "link":
            return ev.ifindex == dev or ev.name == DEVICE
        return ev.kind == "route" and ev.action == "del" and ev.ifindex == dev and ev.table in (None, 254)
