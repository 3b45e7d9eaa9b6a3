"""Address, MTU, link state and the Network route of the TUN device (upstream ``configureIface``).

Upstream (``pkg/backend/udp/udp_network_amd64.go``): ``AddrAdd(<lease subnet IP>/32)`` — a /32 "so
that no broadcast routes are created" —, ``LinkSetMTU(ext MTU − 28)``, ``LinkSetUp``, then
``RouteAdd(Network dev flannel0 scope universe)`` with EEXIST accepted ("there might be a route for
a subnet already installed by Docker").
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from ..netlink import Netlink, NetlinkError, Route, write_sysctl


class DeviceError(Exception):
    """The TUN device could not be configured; one line naming the step and the cause."""


async def configure_tun(name: str, address: IPv4Address, mtu: int, network: IPv4Network,
                        offload: bool = False) -> int:
    """Configure TUN ``name``: ``address``/32, ``mtu`` bytes, up, a route for ``network`` through
    it (one already there is kept); idempotent (a restart finds it configured). Returns its
    ifindex; raises DeviceError naming the failed step.

    Beyond upstream, ``accept_local=1`` on the TUN, so that the ICMP net-unreachable the forwarder
    writes back (source = the TUN's own address, as upstream) is not dropped as a martian (upstream
    does not set it: there its ICMP never reaches the sender); failing that is a warning.

    (``offload`` is accepted for symmetry; the device's GSO limits are left at the kernel's 64 KB:
    a smaller gso_max_size would make the kernel cut pods' forwarded super-packets in software.)
    """
    async with Netlink() as nl:
        try:
            link = await nl.link(name=name)
        except NetlinkError as e:
            raise DeviceError(f"failed to lookup interface {name}: {e}") from None
        if link is None:
            raise DeviceError(f"failed to lookup interface {name}")
        index = link.index
        steps = [
            (f"failed to add IP address {address}/32 to {name}",
             lambda: nl.add_address(index, IPv4Interface(f"{address}/32"))),
            (f"failed to set MTU for {name}", lambda: nl.set_link(index, mtu=mtu)),
            (f"failed to set interface {name} to UP state", lambda: nl.set_link(index, state="up")),
            (f"failed to add route ({network} -> {name})",  # scope universe, proto boot: netlink.RouteAdd
             lambda: nl.add_route(Route(dst=network, oif=index), scope=0)),
        ]
        for what, call in steps:
            try:
                await call()
            except NetlinkError as e:
                raise DeviceError(f"{what}: {e}") from None
    write_sysctl(f"net/ipv4/conf/{name}/accept_local", "1", device=name,
                 warning="cannot set accept_local on the TUN; ICMP net unreachable will be dropped")
    return index
