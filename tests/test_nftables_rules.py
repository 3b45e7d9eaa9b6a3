"""Pure tests: the nftables tables we write vs upstream's rules, the replace transaction, the
listing fingerprint, and the choice of rules manager."""

from __future__ import annotations

import json
from ipaddress import IPv4Network, IPv6Network
from types import SimpleNamespace

import pytest

from pyflanneld.config import parse_config
from pyflanneld.iptables import TrafficRules
from pyflanneld.nftables import (
    NftRules,
    Table,
    listing_matches,
    masq_chain,
    normalise_listing,
    replace_payload,
    tables,
)
from pyflanneld.rulecmd import RulesError
from pyflanneld.trafficmngr import FamilyRules, traffic_manager

NET = IPv4Network("10.5.0.0/16")
SUB = IPv4Network("10.5.1.0/24")

# upstream pkg/trafficmngr/nftables: the knftables objects it adds, as nft input
UPSTREAM_V4 = """table ip flannel-ipv4 {
	comment "rules for flannel-ipv4"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x4000 return
		ip saddr 10.5.1.0/24 ip daddr 10.5.0.0/16 return
		ip saddr 10.5.0.0/16 ip daddr 10.5.1.0/24 return
		ip saddr != 10.5.1.0/24 ip daddr 10.5.0.0/16 return
		ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random
	}
	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.5.0.0/16 accept
		ip daddr 10.5.0.0/16 accept
	}
}"""


def test_ipv4_table_is_upstreams_and_ipv6_table_is_empty():
    v4, v6 = tables([(NET, SUB)], ip_masq=True, forward=True, fully_random=True)
    assert v4.render() == UPSTREAM_V4
    assert v6.render() == 'table ip6 flannel-ipv6 {\n\tcomment "rules for flannel-ipv6"\n}'


def test_options_drop_chains_and_fully_random():
    (v4, _) = tables([(NET, SUB)], ip_masq=True, forward=False, fully_random=False)
    assert [c.name for c in v4.chains] == ["postrtg"]
    assert v4.chains[0].rules[-2:] == ("ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade",
                                       "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade")
    (v4, _) = tables([(NET, SUB)], ip_masq=False, forward=True, fully_random=True)
    assert [c.name for c in v4.chains] == ["forward"]
    (v4, v6) = tables([], ip_masq=True, forward=True, fully_random=True)
    assert v4.chains == () and v6.chains == ()


def test_ipv6_rules_use_ip6_and_the_ipv6_multicast_range():
    c = masq_chain(IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:7::/64"), fully_random=True)
    assert c.rules[1] == "ip6 saddr fc00:0:0:7::/64 ip6 daddr fc00::/48 return"
    assert c.rules[4] == "ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random"
    _, v6 = tables([(IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:7::/64"))], True, True, True)
    assert v6.family == "ip6" and [c.name for c in v6.chains] == ["postrtg", "forward"]


def test_replace_payload_replaces_each_table_whole():
    ts = tables([(NET, SUB)], ip_masq=True, forward=True, fully_random=True)
    lines = replace_payload(ts).splitlines()
    assert lines[:3] == ["add table ip flannel-ipv4", "delete table ip flannel-ipv4", "table ip flannel-ipv4 {"]
    i = lines.index("add table ip6 flannel-ipv6")
    assert lines[i:i + 3] == ["add table ip6 flannel-ipv6", "delete table ip6 flannel-ipv6",
                              "table ip6 flannel-ipv6 {"]


def _listing(*objs) -> str:
    return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}, *objs]})


def test_listing_fingerprint_drops_handles_and_checks_shape():
    table = Table("ip", "flannel-ipv4", tables([(NET, SUB)], False, True, True)[0].chains)
    chain = {"chain": {"family": "ip", "table": "flannel-ipv4", "name": "forward", "handle": 2, "prio": 0}}
    rule = {"rule": {"chain": "forward", "handle": 7, "expr": [{"accept": None}]}}
    objs = normalise_listing(_listing({"table": {"name": "flannel-ipv4", "handle": 1}}, chain, rule, rule))
    assert objs[0] == {"table": {"name": "flannel-ipv4"}}
    assert objs[2] == {"rule": {"chain": "forward", "expr": [{"accept": None}]}}
    assert listing_matches(objs, table)
    assert not listing_matches(objs[:-1], table)  # a rule missing
    assert not listing_matches(objs + [rule], table)  # one too many
    assert not listing_matches(objs[:1], table)  # no chain
    for bad in ("", "[]", '{"x": 1}', "not json"):
        with pytest.raises(RulesError):
            normalise_listing(bad)


def test_traffic_manager_follows_enable_nftables():
    opts = SimpleNamespace(ip_masq=True, ip_masq_fully_random_disable=False, iptables_forward_rules=True,
                           iptables_resync_s=5)
    nft = traffic_manager(parse_config('{"Network": "10.5.0.0/16", "EnableNFTables": true}'), opts, SUB)
    ipt = traffic_manager(parse_config('{"Network": "10.5.0.0/16"}'), opts, SUB)
    assert isinstance(nft, NftRules) and isinstance(ipt, TrafficRules)
    assert nft.cleanup is not None and ipt.cleanup is not None  # each removes the other mode's rules


def test_traffic_manager_takes_the_ipv6_pair():
    """Issue 13.6: dual stack gets the ip6tables rules too (a second TrafficRules with ip6tables),
    nftables mode fills its ip6 table; IPv6-only has no IPv4 rules at all."""
    opts = SimpleNamespace(ip_masq=True, ip_masq_fully_random_disable=False, iptables_forward_rules=True,
                           iptables_resync_s=5)
    net6, sub6 = IPv6Network("fd80::/48"), IPv6Network("fd80:0:0:1::/64")
    dual = '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd80::/48"%s}'
    ipt = traffic_manager(parse_config(dual % ""), opts, SUB, own_subnet6=sub6, prev_subnet6=IPv6Network("fd80:0:0:9::/64"))
    assert isinstance(ipt, FamilyRules)
    v4, v6 = ipt.managers
    assert (v4.iptables, v4.network, v4.own_subnet) == ("iptables", NET, SUB)
    assert (v6.iptables, v6.iptables_restore, v6.network, v6.own_subnet) == ("ip6tables", "ip6tables-restore", net6, sub6)
    assert v6.prev_subnet == IPv6Network("fd80:0:0:9::/64")
    assert v4.cleanup is None and v6.cleanup is not None  # the nftables tables go once, at the end
    nft = traffic_manager(parse_config(dual % ',"EnableNFTables":true'), opts, SUB, own_subnet6=sub6)
    assert isinstance(nft, NftRules) and nft.networks == [(NET, SUB), (net6, sub6)]
    only6 = '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd80::/48"%s}'
    ipt6 = traffic_manager(parse_config(only6 % ""), opts, None, own_subnet6=sub6)
    assert isinstance(ipt6, TrafficRules) and ipt6.iptables == "ip6tables" and ipt6.cleanup is not None
    nft6 = traffic_manager(parse_config(only6 % ',"EnableNFTables":true'), opts, None, own_subnet6=sub6)
    assert nft6.networks == [(net6, sub6)]
    v4_table, v6_table = tables(nft6.networks, True, True, True)
    assert v4_table.chains == () and [c.name for c in v6_table.chains] == ["postrtg", "forward"]
