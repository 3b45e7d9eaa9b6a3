"""Interface selection as upstream: --iface (name or IP, first match wins), --iface-regex (IPs, then
names), --iface-can-reach, else the default route's interface; --public-ip overrides the address."""

import json
from ipaddress import IPv4Address, IPv6Address

import pytest
from helpers import upstream_or_skip
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.cluster import start_daemon
from pyflanneld import iface

PREFIX = "/coreos.com/network"


@pytest.fixture
def host(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}')
    h = lab.add_host("h1")
    # a second interface inside the host namespace (a veth pair with both ends in it)
    h.ip("link", "add", "data0", "type", "veth", "peer", "name", "data1")
    h.ip("addr", "add", "10.99.0.1/24", "dev", "data0")
    h.ip("link", "set", "data0", "mtu", "1400", "up")
    h.ip("link", "set", "data1", "up")
    return h


def lease_attrs(etcd):
    vals = list(etcd.get_prefix(f"{PREFIX}/subnets/").values())
    assert len(vals) == 1
    return json.loads(vals[0])


@pytest.mark.parametrize("args,public_ip,mtu", [
    ([], "192.168.100.1", "1500"),                                   # default route's interface
    (["--iface", "data0"], "10.99.0.1", "1400"),                       # by name
    (["--iface", "10.99.0.1"], "10.99.0.1", "1400"),                   # by IP
    (["--iface", "nope0", "--iface", "data0"], "10.99.0.1", "1400"),  # first that matches wins
    (["--iface", "nope0"], None, None),                                 # none matches: exit 1
    (["--iface-regex", r"^10\.99\."], "10.99.0.1", "1400"),            # regex on IPs
    (["--iface-regex", "^data"], "10.99.0.1", "1400"),                 # regex on names
    (["--iface-can-reach", "10.99.0.77"], "10.99.0.1", "1400"),       # route lookup
    (["--iface", "data0", "--public-ip", "203.0.113.9"], "203.0.113.9", "1400"),
])
def test_interface_selection(host, etcd, args, public_ip, mtu):
    d = start_daemon(host, *args)
    if public_ip is None:
        assert d.wait_exit(timeout=10) == 1
        assert "--iface nope0: no such interface" in d.log_text()
        assert "Traceback" not in d.log_text()
        return
    env = d.wait_subnet_env()
    assert env["FLANNEL_MTU"] == mtu
    assert lease_attrs(etcd)["PublicIP"] == public_ip


def test_regex_without_match_is_a_clear_exit(host):
    d = start_daemon(host, "--iface-regex", "^zzz")
    assert d.wait_exit(timeout=10) == 1
    text = d.log_text()
    assert "failed to find an interface" in text and "no interface matches --iface-regex ^zzz" in text
    assert "Traceback" not in text


# --- point-to-point addresses (issue 11.1) ----------------------------------------------------------
# `ip addr add 10.99.0.2 peer 10.99.0.254/32 dev eth0` (cloud VMs, some VPNs): IFA_LOCAL is the
# host's own address, IFA_ADDRESS the peer's. Upstream (vishvananda/netlink) takes IFA_LOCAL.

PTP_LOCAL, PTP_PEER = "10.99.0.2", "10.99.0.254"


@pytest.fixture
def ptp_host(lab, etcd):
    etcd.put(f"{PREFIX}/config", '{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}')
    h = lab.add_host("h1")
    h.ip("addr", "flush", "dev", "eth0")
    h.ip("addr", "add", PTP_LOCAL, "peer", f"{PTP_PEER}/32", "dev", "eth0")
    h.ip("route", "replace", "default", "via", PTP_PEER, "dev", "eth0")
    # the switch is the peer end, so etcd (on the switch) stays reachable over the p2p address
    lab.switch.ip("addr", "add", PTP_PEER, "peer", f"{PTP_LOCAL}/32", "dev", "br0")
    return h


def _binary(which: str):
    return None if which == "pyflanneld" else upstream_or_skip("v0.20.2")


@pytest.mark.parametrize("which", ["pyflanneld", "upstream"])
@pytest.mark.parametrize("args", [
    [],                                           # default route's interface
    ["--iface", "eth0"],
    ["--iface-regex", r"^10\.99\.0\.2$"],
    ["--iface", PTP_LOCAL],
], ids=["default-route", "iface-name", "iface-regex", "iface-ip"])
def test_point_to_point_address_is_the_local_one(ptp_host, etcd, which, args):
    d = start_daemon(ptp_host, *args, binary=_binary(which))
    d.wait_subnet_env(timeout=30)
    assert lease_attrs(etcd)["PublicIP"] == PTP_LOCAL
    vtep = ptp_host.ip_json("-d", "link", "show", "flannel.1")[0]["linkinfo"]["info_data"]
    assert vtep["local"] == PTP_LOCAL
    assert "Traceback" not in d.log_text()


# --- --iface-regex takes Go's syntax (RE2), issue 11.2 ---------------------------------------------

@pytest.mark.parametrize("rx,text,matches", [
    (r"^10\.64\.[[:digit:]]+\.[[:digit:]]+$", "10.64.3.7", True),   # POSIX class (Python's re: no)
    (r"^10\.64\.[[:digit:]]+\.[[:digit:]]+$", "10.64.3.x", False),
    (r"eth0\z", "eth0", True),                                         # \z (Python's re: bad escape)
    (r"eth0\z", "eth01", False),
    (r"10\.99", "x10.99.0.1", True),                                   # unanchored, like MatchString
    (r"(?i)ETH", "eth0", True),
])
def test_regex_is_go_syntax(rx, text, matches):
    assert bool(iface.compile_regex(rx).search(text)) is matches


@pytest.mark.parametrize("rx", ["(", r"(a)\1", "[[:nope:]]", "a**", "\\"])
def test_invalid_regex_is_one_line_naming_the_flag(rx, capfd):
    with pytest.raises(iface.InterfaceError) as ei:
        iface.compile_regex(rx)
    msg = str(ei.value)
    assert msg.startswith(f"--iface-regex {rx!r} is not a valid regular expression (Go/RE2 syntax): ")
    assert "\n" not in msg and "b'" not in msg
    out, err = capfd.readouterr()
    assert out == err == ""  # RE2's own error log stays silent


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_regex_text_compiles_or_is_an_interface_error(rx):
    try:
        pat = iface.compile_regex(rx)
    except iface.InterfaceError:
        return
    pat.search("10.64.0.1")
    pat.search("eth0")


@pytest.mark.parametrize("rx", [r"^10\.99\.[[:digit:]]+\.[[:digit:]]+$", r"data0\z"])
def test_go_syntax_regex_selects_the_interface(host, etcd, rx):
    d = start_daemon(host, "--iface-regex", rx)
    assert d.wait_subnet_env()["FLANNEL_MTU"] == "1400"
    assert lease_attrs(etcd)["PublicIP"] == "10.99.0.1"


def test_invalid_regex_exits_with_one_line(host):
    d = start_daemon(host, "--iface", "data0", "--iface-regex", "(")
    assert d.wait_exit(timeout=10) == 1
    text = d.log_text()
    lines = [ln for ln in text.splitlines() if "--iface-regex" in ln and "starting pyflanneld" not in ln]
    assert len(lines) == 1 and "is not a valid regular expression (Go/RE2 syntax): missing ): (" in lines[0]
    assert "Traceback" not in text and "re2.cc" not in text and "absl" not in text


# --- IPv6: the interface's global IPv6 address by the same rules (issue 13.2) ------------------------
# The daemon does not run IPv6 yet, so iface.select() itself runs inside the host's namespace.
SELECT = """
import json, sys
from pyflanneld import iface
a = json.loads(sys.argv[1])
try:
    f = iface.select(a.get("iface", []), a.get("regex", []), a.get("reach", ""), ipv4=a.get("ipv4", True),
                     ipv6=a.get("ipv6", True))
except iface.InterfaceError as e:
    print("ERROR", e)
else:
    print(json.dumps({"name": f.name, "ip": f.ip and str(f.ip), "ip6": f.ip6 and str(f.ip6), "mtu": f.mtu}))
"""


def select(host, **args) -> dict | str:
    from backend_harness import PYTHON

    cp = host.run(PYTHON, "-c", SELECT, json.dumps(args), check=False)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stdout + cp.stderr
    out = cp.stdout.strip()
    assert "\n" not in out, out
    return out.removeprefix("ERROR ") if out.startswith("ERROR ") else json.loads(out)


@pytest.fixture
def host6(lab):
    """eth0: 192.168.100.1 + fd99::1 with both default routes; data0: 10.99.0.1 + fd77::1 (and a
    deprecated fd77::9, never chosen); data1: link-local only."""
    h = lab.add_host("h1", ipv6=True)
    h.ip("link", "add", "data0", "type", "veth", "peer", "name", "data1")
    h.ip("addr", "add", "10.99.0.1/24", "dev", "data0")
    h.ip("addr", "add", "fd77::1/64", "dev", "data0", "nodad")
    h.ip("addr", "add", "fd77::9/64", "dev", "data0", "nodad", "preferred_lft", "0")
    h.ip("link", "set", "data0", "mtu", "1400", "up")
    h.ip("link", "set", "data1", "up")
    return h


ETH0 = {"name": "eth0", "ip": "192.168.100.1", "ip6": "fd99::1", "mtu": 1500}
DATA0 = {"name": "data0", "ip": "10.99.0.1", "ip6": "fd77::1", "mtu": 1400}


@pytest.mark.parametrize("args,want", [
    ({}, ETH0),                                                           # default routes (both: eth0)
    ({"ipv4": False}, dict(ETH0, ip=None)),                              # IPv6-only: the IPv6 default route
    ({"ipv6": False}, dict(ETH0, ip6=None)),                             # IPv4 as before
    ({"iface": ["data0"]}, DATA0),                                        # by name: both addresses
    ({"iface": ["fd77::1"]}, DATA0),                                      # by IPv6 address
    ({"iface": ["fd77::1"], "ipv6": False}, dict(DATA0, ip6=None)),       # IPv6 literal, IPv4 overlay
    ({"iface": ["10.99.0.1"]}, DATA0),                                    # IPv4 literal fills the IPv6 one
    ({"iface": ["nope0", "fd77::1"]}, DATA0),                             # first that matches wins
    ({"regex": [r"^fd77:"], "ipv4": False}, dict(DATA0, ip=None)),        # regex on IPv6 addresses
    ({"regex": [r"^(10\.99\.|fd77:)"]}, DATA0),                          # dual: both must match
    ({"regex": ["^data0$"]}, DATA0),                                      # then on names
    ({"reach": "fd77::99"}, DATA0),                                       # IPv6 route lookup
    ({"reach": "10.99.0.77"}, DATA0),                                     # IPv4 route, IPv6 address filled
    ({"reach": "2001:db8::1"}, ETH0),                                     # via the default IPv6 route
])
def test_ipv6_interface_selection(host6, args, want):
    assert select(host6, **args) == want


@pytest.mark.parametrize("args,error", [
    ({"iface": ["data1"], "ipv4": False}, "--iface data1: the interface data1 has no global IPv6 address (only link-local): "
                           "add one (ip -6 addr add ... dev data1) or pick another interface"),
    ({"iface": ["fd77::5"]}, "--iface fd77::5: no interface has this address"),
    ({"iface": ["fe80::1"]}, "--iface fe80::1: a link-local address cannot carry the overlay"),
    ({"regex": [r"^fd77:"]}, "no interface matches --iface-regex ^fd77:"),  # dual: no IPv4 match
    ({"regex": ["^data1$"]}, "no interface matches --iface-regex ^data1$ (the interface data1 has no IPv4 address"),
])
def test_ipv6_interface_selection_errors_are_one_line(host6, args, error):
    got = select(host6, **args)
    assert isinstance(got, str) and error in got, got
    assert got.startswith("failed to find an interface that matches") and got.endswith("check `ip addr`")


def test_no_ipv6_default_route_or_address_is_one_clear_line(lab):
    h = lab.add_host("h1")  # IPv4 only
    assert select(h) == ("IPv6 is enabled but there is no default IPv6 route to pick the interface from; add one "
                         "(ip -6 route add default via ...) or pass --iface <name or IP> (or --iface-regex / "
                         "--iface-can-reach)")
    assert select(h, ipv6=False) == {"name": "eth0", "ip": h.address, "ip6": None, "mtu": 1500}
    h.ip("-6", "route", "add", "default", "dev", "eth0")  # a route, but no global address
    got = select(h, ipv4=False)
    assert got.startswith("default route: the interface eth0 has no global IPv6 address (only link-local)"), got


def test_dual_stack_default_routes_must_share_the_interface(host6):
    host6.ip("-6", "route", "replace", "default", "via", "fd77::fe", "dev", "data0")
    assert select(host6) == ("v6 default route interface data0 must be the same with v4 default route interface "
                             "eth0; pass --iface <name or IP> (or --iface-regex / --iface-can-reach)")
    assert select(host6, ipv4=False) == dict(DATA0, ip=None)  # IPv6-only follows the IPv6 route


def test_public_addresses_prefer_the_flags():
    f = iface.Iface("eth0", 2, IPv4Address("192.168.100.1"), 1500, IPv6Address("fd99::1"))
    assert iface.public_addresses(f) == (IPv4Address("192.168.100.1"), IPv6Address("fd99::1"))
    assert iface.public_addresses(f, "203.0.113.9", "2001:db8::9") == (IPv4Address("203.0.113.9"),
                                                                       IPv6Address("2001:db8::9"))
    v4only = iface.Iface("eth0", 2, IPv4Address("192.168.100.1"), 1500)
    assert iface.public_addresses(v4only, public_ipv6="2001:db8::9") == (IPv4Address("192.168.100.1"), None)
