"""The flannel device's own address, shared by the tunnel backends (vxlan, ipip, wireguard).

Upstream ``pkg/ip.EnsureV4AddressOnLink`` / ``EnsureV6AddressOnLink`` + ``LinkSetUp``: the device
gets the own subnet's network address as ``/32`` (IPv6: ``/128``; no broadcast or subnet routes; it
is only the source address for host→pod traffic), any other address inside the flannel Network of
that family — or inside the previous run's Network, read from subnet.env — is removed (a previous
lease's), and the link is set up.
"""

from __future__ import annotations

import socket
from ipaddress import ip_interface

import structlog

from ..netlink import IPNetwork, Link, Netlink

log = structlog.get_logger()


async def ensure_own_address(nl: Netlink, dev: Link, subnet: IPNetwork, network: IPNetwork,
                             previous: IPNetwork | None = None) -> Link:
    """Make ``dev`` carry exactly ``<subnet network address>/32`` (``/128`` for an IPv6 subnet) of
    the Network (no address of ``network`` or of ``previous``, the Network before a config change,
    besides it) and be up; returns the link as it is now. Raises NetlinkError."""
    v6 = subnet.version == 6
    want = ip_interface(f"{subnet.network_address}/{128 if v6 else 32}")
    have = await nl.addresses(dev.index, socket.AF_INET6 if v6 else socket.AF_INET)
    for a in have:
        if a != want and (a.ip in network or (previous is not None and a.ip in previous)):
            log.info("removing stale address", device=dev.name, address=str(a))
            await nl.delete_address(dev.index, a)
    if want not in have:
        await nl.add_address(dev.index, want)
    if not dev.up:
        await nl.set_link(dev.index, state="up")
        dev = await nl.link(index=dev.index) or dev
    return dev
