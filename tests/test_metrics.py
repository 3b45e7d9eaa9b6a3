"""/metrics (issue 14.1): real daemons in lab hosts, scraped with curl from inside the host, parsed
with prometheus_client's own parser, and every value checked against what the test did — a join,
a route/ARP/FDB entry/device/rule deleted by hand, renewals, a bad lease, etcd stopped, pings over
udp. Then the parts that need no lab: the text format against prometheus_client's, the clock of
the programming histogram, the udp workers' counters on a socketpair TUN, and the docs' Prometheus
files (promtool is not installed: see test_prometheus_docs).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import yaml
from e2e_helpers import config, key_of, start_nodes
from helpers import http_get, wait_for
from prometheus_client.parser import text_string_to_metric_families

from lab import start_daemon
from pyflanneld import metrics

PORT = 8472
ROOT = Path(__file__).resolve().parent.parent
REPAIRS = 'pyflanneld_kernel_repairs_total{kind="%s"}'


def parse(text: str) -> dict[str, float]:
    """Exposition text → {'name{label="value",...}': value} (labels sorted; no braces without labels)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape(host, port: int = PORT) -> dict[str, float]:
    code, body = http_get(host, port, "/metrics")
    assert code == 200, (code, body[:300])
    return parse(body)


def wait_metric(host, series: str, pred, what: str, timeout: float = 20) -> dict[str, float]:
    """Scrape until pred(value of series) holds (the daemon may not listen yet); the last scrape."""
    last: dict[str, dict[str, float]] = {}

    def ok():
        code, body = http_get(host, PORT, "/metrics")
        last["m"] = parse(body) if code == 200 else {}
        return series in last["m"] and pred(last["m"][series])

    wait_for(ok, timeout=timeout, interval=0.2, what=f"{what} ({series} now {last.get('m', {}).get(series)})")
    return last["m"]


# --- vxlan: gauges, histogram, repairs, renewals, rejected leases ------------------------------------

def test_vxlan_metrics_follow_what_happened(lab, etcd):
    etcd.put("/coreos.com/network/config", config({"Type": "vxlan"}))
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    d1 = start_daemon(h1, "--iface", "eth0", "--healthz-port", str(PORT), "--ip-masq", "--iptables-resync", "1",
                      "--ip-blackhole-route", "--subnet-lease-ttl", "6s", "--subnet-lease-renew-margin", "3s")
    env1 = d1.wait_subnet_env()
    m = wait_metric(h1, "pyflanneld_ready", lambda v: v == 1, "h1 ready")
    # the own lease as subnet.env and etcd have it; no peer yet, nothing repaired, nothing timed
    subnet1 = str(IPv4Network(env1["FLANNEL_SUBNET"], strict=False))
    assert json.loads(etcd.get(key_of(IPv4Network(subnet1))))["PublicIP"] == h1.address
    assert m[f'pyflanneld_lease_info{{backend="vxlan",public_ip="{h1.address}",subnet="{subnet1}"}}'] == 1
    assert m['pyflanneld_peers{backend="vxlan"}'] == 0
    assert time.time() < m["pyflanneld_lease_expiry_timestamp_seconds"] <= time.time() + 6
    assert m["pyflanneld_peer_programming_seconds_count"] == 0
    assert {k: m[REPAIRS % k] for k in metrics.REPAIR_KINDS} == dict.fromkeys(metrics.REPAIR_KINDS, 0)
    assert m["pyflanneld_leases_rejected_total"] == 0

    # renewals: a 6 s lease is renewed 3 s before it runs out; the expiry moves on with it
    expiry0 = m["pyflanneld_lease_expiry_timestamp_seconds"]
    m = wait_metric(h1, "pyflanneld_lease_renewals_total", lambda v: v >= 2, "two renewals")
    assert m["pyflanneld_lease_expiry_timestamp_seconds"] > expiry0
    assert d1.log_text().count("lease renewed") >= m["pyflanneld_lease_renewals_total"]

    # one peer joins: one lease programmed, one observation of the programming time
    d2 = start_daemon(h2, "--iface", "eth0")
    sn2 = IPv4Network(d2.wait_subnet_env()["FLANNEL_SUBNET"], strict=False)
    route2 = f"{sn2} via {sn2.network_address} dev flannel.1 onlink"
    wait_for(lambda: route2 in h1.ip("route"), timeout=30, what="h1 programs h2")
    m = scrape(h1)
    assert m['pyflanneld_peers{backend="vxlan"}'] == 1
    assert m["pyflanneld_peer_programming_seconds_count"] == 1
    assert 0 < m["pyflanneld_peer_programming_seconds_sum"] < 5
    assert m['pyflanneld_peer_programming_seconds_bucket{le="+Inf"}'] == 1
    assert [m[REPAIRS % k] for k in metrics.REPAIR_KINDS] == [0] * 5  # a join is no repair

    # entries deleted by hand come back, each counted once under its kind
    h1.ip("route", "del", str(sn2))
    wait_for(lambda: route2 in h1.ip("route"), timeout=30, what="the route back")
    m = wait_metric(h1, REPAIRS % "route", lambda v: v == 1, "one route repair")
    h1.ip("neigh", "del", str(sn2.network_address), "dev", "flannel.1")
    m = wait_metric(h1, REPAIRS % "neigh", lambda v: v == 1, "one ARP repair")
    mac2 = json.loads(etcd.get(key_of(sn2)))["BackendData"]["VtepMAC"]
    h1.bridge("fdb", "del", mac2, "dev", "flannel.1", "dst", h2.address)
    m = wait_metric(h1, REPAIRS % "fdb", lambda v: v == 1, "one FDB repair")
    assert (m[REPAIRS % "route"], m[REPAIRS % "neigh"], m[REPAIRS % "device"]) == (1, 1, 0)
    # the device: recreated, and its peer's three entries with it
    h1.ip("link", "del", "flannel.1")
    m = wait_metric(h1, REPAIRS % "device", lambda v: v == 1, "the device recreated")
    wait_for(lambda: route2 in h1.ip("route"), timeout=30, what="the route on the new device")
    m = wait_metric(h1, REPAIRS % "fdb", lambda v: v == 2, "the FDB entry on the new device")
    assert (m[REPAIRS % "route"], m[REPAIRS % "neigh"]) == (2, 2)
    # a flushed iptables chain (restored by the 1 s resync) and the blackhole route
    assert m[REPAIRS % "rule"] == 0
    h1.run("iptables", "-w", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    wait_metric(h1, REPAIRS % "rule", lambda v: v == 1, "the chain restored")
    h1.ip("route", "del", "blackhole", subnet1)
    m = wait_metric(h1, REPAIRS % "route", lambda v: v == 3, "the blackhole route back")
    assert f"blackhole {subnet1}" in h1.ip("route")

    # a bad lease written to etcd: rejected once (and not programmed)
    etcd.put(key_of(IPv4Network("10.5.250.0/24")),
             json.dumps({"PublicIP": "192.168.100.250", "BackendType": "vxlan",
                         "BackendData": {"VNI": 1, "VtepMAC": "ff:ff:ff:ff:ff:ff"}}))
    m = wait_metric(h1, "pyflanneld_leases_rejected_total", lambda v: v == 1, "the bad lease rejected")
    assert m['pyflanneld_peers{backend="vxlan"}'] == 1 and "10.5.250.0/24" not in h1.ip("route")
    assert m["pyflanneld_ready"] == 1  # someone else's bad entry does not make this host unready
    # a second peer joins: the histogram counts the joins (2), the bad lease not
    h3 = lab.add_host("h3")
    start_daemon(h3, "--iface", "eth0").wait_subnet_env()
    m = wait_metric(h1, 'pyflanneld_peers{backend="vxlan"}', lambda v: v == 2, "h3 programmed")
    assert m["pyflanneld_peer_programming_seconds_count"] == 2
    assert m['pyflanneld_datastore_errors_total{op="watch"}'] == 0


def test_nftables_table_restored_counts_a_rule_repair(lab, etcd):
    etcd.put("/coreos.com/network/config", json.dumps({"Network": "10.5.0.0/16", "EnableNFTables": True,
                                                        "Backend": {"Type": "host-gw"}}))
    h1 = lab.add_host("h1")
    start_daemon(h1, "--iface", "eth0", "--healthz-port", str(PORT), "--ip-masq", "--iptables-resync", "1")
    m = wait_metric(h1, "pyflanneld_ready", lambda v: v == 1, "ready")
    assert m[REPAIRS % "rule"] == 0 and m['pyflanneld_peers{backend="host-gw"}'] == 0
    h1.run("nft", "delete", "table", "ip", "flannel-ipv4")
    wait_metric(h1, REPAIRS % "rule", lambda v: v == 1, "the table restored")
    assert "flannel-ipv4" in h1.run("nft", "list", "tables").stdout


# --- the datastore: errors, reconnects, readiness --------------------------------------------------

def test_etcd_outage_counts_errors_and_reconnects_and_ready_follows(lab, etcd):
    etcd.put("/coreos.com/network/config", config({"Type": "alloc"}))
    h1 = lab.add_host("h1")
    d1 = start_daemon(h1, "--iface", "eth0", "--healthz-port", str(PORT))
    d1.wait_subnet_env()
    m = wait_metric(h1, "pyflanneld_ready", lambda v: v == 1, "ready")
    assert m['pyflanneld_datastore_errors_total{op="watch"}'] == 0
    assert m["pyflanneld_watch_reconnects_total"] == 0
    assert m['pyflanneld_peers{backend="alloc"}'] == 0

    etcd.stop()
    m = wait_metric(h1, "pyflanneld_ready", lambda v: v == 0, "not ready while etcd is down")
    m = wait_metric(h1, "pyflanneld_watch_reconnects_total", lambda v: v >= 2, "reconnect attempts")
    assert m['pyflanneld_datastore_errors_total{op="watch"}'] >= 2
    assert d1.log_text().count("watch failed; reconnecting") >= m["pyflanneld_watch_reconnects_total"] >= 2
    assert m["pyflanneld_ready"] == 0

    etcd.start()
    m = wait_metric(h1, "pyflanneld_ready", lambda v: v == 1, "ready again", timeout=30)
    reconnects = m["pyflanneld_watch_reconnects_total"]
    time.sleep(1)  # watching again: no further reconnects
    assert scrape(h1)["pyflanneld_watch_reconnects_total"] == reconnects


# --- udp: the workers' counters ---------------------------------------------------------------------

def test_udp_forwarder_counters_per_direction(lab, etcd):
    etcd.put("/coreos.com/network/config", config({"Type": "udp"}))
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    n1, n2 = start_nodes(lab, [h1, h2], "--healthz-port", str(PORT))
    wait_metric(h1, 'pyflanneld_peers{backend="udp"}', lambda v: v == 1, "h1 knows h2")
    wait_metric(h2, 'pyflanneld_peers{backend="udp"}', lambda v: v == 1, "h2 knows h1")
    assert n1.pod.wait_ping(n2.pod.address, timeout=10)  # the path works (and ARP etc. is done)
    fwd = 'pyflanneld_udp_forwarded_%s_total{direction="%s"}'
    before = {h.name: scrape(h) for h in (h1, h2)}
    assert before["h1"][fwd % ("packets", "egress")] >= 1

    pings = 5
    cp = n1.pod.run("ping", "-n", "-c", str(pings), "-i", "0.2", "-W", "2", "-s", "56", n2.pod.address)
    assert f"{pings} received" in cp.stdout
    after = {h.name: scrape(h) for h in (h1, h2)}

    def delta(host: str, series: str) -> float:
        return after[host][series] - before[host][series]

    # 5 echo requests h1 → h2 and 5 replies back; 84 bytes each (IP 20 + ICMP 8 + 56)
    for host in ("h1", "h2"):
        for direction in ("egress", "ingress"):
            assert delta(host, fwd % ("packets", direction)) == pings, (host, direction)
            assert delta(host, fwd % ("bytes", direction)) == pings * 84, (host, direction)

    # a pod address in the Network that no lease covers: no route, dropped on the way out
    drop = 'pyflanneld_udp_dropped_%s_total{direction="egress"}'
    d0 = scrape(h1)
    n1.pod.run("ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "10.5.250.9", check=False)
    m = wait_metric(h1, drop % "packets", lambda v: v >= d0[drop % "packets"] + 2, "2 packets dropped")
    assert m[drop % "bytes"] - d0[drop % "bytes"] >= 2 * 84
    assert m[fwd % ("packets", "egress")] == d0[fwd % ("packets", "egress")]


# --- no lab: the text format, the histogram's clock, the worker counters, the docs -----------------

def test_text_format_is_what_prometheus_client_writes():
    from prometheus_client.exposition import generate_latest

    metrics.LEASE_RENEWALS.inc()
    metrics.DATASTORE_ERRORS.labels("renew").inc(2)
    metrics.KERNEL_REPAIRS.labels("fdb").inc()
    metrics.PEER_PROGRAMMING.observe(0.0042)
    state = metrics.State(ready=True, backend="vxlan", peers=3, subnet="10.5.7.0/24", public_ip='a"b\\c\nd',
                          lease_expiry_s=1.7e9 + 0.25)
    fwd = {"udp_tx": 5, "tx_bytes": 420, "tun_tx": 4, "rx_bytes": 336, "tx_drop": 1, "tx_drop_bytes": 84}
    families = [*metrics.REGISTRY.collect(), *metrics.state_families(state), *metrics.forwarder_families(fwd)]

    class Families:
        def collect(self):
            return families

    ours = metrics.render(state, fwd)
    assert ours == metrics.text_format(families) == generate_latest(Families())
    got = parse(ours.decode())
    assert got['pyflanneld_lease_info{backend="vxlan",public_ip="a"b\\c\nd",subnet="10.5.7.0/24"}'] == 1
    assert got['pyflanneld_udp_forwarded_bytes_total{direction="egress"}'] == 420
    assert got['pyflanneld_udp_dropped_packets_total{direction="ingress"}'] == 0


def test_every_series_of_the_issue_is_exported():
    names = {fam.name for fam in text_string_to_metric_families(
        metrics.render(metrics.State(ready=False), {"udp_tx": 0}).decode())}
    assert names == {
        "pyflanneld_ready", "pyflanneld_peers", "pyflanneld_lease_info", "pyflanneld_lease_expiry_timestamp_seconds",
        "pyflanneld_lease_renewals", "pyflanneld_datastore_errors", "pyflanneld_watch_reconnects",
        "pyflanneld_kernel_repairs", "pyflanneld_leases_rejected", "pyflanneld_peer_programming_seconds",
        "pyflanneld_udp_forwarded_packets", "pyflanneld_udp_forwarded_bytes", "pyflanneld_udp_dropped_packets",
        "pyflanneld_udp_dropped_bytes"}  # the parser names counter families without _total
    # without a forwarder (kernel backends) no udp series; without a lease no lease series
    text = metrics.render(metrics.State(ready=False)).decode()
    assert "pyflanneld_udp" not in text and "\npyflanneld_lease_info{" not in text
    assert "\npyflanneld_lease_expiry_timestamp_seconds " not in text and "\npyflanneld_ready 0.0\n" in text


def test_programming_clock_times_each_lease_from_its_first_event():
    def sample(suffix: str) -> float:
        return metrics.REGISTRY.get_sample_value(f"pyflanneld_peer_programming_seconds_{suffix}")

    clock = metrics.ProgrammingClock()
    count0 = sample("count")
    clock.arrived("10.5.1.0-24")
    time.sleep(0.02)
    clock.arrived("10.5.1.0-24")  # a second event before the batch: timed from the first
    clock.arrived("10.5.2.0-24")  # its lease is rejected: never programmed, dropped with the batch
    arrived = clock.take()
    assert clock.take() == {}
    clock.arrived("10.5.3.0-24")  # arrives during the batch: belongs to the next one
    sum0 = sample("sum")
    clock.programmed(arrived, ["10.5.1.0-24", "10.5.9.0-24"])  # 10.5.9.0-24: from a relist, no event
    assert sample("count") == count0 + 1
    assert 0.02 <= sample("sum") - sum0 < 5
    assert list(clock.take()) == ["10.5.3.0-24"]


PING = bytes.fromhex("4500005400004000400100000a050102" "0a050202") + b"\x08\x00" + bytes(62)


def _ipv4(ttl: int = 64, dst: str = "10.5.2.2") -> bytes:
    p = bytearray(PING)
    p[8] = ttl
    p[16:20] = socket.inet_aton(dst)
    p[10:12] = b"\0\0"
    s = sum(struct.unpack("!10H", bytes(p[:20])))
    s = (s & 0xFFFF) + (s >> 16)
    p[10:12] = struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    return bytes(p)


@pytest.mark.parametrize("offload", [False, True])
def test_worker_counts_forwarded_and_dropped_per_direction(offload):
    """A worker on a socketpair standing in for the TUN, with loopback UDP sockets: 3 packets out
    (one sent alone, two with sendmmsg), 3 dropped (TTL, no route, not IPv4); 2 in, 1 dropped."""
    from pyflanneld.udpfwd.worker import Worker, open_udp_socket

    if offload:
        from pyflanneld.udpfwd.offload import OffloadWorker as cls
    else:
        cls = Worker
    hdr = bytes(10) if offload else b""  # the virtio-net header on the TUN side
    tun_w, tun_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctl_w, ctl_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock, sink, src = open_udp_socket("127.0.0.1", 0), socket.socket(socket.AF_INET, socket.SOCK_DGRAM), \
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(2)
    try:
        tun_w.setblocking(False)
        sock.setblocking(False)
        w = cls(tun_fd=tun_w.fileno(), sock=sock, ctl_fd=ctl_w.fileno(), tun_ip=0x0A050100, mtu=1472)
        w.routes.set(0x0A050200, 24, w._next_hop(0x7F000001, sink.getsockname()[1]))
        for pkt in (_ipv4(), _ipv4(), _ipv4(), _ipv4(ttl=1), _ipv4(dst="10.5.9.9"), b"\x60" + bytes(47)):
            tun_peer.send(hdr + pkt)
        w.tun_to_udp()
        assert [len(sink.recv(2048)) for _ in range(3)] == [84] * 3
        st = w.stats.as_dict()
        assert (st["udp_tx"], st["tx_bytes"], st["tx_drop"], st["tx_drop_bytes"]) == (3, 252, 3, 84 + 84 + 48)

        for pkt in (_ipv4(), _ipv4(ttl=1), _ipv4()):
            src.sendto(pkt, sock.getsockname())
        wait_for(lambda: (w.udp_to_tun(), w.stats.tun_tx + w.stats.rx_drop >= 3)[1], timeout=5, what="3 datagrams")
        st = w.stats.as_dict()
        assert (st["tun_tx"], st["rx_bytes"], st["rx_drop"], st["rx_drop_bytes"]) == (2, 168, 1, 84)
    finally:
        for s in (tun_w, tun_peer, ctl_w, ctl_peer, sock, sink, src):
            s.close()


def test_batch_op_entry_kinds():
    from ipaddress import IPv4Address

    from pyflanneld.netlink import BatchOp, Route

    ip, mac, r = IPv4Address("10.5.1.0"), "02:00:00:00:00:01", Route(IPv4Network("10.5.1.0/24"),
                                                                      IPv4Address("192.168.100.2"), 3)
    assert [op.entry for op in (BatchOp.replace_neighbour(3, ip, mac), BatchOp.delete_neighbour(3, ip),
                                BatchOp.replace_fdb(3, mac, ip), BatchOp.delete_fdb(3, mac, None),
                                BatchOp.replace_route(r), BatchOp.delete_route(r))] == \
        ["neigh", "neigh", "fdb", "fdb", "route", "route"]


PROMTOOL = ROOT / ".venv" / "bin" / "promtool"  # make setup takes it out of Debian's prometheus package

ALERT_TESTS = """
rule_files: [%(rules)s]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'pyflanneld_ready{instance="n1:8471",job="pyflanneld"}'
        values: '1 1 0x20'
      - series: 'pyflanneld_lease_expiry_timestamp_seconds{instance="n1:8471",job="pyflanneld"}'
        values: '5000x60'
      - series: 'pyflanneld_lease_renewals_total{instance="n1:8471",job="pyflanneld"}'
        values: '0x60'
      - series: 'pyflanneld_lease_expiry_timestamp_seconds{instance="n2:8471",job="pyflanneld"}'
        values: '100000x60'
      - series: 'pyflanneld_datastore_errors_total{instance="n2:8471",job="pyflanneld",op="renew"}'
        values: '0 1+1x59'
      - series: 'pyflanneld_lease_renewals_total{instance="n2:8471",job="pyflanneld"}'
        values: '3x60'
    alert_rule_test:
      - {eval_time: 6m, alertname: PyflanneldNotReady, exp_alerts: []}
      - eval_time: 8m
        alertname: PyflanneldNotReady
        exp_alerts:
          - exp_labels: {severity: critical, instance: "n1:8471", job: pyflanneld}
            exp_annotations:
              summary: "pyflanneld on n1:8471 not ready for 5 minutes"
              description: "curl http://n1:8471/readyz names the first readiness fact that does not hold."
      - {eval_time: 5m, alertname: PyflanneldLeaseRenewalFailing, exp_alerts: []}
      - eval_time: 15m
        alertname: PyflanneldLeaseRenewalFailing
        exp_alerts:
          - exp_labels: {severity: critical, instance: "n2:8471", job: pyflanneld, op: renew}
            exp_annotations: &renewal
              summary: "pyflanneld on n2:8471 cannot renew its subnet lease"
              description: "The lease expires in less than an hour or renewals have failed for 10 minutes; check the etcd endpoints and credentials (the daemon's log says which request failed)."
      - eval_time: 40m
        alertname: PyflanneldLeaseRenewalFailing
        exp_alerts:
          - exp_labels: {severity: critical, instance: "n1:8471", job: pyflanneld}
            exp_annotations:
              summary: "pyflanneld on n1:8471 cannot renew its subnet lease"
              description: "The lease expires in less than an hour or renewals have failed for 10 minutes; check the etcd endpoints and credentials (the daemon's log says which request failed)."
          - exp_labels: {severity: critical, instance: "n2:8471", job: pyflanneld, op: renew}
            exp_annotations: *renewal
"""


def test_prometheus_docs(tmp_path):
    """docs/prometheus.yml (scrape config) and docs/pyflanneld-alerts.yml (rules): promtool accepts
    them, the alerts fire when they should (promtool's rule unit tests: not ready for 5 minutes;
    a lease about to expire; renewals failing for 10 minutes), and every series they use is one
    pyflanneld exports."""
    config_file, rules_file = ROOT / "docs" / "prometheus.yml", ROOT / "docs" / "pyflanneld-alerts.yml"
    for args in (["check", "config", str(config_file)], ["check", "rules", str(rules_file)]):
        cp = subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0 and "SUCCESS" in cp.stdout, cp.stdout + cp.stderr
    unit = tmp_path / "alerts.test.yml"
    unit.write_text(ALERT_TESTS % {"rules": json.dumps(str(rules_file))})
    cp = subprocess.run([str(PROMTOOL), "test", "rules", str(unit)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and "SUCCESS" in cp.stdout, cp.stdout + cp.stderr

    job = yaml.safe_load(config_file.read_text())["scrape_configs"][0]
    assert (job["job_name"], job["metrics_path"]) == ("pyflanneld", "/metrics")
    exported = {re.sub(r"\{.*", "", s) for s in parse(metrics.render(
        metrics.State(ready=True, backend="vxlan", subnet="10.5.1.0/24", public_ip="1.2.3.4", lease_expiry_s=1.0),
        {"udp_tx": 0}).decode())}
    for rule in yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]:
        used = set(re.findall(r"pyflanneld_\w+", rule["expr"]))
        assert used and used <= exported, used - exported
