"""Address, MTU, link state and the Network route of the TUN device (upstream ``configureIface``).

Upstream (``pkg/backend/udp/udp_network_amd64.go``): ``AddrAdd(<lease subnet IP>/32)`` — a /32 "so
that no broadcast routes are created" —, ``LinkSetMTU(ext MTU − 28)``, ``LinkSetUp``, then
``RouteAdd(Network dev flannel0 scope universe)`` with EEXIST accepted ("there might be a route for
a subnet already installed by Docker").
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv4Network

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = structlog.get_logger()


def _accept_local(name: str) -> None:
    """``accept_local=1`` on the TUN, so that the ICMP net-unreachable the forwarder writes back
    (source = the TUN's own address, as upstream) is not dropped as a martian by the kernel.
    Upstream does not set it, so there its ICMP never reaches the sender."""
    try:
        with open(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("cannot set accept_local on the TUN; ICMP net unreachable will be dropped",
                    device=name, error=str(e))


class DeviceError(Exception):
    """The TUN device could not be configured; one line naming the step and the cause."""


async def configure_tun(name: str, address: IPv4Address, mtu: int, network: IPv4Network,
                        offload: bool = False) -> int:
    """Configure TUN ``name``; idempotent (a restart finds it configured). Returns its ifindex.

    (``offload`` is accepted for symmetry; the device's GSO limits are left at the kernel's 64 KB:
    a smaller gso_max_size would make the kernel cut pods' forwarded super-packets in software.)
    """
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
        ]
        steps += [
            (f"failed to set interface {name} to UP state", lambda: ipr.link("set", index=index, state="up")),
            (f"failed to add route ({network} -> {name})",
             lambda: ipr.route("add", dst=str(network), oif=index, scope=0, proto=3)),  # proto boot, as netlink.RouteAdd
        ]
        for what, call in steps:
            try:
                await call()
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise DeviceError(f"{what}: {e.args[1] if len(e.args) > 1 else e}") from None
        _accept_local(name)
        return index
    finally:
        ipr.close()
