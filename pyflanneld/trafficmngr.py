"""The daemon's one interface to flannel's masquerade/forward rules (upstream ``pkg/trafficmngr``).

:func:`traffic_manager` picks the implementation from the network config, as upstream does:
``EnableNFTables: true`` → :class:`pyflanneld.nftables.NftRules`, otherwise
:class:`pyflanneld.iptables.TrafficRules`. Whichever is chosen removes at start what the other
mode left on the host (a host switched from one mode to the other ends with only the current
mode's rules). The daemon never branches on the mode beyond this choice.

IPv6 (dual stack or IPv6-only): the same rules for the IPv6 network — nftables puts them into its
``ip6 flannel-ipv6`` table, iptables mode runs a second :class:`~pyflanneld.iptables.TrafficRules`
with ``ip6tables`` (:class:`FamilyRules` drives both as one manager).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Protocol

from .config import NetworkConfig
from .iptables import TrafficRules, remove_chains
from .nftables import NftRules, remove_tables
from .rulecmd import RulesError

__all__ = ["FamilyRules", "RulesError", "TrafficManager", "traffic_manager"]


class TrafficManager(Protocol):
    """What the daemon drives (both implementations; rules stay in place after ``close``)."""

    async def setup(self) -> None:
        """Install the rules (after the lease, before subnet.env) and remove the other mode's.
        Raises RulesError only when the mode cannot work at all (e.g. nft missing)."""

    async def ensure(self) -> bool:
        """Check and repair now; True when everything is in place. Never raises."""

    async def check(self) -> bool:
        """True when the rules are exactly in place (changes nothing)."""

    async def run(self) -> None:
        """The resync loop (every ``--iptables-resync`` seconds) until ``close``; run it as a task."""

    async def close(self) -> None:
        """Stop the resync loop; the rules stay."""


class FamilyRules(TrafficManager):
    """Several traffic managers driven as one (the iptables and the ip6tables rules of a
    dual-stack host): ``setup``, ``ensure``, ``check`` and ``close`` call each in order (``ensure``
    every one even after a failure), ``run`` runs their resync loops side by side."""

    def __init__(self, managers: Sequence[TrafficManager]) -> None:
        self.managers = list(managers)

    async def setup(self) -> None:
        for m in self.managers:
            await m.setup()

    async def ensure(self) -> bool:
        results = [await m.ensure() for m in self.managers]
        return all(results)

    async def check(self) -> bool:
        for m in self.managers:
            if not await m.check():
                return False
        return True

    async def run(self) -> None:
        await asyncio.gather(*(m.run() for m in self.managers))

    async def close(self) -> None:
        for m in self.managers:
            await m.close()


def traffic_manager(config: NetworkConfig, options: Any, own_subnet: IPv4Network | None,
                    prev_network: IPv4Network | None = None,
                    prev_subnet: IPv4Network | None = None, *,
                    own_subnet6: IPv6Network | None = None,
                    prev_network6: IPv6Network | None = None,
                    prev_subnet6: IPv6Network | None = None) -> TrafficManager:
    """The rules manager for ``config`` and the daemon's ``options`` (``ip_masq``,
    ``ip_masq_fully_random_disable``, ``iptables_forward_rules``, ``iptables_resync_s``).
    ``prev_network``/``prev_subnet`` (from the previous subnet.env) let iptables mode remove
    rules of an earlier Network or subnet; nftables mode replaces whole tables and needs neither.

    IPv6: with ``config.ipv6_network`` set (EnableIPv6) and ``own_subnet6`` (the lease's IPv6
    subnet) given, the IPv6 network's rules too; ``prev_network6``/``prev_subnet6`` from
    FLANNEL_IPV6_* (subnetenv.previous_ipv6). IPv4 rules need ``config.network`` (None when
    IPv4 is off) and ``own_subnet``."""
    common = dict(ip_masq=options.ip_masq, fully_random=not options.ip_masq_fully_random_disable,
                  forward_rules=options.iptables_forward_rules, resync_s=options.iptables_resync_s)
    v4 = config.network is not None and own_subnet is not None
    v6 = config.ipv6_network is not None and own_subnet6 is not None
    if config.enable_nftables:
        return NftRules(config.network if v4 else None, own_subnet if v4 else None, **common,
                        cleanup=_remove_iptables_chains(v6), network6=config.ipv6_network if v6 else None,
                        own_subnet6=own_subnet6 if v6 else None)
    managers: list[TrafficManager] = []
    if v4:
        managers.append(TrafficRules(config.network, own_subnet, **common, prev_network=prev_network,
                                     prev_subnet=prev_subnet))
    if v6:
        managers.append(TrafficRules(config.ipv6_network, own_subnet6, **common, prev_network=prev_network6,
                                     prev_subnet=prev_subnet6, iptables="ip6tables",
                                     iptables_restore="ip6tables-restore"))
    if not managers:
        raise ValueError("traffic_manager needs the own subnet of at least one enabled IP family")
    managers[-1].cleanup = remove_tables  # once, after every family's rules are in place
    return managers[0] if len(managers) == 1 else FamilyRules(managers)


def _remove_iptables_chains(ipv6: bool) -> Callable[[], Awaitable[None]]:
    """nftables mode's cleanup: flannel's iptables chains, and its ip6tables chains when IPv6 is on."""
    async def cleanup() -> None:
        await remove_chains()
        if ipv6:
            await remove_chains("ip6tables", "ip6tables-restore")

    return cleanup
