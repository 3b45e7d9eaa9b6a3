"""Hints where the cause is the host, not pyflanneld (issue 11.7): each is one warning line, said
once, naming the cause and the fix — not an error repeated every resync.

* host-gw with a peer on another L3 segment (the lab's second underlay, 192.168.101.0/24);
* the FORWARD chain's policy DROP with --iptables-forward-rules=false, or in nftables mode;
* flannel rules in the other iptables backend (legacy vs nft) than the one pyflanneld uses.

(`--ip-masq true` is in test_options.py: it is a command-line matter, tested on the real CLI.)
"""

from __future__ import annotations

import json
import re

import pytest
from e2e_helpers import config, ping_all, start_nodes
from helpers import PREFIX, key_of, subnet_of, wait_for

from lab.cluster import start_daemon

pytestmark = pytest.mark.lab

L2_HINT = "host-gw needs all hosts on one L2 segment; use vxlan, or vxlan with DirectRouting"


def test_hostgw_peer_on_another_l3_segment_is_explained_once(lab, etcd):
    etcd.put(f"{PREFIX}/config", config({"Type": "host-gw"}))
    h1 = lab.add_host("h1")                               # 192.168.100.1
    h3 = lab.add_host("h3", subnet="192.168.101.0/24")    # 192.168.101.1: routed, not bridged, to h1
    d1, d3 = start_daemon(h1, "--iface", "eth0"), start_daemon(h3, "--iface", "eth0")
    sn1, sn3 = subnet_of(d1.wait_subnet_env()), subnet_of(d3.wait_subnet_env())
    # a peer on h1's own segment (its lease only): its route is the sign that a repair pass ran
    near = "10.5.250.0/24"
    etcd.put(key_of(near), json.dumps({"PublicIP": "192.168.100.77", "BackendType": "host-gw"}))
    wait_for(lambda: f"{near} via 192.168.100.77 dev eth0" in h1.ip("route"), timeout=30, what="near route")

    # one line per peer on the other segment: h1 has one (h3), h3 two (h1 and the near peer)
    for d, want in ((d1, {(sn3, "192.168.101.1")}), (d3, {(sn1, "192.168.100.1"), (near, "192.168.100.77")})):
        wait_for(lambda d=d, want=want: d.log_text().count(L2_HINT) == len(want), timeout=30, what="hints")
        hints = [ln for ln in d.log_text().splitlines() if L2_HINT in ln]
        assert {(sn, ip) for sn, ip in want if any(f"subnet={sn} public_ip={ip}" in ln for ln in hints)} == want

    # a repair pass (the near route deleted by hand) retries the unreachable route too: silently
    h1.ip("route", "del", near)
    wait_for(lambda: f"{near} via 192.168.100.77 dev eth0" in h1.ip("route"), timeout=30, what="repair")
    text = d1.log_text()
    assert text.count(L2_HINT) == 1
    for t in (text, d3.log_text()):  # h3 got the near peer as a lease event: explained, not failed
        assert not [bad for bad in ("route recovery failed", "peer programming failed", "backend call failed")
                    if bad in t]
    assert str(sn3) not in h1.ip("route")
    assert d1.alive and d3.alive


FWD_HINT = "the FORWARD chain's policy is DROP and --iptables-forward-rules is off"
OTHER_HINT = "flannel rules found in iptables-legacy, but pyflanneld uses iptables-nft"


@pytest.fixture
def alloc_host(lab, etcd):
    etcd.put(f"{PREFIX}/config", config({"Type": "alloc"}))
    h = lab.add_host("h1")
    assert "nf_tables" in h.run("iptables", "--version").stdout  # Debian 12's default
    return h


def test_forward_policy_drop_without_forward_rules_is_a_hint(alloc_host):
    h = alloc_host
    h.run("iptables", "-P", "FORWARD", "DROP")  # as Docker sets it
    d = start_daemon(h, "--iface", "eth0", "--iptables-forward-rules=false")
    d.wait_subnet_env()
    wait_for(lambda: FWD_HINT in d.log_text(), timeout=30, what="the FORWARD hint")
    text = d.log_text()
    assert text.count(FWD_HINT) == 1 and "network=10.5.0.0/16" in text
    assert "set --iptables-forward-rules=true or accept it yourself" in text
    assert OTHER_HINT not in text  # the same check pass looked at iptables-legacy: nothing there
    assert d.alive


def test_flannel_rules_in_the_other_iptables_backend_are_a_hint(alloc_host):
    h = alloc_host
    # what an upstream flanneld built with iptables-legacy leaves behind
    h.run("iptables-legacy-restore", "--noflush", input=(
        "*nat\n:FLANNEL-POSTRTG - [0:0]\n"
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG\n'
        '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE\n'
        "COMMIT\n"))
    h.run("iptables", "-P", "FORWARD", "DROP")  # with forward rules on (the default) that is fine
    d = start_daemon(h, "--iface", "eth0", "--ip-masq")
    d.wait_subnet_env()
    wait_for(lambda: OTHER_HINT in d.log_text(), timeout=30, what="the other-backend hint")
    text = d.log_text()
    assert text.count(OTHER_HINT) == 1
    assert 'chains="nat/FLANNEL-POSTRTG nat/POSTROUTING"' in text
    assert FWD_HINT not in text
    # the fix the line suggests works
    fix = text.split("remove them, e.g. `", 1)[1].split("`", 1)[0]
    h.sh(fix)
    assert "FLANNEL" not in h.run("iptables-legacy-save").stdout
    assert d.alive


NFT_FWD_HINT = "the iptables FORWARD chain's policy is DROP: in nftables mode flannel's accept rules"


def policy_drops(host) -> int:
    """Packets dropped by the iptables FORWARD chain's policy (``Chain FORWARD (policy DROP N packets``)."""
    head = host.run("iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n").stdout.splitlines()[0]
    m = re.search(r"policy DROP (\d+) packets", head)
    assert m, head
    return int(m[1])


def test_forward_policy_drop_in_nftables_mode_is_a_hint_and_its_fix_works(lab, etcd):
    """In nftables mode flannel's forward accept is in its own table: iptables' FORWARD policy DROP
    (another base chain on the hook) still drops pod traffic, forward rules or not."""
    etcd.put(f"{PREFIX}/config", json.dumps({"Network": "10.5.0.0/16", "EnableNFTables": True,
                                             "Backend": {"Type": "vxlan"}}))
    hosts = [lab.add_host("h1"), lab.add_host("h2")]
    for h in hosts:
        h.run("iptables", "-P", "FORWARD", "DROP")
    nodes = start_nodes(lab, hosts)
    for n in nodes:
        wait_for(lambda n=n: NFT_FWD_HINT in n.daemon.log_text(), timeout=30, what="the nftables FORWARD hint")
        assert n.daemon.log_text().count(NFT_FWD_HINT) == 1
    # what the hint says: pod traffic is dropped — by that policy (its counter counts the pings)
    dropped = [policy_drops(h) for h in hosts]
    assert len(ping_all([n.pod for n in nodes], timeout=2)) == 2
    assert all(policy_drops(h) > before for h, before in zip(hosts, dropped, strict=True))
    text = nodes[0].daemon.log_text()
    fix = text.split(NFT_FWD_HINT, 1)[1].split("e.g. `", 1)[1].split("`", 1)[0]
    for h in hosts:
        h.sh(fix)
    assert ping_all([n.pod for n in nodes]) == []  # and its fix works
