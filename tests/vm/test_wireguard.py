"""wireguard in a mixed cluster, under Debian's kernel (run inside the lab VM by tests/test_vm.py).

h1 and h2 run pyflanneld, h3 the real upstream v0.20.2 binary; each host has its own
WIREGUARD_KEY_FILE. What is checked is what an operator checks: the lease JSON in etcd (same shape
and bytes as upstream's), the key file, ``wg show``, ``ip link``/``ip route``, pod pings across
every pair, and a capture on the underlay (WireGuard UDP to 51820, no pod ICMP in clear). Then:
a restart keeps the key and the peers reconnect; a device deleted and a peer removed by hand come
back; a host that leaves is removed from the others' peers.
"""

from __future__ import annotations

import os
import stat

import pytest
from e2e_helpers import NETWORK, PREFIX, key_of, lines, wait_for
from vmcluster import (
    CONVERGE_S,
    READY_S,
    Capture,
    Member,
    dump_logs,
    lease,
    lease_raw,
    link_summary,
    mlab,  # noqa: F401 (fixture)
    normalise,
    pings,
    pods_unreachable,
    routes_on,
    start_cluster,
)

DEV = "flannel-wg"
PORT = 51820


@pytest.fixture(scope="module")
def cluster(mlab):  # noqa: F811
    members = start_cluster(mlab, {"Type": "wireguard"}, [("h1", None, False), ("h2", None, False), ("h3", None, True)])
    try:
        wait_for(lambda: all(len(wg_peers(m)) == 2 for m in members), CONVERGE_S, "every host has 2 peers")
    except AssertionError:
        print(dump_logs(mlab))  # the tests' own assertions show what differs
    return members


@pytest.fixture(autouse=True)
def _logs_on_failure(request, mlab):  # noqa: F811
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(dump_logs(mlab))


def wg_dump(m: Member) -> list[list[str]]:
    return [ln.split("\t") for ln in m.host.run("wg", "show", DEV, "dump").stdout.splitlines()]


def wg_peers(m: Member) -> dict[str, tuple[str, str, str]]:
    """public key → (endpoint, allowed ips, preshared key) from ``wg show flannel-wg dump``."""
    cp = m.host.run("wg", "show", DEV, "dump", check=False)
    if cp.returncode != 0:
        return {}
    return {f[0]: (f[2], f[3], f[1]) for f in (ln.split("\t") for ln in cp.stdout.splitlines()[1:])}


def public_key(m: Member) -> str:
    return m.host.run("wg", "pubkey", input=m.key_file.read_text().strip() + "\n").stdout.strip()


def others(cluster, m):
    return [o for o in cluster if o is not m]


def expected_peers(lab, cluster, m) -> dict[str, tuple[str, str, str]]:
    return {lease(lab, o)["BackendData"]["PublicKey"]: (f"{o.node.ip}:{PORT}", str(o.node.subnet), "(none)")
            for o in others(cluster, m)}


def test_leases_keys_and_devices_as_upstream(mlab, cluster):  # noqa: F811
    up = cluster[2]
    for m in cluster:
        got = lease(mlab, m)
        assert got == {"PublicIP": m.node.ip, "PublicIPv6": None, "BackendType": "wireguard",
                       "BackendData": {"PublicKey": public_key(m)}}, m.name
        # byte for byte the same JSON as upstream's lease, once the per-host values are set aside
        assert normalise(lease_raw(mlab, m), {m.node.ip: "IP", public_key(m): "KEY"}) == \
            normalise(lease_raw(mlab, up), {up.node.ip: "IP", public_key(up): "KEY"})
        assert m.node.env == {"FLANNEL_NETWORK": NETWORK, "FLANNEL_SUBNET": f"{m.node.subnet.network_address + 1}/24",
                              "FLANNEL_MTU": "1420", "FLANNEL_IPMASQ": "false"}, m.name
        header = wg_dump(m)[0]
        assert header[1:3] == [public_key(m), str(PORT)], (m.name, header)
        assert routes_on(m.host, DEV) == {f"{NETWORK} scope link"}, m.name
        assert [f"{a['local']}/{a['prefixlen']}" for i in m.host.ip_json("-4", "addr", "show", DEV)
                for a in i["addr_info"]] == [f"{m.node.subnet.network_address}/32"], m.name
        assert link_summary(m.host, DEV) == link_summary(up.host, DEV), m.name
    for m in cluster[:2]:  # pyflanneld's key file: base64 of 32 bytes, no newline, 0600
        text = m.key_file.read_text()
        assert len(text) == 44 and text.endswith("=") and "\n" not in text
        assert stat.S_IMODE(os.stat(m.key_file).st_mode) == 0o600
        assert public_key(m) != public_key(cluster[1 - cluster.index(m)])


def test_peers_and_pod_traffic_encrypted(mlab, cluster):  # noqa: F811
    for m in cluster:
        assert wg_peers(m) == expected_peers(mlab, cluster, m), m.name
    assert pods_unreachable(cluster) == []
    h1, h2, h3 = cluster
    def to_peers(packets: list[str]) -> list[str]:
        return [p for p in packets if f" > {h2.node.ip}.{PORT}: UDP" in p or f" > {h3.node.ip}.{PORT}: UDP" in p]

    cap = Capture(mlab.switch, f"v{h1.name}")  # the switch port: only what is on the wire
    try:
        for dst in (h2, h3):
            assert pings(h1.node.pod, dst.node.pod.address, count=3), dst.name
    finally:
        packets = cap.wait(lambda pk: len(to_peers(pk)) >= 6, "6 WireGuard datagrams to the peers")
    assert len(to_peers(packets)) >= 6, "\n".join(packets)
    assert not [p for p in packets if ": ICMP echo" in p], "\n".join(packets)  # no pod ICMP in clear


def test_restart_keeps_key_and_peers_reconnect(mlab, cluster):  # noqa: F811
    h1 = cluster[0]
    key_before = public_key(h1)
    h1.node.daemon.stop(timeout=30)
    assert not h1.host.link_exists(DEV)  # upstream removes its device on shutdown; the key file stays
    assert h1.key_file.exists()
    h1.node.daemon.restart()
    wait_for(lambda: wg_peers(h1) == expected_peers(mlab, cluster, h1), READY_S, "h1's peers after restart")
    assert public_key(h1) == key_before
    assert lease(mlab, h1)["BackendData"]["PublicKey"] == key_before
    assert pods_unreachable(cluster) == []


def test_deleted_device_and_removed_peer_come_back(mlab, cluster):  # noqa: F811
    h1, h2, h3 = cluster
    h2.host.ip("link", "del", DEV)
    wait_for(lambda: wg_peers(h2) == expected_peers(mlab, cluster, h2) and
             routes_on(h2.host, DEV) == {f"{NETWORK} scope link"}, CONVERGE_S, "h2's device back")
    assert public_key(h2) == lease(mlab, h2)["BackendData"]["PublicKey"] == wg_dump(h2)[0][1]
    assert pods_unreachable(cluster) == []
    k3 = lease(mlab, h3)["BackendData"]["PublicKey"]
    h1.host.run("wg", "set", DEV, "peer", k3, "remove")
    assert k3 not in wg_peers(h1)
    wait_for(lambda: k3 in wg_peers(h1), CONVERGE_S, "h1's peer h3 back (10 s reconcile)")
    assert pings(h1.node.pod, h3.node.pod.address)
    assert "peer set" in h1.node.daemon.log_text() or "kernel state reconciled" in h1.node.daemon.log_text()


def test_host_leaving_is_removed_from_peers(mlab, cluster):  # noqa: F811
    h1, h2, h3 = cluster
    k3 = lease(mlab, h3)["BackendData"]["PublicKey"]
    mlab.etcd.delete(key_of(h3.node.subnet))  # upstream exits on its lease's deletion
    wait_for(lambda: k3 not in wg_peers(h1) and k3 not in wg_peers(h2), CONVERGE_S, "h3 gone from peers")
    assert set(wg_peers(h1)) == {lease(mlab, h2)["BackendData"]["PublicKey"]}
    assert pings(h1.node.pod, h2.node.pod.address)
    assert lines(mlab.etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets")) == \
        {key_of(h1.node.subnet), key_of(h2.node.subnet)}
