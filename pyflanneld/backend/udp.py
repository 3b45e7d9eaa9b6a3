"""udp: TUN device ``flannel0`` and a userspace forwarder (upstream ``pkg/backend/udp``).

* register(): MTU = interface MTU − 28 (IP + UDP header); the lease carries no BackendType.
* start(): create the multi-queue TUN, give it ``<lease subnet IP>/32``, the MTU, link up, a route
  for the whole Network through it; start the worker processes (:mod:`pyflanneld.udpfwd`), bound to
  ``<interface IP>:<Port>`` (default 8285), with the routes of every known peer. Called again after
  a subnet or interface change: the old workers stop (in a thread: the loop never waits on them)
  and new ones start with the whole peer set.
* peers: every remote lease becomes a route ``subnet → PublicIP:Port`` in the workers — the remote
  port is our own configured port, as upstream; events are not filtered by BackendType (udp
  leases have none). A full pass (``resync``) sends the whole table and restarts dead workers.
* close(): stops the workers; the lease stays, and the TUN (with its route) goes away with the
  process, as upstream's.

Environment: ``PYFLANNELD_UDP_WORKERS`` (default: number of CPUs); ``PYFLANNELD_UDP_OFFLOAD=0``
turns off the TCP segmentation/coalescing (virtio-net TUN headers, UDP GSO/GRO, see
:mod:`pyflanneld.udpfwd.offload`) that is on by default — the wire format is the same either way.
"""

from __future__ import annotations

import structlog

from ..subnet.lease import Lease
from ..udpfwd.control import Route
from ..udpfwd.device import DeviceError, configure_tun
from ..udpfwd.supervisor import Forwarder, add_counters
from ..udpfwd.tun import TunError
from .base import (
    BackendContext,
    BackendError,
    BackendInfo,
    PeerSetBackend,
    in_daemon_thread,
    register_backend,
)

log = structlog.get_logger()

ENCAP_OVERHEAD = 28  # 20 bytes IP header + 8 bytes UDP header
DEFAULT_PORT = 8285
TUN_NAME = "flannel0"


@register_backend
class UdpBackend(PeerSetBackend):
    """The udp backend (upstream ``pkg/backend/udp``): TUN ``flannel0`` and userspace forwarder
    processes holding a route per remote lease; see the module docstring."""
    type_name = "udp"
    reconcile_interval = 5.0

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        port = ctx.config.backend_option("Port", DEFAULT_PORT)
        if isinstance(port, bool) or not isinstance(port, (int, float)) or int(port) != port \
                or not 0 <= int(port) <= 65535:
            raise BackendError(f"udp backend: invalid Port {port!r}: use a number 1-65535 (default 8285)")
        self.port = int(port) or DEFAULT_PORT
        self.fwd: Forwarder | None = None
        self._counted: dict[str, int] = {}  # the counters of the forwarders this daemon stopped

    @property
    def mtu(self) -> int:
        """The MTU for subnet.env and flannel0: the interface's minus 28 bytes (IP + UDP headers)."""
        return self.ctx.ext.mtu - ENCAP_OVERHEAD

    async def register(self) -> BackendInfo:
        return BackendInfo(mtu=self.mtu, backend_type="")

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        await self._stop_forwarder()  # a new subnet or interface: new TUN address, new workers
        fwd = Forwarder(tun_name=TUN_NAME, bind_ip=self.ctx.ext.ip, port=self.port,
                        tun_ip=own_lease.subnet.network_address, mtu=self.mtu)
        try:
            fwd.open_device()
            await configure_tun(TUN_NAME, own_lease.subnet.network_address, self.mtu, self.network,
                                offload=fwd.offload)
        except TunError as e:
            await in_daemon_thread(fwd.stop)
            raise BackendError(f"failed to open TUN device: {e.strerror}") from None
        except DeviceError as e:
            await in_daemon_thread(fwd.stop)
            raise BackendError(str(e)) from None
        fwd.routes = {le.subnet: self._route(le) for le in self.peers.values()}  # the workers start with them
        # Spawned from the loop's (main) thread: PR_SET_PDEATHSIG follows the spawning thread.
        fwd.start()
        self.fwd = fwd

    def _route(self, lease: Lease) -> Route:
        return Route(lease.subnet, lease.attrs.public_ip, self.port)

    async def ensure_peer(self, lease: Lease) -> None:
        if self.fwd is not None:
            self.fwd.add_route(self._route(lease))
        log.info("subnet added", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip))

    async def drop_peer(self, lease: Lease) -> None:
        if self.fwd is not None:
            self.fwd.del_route(lease.subnet)
        log.info("subnet removed", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip))

    async def resync(self, reason: str) -> None:
        if self.fwd is None:
            return
        async with self.fwd.polling:  # a restart closes the control socket of the dead worker
            self.fwd.check()
        routes = {le.subnet: self._route(le) for le in self.peers.values()}
        if routes != self.fwd.routes:
            self.fwd.set_routes(routes.values())
            log.info("udp routes set", reason=reason, count=len(routes))

    async def close(self) -> None:
        await self._stop_forwarder()

    async def forwarder_counters(self) -> dict[str, int]:
        """The workers' packet counters, summed over every forwarder this daemon ran."""
        total = dict(self._counted)
        if self.fwd is not None:
            add_counters(total, await self.fwd.poll_counters())
        return total

    async def _stop_forwarder(self) -> None:
        """Stop the workers without blocking the loop (Forwarder.stop waits up to a few seconds)."""
        fwd, self.fwd = self.fwd, None
        if fwd is not None:
            async with fwd.polling:
                await in_daemon_thread(fwd.stop)
            add_counters(self._counted, fwd.totals())
