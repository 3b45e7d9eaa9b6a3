"""Pure subnet logic: keys, lease JSON, allocation, subnet.env format."""

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflanneld import subnetenv
from pyflanneld.config import parse_config
from pyflanneld.subnet.allocate import MAX_CANDIDATES, Taken, choose_subnet, free_subnets, pool_size
from pyflanneld.subnet.lease import _CANONICAL, LeaseAttrs, LeaseFormatError, parse_subnet_key, subnet_key

CFG = parse_config('{"Network":"10.1.0.0/16"}')
# The example lease value of upstream's Documentation/reservations.md, byte for byte.
UPSTREAM_LEASE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                  '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')


def test_subnet_key_roundtrip():
    assert subnet_key(IPv4Network("10.1.15.0/24")) == "10.1.15.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/10.1.15.0-24") == (IPv4Network("10.1.15.0/24"), None)
    sn, sn6 = parse_subnet_key("10.5.52.0-24&fc00:0:0:5::-64")
    assert str(sn) == "10.5.52.0/24" and str(sn6) == "fc00:0:0:5::/64"


@pytest.mark.parametrize("bad", ["config", "10.1.15.0", "10.1.15.0-99", "x-24", "10.1.15.1-24junk"])
def test_bad_subnet_keys(bad):
    with pytest.raises(LeaseFormatError):
        parse_subnet_key(bad)


def test_lease_json_is_upstreams():
    a = LeaseAttrs(IPv4Address("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})
    assert a.to_json() == UPSTREAM_LEASE
    assert LeaseAttrs(IPv4Address("10.0.0.1")).to_json() == '{"PublicIP":"10.0.0.1","PublicIPv6":null}'
    back = LeaseAttrs.from_json(a.to_json())
    assert back == a
    assert LeaseAttrs.from_json('{"publicip":"1.2.3.4","backendtype":"host-gw"}').backend_type == "host-gw"


def _read(decode, value: bytes):
    try:
        return decode(value)
    except LeaseFormatError as e:
        return f"LeaseFormatError: {e}"


_octet = st.integers(0, 300).map(str) | st.sampled_from(["01", "00", "1a", ""])


@given(pub=st.builds(".".join, st.lists(_octet, min_size=3, max_size=5)),
       pub6=st.sampled_from(["null", '"fd00::1"', "nul", '""']),
       bt=st.none() | st.sampled_from(["vxlan", "host-gw", "udp", "", "VXLAN", "x-1"]),
       vni=st.none() | st.integers(0, 2**40).map(str) | st.sampled_from(["01", "-1", "1.0", "1e3", '"1"']),
       mac=st.sampled_from(["02:be:00:00:01:02", "02:BE:00:00:01:02", "02-be-00-00-01-02", "02:be:00:00:01",
                            "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "02:be:00:00:01:02\\u0000"]),
       space=st.sampled_from(["", " "]), tail=st.sampled_from(["", ",", ',"X":1', '}']))
def test_canonical_lease_values_read_as_the_json_decoder_reads_them(pub, pub6, bt, vni, mac, space, tail):
    """The fast path of LeaseAttrs.from_json (a value as a flanneld writes it) gives what the JSON
    decoder gives, for such values and for every near miss (which take the general path)."""
    value = f'{{"PublicIP":{space}"{pub}","PublicIPv6":{pub6}'
    if bt is not None:
        value += f',"BackendType":"{bt}"'
    if vni is not None:
        value += f',"BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}'
    raw = (value + "}" + tail).encode()
    assert _read(LeaseAttrs.from_json, raw) == _read(LeaseAttrs.decode, raw)


def test_canonical_lease_values_take_the_fast_path():
    for a in (LeaseAttrs(IPv4Address("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}),
              LeaseAttrs(IPv4Address("10.0.0.1"), "host-gw"), LeaseAttrs(IPv4Address("10.0.0.1"))):
        raw = a.to_json().encode()
        assert _CANONICAL.fullmatch(raw) and LeaseAttrs.from_json(raw) == a == LeaseAttrs.decode(raw)


@pytest.mark.parametrize("bad", [b"not json", b"[]", b'{"PublicIP":"nope"}', b'{"PublicIP":"1.2.3.4","BackendType":5}'])
def test_bad_lease_values(bad):
    with pytest.raises(LeaseFormatError):
        LeaseAttrs.from_json(bad)


def test_free_subnets_skip_taken_and_first_subnet():
    taken = Taken(CFG, [IPv4Network("10.1.1.0/24"), IPv4Network("10.1.3.0/24")])
    free = free_subnets(CFG, taken, limit=3)
    assert [str(s) for s in free] == ["10.1.2.0/24", "10.1.4.0/24", "10.1.5.0/24"]


def test_taken_detects_overlap_of_other_sizes():
    taken = Taken(CFG, [IPv4Network("10.1.0.0/22")])  # a lease from an older SubnetLen
    assert [str(s) for s in free_subnets(CFG, taken, limit=1)] == ["10.1.4.0/24"]


def test_choose_is_random_among_first_100():
    rng = random.Random(1)
    picks = {choose_subnet(CFG, Taken(CFG, []), rng) for _ in range(500)}
    first100 = set(free_subnets(CFG, Taken(CFG, []), MAX_CANDIDATES))
    assert picks <= first100 and len(picks) > 50


def test_pool_exhausted():
    cfg = parse_config('{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.0","SubnetMax":"10.1.2.0"}')
    assert pool_size(cfg) == 2
    taken = Taken(cfg, [IPv4Network("10.1.1.0/24"), IPv4Network("10.1.2.0/24")])
    assert choose_subnet(cfg, taken) is None


def test_subnet_env_golden(tmp_path):
    text = subnetenv.render(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    assert text == "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    p = tmp_path / "run" / "flannel" / "subnet.env"
    subnetenv.write(str(p), text)
    assert p.read_text() == text
    assert (p.stat().st_mode & 0o777) == 0o644
    assert subnetenv.previous(str(p)) == (IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"))
    assert [x.name for x in p.parent.iterdir()] == ["subnet.env"]  # no temp file left


def test_subnet_env_dual_stack_and_ipv6_only_golden(tmp_path):
    """Upstream WriteSubnetFile: the IPv6 pair after the IPv4 one, before FLANNEL_MTU; no IPv4 lines
    with IPv4 off."""
    net6, sn6 = IPv6Network("fd80::/48"), IPv6Network("fd80:0:0:48::/64")
    dual = subnetenv.render(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, True,
                            ipv6_network=net6, ipv6_subnet=sn6)
    assert dual == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
                    "FLANNEL_IPV6_NETWORK=fd80::/48\nFLANNEL_IPV6_SUBNET=fd80:0:0:48::1/64\n"
                    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    only6 = subnetenv.render(None, None, 1450, False, ipv6_network=net6, ipv6_subnet=sn6)
    assert only6 == ("FLANNEL_IPV6_NETWORK=fd80::/48\nFLANNEL_IPV6_SUBNET=fd80:0:0:48::1/64\n"
                     "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    p = tmp_path / "subnet.env"
    subnetenv.write(str(p), dual)
    assert subnetenv.previous_ipv6(str(p)) == (net6, sn6)
    assert subnetenv.previous(str(p)) == (IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"))
    subnetenv.write(str(p), only6)
    assert subnetenv.previous_ipv6(str(p)) == (net6, sn6) and subnetenv.previous(str(p)) == (None, None)


@pytest.mark.parametrize("text,want", [
    ("FLANNEL_IPV6_SUBNET=fd80:0:0:48::1/64\n", (None, IPv6Network("fd80:0:0:48::/64"))),
    ('export FLANNEL_IPV6_NETWORK="fd80::/48"\n', (IPv6Network("fd80::/48"), None)),
    ("FLANNEL_IPV6_SUBNET=10.5.72.1/24\nFLANNEL_IPV6_NETWORK=fd80::\n", (None, None)),  # wrong family, no prefix
    ("FLANNEL_IPV6_SUBNET=fd80:0:0:48::1/64,fd81::1/64\n", (None, None)),
    ("FLANNEL_IPV6_SUBNET=fe80::1%eth0/64\n", (None, None)),
    ("FLANNEL_SUBNET=10.5.72.1/24\n", (None, None)),
])
def test_previous_ipv6_subnet_is_read_leniently(tmp_path, text, want):
    p = tmp_path / "subnet.env"
    p.write_text(text)
    assert subnetenv.previous_ipv6(str(p)) == want


def test_subnet_env_read_tolerates_godotenv_syntax(tmp_path):
    p = tmp_path / "s.env"
    p.write_text('# comment\nexport FLANNEL_NETWORK="10.1.0.0/16"\n\nFLANNEL_SUBNET=10.1.7.1/24\n')
    assert subnetenv.previous(str(p)) == (IPv4Network("10.1.0.0/16"), IPv4Network("10.1.7.0/24"))
    assert subnetenv.previous(str(tmp_path / "missing")) == (None, None)
    p.write_text("FLANNEL_SUBNET=10.1.7.1/24,10.1.8.1/24\n")
    assert subnetenv.previous(str(p)) == (None, None)


def test_lease_json_bytes_for_cas():
    """Renewal compares the stored value byte for byte (etcd compare-and-swap): our serialisation
    is exactly upstream's, and a value read from etcd serialises back to the same bytes."""
    a = LeaseAttrs(IPv4Address("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})
    assert a.to_json() == UPSTREAM_LEASE
    assert LeaseAttrs.from_json(UPSTREAM_LEASE).to_json() == UPSTREAM_LEASE
    assert LeaseAttrs.from_json(UPSTREAM_LEASE.encode()).to_json() == UPSTREAM_LEASE
    # another writer's spacing and field order: upstream's field order, compact, BackendData's own
    # key order kept (Go re-marshals it as raw JSON: compacted, not reordered)
    other = ('{"BackendData": {"VtepMAC": "aa:bb:cc:dd:ee:ff", "VNI": 1}, "BackendType": "vxlan", '
             '"PublicIPv6": null, "PublicIP": "10.0.0.1"}')
    assert LeaseAttrs.from_json(other).to_json() == ('{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"vxlan",'
                                                     '"BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff","VNI":1}}')
