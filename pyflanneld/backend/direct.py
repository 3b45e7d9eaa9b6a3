"""DirectRouting (vxlan, ipip): is a peer's PublicIP on our own link, so that its subnet can be
routed to it directly, without encapsulation? Upstream ``pkg/ip.DirectRouting``: ``ip route get
<PublicIP>`` returns exactly one route and it has no gateway (here: also on the external
interface). The answer is cached per PublicIP; ``keep_only`` drops the answers for peers gone.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

import structlog

from ..netlink import Netlink, NetlinkError

log = structlog.get_logger()


class DirectRouting:
    """Cached ``ip route get`` answers for one external interface (``ext_index``)."""

    def __init__(self, nl: Netlink, ext_index: int) -> None:
        self.nl = nl
        self.ext_index = ext_index
        self._known: dict[IPv4Address, bool] = {}

    async def reachable(self, ip: IPv4Address) -> bool:
        """True when ``ip`` is directly reachable on the external interface; a failed lookup is
        logged and counts as False (the peer then gets the tunnel route)."""
        known = self._known.get(ip)
        if known is None:
            try:
                routes = await self.nl.route_get(ip)
            except NetlinkError as e:
                log.error("direct routing check failed", public_ip=str(ip), error=str(e))
                return False
            known = len(routes) == 1 and routes[0].gateway is None and routes[0].oif == self.ext_index
            self._known[ip] = known
        return known

    def reset(self, ext_index: int) -> None:
        """Forget every answer: the external interface may have changed (new ifindex or address)."""
        self.ext_index = ext_index
        self._known.clear()

    def keep_only(self, live: Iterable[IPv4Address]) -> None:
        """Forget the answers for PublicIPs not in ``live``."""
        keep = set(live)
        self._known = {ip: v for ip, v in self._known.items() if ip in keep}
