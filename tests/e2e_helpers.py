"""Helpers for the end-to-end backend tests: real pyflanneld daemons on lab hosts, a docker0-like
bridge and a pod per host (what Docker/CNI does with subnet.env), and the kernel state read back
the way an operator reads it (``ip``, ``bridge``, ``iptables``), compared line by line with what
upstream flannel programs:

- vxlan (upstream pkg/backend/vxlan/vxlan_network.go, device.go): per peer lease a PERMANENT ARP
  entry ``<peer subnet address> lladdr <peer VtepMAC>``, an FDB entry ``<VtepMAC> dst <peer PublicIP>
  self permanent`` and the route ``<peer subnet> via <peer subnet address> dev flannel.1 onlink``;
  with DirectRouting and a peer on the same L2 segment the plain route ``via <peer PublicIP>``
  instead. flannel.<VNI> has the subnet's network address as /32, MTU = underlay MTU − 50.
- host-gw (upstream pkg/backend/hostgw/hostgw.go, route_network.go): ``<peer subnet> via <peer
  PublicIP> dev <external interface>``.
- iptables (upstream pkg/trafficmngr/iptables/iptables.go; the golden lists of upstream's e2e
  suite, e2e/rules.go): chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter), below.

Expected values are written out here, never computed with pyflanneld's own code.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Network

from lab import Daemon, Host, Lab, Pod, start_daemon
from lab.wait import WaitTimeout, wait_for  # the tests import wait_for from here too

PREFIX = "/coreos.com/network"
NETWORK = "10.5.0.0/16"


def config(backend: dict, network: str = NETWORK) -> str:
    return json.dumps({"Network": network, "Backend": backend})


def key_of(sn: IPv4Network) -> str:
    return f"{PREFIX}/subnets/{sn.network_address}-{sn.prefixlen}"


def lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines() if ln.strip()}


@dataclass
class Node:
    """One simulated host running pyflanneld, with its subnet.env, docker0 and one pod."""

    host: Host
    daemon: Daemon
    env: dict[str, str]
    pod: Pod

    @property
    def subnet(self) -> IPv4Network:
        return IPv4Network(self.env["FLANNEL_SUBNET"], strict=False)

    @property
    def gw(self) -> str:
        """The subnet's network address (vxlan: the address on flannel.1 and the peers' next hop)."""
        return str(self.subnet.network_address)

    @property
    def ip(self) -> str:
        return self.host.address

    def lease(self, etcd) -> dict:
        value = etcd.get(key_of(self.subnet))
        assert value is not None, f"{self.host.name}: no lease {key_of(self.subnet)} in etcd"
        return json.loads(value)

    def vtep_mac(self, etcd) -> str:
        return self.lease(etcd)["BackendData"]["VtepMAC"]


def attach_pod(lab: Lab, host: Host, env: dict[str, str], name: str = "p1") -> Pod:
    """What Docker does with mk-docker-opts' --bip/--mtu: docker0 from subnet.env, then a pod on it."""
    host.make_bridge("docker0", env["FLANNEL_SUBNET"], mtu=env["FLANNEL_MTU"])
    return lab.add_pod(host, name)


def start_nodes(lab: Lab, hosts: list[Host], *args: str, timeout: float = 20) -> list[Node]:
    """Start pyflanneld on every host at once, then give each a docker0 and a pod."""
    daemons = [start_daemon(h, "--iface", "eth0", *args) for h in hosts]
    nodes = []
    for h, d in zip(hosts, daemons, strict=True):
        env = d.wait_subnet_env(timeout=timeout)
        nodes.append(Node(h, d, env, attach_pod(lab, h, env)))
    return nodes


# --- kernel state as iproute2 prints it ----------------------------------------------------------
def routes(host: Host) -> set[str]:
    return lines(host.ip("route", "show"))


def fdb(host: Host, dev: str = "flannel.1") -> set[str]:
    return lines(host.bridge("fdb", "show", "dev", dev))


def neigh(host: Host, dev: str = "flannel.1") -> set[str]:
    return lines(host.ip("neigh", "show", "dev", dev))


def base_routes(node: Node) -> set[str]:
    """What the host has without flannel: default route, the underlay's and docker0's kernel routes."""
    h = node.host
    net = IPv4Network(f"{h.address}/{h.prefixlen}", strict=False)
    return {
        f"default via {h.gateway} dev eth0",
        f"{net} dev eth0 proto kernel scope link src {h.address}",
        f"{node.subnet} dev docker0 proto kernel scope link src {node.env['FLANNEL_SUBNET'].split('/')[0]}",
    }


def vxlan_expected(node: Node, peers: list[Node], etcd, direct: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """Upstream's entries on `node` for each peer: ARP, FDB, onlink route (or, for a peer named in
    `direct`, DirectRouting's plain route via its PublicIP)."""
    want: dict[str, set[str]] = {"routes": base_routes(node), "neigh": set(), "fdb": set()}
    for p in peers:
        if p.host.name in direct:
            want["routes"].add(f"{p.subnet} via {p.ip} dev eth0")
            continue
        mac = p.vtep_mac(etcd)
        want["neigh"].add(f"{p.gw} lladdr {mac} PERMANENT")
        want["fdb"].add(f"{mac} dst {p.ip} self permanent")
        want["routes"].add(f"{p.subnet} via {p.gw} dev flannel.1 onlink")
    return want


def vxlan_state(node: Node) -> dict[str, set[str]]:
    return {"routes": routes(node.host), "neigh": neigh(node.host), "fdb": fdb(node.host)}


def hostgw_expected(node: Node, peers: list[Node]) -> set[str]:
    return base_routes(node) | {f"{p.subnet} via {p.ip} dev eth0" for p in peers}


def link_line(host: Host, dev: str = "flannel.1") -> str:
    return " ".join(host.ip("-d", "link", "show", dev).split())


def link_mac(host: Host, dev: str = "flannel.1") -> str:
    return host.ip_json("link", "show", dev)[0]["address"]


def device_addresses(host: Host, dev: str = "flannel.1") -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for i in host.ip_json("-4", "addr", "show", dev)
            for a in i["addr_info"]]


def mentions(node: Node, gone: Node, mac: str) -> list[str]:
    """Every route/neigh/fdb line on `node` that still refers to `gone` (its subnet, MAC or IP)."""
    h = node.host
    found = [r for r in routes(h) if r.startswith(f"{gone.subnet} ")]
    if h.link_exists("flannel.1"):
        found += [n for n in neigh(h) if n.startswith(f"{gone.gw} ") or mac in n]
        found += [f for f in fdb(h) if mac in f or f" dst {gone.ip} " in f]
    return found


# --- traffic ---------------------------------------------------------------------------------------
def ping_all(pods: list[Pod], timeout: float = 30) -> list[str]:
    """Every pod pings every other pod (in parallel) until a reply, for up to `timeout` s each;
    returns the pairs that got none."""
    pairs = [(a, b) for a in pods for b in pods if a is not b]
    with ThreadPoolExecutor(max_workers=len(pairs)) as ex:
        ok = list(ex.map(lambda ab: ab[0].wait_ping(ab[1].address, timeout=timeout), pairs))
    return [f"{a.host.name}/{a.name} -> {b.host.name}/{b.name} ({b.address})"
            for (a, b), good in zip(pairs, ok, strict=True) if not good]


def ping_df(pod: Pod, dst: str, size: int) -> bool:
    """One ping with Don't Fragment and `size` payload bytes (packet = size + 28)."""
    cp = pod.run("ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", str(size), dst, check=False)
    return cp.returncode == 0


class Pinger:
    """A continuous ``ping -i interval`` from a pod; stop() returns (transmitted, received)."""

    def __init__(self, pod: Pod, dst: str, interval: float = 0.05, timestamps: bool = False,
                 deadline: float | None = None, count: int | None = None) -> None:
        argv = ["ping", "-n", "-i", str(interval), "-W", "1"]
        if timestamps:
            argv.append("-D")
        if deadline is not None:
            argv += ["-w", str(math.ceil(deadline))]  # ping takes whole seconds
        if count is not None:  # ping ends by itself after the last reply: no in-flight packet lost
            argv += ["-c", str(count)]
        self.pod, self.dst = pod, dst
        self.proc = pod.popen(*argv, dst, name=f"ping-{pod.ns}-{dst}")

    def stop(self, wait: float = 0) -> tuple[int, int]:
        """Wait up to `wait` s for ping to end by itself, else SIGINT it; (transmitted, received)."""
        with contextlib.suppress(WaitTimeout):
            wait_for(lambda: not self.proc.alive, wait, "ping to end by itself")
        if self.proc.alive:
            self.proc.signal(2)  # SIGINT: ping prints its summary
        self.proc.wait(10)
        text = self.proc.log_text()
        m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        assert m, f"no ping summary:\n{text[-2000:]}"
        return int(m[1]), int(m[2])

    def replies(self) -> int:
        """Echo replies received so far."""
        return len(re.findall(r"bytes from .*icmp_seq=", self.proc.log_text()))

    def lost(self) -> list[int]:
        """After stop(): icmp_seq numbers that never got a reply, except the last one sent (it may
        still have been in flight when SIGINT ended ping)."""
        text = self.proc.log_text()
        m = re.search(r"(\d+) packets transmitted", text)
        assert m, f"no ping summary:\n{text[-2000:]}"
        got = {int(x) for x in re.findall(r"bytes from .*icmp_seq=(\d+) ", text)}
        return [seq for seq in range(1, int(m[1])) if seq not in got]

    def first_reply(self) -> float | None:
        """Wall-clock time (``ping -D``) of the first echo reply, or None."""
        m = re.search(r"^\[(\d+\.\d+)\] \d+ bytes from ", self.proc.log_text(), re.M)
        return float(m[1]) if m else None


# --- iptables (upstream pkg/trafficmngr/iptables/iptables.go; golden lists of e2e/rules.go) ------
def golden_postrtg(network: str, subnet: str) -> list[str]:
    c = '-m comment --comment "flanneld masq"'
    return [
        "-N FLANNEL-POSTRTG",
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {subnet} -d {network} {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {network} -d {subnet} {c} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s {network} -d {subnet} {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {network} ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s {network} -d {network} {c} -j MASQUERADE --random-fully",
    ]


GOLDEN_POSTROUTING = [
    "-P POSTROUTING ACCEPT",
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
]
GOLDEN_FORWARD = [
    "-P FORWARD ACCEPT",
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
]


def golden_fwd(network: str) -> list[str]:
    c = '-m comment --comment "flanneld forward"'
    return [
        "-N FLANNEL-FWD",
        f"-A FLANNEL-FWD -s {network} {c} -j ACCEPT",
        f"-A FLANNEL-FWD -d {network} {c} -j ACCEPT",
    ]


def iptables_s(host: Host, table: str, chain: str) -> list[str]:
    cp = host.run("iptables", "-w", "-t", table, "-S", chain, check=False)
    return cp.stdout.splitlines() if cp.returncode == 0 else []


def rule_packets(host: Host, table: str, chain: str) -> list[int]:
    """Packet counters of the chain's rules, in order (``iptables -L -v -x``)."""
    out = host.run("iptables", "-w", "-t", table, "-L", chain, "-v", "-x", "-n").stdout.splitlines()
    return [int(ln.split()[0]) for ln in out[2:] if ln.strip()]
