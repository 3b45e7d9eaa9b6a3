"""Pure tests: flannel's iptables rule lists vs upstream's golden list, and the restore transactions."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

from pyflanneld.iptables import (
    ChainState,
    chain_state,
    delete_payload,
    forward_rules,
    masq_rules,
    restore_payload,
    supports_random_fully,
)

NET = IPv4Network("10.5.0.0/16")
SUB = IPv4Network("10.5.1.0/24")

# upstream flannel's rules (pkg/trafficmngr/iptables/iptables.go), the golden list its e2e suite asserts
# (e2e/rules.go), for Network 10.5.0.0/16, podCIDR 10.5.1.0/24
GOLDEN_MASQ = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.1.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.1.0/24 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.1.0/24 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
]
GOLDEN_FWD = [
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
]


def test_masq_rules_match_upstream_golden_list():
    rs = masq_rules(NET, SUB, fully_random=True)
    assert rs.table == "nat" and rs.chain == "FLANNEL-POSTRTG" and rs.parent == "POSTROUTING"
    assert rs.golden() == GOLDEN_MASQ


def test_masq_rules_without_random_fully():
    rs = masq_rules(NET, SUB, fully_random=False)
    assert rs.golden() == [r.removesuffix(" --random-fully") for r in GOLDEN_MASQ]


def test_forward_rules_match_upstream():
    rs = forward_rules(NET)
    assert rs.table == "filter" and rs.chain == "FLANNEL-FWD" and rs.parent == "FORWARD"
    assert rs.golden() == GOLDEN_FWD


def test_random_fully_needs_iptables_1_6_2():
    assert supports_random_fully("iptables v1.8.9 (nf_tables)")
    assert supports_random_fully("iptables v1.6.2")
    assert not supports_random_fully("iptables v1.6.1")
    assert not supports_random_fully("iptables v1.4.21")
    assert not supports_random_fully("garbage")


SAVE = """-P PREROUTING ACCEPT
-P POSTROUTING ACCEPT
-N FLANNEL-POSTRTG
-N KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -s 10.5.1.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A KUBE-POSTROUTING -j RETURN
"""


def test_chain_state_sees_order_and_duplicates():
    rs = masq_rules(NET, SUB, True)
    st = chain_state(SAVE, rs)
    assert st.exists and st.jumps == 2
    assert st.rules == (GOLDEN_MASQ[2], GOLDEN_MASQ[1])  # only ours, in kernel order
    assert not st.matches(rs)
    good = "-N FLANNEL-POSTRTG\n" + "\n".join(GOLDEN_MASQ) + "\n"
    assert chain_state(good, rs).matches(rs)
    # same rules, another order: not a match (upstream's -C check would accept it, #1337)
    swapped = GOLDEN_MASQ[:1] + [GOLDEN_MASQ[2], GOLDEN_MASQ[1]] + GOLDEN_MASQ[3:]
    assert not chain_state("-N FLANNEL-POSTRTG\n" + "\n".join(swapped), rs).matches(rs)
    # a duplicate rule inside the chain: not a match
    assert not chain_state("-N FLANNEL-POSTRTG\n" + "\n".join(GOLDEN_MASQ + GOLDEN_MASQ[-1:]), rs).matches(rs)
    # no chain at all
    assert chain_state("-P POSTROUTING ACCEPT\n", rs) == ChainState(False, (), 0)


def test_restore_payload_is_one_transaction_without_empty_window():
    rs = masq_rules(NET, SUB, True)
    # chain missing, no jump: declare, add the jump, fill
    p = restore_payload(rs, ChainState(False, (), 0))
    assert p.splitlines() == ["*nat", ":FLANNEL-POSTRTG - [0:0]", *GOLDEN_MASQ, "COMMIT"]
    # jump present twice: one deleted, not re-added; the chain is declared (flushed) and refilled in
    # the same transaction — there is no separate "iptables -F" step
    p = restore_payload(rs, ChainState(True, (GOLDEN_MASQ[1],), 2))
    assert p.splitlines() == [
        "*nat", ":FLANNEL-POSTRTG - [0:0]",
        '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        *GOLDEN_MASQ[1:], "COMMIT",
    ]
    assert p.count("COMMIT") == 1 and "-F" not in p.split()
    # jump present once: kept where it is
    p = restore_payload(forward_rules(NET), ChainState(True, (), 1))
    assert p.splitlines() == ["*filter", ":FLANNEL-FWD - [0:0]", *GOLDEN_FWD[1:], "COMMIT"]


def test_delete_payload():
    assert delete_payload("nat", GOLDEN_MASQ[1:3]).splitlines() == [
        "*nat",
        '-D FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
        '-D FLANNEL-POSTRTG -s 10.5.1.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
        "COMMIT",
    ]


# --- ip6tables (issue 13.6): the same chains for the IPv6 network, ff00::/8 never masqueraded ----------
NET6 = IPv6Network("fd80::/48")
SUB6 = IPv6Network("fd80:0:0:1::/64")
GOLDEN_MASQ6 = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s fd80:0:0:1::/64 -d fd80::/48 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s fd80::/48 -d fd80:0:0:1::/64 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG ! -s fd80::/48 -d fd80:0:0:1::/64 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s fd80::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
    '-A FLANNEL-POSTRTG ! -s fd80::/48 -d fd80::/48 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
]
GOLDEN_FWD6 = [
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s fd80::/48 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d fd80::/48 -m comment --comment "flanneld forward" -j ACCEPT',
]


def test_ip6tables_rules_match_upstreams_ipv6_rules():
    rs = masq_rules(NET6, SUB6, fully_random=True)
    assert (rs.table, rs.chain, rs.parent) == ("nat", "FLANNEL-POSTRTG", "POSTROUTING")
    assert rs.golden() == GOLDEN_MASQ6
    assert masq_rules(NET6, SUB6, fully_random=False).golden() == [r.removesuffix(" --random-fully")
                                                                  for r in GOLDEN_MASQ6]
    assert forward_rules(NET6).golden() == GOLDEN_FWD6
    assert supports_random_fully("ip6tables v1.8.9 (nf_tables)")
