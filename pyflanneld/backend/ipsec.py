"""ipsec: upstream ``pkg/backend/ipsec`` (ipsec.go, ipsec_network.go, handle_charon.go, handle_xfrm.go).

IKEv2 by strongSwan's charon (a child process, driven over VICI: see charon.py), encryption by the
kernel (ESP, tunnel mode). No device, no routes.

* Options: ``PSK`` (required, at least 96 characters, else upstream's "config error, password is
  too short"), ``UDPEncap`` (false), ``ESPProposal`` ("aes128gcm16-sha256-prfsha256-ecp256").
* MTU = interface MTU − 77 (− 8 more with ``UDPEncap``). Lease: BackendType "ipsec", no BackendData.
* At start: the PSK for the own PublicIP is loaded into charon.
* Per remote ipsec lease, in upstream's order: three XFRM policies, reqid 11, ESP tunnel mode —
  ``out`` (own subnet → peer subnet, tmpl own PublicIP → peer PublicIP), ``in`` and ``fwd`` (peer
  subnet → own subnet, tmpl peer PublicIP → own PublicIP); the PSK for the peer's PublicIP; an
  IKEv2 connection ``<own PublicIP>-<own subnet>-<peer subnet>-<peer PublicIP>`` (proposal
  aes256-sha256-modp4096, PSK auth both ways, keyingtries 0, encap per UDPEncap) with one child SA
  ``<own subnet>-<peer subnet>`` (the ESPProposal, start_action start, close_action trap,
  dpd_action restart, reqid 11, rekey_time 1h, tunnel mode, policies no: flannel installs them).
  Removal unloads the connection and deletes the three policies.
* On shutdown charon is stopped (its SAs go with it); the policies stay, as upstream's do.
* Beyond upstream (kernelsync's timer, every 10 s): policies and connections of peers gone while
  the daemon was down are removed, deleted policies come back (upstream never restores them), and
  a charon that died is started again with every key and connection reloaded.
"""

from __future__ import annotations

from typing import Any

import structlog

from ..netlink import (
    IPPROTO_ESP,
    XFRM_MODE_TUNNEL,
    Event,
    NetlinkError,
    XfrmPolicy,
    xfrm_delete_policy,
    xfrm_policies,
    xfrm_update_policy,
)
from ..subnet.lease import Lease
from .base import BackendContext, BackendError, BackendInfo, register_backend
from .charon import Charon, CharonError, find_charon
from .kernelsync import KernelPeerBackend, backend_options

log = structlog.get_logger()

DEFAULT_ESP_PROPOSAL = "aes128gcm16-sha256-prfsha256-ecp256"
IKE_PROPOSAL = "aes256-sha256-modp4096"
MIN_PSK_LEN = 96
REQID = 11
OVERHEAD = 77  # outer IP 20, ESP header 8, IV 16, padding up to 15, trailer 2, ICV 16
UDP_ENCAP_OVERHEAD = 8


@register_backend
class IPsecBackend(KernelPeerBackend):
    """The ipsec backend (upstream ``pkg/backend/ipsec``): charon for IKE, XFRM policies per remote
    lease; see the module docstring."""
    type_name = "ipsec"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.psk = ""
        self.udp_encap = False
        self.esp_proposal = DEFAULT_ESP_PROPOSAL
        self.charon: Charon | None = None

    def _read_config(self) -> None:
        o = backend_options(self.ctx, {"UDPEncap": (bool, False), "ESPProposal": (str, DEFAULT_ESP_PROPOSAL),
                                       "PSK": (str, "")}, "IPSEC")
        if len(o["PSK"]) < MIN_PSK_LEN:
            raise BackendError(f"config error, password is too short: PSK needs at least {MIN_PSK_LEN} "
                               "characters (e.g. openssl rand -hex 48)")
        self.psk, self.udp_encap, self.esp_proposal = o["PSK"], o["UDPEncap"], o["ESPProposal"] or DEFAULT_ESP_PROPOSAL
        log.info("ipsec config", udp_encap=self.udp_encap, esp_proposal=self.esp_proposal)

    @property
    def mtu(self) -> int:
        """The MTU for subnet.env: the interface's minus the ESP overhead (77 bytes, 8 more with UDPEncap)."""
        return self.ctx.ext.mtu - OVERHEAD - (UDP_ENCAP_OVERHEAD if self.udp_encap else 0)

    # --- life cycle -----------------------------------------------------------------------------
    async def register(self) -> BackendInfo:
        self._read_config()
        try:
            self.charon = Charon(find_charon())
            await self.charon.start()
        except CharonError as e:
            raise BackendError(str(e)) from None
        return BackendInfo(mtu=self.mtu, backend_type="ipsec")

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        assert self.charon is not None
        try:
            await self.charon.load_shared_key(str(own_lease.attrs.public_ip), self.psk)
        except CharonError as e:
            raise BackendError(f"failed to load PSK: {e}") from None
        log.info("loaded shared key", public_ip=str(own_lease.attrs.public_ip))

    async def close(self) -> None:
        await super().close()
        if self.charon is not None:
            await self.charon.stop()

    def readiness(self) -> tuple[bool, str]:
        if self.charon is not None and not self.charon.alive:
            return False, "charon (the IKE daemon) is not running; restarting it"
        return True, ""

    # --- desired state --------------------------------------------------------------------------
    def usable(self, lease: Lease) -> bool:
        """True when ``lease`` is an ipsec peer that can be programmed now (our own lease is known)."""
        return not self.skip_other_type(lease) and self.own_lease is not None

    def policies(self, peer: Lease) -> list[XfrmPolicy]:
        """Upstream AddIPSECPolicies: out, in, fwd."""
        assert self.own_lease is not None
        me, my_ip = self.own_lease.subnet, self.own_lease.attrs.public_ip
        it, its_ip = peer.subnet, peer.attrs.public_ip
        return [XfrmPolicy(me, it, "out", my_ip, its_ip, REQID),
                XfrmPolicy(it, me, "in", its_ip, my_ip, REQID),
                XfrmPolicy(it, me, "fwd", its_ip, my_ip, REQID)]

    def conn_name(self, peer: Lease) -> str:
        """The charon connection name for ``peer`` (upstream's format:
        ``<our PublicIP>-<our subnet>-<peer subnet>-<peer PublicIP>``)."""
        assert self.own_lease is not None
        o = self.own_lease
        return f"{o.attrs.public_ip}-{o.subnet}-{peer.subnet}-{peer.attrs.public_ip}"

    def conn(self, peer: Lease) -> dict[str, Any]:
        """Upstream LoadConnection's IKE and child SA configuration (VICI load-conn)."""
        assert self.own_lease is not None
        o = self.own_lease
        child = {"local_ts": [str(o.subnet)], "remote_ts": [str(peer.subnet)], "esp_proposals": [self.esp_proposal],
                 "start_action": "start", "close_action": "trap", "dpd_action": "restart", "mode": "tunnel",
                 "reqid": str(REQID), "rekey_time": "1h", "policies": "no"}
        return {"local_addrs": [str(o.attrs.public_ip)], "remote_addrs": [str(peer.attrs.public_ip)],
                "proposals": [IKE_PROPOSAL], "version": "2", "keyingtries": "0",
                "local": {"auth": "psk"}, "remote": {"auth": "psk"},
                "children": {f"{o.subnet}-{peer.subnet}": child}, "encap": "true" if self.udp_encap else "false"}

    def ours(self, p: XfrmPolicy) -> bool:
        """A policy this backend installs: reqid 11, ESP tunnel, between the own subnet and another
        subnet of the Network."""
        if self.own_lease is None or p.reqid != REQID or p.proto != IPPROTO_ESP or p.mode != XFRM_MODE_TUNNEL:
            return False
        me = self.own_lease.subnet
        other = p.dst if p.src == me else p.src if p.dst == me else None
        return other is not None and other != me and other.subnet_of(self.network)

    # --- the event path (upstream order) --------------------------------------------------------
    async def _load_peer(self, peer: Lease) -> None:
        assert self.charon is not None
        try:
            await self.charon.load_shared_key(str(peer.attrs.public_ip), self.psk)
            await self.charon.load_conn(self.conn_name(peer), self.conn(peer))
        except CharonError as e:
            raise NetlinkError(str(e)) from None  # counted like a failed kernel change: retried by reconcile
        log.info("loaded connection", connection=self.conn_name(peer))

    async def ensure_peer(self, lease: Lease) -> None:
        if not self.usable(lease):
            return
        log.info("subnet added", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip))
        for p in self.policies(lease):
            await xfrm_update_policy(p)
        await self._load_peer(lease)

    async def drop_peer(self, lease: Lease) -> None:
        if lease.attrs.backend_type != self.type_name or not self.usable(lease):
            return
        log.info("subnet removed", subnet=str(lease.subnet))
        assert self.charon is not None
        await self.attempt("unload connection", lambda: self._unload(self.conn_name(lease)), subnet=str(lease.subnet))
        for p in self.policies(lease):
            await self.attempt("delete ipsec policy", lambda p=p: xfrm_delete_policy(p), policy=str(p))

    async def _unload(self, name: str) -> None:
        assert self.charon is not None
        try:
            await self.charon.unload_conn(name)
        except CharonError as e:
            raise NetlinkError(str(e)) from None

    # --- reconciliation -------------------------------------------------------------------------
    async def sync_entries(self) -> dict[str, int]:
        changes = {"charon_restarted": 0, "added": 0, "removed": 0}
        if self.own_lease is None or self.charon is None:
            return changes
        if not self.charon.alive:
            log.warning("charon is not running; starting it again")
            try:
                await self.charon.start()
                await self.charon.load_shared_key(str(self.own_lease.attrs.public_ip), self.psk)
            except CharonError as e:
                raise BackendError(str(e)) from None
            changes["charon_restarted"] = 1
        peers = [le for le in self.peers.values() if self.usable(le)]
        want = {p for le in peers for p in self.policies(le)}
        have = {p for p in await xfrm_policies() if self.ours(p)}
        for p in have - want:
            if await self.attempt("stale ipsec policy removal", lambda p=p: xfrm_delete_policy(p), policy=str(p)):
                changes["removed"] += 1
        for p in want - have:
            if await self.attempt("ipsec policy set", lambda p=p: xfrm_update_policy(p), policy=str(p)):
                changes["added"] += 1
        try:
            loaded = await self.charon.conn_names()
        except CharonError as e:
            raise BackendError(str(e)) from None
        prefix = f"{self.own_lease.attrs.public_ip}-{self.own_lease.subnet}-"
        wanted = {self.conn_name(le): le for le in peers}
        for name in {n for n in loaded if n.startswith(prefix)} - wanted.keys():
            if await self.attempt("stale connection unload", lambda n=name: self._unload(n), connection=name):
                changes["removed"] += 1
        for name, le in wanted.items():
            if name not in loaded and await self.attempt("connection load", lambda le=le: self._load_peer(le),
                                                         connection=name):
                changes["added"] += 1
        return changes

    def relevant(self, ev: Event) -> bool:
        return ev.kind == "overrun"  # XFRM changes are not rtnetlink events: the 10 s timer repairs them

