"""Which subnet to try: pure functions over a config and the subnets already taken (no I/O)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from ..config import NetworkConfig

MAX_CANDIDATES = 100  # upstream picks at random among the first 100 free subnets


class Taken:
    """The set of leased subnets, with O(1) checks for the common case (same prefix length)."""

    def __init__(self, cfg: NetworkConfig, subnets: Iterable[IPv4Network]) -> None:
        self.cfg = cfg
        self.same: set[int] = set()
        self.other: list[IPv4Network] = []
        for sn in subnets:
            if sn.prefixlen == cfg.subnet_len:
                self.same.add(int(sn.network_address))
            else:
                self.other.append(sn)

    def __contains__(self, sn: IPv4Network) -> bool:
        if int(sn.network_address) in self.same:
            return True
        return any(sn.overlaps(o) for o in self.other)


def free_subnets(cfg: NetworkConfig, taken: Taken, limit: int = MAX_CANDIDATES) -> list[IPv4Network]:
    """The first `limit` free subnets from SubnetMin to SubnetMax, in order."""
    size = 1 << (32 - cfg.subnet_len)
    out: list[IPv4Network] = []
    addr, last = int(cfg.subnet_min), int(cfg.subnet_max)
    while addr <= last and len(out) < limit:
        sn = IPv4Network((addr, cfg.subnet_len))
        if sn not in taken:
            out.append(sn)
        addr += size
    return out


def choose_subnet(cfg: NetworkConfig, taken: Taken, rng: random.Random | None = None) -> IPv4Network | None:
    """A random one of the first 100 free subnets; None when the pool is exhausted."""
    free = free_subnets(cfg, taken)
    if not free:
        return None
    return (rng or random).choice(free)


def pool_size(cfg: NetworkConfig) -> int:
    return (int(cfg.subnet_max) - int(cfg.subnet_min)) // (1 << (32 - cfg.subnet_len)) + 1


def subnet_of(ip: IPv4Address, cfg: NetworkConfig) -> IPv4Network:
    return IPv4Network((int(ip), cfg.subnet_len), strict=False)
