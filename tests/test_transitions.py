"""Transitions issue 9 did not try, in orders and overlaps, each compared with a fresh start on the
same etcd data (tests/freshstart.py): etcd data loss and rollback, address change during a
partition, lease lost while the NIC is down, MTU and MAC changes, a fast-flapping NIC, ..."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from freshstart import assert_like_fresh_start, diff, settle, snapshot
from helpers import key_of, subnet_of, wait_for
from test_faults import HZ, PREFIX, VXLAN, peers_of, vxlan_cluster

pytestmark = pytest.mark.lab


def wipe_etcd(etcd) -> None:
    """etcd loses its data (a new member from scratch, a wiped disk): revisions start again at 1."""
    etcd.stop()
    shutil.rmtree(etcd.data_dir)
    etcd.start()


def test_etcd_data_loss_leases_come_back_at_once(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"])
    sn1, sn2 = str(subnet_of(d1.subnet_env())), str(subnet_of(d2.subnet_env()))
    wait_for(lambda: peers_of(h1) == {sn2} and peers_of(h2) == {sn1}, 15, 0.2, "both see each other")
    for i in range(30):  # the revision grows well beyond what the new etcd will reach soon
        etcd.put(f"{PREFIX}/churn", str(i))
    wipe_etcd(etcd)
    etcd.put(f"{PREFIX}/config", VXLAN)
    # a fresh start would write its lease again (same subnet, from subnet.env): so must they
    wait_for(lambda: etcd.get(key_of(sn1)) and etcd.get(key_of(sn2)), 30, 0.2, "both leases back in etcd")
    wait_for(lambda: peers_of(h1) == {sn2} and peers_of(h2) == {sn1}, 15, 0.2, "both see each other again")
    assert p1.wait_ping(p2.address, timeout=10)
    assert_like_fresh_start(h1, d1, etcd)


def restore_snapshot(etcd, snap) -> None:
    """etcd restored from a snapshot taken earlier (what an operator does after a disaster)."""
    etcd.stop()
    shutil.rmtree(etcd.data_dir)
    etcd.lab.switch.run("env", "ETCDCTL_API=3", "etcdctl", "snapshot", "restore", str(snap), "--name", etcd.name,
                        "--data-dir", str(etcd.data_dir), "--initial-cluster", f"{etcd.name}={etcd.peer_url}",
                        "--initial-cluster-token", etcd.cluster_token, "--initial-advertise-peer-urls",
                        etcd.peer_url)
    etcd.start()


def test_etcd_restored_from_an_old_snapshot(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1,), (d1,), _ = vxlan_cluster(lab, etcd, ["h1"])
    sn1 = str(subnet_of(d1.subnet_env()))
    snap = lab.tmp / "etcd.snapshot"
    etcd.etcdctl("snapshot", "save", str(snap))
    h2 = lab.add_host("h2")
    from lab.cluster import start_daemon
    d2 = start_daemon(h2, "--healthz-port", str(HZ), "--healthz-ip", "127.0.0.1")
    sn2 = str(subnet_of(d2.wait_subnet_env(30)))
    wait_for(lambda: peers_of(h1) == {sn2}, 15, 0.2, "h1 sees h2")
    for i in range(30):
        etcd.put(f"{PREFIX}/churn", str(i))
    restore_snapshot(etcd, snap)  # h2's lease is not in the snapshot
    wait_for(lambda: etcd.get(key_of(sn2)), 30, 0.2, "h2's lease back in etcd")
    wait_for(lambda: peers_of(h1) == {sn2} and peers_of(h2) == {sn1}, 15, 0.2, "both see each other again")
    assert_like_fresh_start(h2, d2, etcd)
    assert_like_fresh_start(h1, d1, etcd)


@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "udp"])
def test_nic_mtu_change(lab, etcd, backend):
    etcd.put(f"{PREFIX}/config", json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": backend}}))
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0")
    dev = "flannel0" if backend == "udp" else "flannel.1"
    settle(h1, d1, etcd, dev=dev)
    h1.ip("link", "set", "eth0", "mtu", "1400")
    overhead = {"vxlan": 50, "udp": 28, "host-gw": 0}[backend]
    wait_for(lambda: (d1.subnet_env() or {}).get("FLANNEL_MTU") == str(1400 - overhead), 20, 0.2, "MTU follows")
    assert_like_fresh_start(h1, d1, etcd, dev=dev)
    assert p1.wait_ping(p2.address, timeout=15)


def test_vxlan_mac_changed_by_hand(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"])
    before = settle(h1, d1, etcd)
    h1.ip("link", "set", "flannel.1", "address", "02:11:22:33:44:55")
    wait_for(lambda: snapshot(h1, d1, etcd)["link"] == before["link"], 15, 0.2, "MAC put back")
    assert_like_fresh_start(h1, d1, etcd)
    assert p2.wait_ping(p1.address, timeout=10)


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
@pytest.mark.parametrize("down_s", [0.03, 1.0])
def test_nic_flapping(lab, etcd, backend, down_s):
    etcd.put(f"{PREFIX}/config", json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": backend}}))
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0")
    before = settle(h1, d1, etcd)
    n = 30 if down_s < 0.1 else 2
    h1.sh(f"for i in $(seq {n}); do ip link set eth0 down; sleep {down_s}; ip link set eth0 up; sleep 0.03; done")
    h1.ip("route", "replace", "default", "via", h1.gateway)
    # the host's own routing is back at once: so must flannel's entries be (not at the next timer)
    try:
        wait_for(lambda: snapshot(h1, d1, etcd) == before, 5, 0.2, "state as before the flapping")
    except AssertionError:
        raise AssertionError(f"5 s after the flapping: {diff(before, snapshot(h1, d1, etcd))}") from None
    assert_like_fresh_start(h1, d1, etcd)
    assert p1.wait_ping(p2.address, timeout=10)


def readd_eth0(h, address: str | None = None) -> None:
    """eth0 back after it was deleted (a driver reload): new ifindex, same name and address."""
    h.lab.switch.ip("link", "add", f"v{h.name}", "type", "veth", "peer", "name", "eth0", "netns", h.ns)
    h.lab.switch.ip("link", "set", f"v{h.name}", "master", "br0", "mtu", str(h.mtu), "up")
    h.ip("link", "set", "eth0", "mtu", str(h.mtu), "up")
    h.ip("addr", "add", f"{address or h.address}/{h.prefixlen}", "dev", "eth0")
    h.ip("route", "add", "default", "via", h.gateway)


def test_lease_lost_and_taken_while_the_nic_is_gone(lab, etcd):
    from test_faults import vxlan_value
    from test_lifecycle import take_over
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0")
    old = str(subnet_of(d1.subnet_env()))
    settle(h1, d1, etcd)
    h1.ip("link", "del", "eth0")
    take_over(etcd, old, vxlan_value("192.168.100.77", "02:77:77:77:77:77"))
    time.sleep(2)
    readd_eth0(h1)
    new = wait_for(lambda: (e := d1.subnet_env()) and str(subnet_of(e)) != old and str(subnet_of(e)), 60, 0.2,
                   "h1 on a new subnet")
    assert json.loads(etcd.get(key_of(new)))["PublicIP"] == h1.address
    assert_like_fresh_start(h1, d1, etcd)


def test_address_change_while_partitioned_and_lease_expired(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    short = ("--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s")
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0", *short)
    sn1 = str(subnet_of(d1.subnet_env()))
    settle(h1, d1, etcd)
    block = ["OUTPUT", "-d", etcd.ip, "-p", "tcp", "--dport", str(etcd.client_port), "-j", "DROP"]
    h1.run("iptables", "-w", "-A", *block)
    new_ip = "192.168.100.51"
    try:
        wait_for(lambda: etcd.get(key_of(sn1)) is None, 20, 0.2, "h1's lease to expire")
        h1.ip("addr", "del", f"{h1.address}/{h1.prefixlen}", "dev", "eth0")
        h1.ip("addr", "add", f"{new_ip}/{h1.prefixlen}", "dev", "eth0")
        h1.ip("route", "add", "default", "via", h1.gateway)
        time.sleep(3)
    finally:
        h1.run("iptables", "-w", "-D", *block)
    wait_for(lambda: json.loads(etcd.get(key_of(sn1)) or "{}").get("PublicIP") == new_ip, 60, 0.2,
             "h1's lease back with the new address, same subnet")
    h1.address = new_ip
    assert_like_fresh_start(h1, d1, etcd)
    assert p2.wait_ping(p1.address, timeout=10)
    keys = [k for k, v in etcd.get_prefix(f"{PREFIX}/subnets/").items() if "192.168.100.1\"" in v]
    assert keys == [], keys


def test_etcd_restored_from_a_snapshot_older_than_an_address_change(lab, etcd):
    """The restored own key holds our previous PublicIP (and our VtepMAC): it is ours, not another
    host's. Moving to a new subnet would leave a lease with our VtepMAC behind, and every peer
    rejects the newer of two leases with one VtepMAC: this host would be cut off until it expires."""
    etcd.put(f"{PREFIX}/config", VXLAN)
    (h1, h2), (d1, d2), (p1, p2) = vxlan_cluster(lab, etcd, ["h1", "h2"], "--iface", "eth0")
    sn1 = str(subnet_of(d1.subnet_env()))
    settle(h1, d1, etcd)
    snap = lab.tmp / "etcd.snapshot"
    etcd.etcdctl("snapshot", "save", str(snap))
    new_ip = "192.168.100.51"
    h1.ip("addr", "del", f"{h1.address}/{h1.prefixlen}", "dev", "eth0")
    h1.ip("addr", "add", f"{new_ip}/{h1.prefixlen}", "dev", "eth0")
    h1.ip("route", "add", "default", "via", h1.gateway)
    h1.address = new_ip
    wait_for(lambda: json.loads(etcd.get(key_of(sn1)))["PublicIP"] == new_ip, 60, 0.2, "lease PublicIP follows")
    restore_snapshot(etcd, snap)
    wait_for(lambda: json.loads(etcd.get(key_of(sn1)) or "{}").get("PublicIP") == new_ip, 30, 0.2,
             "h1's lease with its current address again")
    assert str(subnet_of(d1.subnet_env())) == sn1
    assert len(etcd.get_prefix(f"{PREFIX}/subnets/")) == 2
    wait_for(lambda: peers_of(h2) == {sn1}, 15, 0.2, "h2 programs h1")
    assert p2.wait_ping(p1.address, timeout=10)
    assert_like_fresh_start(h1, d1, etcd)
