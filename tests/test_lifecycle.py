"""Issue 9: every change the daemon survives ends as a fresh start would, and /readyz tells the
truth. Real etcd, namespaces and traffic; what is asserted is what an operator checks (ip neigh,
bridge fdb, ip route, /peers, subnet.env, /readyz, pings, the etcd keys)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from helpers import key_of, said, subnet_of, wait_config_rechecks, wait_for, wait_lease_retries
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
    wait_for(lambda: readyz(host)[0] == 200, timeout, f"{host.name} /readyz 200", interval=0.1)


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
    wait_for(lambda: peers_of(h1) == {sn2}, 30, "h1 sees h2", interval=0.1)
    take_over(etcd, old, vxlan_value(OTHER, OTHER_MAC))

    new = wait_for(lambda: (e := d1.subnet_env()) and str(subnet_of(e)) != old and str(subnet_of(e)),
                   30, "h1 on a new subnet", interval=0.1)
    assert json.loads(etcd.get(key_of(new)))["PublicIP"] == h1.address
    assert json.loads(etcd.get(key_of(old)))["PublicIP"] == OTHER  # not taken back
    # h1: exactly the two others are its peers — the taker of its old subnet included, itself never
    wait_for(lambda: peers_of(h1) == {old, sn2}, 30, "h1 /peers == the others", interval=0.1)
    mac2 = json.loads(etcd.get(key_of(sn2)))["BackendData"]["VtepMAC"]
    want = ({old.split("/")[0]: OTHER_MAC, sn2.split("/")[0]: mac2},  # ARP
            {(OTHER_MAC, OTHER), (mac2, h2.address)},  # FDB
            {old, sn2})  # routes
    wait_for(lambda: kernel_view(h1) == want, 30, "h1's ARP/FDB/routes for the others",
             detail=lambda: kernel_view(h1))
    assert own_entries(h1, mac1) == []
    # h2 follows: h1's new subnet and the taker's
    wait_for(lambda: flannel_routes(h2) == {old, new},
             30, "h2 routes to h1's new subnet and the taker", interval=0.1)
    wait_ready(h1)
    # a full pass over that state (started by the netlink events of an ARP entry changed behind the
    # daemon's back and of a stale one planted) repairs exactly those two, and nothing else
    repairs = d1.log_text().count("kernel state reconciled")
    h1.ip("neigh", "replace", sn2.split("/")[0], "lladdr", "02:00:00:00:00:99", "dev", "flannel.1", "nud", "permanent")
    h1.ip("neigh", "add", "10.5.0.250", "lladdr", "02:00:00:00:00:fa", "dev", "flannel.1", "nud", "permanent")
    wait_for(lambda: d1.log_text().count("kernel state reconciled") > repairs and kernel_view(h1) == want, 60,
             "a full pass", detail=lambda: kernel_view(h1))
    assert "route set failed" not in d1.log_text() and "failed" not in d1.log_text().split("subnet changed")[-1]
    # its own new key was never taken for a bad peer lease (its watch event comes before the write returns)
    assert "ignoring bad lease entry" not in d1.log_text(), d1.log_text()[-3000:]
    no_traceback(d1)


UDP = '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'


def test_udp_own_subnet_taken_over_forwarder_keeps_every_peer(lab, etcd):
    etcd.put(f"{PREFIX}/config", UDP)
    hosts = [lab.add_host(n) for n in ("h1", "h2")]
    env = {"PYFLANNELD_UDP_WORKERS": "1"}
    d1, d2 = (start_daemon(h, "--healthz-port", str(HZ), env=env) for h in hosts)
    h1, h2 = hosts
    old, sn2 = str(subnet_of(d1.wait_subnet_env(30))), str(subnet_of(d2.wait_subnet_env(30)))
    h2.make_bridge("docker0", d2.subnet_env()["FLANNEL_SUBNET"], d2.subnet_env()["FLANNEL_MTU"])
    p2 = lab.add_pod(h2, "p1")
    wait_for(lambda: peers_of(h1) == {sn2}, 30, "udp /peers lists h2 (case 2)", interval=0.1)
    wait_for(lambda: h1.ping(p2.address, count=1, timeout=1), 30, "h1 → h2's pod", interval=0.2)
    take_over(etcd, old, json.dumps({"PublicIP": OTHER, "PublicIPv6": None}))
    new = wait_for(lambda: (e := d1.subnet_env()) and str(subnet_of(e)) != old and str(subnet_of(e)),
                   30, "h1 on a new subnet", interval=0.1)
    wait_for(lambda: peers_of(h1) == {old, sn2}, 30, "h1 /peers == the others", interval=0.1)
    wait_for(lambda: sn2 in peers_of(h1) and new in peers_of(h2), 30, "both know each other", interval=0.1)
    # the new forwarder routes to h2 at once (from h1's new TUN address to h2's pod and back)
    wait_for(lambda: h1.ping(p2.address, count=1, timeout=1), 30, "h1 → h2's pod after the move", interval=0.2)
    wait_ready(h1)
    no_traceback(d1)


# -- case 2: udp — /peers, and a stuck worker never blocks the loop ------------------------------
# Runs in h1's namespace: GET /healthz again and again; after each answer, look at the stuck worker.
# It prints "stopping" when an answer came while the worker was being stopped (SIGTERM pending: the
# supervisor is waiting before its SIGKILL), "gone" if the worker died before any such answer (the
# loop was blocked all through the stop).
HEALTHZ_DURING_STOP = """
import sys, time, urllib.request
pid, url = sys.argv[1], sys.argv[2]

def worker() -> str:
    try:
        status = dict(ln.split(":", 1) for ln in open(f"/proc/{pid}/status").read().splitlines() if ":" in ln)
    except OSError:
        return "gone"
    if status["State"].split()[0] in ("Z", "X"):
        return "gone"
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return "stopping" if pending & (1 << 14) else "running"  # bit 14: SIGTERM (15)

while True:
    with urllib.request.urlopen(url, timeout=120) as r:
        assert r.status == 200, r.status
    state = worker()
    if state != "running":
        print(state, flush=True)
        break
    time.sleep(0.02)
"""


def freeze(pid: int) -> None:
    """SIGSTOP pid and wait until it is stopped (a signal is taken on the process's next way back
    to user space; SIGTERM, a lower number, would be handled before a still pending SIGSTOP)."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 30,
             f"process {pid} stopped")


def test_udp_stop_of_a_stuck_worker_does_not_block_the_daemon(lab, etcd):
    etcd.put(f"{PREFIX}/config", UDP)
    h1 = lab.add_host("h1")
    d1 = start_daemon(h1, "--healthz-port", str(HZ), env={"PYFLANNELD_UDP_WORKERS": "1"})
    old = str(subnet_of(d1.wait_subnet_env(30)))
    wait_ready(h1)
    workers = wait_for(lambda: udp_worker_pids(d1.pid), 30, "udp worker", interval=0.1)
    freeze(workers[0])  # a worker that cannot take the STOP message
    try:
        # the lease moves: the old forwarder stops (slowly: STOP, 2 s, SIGTERM, 2 s, SIGKILL) while
        # the daemon keeps answering
        probe = h1.popen(sys.executable, "-c", HEALTHZ_DURING_STOP, str(workers[0]),
                         f"http://127.0.0.1:{HZ}/healthz", name="healthz-probe")
        take_over(etcd, old, json.dumps({"PublicIP": OTHER, "PublicIPv6": None}))
        assert probe.wait(120) == 0, probe.log_text()
        assert probe.log_text().strip() == "stopping", probe.log_text()
        wait_for(lambda: (e := d1.subnet_env()) and str(subnet_of(e)) != old, 30, "h1 moved", interval=0.1)
        # and SIGTERM with a stuck worker still exits at once: the shutdown does not wait for the
        # new forwarder's stop (which would log "udp forwarder stopped" a second time)
        new = wait_for(lambda: [p for p in udp_worker_pids(d1.pid) if p not in workers], 30, "new udp worker",
                       interval=0.1)
        d1.wait_log("udp forwarder stopped", 30)  # the old forwarder's, before the new one started
        workers += new
        freeze(new[0])
        assert d1.stop(timeout=20) == 0
        assert d1.log_text().count("udp forwarder stopped") == 1, d1.log_text()[-3000:]
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# -- case 3: the external NIC deleted and re-created ---------------------------------------------
def recreate_eth0(h, address: str | None = None) -> None:
    """What a driver reload / VM hot-plug does: eth0 gone (flannel.1 goes with it) — the daemon
    says so on /readyz — then back with a new ifindex, the same name and (unless given) the same
    address."""
    lab = h.lab
    h.ip("link", "del", "eth0")
    wait_for(lambda: (r := readyz(h))[0] == 503 and "eth0" in r[1], 30, f"{h.name} /readyz: eth0 gone",
             detail=lambda: readyz(h))
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
    assert p1.wait_ping(p2.address, timeout=30)
    old_index = h1.ip_json("link", "show", "eth0")[0]["ifindex"]
    recreate_eth0(h1)
    new_index = h1.ip_json("link", "show", "eth0")[0]["ifindex"]
    assert new_index != old_index
    wait_for(lambda: h1.link_exists("flannel.1") and kernel_view(h1) == before,
             30, "flannel.1 and h2's entries back", interval=0.2)
    dev = vxlan_dev(h1)
    assert dev["address"] == mac1 and dev["local"] == h1.address, dev
    assert "dev eth0" in h1.ip("-d", "link", "show", "flannel.1")
    wait_ready(h1)
    assert p1.wait_ping(p2.address, timeout=30) and p2.wait_ping(p1.address, timeout=30)
    assert "external interface changed" in d1.log_text()
    no_traceback(d1)


def test_readyz_says_the_interface_is_gone(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1,), (d1,), _ = vxlan_cluster(lab, etcd, ["h1"], "--iface", "eth0")
    wait_ready(h1)
    h1.ip("link", "del", "eth0")
    code, body = wait_for(lambda: (r := readyz(h1))[0] == 503 and r, 30, "/readyz 503", interval=0.1)
    assert "eth0" in body and "interface" in body, body


# -- case 4: the external address changes while running ------------------------------------------
@pytest.mark.parametrize("api", ["v3", "v2"])
def test_external_address_change_moves_vtep_and_lease(lab, etcd, api):
    put, get = (etcd.put, etcd.get) if api == "v3" else (etcd.v2_put, etcd.v2_get)
    put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0", "--etcd-api", api)
    sn1 = str(subnet_of(d1.subnet_env()))
    mac1 = vxlan_dev(h1)["address"]
    assert p1.wait_ping(p2.address, timeout=30)
    new_ip = "192.168.100.51"
    h1.ip("addr", "del", f"{h1.address}/{h1.prefixlen}", "dev", "eth0")
    h1.ip("addr", "add", f"{new_ip}/{h1.prefixlen}", "dev", "eth0")
    h1.ip("route", "add", "default", "via", h1.gateway)
    # the etcd connection from the old address is dead: the daemon opens a new one at once rather
    # than waiting for a request deadline or keepalive (10-20 s) to say so
    wait_for(lambda: json.loads(get(key_of(sn1)))["PublicIP"] == new_ip,
             45, "lease PublicIP follows", interval=0.2)
    for dead in ("no answer from etcd", "cannot update the lease"):
        assert dead not in d1.log_text(), d1.log_text()[-3000:]
    assert str(subnet_of(d1.subnet_env())) == sn1  # the subnet is kept
    lease = json.loads(get(key_of(sn1)))
    assert lease["BackendData"]["VtepMAC"] == mac1
    wait_for(lambda: vxlan_dev(h1)["local"] == new_ip, 30, "flannel.1 local follows", interval=0.2)
    wait_for(lambda: (mac1, new_ip) in kernel_view(h2)[1],
             30, "h2's FDB points at the new address", interval=0.2)
    assert not any(dst == h1.address for _, dst in kernel_view(h2)[1])
    wait_ready(h1)
    assert p1.wait_ping(p2.address, timeout=30) and p2.wait_ping(p1.address, timeout=30)
    assert d1.log_text().count("external interface changed") == 1
    # the watch runs again (on a new connection): a host joining now is programmed
    put(key_of("10.5.200.0/24"), vxlan_value(OTHER, OTHER_MAC))
    wait_for(lambda: "10.5.200.0/24" in flannel_routes(h1), 30, "h1 programs a host that joins", interval=0.2)
    no_traceback(d1)


# -- case 5: partition longer than the TTL while another host takes the subnet (small pool) -------
def test_partition_longer_than_ttl_with_pool_taken_is_not_ready_until_a_lease(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0",'
             '"Backend":{"Type":"vxlan"}}')
    short = ("--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s", "-v", "1")
    (h1, h2), (d1, d2), _ = vxlan_cluster(lab, etcd, ["h1", "h2"], *short)
    sn1 = str(subnet_of(d1.subnet_env()))
    wait_ready(h1)
    block = ["OUTPUT", "-d", etcd.ip, "-p", "tcp", "--dport", str(etcd.client_port), "-j", "DROP"]
    h1.run("iptables", "-w", "-A", *block)
    try:
        wait_for(lambda: etcd.get(key_of(sn1)) is None, 30, "h1's lease to expire", interval=0.2)
        etcd.put(key_of(sn1), vxlan_value(OTHER, OTHER_MAC))  # another host takes it: the pool is full
    finally:
        h1.run("iptables", "-w", "-D", *block)
    d1.wait_log(r"own lease lost", timeout=30)
    d1.wait_log(r"out of subnets", timeout=30)
    wait_for(lambda: (r := readyz(h1))[0] == 503 and "out of subnets" in r[1], 30, "/readyz: out of subnets",
             detail=lambda: readyz(h1))
    wait_lease_retries(d1)  # it stays so: no lease, not ready, and said once
    assert readyz(h1)[0] == 503
    assert said(d1, "out of subnets") == 1
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
        d.wait_log(r"failed to write subnet file", timeout=30)
        code, body = readyz(h1)
        assert code == 503 and "subnet file" in body and str(sf) in body, (code, body)
        with pytest.raises(TimeoutError):
            srv.recv(100)  # no READY=1
        assert "flannel is ready" not in d.log_text()
        blocker.unlink()  # the operator fixes it: the daemon retries by itself
        wait_for(lambda: sf.exists(), 30, "subnet.env written", interval=0.1)
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
    # -v 1 and a config re-check every 0.5 s: the daemon's loop says it runs while nothing else happens
    d = start_daemon(h1, "--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s", "-v", "1",
                     env={"PYFLANNELD_CONFIG_RECHECK": "0.5"})
    sn = subnet_of(d.wait_subnet_env(30))
    key = key_of(sn)
    value = etcd.get(key)
    etcd.put(key, value)  # no --lease: upstream's documented reservation
    d.wait_log(r"reservation", timeout=30)
    renewed = d.log_text().count("lease renewed")
    # longer than the TTL (twelve re-checks: 6 s of the daemon's own time), where a renewal would
    # have given the key a lease again
    wait_config_rechecks(d, 12)
    assert v3_lease_id(etcd, key) == 0, "the reservation was undone"
    assert d.log_text().count("lease renewed") == renewed
    # the operator removes the reservation (gives the key a TTL): renewals resume
    lease = etcd.etcdctl("lease", "grant", "30").split()[1]
    etcd.etcdctl("put", key, value, "--lease", lease)
    wait_for(lambda: d.log_text().count("lease renewed") >= renewed + 2, 30, "renewals resume", interval=0.2)
    assert v3_lease_id(etcd, key) not in (0, int(lease, 16))
    assert subnet_of(d.subnet_env()) == sn and d.alive


# -- case 8: two hosts with the same PublicIP ----------------------------------------------------
def test_two_hosts_with_the_same_public_ip_warn_and_do_not_flip_flop(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    same = ("--public-ip", "192.168.100.50", "--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s")
    d1 = start_daemon(h1, *same)
    sn1 = subnet_of(d1.wait_subnet_env(30))
    d2 = start_daemon(h2, *same)
    d2.wait_subnet_env(30)
    # one of them notices the other and names both identities; then both settle on their own subnet
    wait_for(lambda: "same PublicIP" in d1.log_text() + d2.log_text(), 30, "a warning", interval=0.2)

    def settled() -> list | None:
        sns = [subnet_of(e) if (e := d.subnet_env()) else None for d in (d1, d2)]
        return sns if None not in sns and sns[0] != sns[1] and all(etcd.get(key_of(sn)) for sn in sns) else None

    envs = wait_for(settled, 30, "each host on its own subnet, both leases in etcd")
    lost = [d.log_text().count("own lease lost") for d in (d1, d2)]
    # several renewals on each (every 2 s): nothing moves any more
    renewed = [d.log_text().count("lease renewed") for d in (d1, d2)]
    wait_for(lambda: all(d.log_text().count("lease renewed") >= n + 3 for d, n in zip((d1, d2), renewed, strict=True)),
             60, "three renewals on each host", interval=0.2)
    assert [subnet_of(d.subnet_env()) for d in (d1, d2)] == envs
    assert envs[0] != envs[1], envs
    assert [d.log_text().count("own lease lost") for d in (d1, d2)] == lost
    macs = {json.loads(etcd.get(key_of(sn)))["BackendData"]["VtepMAC"] for sn in envs}
    assert len(macs) == 2
    line = next(ln for ln in (d1.log_text() + d2.log_text()).splitlines() if "same PublicIP" in ln)
    assert all(m in line for m in macs), line
    assert sn1 in envs


def vtep_mac_of(h) -> str:
    return h.ip_json("link", "show", "flannel.1")[0]["address"]


def test_two_hosts_with_the_same_public_ip_and_a_reservation_do_not_share_it(lab, etcd):
    """The key of one is an operator's reservation (no TTL): the second host reuses it (same
    PublicIP), the first puts its value back once, the second again: a live host, not an operator.
    One warning naming both VTEPs, then each host on its own subnet for good — never both on one."""
    etcd.put(f"{PREFIX}/config", VXLAN)
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    same = ("--public-ip", "192.168.100.50", "--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s")
    d1 = start_daemon(h1, *same)
    key1 = key_of(subnet_of(d1.wait_subnet_env(30)))
    etcd.put(key1, etcd.get(key1))  # upstream's documented reservation
    d1.wait_log(r"now a reservation", timeout=30)
    d2 = start_daemon(h2, *same)
    d2.wait_subnet_env(30)
    macs = {vtep_mac_of(h1), vtep_mac_of(h2)}

    def settled() -> list | None:
        sns = [subnet_of(e) if (e := d.subnet_env()) else None for d in (d1, d2)]
        if None in sns or sns[0] == sns[1]:
            return None
        vals = [etcd.get(key_of(sn)) for sn in sns]
        mine = [vtep_mac_of(h) for h in (h1, h2)]
        ok = all(v and json.loads(v)["BackendData"]["VtepMAC"] == m for v, m in zip(vals, mine, strict=True))
        return sns if ok else None

    envs = wait_for(settled, 60, "each host on its own subnet, each key holding its host's VTEP",
                    detail=lambda: ([d.subnet_env() for d in (d1, d2)], etcd.get_prefix(f"{PREFIX}/subnets/")))
    line = next(ln for ln in (d1.log_text() + d2.log_text()).splitlines() if "same PublicIP" in ln)
    assert all(m in line for m in macs), line
    # the reservation stays one (held by one of them), the other host has a lease with a TTL
    assert sorted(v3_lease_id(etcd, key_of(sn)) == 0 for sn in envs) == [False, True]
    renewed = [d.log_text().count("lease renewed") for d in (d1, d2)]
    wait_for(lambda: sum(d.log_text().count("lease renewed") for d in (d1, d2)) >= sum(renewed) + 3,
             60, "three renewals", interval=0.2)
    assert settled() == envs
    assert said(d1, "same PublicIP") + said(d2, "same PublicIP") == 1
    no_traceback(d1)
    no_traceback(d2)


def test_own_key_reserved_with_another_vtep_is_put_back_once_and_stays_reserved(lab, etcd):
    """An operator reserves the host's subnet with a made-up or stale VtepMAC: the host keeps its
    subnet and the reservation, its own VTEP goes back in (else peers would program a wrong MAC),
    with one warning naming both."""
    etcd.put(f"{PREFIX}/config", VXLAN)
    h1 = lab.add_host("h1")
    d1 = start_daemon(h1, "--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s", "-v", "1",
                      env={"PYFLANNELD_CONFIG_RECHECK": "0.5"})
    sn = subnet_of(d1.wait_subnet_env(30))
    key, mac = key_of(sn), vtep_mac_of(h1)
    etcd.put(key, vxlan_value(h1.address, "02:11:11:11:11:11"))  # no TTL
    wait_for(lambda: json.loads(etcd.get(key))["BackendData"]["VtepMAC"] == mac, 30, "the host's VTEP back",
             interval=0.2)
    wait_config_rechecks(d1, 12)  # 6 s: longer than the TTL
    assert v3_lease_id(etcd, key) == 0 and json.loads(etcd.get(key))["BackendData"]["VtepMAC"] == mac
    assert subnet_of(d1.subnet_env()) == sn and "own lease lost" not in d1.log_text()
    lines = [ln for ln in d1.log_text().splitlines() if "02:11:11:11:11:11" in ln]
    assert len(lines) == 1 and mac in lines[0], lines
    no_traceback(d1)


# -- case 9: Network changed, then restart -------------------------------------------------------
def test_network_changed_then_restart_removes_the_old_networks_state(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), _ = vxlan_cluster(lab, etcd, ["h1", "h2"])
    old2 = str(subnet_of(d2.subnet_env()))
    assert flannel_routes(h1) == {old2}
    assert d1.stop() == 0 and d2.stop() == 0
    etcd.put(f"{PREFIX}/config", VXLAN.replace("10.5.0.0/16", "10.6.0.0/16"))
    d1.restart()
    wait_for(lambda: (e := d1.subnet_env()) and e["FLANNEL_NETWORK"] == "10.6.0.0/16",
             30, "new Network", interval=0.1)
    new1 = subnet_of(d1.subnet_env())
    addrs = lambda: {a["local"] + "/" + str(a["prefixlen"]) for a in h1.ip_json("addr", "show", "flannel.1")[0]["addr_info"]  # noqa: E731
                     if a["family"] == "inet"}
    wait_for(lambda: addrs() == {f"{new1.network_address}/32"},
             30, "only the new address on flannel.1", interval=0.1)
    # the previous Network's peer routes go (docker0 keeps its old subnet until docker restarts)
    wait_for(lambda: not any(r.startswith("10.5.") for r in flannel_routes(h1)),
             30, "no route of the old Network on flannel.1", interval=0.2)
    wait_for(lambda: kernel_view(h1) == ({}, set(), set()), 30, "no ARP/FDB entry of the old peers",
             detail=lambda: kernel_view(h1))


# -- case 10: --ip-blackhole-route after a subnet change -----------------------------------------
def test_blackhole_route_follows_a_subnet_change(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}')
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--ip-blackhole-route", "--iptables-resync", "1")
    old = subnet_of(d.wait_subnet_env())
    wait_for(lambda: f"blackhole {old}" in h1.ip("route", "show"), 30, "blackhole route", interval=0.1)
    take_over(etcd, str(old), json.dumps({"PublicIP": OTHER, "PublicIPv6": None}))
    new = wait_for(lambda: (e := d.subnet_env()) and subnet_of(e) != old and subnet_of(e),
                   30, "moved", interval=0.1)
    wait_for(lambda: f"blackhole {new}" in h1.ip("route", "show"), 30, "new blackhole route", interval=0.1)
    wait_for(lambda: f"blackhole {old}" not in h1.ip("route", "show"),
             30, "old blackhole route gone", interval=0.1)
    assert isinstance(new, IPv4Network)
