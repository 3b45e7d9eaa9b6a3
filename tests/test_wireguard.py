"""wireguard on this machine: key file handling, options, BackendData — and the one-line failure on
this kernel, which has no wireguard device type. The data path (mixed cluster with upstream,
restart, repair) runs under Debian's kernel: tests/vm/test_wireguard.py via tests/test_vm.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from backend_harness import BackendProc, DriverError
from hypothesis import given
from hypothesis import strategies as st

from lab import start_daemon
from pyflanneld.backend.wgkey import (
    WgKeyError,
    encode_key,
    generate_private_key,
    key_file_path,
    load_or_create,
    parse_key,
    public_key,
)
from pyflanneld.subnet.lease import LeaseAttrs, check_backend_data
from pyflanneld.subnet.lease import wg_public_key as parse_public_key

# RFC 7748 section 6.1: Alice's X25519 key pair
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def wg_pubkey(private_b64: str) -> str:
    """What ``wg pubkey`` (wireguard-tools) says the public key is."""
    return subprocess.run(["wg", "pubkey"], input=private_b64 + "\n", capture_output=True, text=True,
                          check=True).stdout.strip()


# --- keys -----------------------------------------------------------------------------------------
def test_public_key_is_x25519():
    assert public_key(ALICE_PRIVATE) == ALICE_PUBLIC


def test_generated_key_is_clamped_and_agrees_with_wg():
    keys = {generate_private_key() for _ in range(8)}
    assert len(keys) == 8
    for k in keys:
        assert len(k) == 32 and k[0] & 7 == 0 and k[31] & 0x80 == 0 and k[31] & 0x40
        assert encode_key(public_key(k)) == wg_pubkey(encode_key(k))


def test_key_file_created_once_0600_and_reused(tmp_path):
    path = tmp_path / "run" / "flannel" / "wgkey"
    keys, created = load_or_create(path)
    assert created
    text = path.read_text()
    assert text == keys.private and len(text) == 44 and "\n" not in text  # as upstream writes it
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.public == wg_pubkey(keys.private)
    again, created = load_or_create(path)
    assert (again, created) == (keys, False)


def test_key_file_from_wg_genkey_accepted(tmp_path):
    path = tmp_path / "wgkey"
    text = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout  # ends in \n
    path.write_text(text)
    path.chmod(0o600)
    keys, created = load_or_create(path)
    assert not created and keys.private == text.strip() and keys.public == wg_pubkey(text.strip())


def test_readable_key_file_is_made_0600(tmp_path):
    path = tmp_path / "wgkey"
    path.write_text(encode_key(ALICE_PRIVATE))
    path.chmod(0o644)
    keys, _ = load_or_create(path)
    assert keys.public == encode_key(ALICE_PUBLIC)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("content", ["", "not a key", encode_key(b"x" * 31), "\xff\xfe"])
def test_bad_key_file_is_one_line_naming_file_and_fix(tmp_path, content):
    path = tmp_path / "wgkey"
    path.write_text(content)
    with pytest.raises(WgKeyError) as ei:
        load_or_create(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and "delete the file" in msg
    assert path.read_text() == content  # never overwritten: the operator decides


def test_unwritable_key_dir_is_one_line():
    with pytest.raises(WgKeyError) as ei:
        load_or_create(Path("/proc/pyflanneld-test/wgkey"))  # not even root can create it
    assert "could not write the wireguard private key file" in str(ei.value) and "WIREGUARD_KEY_FILE" in str(ei.value)


def test_key_file_path_env():
    assert str(key_file_path({})) == "/run/flannel/wgkey"
    assert str(key_file_path({"WIREGUARD_KEY_FILE": "/etc/flannel/k"})) == "/etc/flannel/k"


# --- BackendData ----------------------------------------------------------------------------------
def test_backend_data_and_lease_json_as_upstream():
    pub = encode_key(ALICE_PUBLIC)
    attrs = LeaseAttrs(public_ip=IPv4Address("192.168.100.1"), backend_type="wireguard",
                       backend_data={"PublicKey": pub})
    # the bytes upstream v0.20.2 writes (compared with its lease in tests/vm/test_wireguard.py)
    assert attrs.to_json() == ('{"PublicIP":"192.168.100.1","PublicIPv6":null,"BackendType":"wireguard",'
                               f'"BackendData":{{"PublicKey":"{pub}"}}}}')
    assert parse_public_key(LeaseAttrs.from_json(attrs.to_json()).backend_data) == pub


def test_parse_public_key_cases():
    pub = encode_key(ALICE_PUBLIC)
    assert parse_public_key({"publickey": pub}) == pub  # Go's decoder: keys case-insensitive
    assert parse_public_key({"PublicKey": pub, "Port": 51820}) == pub  # extra fields ignored
    for bad in (None, "x", [], {}, {"PublicKey": 5}, {"PublicKey": pub[:-2]}, {"PublicKey": encode_key(b"k" * 16)}):
        assert parse_public_key(bad) is None, bad


def test_device_dump_merged_across_messages():
    """A long dump continues a peer's allowed IPs in the next message; all-zero PSK means none."""
    from pyflanneld.netlink import _wg_device

    pub, peer = encode_key(ALICE_PUBLIC), encode_key(b"p" * 32)
    zero = encode_key(bytes(32)).encode()

    def allowed(addr):
        return {"addr": addr}

    msgs = [
        {"WGDEVICE_A_PUBLIC_KEY": pub.encode(), "WGDEVICE_A_LISTEN_PORT": 51820, "WGDEVICE_A_PEERS": [
            {"WGPEER_A_PUBLIC_KEY": peer.encode(), "WGPEER_A_PRESHARED_KEY": zero,
             "WGPEER_A_ENDPOINT": {"family": 2, "addr": "192.168.100.2", "port": 51820},
             "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL": 25, "WGPEER_A_ALLOWEDIPS": [allowed("10.5.2.0/24")]}]},
        {"WGDEVICE_A_PEERS": [{"WGPEER_A_PUBLIC_KEY": peer.encode(),
                               "WGPEER_A_ALLOWEDIPS": [allowed("10.5.3.0/24"), allowed("fd00::/64")]}]},
    ]
    dev = _wg_device("flannel-wg", msgs)
    assert (dev.public_key, dev.listen_port) == (pub, 51820)
    (p,) = dev.peers
    assert p.public_key == peer and p.endpoint == (IPv4Address("192.168.100.2"), 51820)
    assert [str(n) for n in p.allowed_ips] == ["10.5.2.0/24", "10.5.3.0/24"] and p.keepalive_s == 25
    assert p.preshared_key is None


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=3),
                           max_leaves=8)


@given(json_values)
def test_parse_public_key_never_raises(value):
    data = {"PublicKey": value} if not isinstance(value, dict) else value
    got = parse_public_key(data)
    assert got is None or len(parse_key(got)) == 32
    assert (check_backend_data("wireguard", data) is None) == (got is not None)  # the gate agrees


def test_gate_rejects_wireguard_lease_without_a_key():
    assert check_backend_data("wireguard", {"PublicKey": encode_key(ALICE_PUBLIC)}) is None
    assert check_backend_data("wireguard", {"PublicKey": "abc"}) == \
        'BackendData.PublicKey: "abc" is not a base64 WireGuard key'
    assert check_backend_data("wireguard", None) == "BackendData: a wireguard lease needs an object with PublicKey"


# --- options and this kernel (lab) ---------------------------------------------------------------
NET = {"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard"}}


@pytest.fixture
def key_env(tmp_path, monkeypatch):
    path = tmp_path / "wgkey"
    monkeypatch.setenv("WIREGUARD_KEY_FILE", str(path))
    return path


@pytest.mark.parametrize("backend,error", [
    ({"Mode": "bogus"}, "No valid Mode configured: 'bogus' (use one of separate, auto, ipv4, ipv6)"),
    ({"Mode": "ipv6"}, "Mode ipv6 needs IPv6 endpoints, which pyflanneld's wireguard backend does not carry "
                       "(IPv4 only): use Mode separate, auto or ipv4"),
    ({"PSK": "secret"}, "could not parse psk (not base64): PSK must be a base64 WireGuard key (wg genpsk)"),
    ({"ListenPort": "51820"}, "error decoding wireguard backend config: json: cannot unmarshal string into Go "
                              "struct field .ListenPort of type int"),
    ({"Mode": 1}, "error decoding wireguard backend config: json: cannot unmarshal number into Go struct "
                  "field .Mode of type string"),
    ({"ListenPort": 70000}, "ListenPort 70000 is not a UDP port (1-65535)"),
])
def test_bad_options_refused_in_one_line(lab, key_env, backend, error):
    h = lab.add_host("h1")
    p = BackendProc(h, {**NET, "Backend": {"Type": "wireguard", **backend}}, log_dir=lab.tmp)
    with pytest.raises(DriverError) as ei:
        p.call("register")
    p.close()
    assert (str(ei.value), ei.value.type) == (error, "BackendError")
    assert not key_env.exists()  # options are checked before anything is written


def test_this_kernel_lacks_wireguard_one_line(lab, key_env):
    """The machine's kernel has no wireguard: register names the missing device type and the fix."""
    h = lab.add_host("h1")
    p = BackendProc(h, {**NET, "Backend": {"Type": "wireguard", "PSK": encode_key(ALICE_PUBLIC)}}, log_dir=lab.tmp)
    with pytest.raises(DriverError) as ei:
        p.call("register")
    p.close()
    assert str(ei.value) == ("create wireguard device flannel-wg: the kernel has no wireguard device type "
                             "(Operation not supported): load the wireguard module (modprobe wireguard) or "
                             "choose another backend (e.g. host-gw, udp)"), \
        "this test expects the machine's kernel, which has no wireguard"
    assert not h.link_exists("flannel-wg")


def test_daemon_on_this_kernel_exits_with_one_error_line(lab, etcd, tmp_path):
    etcd.put("/coreos.com/network/config", json.dumps(NET))
    h = lab.add_host("h1")
    d = start_daemon(h, "--iface", "eth0", env={"WIREGUARD_KEY_FILE": str(tmp_path / "wgkey")})
    assert d.wait_exit(timeout=30) == 1
    text = d.log_text()
    errors = [ln for ln in text.splitlines() if "level=error" in ln or "level=critical" in ln]
    assert len(errors) == 1, text
    assert "wireguard backend: create wireguard device flannel-wg: the kernel has no wireguard device type" in errors[0]
    assert "modprobe wireguard" in errors[0]
    assert "Traceback" not in text
    assert etcd.get_prefix("/coreos.com/network/subnets/") == {}  # no lease taken for a backend that cannot run
    assert os.path.exists(tmp_path / "wgkey")  # upstream's order: the key first, then the device
