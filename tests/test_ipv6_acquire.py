"""The subnet manager's lease acquisition for dual stack and IPv6-only (upstream local_manager.go
tryAcquireLease, per family), against the in-memory store: which key a host writes, what it
reuses, what it keeps when IPv6 is switched on or off. The lab tests (test_ipv6.py) run the same
against etcd and the kernel."""

from __future__ import annotations

import asyncio
import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from lab.memstore import MemStore
from pyflanneld.config import parse_config
from pyflanneld.subnet.lease import LeaseAttrs
from pyflanneld.subnet.manager import PoolExhausted, SubnetManager

P = "/coreos.com/network/subnets/"
DUAL = '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd80::/48","Backend":{"Type":"vxlan"}}'
V4 = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
V6ONLY = '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd80::/48","Backend":{"Type":"vxlan"}}'


def attrs(n: int, v4: bool = True, v6: bool = True) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(f"192.168.100.{n}" if v4 else "0.0.0.0"), backend_type="vxlan",
                      backend_data={"VNI": 1, "VtepMAC": f"02:00:00:00:00:{n:02x}"} if v4 else None,
                      public_ipv6=IPv6Address(f"fd99::{n}") if v6 else None,
                      backend_v6_data={"VNI": 1, "VtepMAC": f"02:00:00:00:06:{n:02x}"} if v6 else None)


def manager(store: MemStore, config: str, **kw) -> SubnetManager:
    return SubnetManager(store, parse_config(config), ttl_s=3600, renew_margin_s=60, rng=random.Random(1), **kw)


def acquire(store: MemStore, config: str, a: LeaseAttrs, **kw) -> str:
    """One host's acquisition; the key it holds (relative to subnets/)."""
    lease = asyncio.run(manager(store, config, **kw).try_acquire(a))
    assert store.value(lease.key) == a.to_json().encode()
    return lease.key


def test_dual_stack_key_is_upstreams_and_each_host_gets_its_own_pair():
    store = MemStore()
    k1, k2 = acquire(store, DUAL, attrs(1)), acquire(store, DUAL, attrs(2))
    assert store.keys() == {k1, k2}
    for k in (k1, k2):
        v4, v6 = k.split("&")
        assert v4.startswith("10.5.") and v4.endswith(".0-24") and v6.startswith("fd80:0:0:") and v6.endswith("::-64")
    assert k1.split("&")[1] != k2.split("&")[1]
    assert acquire(store, DUAL, attrs(1)) == k1  # found again by PublicIP
    assert store.keys() == {k1, k2}


def test_previous_subnets_of_subnet_env_per_family():
    store = MemStore()
    prev4, prev6 = IPv4Network("10.5.7.0/24"), IPv6Network("fd80:0:0:7::/64")
    assert acquire(store, DUAL, attrs(1), prev_subnet=prev4, prev_subnet6=prev6) == "10.5.7.0-24&fd80:0:0:7::-64"
    # another host's previous IPv6 subnet is taken: its IPv4 one is still used, the IPv6 part is new
    k2 = acquire(store, DUAL, attrs(2), prev_subnet=IPv4Network("10.5.8.0/24"), prev_subnet6=prev6)
    assert k2.startswith("10.5.8.0-24&") and not k2.endswith("&fd80:0:0:7::-64")


@pytest.mark.parametrize("before, after", [(V4, DUAL), (DUAL, V4)])
def test_switching_ipv6_on_or_off_keeps_the_ipv4_subnet(before, after):
    """Upstream deletes the host's lease that no longer fits and allocates a new one at random
    (and crashes on an IPv4-only lease when IPv6 is switched on): here the IPv4 subnet stays, even
    without subnet.env."""
    store = MemStore()
    old = acquire(store, before, attrs(1, v6=before == DUAL))
    new = acquire(store, after, attrs(1, v6=after == DUAL))
    assert store.keys() == {new}
    assert new.split("&")[0] == old.split("&")[0]
    assert ("&" in new) == (after == DUAL)


def test_switching_ipv6_on_keeps_a_reservation():
    store = MemStore()
    store.put("10.5.9.0-24", attrs(1, v6=False).to_json().encode(), ttl=False)  # the operator's reservation
    store.put("10.5.10.0-24", attrs(7, v6=False).to_json().encode(), ttl=False)  # another host's: not ours to touch
    key = acquire(store, DUAL, attrs(1))
    assert key.startswith("10.5.9.0-24&fd80:") and not store.has_ttl(key)
    assert store.keys() == {key, "10.5.10.0-24"}


def test_ipv6_only_finds_its_own_lease_by_public_ipv6():
    """Every IPv6-only lease has PublicIP 0.0.0.0: upstream's reuse by PublicIP hands a second host
    the first one's lease. Here a host is found by its PublicIPv6."""
    store = MemStore()
    k1 = acquire(store, V6ONLY, attrs(1, v4=False))
    k2 = acquire(store, V6ONLY, attrs(2, v4=False))
    assert k1 != k2 and k1.startswith("0.0.0.0-0&fd80:") and k2.startswith("0.0.0.0-0&fd80:")
    assert json.loads(store.value(k1))["PublicIPv6"] == "fd99::1"
    assert acquire(store, V6ONLY, attrs(2, v4=False)) == k2
    assert store.keys() == {k1, k2}


def test_out_of_subnets_names_the_family():
    small6 = DUAL.replace("fd80::/48", "fd80::/124")  # /126 subnets: fd80::4, ::8, ::c
    store = MemStore()
    for n in (1, 2, 3):
        acquire(store, small6, attrs(n))
    with pytest.raises(PoolExhausted, match=r"^out of subnets: all 3 /126 IPv6 subnets of fd80::/124 are leased; "
                                            r".*IPv6Network/IPv6SubnetMin/IPv6SubnetMax$"):
        acquire(store, small6, attrs(4))
    small4 = DUAL.replace('"Network":"10.5.0.0/16"', '"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0",'
                                                     '"SubnetMax":"10.5.1.0"')
    store = MemStore()
    acquire(store, small4, attrs(1))
    with pytest.raises(PoolExhausted, match=r"^out of subnets: all 1 /24 subnets of 10.5.0.0/16 are leased"):
        acquire(store, small4, attrs(2))
