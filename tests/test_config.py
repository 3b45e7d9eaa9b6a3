"""Network config parsing and validation: upstream's defaults and error texts, table-driven."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflanneld.config import ConfigError, parse_config


@pytest.mark.parametrize("raw,network,slen,smin,smax", [
    ('{"Network":"10.1.0.0/16"}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0"),
    ('{"Network":"10.0.0.0/8"}', "10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
    ('{"Network":"10.1.0.0/22"}', "10.1.0.0/22", 24, "10.1.1.0", "10.1.3.0"),
    ('{"Network":"10.1.0.0/23"}', "10.1.0.0/23", 25, "10.1.0.128", "10.1.1.128"),
    ('{"Network":"10.1.0.0/28"}', "10.1.0.0/28", 30, "10.1.0.4", "10.1.0.12"),
    ('{"Network":"10.1.2.3/16"}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0"),  # host bits masked
    ('{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0"}',
     "10.0.0.0/8", 20, "10.10.0.0", "10.99.0.0"),
    # upstream: a zero SubnetMin/SubnetMax is unset (Go marshals an unset ip.IP4 as "0.0.0.0")
    ('{"Network":"10.1.0.0/16","SubnetMin":"0.0.0.0","SubnetMax":"0.0.0.0"}', "10.1.0.0/16", 24, "10.1.1.0",
     "10.1.255.0"),
    ('{"Network":"10.1.0.0/16","SubnetMin":null,"SubnetMax":""}', "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.0.0","SubnetMax":"10.1.255.0"}', "10.1.0.0/16", 24, "10.1.0.0",
     "10.1.255.0"),  # the Network's edges, given explicitly
])
def test_defaults(raw, network, slen, smin, smax):
    c = parse_config(raw)
    assert c.network == IPv4Network(network)
    assert c.subnet_len == slen
    assert c.subnet_min == IPv4Address(smin)
    assert c.subnet_max == IPv4Address(smax)


@pytest.mark.parametrize("raw,message", [
    ('{}', "please define a correct Network parameter in the flannel config"),
    ('{"Network":""}', "please define a correct Network parameter in the flannel config"),
    ('{"Network":"10.1.0.0/16","SubnetLen":31}', "SubnetLen must be less than /31"),
    ('{"Network":"10.1.0.0/16","SubnetLen":17}', "network must be able to accommodate at least four subnets"),
    ('{"Network":"10.1.0.0/29"}', "network is too small. Minimum useful network prefix is /28"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}', "SubnetMin is not in the range of the Network"),
    ('{"Network":"10.1.0.0/16","SubnetMax":"10.2.0.0"}', "SubnetMax is not in the range of the Network"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.5"}', "SubnetMin is not on a SubnetLen boundary: 10.1.1.5"),
    ('{"Network":"10.1.0.0/16","SubnetMax":"10.1.9.9"}', "SubnetMax is not on a SubnetLen boundary: 10.1.9.9"),
    ('{"Network":"fc00::/48"}', "invalid IPv4 CIDR format"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"bogus"}', "invalid IP address format"),
    ('{"Network":"10.1.0.0/16","SubnetMin":"fc00::1"}', "invalid IPv4 address format"),
    ('{"Network":"10.1.0.0/16","Backend":{}}', "unknown backend type: "),
    ('{"Network":"10.1.0.0/16","Backend":"vxlan"}', "error decoding Backend property of config"),
    ('{"Network":"10.1.0.0/16","SubnetLen":"24"}', "cannot unmarshal string"),
    ('not json', "invalid JSON"),
    ('[1,2]', "cannot unmarshal array"),
    ('{"Network":"10.1.0.0/16","EnableIPv4":false}', "none defined stack"),
    ('{"Network":"10.1.0.0/16","EnableIPv6":true}', "please define a correct IPv6Network parameter in the flannel config"),
    ('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/125"}',
     "IPv6Network is too small. Minimum useful network prefix is /124"),
    # issue 10, case 6: numbers Go refuses are one ConfigError naming the field (no OverflowError)
    ('{"Network":"10.1.0.0/16","SubnetLen":1e400}', "invalid JSON: number 1e400 in SubnetLen is out of range"),
    ('{"Network":"10.1.0.0/16","SubnetLen":NaN}', "invalid JSON: NaN in SubnetLen is not a JSON value"),
    ('{"Network":"10.1.0.0/16","SubnetLen":Infinity}', "Infinity in SubnetLen is not a JSON value"),
    ('{"Network":"10.1.0.0/16","SubnetLen":24.0}',
     "json: cannot unmarshal number 24.0 into Go struct field Config.SubnetLen of type uint"),
    ('{"Network":"10.1.0.0/16","SubnetLen":-1}', "cannot unmarshal number -1 into Go struct field Config.SubnetLen"),
    ('{"Network":"10.1.0.0/16","SubnetLen":18446744073709551616}', "number 18446744073709551616 in SubnetLen"),
    ('{"Network":"10.1.0.0/16","SubnetLen":99999999999}', "SubnetLen must be less than /31"),
    ('{"Network":' + "[" * 100_000 + "]" * 100_000 + "}", "invalid JSON: arrays/objects nested more than 100 deep"),
    # case 7: CIDRs as strict as Go's net.ParseCIDR, with upstream's message (naming the field)
    ('{"Network":"10.20.0.0"}', "Network: invalid CIDR address: 10.20.0.0"),
    ('{"Network":"10.20.0.0/255.255.0.0"}', "Network: invalid CIDR address: 10.20.0.0/255.255.0.0"),
    ('{"Network":"10.20.0.0/33"}', "Network: invalid CIDR address: 10.20.0.0/33"),
    ('{"Network":"10.20.0.0/ 16"}', "Network: invalid CIDR address: 10.20.0.0/ 16"),
    ('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::"}', "IPv6Network: invalid CIDR address: fc00::"),
    ('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"10.2.0.0/16"}', "IPv6Network: invalid IPv6 CIDR format"),
    # case 8: an empty pool is a config error, not "out of subnets: all -99 ..."
    ('{"Network":"10.1.0.0/16","SubnetMin":"10.1.200.0","SubnetMax":"10.1.100.0"}',
     "SubnetMin 10.1.200.0 is greater than SubnetMax 10.1.100.0"),
    ('{"Network":"10.1.0.0/16","SubnetMax":"10.1.0.0"}', "SubnetMin 10.1.1.0 is greater than SubnetMax 10.1.0.0"),
    ('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:9::",'
     '"IPv6SubnetMax":"fc00:0:0:8::"}', "IPv6SubnetMin fc00:0:0:9:: is greater than IPv6SubnetMax fc00:0:0:8::"),
    ('{"Network":"10.1.0.0/16","SubnetMin":5}', "SubnetMin: invalid IP address format"),
])
def test_validation_errors(raw, message):
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    assert message in str(ei.value)


def test_keys_case_insensitive_unknown_ignored_backend_defaults_to_udp():
    c = parse_config('{"network":"10.5.0.0/16","subnetlen":26,"Whatever":1}')
    assert c.network == IPv4Network("10.5.0.0/16") and c.subnet_len == 26
    assert c.backend_type == "udp"


def test_backend_options_case_insensitive():
    c = parse_config('{"Network":"10.5.0.0/16","Backend":{"type":"vxlan","vni":7,"Directrouting":true}}')
    assert c.backend_type == "vxlan"
    assert c.backend_option("VNI") == 7
    assert c.backend_option("DirectRouting") is True
    assert c.backend_option("Port", 0) == 0


def test_strict_cidr_still_masks_host_bits_and_takes_go_spellings():
    assert parse_config('{"Network":"10.1.2.3/16"}').network == IPv4Network("10.1.0.0/16")
    assert parse_config('{"Network":"10.1.0.0/016"}').network == IPv4Network("10.1.0.0/16")  # Go's dtoi


def test_ipv6_defaults():
    c = parse_config('{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}')
    assert str(c.ipv6_subnet_min) == "fc00:0:0:1::" and str(c.ipv6_subnet_max) == "fc00:0:0:ffff::"
    assert c.ipv6_subnet_len == 64


def test_contains_subnet():
    c = parse_config('{"Network":"10.1.0.0/16"}')
    assert c.contains_subnet(IPv4Network("10.1.5.0/24"))
    assert not c.contains_subnet(IPv4Network("10.1.0.0/24"))  # below SubnetMin
    assert not c.contains_subnet(IPv4Network("10.1.5.0/25"))
    assert not c.contains_subnet(IPv4Network("10.2.5.0/24"))
