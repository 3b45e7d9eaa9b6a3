"""The core daemon end to end: real etcd (v3 and v2) in the lab, pyflanneld in host namespaces,
alloc backend. What is asserted is what an operator would check: subnet.env, etcd keys, /readyz."""

from __future__ import annotations

import json
import socket
import tempfile
from ipaddress import IPv4Network
from pathlib import Path

from helpers import (
    PREFIX,
    http_get,
    key_of,
    said,
    subnet_of,
    wait_config_retries,
    wait_for,
    wait_lease_retries,
)

from lab.cluster import start_daemon

ALLOC = '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}'


def v3_lease_id(etcd, key: str) -> int:
    out = json.loads(etcd.etcdctl("get", key, "-w", "json"))
    kvs = out.get("kvs") or []
    assert kvs, f"{key} not in etcd"
    return int(kvs[0].get("lease", 0))


def test_seed_workflow_v2_curl_and_flanneld_env_only(lab, etcd):
    """The seed: config put with its exact curl command (v2 API), daemon configured by FLANNELD_* only."""
    h1 = lab.add_host("h1")
    pod_network = "10.1.0.0/16"
    value = '{"Network":"%s","Backend":{"Type":"vxlan"}}' % pod_network
    etcd.curl("/v2/keys/coreos.com/network/config", "-X", "PUT", "-d", f"value={value}".replace(
        "vxlan", "alloc"))
    sf = lab.tmp / "h1" / "subnet.env"
    env = {"FLANNELD_IFACE": h1.address, "FLANNELD_ETCD_ENDPOINTS": etcd.endpoint,
           "FLANNELD_SUBNET_FILE": str(sf)}
    d = start_daemon(h1, "--subnet-file", str(sf), env=env)  # same file via env and flag: flag wins, same value
    env_out = d.wait_subnet_env(timeout=30)
    sn = subnet_of(env_out)
    assert env_out["FLANNEL_NETWORK"] == pod_network
    assert sn.prefixlen == 24 and sn.subnet_of(IPv4Network(pod_network))
    assert env_out["FLANNEL_MTU"] == str(h1.mtu)
    assert env_out["FLANNEL_IPMASQ"] == "false"
    # the lease went to the v2 store (where the config was), with upstream's JSON
    node = json.loads(etcd.curl(f"/v2/keys{key_of(sn)}").stdout)["node"]
    assert json.loads(node["value"]) == {"PublicIP": h1.address, "PublicIPv6": None}
    assert 86000 < node["ttl"] <= 86400
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}  # nothing in v3
    assert d.alive


def test_env_only_daemon_without_flags(lab, etcd):
    """No command-line flag at all: everything from FLANNELD_* (as the systemd unit runs it)."""
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    sf = lab.tmp / "envonly.env"
    env = {"FLANNELD_IFACE": "eth0", "FLANNELD_ETCD_ENDPOINTS": etcd.endpoint, "FLANNELD_SUBNET_FILE": str(sf),
           "FLANNELD_IP_MASQ": "true"}
    p = lab.spawn(h1.ns, [*__import__("lab.cluster", fromlist=["x"]).pyflanneld_argv()], env=env,
                  name="envonly")
    wait_for(lambda: sf.exists(), 30, what="subnet.env")
    text = sf.read_text()
    assert "FLANNEL_IPMASQ=true\n" in text and text.startswith("FLANNEL_NETWORK=10.1.0.0/16\n")
    assert p.alive


def test_v3_lease_golden_subnet_env_and_mode(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1, "--iface", "eth0")
    env = d.wait_subnet_env()
    sn = subnet_of(env)
    text = d.subnet_file.read_text()
    assert text == (f"FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET={sn.network_address + 1}/24\n"
                    f"FLANNEL_MTU={h1.mtu}\nFLANNEL_IPMASQ=false\n")
    assert (d.subnet_file.stat().st_mode & 0o777) == 0o644
    val = etcd.get(key_of(sn))
    assert val == '{"PublicIP":"%s","PublicIPv6":null}' % h1.address
    lease = v3_lease_id(etcd, key_of(sn))
    assert lease != 0
    ttl = etcd.etcdctl("lease", "timetolive", format(lease, "x"))
    assert "granted with TTL(86400s)" in ttl
    assert d.stop() == 0  # SIGTERM: exit 0
    assert etcd.get(key_of(sn)) is not None  # lease kept on shutdown


def test_readyz_and_sd_notify(lab, etcd):
    h1 = lab.add_host("h1")
    sock_path = Path(tempfile.mkdtemp(dir=lab.tmp)) / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(15)
    try:
        d = start_daemon(h1, "--healthz-port", "8471", "--healthz-ip", "127.0.0.1",
                         env={"NOTIFY_SOCKET": str(sock_path)})
        wait_for(lambda: http_get(h1, 8471, "/healthz")[0] == 200, 30, what="/healthz")
        # no config yet: not ready, and it says why (once the first look into etcd is done)
        wait_for(lambda: http_get(h1, 8471, "/readyz") == (503, "flanneld is not ready yet: network config "
                 f"not found at {PREFIX}/config (v3 or v2 API); create it with " +
                 f"etcdctl put {PREFIX}/config '{{\"Network\":\"10.5.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'"
                 f" (v3) or curl -X PUT -d value=... <etcd>/v2/keys{PREFIX}/config (v2)"), 30, what="/readyz says why")
        assert d.alive
        etcd.put(f"{PREFIX}/config", ALLOC)
        msg = srv.recv(4096).decode()
        assert msg == "READY=1"
        d.wait_subnet_env(timeout=30)
        assert http_get(h1, 8471, "/readyz") == (200, "flanneld is ready")
    finally:
        srv.close()


def test_missing_then_invalid_config_is_retried_without_exit(lab, etcd):
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "-v", "1")
    d.wait_log(r"network config not found", timeout=30)
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","SubnetLen":31}')
    d.wait_log(r"SubnetLen must be less than /31", timeout=30)
    wait_config_retries(d, 2)  # retried, in silence
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"nope"}}')
    d.wait_log(r"unknown backend type: nope", timeout=30)
    assert d.alive and d.subnet_env() is None
    etcd.put(f"{PREFIX}/config", ALLOC)
    d.wait_subnet_env(timeout=30)
    text = d.log_text()
    assert "Traceback" not in text
    assert said(d, "SubnetLen must be less than /31") == 1  # logged once, not every second


def test_etcd_unreachable_at_start_then_recovers(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    etcd.stop()
    d = start_daemon(h1)
    d.wait_log(r"unreachable", timeout=30)
    assert d.alive
    etcd.start()
    d.wait_subnet_env(timeout=30)
    assert "Traceback" not in d.log_text()


def test_twenty_daemons_at_once_get_distinct_subnets(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.0","SubnetMax":"10.1.40.0","Backend":{"Type":"alloc"}}')
    hosts = [lab.add_host(f"h{i}") for i in range(1, 21)]
    daemons = [start_daemon(h) for h in hosts]
    envs = [d.wait_subnet_env(timeout=60) for d in daemons]
    subnets = [subnet_of(e) for e in envs]
    assert len(set(subnets)) == 20
    for i, a in enumerate(subnets):
        for b in subnets[i + 1:]:
            assert not a.overlaps(b)
    keys = etcd.get_prefix(f"{PREFIX}/subnets/")
    assert len(keys) == 20
    owners = {json.loads(v)["PublicIP"] for v in keys.values()}
    assert owners == {h.address for h in hosts}
    assert all(d.alive for d in daemons)


def test_restart_keeps_subnet_even_without_subnet_env(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1)
    sn = subnet_of(d.wait_subnet_env())
    assert d.stop() == 0
    d = d.restart()
    d.wait_log(r"found lease for current IP, reusing", timeout=30)
    assert subnet_of(d.wait_subnet_env()) == sn
    d.stop()
    d.subnet_file.unlink()
    d = d.restart()
    assert subnet_of(d.wait_subnet_env()) == sn  # found again by PublicIP
    assert len(etcd.get_prefix(f"{PREFIX}/subnets/")) == 1


def test_previous_subnet_from_subnet_env_is_reused_when_free(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    sf = lab.tmp / "prev.env"
    sf.write_text("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.200.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")
    d = start_daemon(h1, "--subnet-file", str(sf))
    # the file exists already: wait for the daemon's own word, then for the lease in etcd
    d.wait_log(r"flannel is ready", timeout=30)
    assert 'reason="previous subnet"' in d.log_text()
    assert subnet_of(d.wait_subnet_env()) == IPv4Network("10.1.200.0/24")
    assert json.loads(etcd.get(key_of(IPv4Network("10.1.200.0/24"))))["PublicIP"] == h1.address


def test_reservation_is_honoured_and_stays_without_ttl(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    key = f"{PREFIX}/subnets/10.1.77.0-24"
    etcd.put(key, '{"PublicIP":"%s","PublicIPv6":null}' % h1.address)  # no --lease: a reservation
    d = start_daemon(h1)
    assert subnet_of(d.wait_subnet_env()) == IPv4Network("10.1.77.0/24")
    assert v3_lease_id(etcd, key) == 0
    d.stop()
    d = d.restart()
    assert subnet_of(d.wait_subnet_env()) == IPv4Network("10.1.77.0/24")
    assert v3_lease_id(etcd, key) == 0
    assert len(etcd.get_prefix(f"{PREFIX}/subnets/")) == 1


def test_reservation_of_another_host_is_not_taken(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.0","SubnetMax":"10.1.2.0","Backend":{"Type":"alloc"}}')
    etcd.put(f"{PREFIX}/subnets/10.1.1.0-24", '{"PublicIP":"192.168.100.99","PublicIPv6":null}')
    d = start_daemon(h1)
    assert subnet_of(d.wait_subnet_env()) == IPv4Network("10.1.2.0/24")


def test_short_ttl_is_renewed_before_expiry(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1, "--subnet-lease-ttl", "3s", "--subnet-lease-renew-margin", "2s")
    sn = subnet_of(d.wait_subnet_env(30))
    first = v3_lease_id(etcd, key_of(sn))
    # five renewals (one a second) span longer than the 3 s TTL: only they keep the key alive, and
    # it is there whenever we look
    def renewed_five_times() -> bool:
        assert etcd.get(key_of(sn)) is not None, "the lease expired"
        return d.log_text().count("lease renewed") >= 5

    wait_for(renewed_five_times, 60, "five renewals", interval=0.2)
    assert v3_lease_id(etcd, key_of(sn)) != first
    assert d.alive


def test_own_lease_deleted_is_reacquired(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1)
    sn = subnet_of(d.wait_subnet_env())
    etcd.delete(key_of(sn))
    wait_for(lambda: etcd.get(key_of(sn)), 30, what="lease re-acquired")
    assert json.loads(etcd.get(key_of(sn)))["PublicIP"] == h1.address
    assert "own lease lost" in d.log_text()
    assert d.alive and subnet_of(d.subnet_env()) == sn


def test_pool_exhausted_then_recovers_when_a_lease_is_freed(lab, etcd):
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.9.0","Backend":{"Type":"alloc"}}')
    d1 = start_daemon(h1)
    assert subnet_of(d1.wait_subnet_env()) == IPv4Network("10.1.9.0/24")
    d2 = start_daemon(h2, "--healthz-port", "8472", "-v", "1")
    d2.wait_log(r"out of subnets", timeout=30)
    wait_for(lambda: (r := http_get(h2, 8472, "/readyz"))[0] == 503 and "out of subnets" in r[1], 30,
             "/readyz: out of subnets")
    wait_lease_retries(d2)
    assert d2.alive and d2.subnet_env() is None
    assert said(d2, "out of subnets") == 1  # one clear line, not one per retry
    d1.stop()
    etcd.delete(key_of(IPv4Network("10.1.9.0/24")))
    assert subnet_of(d2.wait_subnet_env(timeout=40)) == IPv4Network("10.1.9.0/24")
    assert http_get(h2, 8472, "/readyz")[0] == 200


def test_watch_sees_joins_and_leaves_and_survives_compaction(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1, "--healthz-port", "8473")
    own = subnet_of(d.wait_subnet_env())

    def peers():
        code, body = http_get(h1, 8473, "/peers")
        assert code == 200
        return {p["subnet"] for p in json.loads(body)}

    expected = set()
    for i in range(2, 40):
        sn = IPv4Network(f"10.1.{i + 100}.0/24")
        etcd.put(key_of(sn), '{"PublicIP":"192.168.100.%d","PublicIPv6":null}' % (i + 100))
        expected.add(str(sn))
        if i % 3 == 0:
            etcd.delete(key_of(sn))
            expected.discard(str(sn))
        if i % 10 == 0:
            etcd.compact(etcd.revision())
            etcd.defrag()
    wait_for(lambda: peers() == expected, 30, what="daemon peer set == etcd")
    assert str(own) not in peers()  # never our own lease
    # a daemon started after compaction lists and watches from the current revision
    etcd.compact(etcd.revision())
    h2 = lab.add_host("h2")
    d2 = start_daemon(h2, "--healthz-port", "8474")
    d2.wait_subnet_env()
    extra = IPv4Network("10.1.250.0/24")
    etcd.put(key_of(extra), '{"PublicIP":"192.168.100.250","PublicIPv6":null}')
    wait_for(lambda: str(extra) in peers(), 30, what="event after compaction")
    code, body = http_get(h2, 8474, "/peers")
    assert {p["subnet"] for p in json.loads(body)} == expected | {str(own), str(extra)}


def test_bad_lease_data_is_one_warning_and_ignored(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    etcd.put(f"{PREFIX}/subnets/10.1.5.0-24", "this is not json")
    etcd.put(f"{PREFIX}/subnets/not-a-subnet", '{"PublicIP":"1.2.3.4"}')
    d = start_daemon(h1, "--healthz-port", "8475")
    sn = subnet_of(d.wait_subnet_env())
    assert sn != IPv4Network("10.1.5.0/24")  # a key with a garbage value still claims its subnet
    # the watch's first list warns, once per entry
    wait_for(lambda: d.log_text().count("ignoring bad lease entry") == 2, 30, what="two warnings")
    d.wait_log("peer leases listed")
    assert d.log_text().count("ignoring bad lease entry") == 2
    assert d.alive


def test_v2_api_forced_and_watch_over_v2(lab, etcd):
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    etcd.v2_put(f"{PREFIX}/config", ALLOC)
    d1 = start_daemon(h1, "--etcd-api", "v2", "--healthz-port", "8476")
    sn1 = subnet_of(d1.wait_subnet_env())
    d2 = start_daemon(h2, "--etcd-api", "v2")
    sn2 = subnet_of(d2.wait_subnet_env())
    assert sn1 != sn2

    def peers():
        return {p["subnet"] for p in json.loads(http_get(h1, 8476, "/peers")[1])}

    wait_for(lambda: peers() == {str(sn2)}, 30, what="v2 watch add")
    assert d2.stop() == 0  # (a running d2 would re-acquire its deleted lease)
    etcd.v2_delete(key_of(sn2))
    wait_for(lambda: peers() == set(), 30, what="v2 watch remove")


def test_config_only_in_v3_with_api_v2_forced_is_reported(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1, "--etcd-api", "v2")
    d.wait_log(r"network config not found .*v2 API", timeout=30)
    assert d.alive


def test_sigterm_exits_zero_by_itself(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1)
    d.wait_subnet_env(30)
    # by itself (else SIGKILL after 10 s: exit -9): the shutdown is bounded (~1 s), it waits for no
    # etcd or gRPC timeout
    assert d.stop(timeout=10) == 0
    assert "exiting cleanly" in d.log_text()


def test_json_log_format(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1, "--log-format", "json")
    d.wait_log(r'"event": ?"flannel is ready"', 30)  # (subnet.env is written just before that line)
    lines = [ln for ln in d.log_text().splitlines() if ln.startswith("{")]
    events = [json.loads(ln) for ln in lines]
    ready = [e for e in events if e["event"] == "flannel is ready"]
    assert ready and ready[0]["subnet"].startswith("10.1.")


def test_ip_blackhole_route_kept_in_place(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1, "--ip-blackhole-route", "--iptables-resync", "1")
    sn = subnet_of(d.wait_subnet_env())
    line = f"blackhole {sn}"
    wait_for(lambda: line in h1.ip("route", "show"), 30, what="blackhole route")
    h1.ip("route", "del", "blackhole", str(sn))
    assert line not in h1.ip("route", "show")
    wait_for(lambda: line in h1.ip("route", "show"), 30, what="blackhole route restored")


def test_not_root_is_one_clear_line(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}')
    from lab.cluster import pyflanneld_argv

    p = h1.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *pyflanneld_argv(),
               "--etcd-endpoints", etcd.endpoint, "--subnet-file", "/tmp/pyflanneld-nonroot.env",
               check=False, timeout=30)
    assert p.returncode == 1
    assert "must run as root" in p.stderr
    assert "Traceback" not in p.stderr
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}  # nothing leased by a daemon that cannot work


def test_own_subnet_taken_over_moves_to_a_new_subnet(lab, etcd):
    h1 = lab.add_host("h1")
    etcd.put(f"{PREFIX}/config", ALLOC)
    d = start_daemon(h1)
    sn = subnet_of(d.wait_subnet_env())
    etcd.put(key_of(sn), '{"PublicIP":"192.168.100.77","PublicIPv6":null}')  # an admin gives it away
    new = wait_for(lambda: (e := d.subnet_env()) and subnet_of(e) != sn and subnet_of(e), 30,
                   what="subnet.env rewritten with a new subnet")
    assert json.loads(etcd.get(key_of(new)))["PublicIP"] == h1.address
    assert json.loads(etcd.get(key_of(sn)))["PublicIP"] == "192.168.100.77"  # not taken back
    assert "subnet changed after re-acquiring" in d.log_text() and d.alive
