"""udp: TUN device ``flannel0`` and a userspace forwarder (upstream ``pkg/backend/udp``).

* register(): MTU = interface MTU − 28 (IP + UDP header); the lease carries no BackendType.
* start(): create the multi-queue TUN, give it ``<lease subnet IP>/32``, the MTU, link up, a route
  for the whole Network through it; start the worker processes (:mod:`pyflanneld.udpfwd`), bound to
  ``<interface IP>:<Port>`` (default 8285).
* peers: every remote lease becomes a route ``subnet → PublicIP:Port`` in the workers — the remote
  port is our own configured port, as upstream; events are not filtered by BackendType (udp
  leases have none).
* reconcile(): restarts a worker that died. close(): stops the workers; the lease stays, and the
  TUN (with its route) goes away with the process, as upstream's.

Environment: ``PYFLANNELD_UDP_WORKERS`` (default: number of CPUs); ``PYFLANNELD_UDP_OFFLOAD=0``
turns off the TCP segmentation/coalescing (virtio-net TUN headers, UDP GSO/GRO, see
:mod:`pyflanneld.udpfwd.offload`) that is on by default — the wire format is the same either way.
"""

from __future__ import annotations

import structlog

from ..subnet.lease import Lease
from ..udpfwd.control import Route
from ..udpfwd.device import DeviceError, configure_tun
from ..udpfwd.supervisor import Forwarder
from ..udpfwd.tun import TunError
from .base import Backend, BackendContext, BackendError, BackendInfo, register_backend

log = structlog.get_logger()

ENCAP_OVERHEAD = 28  # 20 bytes IP header + 8 bytes UDP header
DEFAULT_PORT = 8285
TUN_NAME = "flannel0"


@register_backend
class UdpBackend(Backend):
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

    @property
    def mtu(self) -> int:
        return self.ctx.ext.mtu - ENCAP_OVERHEAD

    async def register(self) -> BackendInfo:
        return BackendInfo(mtu=self.mtu, backend_type="")

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        if self.fwd is not None:  # a new subnet after a lost lease: new TUN address, new workers
            self.fwd.stop()
            self.fwd = None
        fwd = Forwarder(tun_name=TUN_NAME, bind_ip=self.ctx.ext.ip, port=self.port,
                        tun_ip=own_lease.subnet.network_address, mtu=self.mtu)
        try:
            fwd.open_device()
            await configure_tun(TUN_NAME, own_lease.subnet.network_address, self.mtu, self.network,
                                offload=fwd.offload)
        except TunError as e:
            fwd.stop()
            raise BackendError(f"failed to open TUN device: {e.strerror}") from None
        except DeviceError as e:
            fwd.stop()
            raise BackendError(str(e)) from None
        # Spawned from the loop's (main) thread: PR_SET_PDEATHSIG follows the spawning thread.
        fwd.start()
        self.fwd = fwd

    def _route(self, lease: Lease) -> Route:
        return Route(lease.subnet, lease.attrs.public_ip, self.port)

    def _is_own(self, lease: Lease) -> bool:
        return self.own_lease is not None and lease.subnet == self.own_lease.subnet

    async def set_peers(self, leases: list[Lease]) -> None:
        if self.fwd is None:
            return
        self.fwd.set_routes(self._route(le) for le in leases if not self._is_own(le))
        log.debug("udp routes set", count=len(self.fwd.routes))

    async def add_peer(self, lease: Lease) -> None:
        if self.fwd is None or self._is_own(lease):
            return
        self.fwd.add_route(self._route(lease))
        log.info("subnet added", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip))

    async def remove_peer(self, lease: Lease) -> None:
        if self.fwd is None or self._is_own(lease):
            return
        self.fwd.del_route(lease.subnet)
        log.info("subnet removed", subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip))

    async def reconcile(self) -> None:
        if self.fwd is not None:
            self.fwd.check()

    async def close(self) -> None:
        if self.fwd is not None:
            self.fwd.stop()
            self.fwd = None
