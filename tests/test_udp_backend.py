"""udp backend end to end: real pyflanneld daemons on lab hosts, real etcd, pods behind docker0.

What is asserted is what an operator sees, as upstream's udp backend has it (pkg/backend/udp: TUN
``flannel0`` from the template ``flannel%d``; proxy_amd64.c forwards the raw inner packet as the UDP
payload): subnet.env MTU = iface MTU − 28, the lease without BackendType, ``flannel0`` with the
lease subnet's network address /32 and one route for the whole Network, pods reaching each other,
and the forwarder following lease events without restarting its workers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from e2e_helpers import (
    NETWORK,
    PREFIX,
    Node,
    attach_pod,
    config,
    key_of,
    ping_all,
    ping_df,
    start_nodes,
    wait_for,
)

from lab import start_daemon
from lab.cluster import udp_worker_pids as worker_pids
from lab.measure import iperf3_server

pytestmark = pytest.mark.lab

UDP = {"Type": "udp"}


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def iperf(src_pod, dst_pod, amount: str = "10M") -> dict:
    with iperf3_server(dst_pod, timeout_s=30):
        cp = src_pod.run("iperf3", "-c", dst_pod.address, "-n", amount, "-J", timeout=120)
        return json.loads(cp.stdout)["end"]


def test_udp_three_hosts(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(UDP))
    h1, h2, h3 = (lab.add_host(n) for n in ("h1", "h2", "h3"))
    nodes = start_nodes(lab, [h1, h2, h3])
    for n in nodes:
        assert n.env["FLANNEL_NETWORK"] == NETWORK
        assert n.env["FLANNEL_MTU"] == "1472"  # 1500 − 28
        # the lease carries no BackendType (upstream: udp leases have none)
        assert json.loads(etcd.get(key_of(n.subnet))) == {"PublicIP": n.ip, "PublicIPv6": None}
        link = n.host.ip_json("-d", "link", "show", "flannel0")[0]
        assert link["mtu"] == 1472 and link["linkinfo"]["info_kind"] == "tun"
        assert "UP" in link["flags"]
        addrs = n.host.ip_json("-4", "addr", "show", "flannel0")[0]["addr_info"]
        assert [(a["local"], a["prefixlen"]) for a in addrs] == [(n.gw, 32)]
        assert n.host.ip("route", "show", "dev", "flannel0").strip() == NETWORK  # proto boot, scope global
        assert len(worker_pids(n.daemon.pid)) >= 1
        assert re.search(r"udp forwarder started.*offload=(True|true)", n.daemon.log_text())
    assert ping_all([n.pod for n in nodes]) == []
    # the full MTU passes with DF set (1472 − 28 bytes of ICMP payload), one more byte does not
    assert ping_df(nodes[0].pod, nodes[1].pod.address, 1472 - 28)
    assert not ping_df(nodes[0].pod, nodes[1].pod.address, 1472 - 27)
    end = iperf(nodes[0].pod, nodes[2].pod, "20M")
    assert end["sum_sent"]["bytes"] >= 20 * 1024 * 1024
    assert end["sum_received"]["bytes"] >= 15 * 1024 * 1024


def test_udp_join_and_leave_update_forwarding_without_restart(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(UDP))
    n1, n2 = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")])
    pids = {n.host.name: worker_pids(n.daemon.pid) for n in (n1, n2)}
    assert all(pids.values())
    assert ping_all([n1.pod, n2.pod]) == []

    h3 = lab.add_host("h3")
    d3 = start_daemon(h3, "--iface", "eth0")
    env3 = d3.wait_subnet_env(timeout=30)
    n3 = Node(h3, d3, env3, attach_pod(lab, h3, env3))
    # (how fast a join is programmed: `python -m bench join`)
    wait_for(lambda: n1.pod.ping(n3.pod.address, timeout=0.5), 30, "h1's pod reaching h3's pod")
    assert ping_all([n1.pod, n2.pod, n3.pod]) == []

    # leave: stop h3 and delete its lease; h1 and h2 stop forwarding to it
    assert d3.stop() == 0
    assert etcd.delete(key_of(n3.subnet)) == 1
    probe = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR
deadline = time.monotonic() + 30  # until h1's daemon has applied the delete
while time.monotonic() < deadline:
    s.sendto(b"x", ({n3.pod.address!r}, 9))
    time.sleep(0.05)
    try:
        s.recvmsg(64, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        print("unreachable"); break
    except BlockingIOError:
        pass
"""
    # no route any more → the forwarder answers ICMP net unreachable (it reaches the pod)
    out = n1.pod.run("python3", "-c", probe, timeout=60).stdout
    assert "unreachable" in out
    assert ping_all([n1.pod, n2.pod]) == []
    for n in (n1, n2):
        assert worker_pids(n.daemon.pid) == pids[n.host.name], "workers were restarted"


def test_udp_sigterm_keeps_lease_and_restart_resumes(lab, etcd):
    etcd.put(f"{PREFIX}/config", config(UDP))
    n1, n2 = start_nodes(lab, [lab.add_host("h1"), lab.add_host("h2")])
    assert ping_all([n1.pod, n2.pod]) == []
    pids = worker_pids(n1.daemon.pid)
    lease = etcd.get(key_of(n1.subnet))
    assert n1.daemon.stop() == 0
    wait_for(lambda: not any(alive(p) for p in pids), 30, "workers gone after SIGTERM")
    assert etcd.get(key_of(n1.subnet)) == lease  # SIGTERM removes nothing a restart needs
    assert not n1.host.link_exists("flannel0")  # the TUN goes with the process, as upstream's

    d = n1.daemon.restart()
    env = d.wait_subnet_env(timeout=30)
    assert env["FLANNEL_SUBNET"] == n1.env["FLANNEL_SUBNET"]
    wait_for(lambda: n1.pod.ping(n2.pod.address, timeout=0.5), 30, "traffic after restart")
    assert worker_pids(d.pid)


def test_udp_per_packet_mode_end_to_end(lab, etcd):
    """PYFLANNELD_UDP_OFFLOAD=0: the per-packet forwarder (no virtio-net header, no UDP GSO/GRO)."""
    etcd.put(f"{PREFIX}/config", config(UDP))
    hosts = [lab.add_host("h1"), lab.add_host("h2")]
    daemons = [start_daemon(h, "--iface", "eth0", env={"PYFLANNELD_UDP_OFFLOAD": "0"}) for h in hosts]
    nodes = []
    for h, d in zip(hosts, daemons, strict=True):
        env = d.wait_subnet_env(timeout=30)
        nodes.append(Node(h, d, env, attach_pod(lab, h, env)))
    assert ping_all([n.pod for n in nodes]) == []
    end = iperf(nodes[0].pod, nodes[1].pod, "20M")
    assert end["sum_received"]["bytes"] >= 15 * 1024 * 1024
    assert "offload=False" in nodes[0].daemon.log_text() or "offload=false" in nodes[0].daemon.log_text()
