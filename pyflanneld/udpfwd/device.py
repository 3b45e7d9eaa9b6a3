"""Address, MTU, link state and the Network route of the TUN device (upstream ``configureIface``).

Upstream (``pkg/backend/udp/udp_network_amd64.go``): ``AddrAdd(<lease subnet IP>/32)`` — a /32 "so
that no broadcast routes are created" —, ``LinkSetMTU(ext MTU − 28)``, ``LinkSetUp``, then
``RouteAdd(Network dev flannel0 scope universe)`` with EEXIST accepted ("there might be a route for
a subnet already installed by Docker").
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError


class DeviceError(Exception):
    """The TUN device could not be configured; one line naming the step and the cause."""


async def configure_tun(name: str, address: IPv4Address, mtu: int, network: IPv4Network) -> int:
    """Configure TUN ``name``; idempotent (a restart finds it configured). Returns its ifindex."""
    ipr = AsyncIPRoute()
    try:
        idx = await ipr.link_lookup(ifname=name)
        if not idx:
            raise DeviceError(f"failed to lookup interface {name}")
        index = idx[0]
        steps = [
            (f"failed to add IP address {address}/32 to {name}",
             lambda: ipr.addr("add", index=index, address=str(address), prefixlen=32)),
            (f"failed to set MTU for {name}", lambda: ipr.link("set", index=index, mtu=mtu)),
            (f"failed to set interface {name} to UP state", lambda: ipr.link("set", index=index, state="up")),
            (f"failed to add route ({network} -> {name})",
             lambda: ipr.route("add", dst=str(network), oif=index, scope=0)),
        ]
        for what, call in steps:
            try:
                await call()
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise DeviceError(f"{what}: {e.args[1] if len(e.args) > 1 else e}") from None
        return index
    finally:
        ipr.close()
