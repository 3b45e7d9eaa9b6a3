"""The daemon's one interface to flannel's masquerade/forward rules (upstream ``pkg/trafficmngr``).

:func:`traffic_manager` picks the implementation from the network config, as upstream does:
``EnableNFTables: true`` → :class:`pyflanneld.nftables.NftRules`, otherwise
:class:`pyflanneld.iptables.TrafficRules`. Whichever is chosen removes at start what the other
mode left on the host (a host switched from one mode to the other ends with only the current
mode's rules). The daemon never branches on the mode beyond this choice.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any, Protocol

from .config import NetworkConfig
from .iptables import TrafficRules, remove_chains
from .nftables import NftRules, remove_tables
from .rulecmd import RulesError

__all__ = ["RulesError", "TrafficManager", "traffic_manager"]


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


def traffic_manager(config: NetworkConfig, options: Any, own_subnet: IPv4Network,
                    prev_network: IPv4Network | None = None,
                    prev_subnet: IPv4Network | None = None) -> TrafficManager:
    """The rules manager for ``config`` and the daemon's ``options`` (``ip_masq``,
    ``ip_masq_fully_random_disable``, ``iptables_forward_rules``, ``iptables_resync``).
    ``prev_network``/``prev_subnet`` (from the previous subnet.env) let iptables mode remove
    rules of an earlier Network or subnet; nftables mode replaces whole tables and needs neither."""
    common = dict(network=config.network, own_subnet=own_subnet, ip_masq=options.ip_masq,
                  fully_random=not options.ip_masq_fully_random_disable,
                  forward_rules=options.iptables_forward_rules, resync=options.iptables_resync)
    if config.enable_nftables:
        return NftRules(**common, cleanup=remove_chains)
    return TrafficRules(**common, prev_network=prev_network, prev_subnet=prev_subnet, cleanup=remove_tables)
