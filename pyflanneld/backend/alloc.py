"""alloc: lease a subnet, program nothing (upstream `pkg/backend/alloc`).

It still tracks the peer set, so /peers on the health server shows what this host knows.
"""

from .base import BackendInfo, PeerSetBackend, register_backend


@register_backend
class AllocBackend(PeerSetBackend):
    """The alloc backend (upstream ``pkg/backend/alloc``): only holds a lease and writes subnet.env;
    programs nothing (MTU the interface's, BackendType "", IPv4 and IPv6)."""
    type_name = "alloc"
    ipv6 = True  # nothing to program: a dual-stack or IPv6-only lease and subnet.env are all it does

    async def register(self) -> BackendInfo:
        return BackendInfo(mtu=self.ctx.ext.mtu, backend_type="")

    async def ensure_peer(self, lease) -> None:
        pass

    async def drop_peer(self, lease) -> None:
        pass
