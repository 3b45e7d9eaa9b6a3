"""etcd with mutual TLS and with user/password auth, over the v3 and the v2 API: the daemon works,
a wrong CA, a missing, expired or mismatched client certificate is one clear line naming the
problem (retried, the daemon stays up, gRPC's own raw log lines never appear), a key readable by
others is one warning, and the password never shows up in a log line or, given by environment, in
/proc/<pid>/cmdline."""

from __future__ import annotations

import json
import re
import shutil
import ssl
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from helpers import key_of, subnet_of, wait_config_retries, wait_for

from lab.cluster import start_daemon
from lab.etcd import DAY, EtcdServer, make_client_cert, make_tls_certs

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
ALLOC = '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}'
HZ = 8490


def peers_of(host) -> set[str]:
    cp = host.run("curl", "-s", "--max-time", "3", f"http://127.0.0.1:{HZ}/peers", check=False)
    return {p["subnet"] for p in json.loads(cp.stdout or "[]")}


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "level=error" in ln or "level=critical" in ln]


def foreign_lines(text: str) -> list[str]:
    """Lines that are not ours (structlog's logfmt), e.g. gRPC's raw `E1130 … ssl_transport_security…`."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("timestamp=")]


def tls_flags(files, ca: Path | None = None, client: bool = True) -> list[str]:
    a = ["--etcd-cafile", str(ca or files.ca)]
    if client:
        a += ["--etcd-certfile", str(files.client_cert), "--etcd-keyfile", str(files.client_key)]
    return a


def put_config(etcd: EtcdServer, api: str, value: str = ALLOC) -> None:
    if api == "v2":
        etcd.v2_put(f"{PREFIX}/config", value)
    else:
        etcd.put(f"{PREFIX}/config", value)


def lease_in_store(etcd: EtcdServer, api: str, sn: IPv4Network) -> dict | None:
    raw = etcd.v2_get(key_of(sn)) if api == "v2" else etcd.get(key_of(sn))
    return None if raw is None else json.loads(raw)


@pytest.fixture
def mtls(lab):
    files = make_tls_certs(lab.tmp / "pki")
    etcd = EtcdServer(lab, tls=files, client_cert_auth=True).start()
    return etcd, files


# -- mutual TLS -------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["v3", "v2"])
def test_mtls_leases_and_watch(lab, mtls, api):
    etcd, files = mtls
    assert etcd.endpoint.startswith("https://")
    put_config(etcd, api)
    hosts = [lab.add_host("h1"), lab.add_host("h2")]
    daemons = [start_daemon(h, "--etcd-api", api, "--healthz-port", str(HZ), *tls_flags(files)) for h in hosts]
    subnets = [subnet_of(d.wait_subnet_env(timeout=30)) for d in daemons]
    assert subnets[0] != subnets[1]
    for h, sn in zip(hosts, subnets, strict=True):
        assert lease_in_store(etcd, api, sn)["PublicIP"] == h.address
    # the watch runs over TLS too: each daemon sees the other
    wait_for(lambda: peers_of(hosts[0]) == {str(subnets[1])}, 30, "h1 sees h2", interval=0.1)
    wait_for(lambda: peers_of(hosts[1]) == {str(subnets[0])}, 30, "h2 sees h1", interval=0.1)
    for d in daemons:
        assert d.alive and error_lines(d.log_text()) == [] and "Traceback" not in d.log_text()


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_wrong_ca_is_one_clear_line_then_recovers_when_fixed(lab, mtls, api):
    etcd, files = mtls
    put_config(etcd, api)
    other = make_tls_certs(lab.tmp / "other-pki")  # a CA that did not sign etcd's certificate
    ca = lab.tmp / "ca-in-use.pem"
    shutil.copy(other.ca, ca)
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-api", api, "-v", "1", *tls_flags(files, ca=ca))
    d.wait_log(r"level=error", timeout=30)
    wait_config_retries(d)
    assert d.alive and d.subnet_env() is None
    errs = error_lines(d.log_text())
    assert len(errs) == 1, errs  # one line, not one per retry
    assert str(ca) in errs[0] and "--etcd-cafile" in errs[0], errs[0]
    assert re.search(r"certificate|TLS|SSL", errs[0]), errs[0]
    assert "Traceback" not in d.log_text()
    # fix the file in place: the daemon picks it up on its next try
    shutil.copy(files.ca, ca)
    sn = subnet_of(d.wait_subnet_env(timeout=30))
    assert lease_in_store(etcd, api, sn)["PublicIP"] == h1.address
    assert d.alive and "Traceback" not in d.log_text()


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_ca_file_in_der_is_one_clear_line_then_recovers_when_fixed(lab, mtls, api):
    """A DER CA file (v2: the daemon exited with 'internal error: UnicodeDecodeError' and binary
    bytes; v3: gRPC's 'Failed to create security handshaker') is named with the conversion to run."""
    etcd, files = mtls
    put_config(etcd, api)
    ca = lab.tmp / "ca-in-use.crt"
    ca.write_bytes(ssl.PEM_cert_to_DER_cert(files.ca.read_text()))
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-api", api, "-v", "1", *tls_flags(files, ca=ca))
    d.wait_log(r"level=error", timeout=30)
    wait_config_retries(d)
    assert d.alive and d.subnet_env() is None
    errs = error_lines(d.log_text())
    assert len(errs) == 1, errs
    assert f"--etcd-cafile {ca} is a DER (binary) certificate, not PEM; convert it: openssl x509" in errs[0]
    shutil.copy(files.ca, ca)
    sn = subnet_of(d.wait_subnet_env(timeout=30))
    assert lease_in_store(etcd, api, sn)["PublicIP"] == h1.address
    assert d.alive and "Traceback" not in d.log_text() and "internal error" not in d.log_text()


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_missing_client_certificate_is_one_clear_line(lab, mtls, api):
    etcd, files = mtls
    put_config(etcd, api)
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-api", api, "-v", "1", *tls_flags(files, client=False))
    d.wait_log(r"level=error", timeout=30)
    wait_config_retries(d)
    assert d.alive and d.subnet_env() is None
    errs = error_lines(d.log_text())
    assert len(errs) == 1, errs
    assert "--etcd-certfile" in errs[0], errs[0]  # names what to set
    assert "Traceback" not in d.log_text()


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_expired_client_certificate_is_called_expired_and_grpc_stays_quiet(lab, mtls, api):
    etcd, files = mtls
    put_config(etcd, api)
    cert, key = make_client_cert(files, lab.tmp / "pki-old", name="expired", not_before=-30 * DAY, not_after=-DAY)
    in_use = lab.tmp / "client-in-use.pem"
    shutil.copy(cert, in_use)
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-api", api, "-v", "1", "--etcd-cafile", str(files.ca), "--etcd-certfile", str(in_use),
                     "--etcd-keyfile", str(key))
    d.wait_log(r"level=error", timeout=30)
    wait_config_retries(d)
    assert d.alive and d.subnet_env() is None
    errs = error_lines(d.log_text())
    assert len(errs) == 1, errs
    assert re.search(rf"client certificate --etcd-certfile {re.escape(str(in_use))} expired on \d{{4}}-\d\d-\d\d",
                     errs[0]), errs[0]
    assert foreign_lines(d.log_text()) == []  # no raw gRPC lines (36 in 12 s before)
    # renewed on disk: picked up at the next try
    fresh, fresh_key = make_client_cert(files, lab.tmp / "pki-new", name="fresh")
    shutil.copy(fresh_key, key)  # the renewed certificate comes with its own key
    shutil.copy(fresh, in_use)
    sn = subnet_of(d.wait_subnet_env(timeout=30))
    assert lease_in_store(etcd, api, sn)["PublicIP"] == h1.address
    assert "Traceback" not in d.log_text()


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_key_of_another_certificate_is_named(lab, mtls, api):
    etcd, files = mtls
    put_config(etcd, api)
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-api", api, "-v", "1", "--etcd-cafile", str(files.ca), "--etcd-certfile",
                     str(files.client_cert), "--etcd-keyfile", str(files.server_key))
    d.wait_log(r"level=error", timeout=30)
    wait_config_retries(d)
    errs = error_lines(d.log_text())
    assert len(errs) == 1, errs
    assert "key does not match certificate" in errs[0] and str(files.server_key) in errs[0], errs[0]
    assert d.alive and d.subnet_env() is None
    assert foreign_lines(d.log_text()) == [] and "Traceback" not in d.log_text()


def test_key_readable_by_others_is_one_warning(lab, mtls):
    etcd, files = mtls
    put_config(etcd, "v3")
    shared = lab.tmp / "shared-key.pem"
    shutil.copy(files.client_key, shared)
    shared.chmod(0o644)
    h1 = lab.add_host("h1")
    d = start_daemon(h1, "--etcd-cafile", str(files.ca), "--etcd-certfile", str(files.client_cert),
                     "--etcd-keyfile", str(shared), "--healthz-port", str(HZ))
    sn = subnet_of(d.wait_subnet_env(timeout=30))  # it works: a warning, not an error
    assert lease_in_store(etcd, "v3", sn)["PublicIP"] == h1.address
    ss = h1.run("ss", "-K", "dst", etcd.ip, "dport", "=", str(etcd.client_port), check=False)  # reconnect: key read again
    assert ss.returncode == 0
    wait_for(lambda: d.log_text().count("peer leases listed") >= 2,
             30, "a relist after the reconnect", interval=0.1)
    warnings = [ln for ln in d.log_text().splitlines() if "level=warning" in ln and "--etcd-keyfile" in ln]
    assert len(warnings) == 1, warnings
    assert str(shared) in warnings[0] and "0644" in warnings[0] and "chmod 600" in warnings[0]
    assert error_lines(d.log_text()) == []


# -- user/password ----------------------------------------------------------------------------------
PASSWORD = "s3cr3t-Pw-0c1f"  # unique: any occurrence in a log is a leak


def assert_password_nowhere(d) -> None:
    text = d.log_text()
    assert PASSWORD not in text, [ln for ln in text.splitlines() if PASSWORD in ln]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_user_password_auth_and_the_password_is_never_logged(lab, tls):
    files = make_tls_certs(lab.tmp / "pki") if tls else None
    etcd = EtcdServer(lab, tls=files).start()
    etcd.enable_auth(user="flannel", password=PASSWORD)
    etcd.put(f"{PREFIX}/config", ALLOC)
    extra = ["--etcd-cafile", str(files.ca)] if tls else []
    h1, h2, h3 = lab.add_host("h1"), lab.add_host("h2"), lab.add_host("h3")

    # on the command line (and at debug level, where more is logged)
    d1 = start_daemon(h1, "--etcd-username", "flannel", "--etcd-password", PASSWORD, "-v", "1",
                      "--healthz-port", str(HZ), *extra)
    sn1 = subnet_of(d1.wait_subnet_env(timeout=30))
    # from the environment, as the docs recommend: then not even /proc/<pid>/cmdline has it
    d2 = start_daemon(h2, "--healthz-port", str(HZ), *extra,
                      env={"FLANNELD_ETCD_USERNAME": "flannel", "FLANNELD_ETCD_PASSWORD": PASSWORD})
    sn2 = subnet_of(d2.wait_subnet_env(timeout=30))
    assert PASSWORD not in Path(f"/proc/{d2.pid}/cmdline").read_bytes().decode(errors="replace")
    assert json.loads(etcd.get(key_of(sn1)))["PublicIP"] == h1.address
    assert json.loads(etcd.get(key_of(sn2)))["PublicIP"] == h2.address
    wait_for(lambda: peers_of(h1) == {str(sn2)}, 30, "h1 sees h2 (watch with auth)", interval=0.1)
    wait_for(lambda: peers_of(h2) == {str(sn1)}, 30, "h2 sees h1", interval=0.1)

    # a wrong password: one clear line (without any password in it), retried, the daemon stays up
    wrong = PASSWORD[::-1]
    d3 = start_daemon(h3, "-v", "1", *extra, env={"FLANNELD_ETCD_USERNAME": "flannel", "FLANNELD_ETCD_PASSWORD": wrong})
    d3.wait_log(r"level=error", timeout=30)
    wait_config_retries(d3)
    errs = error_lines(d3.log_text())
    assert len(errs) == 1 and "--etcd-password" in errs[0], errs
    assert wrong not in d3.log_text() and d3.alive and d3.subnet_env() is None

    # a prefix the user may not read: one line saying so (again without the password)
    h4 = lab.add_host("h4")
    d4 = start_daemon(h4, "--etcd-prefix", "/other/network", "-v", "1", *extra,
                      env={"FLANNELD_ETCD_USERNAME": "flannel", "FLANNELD_ETCD_PASSWORD": PASSWORD})
    d4.wait_log(r"level=error", timeout=30)
    wait_config_retries(d4)
    errs = error_lines(d4.log_text())
    assert len(errs) == 1 and "permission denied" in errs[0], errs
    assert d4.alive and d4.subnet_env() is None

    for d in (d1, d2, d3, d4):
        assert "Traceback" not in d.log_text()
        assert_password_nowhere(d)
    assert "***" in d1.log_text()  # the start-up line shows that a password is set, masked
    assert d1.alive and d2.alive
