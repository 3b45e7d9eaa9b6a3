"""IPv6 through the daemon (issue 13): dual stack and IPv6-only, in a mixed cluster with the real
upstream flanneld v0.20.2. Real etcd, namespaces with an IPv6 underlay on the lab switch, pods
with both families, traffic. What is asserted is what an operator reads: the etcd keys and lease
JSON, subnet.env, ``ip -6 route``/``ip neigh``/``bridge fdb``, ``ip6tables -S``, /readyz, pings.

Expected kernel lines and files are written out here from upstream's behaviour (seen by running
v0.20.2 in this lab: upstream-ipv6-nftables-extension.md §1-§4), never computed with pyflanneld's
code; the upstream host of each mixed test is held to the same expectations as ours.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

import pytest
from helpers import upstream_or_skip, wait_for

from lab.cluster import Daemon, start_daemon
from lab.netns import Host, Lab, Pod
from lab.upstream import settle

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
HZ = 8481


def net_config(backend: str, ipv4: bool = True, network6: str = "fd80::/48") -> str:
    cfg: dict = {"EnableIPv6": True, "IPv6Network": network6, "Backend": {"Type": backend}}
    if ipv4:
        cfg = {"Network": "10.5.0.0/16", **cfg}
    else:
        cfg["EnableIPv4"] = False
    return json.dumps(cfg)


@dataclass
class Leased:
    """A lease, known by the subnets of a subnet.env (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET)."""

    env: dict[str, str]

    @property
    def subnet(self) -> IPv4Network | None:
        return IPv4Network(self.env["FLANNEL_SUBNET"], strict=False) if "FLANNEL_SUBNET" in self.env else None

    @property
    def subnet6(self) -> IPv6Network:
        return IPv6Network(self.env["FLANNEL_IPV6_SUBNET"], strict=False)

    @property
    def key(self) -> str:
        """upstream's MakeSubnetKey: 10.5.7.0-24&fd80:0:0:7::-64, IPv6-only 0.0.0.0-0&fd80:0:0:7::-64"""
        v4 = f"{self.subnet.network_address}-{self.subnet.prefixlen}" if self.subnet else "0.0.0.0-0"
        return f"{PREFIX}/subnets/{v4}&{self.subnet6.network_address}-{self.subnet6.prefixlen}"

    def lease_text(self, etcd) -> str:
        value = etcd.get(self.key)
        assert value is not None, f"no lease {self.key} in etcd"
        return value

    def lease(self, etcd) -> dict:
        return json.loads(self.lease_text(etcd))


@dataclass
class Node(Leased):
    """A lab host running a flanneld (ours or upstream's), a dual-stack docker0 and one pod."""

    host: Host = None  # type: ignore[assignment]
    daemon: Daemon = None  # type: ignore[assignment]
    pod: Pod | None = None


def start(lab: Lab, hosts: list[Host], *args: str, binary: str | None = None, timeout: float = 30,
          pods: bool = True) -> list[Node]:
    daemons = [start_daemon(h, "--iface", "eth0", *args, binary=binary) for h in hosts]
    nodes = []
    for h, d in zip(hosts, daemons, strict=True):
        env = d.wait_subnet_env(timeout=timeout)
        nodes.append(Node(env, h, d, attach_pod(lab, h, env) if pods else None))
    return nodes


def attach_pod(lab: Lab, host: Host, env: dict[str, str]) -> Pod:
    """What docker does with --bip/--fixed-cidr-v6 (pyflanneld docker-opts): a dual-stack docker0."""
    v4 = env.get("FLANNEL_SUBNET", "10.99.0.1/24")  # IPv6-only: an address no peer routes
    host.make_bridge("docker0", v4, mtu=env["FLANNEL_MTU"], cidr6=env["FLANNEL_IPV6_SUBNET"])
    return lab.add_pod(host, "p1")


def golden_subnet_env(node: Node, network6: str = "fd80::/48", ipv4: bool = True, mtu: int = 1450) -> str:
    """upstream's WriteSubnetFile for the node's lease, line by line."""
    lines = []
    if ipv4:
        assert node.subnet is not None
        lines += ["FLANNEL_NETWORK=10.5.0.0/16", f"FLANNEL_SUBNET={node.subnet.network_address + 1}/24"]
    lines += [f"FLANNEL_IPV6_NETWORK={network6}", f"FLANNEL_IPV6_SUBNET={node.subnet6.network_address + 1}/64",
              f"FLANNEL_MTU={mtu}", "FLANNEL_IPMASQ=false"]
    return "".join(f"{ln}\n" for ln in lines)


def shape(lease_text: str) -> str:
    """A lease value with its strings (addresses, MACs, type) blanked: what must be equal between
    hosts, byte for byte (Go's compact JSON, field order)."""
    def blank(v):
        return {k: blank(x) for k, x in v.items()} if isinstance(v, dict) else "X" if isinstance(v, str) else v

    doc = json.loads(lease_text)
    assert lease_text == json.dumps(doc, separators=(",", ":")), lease_text
    return json.dumps(blank(doc), separators=(",", ":"))


# --- kernel state as iproute2 prints it -----------------------------------------------------------
def lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines() if ln.strip()}


def flannel_state(h: Host) -> dict[str, set[str]]:
    """Routes (without the kernel's and default ones), permanent neighbours and FDB entries of both
    vxlan devices, or the routes alone for host-gw."""
    def ours(text: str) -> set[str]:
        return {ln for ln in lines(text) if "proto kernel" not in ln and not ln.startswith("default")
                and "192.168." not in ln.split()[0]}

    st = {"routes": ours(h.ip("route", "show")), "routes6": ours(h.ip("-6", "route", "show"))}
    for dev in ("flannel.1", "flannel-v6.1"):
        if h.link_exists(dev):
            st[f"neigh {dev}"] = {ln for ln in lines(h.ip("neigh", "show", "dev", dev)) if "PERMANENT" in ln}
            st[f"fdb {dev}"] = {ln for ln in lines(h.bridge("fdb", "show", "dev", dev)) if " dst " in ln}
    return st


def expected_state(node: Node, peers: list[Leased], etcd, backend: str, ipv4: bool = True,
                   direct: tuple[Leased, ...] = ()) -> dict[str, set[str]]:
    """Upstream's entries on ``node`` for each peer (facts §2, §3; as v0.20.2 printed them here);
    vxlan peers in ``direct`` (DirectRouting, on the same link) get host-gw's routes instead."""
    st: dict[str, set[str]] = {"routes": set(), "routes6": set()}
    if backend == "vxlan":
        for dev in (["flannel.1"] if ipv4 else []) + ["flannel-v6.1"]:
            st[f"neigh {dev}"], st[f"fdb {dev}"] = set(), set()
    for p in peers:
        lease = p.lease(etcd)
        gw6 = p.subnet6.network_address
        if backend == "host-gw" or p in direct:
            if ipv4:
                st["routes"].add(f"{p.subnet} via {lease['PublicIP']} dev eth0")
            st["routes6"].add(f"{p.subnet6} via {lease['PublicIPv6']} dev eth0 metric 1024 pref medium")
            continue
        if ipv4:
            mac, gw = lease["BackendData"]["VtepMAC"], p.subnet.network_address
            st["routes"].add(f"{p.subnet} via {gw} dev flannel.1 onlink")
            st["neigh flannel.1"].add(f"{gw} lladdr {mac} PERMANENT")
            st["fdb flannel.1"].add(f"{mac} dst {lease['PublicIP']} self permanent")
        mac6 = lease["BackendV6Data"]["VtepMAC"]
        st["routes6"].add(f"{p.subnet6} via {gw6} dev flannel-v6.1 metric 1024 onlink pref medium")
        st["neigh flannel-v6.1"].add(f"{gw6} lladdr {mac6} PERMANENT")
        st["fdb flannel-v6.1"].add(f"{mac6} dst {lease['PublicIPv6']} self permanent")
    return st


def converged(node: Node, peers: list[Leased], etcd, backend: str, ipv4: bool = True,
              direct: tuple[Leased, ...] = ()) -> bool:
    return flannel_state(node.host) == expected_state(node, peers, etcd, backend, ipv4, direct)


def ping_pairs(pods: list[Pod], v6: bool, timeout: float = 5) -> list[str]:
    """Every pod pings every other (in parallel), over IPv6 when ``v6``; the pairs without reply."""
    pairs = [(a, b) for a in pods for b in pods if a is not b]

    def ok(ab: tuple[Pod, Pod]) -> bool:
        a, b = ab
        return a.wait_ping(b.address6 if v6 else b.address, timeout=timeout)

    with ThreadPoolExecutor(max_workers=len(pairs)) as ex:
        good = list(ex.map(ok, pairs))
    return [f"{a.host.name} -> {b.host.name} ({b.address6 if v6 else b.address})"
            for (a, b), g in zip(pairs, good, strict=True) if not g]


# --- dual stack with upstream ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_dual_stack_mixed_cluster_with_upstream(lab, etcd, backend):
    binary = upstream_or_skip()
    etcd.put(f"{PREFIX}/config", net_config(backend))
    h1, h2, h3 = (lab.add_host(n, ipv6=True) for n in ("h1", "h2", "h3"))
    (up,) = start(lab, [h1], binary=binary)
    n2, n3 = start(lab, [h2, h3])
    nodes = [up, n2, n3]

    # keys and lease JSON: upstream's dual-stack key, the same fields in the same order
    assert {n.key for n in nodes} == set(etcd.get_prefix(f"{PREFIX}/subnets/"))
    texts = {n.host.name: n.lease_text(etcd) for n in nodes}
    for n in nodes:
        got = json.loads(texts[n.host.name])
        assert got["PublicIP"] == n.host.address and got["PublicIPv6"] == n.host.address6
        assert got["BackendType"] == backend
        assert n.subnet.subnet_of(IPv4Network("10.5.0.0/16")) and n.subnet6.subnet_of(IPv6Network("fd80::/48"))
        assert n.subnet.prefixlen == 24 and n.subnet6.prefixlen == 64
        if backend == "vxlan":
            assert got["BackendData"]["VtepMAC"] != got["BackendV6Data"]["VtepMAC"]
    assert shape(texts["h2"]) == shape(texts["h3"]) == shape(texts["h1"]), texts
    # subnet.env, golden and byte for byte like upstream's
    for n in nodes:
        assert n.daemon.subnet_file.read_text() == golden_subnet_env(n, mtu=1450 if backend == "vxlan" else 1500)

    # every host, upstream or not, has exactly upstream's entries for the two others
    for n in nodes:
        peers = [p for p in nodes if p is not n]
        if n is up:
            settle(up.daemon, lambda n=n, peers=peers: converged(n, peers, etcd, backend), 15, "upstream's entries")
        else:
            wait_for(lambda n=n, peers=peers: converged(n, peers, etcd, backend), 30, f"{n.host.name} kernel state", 0.1)
    if backend == "vxlan":  # the IPv6 device as upstream makes it (its MAC aside)
        def device(h: Host) -> tuple:
            d = h.ip_json("-d", "link", "show", "flannel-v6.1")[0]
            addrs = [f"{a['local']}/{a['prefixlen']}" for i in h.ip_json("-6", "addr", "show", "flannel-v6.1")
                     for a in i["addr_info"] if a["scope"] == "global"]
            return (d["mtu"], d["linkinfo"]["info_data"]["id"], d["linkinfo"]["info_data"]["local6"],
                    d["linkinfo"]["info_data"].get("learning"), addrs,
                    h.run("cat", "/proc/sys/net/ipv6/conf/flannel-v6.1/accept_ra").stdout.strip())
        for n in nodes:
            assert device(n.host) == (1430, 1, n.host.address6, False, [f"{n.subnet6.network_address}/128"], "0")
    # the forward rules for the IPv6 network, as upstream's
    for n in nodes:
        assert n.host.run("ip6tables", "-w", "-S", "FLANNEL-FWD").stdout.splitlines() == [
            "-N FLANNEL-FWD",
            '-A FLANNEL-FWD -s fd80::/48 -m comment --comment "flanneld forward" -j ACCEPT',
            '-A FLANNEL-FWD -d fd80::/48 -m comment --comment "flanneld forward" -j ACCEPT'], n.host.name

    pods = [n.pod for n in nodes]
    assert ping_pairs(pods, v6=False) == []
    assert ping_pairs(pods, v6=True) == []

    # a pyflanneld host leaves: upstream and pyflanneld remove both families' entries alike
    assert n3.daemon.stop() == 0
    assert etcd.delete(n3.key) == 1
    settle(up.daemon, lambda: converged(up, [n2], etcd, backend), 10, "upstream drops h3")
    wait_for(lambda: converged(n2, [up], etcd, backend), 30, "h2 drops h3", 0.1)
    assert ping_pairs([up.pod, n2.pod], v6=True) == []
    assert json.loads(n2.lease_text(etcd)) == json.loads(texts["h2"])


def test_dual_stack_host_gw_over_etcd_v2(lab, etcd):
    """The same leases through the v2 API (upstream <= v0.17's store): dual-stack keys, both families routed."""

    class V2:  # what Leased.lease_text reads: the v2 keys API
        get = staticmethod(etcd.v2_get)

    etcd.v2_put(f"{PREFIX}/config", net_config("host-gw"))
    hosts = [lab.add_host(n, ipv6=True) for n in ("h1", "h2")]
    n1, n2 = nodes = start(lab, hosts, "--etcd-api", "v2")
    for n in nodes:
        lease = n.lease(V2)
        assert (lease["PublicIP"], lease["PublicIPv6"]) == (n.host.address, n.host.address6)
        assert n.daemon.subnet_file.read_text() == golden_subnet_env(n, mtu=1500)
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}  # nothing in v3
    for n, p in ((n1, n2), (n2, n1)):
        wait_for(lambda n=n, p=p: converged(n, [p], V2, "host-gw"), 30, f"{n.host.name} routes", 0.1)
    assert ping_pairs([n1.pod, n2.pod], v6=True) == []
    assert ping_pairs([n1.pod, n2.pod], v6=False) == []
    # drift repair: the IPv6 route deleted by hand comes back
    n1.host.ip("-6", "route", "del", str(n2.subnet6))
    wait_for(lambda: converged(n1, [n2], V2, "host-gw"), 30, "h1's IPv6 route back", 0.05)


# --- IPv6-only ------------------------------------------------------------------------------------
def test_ipv6_only_vxlan_between_pyflanneld_hosts(lab, etcd):
    etcd.put(f"{PREFIX}/config", net_config("vxlan", ipv4=False))
    hosts = [lab.add_host(n, ipv6=True) for n in ("h1", "h2")]
    n1, n2 = nodes = start(lab, hosts)
    for n in nodes:
        # upstream's etcd IPv6-only lease: key 0.0.0.0-0&..., PublicIP 0.0.0.0, no BackendData
        value = n.lease_text(etcd)
        mac6 = json.loads(value)["BackendV6Data"]["VtepMAC"]
        assert value == ('{"PublicIP":"0.0.0.0","PublicIPv6":"%s","BackendType":"vxlan",'
                         '"BackendV6Data":{"VNI":1,"VtepMAC":"%s"}}' % (n.host.address6, mac6))
        assert n.key.startswith(f"{PREFIX}/subnets/0.0.0.0-0&fd80:")
        assert n.daemon.subnet_file.read_text() == golden_subnet_env(n, ipv4=False)
        assert not n.host.link_exists("flannel.1")
    assert n1.subnet6 != n2.subnet6
    for n, p in ((n1, n2), (n2, n1)):
        wait_for(lambda n=n, p=p: converged(n, [p], etcd, "vxlan", ipv4=False), 30, f"{n.host.name} entries", 0.1)
    assert ping_pairs([n1.pod, n2.pod], v6=True) == []

    # drift repair: an IPv6 route, neighbour and FDB entry deleted by hand come back
    want = expected_state(n1, [n2], etcd, "vxlan", ipv4=False)
    gw6, mac6 = str(n2.subnet6.network_address), n2.lease(etcd)["BackendV6Data"]["VtepMAC"]
    h1 = n1.host
    h1.ip("-6", "route", "del", str(n2.subnet6))
    wait_for(lambda: flannel_state(h1) == want, 30, "the IPv6 route back", 0.05)
    h1.ip("-6", "neigh", "del", gw6, "dev", "flannel-v6.1")
    wait_for(lambda: flannel_state(h1) == want, 30, "the IPv6 neighbour back", 0.05)
    h1.bridge("fdb", "del", mac6, "dev", "flannel-v6.1", "dst", n2.host.address6)
    wait_for(lambda: flannel_state(h1) == want, 30, "the IPv6 FDB entry back", 0.05)
    assert "kernel state reconciled" in n1.daemon.log_text()

    # a restart without subnet.env takes the host's own lease again (found by PublicIPv6: every
    # IPv6-only lease has PublicIP 0.0.0.0, by which upstream would take any host's lease)
    key1, key2 = n1.key, n2.key
    n2.daemon.stop()
    n2.daemon.subnet_file.unlink()
    n2.daemon.restart()
    assert n2.daemon.wait_subnet_env(20)["FLANNEL_IPV6_SUBNET"] == n2.env["FLANNEL_IPV6_SUBNET"]
    assert set(etcd.get_prefix(f"{PREFIX}/subnets/")) == {key1, key2}
    assert "found lease for current IP, reusing" in n2.daemon.log_text()
    assert ping_pairs([n1.pod, n2.pod], v6=True) == []


def test_vxlan_ipv6_direct_routing_and_a_deleted_device(lab, etcd):
    """DirectRouting: a peer on the same link is routed directly in both families, one behind the
    switch (another underlay subnet) through the tunnels. flannel-v6.1 deleted by hand comes back
    with its MAC and every entry."""
    etcd.put(f"{PREFIX}/config", json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True,
                                             "IPv6Network": "fd80::/48",
                                             "Backend": {"Type": "vxlan", "DirectRouting": True}}))
    hosts = [lab.add_host("h1", ipv6=True), lab.add_host("h2", ipv6=True),
             lab.add_host("h3", subnet="192.168.101.0/24", ipv6=True)]
    n1, n2, n3 = nodes = start(lab, hosts)
    for n in nodes:
        direct = (n1, n2) if n is not n3 else ()
        wait_for(lambda n=n, direct=direct: converged(n, [p for p in nodes if p is not n], etcd, "vxlan",
                                                      direct=direct), 30, f"{n.host.name} entries", 0.1)
    assert f"{n2.subnet6} via {n2.host.address6} dev eth0 metric 1024 pref medium" in flannel_state(n1.host)["routes6"]
    pods = [n.pod for n in nodes]
    assert ping_pairs(pods, v6=True) == []

    h1 = n1.host
    want = flannel_state(h1)
    mac = h1.ip_json("link", "show", "flannel-v6.1")[0]["address"]
    h1.ip("link", "del", "flannel-v6.1")
    wait_for(lambda: h1.link_exists("flannel-v6.1") and flannel_state(h1) == want, 30, "flannel-v6.1 back", 0.1)
    assert h1.ip_json("link", "show", "flannel-v6.1")[0]["address"] == mac == n1.lease(etcd)["BackendV6Data"]["VtepMAC"]
    assert ping_pairs(pods, v6=True) == []

    # a stale route planted inside IPv6Network, then an NDP entry changed behind the daemon's back
    # (no delete: only its notification tells): each repaired by the full pass its IPv6
    # notification starts (the safety-net pass is a minute away)
    h1.ip("-6", "route", "add", "fd80:0:0:ff::/64", "via", "fd80:0:0:ff::", "dev", "flannel-v6.1", "onlink")
    wait_for(lambda: flannel_state(h1) == want, 30, "the stale IPv6 route removed", detail=lambda: flannel_state(h1))
    h1.ip("-6", "neigh", "replace", str(n3.subnet6.network_address), "lladdr", "02:00:00:00:00:99",
          "dev", "flannel-v6.1", "nud", "permanent")
    wait_for(lambda: flannel_state(h1) == want, 30, "the NDP entry repaired", detail=lambda: flannel_state(h1))
    assert ping_pairs(pods, v6=True) == []


# --- interface selection and --public-ipv6 --------------------------------------------------------
def test_iface_by_ipv6_address_and_public_ipv6(lab, etcd):
    """h1 names its interface by its IPv6 address and publishes another of its addresses with
    --public-ipv6; h2 is found by its IPv6 address too. Both families' PublicIPs are the chosen
    interface's, the peers' FDB entries point at the published address, and traffic flows."""
    etcd.put(f"{PREFIX}/config", net_config("vxlan"))
    h1, h2 = lab.add_host("h1", ipv6=True), lab.add_host("h2", ipv6=True)
    published = "fd99::101"
    h1.ip("-6", "addr", "add", f"{published}/64", "dev", "eth0", "nodad")
    d1 = start_daemon(h1, "--iface", h1.address6, "--public-ipv6", published)
    d2 = start_daemon(h2, f"-iface={h2.address6}")
    n1, n2 = (Node(d.wait_subnet_env(30), h, d) for h, d in ((h1, d1), (h2, d2)))
    l1, l2 = n1.lease(etcd), n2.lease(etcd)
    assert (l1["PublicIP"], l1["PublicIPv6"]) == (h1.address, published)
    assert (l2["PublicIP"], l2["PublicIPv6"]) == (h2.address, h2.address6)
    # the IPv6 device still sends from the interface's address (upstream: local = interface address)
    assert h1.ip_json("-d", "link", "show", "flannel-v6.1")[0]["linkinfo"]["info_data"]["local6"] == h1.address6
    wait_for(lambda: f"{l1['BackendV6Data']['VtepMAC']} dst {published} self permanent" in
             lines(h2.bridge("fdb", "show", "dev", "flannel-v6.1")), 30, "h2's FDB entry to --public-ipv6", 0.1)
    n1.pod, n2.pod = attach_pod(lab, h1, n1.env), attach_pod(lab, h2, n2.env)
    assert ping_pairs([n1.pod, n2.pod], v6=True) == []
    assert "defaulting external v6 address" not in d1.log_text()
    assert "defaulting external v6 address to interface address" in d2.log_text()


def test_ipv6_with_a_backend_that_carries_ipv4_only_is_one_line(lab, etcd):
    etcd.put(f"{PREFIX}/config", net_config("udp"))
    h1 = lab.add_host("h1", ipv6=True)
    d = start_daemon(h1, "--iface", "eth0", "--healthz-port", str(HZ))
    d.wait_log("couldn't fetch network config", timeout=15)
    line = ("the udp backend carries IPv4 only and cannot run EnableIPv6 (dual stack or IPv6-only); use vxlan, "
            "host-gw or alloc for IPv6, or set EnableIPv6 to false")
    assert line in d.log_text() and "Traceback" not in d.log_text()
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}
    assert d.alive  # it waits for a config it can run, as for any invalid one
    etcd.put(f"{PREFIX}/config", json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}))
    d.wait_subnet_env(20)


# --- lifecycle guarantees for IPv6 ----------------------------------------------------------------
def test_ipv6_lease_gate_and_own_lease_lost(lab, etcd):
    """An IPv6 peer lease outside IPv6Network or overlapping another is rejected and never
    programmed (and shown in /readyz); a host whose lease is taken over gets a new pair, and every
    host programs the new pair and drops the old."""
    etcd.put(f"{PREFIX}/config", net_config("vxlan"))
    hosts = [lab.add_host(n, ipv6=True) for n in ("h1", "h2", "h3")]
    n1, n2, n3 = nodes = start(lab, hosts, "--healthz-port", str(HZ))
    for n in nodes:
        wait_for(lambda n=n: converged(n, [p for p in nodes if p is not n], etcd, "vxlan"), 30, f"{n.host.name} entries", 0.1)

    def bogus(v4: str, v6: str, pub6: str, mac: str) -> tuple[str, str]:
        key = f"{PREFIX}/subnets/{v4}&{v6}"
        value = json.dumps({"PublicIP": "192.168.100.77", "PublicIPv6": pub6, "BackendType": "vxlan",
                            "BackendData": {"VNI": 1, "VtepMAC": f"02:77:00:00:00:{mac}"},
                            "BackendV6Data": {"VNI": 1, "VtepMAC": f"02:76:00:00:00:{mac}"}}, separators=(",", ":"))
        return key, value

    outside = bogus("10.5.250.0-24", "fd81:0:0:1::-64", "fd99::77", "01")
    overlapping = bogus("10.5.251.0-24", f"{n2.subnet6.network_address}-64", "fd99::78", "02")
    for key, value in (outside, overlapping):
        etcd.put(key, value)
    for n in nodes:
        wait_for(lambda n=n: "rejected" in readyz(n.host)[1] and "fd81:0:0:1::/64" in readyz(n.host)[1]
                 and str(n2.subnet6) in readyz(n.host)[1], 30, f"{n.host.name} /readyz lists both", 0.1)
        assert readyz(n.host)[0] == 200
    for n in nodes:  # never programmed, neither family
        st = flannel_state(n.host)
        assert not [ln for v in st.values() for ln in v
                    if "10.5.250." in ln or "10.5.251." in ln or "fd81:" in ln or "02:7" in ln], st
    assert "outside the flannel IPv6Network fd80::/48" in n1.daemon.log_text()
    for key, _ in (outside, overlapping):
        etcd.delete(key)

    # h2's lease is taken over (deleted, and the same key given to another host at once)
    old_key, old4, old6 = n2.key, n2.subnet, n2.subnet6
    taker_value = json.dumps({"PublicIP": "192.168.100.77", "PublicIPv6": "fd99::77", "BackendType": "vxlan",
                        "BackendData": {"VNI": 1, "VtepMAC": "02:77:00:00:00:03"},
                        "BackendV6Data": {"VNI": 1, "VtepMAC": "02:76:00:00:00:03"}}, separators=(",", ":"))
    etcd.delete(old_key)
    etcd.put(old_key, taker_value)
    wait_for(lambda: (e := n2.daemon.subnet_env()) and e.get("FLANNEL_SUBNET") != n2.env["FLANNEL_SUBNET"],
             30, "h2 on a new subnet", 0.1)
    n2.env = n2.daemon.subnet_env()
    assert n2.subnet != old4 and n2.subnet6 != old6  # the old pair is the taker's: both parts are new
    assert n2.daemon.subnet_file.read_text() == golden_subnet_env(n2)
    assert n2.lease(etcd)["PublicIPv6"] == n2.host.address6
    moved = attach_moved_pod(lab, n2)  # docker restarted on the new subnet, as the daemon's warning says
    # everyone programs h2's new pair and the taker's (the old pair), h2 itself included
    taker = Leased({"FLANNEL_SUBNET": f"{old4.network_address + 1}/24",
                    "FLANNEL_IPV6_SUBNET": f"{old6.network_address + 1}/64"})
    for n in nodes:
        peers = [p for p in nodes if p is not n] + [taker]
        wait_for(lambda n=n, peers=peers: converged(n, peers, etcd, "vxlan"), 30, f"{n.host.name} has h2's new pair and the taker", 0.1)
        wait_for(lambda n=n: readyz(n.host)[0] == 200, 30, f"{n.host.name} ready", 0.1)
    assert ping_pairs([n1.pod, moved, n3.pod], v6=True) == []
    assert ping_pairs([n1.pod, moved, n3.pod], v6=False) == []


def test_ipv6_only_hosts_with_the_same_public_ipv6_warn_and_do_not_flip_flop(lab, etcd):
    """Issue 9 case 8 in an IPv6-only network (a copied --public-ipv6): every IPv6-only lease has
    PublicIP 0.0.0.0 and no BackendData (its VtepMAC is in BackendV6Data), which is what must
    tell the two hosts apart. One warning naming both VTEPs, then each on its own subnet."""
    etcd.put(f"{PREFIX}/config", net_config("vxlan", ipv4=False))
    h1, h2 = lab.add_host("h1", ipv6=True), lab.add_host("h2", ipv6=True)
    same = ("--iface", "eth0", "--public-ipv6", "fd99::50", "--subnet-lease-ttl", "4s",
            "--subnet-lease-renew-margin", "2s")
    d1 = start_daemon(h1, *same)
    d1.wait_subnet_env(30)
    d2 = start_daemon(h2, *same)
    d2.wait_subnet_env(30)
    wait_for(lambda: "same PublicIP" in d1.log_text() + d2.log_text(), 30, "a warning", 0.2)
    macs = [h.ip_json("link", "show", "flannel-v6.1")[0]["address"] for h in (h1, h2)]

    def settled() -> list | None:
        nodes = [Leased(e) if (e := d.subnet_env()) else None for d in (d1, d2)]
        if None in nodes or nodes[0].subnet6 == nodes[1].subnet6:
            return None
        vals = [etcd.get(n.key) for n in nodes]
        ok = all(v and json.loads(v)["BackendV6Data"]["VtepMAC"] == m for v, m in zip(vals, macs, strict=True))
        return [n.subnet6 for n in nodes] if ok else None

    sns = wait_for(settled, 60, "each host on its own IPv6 subnet, each key holding its host's VTEP",
                   detail=lambda: etcd.get_prefix(f"{PREFIX}/subnets/"))
    lost = [d.log_text().count("own lease lost") for d in (d1, d2)]
    renewed = [d.log_text().count("lease renewed") for d in (d1, d2)]
    wait_for(lambda: all(d.log_text().count("lease renewed") >= n + 3 for d, n in zip((d1, d2), renewed, strict=True)),
             60, "three renewals on each host", 0.2)
    assert settled() == sns
    assert [d.log_text().count("own lease lost") for d in (d1, d2)] == lost
    line = next(ln for ln in (d1.log_text() + d2.log_text()).splitlines() if "same PublicIP" in ln)
    assert all(m in line for m in macs), line


def attach_moved_pod(lab: Lab, node: Node) -> Pod:
    """docker restarted on the new subnet: docker0 re-made from subnet.env, a new pod on it."""
    node.host.ip("link", "del", "docker0")
    node.host.make_bridge("docker0", node.env["FLANNEL_SUBNET"], mtu=node.env["FLANNEL_MTU"],
                          cidr6=node.env["FLANNEL_IPV6_SUBNET"])
    return lab.add_pod(node.host, "p2")


def readyz(h: Host) -> tuple[int, str]:
    p = h.run("curl", "-s", "--max-time", "3", "-o", "/dev/stdout", "-w", "\n%{http_code}",
              f"http://127.0.0.1:{HZ}/readyz", check=False)
    body, _, code = p.stdout.rpartition("\n")
    return int(code or 0), body

