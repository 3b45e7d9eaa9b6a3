"""The validation gate (pyflanneld.subnet.leasebook): pure logic, no etcd, no kernel.

Per-lease checks, the set checks (overlap, own subnet, VtepMAC), what changes are handed on, one
warning per key per change, and — with hypothesis — the invariants under random put/delete
sequences: accepted leases pairwise disjoint, none overlapping the own subnet, no VtepMAC twice,
and the result a function of the records alone (arrival order and relists do not matter).
"""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from pyflanneld.config import parse_config
from pyflanneld.subnet.lease import Lease, LeaseAttrs, lease_from_record
from pyflanneld.subnet.leasebook import LeaseBook
from pyflanneld.subnet.store import Record

CFG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
PREFIX = "/coreos.com/network"
TYPES = ("vxlan", "host-gw", "udp", "alloc", "aws-vpc", "gce")


def vx(ip: str, mac: str, vni: int = 1) -> str:
    """A vxlan lease value exactly as upstream v0.20.2 writes it."""
    return json.dumps({"PublicIP": ip, "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": vni, "VtepMAC": mac}}, separators=(",", ":"))


def rec(key: str, value: str, create: int, mod: int | None = None) -> Record:
    return Record(key=key, value=value.encode(), has_ttl=True, expiration=None,
                  revision=mod if mod is not None else create, create_revision=create)


def book(cfg=CFG) -> LeaseBook:
    return LeaseBook(cfg, PREFIX, backend_types=TYPES)


def own_lease(subnet: str, mac: str = "02:00:00:00:0a:01") -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address("192.168.100.1"), "vxlan", {"VNI": 1, "VtepMAC": mac}))


def keys(leases) -> list[str]:
    return [le.key for le in leases]


# --- per-lease checks ------------------------------------------------------------------------------
GOOD = vx("192.168.100.2", "02:00:00:00:00:02")


@pytest.mark.parametrize("key,value", [
    ("10.5.2.0-24", GOOD),
    ("10.5.2.0-24&fd80:0:0:1::-64", GOOD),  # dual stack key (upstream MakeSubnetKey)
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","PublicIPv6":null}'),  # udp/alloc: no BackendType
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","PublicIPv6":null,"BackendType":"host-gw"}'),
    ("10.5.2.0-24", '{"publicip":"192.168.100.2","backendtype":"vxlan","backenddata":{"vtepmac":"02-00-00-00-00-02"}}'),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendType":"vxlan","BackendData":{"VtepMAC":"0200.0000.0002"}}'),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","PublicIPv6":"fd00::2","BackendType":"vxlan",'
                    '"BackendData":{"VtepMAC":"02:00:00:00:00:02"}}'),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:02"}}'),
    ("10.5.0.0-17", GOOD),  # half the Network: a lease of an older, shorter SubnetLen
])
def test_valid_leases_are_accepted(key, value):
    b = book()
    ch = b.put(rec(key, value, 5))
    assert keys(ch.added) == [key] and not ch.removed
    assert key in b.accepted and not b.rejected


@pytest.mark.parametrize("key,value,problem", [
    ("192.168.100.0-24", GOOD, "subnet 192.168.100.0/24 is outside the flannel Network 10.5.0.0/16"),  # case 1
    ("10.4.255.0-24", GOOD, "outside the flannel Network"),
    ("10.0.0.0-8", GOOD, "outside the flannel Network"),
    ("10.5.0.0-16", GOOD, "is the whole flannel Network"),
    ("10.5.2.0-32", GOOD, "prefix length out of range"),
    ("10.5.2.1-24", GOOD, "not a subnet key"),
    ("x10.5.2.0-24", GOOD, "not a subnet key"),
    ("10.5.2.0-24", '{"PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:02"}}',
     "PublicIP: missing"),  # case 5
    ("10.5.2.0-24", '{"PublicIP":5,"BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:02"}}',
     "PublicIP: 5 is not an IPv4 address string"),
    ("10.5.2.0-24", '{"PublicIP":true,"BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:02"}}',
     "PublicIP: true is not an IPv4 address string"),
    ("10.5.2.0-24", '{"PublicIP":null}', "PublicIP: missing"),
    ("10.5.2.0-24", '{"PublicIP":"0.0.0.0"}', "PublicIP: 0.0.0.0 cannot be another host's address"),
    ("10.5.2.0-24", '{"PublicIP":"127.0.0.1"}', "PublicIP: 127.0.0.1 cannot be another host's address"),
    ("10.5.2.0-24", '{"PublicIP":"fd00::1"}', "PublicIP: \"fd00::1\" is not an IPv4 address"),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","PublicIPv6":7}', "PublicIPv6: 7 is not an IPv6 address"),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendType":"nonsense"}', "BackendType: unknown backend type"),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendType":5}', "BackendType: 5 is not a string"),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendType":"vxlan"}', "BackendData: a vxlan lease needs an object"),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendType":"vxlan","BackendData":{"VNI":1}}',
     "BackendData.VtepMAC: missing"),
    ("10.5.2.0-24", vx("192.168.100.2", "01:00:5e:00:00:01"), "BackendData.VtepMAC: 01:00:5e:00:00:01 is a multicast"),
    ("10.5.2.0-24", vx("192.168.100.2", "ff:ff:ff:ff:ff:ff"), "is a multicast address"),
    ("10.5.2.0-24", vx("192.168.100.2", "00:00:00:00:00:00"), "BackendData.VtepMAC: 00:00:00:00:00:00 is all zeros"),
    ("10.5.2.0-24", vx("192.168.100.2", "02:00:00:00:00"), "BackendData.VtepMAC: \"02:00:00:00:00\" is not a 6-byte MAC"),
    ("10.5.2.0-24", vx("192.168.100.2", "02:00:00:00:00:02", vni=70000), "BackendData.VNI: 70000 is not an integer"),
    ("10.5.2.0-24", "[" * 100_000 + "]" * 100_000, "nested more than 100 deep"),  # case 4
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendData":{"VNI":1e400}}', "number 1e400 in BackendData.VNI is out of range"),
    ("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendData":NaN}', "NaN in BackendData is not a JSON value"),
    ("10.5.2.0-24", "not json", "lease value is not valid JSON"),
])
def test_bad_leases_are_rejected_with_one_warning_naming_key_and_problem(key, value, problem):
    b = book()
    with capture_logs() as logs:
        ch = b.put(rec(key, value, 5))
        b.put(rec(key, value, 5))  # the same again (a relist): no second warning
        b.reset([rec(key, value, 5)])
    assert not ch and not b.accepted
    assert problem in b.rejected[key]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["key"] == f"{PREFIX}/subnets/{key}" and problem in warnings[0]["error"]
    assert not b.delete(key) and key not in b.rejected  # deleting a rejected key changes nothing


def test_a_changed_value_of_a_rejected_key_warns_again():
    b = book()
    with capture_logs() as logs:
        b.put(rec("10.5.2.0-24", '{"PublicIP":5}', 5, 5))
        b.put(rec("10.5.2.0-24", '{"PublicIP":6}', 5, 6))
    assert len([e for e in logs if e["log_level"] == "warning"]) == 2


def test_backend_types_default_to_the_registered_backends():
    b = LeaseBook(CFG, PREFIX)
    b.put(rec("10.5.2.0-24", '{"PublicIP":"192.168.100.2","BackendType":"host-gw"}', 1))
    b.put(rec("10.5.3.0-24", '{"PublicIP":"192.168.100.3","BackendType":"made-up"}', 2))
    assert list(b.accepted) == ["10.5.2.0-24"] and list(b.rejected) == ["10.5.3.0-24"]


# --- set checks -----------------------------------------------------------------------------------
def test_overlap_first_created_wins_and_loser_returns_when_winner_goes():  # case 2
    b = book()
    b.put(rec("10.5.2.0-24", vx("192.168.100.2", "02:00:00:00:00:02"), 10))
    ch = b.put(rec("10.5.2.0-25", vx("192.168.100.9", "02:00:00:00:00:09"), 11))
    assert not ch
    assert b.rejected["10.5.2.0-25"] == "subnet 10.5.2.0/25 overlaps the lease 10.5.2.0-24, which was created first"
    ch = b.delete("10.5.2.0-24")
    assert keys(ch.removed) == ["10.5.2.0-24"] and keys(ch.added) == ["10.5.2.0-25"]
    assert not b.rejected


def test_an_older_key_wins_even_when_it_arrives_later():
    b = book()
    b.put(rec("10.5.2.0-25", vx("192.168.100.2", "02:00:00:00:00:02"), 20))
    ch = b.put(rec("10.5.2.0-26", vx("192.168.100.9", "02:00:00:00:00:09"), 3))  # created before
    assert keys(ch.removed) == ["10.5.2.0-25"] and keys(ch.added) == ["10.5.2.0-26"]
    assert "overlaps the lease 10.5.2.0-26, which was created first" in b.rejected["10.5.2.0-25"]


def test_a_lease_of_the_configs_shape_wins_over_an_older_odd_one():
    """etcd v2 gives a key a new createdIndex on every plain set (upstream v0.17's renewal and
    restart): a host's /24 must not then lose to a stray /25 or /23 written in between — on any
    host, including one that starts after the renewal and never saw the older index."""
    b = book()
    b.put(rec("10.5.2.0-25", vx("192.168.100.9", "02:00:00:00:00:09"), 3))
    b.put(rec("10.5.4.0-23", vx("192.168.100.8", "02:00:00:00:00:08"), 4))
    b.put(rec("10.5.7.0-24&fd80::-64", vx("192.168.100.7", "02:00:00:00:00:07"), 5))  # dual stack: not here
    ch = b.put(rec("10.5.2.0-24", vx("192.168.100.2", "02:00:00:00:00:02"), 20))
    assert keys(ch.removed) == ["10.5.2.0-25"] and keys(ch.added) == ["10.5.2.0-24"]
    b.put(rec("10.5.5.0-24", vx("192.168.100.5", "02:00:00:00:00:05"), 21))
    b.put(rec("10.5.7.0-24", vx("192.168.100.6", "02:00:00:00:00:06"), 22))
    assert set(b.accepted) == {"10.5.2.0-24", "10.5.5.0-24", "10.5.7.0-24"}
    fits = "which fits the network config (SubnetLen, SubnetMin..SubnetMax) and this one does not"
    assert b.rejected["10.5.2.0-25"] == f"subnet 10.5.2.0/25 overlaps the lease 10.5.2.0-24, {fits}"
    assert b.rejected["10.5.4.0-23"] == f"subnet 10.5.4.0/23 overlaps the lease 10.5.5.0-24, {fits}"
    assert "overlaps the lease 10.5.7.0-24, which fits" in b.rejected["10.5.7.0-24&fd80::-64"]
    # a VtepMAC too: the odd lease using a host's MAC loses, whichever was created first
    b.put(rec("10.5.9.0-26", vx("192.168.100.9", "02:00:00:00:00:05"), 1))
    assert b.rejected["10.5.9.0-26"] == ("BackendData.VtepMAC 02:00:00:00:00:05 is already the VtepMAC of the "
                                         f"lease 10.5.5.0-24, {fits}")
    # outside SubnetMin..SubnetMax is odd too (the first subnet of the Network is never handed out)
    b.put(rec("10.5.0.0-24", vx("192.168.100.10", "02:00:00:00:00:10"), 30))
    b.put(rec("10.5.0.0-25", vx("192.168.100.11", "02:00:00:00:00:11"), 31))
    assert "10.5.0.0-24" in b.accepted and "created first" in b.rejected["10.5.0.0-25"]


def test_duplicate_vtep_mac_rejected_and_freed():  # case 3
    b = book()
    b.put(rec("10.5.2.0-24", vx("192.168.100.2", "02:00:00:00:00:02"), 10))
    b.put(rec("10.5.3.0-24", vx("192.168.100.3", "02-00-00-00-00-02"), 11))  # same MAC, other spelling
    assert list(b.accepted) == ["10.5.2.0-24"]
    assert "VtepMAC 02:00:00:00:00:02 is already the VtepMAC of the lease 10.5.2.0-24" in b.rejected["10.5.3.0-24"]
    # the first host restarts with a new MAC: the second one's lease is now fine
    ch = b.put(rec("10.5.2.0-24", vx("192.168.100.2", "02:00:00:00:00:22"), 10, 12))
    assert keys(ch.added) == ["10.5.2.0-24", "10.5.3.0-24"] and not ch.removed


def test_own_subnet_and_own_mac_are_never_peers():
    b = book()
    b.set_own(own_lease("10.5.1.0/24", "02:00:00:00:0a:01"))
    b.put(rec("10.5.1.0-24", vx("192.168.100.1", "02:00:00:00:0a:01"), 1))  # our own key: neither
    b.put(rec("10.5.1.128-25", vx("192.168.100.7", "02:00:00:00:00:07"), 2))
    b.put(rec("10.5.0.0-23", vx("192.168.100.8", "02:00:00:00:00:08"), 3))
    b.put(rec("10.5.9.0-24", vx("192.168.100.9", "02:00:00:00:0a:01"), 4))
    assert not b.accepted
    assert "10.5.1.0-24" not in b.rejected
    assert b.rejected["10.5.1.128-25"] == "subnet 10.5.1.128/25 overlaps this host's own subnet 10.5.1.0/24"
    assert "overlaps this host's own subnet" in b.rejected["10.5.0.0-23"]
    assert b.rejected["10.5.9.0-24"] == "BackendData.VtepMAC 02:00:00:00:0a:01 is this host's own VtepMAC"
    # a new own lease elsewhere: the former own key is a peer now (older than the others, so it
    # wins against them), the others are re-evaluated
    ch = b.set_own(own_lease("10.5.50.0/24", "02:00:00:00:0a:02"))
    assert keys(ch.added) == ["10.5.1.0-24"]
    assert b.rejected["10.5.1.128-25"].startswith("subnet 10.5.1.128/25 overlaps the lease 10.5.1.0-24")
    assert b.rejected["10.5.9.0-24"].startswith("BackendData.VtepMAC 02:00:00:00:0a:01 is already the VtepMAC of")


def test_cascade_is_the_greedy_result():
    """k=/26 (first), L=/25 over it, M=the other /26 in L: k and M win. When k goes, L (older than M)
    wins. (None of them has the config's /24 shape: creation order alone decides.)"""
    b = book()
    b.put(rec("10.5.2.0-26", vx("192.168.100.1", "02:00:00:00:00:01"), 1))
    b.put(rec("10.5.2.0-25", vx("192.168.100.2", "02:00:00:00:00:02"), 2))
    b.put(rec("10.5.2.64-26", vx("192.168.100.3", "02:00:00:00:00:03"), 3))
    assert set(b.accepted) == {"10.5.2.0-26", "10.5.2.64-26"}
    ch = b.delete("10.5.2.0-26")
    assert set(b.accepted) == {"10.5.2.0-25"}
    assert set(keys(ch.removed)) == {"10.5.2.0-26", "10.5.2.64-26"} and keys(ch.added) == ["10.5.2.0-25"]


def test_renewal_with_the_same_value_is_no_change():
    b = book()
    b.put(rec("10.5.2.0-24", GOOD, 10, 10))
    assert not b.put(rec("10.5.2.0-24", GOOD, 10, 11))
    ch = b.put(rec("10.5.2.0-24", vx("192.168.100.22", "02:00:00:00:00:02"), 10, 12))
    assert keys(ch.added) == ["10.5.2.0-24"] and not ch.removed  # the backend replaces the entries


def test_reset_reports_the_difference():
    b = book()
    b.put(rec("10.5.2.0-24", GOOD, 10))
    b.put(rec("10.5.3.0-24", vx("192.168.100.3", "02:00:00:00:00:03"), 11))
    ch = b.reset([rec("10.5.3.0-24", vx("192.168.100.3", "02:00:00:00:00:03"), 11),
                  rec("10.5.4.0-24", vx("192.168.100.4", "02:00:00:00:00:04"), 12)])
    assert keys(ch.removed) == ["10.5.2.0-24"] and keys(ch.added) == ["10.5.4.0-24"]


def test_five_thousand_leases_relisted_and_churned():
    """5,000 distinct leases are all accepted by a relist and stay so through 1,000 deletes and
    1,000 puts. (How fast: `make bench SCENARIOS="start burst"` — the 5,000-peer start and the
    5,000-join burst go through this book; speed is measured there, not asserted here.)"""
    leases = [rec(f"10.{i // 250}.{i % 250}.0-24", vx(f"172.16.{i // 250}.{i % 250 + 1}",
                                                      "02:00:00:%02x:%02x:01" % (i // 256, i % 256)), i + 1)
              for i in range(5000)]
    cfg = parse_config('{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}')
    b = book(cfg)
    b.reset(leases)
    assert len(b.accepted) == 5000 and not b.rejected
    for r in leases[::10]:
        b.delete(r.key)
        assert r.key not in b.accepted
        b.put(r)
    assert len(b.accepted) == 5000 and not b.rejected


# --- properties -----------------------------------------------------------------------------------
# few subnets, nested in every way, and few MACs: conflicts and cascades are the norm
SUBNETS = ["10.5.2.0-23", "10.5.2.0-24", "10.5.3.0-24", "10.5.2.0-25", "10.5.2.128-25", "10.5.2.0-26",
           "10.5.2.64-26", "10.5.1.0-24", "10.5.0.0-16", "192.168.100.0-24"]
MACS = ["02:00:00:00:00:%02x" % i for i in range(4)] + ["01:00:5e:00:00:01"]


@st.composite
def records(draw):
    key = draw(st.sampled_from(SUBNETS))
    mac = draw(st.sampled_from(MACS))
    ip = draw(st.sampled_from(["192.168.100.2", "192.168.100.3", "0.0.0.0"]))
    kind = draw(st.sampled_from(["vxlan", "vxlan", "vxlan", "host-gw", "junk"]))
    value = vx(ip, mac) if kind == "vxlan" else (
        json.dumps({"PublicIP": ip, "BackendType": "host-gw"}) if kind == "host-gw" else "{[")
    return key, value


ops = st.lists(st.tuples(st.sampled_from(["put", "put", "delete"]), records()), max_size=40)


def check_invariants(b: LeaseBook, own: Lease | None) -> None:
    acc = list(b.accepted.values())
    for i, x in enumerate(acc):
        assert x.subnet.subnet_of(CFG.network) and x.subnet != CFG.network
        if own is not None:
            assert not x.subnet.overlaps(own.subnet)
            assert x.key != own.key
        for y in acc[i + 1:]:
            assert not x.subnet.overlaps(y.subnet), (x.key, y.key)
    macs = [le.attrs.backend_data["VtepMAC"] for le in acc if le.attrs.backend_type == "vxlan"]
    assert len(macs) == len(set(macs))
    if own is not None:
        assert own.attrs.backend_data["VtepMAC"] not in macs
    assert not set(b.accepted) & set(b.rejected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from([None, "10.5.1.0/24", "10.5.2.0/25"]), st.randoms(use_true_random=False))
def test_random_sequences_keep_the_invariants_and_match_a_relist(seq, own_subnet, rnd):
    with capture_logs():  # thousands of rejection warnings: keep them out of the output
        _random_sequence(seq, own_subnet, rnd)


def _random_sequence(seq, own_subnet, rnd):
    b = book()
    own = own_lease(own_subnet, MACS[0]) if own_subnet else None
    b.set_own(own)
    live: dict[str, Record] = {}
    rev = 0
    programmed: dict[str, Lease] = {}  # what a sink fed with the Changes would hold
    for op, (key, value) in seq:
        rev += 1
        if op == "put":
            old = live.get(key)
            r = rec(key, value, old.create_revision if old else rev, rev)
            live[key] = r
            ch = b.put(r)
        else:
            live.pop(key, None)
            ch = b.delete(key)
        for le in ch.removed:
            assert programmed.pop(le.key) == le
        for le in ch.added:
            programmed[le.key] = le
        check_invariants(b, own)
        assert programmed == dict(b.accepted)
    # a relist of the same records, in any order, gives the same answer
    shuffled = list(live.values())
    rnd.shuffle(shuffled)
    other = book()
    other.set_own(own)
    ch = other.reset(shuffled)
    assert dict(other.accepted) == dict(b.accepted)
    assert set(other.rejected) == set(b.rejected)
    assert {le.key for le in ch.added} == set(b.accepted)
    # puts in another order (same create revisions) too
    third = book()
    third.set_own(own)
    for r in sorted(live.values(), key=lambda r: random.Random(rev).random()):
        third.put(r)
    assert dict(third.accepted) == dict(b.accepted)


def greedy(records: dict[str, Record], own: Lease | None) -> set[str]:
    """The documented rule, by brute force: candidates (valid alone, not the own key) in order
    (config's shape first, then create revision, then key), each accepted unless it overlaps or
    shares a VtepMAC with the own lease or one accepted before it."""
    def mac(le: Lease) -> str | None:
        return le.attrs.backend_data["VtepMAC"] if le.attrs.backend_type == "vxlan" else None

    cands = []
    for r in records.values():
        if (own is not None and r.key == own.key) or not book().put(r).added:  # per-lease checks: above
            continue
        le = lease_from_record(r)
        odd = not CFG.contains_subnet(le.subnet) or le.subnet6 is not None
        cands.append(((odd, r.create_revision, r.key), le))
    accepted: list[Lease] = [own] if own is not None else []
    for _, le in sorted(cands, key=lambda t: t[0]):
        if not any(le.subnet.overlaps(a.subnet) or (mac(le) and mac(le) == mac(a)) for a in accepted):
            accepted.append(le)
    return {le.key for le in accepted if le is not own}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["put", "put", "put", "renew", "delete", "own", "relist"]),
                          st.sampled_from([*SUBNETS, "10.5.2.0-24&fd80::-64"]), st.sampled_from(MACS[:4])),
                max_size=50))
def test_random_sequences_accept_exactly_what_the_rule_says(seq):
    """Not only no conflict among the accepted (the invariants), but nothing rejected that the rule
    accepts. "renew" rewrites a key with a new create revision and no delete (etcd v2's plain set)."""
    with capture_logs():
        b = book()
        live: dict[str, Record] = {}
        own = None
        for rev, (op, key, mac) in enumerate(seq, 1):
            if op in ("put", "renew"):
                old = live.get(key)
                create = old.create_revision if old is not None and op == "put" else rev
                live[key] = rec(key, vx(f"192.168.100.{rev % 200 + 2}", mac), create, rev)
                b.put(live[key])
            elif op == "delete":
                live.pop(key, None)
                b.delete(key)
            elif op == "own":
                own = None if own is not None else own_lease(key.split("&")[0].replace("-", "/"), mac)
                b.set_own(own)
            else:
                b.reset(list(live.values()))
            assert set(b.accepted) == greedy(live, own), (op, key)


def test_huge_or_multi_line_keys_are_shown_cut_and_escaped():
    """etcd keys can be 1.5 MB and hold newlines: the warning, the reason and /readyz's line stay
    one short line each (a 100 kB key made a 200 kB log line and /readyz answers of megabytes)."""
    from pyflanneld.daemon import rejected_summary

    b = book()
    bad = ["x" * 100_000, "a\nflanneld is ready", "1" * 50_000 + ".1.1.1-24", "10.5.1.0-24&" + "a" * 10_000 + "-64"]
    with capture_logs() as logs:
        for i, k in enumerate(bad):
            b.put(rec(k, GOOD, i + 1))
    assert set(b.rejected) == set(bad)
    for e in logs:
        assert len(e["key"]) < 120 and "\n" not in e["key"] and len(e["error"]) < 300 and "\n" not in e["error"]
    summary = rejected_summary(b.subnets_path, b.rejected)
    assert len(summary.splitlines()) == 1 + len(bad) and len(summary) < 2000
    assert "  'a\\nflanneld is ready': not a subnet key: 'a\\nflanneld is ready'" in summary


def test_readyz_lists_rejected_entries_bounded():
    from pyflanneld.daemon import rejected_summary

    one = rejected_summary("/p/subnets/", {"10.5.2.0-24": "PublicIP: missing"})
    assert one == ("1 lease entry under /p/subnets/ rejected (not programmed; correct or delete them):\n"
                   "  10.5.2.0-24: PublicIP: missing")
    many = rejected_summary("/p/subnets/", {f"10.5.{i}.0-24": "x" for i in range(25)})
    lines = many.splitlines()
    assert lines[0].startswith("25 lease entries") and len(lines) == 22 and lines[-1] == "  ... and 5 more"
