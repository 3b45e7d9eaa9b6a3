"""Fault matrix: real etcd, real namespaces, real daemons. Each test breaks something an operator
will meet (etcd down, a member lost, compaction under churn, a partition longer than the lease,
garbage in etcd, a start storm, bad flags) and asserts that what should keep working keeps working
and that no lease or kernel entry is lost."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from ipaddress import IPv4Network
from pathlib import Path

import helpers
import pytest
from helpers import key_of, said, subnet_of, wait_config_rechecks, wait_for

from lab.cluster import pyflanneld_argv, start_daemon
from lab.etcd import EtcdCluster

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
VXLAN = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
ALLOC = '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}'
HZ = 8480  # --healthz-port; every host is its own namespace, so one port serves all


# -- helpers ----------------------------------------------------------------------------------------
def http_get(host, path, port=HZ):
    return helpers.http_get(host, port, path)


def peers_of(host, port=HZ) -> set[str]:
    code, body = http_get(host, "/peers", port)
    assert code == 200, (code, body)
    return {p["subnet"] for p in json.loads(body)}


def etcd_subnets(etcd) -> dict[str, dict]:
    """subnet ("10.5.3.0/24") → lease JSON, for every well-formed lease key in etcd."""
    out = {}
    for k, v in etcd.get_prefix(f"{PREFIX}/subnets/").items():
        m = re.fullmatch(r".*/(\d+\.\d+\.\d+\.\d+)-(\d+)", k)
        if m:
            out[f"{m[1]}/{m[2]}"] = json.loads(v)
    return out


def flannel_routes(host, dev="flannel.1") -> set[str]:
    """Destinations of the routes on the vxlan device (the peers this host has programmed)."""
    return {ln.split()[0] for ln in host.ip("route", "show", "dev", dev).splitlines()
            if ln.strip() and "/" in ln.split()[0]}


def vtep_entries(host, dev="flannel.1") -> tuple[int, int, int]:
    """(routes, permanent ARP entries, FDB entries with a dst) on the vxlan device."""
    routes = len(flannel_routes(host, dev))
    neigh = sum(1 for ln in host.ip("neigh", "show", "dev", dev).splitlines() if "PERMANENT" in ln)
    fdb = sum(1 for ln in host.bridge("fdb", "show", "dev", dev).splitlines() if " dst " in ln)
    return routes, neigh, fdb


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks (USER_HZ)


def no_traceback(d) -> None:
    assert "Traceback" not in d.log_text(), d.log_text()[-3000:]


def vxlan_value(public_ip: str, mac: str | None = None) -> str:
    mac = mac or "02:%02x:%02x:%02x:%02x:%02x" % tuple(random.randrange(256) for _ in range(5))
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": mac}}, separators=(",", ":"))


class Pinger:
    """`ping -c count` from a pod, in the background; result() waits for it and returns
    (transmitted, received). A fixed count (not a signal) so that no reply can be cut off."""

    def __init__(self, pod, dst: str, seconds: float, interval: float = 0.1) -> None:
        self.pod, self.dst = pod, dst
        self.proc = pod.popen("ping", "-n", "-c", str(int(seconds / interval)), "-i", str(interval),
                              "-W", "1", dst, name=f"ping-{pod.name}-{dst}")

    def replies(self) -> int:
        return len(re.findall(r"bytes from .*icmp_seq=", self.proc.log_text()))

    def result(self, timeout: float = 60) -> tuple[int, int]:
        self.proc.wait(timeout)
        text = self.proc.log_text()
        m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        assert m, text[-2000:]
        return int(m[1]), int(m[2])


def vxlan_cluster(lab, etcd, names, *args):
    """Daemons (vxlan) on new hosts, a docker0 bridge from each subnet.env and one pod per host."""
    hosts = [lab.add_host(n) for n in names]
    daemons = [start_daemon(h, "--healthz-port", str(HZ), "--healthz-ip", "127.0.0.1", *args) for h in hosts]
    pods = []
    for h, d in zip(hosts, daemons, strict=True):
        env = d.wait_subnet_env(timeout=30)
        h.make_bridge("docker0", env["FLANNEL_SUBNET"], env["FLANNEL_MTU"])
        pods.append(lab.add_pod(h, "p1"))
    return hosts, daemons, pods


# -- etcd down for 60 s -----------------------------------------------------------------------------
OUTAGE = 60.0


def test_etcd_down_60s_data_plane_keeps_working_and_recovers(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    # TTL 20 s: renewals (retried every 2 s) fail all through the outage; a restarted etcd extends
    # the leases it had, so nothing may be lost.
    ttl = ("--subnet-lease-ttl", "20s", "--subnet-lease-renew-margin", "10s")
    hosts, daemons, pods = vxlan_cluster(lab, etcd, ["h1", "h2", "h3"], *ttl)
    for p in pods:
        for q in pods:
            if p is not q:
                assert p.wait_ping(q.address, timeout=30), f"{p.name}@{p.host.name} -> {q.address}"
    leases_before = etcd_subnets(etcd)
    assert len(leases_before) == 3
    routes_before = {h.name: flannel_routes(h) for h in hosts}
    assert all(len(r) == 2 for r in routes_before.values()), routes_before

    # pings from before the outage to after it, 10 per second, on three pod pairs
    pingers = [Pinger(pods[i], pods[(i + 1) % 3].address, OUTAGE + 5) for i in range(3)]
    wait_for(lambda: all(p.replies() >= 5 for p in pingers), 30, "pings running before the outage")
    cpu0 = [cpu_seconds(d.pid) for d in daemons]
    t_stop = time.monotonic()
    etcd.stop()
    # /readyz says why (the watch stream breaks at once)
    for h in hosts:
        code, body = wait_for(lambda h=h: (lambda r: r if r[0] == 503 else None)(http_get(h, "/readyz")),
                              30, f"{h.name} /readyz 503", interval=0.2)
        assert "datastore unreachable" in body, body
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - t_stop)))  # the outage itself: etcd down for 60 s
    # still down: kernel state untouched, daemons alive, no CPU spin (< 10 % of a core on average)
    assert {h.name: flannel_routes(h) for h in hosts} == routes_before
    assert all(d.alive for d in daemons)
    used = [cpu_seconds(d.pid) - c for d, c in zip(daemons, cpu0, strict=True)]
    assert max(used) < 0.1 * OUTAGE, f"CPU seconds used during the outage: {used}"
    for h in hosts:
        code, body = http_get(h, "/readyz")
        assert code == 503 and "datastore unreachable" in body, (code, body)

    etcd.start()
    for h in hosts:
        wait_for(lambda h=h: http_get(h, "/readyz")[0] == 200, 60, f"{h.name} ready again", interval=0.1)
    for p in pingers:
        sent, recv = p.result()
        assert sent == (OUTAGE + 5) * 10, (sent, recv)
        assert recv == sent, f"{p.pod.host.name} -> {p.dst}: {sent - recv} of {sent} pings lost"

    # nothing lost: same leases (same owners), same routes, and the leases renew again
    after = etcd_subnets(etcd)
    assert {k: v["PublicIP"] for k, v in after.items()} == {k: v["PublicIP"] for k, v in leases_before.items()}
    assert {h.name: flannel_routes(h) for h in hosts} == routes_before
    assert not any("own lease lost" in d.log_text() for d in daemons)  # kept, not lost and re-taken
    n_renewed = [d.log_text().count("lease renewed") for d in daemons]
    wait_for(lambda: all(d.log_text().count("lease renewed") > n for d, n in zip(daemons, n_renewed, strict=True)),
             30, "a renewal on every daemon after etcd came back", interval=0.2)

    # a new host joins and is reachable from every pod (how fast: `python -m bench join`)
    h4 = lab.add_host("h4")
    d4 = start_daemon(h4, *ttl)
    env4 = d4.wait_subnet_env(timeout=30)
    h4.make_bridge("docker0", env4["FLANNEL_SUBNET"], env4["FLANNEL_MTU"])
    p4 = lab.add_pod(h4, "p1")
    for p in pods:
        assert p.wait_ping(p4.address, timeout=30), f"{p.host.name}'s pod -> h4's pod"
    for d in [*daemons, d4]:
        assert d.alive
        no_traceback(d)


# -- a 3-member cluster loses the member a daemon talks to -----------------------------------------
def etcd_peer_ports(host, ports: set[int]) -> set[int]:
    """Ports of the etcd members this host has established TCP connections to."""
    out = host.run("ss", "-Htn", "state", "established").stdout
    found = set()
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) >= 4:
            port = int(parts[3].rsplit(":", 1)[1])
            if port in ports:
                found.add(port)
    return found


def test_cluster_member_killed_daemon_fails_over(lab):
    cluster = EtcdCluster(lab, 3).start()
    cluster[0].put(f"{PREFIX}/config", ALLOC)
    ports = {m.client_port: m for m in cluster.members}
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    short = ("--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s", "--healthz-port", str(HZ))
    d1 = start_daemon(h1, *short, etcd=cluster)
    own = subnet_of(d1.wait_subnet_env(timeout=30))
    talks_to = wait_for(lambda: etcd_peer_ports(h1, set(ports)), 30, what="h1's etcd connection")
    assert len(talks_to) == 1, talks_to
    victim = ports[talks_to.pop()]
    other = next(m for m in cluster.members if m is not victim)
    # the hard case: the member it talks to is also the leader
    leader = cluster.wait_leader()
    if leader is not victim:
        st = json.loads(victim.etcdctl("endpoint", "status", "-w", "json"))[0]
        leader.etcdctl("move-leader", format(int(st["Status"]["header"]["member_id"]), "x"))
        wait_for(lambda: cluster.leader() is victim, 30, what="leadership moved to the victim")
    victim.kill()
    cluster.wait_leader(timeout=10)

    # the watch continues on another member: a lease added after the kill is seen ...
    wait_for(lambda: http_get(h1, "/readyz")[0] == 200, 30, "h1 ready after the kill", interval=0.1)
    extra = "10.1.250.0/24"
    other.put(key_of(extra), '{"PublicIP":"192.168.100.250","PublicIPv6":null}')
    wait_for(lambda: extra in peers_of(h1), 30, "a lease put after the kill seen by h1", interval=0.1)
    # ... so is a second daemon that joins through the surviving members
    d2 = start_daemon(h2, *short, etcd=cluster)
    sn2 = str(subnet_of(d2.wait_subnet_env(timeout=30)))
    wait_for(lambda: sn2 in peers_of(h1), 30, "h2's lease seen by h1", interval=0.1)
    # ... and the own lease (TTL 4 s) keeps being renewed: it outlives several TTLs (six renewals,
    # due every 2 s, are three TTLs) and is in etcd whenever we look
    renewed = d1.log_text().count("lease renewed")

    def renewed_six_times() -> bool:
        assert other.get(key_of(own)) is not None, "h1's lease expired after the member was killed"
        return d1.log_text().count("lease renewed") >= renewed + 6

    wait_for(renewed_six_times, 60, "six renewals of h1's lease through the surviving members", interval=0.5)
    now = etcd_peer_ports(h1, set(ports))
    assert now and victim.client_port not in now, now
    assert d1.alive and d2.alive
    assert subnet_of(d1.subnet_env()) == own
    assert "etcd endpoint failover" in d1.log_text()
    no_traceback(d1)


# -- compaction + defragmentation under churn -------------------------------------------------------
def kernel_view(host, dev="flannel.1") -> tuple[dict[str, str], set[tuple[str, str]], set[str]]:
    """(ARP: ip → mac, FDB: {(mac, dst)}, route destinations) of the vxlan device."""
    arp = {}
    for ln in host.ip("neigh", "show", "dev", dev).splitlines():
        p = ln.split()
        if "PERMANENT" in p and "lladdr" in p:
            arp[p[0]] = p[p.index("lladdr") + 1]
    fdb = set()
    for ln in host.bridge("fdb", "show", "dev", dev).splitlines():
        p = ln.split()
        if "dst" in p:
            fdb.add((p[0], p[p.index("dst") + 1]))
    return arp, fdb, flannel_routes(host, dev)


def expected_view(leases: dict[str, dict], own: str) -> tuple[dict[str, str], set[tuple[str, str]], set[str]]:
    peers = {sn: v for sn, v in leases.items() if sn != own}
    arp = {sn.split("/")[0]: v["BackendData"]["VtepMAC"] for sn, v in peers.items()}
    fdb = {(v["BackendData"]["VtepMAC"], v["PublicIP"]) for v in peers.values()}
    return arp, fdb, set(peers)


def test_compaction_and_defrag_under_churn_lose_no_peer(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.99.0",'
             '"Backend":{"Type":"vxlan"}}')
    hosts = [lab.add_host(n) for n in ("h1", "h2", "h3")]
    daemons = [start_daemon(h, "--healthz-port", str(HZ)) for h in hosts]
    owns = [str(subnet_of(d.wait_subnet_env(timeout=30))) for d in daemons]

    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = {"compactions": 0, "socket_kills": 0}

    def writer(w: int) -> None:
        rng = random.Random(w)
        mine = [f"10.5.{150 + w * 20 + i}.0/24" for i in range(20)]
        try:
            for _ in range(80):
                sn = rng.choice(mine)
                if rng.random() < 0.35:
                    etcd.delete(key_of(sn))
                else:  # add, or update with a new VtepMAC (the kernel entries must follow)
                    etcd.put(key_of(sn), vxlan_value(f"192.168.100.{150 + w * 20 + mine.index(sn)}"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def compactor() -> None:
        try:
            while not stop.is_set():
                etcd.compact(etcd.revision())
                etcd.defrag()
                rounds["compactions"] += 1
                # break a daemon's watch now and then: it relists and re-watches from a revision
                # that the next compaction may already have removed
                h = hosts[rounds["compactions"] % len(hosts)]
                h.run("ss", "-K", "dst", etcd.ip, "dport", "=", str(etcd.client_port), check=False)
                rounds["socket_kills"] += 1
                time.sleep(0.1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    comp = threading.Thread(target=compactor)
    comp.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    comp.join()
    assert not errors, errors
    assert rounds["compactions"] >= 5, rounds

    leases = etcd_subnets(etcd)
    assert all(o in leases for o in owns)  # the daemons' own leases survived
    assert len(leases) > 3 + 10, "the churn should leave a good number of leases"
    for h, d, own in zip(hosts, daemons, owns, strict=True):
        want = set(leases) - {own}
        wait_for(lambda h=h, want=want: peers_of(h) == want, 30, f"{h.name} /peers == etcd", interval=0.2)
        wait_for(lambda h=h, own=own: kernel_view(h) == expected_view(leases, own),
                 30, f"{h.name} ARP/FDB/routes == etcd", interval=0.2)
        assert d.alive
        no_traceback(d)
    assert any("relisting" in d.log_text() or "reconnecting" in d.log_text() for d in daemons)


# -- a partition longer than the lease --------------------------------------------------------------
def test_lease_expires_during_partition_and_comes_back_after(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    short = ("--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s")
    hosts, daemons, pods = vxlan_cluster(lab, etcd, ["h1", "h2"], *short)
    (h1, h2), (d1, d2), (p1, p2) = hosts, daemons, pods
    sn1 = str(subnet_of(d1.subnet_env()))
    sn2 = str(subnet_of(d2.subnet_env()))
    assert p1.wait_ping(p2.address, timeout=30)
    assert flannel_routes(h2) == {sn1} and flannel_routes(h1) == {sn2}

    # cut h1 off etcd (only etcd: the vxlan underlay to h2 stays up)
    block = ["OUTPUT", "-d", etcd.ip, "-p", "tcp", "--dport", str(etcd.client_port), "-j", "DROP"]
    h1.run("iptables", "-w", "-A", *block)
    try:
        # the lease runs out in etcd; h2 sees it go and removes h1's entries
        wait_for(lambda: etcd.get(key_of(sn1)) is None, 30, "h1's lease to expire in etcd", interval=0.2)
        wait_for(lambda: sn1 not in peers_of(h2) and flannel_routes(h2) == set(), 30,
                 "h2 to drop h1's subnet", interval=0.1)
        # stay partitioned well past the expiry: h1 keeps trying to renew (and failing)
        failed = d1.log_text().count("error renewing lease")
        wait_for(lambda: d1.log_text().count("error renewing lease") >= failed + 2, 60,
                 "two more failed renewals on h1", interval=0.2)
        assert d1.alive
        code, body = http_get(h1, "/readyz")
        assert code == 503 and "datastore unreachable" in body, (code, body)
        assert flannel_routes(h1) == {sn2}  # h1 keeps what it knew
    finally:
        h1.run("iptables", "-w", "-D", *block)

    # healed: h1 notices the loss, takes the same subnet again (still free), h2 sees it again
    d1.wait_log(r"own lease lost", timeout=60)
    wait_for(lambda: etcd.get(key_of(sn1)) is not None, 30, "h1's lease back in etcd", interval=0.2)
    assert json.loads(etcd.get(key_of(sn1)))["PublicIP"] == h1.address
    assert str(subnet_of(d1.subnet_env())) == sn1
    wait_for(lambda: flannel_routes(h2) == {sn1}, 30, "h2 programs h1's subnet again", interval=0.1)
    wait_for(lambda: http_get(h1, "/readyz")[0] == 200, 30, "h1 ready again", interval=0.2)
    assert p2.wait_ping(p1.address, timeout=30) and p1.wait_ping(p2.address, timeout=30)
    # and it is renewed from then on (three renewals: longer than the 4 s TTL)
    renewed = d1.log_text().count("lease renewed")
    wait_for(lambda: d1.log_text().count("lease renewed") >= renewed + 3, 60, "h1's renewals after the heal",
             interval=0.2)
    assert etcd.get(key_of(sn1)) is not None and etcd.get(key_of(sn2)) is not None
    assert d1.alive and d2.alive
    assert "subnet changed" not in d1.log_text()
    no_traceback(d1)


# -- garbage in etcd at runtime ---------------------------------------------------------------------
def break_watch(host, etcd) -> None:
    """Kill the host's TCP connections to etcd: the daemon reconnects and lists everything again."""
    host.run("ss", "-K", "dst", etcd.ip, "dport", "=", str(etcd.client_port), check=False)


def test_bad_data_at_runtime_is_one_warning_each_and_nothing_else_breaks(lab, etcd):
    etcd.put(f"{PREFIX}/config", VXLAN)
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--healthz-port", str(HZ), "--subnet-lease-ttl", "4s", "--subnet-lease-renew-margin", "2s",
                     "-v", "1", env={"PYFLANNELD_CONFIG_RECHECK": "0.5"})
    own = str(subnet_of(d.wait_subnet_env(timeout=30)))
    good1 = "10.5.210.0/24"
    etcd.put(key_of(good1), vxlan_value("192.168.100.210"))
    wait_for(lambda: flannel_routes(h1) == {good1}, 30, what="a good lease programmed")

    etcd.put(key_of("10.5.200.0/24"), "this is not json")
    etcd.put(f"{PREFIX}/subnets/not-a-subnet", '{"PublicIP":"192.168.100.99","PublicIPv6":null}')
    etcd.put(key_of("10.5.201.0/24"), "[1, 2, 3]")
    etcd.put(key_of("10.5.202.0/24"), '{"PublicIP":"not an ip","BackendType":"vxlan"}')
    etcd.put(key_of("10.5.203.0/24"), '{"PublicIP":"192.168.100.203","PublicIPv6":null,"BackendType":"vxlan",'
             '"BackendData":{"VNI":1}}')  # vxlan lease without VtepMAC: rejected by the gate too
    etcd.put(f"{PREFIX}/config", "garbage{")
    d.wait_log(r"network config in etcd is now invalid", timeout=30)

    # everything else keeps working: a new lease and a removal are applied ...
    good2 = "10.5.211.0/24"
    etcd.put(key_of(good2), vxlan_value("192.168.100.211"))
    etcd.delete(key_of(good1))
    wait_for(lambda: flannel_routes(h1) == {good2} and peers_of(h1) == {good2}, 30,
             what="good2 programmed, good1 removed, the bad ones skipped")
    # ... also after relists (which see the bad entries again) and several config re-checks
    for _ in range(2):
        relists = d.log_text().count("peer leases listed")
        break_watch(h1, etcd)
        wait_for(lambda n=relists: d.log_text().count("peer leases listed") > n, 30, "a relist after the break")
    wait_config_rechecks(d, 2)
    code, body = http_get(h1, "/readyz")  # ready; the rejected entries are listed, not fatal
    assert code == 200 and body.startswith("flanneld is ready\n5 lease entries under "), body
    assert "  10.5.203.0-24: BackendData.VtepMAC: missing" in body.splitlines(), body
    wait_for(lambda: d.log_text().count("lease renewed") >= 3, 30, what="renewals go on")
    assert etcd.get(key_of(own)) is not None
    assert flannel_routes(h1) == {good2}

    text = d.log_text()
    warned = re.findall(r'ignoring bad lease entry[^"]*" .*key=\S*/subnets/(\S+)', text)
    assert sorted(warned) == ["10.5.200.0-24", "10.5.201.0-24", "10.5.202.0-24", "10.5.203.0-24",
                              "not-a-subnet"], warned
    assert text.count("network config in etcd is now invalid") == 1
    # the running config stays in force; once the key is valid again nothing more is said (after two
    # re-checks that read it: the first may have started before the put)
    etcd.put(f"{PREFIX}/config", VXLAN)
    wait_config_rechecks(d, 2)
    assert said(d, "network config") == sum(1 for ln in text.splitlines() if "network config" in ln
                                            and "level=debug" not in ln)
    assert d.alive
    no_traceback(d)


# -- a start storm ----------------------------------------------------------------------------------
def test_fifty_daemons_started_at_once(lab, etcd):
    # 64 subnets for 50 hosts: most picks collide with someone else's, races are the norm
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.0","SubnetMax":"10.1.64.0",'
             '"Backend":{"Type":"alloc"}}')
    n = 50
    hosts = [lab.add_host(f"h{i}") for i in range(1, n + 1)]
    t0 = time.monotonic()
    daemons = [start_daemon(h, "--healthz-port", str(HZ), "--healthz-ip", "127.0.0.1") for h in hosts]
    subnets = [subnet_of(d.wait_subnet_env(timeout=120)) for d in daemons]
    took = time.monotonic() - t0
    assert len(set(subnets)) == n
    for i, a in enumerate(subnets):
        for b in subnets[i + 1:]:
            assert not a.overlaps(b), (a, b)
    leases = etcd_subnets(etcd)
    assert {IPv4Network(k) for k in leases} == set(subnets)
    assert {v["PublicIP"] for v in leases.values()} == {h.address for h in hosts}
    for h, d in zip(hosts, daemons, strict=True):
        assert http_get(h, "/readyz") == (200, "flanneld is ready"), h.name
        assert d.alive, d.log_text()[-2000:]
        no_traceback(d)
    # every daemon sees the 49 others
    for h, sn in zip(hosts[:: n // 5], subnets[:: n // 5], strict=True):
        want = {str(s) for s in subnets} - {str(sn)}
        wait_for(lambda h=h, want=want: peers_of(h) == want, 30, f"{h.name} sees all others", interval=0.2)
    print(f"50 daemons ready in {took:.1f}s")


# -- bad command lines, through the real binary -----------------------------------------------------
def test_bad_command_lines_exit_with_one_line(lab, etcd):
    h1 = lab.add_host("h1")
    certdir = lab.tmp / "certs-dir"
    certdir.mkdir()
    base = pyflanneld_argv()
    sf = str(lab.tmp / "never.env")
    common = ["--etcd-endpoints", etcd.endpoint, "--subnet-file", sf]
    cases = [
        # (args, exit code, words the message must contain)
        (["--nope"], 2, ["flag provided but not defined: -nope"]),
        (["--subnet-lease-ttl", "soon"], 2, ["invalid value", "soon"]),
        (["--public-ip", "10.0.0.1/24"], 1, ["--public-ip", "10.0.0.1/24", "not an IPv4 address"]),
        (["--subnet-lease-renew-margin", "0"], 1, ["subnet-lease-renew-margin", "out of acceptable range"]),
        (["--subnet-lease-renew-margin", "1440"], 1, ["subnet-lease-renew-margin", "out of acceptable range"]),
        (["--etcd-cafile", "/nonexistent/ca.pem"], 1, ["--etcd-cafile", "/nonexistent/ca.pem"]),
        (["--etcd-certfile", str(certdir), "--etcd-keyfile", str(certdir)], 1, ["--etcd-", str(certdir)]),
        (["--etcd-certfile", "/etc/hostname"], 1, ["--etcd-certfile and --etcd-keyfile"]),
        (["--healthz-port", "70000"], 1, ["--healthz-port", "70000"]),
        (["--etcd-endpoints", "ftp://x:1"], 1, ["ftp://x:1"]),
    ]
    for args, code, words in cases:
        argv = [*base, *(common if "--etcd-endpoints" not in args else ["--subnet-file", sf]), *args]
        cp = h1.run(*argv, check=False, timeout=60, env={"PYTHONUNBUFFERED": "1"})  # exits: no retrying
        out = cp.stderr + cp.stdout
        assert cp.returncode == code, (args, cp.returncode, out)
        assert "Traceback" not in out, (args, out)
        errors = [ln for ln in out.splitlines()
                  if ln.startswith("pyflanneld:") or "level=error" in ln or "level=critical" in ln]
        assert len(errors) == 1, (args, out)  # exactly one line says what is wrong ...
        assert all(w in errors[0] for w in words), (args, errors[0])
        others = [ln for ln in out.splitlines() if ln not in errors]
        if code == 2:  # ... plus, for usage errors, the pointer to -h
            assert others == ["Run 'pyflanneld -h' for the list of flags."], (args, out)
        else:
            assert all("level=info" in ln for ln in others), (args, out)
    assert not Path(sf).exists()
