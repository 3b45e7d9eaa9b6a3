"""alloc: lease a subnet, program nothing (upstream `pkg/backend/alloc`)."""

from .base import Backend, BackendInfo, register_backend


@register_backend
class AllocBackend(Backend):
    type_name = "alloc"

    async def register(self) -> BackendInfo:
        return BackendInfo(mtu=self.ctx.ext.mtu, backend_type="")
