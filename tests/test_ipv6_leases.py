"""IPv6 leases, pure parts (issue 13.3): keys, lease JSON, allocation and the LeaseBook's IPv6 checks.

Formats are upstream's (pkg/subnet MakeSubnetKey/ParseSubnetKey, pkg/lease LeaseAttrs, pkg/ip
IP6.String); allocation mirrors subnet/etcd/local_manager.go; the gate's invariants are checked with
hypothesis like the IPv4 ones in test_leasebook.py. No etcd, no kernel.
"""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from pyflanneld.config import parse_config
from pyflanneld.subnet.allocate import (
    IPV4_OFF_SUBNET,
    MAX_CANDIDATES,
    Taken,
    Taken6,
    choose_subnet6,
    choose_subnets,
    free_subnets6,
    lease_compatible,
    pool_size,
    pool_size6,
)
from pyflanneld.subnet.lease import (
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    check_backend_v6_data,
    go_ip6_text,
    parse_subnet_key,
    subnet_key,
)
from pyflanneld.subnet.leasebook import LeaseBook
from pyflanneld.subnet.store import Record

DUAL = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd80::/48","Backend":{"Type":"vxlan"}}')
V6ONLY = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd80::/48","Backend":{"Type":"vxlan"}}')
V4ONLY = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
PREFIX = "/coreos.com/network"
TYPES = ("vxlan", "host-gw", "udp")


# --- keys ---------------------------------------------------------------------------------------------
def test_dual_stack_and_ipv6_only_keys_are_upstreams():
    sn, sn6 = IPv4Network("10.5.1.0/24"), IPv6Network("fd80:0:0:1::/64")
    assert subnet_key(sn, sn6) == "10.5.1.0-24&fd80:0:0:1::-64"
    assert subnet_key(IPV4_OFF_SUBNET, sn6) == "0.0.0.0-0&fd80:0:0:1::-64"  # upstream's zero IP4Net
    assert parse_subnet_key("/coreos.com/network/subnets/0.0.0.0-0&fd80:0:0:1::-64") == (IPV4_OFF_SUBNET, sn6)
    assert parse_subnet_key("10.5.1.0-24&fd80:0:0:1::-64") == (sn, sn6)


@pytest.mark.parametrize("addr,go", [
    ("fd80:0:0:1::", "fd80:0:0:1::"),
    ("2001:db8::10", "2001:db8::10"),
    ("::", "::"),
    ("::abc", "::abc"),  # below 2**24: Go prints it as IPv6
    ("::1.2.3.4", "1.2.3.4"),  # [2**24, 2**32): upstream's big.Int bytes are 4 long → IPv4 text
    ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped: Go's net.IP prints it as IPv4
    ("1:0:0:1:0:0:0:1", "1:0:0:1::1"),  # the longest run of zeros is compressed
    ("1:0:0:1:0:0:1:1", "1::1:0:0:1:1"),  # on a tie, the first
    ("1:0:1:1:1:1:1:1", "1:0:1:1:1:1:1:1"),  # a single zero group stays
])
def test_ipv6_text_is_gos(addr, go):
    assert go_ip6_text(IPv6Address(addr)) == go


@pytest.mark.parametrize("bad", [
    "10.5.1.0-24&FD80:0:0:1::-64",  # upstream's regex: lower case only
    "10.5.1.0-24&fd80:0:0:1::-128",  # 7 bits
    "10.5.1.0-24&fd80:0:0:1::1-64",  # host bits
    "10.5.1.0-24&1.2.3.4-126",  # what Go prints for ::102:304 — upstream cannot read it either
    "10.5.1.0-24&fd80::-64&fd81::-64",
])
def test_bad_dual_stack_keys(bad):
    with pytest.raises(LeaseFormatError):
        parse_subnet_key(bad)


# --- lease JSON -----------------------------------------------------------------------------------
UPSTREAM_DUAL = ('{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:fe"},'
                 '"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}')
UPSTREAM_V6ONLY = ('{"PublicIP":"0.0.0.0","PublicIPv6":"fd99::2","BackendType":"vxlan",'
                   '"BackendV6Data":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:02"}}')
UPSTREAM_HOSTGW = '{"PublicIP":"192.168.100.2","PublicIPv6":"fd99::2","BackendType":"host-gw"}'


@pytest.mark.parametrize("raw", [UPSTREAM_DUAL, UPSTREAM_V6ONLY, UPSTREAM_HOSTGW])
def test_lease_json_round_trips_byte_for_byte(raw):
    assert LeaseAttrs.from_json(raw).to_json() == raw


def test_lease_json_fields_in_upstreams_order_and_omissions():
    a = LeaseAttrs(IPv4Address("0.0.0.0"), "vxlan", None, IPv6Address("fd99::2"), {"VNI": 1, "VtepMAC": "0e:2a:00:00:00:02"})
    assert a.to_json() == UPSTREAM_V6ONLY  # BackendData omitted (empty), PublicIPv6 set
    assert LeaseAttrs(IPv4Address("10.0.0.1"), "host-gw", None, IPv6Address("::ffff:10.0.0.2")).to_json() == \
        '{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.2","BackendType":"host-gw"}'  # Go's text


@pytest.mark.parametrize("pub6,problem", [
    ('""', "PublicIPv6: \"\" is not an IPv6 address"),
    ('"10.0.0.1"', "PublicIPv6: \"10.0.0.1\" is not an IPv6 address"),
    ('"fe80::1%eth0"', "is not an IPv6 address"),
    ('"zz::1"', "is not an IPv6 address"),
    ("[]", "PublicIPv6: an array is not an IPv6 address"),
])
def test_bad_public_ipv6(pub6, problem):
    with pytest.raises(LeaseFormatError, match=problem.replace("[", r"\[")):
        LeaseAttrs.from_json('{"PublicIP":"192.168.100.2","PublicIPv6":%s}' % pub6)


def test_backend_v6_data_checks_name_the_field():
    assert check_backend_v6_data("vxlan", {"VNI": 1, "VtepMAC": "0e:2a:00:00:00:02"}) is None
    assert check_backend_v6_data("vxlan", None) == "BackendV6Data: a vxlan lease needs an object with VtepMAC"
    assert check_backend_v6_data("vxlan", {"VtepMAC": "01:00:5e:00:00:01"}) == \
        "BackendV6Data.VtepMAC: 01:00:5e:00:00:01 is a multicast address"
    assert check_backend_v6_data("host-gw", None) is None


# --- allocation -----------------------------------------------------------------------------------
def test_free_ipv6_subnets_skip_taken_and_other_sizes():
    taken = Taken6(DUAL, [IPv6Network("fd80:0:0:1::/64"), IPv6Network("fd80:0:0:4::/63")])
    assert [str(s) for s in free_subnets6(DUAL, taken, limit=3)] == \
        ["fd80:0:0:2::/64", "fd80:0:0:3::/64", "fd80:0:0:6::/64"]


def test_choose_ipv6_is_random_among_first_100():
    rng = random.Random(1)
    picks = {choose_subnet6(DUAL, Taken6(DUAL, []), rng) for _ in range(500)}
    assert picks <= set(free_subnets6(DUAL, Taken6(DUAL, []), MAX_CANDIDATES)) and len(picks) > 50


def test_pool_sizes_and_exhaustion():
    small = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd80::/124"}')
    assert (pool_size(small), pool_size6(small)) == (255, 3)  # fd80::4, ::8, ::c
    full6 = Taken6(small, [IPv6Network(f"fd80::{i:x}/126") for i in (4, 8, 12)])
    assert choose_subnet6(small, full6) is None
    assert choose_subnets(small, Taken(small, []), full6) is None  # upstream: "out of subnets"
    assert (pool_size(V6ONLY), pool_size6(V6ONLY), pool_size6(V4ONLY)) == (0, 65535, 0)


def test_choose_subnets_per_mode():
    rng = random.Random(3)
    sn, sn6 = choose_subnets(DUAL, Taken(DUAL, []), Taken6(DUAL, []), rng)
    assert DUAL.contains_subnet(sn) and DUAL.contains_subnet6(sn6)
    sn, sn6 = choose_subnets(V6ONLY, Taken(V6ONLY, []), Taken6(V6ONLY, []), rng)
    assert sn == IPV4_OFF_SUBNET and V6ONLY.contains_subnet6(sn6)
    sn, sn6 = choose_subnets(V4ONLY, Taken(V4ONLY, []), Taken6(V4ONLY, []), rng)
    assert V4ONLY.contains_subnet(sn) and sn6 is None


@pytest.mark.parametrize("cfg,sn,sn6,ok", [
    (DUAL, "10.5.1.0/24", "fd80:0:0:1::/64", True),
    (DUAL, "10.5.1.0/24", None, False),  # upstream: no IPv6 part is not compatible with IPv6 on
    (DUAL, "10.5.1.0/24", "fd80::/64", False),  # below IPv6SubnetMin
    (DUAL, "10.5.1.0/24", "fd80:0:0:1::/65", False),
    (DUAL, "10.5.0.0/24", "fd80:0:0:1::/64", False),
    (V4ONLY, "10.5.1.0/24", None, True),
    (V4ONLY, "10.5.1.0/24", "fd80:0:0:1::/64", False),  # upstream: IPv6 off wants no IPv6 part
    (V6ONLY, "0.0.0.0/0", "fd80:0:0:1::/64", True),
    (V6ONLY, "10.5.1.0/24", "fd80:0:0:1::/64", False),
    (V6ONLY, "0.0.0.0/0", None, False),
])
def test_lease_compatible_is_upstreams_pair_of_checks(cfg, sn, sn6, ok):
    assert lease_compatible(cfg, IPv4Network(sn), IPv6Network(sn6) if sn6 else None) is ok


@settings(max_examples=200, deadline=None)
@given(st.integers(48, 118), st.integers(2, 8), st.lists(st.integers(0, 40), max_size=30),
       st.lists(st.tuples(st.integers(0, 40), st.integers(-2, 2)), max_size=5))
def test_free_ipv6_subnets_are_the_first_untaken_ones(plen, extra, idx, others):
    cfg = parse_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True,
                                   "IPv6Network": f"fd80::/{plen}", "IPv6SubnetLen": plen + extra}))
    size = 1 << (128 - cfg.ipv6_subnet_len)
    base = int(cfg.ipv6_subnet_min)
    taken_nets = [IPv6Network((base + i * size, cfg.ipv6_subnet_len)) for i in idx]
    taken_nets += [IPv6Network((base + i * size, min(128, max(plen, cfg.ipv6_subnet_len + d))), strict=False)
                   for i, d in others]
    taken = Taken6(cfg, taken_nets)
    free = free_subnets6(cfg, taken, limit=10)
    assert free == sorted(free)
    for sn in free:
        assert cfg.contains_subnet6(sn)
        assert not any(sn.overlaps(t) for t in taken_nets)
    # nothing free was skipped before the last one returned
    last = int(free[-1].network_address) if free else base - size
    for a in range(base, last, size):
        sn = IPv6Network((a, cfg.ipv6_subnet_len))
        assert sn in free or any(sn.overlaps(t) for t in taken_nets)


# --- the LeaseBook's IPv6 checks -------------------------------------------------------------------
def dual(ip: str, ip6: str | None, mac: str, mac6: str | None) -> str:
    """A dual-stack vxlan lease value as upstream writes it."""
    d = {"PublicIP": ip, "PublicIPv6": ip6, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}}
    if mac6 is not None:
        d["BackendV6Data"] = {"VNI": 1, "VtepMAC": mac6}
    return json.dumps(d, separators=(",", ":"))


def v6only(ip6: str, mac6: str) -> str:
    return json.dumps({"PublicIP": "0.0.0.0", "PublicIPv6": ip6, "BackendType": "vxlan",
                       "BackendV6Data": {"VNI": 1, "VtepMAC": mac6}}, separators=(",", ":"))


def rec(key: str, value: str, create: int, mod: int | None = None) -> Record:
    return Record(key=key, value=value.encode(), has_ttl=True, expiration=None,
                  revision=mod if mod is not None else create, create_revision=create)


def book(cfg) -> LeaseBook:
    return LeaseBook(cfg, PREFIX, backend_types=TYPES)


GOOD = dual("192.168.100.2", "fd99::2", "02:00:00:00:00:02", "02:00:00:00:06:02")


@pytest.mark.parametrize("cfg,key,value", [
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", GOOD),
    (DUAL, "10.5.2.0-24", dual("192.168.100.2", None, "02:00:00:00:00:02", None)),  # an IPv4-only peer
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", '{"PublicIP":"192.168.100.2","PublicIPv6":"fd99::2","BackendType":"host-gw"}'),
    (V6ONLY, "0.0.0.0-0&fd80:0:0:2::-64", v6only("fd99::2", "02:00:00:00:06:02")),
    (V6ONLY, "10.5.2.0-24&fd80:0:0:2::-64", GOOD),  # a dual-stack host: its IPv6 half is what counts
    (V6ONLY, "0.0.0.0-0&fd80:0:0:2::-64", '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::2","BackendType":"host-gw"}'),
    (V4ONLY, "10.5.2.0-24&fd80:0:0:2::-64",  # IPv6 off: the IPv6 half is not looked at
     dual("192.168.100.2", "fd99::2", "02:00:00:00:00:02", "01:00:5e:00:00:01")),
])
def test_valid_ipv6_leases_are_accepted(cfg, key, value):
    b = book(cfg)
    ch = b.put(rec(key, value, 5))
    assert [le.key for le in ch.added] == [key] and not b.rejected


@pytest.mark.parametrize("cfg,key,value,problem", [
    (DUAL, "10.5.2.0-24&fd81:0:0:2::-64", GOOD, "IPv6 subnet fd81:0:0:2::/64 is outside the flannel IPv6Network fd80::/48"),
    (DUAL, "10.5.2.0-24&fd80::-48", GOOD, "IPv6 subnet fd80::/48 is the whole flannel IPv6Network"),
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", dual("192.168.100.2", None, "02:00:00:00:00:02", "02:00:00:00:06:02"),
     "PublicIPv6: missing, but the lease has the IPv6 subnet fd80:0:0:2::/64"),
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", dual("192.168.100.2", "fe80::2", "02:00:00:00:00:02", "02:00:00:00:06:02"),
     "PublicIPv6: fe80::2 cannot be another host's address"),
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", dual("192.168.100.2", "::1", "02:00:00:00:00:02", "02:00:00:00:06:02"),
     "PublicIPv6: ::1 cannot be another host's address"),
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", dual("192.168.100.2", "ff02::1", "02:00:00:00:00:02", "02:00:00:00:06:02"),
     "PublicIPv6: ff02::1 cannot be another host's address"),
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", dual("192.168.100.2", "fd99::2", "02:00:00:00:00:02", None),
     "BackendV6Data: a vxlan lease needs an object with VtepMAC"),  # upstream skips the whole event
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", dual("192.168.100.2", "fd99::2", "02:00:00:00:00:02", "00:00:00:00:00:00"),
     "BackendV6Data.VtepMAC: 00:00:00:00:00:00 is all zeros"),
    (DUAL, "10.5.2.0-24&fd80:0:0:2::-64", dual("0.0.0.0", "fd99::2", "02:00:00:00:00:02", "02:00:00:00:06:02"),
     "PublicIP: 0.0.0.0 cannot be another host's address"),  # the IPv4 half still counts
    (V6ONLY, "0.0.0.0-0", '{"PublicIP":"192.168.100.2","BackendType":"host-gw"}',
     "no IPv6 subnet in the key: an IPv4-only lease in the IPv6-only network fd80::/48"),
    (V6ONLY, "0.0.0.0-0&fd80:0:0:2::-64", v6only("fd99::2", "00:00:00:00:00:00"), "BackendV6Data.VtepMAC"),
    (V6ONLY, "0.0.0.0-0&fd80:0:0:2::-64", '{"PublicIP":"0.0.0.0","PublicIPv6":"fd99::2","BackendType":"made-up"}',
     "BackendType: unknown backend type"),
])
def test_bad_ipv6_leases_are_rejected_with_one_warning(cfg, key, value, problem):
    b = book(cfg)
    with capture_logs() as logs:
        ch = b.put(rec(key, value, 5))
        b.reset([rec(key, value, 5)])
    assert not ch and not b.accepted
    assert problem in b.rejected[key], b.rejected[key]
    assert len([e for e in logs if e["log_level"] == "warning"]) == 1


def test_ipv6_overlap_first_created_wins_and_ipv6_only_leases_share_the_zero_ipv4_part():
    b = book(V6ONLY)
    b.put(rec("0.0.0.0-0&fd80:0:0:2::-64", v6only("fd99::2", "02:00:00:00:06:02"), 10))
    b.put(rec("0.0.0.0-0&fd80:0:0:3::-64", v6only("fd99::3", "02:00:00:00:06:03"), 11))
    b.put(rec("0.0.0.0-0&fd80:0:0:2::-63", v6only("fd99::4", "02:00:00:00:06:04"), 12))
    assert set(b.accepted) == {"0.0.0.0-0&fd80:0:0:2::-64", "0.0.0.0-0&fd80:0:0:3::-64"}
    assert b.rejected["0.0.0.0-0&fd80:0:0:2::-63"] == \
        "IPv6 subnet fd80:0:0:2::/63 overlaps the lease 0.0.0.0-0&fd80:0:0:2::-64, which was created first"
    ch = b.delete("0.0.0.0-0&fd80:0:0:2::-64")
    assert [le.key for le in ch.added] == [] and list(b.rejected)  # still overlaps ...:3::/64
    ch = b.delete("0.0.0.0-0&fd80:0:0:3::-64")
    assert [le.key for le in ch.added] == ["0.0.0.0-0&fd80:0:0:2::-63"] and not b.rejected


def test_dual_stack_overlap_in_either_family_conflicts():
    b = book(DUAL)
    b.put(rec("10.5.2.0-24&fd80:0:0:2::-64", GOOD, 10))
    b.put(rec("10.5.3.0-24&fd80:0:0:2::-64", dual("192.168.100.3", "fd99::3", "02:00:00:00:00:03",
                                                  "02:00:00:00:06:03"), 11))
    b.put(rec("10.5.2.0-24&fd80:0:0:4::-64", dual("192.168.100.4", "fd99::4", "02:00:00:00:00:04",
                                                  "02:00:00:00:06:04"), 12))
    assert list(b.accepted) == ["10.5.2.0-24&fd80:0:0:2::-64"]
    assert "IPv6 subnet fd80:0:0:2::/64 overlaps the lease 10.5.2.0-24&fd80:0:0:2::-64" in \
        b.rejected["10.5.3.0-24&fd80:0:0:2::-64"]
    assert "subnet 10.5.2.0/24 overlaps the lease" in b.rejected["10.5.2.0-24&fd80:0:0:4::-64"]


def test_ipv6_vtep_macs_are_unique_per_family():
    b = book(DUAL)
    b.put(rec("10.5.2.0-24&fd80:0:0:2::-64", GOOD, 10))
    # the IPv4 MAC of one host may be the IPv6 MAC of another: different devices
    b.put(rec("10.5.3.0-24&fd80:0:0:3::-64", dual("192.168.100.3", "fd99::3", "02:00:00:00:06:02",
                                                  "02:00:00:00:00:02"), 11))
    # the same IPv6 MAC twice is not (other spelling)
    b.put(rec("10.5.4.0-24&fd80:0:0:4::-64", dual("192.168.100.4", "fd99::4", "02:00:00:00:00:04",
                                                  "02-00-00-00-06-02"), 12))
    assert set(b.accepted) == {"10.5.2.0-24&fd80:0:0:2::-64", "10.5.3.0-24&fd80:0:0:3::-64"}
    assert b.rejected["10.5.4.0-24&fd80:0:0:4::-64"] == ("BackendV6Data.VtepMAC 02:00:00:00:06:02 is already the "
                                                         "IPv6 VtepMAC of the lease 10.5.2.0-24&fd80:0:0:2::-64, "
                                                         "created first")


def test_own_ipv6_subnet_and_mac_are_never_peers():
    b = book(DUAL)
    own = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(IPv4Address("192.168.100.1"), "vxlan",
                {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"}, IPv6Address("fd99::1"),
                {"VNI": 1, "VtepMAC": "02:00:00:00:06:01"}), subnet6=IPv6Network("fd80:0:0:1::/64"))
    b.set_own(own)
    b.put(rec(own.key, own.attrs.to_json(), 1))  # our own key: neither accepted nor rejected
    b.put(rec("10.5.2.0-24&fd80:0:0:1::-64", GOOD, 2))
    b.put(rec("10.5.3.0-24&fd80:0:0:3::-64", dual("192.168.100.3", "fd99::3", "02:00:00:00:00:03",
                                                  "02:00:00:00:06:01"), 3))
    assert not b.accepted and own.key not in b.rejected
    assert b.rejected["10.5.2.0-24&fd80:0:0:1::-64"] == \
        "IPv6 subnet fd80:0:0:1::/64 overlaps this host's own IPv6 subnet fd80:0:0:1::/64"
    assert b.rejected["10.5.3.0-24&fd80:0:0:3::-64"] == \
        "BackendV6Data.VtepMAC 02:00:00:00:06:01 is this host's own IPv6 VtepMAC"
    ch = b.set_own(None)  # the former own key is a peer now, created first: it wins both conflicts
    assert [le.key for le in ch.added] == [own.key]
    assert b.rejected["10.5.3.0-24&fd80:0:0:3::-64"].startswith("BackendV6Data.VtepMAC 02:00:00:00:06:01 is "
                                                                "already the IPv6 VtepMAC of the lease 10.5.1.0-24&")


# --- properties of the gate in dual-stack and IPv6-only networks ---------------------------------
V4PARTS = ["10.5.2.0-23", "10.5.2.0-24", "10.5.3.0-24", "10.5.2.0-25", "10.5.1.0-24"]
V6PARTS = ["fd80:0:0:2::-63", "fd80:0:0:2::-64", "fd80:0:0:3::-64", "fd80:0:0:2::-65", "fd80:0:0:1::-64",
           "fd81::-64", None]
MACS = ["02:00:00:00:00:%02x" % i for i in range(3)]
IP6S = ["fd99::2", "fd99::3", "fe80::1", None]


@st.composite
def records(draw, v6only_mode: bool):
    v4 = "0.0.0.0-0" if v6only_mode else draw(st.sampled_from(V4PARTS))
    v6 = draw(st.sampled_from(V6PARTS))
    key = v4 + (f"&{v6}" if v6 else "")
    ip = "0.0.0.0" if v6only_mode else draw(st.sampled_from(["192.168.100.2", "192.168.100.3"]))
    d = {"PublicIP": ip, "PublicIPv6": draw(st.sampled_from(IP6S)), "BackendType": "vxlan"}
    if not v6only_mode:
        d["BackendData"] = {"VNI": 1, "VtepMAC": draw(st.sampled_from(MACS))}
    if draw(st.booleans()):
        d["BackendV6Data"] = {"VNI": 1, "VtepMAC": draw(st.sampled_from(MACS))}
    return key, json.dumps(d)


def check_invariants(b: LeaseBook, cfg, own: Lease | None) -> None:
    acc = list(b.accepted.values())
    for x in acc:
        if cfg.enable_ipv4:
            assert x.subnet.subnet_of(cfg.network) and x.subnet != cfg.network
        if x.subnet6 is not None:
            assert x.subnet6.subnet_of(cfg.ipv6_network) and x.subnet6 != cfg.ipv6_network
            assert x.attrs.public_ipv6 is not None and not x.attrs.public_ipv6.is_link_local
            assert x.attrs.backend_v6_data is not None
        else:
            assert cfg.enable_ipv4
        if own is not None:
            assert x.key != own.key
            assert not (cfg.enable_ipv4 and x.subnet.overlaps(own.subnet))
            assert not (x.subnet6 and x.subnet6.overlaps(own.subnet6))
    for i, x in enumerate(acc):
        for y in acc[i + 1:]:
            assert not (cfg.enable_ipv4 and x.subnet.overlaps(y.subnet)), (x.key, y.key)
            assert not (x.subnet6 and y.subnet6 and x.subnet6.overlaps(y.subnet6)), (x.key, y.key)
    macs6 = [x.attrs.backend_v6_data["VtepMAC"] for x in acc if x.subnet6 is not None]
    assert len(macs6) == len(set(macs6))
    if cfg.enable_ipv4:
        macs = [x.attrs.backend_data["VtepMAC"] for x in acc]
        assert len(macs) == len(set(macs))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.booleans(), st.randoms(use_true_random=False))
def test_random_ipv6_sequences_keep_the_invariants_and_match_a_relist(data, v6only_mode, with_own, rnd):
    cfg = V6ONLY if v6only_mode else DUAL
    seq = data.draw(st.lists(st.tuples(st.sampled_from(["put", "put", "delete"]), records(v6only_mode)),
                             max_size=40))
    own = None
    if with_own:
        own = Lease(IPV4_OFF_SUBNET if v6only_mode else IPv4Network("10.5.1.0/24"),
                    LeaseAttrs(IPv4Address("0.0.0.0" if v6only_mode else "192.168.100.1"), "vxlan",
                               None if v6only_mode else {"VNI": 1, "VtepMAC": MACS[0]}, IPv6Address("fd99::1"),
                               {"VNI": 1, "VtepMAC": MACS[1]}), subnet6=IPv6Network("fd80:0:0:1::/64"))
    with capture_logs():
        b = book(cfg)
        b.set_own(own)
        live: dict[str, Record] = {}
        programmed: dict[str, Lease] = {}
        for rev, (op, (key, value)) in enumerate(seq, start=1):
            if op == "put":
                old = live.get(key)
                live[key] = rec(key, value, old.create_revision if old else rev, rev)
                ch = b.put(live[key])
            else:
                live.pop(key, None)
                ch = b.delete(key)
            for le in ch.removed:
                assert programmed.pop(le.key) == le
            for le in ch.added:
                programmed[le.key] = le
            check_invariants(b, cfg, own)
            assert programmed == dict(b.accepted)
        shuffled = list(live.values())
        rnd.shuffle(shuffled)
        other = book(cfg)
        other.set_own(own)
        other.reset(shuffled)
    assert dict(other.accepted) == dict(b.accepted) and set(other.rejected) == set(b.rejected)
