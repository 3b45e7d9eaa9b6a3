"""Which subnet to try: pure functions over a config and the subnets already taken (no I/O).

Upstream ``subnet/etcd/local_manager.go`` (allocateSubnet, isSubnetConfigCompat,
isIPv6SubnetConfigCompat): each family's candidates are an ascending scan from its SubnetMin to
its SubnetMax that skips subnets overlapping a lease and stops at 100; one is picked at random per
family, independently. IPv4 and IPv6 have the same functions (``…6`` for IPv6);
:func:`choose_subnets` and :func:`lease_compatible` take both families of a config at once, with
IPv4 off (IPv6-only) meaning the IPv4 part upstream writes in the key: :data:`IPV4_OFF_SUBNET`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network

from ..config import NetworkConfig

MAX_CANDIDATES = 100  # upstream picks at random among the first 100 free subnets
# The IPv4 part of an IPv6-only lease: upstream's zero IP4Net (SubnetMin 0, SubnetLen 0), so the
# key reads ``0.0.0.0-0&fd80:0:0:1::-64``.
IPV4_OFF_SUBNET = IPv4Network("0.0.0.0/0")


class Taken:
    """The set of leased subnets of one family, with O(1) checks for the common case (the config's
    prefix length). ``Taken(cfg, subnets)`` for IPv4, :class:`Taken6` for IPv6."""

    def __init__(self, cfg: NetworkConfig, subnets: Iterable[IPv4Network], prefixlen: int | None = None) -> None:
        self.cfg = cfg
        plen = cfg.subnet_len if prefixlen is None else prefixlen
        self.same: set[int] = set()
        self.other: list[IPv4Network | IPv6Network] = []
        for sn in subnets:
            if sn.prefixlen == plen:
                self.same.add(int(sn.network_address))
            else:
                self.other.append(sn)

    def __contains__(self, sn: IPv4Network | IPv6Network) -> bool:
        if int(sn.network_address) in self.same:
            return True
        return any(sn.overlaps(o) for o in self.other)


def _scan(first: int, last: int, plen: int, net_cls: type[IPv4Network] | type[IPv6Network], taken: Taken,
          limit: int) -> list:
    """The first ``limit`` subnets /plen from address ``first`` to ``last`` not in ``taken``.
    Cost: O(len(taken) + limit) steps, whatever the pool's size (2**56 for an IPv6 /8)."""
    size = 1 << ((32 if net_cls is IPv4Network else 128) - plen)
    out = []
    addr = first
    while addr <= last and len(out) < limit:
        sn = net_cls((addr, plen))
        if sn not in taken:
            out.append(sn)
        addr += size
    return out


def free_subnets(cfg: NetworkConfig, taken: Taken, limit: int = MAX_CANDIDATES) -> list[IPv4Network]:
    """The first `limit` free subnets from SubnetMin to SubnetMax, in order (none with IPv4 off)."""
    if cfg.network is None:
        return []
    return _scan(int(cfg.subnet_min), int(cfg.subnet_max), cfg.subnet_len, IPv4Network, taken, limit)


def choose_subnet(cfg: NetworkConfig, taken: Taken, rng: random.Random | None = None) -> IPv4Network | None:
    """A random one of the first 100 free subnets; None when the pool is exhausted."""
    free = free_subnets(cfg, taken)
    if not free:
        return None
    return (rng or random).choice(free)


def pool_size(cfg: NetworkConfig) -> int:
    """How many IPv4 subnets SubnetMin..SubnetMax holds (0 with IPv4 off)."""
    if cfg.network is None:
        return 0
    return (int(cfg.subnet_max) - int(cfg.subnet_min)) // (1 << (32 - cfg.subnet_len)) + 1


# --- IPv6 ---------------------------------------------------------------------------------------


class Taken6(Taken):
    """The leased IPv6 subnets (see :class:`Taken`)."""

    def __init__(self, cfg: NetworkConfig, subnets: Iterable[IPv6Network]) -> None:
        super().__init__(cfg, subnets, cfg.ipv6_subnet_len)  # type: ignore[arg-type]


def free_subnets6(cfg: NetworkConfig, taken: Taken6, limit: int = MAX_CANDIDATES) -> list[IPv6Network]:
    """The first ``limit`` free IPv6 subnets from IPv6SubnetMin to IPv6SubnetMax, in order (none
    with IPv6 off)."""
    if cfg.ipv6_subnet_min is None or cfg.ipv6_subnet_max is None:
        return []
    return _scan(int(cfg.ipv6_subnet_min), int(cfg.ipv6_subnet_max), cfg.ipv6_subnet_len, IPv6Network, taken,
                 limit)


def choose_subnet6(cfg: NetworkConfig, taken: Taken6, rng: random.Random | None = None) -> IPv6Network | None:
    """A random one of the first 100 free IPv6 subnets; None when the pool is exhausted."""
    free = free_subnets6(cfg, taken)
    if not free:
        return None
    return (rng or random).choice(free)


def pool_size6(cfg: NetworkConfig) -> int:
    """How many IPv6 subnets IPv6SubnetMin..IPv6SubnetMax holds (0 with IPv6 off)."""
    if cfg.ipv6_subnet_min is None or cfg.ipv6_subnet_max is None:
        return 0
    return (int(cfg.ipv6_subnet_max) - int(cfg.ipv6_subnet_min)) // (1 << (128 - cfg.ipv6_subnet_len)) + 1


# --- both families --------------------------------------------------------------------------------


def lease_compatible(cfg: NetworkConfig, sn: IPv4Network, sn6: IPv6Network | None) -> bool:
    """Could this config have handed out the lease ``(sn, sn6)``? Upstream's
    isSubnetConfigCompat && isIPv6SubnetConfigCompat, used for reuse by PublicIP and for the
    previous subnet of subnet.env: each enabled family's part in its SubnetMin..SubnetMax with its
    SubnetLen; with IPv6 off the lease must have no IPv6 part, with IPv4 off its IPv4 part is
    :data:`IPV4_OFF_SUBNET` (what upstream writes then)."""
    v4_ok = cfg.contains_subnet(sn) if cfg.enable_ipv4 else sn == IPV4_OFF_SUBNET
    if not cfg.enable_ipv6:
        return v4_ok and sn6 is None
    return v4_ok and sn6 is not None and cfg.contains_subnet6(sn6)


def choose_subnets(cfg: NetworkConfig, taken: Taken, taken6: Taken6,
                   rng: random.Random | None = None) -> tuple[IPv4Network, IPv6Network | None] | None:
    """A new lease's subnets for every enabled family, picked independently (upstream
    allocateSubnet): ``(IPv4 subnet, None)`` for IPv4 only, ``(IPv4, IPv6)`` for dual stack,
    ``(IPV4_OFF_SUBNET, IPv6)`` for IPv6-only. None when an enabled family's pool is exhausted
    (upstream's "out of subnets"); :func:`pool_size`/:func:`pool_size6` say which."""
    if cfg.enable_ipv4:
        sn = choose_subnet(cfg, taken, rng)
        if sn is None:
            return None
    else:
        sn = IPV4_OFF_SUBNET
    if not cfg.enable_ipv6:
        return sn, None
    sn6 = choose_subnet6(cfg, taken6, rng)
    return None if sn6 is None else (sn, sn6)
