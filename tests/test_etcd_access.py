"""How the daemon reaches etcd when the path or the setup is not the lab's happy one: a silent
partition, an auth token that expires, a 6 s round trip, a v2 prefix without a leading slash, a
v2 API that etcd does not serve, credentials inside the endpoint URL. Real etcd, real namespaces;
each test asserts what an operator sees (/readyz, /peers, keys in etcd, log lines)."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest
from helpers import (
    http_get,
    key_of,
    subnet_of,
    upstream_or_skip,
    wait_config_rechecks,
    wait_config_retries,
    wait_for,
)

from lab.cluster import start_daemon
from lab.etcd import EtcdServer

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
ALLOC = '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}'
HZ = 8470
PASSWORD = "s3cr3t-Url-Pw-7e2a"  # unique: any occurrence in a log or an answer is a leak


def put_config(etcd, api: str, value: str = ALLOC, prefix: str = PREFIX) -> None:
    if api == "v2":
        etcd.v2_put(f"{prefix}/config", value)
    else:
        etcd.put(f"{prefix}/config", value)


def peers_of(host) -> set[str]:
    code, body = http_get(host, HZ, "/peers")
    return {p["subnet"] for p in json.loads(body)} if code == 200 else set()


def lines(d, level: str) -> list[str]:
    return [ln for ln in d.log_text().splitlines() if f"level={level}" in ln]


def no_traceback(d) -> None:
    assert "Traceback" not in d.log_text(), d.log_text()[-3000:]


# -- 9.11: a silent partition (packets dropped, no RST) ----------------------------------------------
@pytest.mark.parametrize("api", ["v2", "v3"])
def test_silent_partition_is_noticed_and_a_relist_catches_up(lab, etcd, api):
    put_config(etcd, api)
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-api", api, "--healthz-port", str(HZ))
    sn = subnet_of(d.wait_subnet_env(timeout=30))
    d.wait_log("peer leases listed", timeout=30)
    wait_for(lambda: http_get(h1, HZ, "/readyz")[0] == 200, 30, "ready", interval=0.2)
    peer = "10.1.200.0/24"
    with etcd.partitioned(h1):
        # keepalives (TCP for v2's long poll, gRPC for v3) find the path dead: /readyz says so
        wait_for(lambda: http_get(h1, HZ, "/readyz")[0] == 503,
                 45, "/readyz 503 during the partition", interval=0.5)
        body = http_get(h1, HZ, "/readyz")[1]
        assert "datastore unreachable" in body and f"etcd {api} API at" in body, body
        # meanwhile etcd restarts (forgetting every connection) and a host joins: nothing will
        # ever arrive on the connection the watch had
        etcd.kill()
        etcd.restart()
        value = json.dumps({"PublicIP": "192.168.100.200", "BackendType": "alloc"})
        if api == "v2":
            etcd.v2_put(key_of(peer), value, ttl=600)
        else:
            etcd.put(key_of(peer), value)
    # healed: the watch reconnects and lists again, so the host that joined meanwhile is seen
    wait_for(lambda: peers_of(h1) == {peer}, 60, "the peer that joined during the partition", interval=0.5)
    wait_for(lambda: http_get(h1, HZ, "/readyz")[0] == 200, 30, "ready again", interval=0.5)
    assert (etcd.v2_get(key_of(sn)) if api == "v2" else etcd.get(key_of(sn))) is not None
    assert d.alive
    no_traceback(d)


# -- 9.11: the v3 auth token expires ----------------------------------------------------------------
def test_expired_auth_token_is_renewed_transparently(lab):
    # tokens unused for 2 s expire: every renewal (each 4 s) and the relists meet an expired one
    etcd = EtcdServer(lab, auth_token_ttl=2).start()
    etcd.enable_auth(user="flannel", password=PASSWORD)
    etcd.put(f"{PREFIX}/config", ALLOC)
    env = {"FLANNELD_ETCD_USERNAME": "flannel", "FLANNELD_ETCD_PASSWORD": PASSWORD}
    short = ("--subnet-lease-ttl", "8s", "--subnet-lease-renew-margin", "4s")
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    d1 = start_daemon(h1, "--healthz-port", str(HZ), *short, env=env)
    sn1 = subnet_of(d1.wait_subnet_env(timeout=30))
    wait_for(lambda: d1.log_text().count("lease renewed") >= 2, 30, "two renewals", interval=0.2)
    # the watch is not stuck: a host joining now is seen (its stream was opened with the old token)
    d2 = start_daemon(h2, "--healthz-port", str(HZ), *short, env=env)
    sn2 = subnet_of(d2.wait_subnet_env(timeout=30))
    wait_for(lambda: peers_of(h1) == {str(sn2)}, 30, "h1 sees h2", interval=0.2)
    wait_for(lambda: peers_of(h2) == {str(sn1)}, 30, "h2 sees h1", interval=0.2)
    wait_for(lambda: d2.log_text().count("lease renewed") >= 2, 30, "h2 renews too", interval=0.2)
    assert http_get(h1, HZ, "/readyz")[0] == 200 and http_get(h2, HZ, "/readyz")[0] == 200
    for d in (d1, d2):
        assert "etcd auth token expired; authenticated again" in d.log_text()
        assert lines(d, "warning") == [] and lines(d, "error") == [], lines(d, "warning") + lines(d, "error")
        assert d.alive and PASSWORD not in d.log_text()
        no_traceback(d)
    assert json.loads(etcd.get(key_of(sn1)))["PublicIP"] == h1.address


# -- 9.12: a 6 s round trip to etcd --------------------------------------------------------------------
def test_six_second_round_trip_still_starts_and_every_error_names_its_api(lab, etcd):
    put_config(etcd, "v3")
    h1 = lab.add_host("h1")
    slow = etcd.slow_endpoint(6.0)
    # --etcd-api auto: v3, then v2; -v 1 and a config re-check every 5 s: requests over the link
    d = start_daemon(h1, "--etcd-endpoints", slow, "--healthz-port", str(HZ), "-v", "1",
                     env={"PYFLANNELD_CONFIG_RECHECK": "5"})
    sn = subnet_of(d.wait_subnet_env(timeout=180))
    assert json.loads(etcd.get(key_of(sn)))["PublicIP"] == h1.address
    # it stays up on that link: the watch (gRPC keepalive pings every 10 s, answered after 6 s) holds
    # while three re-checks go over the link (> 30 s), and then still delivers an event
    d.wait_log("peer leases listed", timeout=60)
    since = len(d.log_text())
    wait_config_rechecks(d, 3, timeout=180)
    peer = "10.1.250.0/24"
    etcd.put(key_of(peer), '{"PublicIP":"192.168.100.250","PublicIPv6":null}')
    wait_for(lambda: peers_of(h1) == {peer}, 60, "the new lease through the watch")
    later = d.log_text()[since:]
    assert "watch failed" not in later and "peer leases listed" not in later, later  # no reconnect, no relist
    assert http_get(h1, HZ, "/readyz")[0] == 200
    text = d.log_text()
    assert "ReadTimeout" not in text
    assert re.search(r'level=warning event="no answer from etcd in time; allowing longer per request from now on" '
                     r'api=v3 .*timeout_s=10', text), text[-3000:]
    for ln in lines(d, "error"):  # what was said before it adapted: each failure names its API
        assert "etcd v3 API at" in ln, ln
        for part in re.findall(r"no answer within \d+s", ln):
            assert re.search(rf"etcd v[23] API at \S+: {part}", ln), ln
    assert d.alive
    no_traceback(d)


# -- 10.9: a v2 prefix without a leading slash -------------------------------------------------------
def test_v2_prefix_without_leading_slash_reads_the_same_keys_as_upstream(lab, etcd):
    etcd.v2_put("/net/config", ALLOC)
    hosts = [lab.add_host(f"h{i}") for i in (1, 2, 3)]
    daemons = [start_daemon(h, "--etcd-api", "v2", "--etcd-prefix", p)
               for h, p in zip(hosts, ("net", "net/", "/net/"), strict=True)]
    subnets = [subnet_of(d.wait_subnet_env(timeout=30)) for d in daemons]
    assert len(set(subnets)) == 3
    for h, sn in zip(hosts, subnets, strict=True):
        assert json.loads(etcd.v2_get(key_of(sn, prefix="/net")))["PublicIP"] == h.address
    for d in daemons:
        assert lines(d, "error") == [] and d.alive


def test_v2_prefix_shared_with_upstream_v017(lab, etcd):
    up = upstream_or_skip("v0.17.0")
    etcd.v2_put("/net/config", ALLOC)
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    theirs = start_daemon(h1, "--etcd-prefix", "net", binary=up)
    ours = start_daemon(h2, "--etcd-api", "v2", "--etcd-prefix", "net", "--healthz-port", str(HZ))
    sn_theirs = subnet_of(theirs.wait_subnet_env(timeout=30))
    sn_ours = subnet_of(ours.wait_subnet_env(timeout=30))
    assert sn_theirs != sn_ours
    assert json.loads(etcd.v2_get(key_of(sn_theirs, prefix="/net")))["PublicIP"] == h1.address
    assert json.loads(etcd.v2_get(key_of(sn_ours, prefix="/net")))["PublicIP"] == h2.address
    wait_for(lambda: peers_of(h2) == {str(sn_theirs)}, 30, "ours sees upstream's lease", interval=0.2)


# -- 10.10: --etcd-api v2 on an etcd without v2 -------------------------------------------------------
def test_v2_api_on_an_etcd_without_v2_says_so(lab):
    etcd = lab.start_etcd(enable_v2=False)
    etcd.put(f"{PREFIX}/config", ALLOC)  # the config is there, in v3
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-api", "v2", "--healthz-port", str(HZ), "-v", "1")
    d.wait_log("level=error", timeout=30)
    wait_config_retries(d)
    errs = lines(d, "error")
    assert len(errs) == 1, errs
    assert "etcd v2 API at" in errs[0] and "--enable-v2=true" in errs[0] and "--etcd-api v3" in errs[0], errs[0]
    assert "etcdctl put" not in errs[0]  # not "create the config": it exists
    code, body = http_get(h1, HZ, "/readyz")
    assert code == 503 and "--enable-v2=true" in body
    assert d.alive and d.subnet_env() is None
    no_traceback(d)


# -- 11.4: credentials inside the endpoint URL --------------------------------------------------------
def test_password_in_the_endpoint_url_is_used_and_never_shown(lab):
    etcd = EtcdServer(lab).start()
    etcd.enable_auth(user="flannel", password=PASSWORD)
    etcd.put(f"{PREFIX}/config", ALLOC)
    with_creds = f"http://flannel:{quote(PASSWORD, safe='')}@{etcd.ip}:{etcd.client_port}"
    h1, h2, h3 = lab.add_host("h1"), lab.add_host("h2"), lab.add_host("h3")

    d1 = start_daemon(h1, "--etcd-endpoints", with_creds, "--healthz-port", str(HZ), "-v", "1")
    sn1 = subnet_of(d1.wait_subnet_env(timeout=30))
    assert json.loads(etcd.get(key_of(sn1)))["PublicIP"] == h1.address
    assert "flannel:***@" in d1.log_text()  # the start-up line says credentials are set, masked

    # a wrong password in the URL: refused, one line, the password nowhere (log, /readyz)
    wrong = PASSWORD[::-1]
    d2 = start_daemon(h2, "--etcd-endpoints", with_creds.replace(PASSWORD, wrong), "--healthz-port", str(HZ))
    d2.wait_log("level=error", timeout=30)
    code, body = http_get(h2, HZ, "/readyz")
    assert code == 503 and "refused the credentials" in body and wrong not in body
    # the URL and --etcd-username contradict each other: exit 1 with one line saying so
    d3 = start_daemon(h3, "--etcd-endpoints", with_creds, "--etcd-username", "admin")
    assert d3.wait_exit(timeout=15) == 1
    errs = lines(d3, "error")
    assert len(errs) == 1 and "--etcd-username" in errs[0] and "one place" in errs[0], errs

    # credentials in the URL of an etcd without authentication: ignored, as upstream does
    open_etcd = EtcdServer(lab, name="etcd1").start()
    open_etcd.put(f"{PREFIX}/config", ALLOC)
    h4 = lab.add_host("h4")
    d4 = start_daemon(h4, "--etcd-endpoints", f"http://flannel:{PASSWORD}@{open_etcd.ip}:{open_etcd.client_port}")
    sn4 = subnet_of(d4.wait_subnet_env(timeout=30))
    assert json.loads(open_etcd.get(key_of(sn4)))["PublicIP"] == h4.address

    for d in (d1, d2, d3, d4):
        assert PASSWORD not in d.log_text() and wrong not in d.log_text(), d.log_text()[-2000:]
        no_traceback(d)
    assert PASSWORD not in http_get(h1, HZ, "/peers")[1] + http_get(h1, HZ, "/readyz")[1]
    assert d1.alive and d2.alive and d4.alive
