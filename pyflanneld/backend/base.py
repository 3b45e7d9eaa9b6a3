"""The backend interface: one class per backend type, registered by name.

Life cycle (driven by the daemon, all on its asyncio loop):

1. ``Backend(ctx)`` — no side effects.
2. ``await register()`` → :class:`BackendInfo` (MTU, lease BackendType, BackendData). Runs before
   the lease is written, so e.g. vxlan creates its device here to know its MAC.
3. ``await start(own_lease)`` — the lease is ours; finish local setup (device address, …).
4. ``await set_peers(leases)`` with the full snapshot of remote leases (never our own), then
   ``await add_peer(lease)`` / ``await remove_peer(lease)`` per event. After a watch resync the
   daemon calls ``set_peers`` again with the new snapshot; backends must make the kernel match it.
5. ``await reconcile()`` every ``reconcile_interval`` seconds (0 = never); ``readiness()`` feeds
   /readyz at any time.
6. ``await close()`` on shutdown: stop background work; kernel state and leases stay.

Backends that only need "make the kernel match this set of peers" can subclass
:class:`PeerSetBackend` and implement ``ensure_peer``/``drop_peer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, ClassVar

import structlog

from ..config import NetworkConfig
from ..subnet.lease import Lease

log = structlog.get_logger()


class BackendError(Exception):
    """A user-facing backend failure: the message names the cause and the fix."""


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    ip: IPv4Address  # the interface's own address
    public_ip: IPv4Address  # what peers use (= ip unless --public-ip)
    mtu: int


@dataclass
class BackendContext:
    config: NetworkConfig
    backend_config: dict[str, Any]  # the "Backend" object, keys as given
    ext: ExternalInterface
    options: Any  # pyflanneld.options.Options


@dataclass(frozen=True)
class BackendInfo:
    mtu: int
    backend_type: str  # goes into the lease's BackendType ("" for udp/alloc, as upstream)
    backend_data: Any = None


class Backend:
    type_name: ClassVar[str] = ""
    reconcile_interval: ClassVar[float] = 0.0

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.own_lease: Lease | None = None

    @property
    def network(self) -> IPv4Network:
        return self.ctx.config.network

    async def register(self) -> BackendInfo:
        raise NotImplementedError

    async def start(self, own_lease: Lease) -> None:
        self.own_lease = own_lease

    async def set_peers(self, leases: list[Lease]) -> None:
        pass

    async def add_peer(self, lease: Lease) -> None:
        pass

    async def remove_peer(self, lease: Lease) -> None:
        pass

    async def reconcile(self) -> None:
        pass

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not) for /readyz, beyond the lease: e.g. a cloud route not yet in place."""
        return True, ""

    async def close(self) -> None:
        pass


class PeerSetBackend(Backend):
    """A backend whose kernel state is a function of the set of peer leases."""

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.peers: dict[IPv4Network, Lease] = {}

    async def set_peers(self, leases: list[Lease]) -> None:
        new = {le.subnet: le for le in leases}
        for sn, old in list(self.peers.items()):
            if sn not in new:
                await self.remove_peer(old)
        for le in leases:
            if self.peers.get(le.subnet) != le:
                await self.add_peer(le)

    async def add_peer(self, lease: Lease) -> None:
        old = self.peers.get(lease.subnet)
        if old is not None and old.attrs != lease.attrs:
            await self._safe(self.drop_peer, old)
        self.peers[lease.subnet] = lease
        await self._safe(self.ensure_peer, lease)

    async def remove_peer(self, lease: Lease) -> None:
        old = self.peers.pop(lease.subnet, None)
        await self._safe(self.drop_peer, old or lease)

    async def _safe(self, fn, lease: Lease) -> None:
        """One bad peer never stops the others: log and carry on (reconcile retries)."""
        try:
            await fn(lease)
        except Exception as e:  # noqa: BLE001
            log.warning("peer programming failed", subnet=str(lease.subnet),
                        public_ip=str(lease.attrs.public_ip), fn=fn.__name__, error=str(e))

    async def ensure_peer(self, lease: Lease) -> None:
        raise NotImplementedError

    async def drop_peer(self, lease: Lease) -> None:
        raise NotImplementedError


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.type_name.lower()] = cls
    return cls


def backend_class(type_name: str) -> type[Backend]:
    from . import load_all  # noqa: F401  (import side effect: registrations)

    try:
        return _REGISTRY[type_name.lower()]
    except KeyError:
        raise BackendError(f"unknown backend type: {type_name}") from None


def registered_types() -> list[str]:
    from . import load_all  # noqa: F401

    return sorted(_REGISTRY)
