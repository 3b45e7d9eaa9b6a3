"""ipsec on this machine: options, the connection and policies upstream loads, and the XFRM
policy adapter against this kernel (which has XFRM policies but no ESP algorithms). Traffic (ESP on
the wire, a mixed cluster with upstream, charon over VICI) runs under Debian's kernel:
tests/vm/test_ipsec.py via tests/test_vm.py."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from backend_harness import PYTHON, BackendProc, DriverError

from pyflanneld.backend import BackendContext, ExternalInterface
from pyflanneld.backend.charon import CharonError, find_charon
from pyflanneld.backend.ipsec import IPsecBackend
from pyflanneld.config import parse_config
from pyflanneld.subnet.lease import Lease, LeaseAttrs

PSK = "x" * 96
NET = {"Network": "10.5.0.0/16", "Backend": {"Type": "ipsec", "PSK": PSK}}


def backend(**opts) -> IPsecBackend:
    cfg = parse_config(json.dumps({**NET, "Backend": {"Type": "ipsec", "PSK": PSK, **opts}}))
    ext = ExternalInterface("eth0", 2, IPv4Address("192.168.100.1"), IPv4Address("192.168.100.1"), 1500)
    b = IPsecBackend(BackendContext(config=cfg, backend_config=cfg.backend, ext=ext, options=None))
    b._read_config()
    return b


def lease(subnet: str, ip: str) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(public_ip=IPv4Address(ip), backend_type="ipsec"))


def test_mtu_as_upstream():
    assert backend().mtu == 1500 - 77
    assert backend(UDPEncap=True).mtu == 1500 - 77 - 8


def test_connection_and_policies_as_upstream_loads_them():
    b = backend(UDPEncap=True)
    b.own_lease = lease("10.5.1.0/24", "192.168.100.1")
    peer = lease("10.5.2.0/24", "192.168.100.2")
    assert b.conn_name(peer) == "192.168.100.1-10.5.1.0/24-10.5.2.0/24-192.168.100.2"
    assert b.conn(peer) == {
        "local_addrs": ["192.168.100.1"], "remote_addrs": ["192.168.100.2"], "proposals": ["aes256-sha256-modp4096"],
        "version": "2", "keyingtries": "0", "local": {"auth": "psk"}, "remote": {"auth": "psk"}, "encap": "true",
        "children": {"10.5.1.0/24-10.5.2.0/24": {
            "local_ts": ["10.5.1.0/24"], "remote_ts": ["10.5.2.0/24"],
            "esp_proposals": ["aes128gcm16-sha256-prfsha256-ecp256"], "start_action": "start",
            "close_action": "trap", "dpd_action": "restart", "mode": "tunnel", "reqid": "11", "rekey_time": "1h",
            "policies": "no"}}}
    assert [str(p) for p in b.policies(peer)] == [
        "10.5.1.0/24 -> 10.5.2.0/24 dir out tmpl 192.168.100.1 -> 192.168.100.2 reqid 11",
        "10.5.2.0/24 -> 10.5.1.0/24 dir in tmpl 192.168.100.2 -> 192.168.100.1 reqid 11",
        "10.5.2.0/24 -> 10.5.1.0/24 dir fwd tmpl 192.168.100.2 -> 192.168.100.1 reqid 11",
    ]
    assert all(b.ours(p) for p in b.policies(peer))
    outside = lease("10.9.0.0/24", "192.168.100.9")  # not in the Network: never ours to delete
    assert not any(b.ours(p) for p in b.policies(outside))


def test_missing_charon_is_one_line():
    with pytest.raises(CharonError) as ei:
        find_charon(("/nonexistent/charon",))
    assert str(ei.value) == ("No valid charon executable found at paths ['/nonexistent/charon']: install "
                             "strongSwan's IKE daemon (Debian: apt-get install strongswan-charon strongswan-swanctl)")
    assert find_charon() == "/usr/lib/ipsec/charon"  # make setup installs Debian's strongswan-charon


@pytest.mark.parametrize("backend_opts,error", [
    ({"PSK": "short"}, "config error, password is too short: PSK needs at least 96 characters (e.g. openssl rand "
                       "-hex 48)"),
    ({"PSK": PSK, "UDPEncap": "yes"}, "error decoding IPSEC backend config: json: cannot unmarshal string into Go "
                                      "struct field .UDPEncap of type bool"),
])
def test_bad_options_refused_before_charon_starts(lab, backend_opts, error):
    h = lab.add_host("h1")
    p = BackendProc(h, {**NET, "Backend": {"Type": "ipsec", **backend_opts}}, log_dir=lab.tmp)
    with pytest.raises(DriverError) as ei:
        p.call("register")
    p.close()
    assert (str(ei.value), ei.value.type) == (error, "BackendError")
    assert "charon daemon started" not in p.log()


XFRM_SCRIPT = """
import asyncio, sys
from ipaddress import IPv4Address as A, IPv4Network as N
from pyflanneld.netlink import XfrmPolicy, xfrm_delete_policy, xfrm_policies, xfrm_update_policy
async def main():
    out = XfrmPolicy(N("10.5.1.0/24"), N("10.5.2.0/24"), "out", A("192.168.100.1"), A("192.168.100.2"), 11)
    fwd = XfrmPolicy(N("10.5.2.0/24"), N("10.5.1.0/24"), "fwd", A("192.168.100.2"), A("192.168.100.1"), 11)
    step = sys.argv[1]
    if step == "add":
        for p in (out, fwd, out):  # an update of an existing policy is no error
            await xfrm_update_policy(p)
    elif step == "list":
        print(sorted(str(p) for p in await xfrm_policies()))
    else:
        await xfrm_delete_policy(out)
        await xfrm_delete_policy(out)  # already gone: fine
asyncio.run(main())
"""


def test_xfrm_policies_through_netlink(lab):
    h = lab.add_host("h1")

    def step(name: str) -> str:
        return h.run(PYTHON, "-c", XFRM_SCRIPT, name).stdout.strip()

    def policies() -> set[str]:  # ``ip xfrm policy``, one line per policy
        blocks: list[list[str]] = []
        for ln in h.ip("xfrm", "policy").splitlines():
            if ln[:1].isspace() and blocks:
                blocks[-1].append(ln.strip())
            else:
                blocks.append([ln.strip()])
        return {" ".join(" ".join(b).split()) for b in blocks}

    step("add")
    assert policies() == {
        "src 10.5.2.0/24 dst 10.5.1.0/24 dir fwd priority 0 ptype main tmpl src 192.168.100.2 dst 192.168.100.1 "
        "proto esp reqid 11 mode tunnel",
        "src 10.5.1.0/24 dst 10.5.2.0/24 dir out priority 0 ptype main tmpl src 192.168.100.1 dst 192.168.100.2 "
        "proto esp reqid 11 mode tunnel"}
    # a policy someone else added (another reqid, a transport template) is listed but is not ours
    h.ip("xfrm", "policy", "add", "src", "10.7.0.0/24", "dst", "10.8.0.0/24", "dir", "out",
         "tmpl", "src", "1.1.1.1", "dst", "1.1.1.2", "proto", "esp", "reqid", "5", "mode", "transport")
    assert step("list") == str(sorted([
        "10.5.1.0/24 -> 10.5.2.0/24 dir out tmpl 192.168.100.1 -> 192.168.100.2 reqid 11",
        "10.5.2.0/24 -> 10.5.1.0/24 dir fwd tmpl 192.168.100.2 -> 192.168.100.1 reqid 11",
        "10.7.0.0/24 -> 10.8.0.0/24 dir out tmpl 1.1.1.1 -> 1.1.1.2 reqid 5"]))
    step("delete")
    assert {p.split(" ptype")[0] for p in policies()} == {
        "src 10.5.2.0/24 dst 10.5.1.0/24 dir fwd priority 0", "src 10.7.0.0/24 dst 10.8.0.0/24 dir out priority 0"}
