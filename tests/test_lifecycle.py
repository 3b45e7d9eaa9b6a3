"""Issue 9: every change the daemon survives ends as a fresh start would, and /readyz tells the
truth. Real etcd, namespaces and traffic; what is asserted is what an operator checks (ip neigh,
bridge fdb, ip route, /peers, subnet.env, /readyz, pings, the etcd keys)."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from helpers import key_of, subnet_of, wait_for
from test_faults import (
    HZ,
    PREFIX,
    VXLAN,
    flannel_routes,
    http_get,
    kernel_view,
    no_traceback,
    peers_of,
    vxlan_cluster,
    vxlan_value,
)

from lab.cluster import start_daemon, udp_worker_pids

pytestmark = pytest.mark.lab

OTHER = "192.168.100.77"  # a host that exists only in etcd
OTHER_MAC = "02:77:77:77:77:77"


def readyz(host) -> tuple[int, str]:
    return http_get(host, "/readyz")


def wait_ready(host, timeout=20):
    wait_for(lambda: readyz(host)[0] == 200, timeout, 0.1, f"{host.name} /readyz 200")


def own_entries(host, mac: str) -> list[str]:
    """ARP/FDB lines on flannel.1 that point at the host's own VTEP (a host is never its own peer)."""
    neigh = [ln for ln in host.ip("neigh", "show", "dev", "flannel.1").splitlines() if mac in ln]
    fdb = [ln for ln in host.bridge("fdb", "show", "dev", "flannel.1").splitlines() if mac in ln and " dst " in ln]
    return neigh + fdb


def take_over(etcd, sn: str, value: str) -> None:
    """Delete a key and at once give the same subnet to another host (etcd refuses both in one
    transaction; two calls some milliseconds apart, as an operator's script would)."""
    etcd.delete(key_of(sn))
    etcd.put(key_of(sn), value)


# -- case 1: own lease lost and its subnet taken by another host --------------------------------
def test_vxlan_own_subnet_taken_over_converges_like_a_fresh_start(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), _ = vxlan_cluster(lab, etcd, ["h1", "h2"])
    old, sn2 = str(subnet_of(d1.subnet_env())), str(subnet_of(d2.subnet_env()))
    mac1 = json.loads(etcd.get(key_of(old)))["BackendData"]["VtepMAC"]
    wait_for(lambda: peers_of(h1) == {sn2}, 10, 0.1, "h1 sees h2")
    take_over(etcd, old, vxlan_value(OTHER, OTHER_MAC))

    new = wait_for(lambda: (e := d1.subnet_env()) and str(subnet_of(e)) != old and str(subnet_of(e)), 15, 0.1,
                   "h1 on a new subnet")
    assert json.loads(etcd.get(key_of(new)))["PublicIP"] == h1.address
    assert json.loads(etcd.get(key_of(old)))["PublicIP"] == OTHER  # not taken back
    # h1: exactly the two others are its peers — the taker of its old subnet included, itself never
    wait_for(lambda: peers_of(h1) == {old, sn2}, 10, 0.1, "h1 /peers == the others")
    arp, fdb, routes = kernel_view(h1)
    mac2 = json.loads(etcd.get(key_of(sn2)))["BackendData"]["VtepMAC"]
    assert routes == {old, sn2}, routes
    assert arp == {old.split("/")[0]: OTHER_MAC, sn2.split("/")[0]: mac2}, arp
    assert fdb == {(OTHER_MAC, OTHER), (mac2, h2.address)}, fdb
    assert own_entries(h1, mac1) == []
    # h2 follows: h1's new subnet and the taker's
    wait_for(lambda: flannel_routes(h2) == {old, new}, 10, 0.1, "h2 routes to h1's new subnet and the taker")
    wait_ready(h1)
    time.sleep(11)  # one safety-net pass (10 s): nothing to repair, nothing failing
    assert kernel_view(h1) == (arp, fdb, routes)
    assert "route set failed" not in d1.log_text() and "failed" not in d1.log_text().split("subnet changed")[-1]
    no_traceback(d1)


UDP = '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'


def test_udp_own_subnet_taken_over_forwarder_keeps_every_peer(lab, etcd):
    etcd.put(f"{PREFIX}/config", UDP)
    hosts = [lab.add_host(n) for n in ("h1", "h2")]
    env = {"PYFLANNELD_UDP_WORKERS": "1"}
    d1, d2 = (start_daemon(h, "--healthz-port", str(HZ), env=env) for h in hosts)
    h1, h2 = hosts
    old, sn2 = str(subnet_of(d1.wait_subnet_env(20))), str(subnet_of(d2.wait_subnet_env(20)))
    h2.make_bridge("docker0", d2.subnet_env()["FLANNEL_SUBNET"], d2.subnet_env()["FLANNEL_MTU"])
    p2 = lab.add_pod(h2, "p1")
    wait_for(lambda: peers_of(h1) == {sn2}, 10, 0.1, "udp /peers lists h2 (case 2)")
    wait_for(lambda: h1.ping(p2.address, count=1, timeout=1), 10, 0.2, "h1 → h2's pod")
    take_over(etcd, old, json.dumps({"PublicIP": OTHER, "PublicIPv6": None}))
    new = wait_for(lambda: (e := d1.subnet_env()) and str(subnet_of(e)) != old and str(subnet_of(e)), 15, 0.1,
                   "h1 on a new subnet")
    wait_for(lambda: peers_of(h1) == {old, sn2}, 10, 0.1, "h1 /peers == the others")
    wait_for(lambda: sn2 in peers_of(h1) and new in peers_of(h2), 10, 0.1, "both know each other")
    # the new forwarder routes to h2 at once (from h1's new TUN address to h2's pod and back)
    wait_for(lambda: h1.ping(p2.address, count=1, timeout=1), 10, 0.2, "h1 → h2's pod after the move")
    wait_ready(h1)
    no_traceback(d1)


# -- case 2: udp — /peers, and a stuck worker never blocks the loop ------------------------------
def test_udp_stop_of_a_stuck_worker_does_not_block_the_daemon(lab, etcd):
    etcd.put(f"{PREFIX}/config", UDP)
    h1 = lab.add_host("h1")
    d1 = start_daemon(h1, "--healthz-port", str(HZ), env={"PYFLANNELD_UDP_WORKERS": "1"})
    old = str(subnet_of(d1.wait_subnet_env(20)))
    wait_ready(h1)
    workers = wait_for(lambda: udp_worker_pids(d1.pid), 10, 0.1, "udp worker")
    os.kill(workers[0], signal.SIGSTOP)  # a worker that cannot take the STOP message
    try:
        # the lease moves: the old forwarder stops (slowly) while the daemon keeps answering
        take_over(etcd, old, json.dumps({"PublicIP": OTHER, "PublicIPv6": None}))
        slowest = 0.0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            code, _ = http_get(h1, "/healthz")
            slowest = max(slowest, time.monotonic() - t0)
            assert code == 200
            time.sleep(0.1)
        assert slowest < 1.5, f"/healthz took {slowest:.1f}s while the forwarder stopped"
        wait_for(lambda: (e := d1.subnet_env()) and str(subnet_of(e)) != old, 10, 0.1, "h1 moved")
        # and SIGTERM with a stuck worker still exits within the shutdown bound
        os.kill(wait_for(lambda: udp_worker_pids(d1.pid), 10, 0.1, "new udp worker")[0], signal.SIGSTOP)
        t0 = time.monotonic()
        assert d1.stop(timeout=10) == 0
        assert time.monotonic() - t0 < 3.0
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# -- case 3: the external NIC deleted and re-created ---------------------------------------------
def recreate_eth0(h, address: str | None = None) -> None:
    """What a driver reload / VM hot-plug does: eth0 gone (flannel.1 goes with it), then back with a
    new ifindex, the same name and (unless given) the same address."""
    lab = h.lab
    h.ip("link", "del", "eth0")
    time.sleep(1)
    lab.switch.ip("link", "add", f"v{h.name}", "type", "veth", "peer", "name", "eth0", "netns", h.ns)
    lab.switch.ip("link", "set", f"v{h.name}", "master", "br0", "mtu", str(h.mtu), "up")
    h.ip("link", "set", "eth0", "mtu", str(h.mtu), "up")
    h.ip("addr", "add", f"{address or h.address}/{h.prefixlen}", "dev", "eth0")
    h.ip("route", "add", "default", "via", h.gateway)


def vxlan_dev(h) -> dict:
    d = h.ip_json("-d", "link", "show", "flannel.1")[0]
    return d["linkinfo"]["info_data"] | {"link": d.get("link_index") or d.get("link"), "address": d["address"]}


def test_external_nic_recreated_moves_the_vtep(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0")
    mac1 = vxlan_dev(h1)["address"]
    before = kernel_view(h1)
    assert p1.wait_ping(p2.address, timeout=10)
    old_index = h1.ip_json("link", "show", "eth0")[0]["ifindex"]
    recreate_eth0(h1)
    new_index = h1.ip_json("link", "show", "eth0")[0]["ifindex"]
    assert new_index != old_index
    wait_for(lambda: h1.link_exists("flannel.1") and kernel_view(h1) == before, 15, 0.2,
             "flannel.1 and h2's entries back")
    dev = vxlan_dev(h1)
    assert dev["address"] == mac1 and dev["local"] == h1.address, dev
    assert "dev eth0" in h1.ip("-d", "link", "show", "flannel.1")
    wait_ready(h1)
    assert p1.wait_ping(p2.address, timeout=10) and p2.wait_ping(p1.address, timeout=5)
    assert "external interface changed" in d1.log_text()
    no_traceback(d1)


def test_readyz_says_the_interface_is_gone(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1,), (d1,), _ = vxlan_cluster(lab, etcd, ["h1"], "--iface", "eth0")
    wait_ready(h1)
    h1.ip("link", "del", "eth0")
    code, body = wait_for(lambda: (r := readyz(h1))[0] == 503 and r, 10, 0.1, "/readyz 503")
    assert "eth0" in body and "interface" in body, body


# -- case 4: the external address changes while running ------------------------------------------
def test_external_address_change_moves_vtep_and_lease(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0")
    sn1 = str(subnet_of(d1.subnet_env()))
    mac1 = vxlan_dev(h1)["address"]
    assert p1.wait_ping(p2.address, timeout=10)
    new_ip = "192.168.100.51"
    h1.ip("addr", "del", f"{h1.address}/{h1.prefixlen}", "dev", "eth0")
    h1.ip("addr", "add", f"{new_ip}/{h1.prefixlen}", "dev", "eth0")
    h1.ip("route", "add", "default", "via", h1.gateway)
    # the etcd connection from the old address is dead and times out first (gRPC keepalive, ~15 s)
    wait_for(lambda: json.loads(etcd.get(key_of(sn1)))["PublicIP"] == new_ip, 45, 0.2, "lease PublicIP follows")
    assert str(subnet_of(d1.subnet_env())) == sn1  # the subnet is kept
    lease = json.loads(etcd.get(key_of(sn1)))
    assert lease["BackendData"]["VtepMAC"] == mac1
    wait_for(lambda: vxlan_dev(h1)["local"] == new_ip, 10, 0.2, "flannel.1 local follows")
    wait_for(lambda: (mac1, new_ip) in kernel_view(h2)[1], 10, 0.2, "h2's FDB points at the new address")
    assert not any(dst == h1.address for _, dst in kernel_view(h2)[1])
    wait_ready(h1)
    assert p1.wait_ping(p2.address, timeout=10) and p2.wait_ping(p1.address, timeout=5)
    assert d1.log_text().count("external interface changed") == 1
    no_traceback(d1)


# -- case 5: partition longer than the TTL while another host takes the subnet (small pool) -------
def test_partition_longer_than_ttl_with_pool_taken_is_not_ready_until_a_lease(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0",'
             '"Backend":{"Type":"vxlan"}}')
    short = ("--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s")
    (h1, h2), (d1, d2), _ = vxlan_cluster(lab, etcd, ["h1", "h2"], *short)
    sn1 = str(subnet_of(d1.subnet_env()))
    wait_ready(h1)
    block = ["OUTPUT", "-d", etcd.ip, "-p", "tcp", "--dport", str(etcd.client_port), "-j", "DROP"]
    h1.run("iptables", "-w", "-A", *block)
    try:
        wait_for(lambda: etcd.get(key_of(sn1)) is None, 20, 0.2, "h1's lease to expire")
        etcd.put(key_of(sn1), vxlan_value(OTHER, OTHER_MAC))  # another host takes it: the pool is full
    finally:
        h1.run("iptables", "-w", "-D", *block)
    d1.wait_log(r"own lease lost", timeout=30)
    d1.wait_log(r"out of subnets", timeout=30)
    code, body = readyz(h1)
    assert code == 503 and "out of subnets" in body, (code, body)
    time.sleep(3)  # it stays so: no lease, not ready
    assert readyz(h1)[0] == 503
    assert d1.log_text().count("out of subnets") == 1
    # the other host goes away: h1 gets a lease again and is ready
    etcd.delete(key_of(sn1))
    wait_ready(h1, 60)
    assert json.loads(etcd.get(key_of(subnet_of(d1.subnet_env()))))["PublicIP"] == h1.address
    no_traceback(d1)


# -- case 6: subnet.env cannot be written --------------------------------------------------------
def test_unwritable_subnet_env_is_not_ready_and_retried(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}')
    h1 = lab.add_host("h1")
    blocker = lab.tmp / "run-flannel"
    blocker.write_text("a file where the directory should be\n")
    sf = blocker / "subnet.env"
    sock_path = Path(tempfile.mkdtemp(dir=lab.tmp)) / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(0.5)
    try:
        d = start_daemon(h1, "--healthz-port", str(HZ), "--subnet-file", str(sf), env={"NOTIFY_SOCKET": str(sock_path)})
        d.wait_log(r"failed to write subnet file", timeout=15)
        code, body = readyz(h1)
        assert code == 503 and "subnet file" in body and str(sf) in body, (code, body)
        with pytest.raises(TimeoutError):
            srv.recv(100)  # no READY=1
        assert "flannel is ready" not in d.log_text()
        blocker.unlink()  # the operator fixes it: the daemon retries by itself
        wait_for(lambda: sf.exists(), 30, 0.1, "subnet.env written")
        srv.settimeout(15)
        assert srv.recv(100) == b"READY=1"
        wait_ready(h1)
        assert sf.read_text().startswith("FLANNEL_NETWORK=10.1.0.0/16\n")
    finally:
        srv.close()


# -- case 7: a reservation made (and removed) while running --------------------------------------
def v3_lease_id(etcd, key: str) -> int:
    kvs = json.loads(etcd.etcdctl("get", key, "-w", "json")).get("kvs") or []
    assert kvs, f"{key} not in etcd"
    return int(kvs[0].get("lease", 0))


def test_reservation_while_running_is_followed(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}')
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s")
    sn = subnet_of(d.wait_subnet_env())
    key = key_of(sn)
    value = etcd.get(key)
    etcd.put(key, value)  # no --lease: upstream's documented reservation
    d.wait_log(r"reservation", timeout=10)
    renewed = d.log_text().count("lease renewed")
    time.sleep(6)  # longer than the TTL: a renewal would have given it a lease again
    assert v3_lease_id(etcd, key) == 0, "the reservation was undone"
    assert d.log_text().count("lease renewed") == renewed
    # the operator removes the reservation (gives the key a TTL): renewals resume
    lease = etcd.etcdctl("lease", "grant", "30").split()[1]
    etcd.etcdctl("put", key, value, "--lease", lease)
    wait_for(lambda: d.log_text().count("lease renewed") >= renewed + 2, 15, 0.2, "renewals resume")
    assert v3_lease_id(etcd, key) not in (0, int(lease, 16))
    assert subnet_of(d.subnet_env()) == sn and d.alive


# -- case 8: two hosts with the same PublicIP ----------------------------------------------------
def test_two_hosts_with_the_same_public_ip_warn_and_do_not_flip_flop(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    same = ("--public-ip", "192.168.100.50", "--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s")
    d1 = start_daemon(h1, *same)
    sn1 = subnet_of(d1.wait_subnet_env(15))
    d2 = start_daemon(h2, *same)
    d2.wait_subnet_env(15)
    # one of them notices the other and names both identities; then both settle on their own subnet
    wait_for(lambda: "same PublicIP" in d1.log_text() + d2.log_text(), 20, 0.2, "a warning")
    time.sleep(4)
    envs = [subnet_of(d.subnet_env()) for d in (d1, d2)]
    lost = [d.log_text().count("own lease lost") for d in (d1, d2)]
    time.sleep(10)  # several renewals: nothing moves any more
    assert [subnet_of(d.subnet_env()) for d in (d1, d2)] == envs
    assert envs[0] != envs[1], envs
    assert [d.log_text().count("own lease lost") for d in (d1, d2)] == lost
    macs = {json.loads(etcd.get(key_of(sn)))["BackendData"]["VtepMAC"] for sn in envs}
    assert len(macs) == 2
    line = next(ln for ln in (d1.log_text() + d2.log_text()).splitlines() if "same PublicIP" in ln)
    assert all(m in line for m in macs), line
    assert sn1 in envs


# -- case 9: Network changed, then restart -------------------------------------------------------
def test_network_changed_then_restart_removes_the_old_networks_state(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), _ = vxlan_cluster(lab, etcd, ["h1", "h2"])
    old2 = str(subnet_of(d2.subnet_env()))
    assert flannel_routes(h1) == {old2}
    assert d1.stop() == 0 and d2.stop() == 0
    etcd.put(f"{PREFIX}/config", VXLAN.replace("10.5.0.0/16", "10.6.0.0/16"))
    d1.restart()
    wait_for(lambda: (e := d1.subnet_env()) and e["FLANNEL_NETWORK"] == "10.6.0.0/16", 20, 0.1, "new Network")
    new1 = subnet_of(d1.subnet_env())
    addrs = lambda: {a["local"] + "/" + str(a["prefixlen"]) for a in h1.ip_json("addr", "show", "flannel.1")[0]["addr_info"]  # noqa: E731
                     if a["family"] == "inet"}
    wait_for(lambda: addrs() == {f"{new1.network_address}/32"}, 10, 0.1, "only the new address on flannel.1")
    # the previous Network's peer routes go (docker0 keeps its old subnet until docker restarts)
    wait_for(lambda: not any(r.startswith("10.5.") for r in flannel_routes(h1)), 15, 0.2,
             "no route of the old Network on flannel.1")
    assert kernel_view(h1) == ({}, set(), set())  # and no ARP/FDB entry of the old peers


# -- case 10: --ip-blackhole-route after a subnet change -----------------------------------------
def test_blackhole_route_follows_a_subnet_change(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}')
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--ip-blackhole-route", "--iptables-resync", "1")
    old = subnet_of(d.wait_subnet_env())
    wait_for(lambda: f"blackhole {old}" in h1.ip("route", "show"), 5, 0.1, "blackhole route")
    take_over(etcd, str(old), json.dumps({"PublicIP": OTHER, "PublicIPv6": None}))
    new = wait_for(lambda: (e := d.subnet_env()) and subnet_of(e) != old and subnet_of(e), 15, 0.1, "moved")
    wait_for(lambda: f"blackhole {new}" in h1.ip("route", "show"), 5, 0.1, "new blackhole route")
    wait_for(lambda: f"blackhole {old}" not in h1.ip("route", "show"), 5, 0.1, "old blackhole route gone")
    assert isinstance(new, IPv4Network)
