"""vxlan, vxlan DirectRouting, host-gw and iptables end to end, through the real daemon.

Each test: a lab (switch + hosts in namespaces), a real etcd, ``pyflanneld`` started with
``start_daemon`` on every host, docker0 and a pod per host from subnet.env. What is asserted is
what an operator sees: ``ip -d link``, ``bridge fdb``, ``ip neigh``, ``ip route``, ``iptables -S``
— exact lines, as upstream flannel programs them (see e2e_helpers: upstream's vxlan and host-gw
backends, and the golden iptables lists of its e2e suite) — and pod to pod pings. Backend-level
behaviour (options, bad data, rollbacks) is in test_vxlan/test_hostgw. Timeouts are bounds for
correctness; how fast things happen is measured by the benchmarks (bench/).
"""

from __future__ import annotations

import json
import os

import pytest
from e2e_helpers import (
    GOLDEN_FORWARD,
    GOLDEN_POSTROUTING,
    NETWORK,
    PREFIX,
    Node,
    Pinger,
    attach_pod,
    config,
    device_addresses,
    fdb,
    golden_fwd,
    golden_postrtg,
    hostgw_expected,
    iptables_s,
    key_of,
    link_line,
    link_mac,
    mentions,
    ping_all,
    ping_df,
    routes,
    rule_packets,
    start_nodes,
    vxlan_expected,
    vxlan_state,
    wait_for,
)

from lab import start_daemon
from lab.wait import wait_timed

pytestmark = pytest.mark.lab

VXLAN = {"Type": "vxlan"}
HOSTGW = {"Type": "host-gw"}
# A bound for correctness, generous for a loaded machine (typically < 0.5 s). How fast the daemons
# converge is measured by the benchmarks (bench/: `start`, `join`), not asserted here.
CONVERGE = 30.0


def record(name: str, seconds: float) -> None:
    """Measured latencies go to $PYFLANNELD_E2E_TIMINGS (one JSON line each) when set."""
    path = os.environ.get("PYFLANNELD_E2E_TIMINGS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"what": name, "seconds": round(seconds, 4)}) + "\n")


def others(nodes, node):
    return [p for p in nodes if p is not node]


def assert_vxlan_converged(nodes, etcd, direct=None, timeout=CONVERGE):
    """Every host's route table, ARP and FDB on flannel.1 equal upstream's entries, exactly."""
    direct = direct or {}
    for n in nodes:
        want = vxlan_expected(n, others(nodes, n), etcd, frozenset(direct.get(n.host.name, ())))
        try:
            wait_for(lambda n=n, want=want: vxlan_state(n) == want, timeout, f"{n.host.name} kernel state")
        except AssertionError:
            pass  # the exact comparison below shows the difference
        assert vxlan_state(n) == want, n.host.name


def assert_vxlan_device(n, etcd, mtu=1450):
    """flannel.1 as upstream creates it; its MAC is the lease's VtepMAC; MTU = subnet.env's."""
    link = link_line(n.host)
    mac = n.vtep_mac(etcd)
    assert f"flannel.1: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu {mtu} " in link, link
    assert f" link/ether {mac} brd ff:ff:ff:ff:ff:ff " in link, link
    assert f" vxlan id 1 local {n.ip} dev eth0 srcport 0 0 dstport 8472 nolearning " in link, link
    assert link_mac(n.host) == mac
    assert n.env["FLANNEL_MTU"] == str(mtu)
    assert device_addresses(n.host) == [f"{n.gw}/32"]
    assert n.lease(etcd) == {"PublicIP": n.ip, "PublicIPv6": None, "BackendType": "vxlan",
                             "BackendData": {"VNI": 1, "VtepMAC": mac}}


def tx_packets(host, dev="flannel.1") -> int:
    return host.ip_json("-s", "link", "show", dev)[0]["stats64"]["tx"]["packets"]


# --- the three data paths ------------------------------------------------------------------------
def test_vxlan_three_hosts(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(VXLAN))
    nodes = start_nodes(lab, [lab.add_host(h) for h in ("h1", "h2", "h3")])
    assert_vxlan_converged(nodes, etcd)
    for n in nodes:
        assert_vxlan_device(n, etcd)
        assert n.env == {"FLANNEL_NETWORK": NETWORK, "FLANNEL_SUBNET": f"{n.subnet.network_address + 1}/24",
                         "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "false"}
    assert len({n.subnet for n in nodes}) == 3 and len({n.vtep_mac(etcd) for n in nodes}) == 3
    before = tx_packets(nodes[0].host)
    assert ping_all([n.pod for n in nodes]) == []
    assert tx_packets(nodes[0].host) > before  # it really went through flannel.1
    # 1450 is exactly right for a 1500 underlay: a full-size packet with DF gets through
    assert ping_df(nodes[0].pod, nodes[1].pod.address, 1450 - 28)
    assert ping_df(nodes[2].pod, nodes[0].pod.address, 1450 - 28)


def test_vxlan_backend_mtu_option(lab, etcd):
    etcd.put(f"{PREFIX}/config", config({"Type": "vxlan", "MTU": 1400}))
    nodes = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")])
    assert_vxlan_converged(nodes, etcd)
    for n in nodes:
        assert_vxlan_device(n, etcd, mtu=1350)
    assert ping_df(nodes[0].pod, nodes[1].pod.address, 1350 - 28)
    assert ping_df(nodes[1].pod, nodes[0].pod.address, 1350 - 28)


def test_vxlan_direct_routing(lab, etcd):
    """h1, h2 share the L2 segment: plain routes between them; h3 sits behind the switch's router
    (192.168.101.0/24), so everyone reaches it, and it reaches everyone, over vxlan."""
    etcd.put(f"{PREFIX}/config", config({"Type": "vxlan", "DirectRouting": True}))
    hosts = [lab.add_host("h1"), lab.add_host("h2"), lab.add_host("h3", subnet="192.168.101.0/24")]
    nodes = start_nodes(lab, hosts)
    n1, n2, n3 = nodes
    assert_vxlan_converged(nodes, etcd, direct={"h1": {"h2"}, "h2": {"h1"}})
    # both kinds of routes, spelled out
    assert f"{n2.subnet} via {n2.ip} dev eth0" in routes(n1.host)
    assert f"{n3.subnet} via {n3.gw} dev flannel.1 onlink" in routes(n1.host)
    assert f"{n1.subnet} via {n1.gw} dev flannel.1 onlink" in routes(n3.host)
    assert fdb(n1.host) == {f"{n3.vtep_mac(etcd)} dst {n3.ip} self permanent"}
    for n in nodes:
        assert_vxlan_device(n, etcd)
    assert ping_all([n.pod for n in nodes]) == []
    # h1 → h2 bypasses flannel.1, h1 → h3 uses it
    before = tx_packets(n1.host)
    assert n1.pod.ping(n2.pod.address, count=3, interval=0.05)
    assert tx_packets(n1.host) == before
    assert n1.pod.ping(n3.pod.address, count=3, interval=0.05)
    assert tx_packets(n1.host) >= before + 3
    # h2 leaves: its direct route goes from h1, its vxlan entries from h3
    mac2 = n2.vtep_mac(etcd)
    assert n2.daemon.stop() == 0
    assert etcd.delete(key_of(n2.subnet)) == 1
    wait_for(lambda: not mentions(n1, n2, mac2) and not mentions(n3, n2, mac2),
             CONVERGE, "h2's entries removed")
    assert_vxlan_converged([n1, n3], etcd, timeout=0)
    assert ping_all([n1.pod, n3.pod]) == []


def test_hostgw_three_hosts(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(HOSTGW))
    nodes = start_nodes(lab, [lab.add_host(h) for h in ("h1", "h2", "h3")])
    for n in nodes:
        want = hostgw_expected(n, others(nodes, n))
        wait_for(lambda n=n, want=want: routes(n.host) == want, CONVERGE, f"{n.host.name} routes")
        assert not n.host.link_exists("flannel.1")
        assert n.env["FLANNEL_MTU"] == "1500"
        assert n.lease(etcd) == {"PublicIP": n.ip, "PublicIPv6": None, "BackendType": "host-gw"}
    assert ping_all([n.pod for n in nodes]) == []
    assert ping_df(nodes[0].pod, nodes[2].pod.address, 1500 - 28)
    # a deleted route comes back and traffic resumes
    n1, n2 = nodes[0], nodes[1]
    n1.host.ip("route", "del", str(n2.subnet))
    _, took = wait_timed(lambda: routes(n1.host) == hostgw_expected(n1, others(nodes, n1)), CONVERGE,
                         "route repaired")
    record("hostgw route repair", took)
    assert n1.pod.wait_ping(n2.pod.address, timeout=30)


# --- membership changes --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_join_reachable_and_deleted_lease_removed(lab, etcd, backend):
    """How fast a join is programmed is measured by `python -m bench join`; here: that it is."""
    etcd.put(f"{PREFIX}/config", config({"Type": backend}))
    nodes = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")])
    assert ping_all([n.pod for n in nodes]) == []

    # join: from h3's subnet.env appearing to the first reply from h3's pod, seen from each other pod
    h3 = lab.add_host("h3")
    d3 = start_daemon(h3, "--iface", "eth0")
    env3 = d3.wait_subnet_env(timeout=CONVERGE)
    t0 = d3.subnet_file.stat().st_mtime  # when the daemon wrote it (wall clock, like ping -D)
    pod3 = attach_pod(lab, h3, env3)
    pingers = [Pinger(n.pod, pod3.address, interval=0.01, timestamps=True, deadline=2 * CONVERGE) for n in nodes]
    try:
        wait_for(lambda: all(p.first_reply() for p in pingers), CONVERGE, "first replies from h3's pod")
    finally:
        for p in pingers:
            p.stop()
    for p in pingers:
        record(f"join-to-reachable {backend}", p.first_reply() - t0)

    n3 = Node(h3, d3, env3, pod3)
    nodes.append(n3)
    if backend == "vxlan":
        assert_vxlan_converged(nodes, etcd)
        mac3 = n3.vtep_mac(etcd)
    else:
        for n in nodes:
            assert routes(n.host) == hostgw_expected(n, others(nodes, n)), n.host.name
        mac3 = None
    assert ping_all([n.pod for n in nodes]) == []

    # leave: stop h3's daemon (its entries stay everywhere), then delete its lease
    assert d3.stop() == 0
    assert all(mentions(n, n3, mac3) for n in nodes[:2])
    assert etcd.delete(key_of(n3.subnet)) == 1
    _, took = wait_timed(lambda: not any(mentions(n, n3, mac3) for n in nodes[:2]),
                         CONVERGE, "h3's entries removed")
    record(f"lease-delete-to-removed {backend}", took)
    rest = nodes[:2]
    if backend == "vxlan":
        assert_vxlan_converged(rest, etcd, timeout=0)
    else:
        for n in rest:
            assert routes(n.host) == hostgw_expected(n, others(rest, n))
    assert ping_all([n.pod for n in rest]) == []


def test_restart_keeps_subnet_mac_and_traffic(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(VXLAN))
    nodes = start_nodes(lab, [lab.add_host(h) for h in ("h1", "h2", "h3")], "--ip-masq")
    n1, n2, n3 = nodes
    assert_vxlan_converged(nodes, etcd)
    lease_before = etcd.get(key_of(n1.subnet))
    mac_before = link_mac(n1.host)
    states_before = [vxlan_state(n) for n in nodes]
    # pings at 20/s across the whole restart, both ways between h2 and h3, and from h1's own pod
    pingers = [Pinger(n2.pod, n3.pod.address), Pinger(n3.pod, n2.pod.address), Pinger(n1.pod, n2.pod.address)]

    def more_replies(than: list[int], what: str) -> list[int]:
        """Wait until every pinger got 5 replies more than `than`; the counts now."""
        wait_for(lambda: all(p.replies() >= n + 5 for p, n in zip(pingers, than, strict=True)), CONVERGE, what)
        return [p.replies() for p in pingers]

    got = more_replies([0, 0, 0], "replies before the stop")
    assert n1.daemon.stop() == 0
    got = more_replies(got, "replies while h1's daemon is down")
    n1.daemon.restart()
    wait_for(lambda: n1.daemon.log_text().count("peer leases listed") == 2, CONVERGE, "restarted daemon ready")
    more_replies(got, "replies after the restart")  # so the pingers ran before, during and after the restart
    counts = [p.stop() for p in pingers]
    assert [p.lost() for p in pingers] == [[], [], []], counts  # not one packet lost
    assert n1.daemon.subnet_env() == n1.env
    assert etcd.get(key_of(n1.subnet)) == lease_before
    assert link_mac(n1.host) == mac_before == n1.vtep_mac(etcd)
    assert [vxlan_state(n) for n in nodes] == states_before
    assert len(etcd.get_prefix(f"{PREFIX}/subnets/")) == 3
    # the rules were re-applied, not duplicated (upstream #1337)
    assert iptables_s(n1.host, "nat", "FLANNEL-POSTRTG") == golden_postrtg(NETWORK, str(n1.subnet))
    assert iptables_s(n1.host, "nat", "POSTROUTING") == GOLDEN_POSTROUTING
    assert iptables_s(n1.host, "filter", "FORWARD") == GOLDEN_FORWARD

    # a reboot loses the device: same subnet (subnet.env), new VtepMAC, and every peer follows
    assert n1.daemon.stop() == 0
    n1.host.ip("link", "del", "flannel.1")
    n1.daemon.restart()
    wait_for(lambda: n1.daemon.log_text().count("peer leases listed") == 3, CONVERGE, "rebooted daemon ready")
    assert n1.daemon.subnet_env() == n1.env
    new_mac = n1.vtep_mac(etcd)
    assert new_mac != mac_before and link_mac(n1.host) == new_mac
    assert_vxlan_converged(nodes, etcd)  # h2/h3: old MAC's FDB entry gone, new one in
    assert_vxlan_device(n1, etcd)
    assert ping_all([n.pod for n in nodes]) == []
    assert "Traceback" not in n1.daemon.log_text()


# --- drift ---------------------------------------------------------------------------------------
def test_vxlan_drift_repaired(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(VXLAN))
    nodes = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")])
    n1, n2 = nodes
    assert_vxlan_converged(nodes, etcd)
    want = vxlan_expected(n1, [n2], etcd)
    mac1, mac2 = n1.vtep_mac(etcd), n2.vtep_mac(etcd)
    h = n1.host
    breakages = {
        "route": lambda: h.ip("route", "del", str(n2.subnet), "dev", "flannel.1"),
        "arp": lambda: h.ip("neigh", "del", n2.gw, "dev", "flannel.1"),
        "fdb": lambda: h.bridge("fdb", "del", mac2, "dev", "flannel.1", "dst", n2.ip, "self"),
        "device": lambda: h.ip("link", "del", "flannel.1"),
        "device down": lambda: h.ip("link", "set", "flannel.1", "down"),  # the kernel drops routes+ARP
    }

    def repaired() -> bool:
        return h.link_exists("flannel.1") and ",UP," in link_line(h) and vxlan_state(n1) == want

    for what, breakit in breakages.items():
        breakit()  # check=True: the entry was there
        _, took = wait_timed(repaired, CONVERGE, f"{what} repaired", detail=lambda: vxlan_state(n1))
        record(f"vxlan {what} repair", took)
        assert n1.pod.wait_ping(n2.pod.address, timeout=30), what
        assert n2.pod.wait_ping(n1.pod.address, timeout=30), what
    # the recreated device is upstream's device again, with the VtepMAC peers know
    assert link_mac(h) == mac1 == n1.vtep_mac(etcd)
    assert_vxlan_device(n1, etcd)
    assert "Traceback" not in n1.daemon.log_text()


def test_stale_peer_removed_at_start(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(VXLAN))
    nodes = start_nodes(lab, [lab.add_host(h) for h in ("h1", "h2", "h3")])
    n1, n2, n3 = nodes
    assert_vxlan_converged(nodes, etcd)
    mac2 = n2.vtep_mac(etcd)
    assert n1.daemon.stop() == 0
    assert n2.daemon.stop() == 0
    assert etcd.delete(key_of(n2.subnet)) == 1
    assert mentions(n1, n2, mac2)  # nobody on h1 noticed
    n1.daemon.restart()
    wait_for(lambda: n1.daemon.log_text().count("peer leases listed") == 2, CONVERGE, "restarted daemon ready")
    wait_for(lambda: not mentions(n1, n2, mac2), CONVERGE, "h2's entries gone from h1")
    assert vxlan_state(n1) == vxlan_expected(n1, [n3], etcd)  # h3's entries untouched
    assert n1.pod.wait_ping(n3.pod.address, timeout=30)
    assert n3.pod.wait_ping(n1.pod.address, timeout=30)
    assert not mentions(n3, n2, mac2)  # h3's daemon saw the delete live


# --- iptables ------------------------------------------------------------------------------------
def test_ip_masq_rules_golden_and_restored(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(VXLAN))
    nodes = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")], "--ip-masq", "--iptables-resync", "1")
    n1, n2 = nodes
    for n in nodes:
        h = n.host
        assert n.env["FLANNEL_IPMASQ"] == "true"
        assert n.daemon.subnet_file.read_text().endswith("FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
        assert iptables_s(h, "nat", "FLANNEL-POSTRTG") == golden_postrtg(NETWORK, str(n.subnet))
        assert iptables_s(h, "nat", "POSTROUTING") == GOLDEN_POSTROUTING
        assert iptables_s(h, "filter", "FLANNEL-FWD") == golden_fwd(NETWORK)
        assert iptables_s(h, "filter", "FORWARD") == GOLDEN_FORWARD
    assert_vxlan_converged(nodes, etcd)

    # pod → pod is not masqueraded (the "-s podCIDR -d Network RETURN" rule takes it) ...
    h1 = n1.host
    before = rule_packets(h1, "nat", "FLANNEL-POSTRTG")
    assert n1.pod.ping(n2.pod.address)
    after = rule_packets(h1, "nat", "FLANNEL-POSTRTG")
    assert after[1] == before[1] + 1 and after[4:] == before[4:], (before, after)
    # ... pod → outside is (the switch has no route back to 10.5.0.0/16: it only answers h1's IP)
    assert n1.pod.ping(h1.gateway)
    assert rule_packets(h1, "nat", "FLANNEL-POSTRTG")[4] == after[4] + 1

    # a flushed chain, a lost jump, a flushed forward chain: each put back by the resync (every 1 s),
    # which says so in the log (the break is not checked in between: the resync may be quicker)
    restoring = "iptables rules differ from the expected ones; restoring"
    for table, chain, breakit, golden in [
        ("nat", "FLANNEL-POSTRTG", ["-t", "nat", "-F", "FLANNEL-POSTRTG"], golden_postrtg(NETWORK, str(n1.subnet))),
        ("nat", "POSTROUTING", ["-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq",
                                "-j", "FLANNEL-POSTRTG"], GOLDEN_POSTROUTING),
        ("filter", "FLANNEL-FWD", ["-F", "FLANNEL-FWD"], golden_fwd(NETWORK)),
    ]:
        repairs = n1.daemon.log_text().count(restoring)
        h1.run("iptables", "-w", *breakit)  # check=True: it was there to break
        _, took = wait_timed(lambda t=table, c=chain, g=golden, r=repairs: n1.daemon.log_text().count(restoring) > r
                             and iptables_s(h1, t, c) == g, CONVERGE, f"{chain} restored",
                             detail=lambda t=table, c=chain: iptables_s(h1, t, c))
        record(f"iptables {chain} restore", took)
    assert n1.pod.ping(h1.gateway)
