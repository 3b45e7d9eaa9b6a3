"""Untrusted etcd data (issue 10), end to end: a hostile or broken writer under <prefix>/ must not
hurt a host, crash a daemon or confuse the operator.

Real etcd, real daemons in namespaces, vxlan, a pod per host. For each bad lease (cases 1-5)
traffic between the healthy hosts is checked before (pings, exact kernel state), during (a
continuous ping that must lose nothing while the bad key exists and is deleted) and after; the
bad key's rejection is read from /readyz (the positive sign that it was processed). Then the
network config (cases 6-8) and a mixed cluster with the real upstream flanneld (valid upstream
leases are never rejected).
"""

from __future__ import annotations

import json
import random
import re
from ipaddress import IPv4Network

import pytest
from e2e_helpers import (
    PREFIX,
    Node,
    Pinger,
    attach_pod,
    config,
    fdb,
    key_of,
    ping_all,
    start_nodes,
    vxlan_expected,
    vxlan_state,
    wait_for,
)
from helpers import http_get, upstream_or_skip

from lab import start_daemon
from lab.upstream import settle

pytestmark = pytest.mark.lab

HZ = 8491
HZ_ARGS = ("--healthz-port", str(HZ), "--healthz-ip", "127.0.0.1")
VXLAN = config({"Type": "vxlan"})
ALLOC = '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}'


# --- helpers ---------------------------------------------------------------------------------------
def vx_value(public_ip, mac: str | None = None, **override) -> str:
    """A vxlan lease value as upstream writes it; ``override`` replaces/removes (None) fields."""
    mac = mac or "02:%02x:%02x:%02x:%02x:%02x" % tuple(random.randrange(256) for _ in range(5))
    d = {"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
         "BackendData": {"VNI": 1, "VtepMAC": mac}}
    for k, v in override.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return json.dumps(d, separators=(",", ":"))


def readyz(node: Node) -> tuple[int, str]:
    return http_get(node.host, HZ, "/readyz")


def rejected(node: Node) -> dict[str, str] | None:
    """The rejected lease entries /readyz lists (``  <key>: <reason>`` lines); None while the host
    is not ready (a starting host answers 503 until its first convergence: wait for it)."""
    code, body = readyz(node)
    if code != 200:
        return None
    return dict(re.findall(r"^  (\S+): (.*)$", body, re.M))


def wait_rejected(nodes: list[Node], key: str, problems: dict[str, str], timeout: float = 30) -> None:
    """Each node lists ``key`` as rejected in /readyz with its reason containing problems[host]."""
    for n in nodes:
        want = problems[n.host.name]
        wait_for(lambda n=n, want=want: want in ((rejected(n) or {}).get(key, "")), timeout,
                 f"{n.host.name} rejects {key} ({want})")


def wait_forgotten(nodes: list[Node], key: str, timeout: float = 15) -> None:
    """The delete of a rejected key was processed: /readyz no longer lists it."""
    for n in nodes:
        wait_for(lambda n=n: (r := rejected(n)) is not None and key not in r, timeout, f"{n.host.name} forgets {key}")


def assert_converged(nodes: list[Node], etcd, timeout: float = 10) -> None:
    """Every host's routes, ARP and FDB are exactly the healthy peers' entries (upstream's)."""
    for n in nodes:
        want = vxlan_expected(n, [p for p in nodes if p is not n], etcd)
        try:
            wait_for(lambda n=n, want=want: vxlan_state(n) == want, timeout, f"{n.host.name} kernel state")
        except AssertionError:
            pass  # the exact comparison shows the difference
        assert vxlan_state(n) == want, n.host.name


def wait_full_pass(n: Node) -> None:
    """Plant a stale ARP entry on flannel.1 (harmless: 10.5.0.0/24 is never leased) and wait until
    a full kernel pass (started by the entry's netlink event) removes it: the pass that, before the
    gate, re-programmed a bad lease or failed on one at every round."""
    n.host.ip("neigh", "add", "10.5.0.250", "lladdr", "02:00:00:00:00:fa", "dev", "flannel.1", "nud", "permanent")
    wait_for(lambda: "10.5.0.250 " not in n.host.ip("neigh", "show", "dev", "flannel.1"), 30,
             f"{n.host.name}: a reconcile pass")


class Traffic:
    """Continuous pings both ways between two healthy hosts' pods, from before a bad write to after
    its deletion; ``assert_nothing_lost`` stops them."""

    def __init__(self, a: Node, b: Node) -> None:
        self.pingers = [Pinger(a.pod, b.pod.address, interval=0.1), Pinger(b.pod, a.pod.address, interval=0.1)]

    def wait_running(self, replies: int = 5, timeout: float = 30) -> None:
        """Wait until each direction has had ``replies`` answers: call it while the bad key is in
        etcd, so the traffic provably ran across it (the daemons handle a key in milliseconds)."""
        for p in self.pingers:
            wait_for(lambda p=p: len(re.findall(r"bytes from .*icmp_seq=", p.proc.log_text())) >= replies,
                     timeout, f"{replies} ping replies from {p.pod.ns}")

    def assert_nothing_lost(self) -> None:
        results = [(p.stop(wait=0), p.lost()) for p in self.pingers]
        for (sent, _), lost in results:
            assert sent >= 5, results  # it really ran while the bad key was there
            assert lost == [], results


def healthy_pair(lab, etcd) -> list[Node]:
    etcd.put(f"{PREFIX}/config", VXLAN)
    nodes = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")], *HZ_ARGS, timeout=30)
    assert_converged(nodes, etcd)
    assert ping_all([n.pod for n in nodes]) == []
    for n in nodes:
        assert readyz(n) == (200, "flanneld is ready")
    return nodes


def no_crash(nodes: list[Node]) -> None:
    for n in nodes:
        text = n.daemon.log_text()
        assert n.daemon.alive, text[-3000:]
        for bad in ("Traceback", "internal error", "background task failed", "RecursionError", "set failed",
                    "peer programming failed", "backend call failed"):
            assert bad not in text, (n.host.name, bad, text[-3000:])


# --- leases ----------------------------------------------------------------------------------------
def test_case1_lease_outside_network_never_touches_the_underlay(lab, etcd):
    nodes = healthy_pair(lab, etcd)
    traffic = Traffic(*nodes)
    key = f"{PREFIX}/subnets/192.168.100.0-24"  # the underlay itself
    etcd.put(key, vx_value("192.168.100.77"))
    why = "subnet 192.168.100.0/24 is outside the flannel Network 10.5.0.0/16"
    wait_rejected(nodes, "192.168.100.0-24", {"h1": why, "h2": why})
    assert_converged(nodes, etcd, timeout=0)  # the connected "192.168.100.0/24 dev eth0" route is intact
    wait_full_pass(nodes[0])
    assert_converged(nodes, etcd, timeout=0)
    for n in nodes:
        assert n.host.ping(etcd.ip), f"{n.host.name} lost its underlay"
    traffic.wait_running()
    etcd.delete(key)
    wait_forgotten(nodes, "192.168.100.0-24")
    traffic.assert_nothing_lost()
    assert_converged(nodes, etcd, timeout=0)
    assert ping_all([n.pod for n in nodes]) == []
    for n in nodes:
        assert n.daemon.log_text().count(f"key={key}") == 1  # one warning per host
        assert readyz(n) == (200, "flanneld is ready")
    no_crash(nodes)


def test_case1_network_containing_the_underlay_never_leases_or_routes_it(lab, etcd):
    """The flannel Network contains the hosts' own network (192.168.0.0/16 around 192.168.100.0/24,
    like 10.0.0.0/8 around nodes in 10.0.1.0/24): no host leases the underlay's subnet (docker0
    would take the underlay's addresses), and a lease for it or part of it, though inside Network,
    is rejected on every host whose underlay it is — its route would replace the connected one."""
    etcd.put(f"{PREFIX}/config", json.dumps({"Network": "192.168.0.0/16", "SubnetMin": "192.168.99.0",
                                              "SubnetMax": "192.168.101.0", "Backend": {"Type": "vxlan"}}))
    nodes = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")], *HZ_ARGS, timeout=30)
    assert sorted(str(n.subnet) for n in nodes) == ["192.168.101.0/24", "192.168.99.0/24"]
    for n in nodes:
        line = n.daemon.wait_log(r".*overlaps this host's underlay.*", timeout=10)[0]
        assert "192.168.0.0/16" in line and "192.168.100.0/24" in line, line
    assert_converged(nodes, etcd)
    traffic = Traffic(*nodes)
    for sn in ("192.168.100.0-24", "192.168.100.128-25"):
        etcd.put(f"{PREFIX}/subnets/{sn}", vx_value("192.168.100.77"))
        why = f"subnet {sn.replace('-', '/')} overlaps this host's underlay network 192.168.100.0/24"
        wait_rejected(nodes, sn, {"h1": why, "h2": why})
    assert_converged(nodes, etcd, timeout=0)  # the connected "192.168.100.0/24 dev eth0" route is intact
    for n in nodes:
        assert n.host.ping(etcd.ip), f"{n.host.name} lost its underlay"
    traffic.wait_running()
    for sn in ("192.168.100.0-24", "192.168.100.128-25"):
        etcd.delete(f"{PREFIX}/subnets/{sn}")
        wait_forgotten(nodes, sn)
    traffic.assert_nothing_lost()
    assert_converged(nodes, etcd, timeout=0)
    no_crash(nodes)


def test_case2_lease_overlapping_a_peer_or_the_own_subnet(lab, etcd):
    n1, n2 = nodes = healthy_pair(lab, etcd)
    traffic = Traffic(n1, n2)
    # half of h2's subnet, written after h2's lease: h2's ARP entry on h1 must not be overwritten
    bad = f"{n2.subnet.network_address}-25"
    etcd.put(f"{PREFIX}/subnets/{bad}", vx_value("192.168.100.99"))
    wait_rejected(nodes, bad, {"h1": f"overlaps the lease {n2.subnet.network_address}-24, which was created first",
                               "h2": f"overlaps this host's own subnet {n2.subnet}"})
    assert_converged(nodes, etcd, timeout=0)
    # ... and deleting it must not delete h2's entries either
    traffic.wait_running()
    etcd.delete(f"{PREFIX}/subnets/{bad}")
    wait_forgotten(nodes, bad)
    assert_converged(nodes, etcd, timeout=0)
    # one overlapping h1's own subnet: never a route over h1's own (that failed at every reconcile)
    bad_own = f"{n1.subnet.network_address}-25"
    etcd.put(f"{PREFIX}/subnets/{bad_own}", vx_value("192.168.100.98"))
    wait_rejected(nodes, bad_own, {"h1": f"overlaps this host's own subnet {n1.subnet}",
                                   "h2": f"overlaps the lease {n1.subnet.network_address}-24"})
    wait_full_pass(n1)
    wait_full_pass(n2)
    assert_converged(nodes, etcd, timeout=0)
    etcd.delete(f"{PREFIX}/subnets/{bad_own}")
    wait_forgotten(nodes, bad_own)
    traffic.assert_nothing_lost()
    assert_converged(nodes, etcd, timeout=0)
    assert ping_all([n.pod for n in nodes]) == []
    no_crash(nodes)


def test_case3_lease_reusing_a_peers_vtep_mac(lab, etcd):
    n1, n2 = nodes = healthy_pair(lab, etcd)
    traffic = Traffic(n1, n2)
    mac2 = n2.vtep_mac(etcd)
    bad = "10.5.250.0-24"  # a free subnet, another PublicIP, h2's VtepMAC (upper case: same MAC)
    etcd.put(f"{PREFIX}/subnets/{bad}", vx_value("192.168.100.250", mac2.upper()))
    wait_rejected(nodes, bad, {"h1": f"VtepMAC {mac2} is already the VtepMAC of the lease {n2.subnet.network_address}-24",
                               "h2": f"VtepMAC {mac2} is this host's own VtepMAC"})
    assert fdb(n1.host) == {f"{mac2} dst {n2.ip} self permanent"}  # not redirected ...
    wait_full_pass(n1)
    assert fdb(n1.host) == {f"{mac2} dst {n2.ip} self permanent"}  # ... nor flapping with reconciles
    assert_converged(nodes, etcd, timeout=0)
    traffic.wait_running()
    etcd.delete(f"{PREFIX}/subnets/{bad}")
    wait_forgotten(nodes, bad)
    traffic.assert_nothing_lost()
    assert_converged(nodes, etcd, timeout=0)
    assert ping_all([n.pod for n in nodes]) == []
    no_crash(nodes)


def test_case4_deeply_nested_value_crashes_nothing(lab, etcd):
    n1, n2 = nodes = healthy_pair(lab, etcd)
    traffic = Traffic(n1, n2)
    bad = "10.5.251.0-24"
    deep = "[" * 100_000 + "]" * 100_000
    etcd.etcdctl("put", "--", f"{PREFIX}/subnets/{bad}", input=deep)  # 200 kB: too long for argv
    wait_rejected(nodes, bad, {h: "nested more than 100 deep" for h in ("h1", "h2")})
    # the watch goes on: a new lease and its removal are applied while the bad key exists
    good = IPv4Network("10.5.240.0/24")
    etcd.put(key_of(good), vx_value("192.168.100.240"))
    for n in nodes:
        wait_for(lambda n=n: f"{good} via 10.5.240.0 dev flannel.1 onlink" in vxlan_state(n)["routes"], 30,
                 f"{n.host.name} programs {good}")
    traffic.wait_running()
    etcd.delete(key_of(good))
    assert_converged(nodes, etcd)
    # a daemon starting while the key exists starts normally (it used to exit with RecursionError)
    h3 = lab.add_host("h3")
    d3 = start_daemon(h3, "--iface", "eth0", *HZ_ARGS)
    env3 = d3.wait_subnet_env(timeout=30)
    n3 = Node(h3, d3, env3, attach_pod(lab, h3, env3))
    wait_rejected([n3], bad, {"h3": "nested more than 100 deep"})
    assert_converged([*nodes, n3], etcd)
    assert ping_all([n.pod for n in (*nodes, n3)]) == []
    etcd.delete(f"{PREFIX}/subnets/{bad}")
    wait_forgotten([*nodes, n3], bad)
    traffic.assert_nothing_lost()
    no_crash([*nodes, n3])


def test_case4_v2_directories_nested_under_subnets_are_no_leases(lab, etcd):
    """etcd v2 allows directories: 600 nested under subnets/ made the recursive v2 listing too deep
    for Python's JSON decoder (the daemon exited with RecursionError). Only direct children are
    leases, in the list and in the watch."""
    h1 = lab.add_host("h1")
    etcd.v2_put(f"{PREFIX}/config", ALLOC)
    deep_dir = f"{PREFIX}/subnets/" + "/".join(["d"] * 600)
    etcd.v2_put(f"{deep_dir}/x", "[1]")
    d = start_daemon(h1, "--iface", "eth0", "--etcd-api", "v2", *HZ_ARGS)
    d.wait_subnet_env(timeout=30)

    def peers() -> set[str]:
        code, body = http_get(h1, HZ, "/peers")
        assert code == 200, body
        return {p["subnet"] for p in json.loads(body)}

    lease = '{"PublicIP":"192.168.100.%d","PublicIPv6":null}'
    etcd.v2_put(f"{PREFIX}/subnets/d/10.1.241.0-24", lease % 241)  # nested: not a lease
    etcd.v2_put(f"{PREFIX}/subnets/10.1.242.0-24", lease % 242)
    wait_for(lambda: "10.1.242.0/24" in peers(), 30, "a lease after the nested one is applied")
    assert peers() == {"10.1.242.0/24"}
    d.restart()  # the list at start skips the nested directories too
    wait_for(lambda: d.log_text().count("peer leases listed") == 2, 30, "relisted after the restart")
    # applied a moment after the list: wait for exactly the real lease
    wait_for(lambda: peers() == {"10.1.242.0/24"}, 30, "the real peer after the restart, no nested key",
             detail=peers)
    text = d.log_text()
    assert d.alive
    for bad in ("Traceback", "internal error", "RecursionError", "background task failed", "watch failed"):
        assert bad not in text, (bad, text[-3000:])


def test_case4_v3_keys_nested_under_subnets_are_no_leases(lab, etcd):
    """v3 keys are flat, but `subnets/x/10.1.242.0-24` is under the prefix too. Read by its last path
    element it stood in for the real lease of that name: the peer's traffic went to the nested key's
    PublicIP, deleting it dropped the real peer, and one named like the own lease made the daemon
    think it was taken over. Only direct children are leases, in the list and in the watch."""
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1, "--iface", "eth0", *HZ_ARGS)
    own = IPv4Network(d.wait_subnet_env(timeout=30)["FLANNEL_SUBNET"], strict=False)

    def peers() -> dict[str, str]:
        code, body = http_get(h1, HZ, "/peers")
        assert code == 200, body
        return {p["subnet"]: p["PublicIP"] for p in json.loads(body)}

    lease = '{"PublicIP":"192.168.100.%d","PublicIPv6":null}'
    etcd.put(f"{PREFIX}/subnets/10.1.242.0-24", lease % 242)
    wait_for(lambda: "10.1.242.0/24" in peers(), 30, "the real peer lease is applied")
    for name in ("10.1.242.0-24", key_of(own).rsplit("/", 1)[1], "10.1.241.0-24"):
        etcd.put(f"{PREFIX}/subnets/x/{name}", lease % 66)  # nested: not a lease
    etcd.put(f"{PREFIX}/subnets/10.1.243.0-24", lease % 243)
    wait_for(lambda: "10.1.243.0/24" in peers(), 30, "a lease after the nested ones is applied")
    assert peers() == {"10.1.242.0/24": "192.168.100.242", "10.1.243.0/24": "192.168.100.243"}
    etcd.delete(f"{PREFIX}/subnets/x/", prefix=True)
    etcd.put(f"{PREFIX}/subnets/10.1.244.0-24", lease % 244)
    wait_for(lambda: "10.1.244.0/24" in peers(), 30, "a lease after the deletes is applied")
    assert set(peers()) == {"10.1.242.0/24", "10.1.243.0/24", "10.1.244.0/24"}  # the real peer stays
    etcd.put(f"{PREFIX}/subnets/x/10.1.242.0-24", lease % 66)
    d.restart()  # the list at start skips nested keys too
    wait_for(lambda: d.log_text().count("peer leases listed") == 2, 30, "relisted after the restart")
    want = {"10.1.242.0/24": "192.168.100.242", "10.1.243.0/24": "192.168.100.243",
            "10.1.244.0/24": "192.168.100.244"}
    # the listed peers are applied a moment after the list: wait for exactly the three real ones
    wait_for(lambda: peers() == want, 30, "the three real peers after the restart, no nested key", detail=peers)
    text = d.log_text()
    assert d.alive
    for bad in ("taken over", "own lease lost", "Traceback", "internal error"):
        assert bad not in text, (bad, text[-3000:])


def test_case5_public_ip_missing_number_or_boolean(lab, etcd):
    nodes = healthy_pair(lab, etcd)
    traffic = Traffic(*nodes)
    bad = {"10.5.252.0-24": (None, "PublicIP: missing"),
           "10.5.253.0-24": (5, "PublicIP: 5 is not an IPv4 address string"),
           "10.5.254.0-24": (True, "PublicIP: true is not an IPv4 address string")}
    for key, (ip, _) in bad.items():
        value = vx_value("x", PublicIP=None) if ip is None else vx_value(ip)
        etcd.put(f"{PREFIX}/subnets/{key}", value)
    for key, (_, why) in bad.items():
        wait_rejected(nodes, key, {"h1": why, "h2": why})
    for n in nodes:
        assert not [e for e in fdb(n.host) if " dst 0.0.0." in e], fdb(n.host)
    assert_converged(nodes, etcd, timeout=0)
    traffic.wait_running()
    for key in bad:
        etcd.delete(f"{PREFIX}/subnets/{key}")
    for key in bad:
        wait_forgotten(nodes, key)
    traffic.assert_nothing_lost()
    assert_converged(nodes, etcd, timeout=0)
    assert ping_all([n.pod for n in nodes]) == []
    no_crash(nodes)


# --- etcd v2: createdIndex changes with every plain set ---------------------------------------------
def v2_created_index(etcd, key: str) -> int:
    return json.loads(etcd.curl(f"/v2/keys{PREFIX}/subnets/{key}").stdout)["node"]["createdIndex"]


def flannel_routes(host) -> set[str]:
    return {ln.strip() for ln in host.ip("route", "show").splitlines() if "flannel.1" in ln}


def test_v2_upstream_v017_restart_keeps_its_lease_over_a_stray_overlap(lab, etcd):
    """Upstream v0.17 renews and reuses its lease with a plain v2 set, which gives the key a new
    createdIndex: a stray half of its subnet written before then looked "created first" and took
    the upstream host's traffic, on running pyflanneld hosts and on ones started later."""
    binary = upstream_or_skip("v0.17.0")
    etcd.v2_put(f"{PREFIX}/config", VXLAN)
    h1, h2, h3 = (lab.add_host(h) for h in ("h1", "h2", "h3"))
    up = start_daemon(h1, "--iface", "eth0", binary=binary)
    sn1 = IPv4Network(up.wait_subnet_env(timeout=30)["FLANNEL_SUBNET"], strict=False)
    key1, stray = f"{sn1.network_address}-24", f"{sn1.network_address}-25"
    route1 = f"{sn1} via {sn1.network_address} dev flannel.1 onlink"
    d2 = start_daemon(h2, "--iface", "eth0", "--etcd-api", "v2", *HZ_ARGS)
    d2.wait_subnet_env(timeout=30)
    wait_for(lambda: route1 in flannel_routes(h2), 30, "h2 programs the upstream host")
    etcd.v2_put(f"{PREFIX}/subnets/{stray}", vx_value("192.168.100.99"))
    n2 = Node(h2, d2, {}, None)
    wait_rejected([n2], stray, {"h2": f"overlaps the lease {key1}, which was created first"})
    before = v2_created_index(etcd, key1)
    written = up.log_text().count("Wrote subnet file")
    up.restart()  # reuses its lease (found by PublicIP) with a plain set
    wait_for(lambda: up.log_text().count("Wrote subnet file") > written, 30, "upstream h1 restarted")
    assert v2_created_index(etcd, key1) > v2_created_index(etcd, stray) > before  # what upstream does
    etcd.v2_put(f"{PREFIX}/subnets/10.5.250.0-24", vx_value("192.168.100.250"))  # processed after the set
    wait_for(lambda: "10.5.250.0/24 via 10.5.250.0 dev flannel.1 onlink" in flannel_routes(h2), 30,
             "h2 applies a lease written after the upstream host's set")
    d3 = start_daemon(h3, "--iface", "eth0", "--etcd-api", "v2", *HZ_ARGS)  # never saw the old index
    d3.wait_subnet_env(timeout=30)
    n3 = Node(h3, d3, {}, None)
    wait_for(lambda: "10.5.250.0/24 via 10.5.250.0 dev flannel.1 onlink" in flannel_routes(h3), 30, "h3 listed")
    for n in (n2, n3):
        assert route1 in flannel_routes(n.host), n.host.name
        assert not [r for r in flannel_routes(n.host) if r.startswith(f"{sn1.network_address}/25")]
        assert rejected(n).keys() == {stray}, rejected(n)
        assert rejected(n)[stray].startswith(f"subnet {sn1.network_address}/25 overlaps the lease {key1}, ")
    # h2 remembers the older index ("created first"); h3 never saw it and goes by the config's shape
    assert rejected(n2)[stray].endswith("which was created first")
    assert "which fits the network config" in rejected(n3)[stray]
    no_crash([n2, n3])


def test_v2_own_writes_keep_the_created_index(lab, etcd):
    """pyflanneld's own v2 writes update its key in place: a restart (lease reuse) keeps the
    createdIndex, so a stray entry reusing the host's VtepMAC stays the one created later, on
    running hosts and on ones started after the restart."""
    etcd.v2_put(f"{PREFIX}/config", VXLAN)
    h1, h2, h3 = (lab.add_host(h) for h in ("h1", "h2", "h3"))
    d1 = start_daemon(h1, "--iface", "eth0", "--etcd-api", "v2", *HZ_ARGS)
    sn1 = IPv4Network(d1.wait_subnet_env(timeout=30)["FLANNEL_SUBNET"], strict=False)
    key1 = f"{sn1.network_address}-24"
    mac1 = json.loads(etcd.v2_get(f"{PREFIX}/subnets/{key1}"))["BackendData"]["VtepMAC"]
    d2 = start_daemon(h2, "--iface", "eth0", "--etcd-api", "v2", *HZ_ARGS)
    d2.wait_subnet_env(timeout=30)
    n2 = Node(h2, d2, {}, None)
    stray = "10.5.250.0-24"
    etcd.v2_put(f"{PREFIX}/subnets/{stray}", vx_value("192.168.100.250", mac1))
    wait_rejected([n2], stray, {"h2": f"VtepMAC {mac1} is already the VtepMAC of the lease {key1}, created first"})
    before = v2_created_index(etcd, key1)
    d1.restart()
    wait_for(lambda: d1.log_text().count("found lease for current IP, reusing") == 1, 30, "h1 reused its lease")
    assert v2_created_index(etcd, key1) == before
    d3 = start_daemon(h3, "--iface", "eth0", "--etcd-api", "v2", *HZ_ARGS)
    d3.wait_subnet_env(timeout=30)
    n3 = Node(h3, d3, {}, None)
    for n in (n2, n3):
        wait_for(lambda n=n: f"{mac1} dst {h1.address} self permanent" in fdb(n.host), 30, f"{n.host.name} FDB")
        assert rejected(n).keys() == {stray}, rejected(n)
        assert fdb(n.host) >= {f"{mac1} dst {h1.address} self permanent"}
        assert f"{mac1} dst 192.168.100.250 self permanent" not in fdb(n.host)
    no_crash([n2, n3])


# --- the network config ----------------------------------------------------------------------------
def test_case6_7_bad_config_numbers_and_cidrs_are_one_line_never_a_crash(lab, etcd):
    """At startup: the daemon says what is wrong (naming the field) and waits, /readyz says it too;
    once fixed it starts. At runtime: one warning per bad value, the running config stays."""
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","SubnetLen":1e400,"Backend":{"Type":"alloc"}}')
    d = start_daemon(h1, "--iface", "eth0", "--healthz-port", str(HZ), "--healthz-ip", "127.0.0.1",
                     env={"PYFLANNELD_CONFIG_RECHECK": "0.5"})
    d.wait_log(r"number 1e400 in SubnetLen is out of range", timeout=30)
    code, body = http_get(h1, HZ, "/readyz")
    assert code == 503 and "number 1e400 in SubnetLen is out of range" in body, body
    steps = [
        ('{"Network":"10.1.0.0/16","SubnetLen":NaN,"Backend":{"Type":"alloc"}}', "NaN in SubnetLen is not a JSON value"),
        ('{"Network":"10.1.0.0/16","SubnetLen":-Infinity}', "-Infinity in SubnetLen is not a JSON value"),
        ('{"Network":"10.20.0.0","Backend":{"Type":"alloc"}}', "Network: invalid CIDR address: 10.20.0.0"),
        ('{"Network":"10.1.0.0/16","SubnetLen":24.5}', "cannot unmarshal number 24.5 into Go struct field Config.SubnetLen"),
        ('{"Network":' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 100 deep"),
    ]
    for raw, words in steps:
        etcd.etcdctl("put", "--", f"{PREFIX}/config", input=raw)
        d.wait_log(re.escape(words), timeout=30)
    etcd.put(f"{PREFIX}/config", ALLOC)
    d.wait_subnet_env(timeout=30)
    assert http_get(h1, HZ, "/readyz")[0] == 200
    # runtime: the re-check task warns once per bad value and never dies
    for raw, words in steps:
        etcd.etcdctl("put", "--", f"{PREFIX}/config", input=raw)
        d.wait_log(r"network config in etcd is now invalid.*" + re.escape(words), timeout=30)
    etcd.put(f"{PREFIX}/config", ALLOC)
    wait_for(lambda: d.log_text().count("network config in etcd is now invalid") == len(steps), 30,
             what="one warning per bad value")
    assert http_get(h1, HZ, "/readyz")[0] == 200
    text = d.log_text()
    assert d.alive
    for bad in ("Traceback", "internal error", "OverflowError", "RecursionError", "background task failed"):
        assert bad not in text, (bad, text[-3000:])


def test_case8_subnet_min_above_max_and_out_of_subnets_names_the_prefix(lab, etcd):
    prefix = "/my/net"
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    etcd.put(f"{prefix}/config", '{"Network":"10.1.0.0/16","SubnetMin":"10.1.200.0","SubnetMax":"10.1.100.0",'
             '"Backend":{"Type":"alloc"}}')
    d1 = start_daemon(h1, "--iface", "eth0", "--etcd-prefix", prefix)
    d1.wait_log(r"SubnetMin 10\.1\.200\.0 is greater than SubnetMax 10\.1\.100\.0", timeout=30)
    # a pool of one subnet, taken by h1: h2 says which key to free, under the real prefix
    etcd.put(f"{prefix}/config", '{"Network":"10.1.0.0/16","SubnetMin":"10.1.7.0","SubnetMax":"10.1.7.0",'
             '"Backend":{"Type":"alloc"}}')
    assert d1.wait_subnet_env(timeout=30)["FLANNEL_SUBNET"] == "10.1.7.1/24"
    d2 = start_daemon(h2, "--iface", "eth0", "--etcd-prefix", prefix)
    m = d2.wait_log(r"out of subnets: [^\n]*", timeout=30)
    assert ("out of subnets: all 1 /24 subnets of 10.1.0.0/16 are leased; free one (delete a dead host's "
            "key under /my/net/subnets/)") in m[0], m[0]
    assert "<prefix>" not in d2.log_text()
    assert d1.alive and d2.alive


# --- a mixed cluster with the real upstream flanneld -----------------------------------------------
def test_mixed_cluster_with_upstream_v0_20_2_no_lease_rejected(lab, etcd):
    binary = upstream_or_skip("v0.20.2")
    etcd.put(f"{PREFIX}/config", VXLAN)
    hosts = [lab.add_host(h) for h in ("h1", "h2", "h3", "h4")]
    nodes = []

    def up(host, *args, **kw) -> Node:
        d = start_daemon(host, "--iface", "eth0", *args, **kw)
        env = d.wait_subnet_env(timeout=30)
        return Node(host, d, env, attach_pod(lab, host, env))

    # the upstream hosts one after the other, each watching before the next appears (v0.20.2 can
    # miss a lease created between its list and its watch: not what this test is about) ...
    for h in hosts[:2]:
        nodes.append(up(h, binary=binary))
        nodes[-1].daemon.wait_log(r"watching for new subnet leases", timeout=30)
    settle(nodes[0].daemon, lambda: f"{nodes[1].subnet} via" in " ".join(vxlan_state(nodes[0])["routes"]), 20,
           "upstream h1 programs upstream h2")
    # ... then two pyflanneld hosts at once
    daemons = [start_daemon(h, "--iface", "eth0", *HZ_ARGS) for h in hosts[2:]]
    for h, d in zip(hosts[2:], daemons, strict=True):
        env = d.wait_subnet_env(timeout=30)
        nodes.append(Node(h, d, env, attach_pod(lab, h, env)))
    assert len({n.subnet for n in nodes}) == 4
    leases = etcd.get_prefix(f"{PREFIX}/subnets/")
    assert len(leases) == 4
    for n in nodes[:2]:  # upstream may miss one of two leases created at once (see lab.upstream.settle)
        want = vxlan_expected(n, [p for p in nodes if p is not n], etcd)
        settle(n.daemon, lambda n=n, want=want: vxlan_state(n) == want, 20, f"upstream {n.host.name} converged")
    assert_converged(nodes, etcd, timeout=20)  # upstream's own hosts program every peer, and so do ours
    assert ping_all([n.pod for n in nodes]) == []
    for n in nodes[2:]:
        assert readyz(n) == (200, "flanneld is ready")  # no lease rejected
        assert "ignoring bad lease entry" not in n.daemon.log_text()
    # an upstream host restarts: it reuses its lease (found by PublicIP) and its device
    d0 = nodes[0].daemon
    written = d0.log_text().count("Wrote subnet file")
    d0.restart()
    wait_for(lambda: d0.log_text().count("Wrote subnet file") > written, 30, "upstream h1 restarted")
    assert_converged(nodes, etcd, timeout=20)
    assert ping_all([n.pod for n in nodes]) == []
    for n in nodes[2:]:
        assert readyz(n) == (200, "flanneld is ready")
