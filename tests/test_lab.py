"""Tests of the lab itself: namespaces, switch, pods, processes, etcd (plain, v2, cluster, TLS, auth)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab import netns
from lab.cluster import pyflanneld_argv, start_daemon
from lab.etcd import EtcdCluster, EtcdServer, make_tls_certs
from lab.netns import Lab, LabError
from lab.wait import wait_for

pytestmark = pytest.mark.lab


def _ns_exists(name: str) -> bool:
    return name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def test_two_hosts_ping_each_other_over_the_switch(lab):
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    assert (h1.address, h2.address) == ("192.168.100.1", "192.168.100.2")
    assert h1.ping(h2.address) and h2.ping(h1.address)
    assert h1.ping("192.168.100.254")
    assert "default via 192.168.100.254 dev eth0" in h1.ip("route", "show")
    assert h1.sysctl("net.ipv4.ip_forward") == "1"
    # The switch side of each host is a port of br0.
    assert "master br0" in lab.switch.ip("link", "show", "vh1")
    assert not h1.ping("192.168.100.77", timeout=0.3)


def test_host_mtu_option(lab):
    h = lab.add_host("h1", mtu=1400)
    assert h.ip_json("link", "show", "eth0")[0]["mtu"] == 1400
    assert lab.switch.ip_json("link", "show", "vh1")[0]["mtu"] == 1400


def test_second_underlay_subnet_reaches_others_only_through_the_router(lab):
    h1 = lab.add_host("h1")
    far = lab.add_host("far", subnet="192.168.101.0/24")
    assert far.address == "192.168.101.1" and far.gateway == "192.168.101.254"
    assert far.ping(h1.address) and h1.ping(far.address)
    route = far.ip("route", "get", h1.address)
    assert "via 192.168.101.254" in route
    # No on-link route between the two subnets on the hosts themselves.
    assert "192.168.101.0/24" not in h1.ip("route", "show")


def test_opt_in_ipv6_underlay_and_dual_stack_pods(lab):
    h1, h2 = lab.add_host("h1", ipv6=True), lab.add_host("h2", ipv6=True)
    h3 = lab.add_host("h3")  # not asked for: IPv4 only, as before
    h4 = lab.add_host("h4", subnet="192.168.101.0/24", ipv6=True)
    assert (h1.address6, h2.address6, h3.address6, h4.address6) == ("fd99::1", "fd99::2", None, "fd98::1")
    assert "default via fd99::fe dev eth0" in h1.ip("-6", "route", "show")
    assert not [a for a in h3.ip_json("-6", "addr", "show", "eth0")[0]["addr_info"] if a["scope"] == "global"]
    assert h1.ping(h2.address6) and h1.ping(h4.address6)  # at once: no address waits for DAD
    assert h1.sysctl("net.ipv6.conf.all.forwarding") == "1"
    h1.make_bridge("docker0", "10.5.1.1/24", cidr6="fd80:0:0:1::1/64")
    p1 = lab.add_pod(h1, "p1")
    assert (p1.address, p1.address6) == ("10.5.1.2", "fd80:0:0:1::2")
    assert p1.ping("fd80:0:0:1::1") and p1.ping(h1.address6)
    h2.make_bridge("docker0", "10.5.2.1/24")
    assert lab.add_pod(h2, "p1").address6 is None


def test_etcd_reachable_from_a_host(lab, etcd):
    h1 = lab.add_host("h1")
    assert etcd.endpoint.startswith("http://192.168.100.254:")
    out = h1.run("curl", "-sS", "--max-time", "2", f"{etcd.endpoint}/health").stdout
    assert json.loads(out)["health"] == "true"
    out = h1.run("etcdctl", f"--endpoints={etcd.endpoint}", "endpoint", "health",
                 env={"ETCDCTL_API": "3"}).stderr
    assert "is healthy" in out


def test_v3_put_get_prefix_delete_and_revision(etcd):
    rev0 = etcd.revision()
    etcd.put("/coreos.com/network/config", '{"Network": "10.5.0.0/16"}')
    etcd.put("/coreos.com/network/subnets/10.5.1.0-24", "-starts-with-dash")
    assert etcd.get("/coreos.com/network/config") == '{"Network": "10.5.0.0/16"}'
    assert etcd.get("/nope") is None
    assert etcd.get_prefix("/coreos.com/network/subnets/") == {
        "/coreos.com/network/subnets/10.5.1.0-24": "-starts-with-dash"}
    assert etcd.revision() == rev0 + 2
    assert etcd.delete("/coreos.com/network/subnets/10.5.1.0-24") == 1
    assert etcd.get_prefix("/coreos.com/network/subnets/") == {}
    etcd.compact(etcd.revision())
    etcd.defrag()
    with pytest.raises(subprocess.CalledProcessError, match="compacted"):
        etcd.etcdctl("get", "--rev=1", "/coreos.com/network/config")


def test_v3_put_with_ttl_expires(etcd):
    lease = etcd.put("/k", "v", ttl=1)
    assert lease and int(lease, 16) > 0
    assert etcd.get("/k") == "v"
    wait_for(lambda: etcd.get("/k") is None, 30, "the key with a 1 s lease to expire", interval=0.1)


def test_v2_put_get_is_separate_from_v3(etcd):
    ans = etcd.v2_put("/coreos.com/network/config", '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    assert ans["action"] == "set"
    assert etcd.v2_get("/coreos.com/network/config") == '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
    assert etcd.v2_get("/coreos.com/network/nothing") is None
    assert etcd.get("/coreos.com/network/config") is None  # the v2 store is not the v3 store
    ans = etcd.v2_put("/coreos.com/network/subnets/10.5.1.0-24", "{}", ttl=30)
    assert ans["node"]["ttl"] == 30
    assert etcd.v2_delete("/coreos.com/network/subnets/10.5.1.0-24")
    assert etcd.v2_get("/coreos.com/network/subnets/10.5.1.0-24") is None


def test_pod_on_host_bridge_pings_bridge_and_other_pod(lab):
    h1 = lab.add_host("h1")
    br = h1.make_bridge("docker0", "10.5.1.1/24", mtu=1450)
    assert str(br.network) == "10.5.1.0/24"
    p1, p2 = lab.add_pod(h1, "p1"), lab.add_pod(h1, "p2")
    assert (p1.address, p2.address) == ("10.5.1.2", "10.5.1.3")
    assert p1.ns == f"{lab.id}-h1p1"
    assert p1.ping("10.5.1.1") and p1.ping(p2.address)
    assert "default via 10.5.1.1 dev eth0" in p1.ip("route", "show")
    assert p1.ip_json("link", "show", "eth0")[0]["mtu"] == 1450
    # The host forwards: a pod reaches the host's underlay address through the bridge.
    assert p1.ping(h1.address)
    with pytest.raises(LabError, match="no bridge"):
        lab.add_pod(h1, "p3", bridge="cni0")


def test_spawn_logs_and_stop_with_sigterm(lab):
    h1 = lab.add_host("h1")
    script = "trap 'echo got-term; exit 3' TERM; echo started; while true; do sleep 0.05; done"
    p = h1.popen("bash", "-c", script)
    p.wait_log("started", 30)
    assert p.alive
    assert p.pid in netns._ns_pids(h1.ns)
    assert p.stop() == 3
    assert "got-term" in p.log_text()
    assert "got-term" in lab.read_log(p.log_path.name)


def test_stop_escalates_to_sigkill(lab):
    p = lab.spawn(lab.switch, ["bash", "-c", "trap '' TERM; echo up; while true; do sleep 0.05; done"])
    p.wait_log("up", 30)  # the trap is set: SIGTERM is ignored from now on
    assert p.stop(timeout=0.3) == -signal.SIGKILL


def test_close_leaves_no_namespace_no_process_no_tmp():
    lab = Lab()
    etcd = lab.start_etcd()
    h1 = lab.add_host("h1")
    h1.make_bridge("docker0", "10.5.1.1/24")
    lab.add_pod(h1, "p1")
    tracked = h1.popen("sleep", "300")
    # Not tracked by the lab: started with plain `ip netns exec`; close() must still kill it.
    stray = subprocess.Popen(["ip", "netns", "exec", f"{lab.id}-h1p1", "sleep", "300"])
    stubborn = h1.popen("bash", "-c", "trap '' TERM; while true; do sleep 0.05; done")
    namespaces = list(lab.namespaces)
    assert len(namespaces) == 3
    tmp = lab.tmp
    pids = [etcd.process.pid, tracked.pid, stubborn.pid]
    t0 = time.monotonic()
    lab.close()
    # the stubborn process gets STOP_GRACE, then SIGKILL: close() never waits for it to give in
    assert time.monotonic() - t0 < 30
    stray.wait(timeout=10)
    assert stray.returncode == -signal.SIGKILL or stray.returncode == -signal.SIGTERM
    for ns in namespaces:
        assert not _ns_exists(ns)
    for pid in pids:
        assert not netns._pid_alive(pid), f"pid {pid} survived lab.close()"
    assert not tmp.exists()
    assert not (netns.REGISTRY_DIR / lab.id).exists()
    lab.close()  # idempotent
    with pytest.raises(LabError, match="closed"):
        lab.add_host("h2")


def test_labs_get_unique_ids_and_do_not_touch_each_other():
    with Lab() as a, Lab() as b:
        assert a.id != b.id
        ha, hb = a.add_host("h1"), b.add_host("h1")
        assert ha.address == hb.address == "192.168.100.1"  # same addresses, separate worlds
        b.close()
        assert ha.ping("192.168.100.254")
        assert _ns_exists(ha.ns) and not _ns_exists(hb.ns)


def _child(code: str) -> subprocess.Popen:
    src = textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", src], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def test_sigterm_to_the_owner_cleans_up():
    child = _child("""
        import time
        from lab.netns import Lab
        lab = Lab()
        lab.add_host("h1")
        lab.switch.popen("sleep", "300")
        print(lab.id, flush=True)
        time.sleep(60)
    """)
    lab_id = child.stdout.readline().strip()
    assert lab_id.startswith("pf")
    assert _ns_exists(f"{lab_id}-h1")
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=10)
    child.stdout.close()
    assert not _ns_exists(f"{lab_id}-h1") and not _ns_exists(f"{lab_id}-sw")


def test_a_killed_owner_is_reaped_by_the_next_lab():
    child = _child("""
        import os
        from lab.netns import Lab
        lab = Lab()
        lab.add_host("h1")
        print(lab.id, flush=True)
        os._exit(0)   # no atexit, no close(): as if SIGKILLed
    """)
    lab_id = child.stdout.readline().strip()
    child.wait(timeout=10)
    child.stdout.close()
    assert _ns_exists(f"{lab_id}-h1")
    reaped = netns.reap_stale_labs()
    assert lab_id in reaped
    assert not _ns_exists(f"{lab_id}-h1") and not _ns_exists(f"{lab_id}-sw")


def test_live_labs_are_never_reaped(lab):
    lab.add_host("h1")
    assert lab.id not in netns.reap_stale_labs()
    assert _ns_exists(f"{lab.id}-h1")


def test_hosts_are_added_while_etcd_starts():
    """etcd starts in the background (wait=False) while the hosts are made: both work afterwards."""
    with Lab() as lab:
        etcd = EtcdServer(lab).start(wait=False)
        hosts = [lab.add_host(f"h{i}") for i in (1, 2, 3)]
        etcd.wait_healthy(30)
        assert hosts[2].ping(hosts[0].address)
        etcd.put("/k", "v")
        assert etcd.get("/k") == "v"


def test_etcd_restart_keeps_data_and_kill_stops_it(etcd):
    etcd.put("/persist", "yes")
    etcd.restart()
    assert etcd.get("/persist") == "yes"
    etcd.kill()
    assert not etcd.alive and not etcd.healthy()
    etcd.restart()
    assert etcd.get("/persist") == "yes"
    assert etcd.stop() in (0, -signal.SIGTERM)  # etcd re-raises SIGTERM after a clean shutdown


def test_three_member_etcd_cluster_comes_up_healthy(lab):
    cluster = EtcdCluster(lab, size=3).start()
    assert lab.etcd is cluster
    assert len(cluster.endpoint_list) == 3 and cluster.endpoints.count(",") == 2
    for m in cluster.members:
        assert m.healthy()
    members = json.loads(cluster[0].etcdctl("member", "list", "-w", "json"))["members"]
    assert sorted(m["name"] for m in members) == ["etcd0", "etcd1", "etcd2"]
    cluster[0].put("/replicated", "1")
    assert cluster[2].get("/replicated") == "1"
    h1 = lab.add_host("h1")
    out = h1.run("etcdctl", f"--endpoints={cluster.endpoints}", "endpoint", "health",
                 env={"ETCDCTL_API": "3"}).stderr
    assert out.count("is healthy") == 3
    # Losing the leader keeps quorum: the other two elect a new one and take writes.
    old = cluster.wait_leader()
    old.kill()
    new = cluster.wait_leader(timeout=10)
    assert new is not old and new.alive
    rest = [m for m in cluster.members if m.alive]
    rest[0].put("/after-kill", "ok")
    assert rest[1].get("/after-kill") == "ok"


def test_tls_etcd_with_client_certs(lab):
    tls = make_tls_certs(lab.tmp / "tls")
    etcd = lab.start_etcd(tls=tls, client_cert_auth=True)
    assert etcd.endpoint.startswith("https://192.168.100.254:")
    h1 = lab.add_host("h1")
    env = {"ETCDCTL_API": "3"}
    base = ["etcdctl", f"--endpoints={etcd.endpoint}", f"--cacert={tls.ca}", "--dial-timeout=2s",
            "--command-timeout=3s"]
    out = h1.run(*base, f"--cert={tls.client_cert}", f"--key={tls.client_key}", "endpoint", "health",
                 env=env).stderr
    assert "is healthy" in out
    # Without a client certificate the TLS handshake is refused.
    no_cert = h1.run("curl", "-sS", "--max-time", "2", "--cacert", str(tls.ca), f"{etcd.endpoint}/health",
                     check=False)
    assert no_cert.returncode != 0 and "health" not in no_cert.stdout
    with_cert = h1.run("curl", "-sS", "--max-time", "2", "--cacert", str(tls.ca), "--cert", str(tls.client_cert),
                       "--key", str(tls.client_key), f"{etcd.endpoint}/health")
    assert json.loads(with_cert.stdout)["health"] == "true"
    etcd.put("/tls", "ok")
    assert etcd.get("/tls") == "ok"
    assert etcd.v2_put("/v2tls", "ok")["action"] == "set"


def test_auth_limits_a_user_to_its_prefix(etcd):
    etcd.enable_auth(user="flannel", password="pw", prefix="/coreos.com/network/")
    ctl = ["ip", "netns", "exec", etcd.ns, "etcdctl", f"--endpoints={etcd.local_endpoint}"]
    env = {"ETCDCTL_API": "3"}
    ok = netns.run([*ctl, "--user=flannel:pw", "put", "/coreos.com/network/config", "{}"], env=env)
    assert ok.stdout.strip() == "OK"
    denied = netns.run([*ctl, "--user=flannel:pw", "put", "/other", "x"], env=env, check=False)
    assert denied.returncode != 0 and "permission denied" in denied.stderr
    anonymous = netns.run([*ctl, "get", "/coreos.com/network/config"], env=env, check=False)
    assert anonymous.returncode != 0
    assert etcd.get("/coreos.com/network/config") == "{}"  # helpers use root


FAKE_DAEMON = """
import os, signal, sys, time
args = sys.argv[1:]
val = lambda f: args[args.index(f) + 1]
signal.signal(signal.SIGTERM, lambda *a: (print("bye", flush=True), sys.exit(0)))
with open(val("--subnet-file") + ".tmp", "w") as f:
    f.write("FLANNEL_NETWORK=10.5.0.0/16\\nFLANNEL_SUBNET=10.5.7.1/24\\nFLANNEL_MTU=1450\\nFLANNEL_IPMASQ=false\\n")
os.rename(val("--subnet-file") + ".tmp", val("--subnet-file"))
print("endpoints", val("--etcd-endpoints"), "iface", val("--iface"), "env", os.environ.get("X_TEST"), flush=True)
while True:
    time.sleep(0.05)
"""


def test_start_daemon_defaults_subnet_env_log_and_stop(lab, etcd):
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--iface", "eth0", env={"X_TEST": "42"}, binary=[sys.executable, "-c", FAKE_DAEMON])
    env = d.wait_subnet_env(timeout=30)
    assert env == {"FLANNEL_NETWORK": "10.5.0.0/16", "FLANNEL_SUBNET": "10.5.7.1/24",
                   "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "false"}
    assert d.subnet_file == lab.tmp / "h1" / "subnet.env"
    d.wait_log(r"endpoints \S+ iface eth0 env 42")
    assert f"endpoints {etcd.endpoint} " in d.log_text()
    assert d.alive
    assert d.stop() == 0
    assert "bye" in d.log_text()
    d.restart()
    d.wait_log("bye|endpoints.*endpoints")
    assert d.kill() == -signal.SIGKILL
    # The daemon's bridge can be built from subnet.env as the demo does.
    br = h1.make_bridge("docker0", env["FLANNEL_SUBNET"], env["FLANNEL_MTU"])
    assert lab.add_pod(h1, "p1").ping(br.address)


def test_start_daemon_reports_early_exit_with_log(lab, etcd):
    h1 = lab.add_host("h1")
    d = start_daemon(h1, binary=[sys.executable, "-c", "print('boom: no etcd'); raise SystemExit(1)"])
    with pytest.raises(LabError, match="boom: no etcd"):
        d.wait_subnet_env(timeout=30)
    assert d.returncode == 1


def test_pyflanneld_argv():
    argv = pyflanneld_argv()
    assert argv[0].endswith("pyflanneld") or argv[1:] == ["-m", "pyflanneld"]
    if len(argv) == 1:
        assert Path(argv[0]).parent == Path(sys.executable).parent or os.path.isabs(argv[0])


def test_start_daemon_runs_real_pyflanneld_and_pods_ping_across_hosts(lab, etcd):
    """The whole lab path the demo uses: etcd config, two daemons, docker0 from subnet.env, pods."""
    etcd.put("/coreos.com/network/config", '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    hosts = [lab.add_host("h1"), lab.add_host("h2")]
    daemons = [start_daemon(h) for h in hosts]
    pods = []
    for h, d in zip(hosts, daemons, strict=True):
        env = d.wait_subnet_env(timeout=30)
        h.make_bridge("docker0", env["FLANNEL_SUBNET"], env["FLANNEL_MTU"])
        pods.append(lab.add_pod(h, "p1"))
    assert pods[0].wait_ping(pods[1].address, timeout=30), daemons[0].log_text()[-2000:]
    assert [d.stop() for d in daemons] == [0, 0]
