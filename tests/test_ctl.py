"""`pyflanneld config|leases|lease`: the operator commands against a real etcd, over v3 and v2.

Each command runs as an operator would run it: the installed `pyflanneld` in a lab host's namespace,
with the daemon's etcd flags (or FLANNELD_* variables); what it did is read back from etcd with
etcdctl/curl, and what it printed is parsed (PyYAML for -o yaml)."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Network

import pytest
import yaml
from helpers import key_of, one_line_error, subnet_of, upstream_or_skip, wait_config_rechecks, wait_for

from lab.cluster import pyflanneld_argv, start_daemon
from lab.etcd import EtcdServer, make_tls_certs

PREFIX = "/coreos.com/network"
APIS = ["v3", "v2"]
ALLOC = '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}'
VXLAN = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'


# -- helpers: run the command, read etcd back ---------------------------------------------------------
def ctl(host, etcd, *args, api: str | None = None, env: dict | None = None, input: str | None = None):
    """Run `pyflanneld <args> --etcd-endpoints <etcd> [--etcd-api api]` in host's namespace."""
    argv = [*pyflanneld_argv(), *map(str, args)]
    if etcd is not None:
        argv += ["--etcd-endpoints", etcd.endpoint]
    if api:
        argv += ["--etcd-api", api]
    cp = host.run(*argv, check=False, env=env, input=input, timeout=60)
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp


def put_raw(etcd: EtcdServer, api: str, key: str, value: str, ttl: int | None = None) -> None:
    if api == "v2":
        etcd.v2_put(key, value, ttl=ttl)
    else:
        etcd.put(key, value, ttl=ttl)


def get_raw(etcd: EtcdServer, api: str, key: str) -> str | None:
    return etcd.v2_get(key) if api == "v2" else etcd.get(key)


def key_ttl(etcd: EtcdServer, api: str, key: str) -> int | None:
    """Seconds left on an existing key's TTL; None when it has none (a reservation)."""
    if api == "v2":
        node = json.loads(etcd.curl(f"/v2/keys{key}").stdout)["node"]
        return node.get("ttl")
    kvs = json.loads(etcd.etcdctl("get", "-w", "json", "--", key))["kvs"]
    lease = kvs[0].get("lease")
    if not lease:
        return None
    return json.loads(etcd.etcdctl("lease", "timetolive", format(lease, "x"), "-w", "json"))["ttl"]


def store_index(etcd: EtcdServer, api: str) -> int:
    """The revision (v3) or X-Etcd-Index (v2): any write moves it."""
    if api == "v3":
        return etcd.revision()
    head = etcd.curl("/v2/keys/", "-s", "-D", "-", "-o", "/dev/null").stdout
    return int(re.search(r"X-Etcd-Index: (\d+)", head, re.I).group(1))


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_config_set_from_yaml_get_back_and_a_daemon_uses_it(lab, etcd, api, tmp_path):
    h1 = lab.add_host("h1")
    f = tmp_path / "network.yaml"
    f.write_text("# the cluster network\nNetwork: 10.1.0.0/16\nSubnetLen: 26\nBackend:\n  Type: alloc\n")
    cp = ctl(h1, etcd, "config", "set", "-f", f, api=api)
    assert cp.returncode == 0, cp.stderr
    want = '{"Network":"10.1.0.0/16","SubnetLen":26,"Backend":{"Type":"alloc"}}'
    assert get_raw(etcd, api, f"{PREFIX}/config") == want  # upstream's JSON, not YAML
    assert get_raw(etcd, "v2" if api == "v3" else "v3", f"{PREFIX}/config") is None  # only where asked
    assert f"wrote {PREFIX}/config (etcd {api})" in cp.stdout

    # get: as stored; -o yaml parses back to the same document; auto finds the API holding it
    assert ctl(h1, etcd, "config", "get", api=api).stdout == want + "\n"
    cp = ctl(h1, etcd, "config", "get", "-o", "yaml")
    assert cp.returncode == 0 and yaml.safe_load(cp.stdout) == json.loads(want)

    # setting the same again writes nothing
    before = store_index(etcd, api)
    cp = ctl(h1, etcd, "config", "set", "-f", "-", api=api, input=f.read_text())
    assert cp.returncode == 0 and cp.stdout.startswith("unchanged:"), cp.stdout
    assert store_index(etcd, api) == before

    # the daemon takes a /26 from it
    d = start_daemon(h1, "--iface", "eth0", "--etcd-api", api)
    sn = subnet_of(d.wait_subnet_env(timeout=30))
    assert sn.prefixlen == 26 and sn.subnet_of(IPv4Network("10.1.0.0/16"))


BAD_FILES = {
    "parser": ("Network: 10.1.0.0/16\nSubnetLen: 31\n", "SubnetLen must be less than /31"),
    "backend": ("Network: 10.1.0.0/16\nBackend: {Type: nope}\n", "unknown backend type: nope"),
    "yaml syntax": ("Network: [10.1.0.0/16\n", "invalid YAML"),
    "yaml date": ("Network: 10.1.0.0/16\nBackend:\n  Type: alloc\n  Since: 2024-01-01\n", "date/time"),
    "json syntax": ('{"Network": "10.1.0.0/16",}', "invalid JSON"),  # valid YAML, but a .json file
}


@pytest.mark.parametrize("api", APIS)
def test_rejected_config_file_leaves_etcd_unchanged(lab, etcd, api, tmp_path):
    put_raw(etcd, api, f"{PREFIX}/config", ALLOC)
    h1 = lab.add_host("h1")
    before = store_index(etcd, api)
    for name, (text, fragment) in BAD_FILES.items():
        f = tmp_path / f"{name.replace(' ', '-')}.{name.split()[0] if 'syntax' in name else 'yaml'}"
        f.write_text(text)
        for line in (one_line_error(ctl(h1, None, "config", "validate", "-f", f)),  # offline
                     one_line_error(ctl(h1, etcd, "config", "set", "-f", f, api=api))):
            assert fragment in line and str(f) in line, (name, line)
        if f.suffix == ".yaml":
            line = one_line_error(ctl(h1, etcd, "config", "set", "-f", "-", api=api, input=text))
            assert fragment in line and "stdin" in line, (name, line)
    assert get_raw(etcd, api, f"{PREFIX}/config") == ALLOC
    assert store_index(etcd, api) == before  # nothing at all was written


def test_config_get_without_config_and_with_an_invalid_one(lab, etcd):
    h1 = lab.add_host("h1")
    line = one_line_error(ctl(h1, etcd, "config", "get"))
    assert f"network config not found at {PREFIX}/config" in line and "pyflanneld config set" in line
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","SubnetLen":31}')
    cp = ctl(h1, etcd, "config", "get")
    assert cp.stdout == '{"Network":"10.1.0.0/16","SubnetLen":31}\n'  # shown, and flagged
    assert "SubnetLen must be less than /31" in one_line_error(cp)
    deep = '{"a":' * 20_000 + "1" + "}" * 20_000  # a hostile value: Python's json recurses on it
    etcd.put(f"{PREFIX}/config", deep)
    for output in ("json", "yaml"):
        assert "nested more than 100 deep" in one_line_error(ctl(h1, etcd, "config", "get", "-o", output))


# -- leases --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_leases_shows_what_the_daemons_hold(lab, etcd, api):
    put_raw(etcd, api, f"{PREFIX}/config", VXLAN)
    hosts = [lab.add_host("h1"), lab.add_host("h2")]
    daemons = [start_daemon(h, "--iface", "eth0", "--etcd-api", api) for h in hosts]
    subnets = [subnet_of(d.wait_subnet_env(timeout=30)) for d in daemons]
    # a reservation for a host not started yet, and an entry no daemon can use
    put_raw(etcd, api, key_of("10.5.200.0/24"), '{"PublicIP":"192.168.100.77","PublicIPv6":null}')
    put_raw(etcd, api, f"{PREFIX}/subnets/garbage", "not a lease")

    cp = ctl(hosts[0], etcd, "leases", "-o", "yaml", api=api)
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr
    rows = yaml.safe_load(cp.stdout)
    assert [r["key"] for r in rows] == sorted((f"{sn.network_address}-{sn.prefixlen}" for sn in subnets),
                                              key=lambda k: IPv4Network(k.replace("-", "/"))) + [
        "10.5.200.0-24", "garbage"]
    by_subnet = {r["subnet"]: r for r in rows}
    for h, sn in zip(hosts, subnets, strict=True):
        r = by_subnet[str(sn)]
        mac = h.ip_json("link", "show", "flannel.1")[0]["address"]
        assert (r["public_ip"], r["backend"], r["vtep_mac"], r["reserved"], r["error"]) == (
            h.address, "vxlan", mac, False, None)
        assert 24 * 3600 - 300 < r["ttl_s"] <= 24 * 3600, r
        assert r["backend_data"]["VtepMAC"] == mac
    r = by_subnet["10.5.200.0/24"]
    assert (r["public_ip"], r["backend"], r["ttl_s"], r["reserved"]) == ("192.168.100.77", None, None, True)
    bad = rows[-1]
    assert bad["subnet"] is None and "not a subnet key" in bad["error"]

    # JSON is the same records; --etcd-api auto finds the API that holds the config
    records = json.loads(ctl(hosts[0], etcd, "leases", "-o", "json").stdout)
    assert [{k: v for k, v in r.items() if k != "ttl_s"} for r in records] == [
        {k: v for k, v in r.items() if k != "ttl_s"} for r in rows]

    # the table: one aligned line per key, TTL human-readable
    table = ctl(hosts[0], etcd, "leases", api=api).stdout.splitlines()
    assert table[0].split() == ["SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "TTL", "PROBLEM"]
    for (sn, h), line in zip(sorted(zip(subnets, hosts, strict=True)), table[1:3], strict=True):
        mac = h.ip_json("link", "show", "flannel.1")[0]["address"]
        assert re.fullmatch(rf"{sn}\s+{h.address}\s+vxlan\s+{mac}\s+(24h|23h(\d+m)?(\d+s)?)", line), line
    assert re.fullmatch(r"10\.5\.200\.0/24\s+192\.168\.100\.77\s+-\s+-\s+reserved", table[3]), table[3]
    assert table[4].startswith("garbage") and "not a subnet key" in table[4]


# -- reservations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_reserve_and_release(lab, etcd, api):
    put_raw(etcd, api, f"{PREFIX}/config", ALLOC)
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    d1 = start_daemon(h1, "--iface", "eth0", "--etcd-api", api)
    sn1 = subnet_of(d1.wait_subnet_env(timeout=30))
    k1 = key_of(sn1)
    value1 = get_raw(etcd, api, k1)
    assert key_ttl(etcd, api, k1) > 0  # an ordinary lease

    # another host may not take it: refused, unchanged
    line = one_line_error(ctl(h2, etcd, "lease", "reserve", sn1, "--public-ip", h2.address, api=api))
    assert f"{sn1} is leased to {h1.address}" in line
    assert get_raw(etcd, api, k1) == value1 and key_ttl(etcd, api, k1) > 0

    # reserved for its own host: the same value, without TTL (upstream's procedure)
    cp = ctl(h2, etcd, "lease", "reserve", sn1, "--public-ip", h1.address, api=api)
    assert cp.returncode == 0 and cp.stdout.startswith("reserved"), cp.stderr
    assert get_raw(etcd, api, k1) == value1 and key_ttl(etcd, api, k1) is None
    cp = ctl(h2, etcd, "lease", "reserve", f"{sn1.network_address}-{sn1.prefixlen}", "--public-ip", h1.address,
             api=api)
    assert cp.returncode == 0 and cp.stdout.startswith("already reserved")

    # the host, restarted without its subnet.env, takes the reservation and leaves it without TTL
    d1.stop()
    d1.subnet_file.unlink()
    d1 = d1.restart()
    assert subnet_of(d1.wait_subnet_env(timeout=30)) == sn1
    assert key_ttl(etcd, api, k1) is None

    # a free subnet reserved for a host not started yet: that host takes it when it starts
    free = IPv4Network("10.1.200.0/24") if sn1 != IPv4Network("10.1.200.0/24") else IPv4Network("10.1.201.0/24")
    cp = ctl(h1, etcd, "lease", "reserve", free, "--public-ip", h2.address, api=api)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(get_raw(etcd, api, key_of(free))) == {"PublicIP": h2.address, "PublicIPv6": None}
    d2 = start_daemon(h2, "--iface", "eth0", "--etcd-api", api)
    assert subnet_of(d2.wait_subnet_env(timeout=30)) == free
    assert key_ttl(etcd, api, key_of(free)) is None

    # refusals write nothing; bad usage is exit 2
    before = store_index(etcd, api)
    line = one_line_error(ctl(h1, etcd, "lease", "reserve", "10.99.0.0/24", "--public-ip", h2.address, api=api))
    assert "not a subnet of this network (10.1.0.0/16" in line
    line = one_line_error(ctl(h1, etcd, "lease", "reserve", "10.1.5.7/24", "--public-ip", h2.address, api=api), 2)
    assert "did you mean 10.1.5.0/24" in line and "pyflanneld lease reserve --help" in line
    one_line_error(ctl(h1, etcd, "lease", "reserve", "10.1.5.0/24", "--public-ip", "10.0.0.1/24", api=api), 2)
    assert store_index(etcd, api) == before

    # release: a lease with the TTL asked for again (same value), or deleted. The host is stopped
    # first: a running one renews at once with its own TTL (see the next test).
    d1.stop()
    cp = ctl(h1, etcd, "lease", "release", sn1, "--ttl", "1h", api=api)
    assert cp.returncode == 0, cp.stderr
    assert get_raw(etcd, api, k1) == value1 and 3600 - 60 < key_ttl(etcd, api, k1) <= 3600
    line = one_line_error(ctl(h1, etcd, "lease", "release", sn1, api=api))
    assert "not a reservation" in line and 3600 - 60 < key_ttl(etcd, api, k1) <= 3600
    d2.stop()
    cp = ctl(h1, etcd, "lease", "release", free, "--delete", api=api)
    assert cp.returncode == 0 and get_raw(etcd, api, key_of(free)) is None
    assert "no lease or reservation for 10.1.250.0/24" in one_line_error(
        ctl(h1, etcd, "lease", "release", "10.1.250.0/24", api=api))


def test_reserve_and_release_find_an_upstream_dual_stack_key(lab, etcd):
    """Upstream hosts with EnableIPv6 key their lease 10.1.7.0-24&fd80:0:0:7::-64: that IPv4 subnet is
    held (never reserved a second time under 10.1.7.0-24 for another host), and reserve/release act
    on that key in place."""
    put_raw(etcd, "v3", f"{PREFIX}/config", ALLOC)
    h1 = lab.add_host("h1")
    key = f"{PREFIX}/subnets/10.1.7.0-24&fd80:0:0:7::-64"
    value = json.dumps({"PublicIP": "192.168.100.7", "PublicIPv6": "fd00::7", "BackendType": "vxlan"})
    etcd.put(key, value, ttl=3600)
    line = one_line_error(ctl(h1, etcd, "lease", "reserve", "10.1.7.0/24", "--public-ip", "192.168.100.8"))
    assert "10.1.7.0/24 is leased to 192.168.100.7" in line, line
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {key: value}  # no second key for 10.1.7.0/24
    cp = ctl(h1, etcd, "lease", "reserve", "10.1.7.0/24", "--public-ip", "192.168.100.7")
    assert cp.returncode == 0 and key in cp.stdout, (cp.stdout, cp.stderr)
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {key: value} and key_ttl(etcd, "v3", key) is None
    cp = ctl(h1, etcd, "lease", "release", "10.1.7.0/24", "--ttl", "1h")
    assert cp.returncode == 0 and key in cp.stdout, (cp.stdout, cp.stderr)
    assert etcd.get(key) == value and 3600 - 60 < key_ttl(etcd, "v3", key) <= 3600


def test_reserve_ahead_is_refused_where_a_lease_needs_ipv6(lab, etcd):
    """A reservation made before its host starts carries no IPv6 subnet or PublicIPv6, which a
    dual-stack (or IPv6-only) host needs: refused with one line; reserving a lease in place works."""
    h1 = lab.add_host("h1")
    put_raw(etcd, "v3", f"{PREFIX}/config",
            '{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd80::/48","Backend":{"Type":"alloc"}}')
    line = one_line_error(ctl(h1, etcd, "lease", "reserve", "10.1.9.0/24", "--public-ip", "192.168.100.9"))
    assert "10.1.9.0/24 is free, but a reservation made ahead in a dual-stack network (EnableIPv6)" in line, line
    assert etcd.get_prefix(f"{PREFIX}/subnets/") == {}
    put_raw(etcd, "v3", f"{PREFIX}/config",
            '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd80::/48","Backend":{"Type":"alloc"}}')
    line = one_line_error(ctl(h1, etcd, "lease", "reserve", "10.1.9.0/24", "--public-ip", "192.168.100.9"))
    assert "this network is IPv6-only (EnableIPv4 false)" in line, line


@pytest.mark.parametrize("api", APIS)
def test_a_running_host_keeps_its_reservation_and_renews_once_released(lab, etcd, api):
    """Renewals every 5 s (TTL 20 s, margin 15 s): the daemon must stop them when its subnet is
    reserved (a renewal would give the key a TTL back) and take them up again when released."""
    put_raw(etcd, api, f"{PREFIX}/config", ALLOC)
    h1 = lab.add_host("h1")
    d1 = start_daemon(h1, "--iface", "eth0", "--etcd-api", api, "--subnet-lease-ttl", "20s",
                      "--subnet-lease-renew-margin", "15s", "-v", "1", env={"PYFLANNELD_CONFIG_RECHECK": "0.5"})
    sn1 = subnet_of(d1.wait_subnet_env(timeout=30))
    d1.wait_log(r"lease renewed", timeout=30)
    assert ctl(h1, etcd, "lease", "reserve", sn1, "--public-ip", h1.address, api=api).returncode == 0
    d1.wait_log(r"own lease is now a reservation", timeout=30)
    renewals = d1.log_text().count("lease renewed")
    wait_config_rechecks(d1, 14)  # 7 s of the daemon's time: past the next renewal (due 5 s after the last)
    assert key_ttl(etcd, api, key_of(sn1)) is None
    assert d1.log_text().count("lease renewed") == renewals

    assert ctl(h1, etcd, "lease", "release", sn1, "--ttl", "1h", api=api).returncode == 0
    d1.wait_log(r"own reservation released", timeout=30)
    wait_for(lambda: d1.log_text().count("lease renewed") > renewals,
             30, "a renewal after the release", interval=0.1)
    assert 0 < key_ttl(etcd, api, key_of(sn1)) <= 20  # the daemon's own TTL again
    assert d1.alive and subnet_of(d1.subnet_env()) == sn1


# -- connection: TLS, auth, variables, Go-style flags, failures --------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_mutual_tls(lab, api, tmp_path):
    files = make_tls_certs(lab.tmp / "pki")
    etcd = EtcdServer(lab, tls=files, client_cert_auth=True).start()
    h1 = lab.add_host("h1")
    tls = ["--etcd-cafile", files.ca, "--etcd-certfile", files.client_cert, "--etcd-keyfile", files.client_key]
    f = tmp_path / "net.json"
    f.write_text(ALLOC)
    assert ctl(h1, etcd, "config", "set", "-f", f, *tls, api=api).returncode == 0
    assert get_raw(etcd, api, f"{PREFIX}/config") == ALLOC
    assert ctl(h1, etcd, "config", "get", *tls, api=api).stdout == ALLOC + "\n"
    cp = ctl(h1, etcd, "leases", *tls, api=api)
    assert cp.returncode == 0 and cp.stdout == f"no leases under {PREFIX}/subnets/ (etcd {api})\n"
    line = one_line_error(ctl(h1, etcd, "leases", "--etcd-cafile", files.ca, api=api))
    assert "--etcd-certfile" in line, line  # names what to set


def test_auth_and_endpoints_from_the_daemon_variables_go_style_flags(lab):
    etcd = EtcdServer(lab).start()
    etcd.enable_auth(user="flannel", password="pw-51c7")
    etcd.put(f"{PREFIX}/config", ALLOC)
    h1 = lab.add_host("h1")
    env = {"FLANNELD_ETCD_ENDPOINTS": etcd.endpoint, "FLANNELD_ETCD_USERNAME": "flannel",
           "FLANNELD_ETCD_PASSWORD": "pw-51c7"}
    cp = ctl(h1, None, "config", "get", f"-etcd-prefix={PREFIX}", "-etcd-api", "v3", env=env)
    assert cp.returncode == 0 and cp.stdout == ALLOC + "\n", cp.stderr
    line = one_line_error(ctl(h1, None, "config", "get", env=dict(env, FLANNELD_ETCD_PASSWORD="wrong-pw")))
    assert "--etcd-password" in line and "wrong-pw" not in line


@pytest.mark.parametrize("api", APIS)
def test_upstream_flanneld_reads_the_config_set_and_its_lease_is_listed(lab, etcd, api, tmp_path):
    binary = upstream_or_skip("v0.20.2" if api == "v3" else "v0.17.0")
    h1 = lab.add_host("h1")
    f = tmp_path / "net.yaml"
    f.write_text("Network: 10.5.0.0/16\nBackend:\n  Type: vxlan\n")
    assert ctl(h1, etcd, "config", "set", "-f", f, api=api).returncode == 0
    d = start_daemon(h1, "--iface", "eth0", binary=binary)
    sn = subnet_of(d.wait_subnet_env(timeout=30))
    rows = yaml.safe_load(ctl(h1, etcd, "leases", "-o", "yaml", api=api).stdout)
    mac = h1.ip_json("link", "show", "flannel.1")[0]["address"]
    assert [(r["subnet"], r["public_ip"], r["backend"], r["vtep_mac"], r["reserved"]) for r in rows] == [
        (str(sn), h1.address, "vxlan", mac, False)]
    assert 24 * 3600 - 300 < rows[0]["ttl_s"] <= 24 * 3600
