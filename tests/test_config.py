"""Network config parsing and validation: upstream's defaults and error texts, table-driven."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

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


# --- IPv6 (issue 13.1): upstream CheckNetworkConfig's IPv6 half, and IPv6-only -----------------
V6 = '"EnableIPv6":true,"IPv6Network":'


@pytest.mark.parametrize("raw,net6,slen6,smin6,smax6", [
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48"}', "fc00::/48", 64, "fc00:0:0:1::", "fc00:0:0:ffff::"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/62"}', "fc00::/62", 64, "fc00:0:0:1::", "fc00:0:0:3::"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/63"}', "fc00::/63", 65, "fc00::8000:0:0:0", "fc00:0:0:1:8000::"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/124"}', "fc00::/124", 126, "fc00::4", "fc00::c"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::1/48"}', "fc00::/48", 64, "fc00:0:0:1::", "fc00:0:0:ffff::"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetLen":56}', "fc00::/48", 56, "fc00:0:0:100::",
     "fc00:0:0:ff00::"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetMin":"fc00:0:0:10::","IPv6SubnetMax":"fc00:0:0:20::"}',
     "fc00::/48", 64, "fc00:0:0:10::", "fc00:0:0:20::"),
    ('{"network":"10.1.0.0/16","enableipv6":true,"ipv6network":"fd80::/56","ipv6subnetlen":60}',  # any case
     "fd80::/56", 60, "fd80:0:0:10::", "fd80:0:0:f0::"),
])
def test_ipv6_defaults_and_overrides(raw, net6, slen6, smin6, smax6):
    c = parse_config(raw)
    assert c.enable_ipv4 and c.enable_ipv6
    assert c.ipv6_network == IPv6Network(net6) and c.ipv6_subnet_len == slen6
    assert (c.ipv6_subnet_min, c.ipv6_subnet_max) == (IPv6Address(smin6), IPv6Address(smax6))


@pytest.mark.parametrize("raw,message", [
    ('{"Network":"10.1.0.0/16","EnableIPv6":true}', "please define a correct IPv6Network parameter in the flannel config"),
    ('{"Network":"10.1.0.0/16",' + V6 + '""}', "please define a correct IPv6Network parameter in the flannel config"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"::/0"}', "please define a correct IPv6Network parameter in the flannel config"),
    ('{"Network":"0.0.0.0/0"}', "please define a correct Network parameter in the flannel config"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetLen":127}', "SubnetLen must be less than /127"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetLen":49}',
     "network must be able to accommodate at least four subnets"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/125"}', "IPv6Network is too small. Minimum useful network prefix is /124"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetMin":"fd00::1:0:0:0"}',
     "IPv6SubnetMin is not in the range of the IPv6Network"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetMax":"fd00::1:0:0:0"}',
     "IPv6SubnetMax is not in the range of the IPv6Network"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::5"}',
     "IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::5"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetMax":"fc00:0:0:9:8000::"}',
     "IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:9:8000::"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetMin":"10.0.0.1"}',
     "IPv6SubnetMin: invalid IPv6 address format"),
    ('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetLen":"64"}',
     "cannot unmarshal string into Go struct field Config.IPv6SubnetLen of type uint"),
    ('{"Network":"10.1.0.0/16",' + V6 + '5}', "cannot unmarshal number into Go struct field Config.IPv6Network"),
    # the IPv4 half is checked first, as upstream does
    ('{"Network":"10.1.0.0/29",' + V6 + '"fc00::/125"}', "network is too small. Minimum useful network prefix is /28"),
    # IPv6-only: no IPv6Network is the same error; both stacks off is upstream's main.go error
    ('{"EnableIPv4":false,"EnableIPv6":true}', "please define a correct IPv6Network parameter in the flannel config"),
    ('{"EnableIPv4":false,"EnableIPv6":false,' + '"IPv6Network":"fc00::/48"}', "none defined stack"),
    # a field of the stack that is off is still decoded like Go's decoder (malformed = error), not checked
    ('{"EnableIPv4":false,' + V6 + '"fc00::/48","Network":"garbage"}', "Network: invalid CIDR address: garbage"),
    ('{"EnableIPv4":false,' + V6 + '"fc00::/48","SubnetMin":"x"}', "SubnetMin: invalid IP address format"),
    ('{"Network":"10.1.0.0/16","IPv6Network":"fc00::"}', "IPv6Network: invalid CIDR address: fc00::"),
    ('{"Network":"10.1.0.0/16","IPv6SubnetMin":7}', "IPv6SubnetMin: invalid IP address format"),
])
def test_ipv6_validation_errors(raw, message):
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    assert message in str(ei.value)


def test_ipv6_only_config_has_no_ipv4_network():
    c = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd80::/48","Backend":{"Type":"vxlan"}}')
    assert not c.enable_ipv4 and c.enable_ipv6
    assert c.network is None and c.subnet_len == 0
    assert c.ipv6_network == IPv6Network("fd80::/48") and c.ipv6_subnet_len == 64
    assert not c.contains_subnet(IPv4Network("0.0.0.0/0"))
    # an IPv4 Network given anyway (upstream keeps it unchecked) is valid JSON but not used
    c = parse_config('{"EnableIPv4":false,"Network":"10.1.0.0/30","SubnetLen":31,"EnableIPv6":true,'
                     '"IPv6Network":"fd80::/48"}')
    assert c.network is None


def test_ipv6_fields_ignored_when_ipv6_is_off():
    c = parse_config('{"Network":"10.1.0.0/16","IPv6Network":"fc00::/125","IPv6SubnetLen":200}')
    assert not c.enable_ipv6 and c.ipv6_network is None and c.ipv6_subnet_len == 0


def test_contains_subnet6():
    c = parse_config('{"Network":"10.1.0.0/16",' + V6 + '"fc00::/48","IPv6SubnetMax":"fc00:0:0:ff::"}')
    assert c.contains_subnet6(IPv6Network("fc00:0:0:5::/64"))
    assert c.contains_subnet6(IPv6Network("fc00:0:0:ff::/64"))
    assert not c.contains_subnet6(IPv6Network("fc00::/64"))  # below IPv6SubnetMin
    assert not c.contains_subnet6(IPv6Network("fc00:0:0:100::/64"))  # above IPv6SubnetMax
    assert not c.contains_subnet6(IPv6Network("fc00:0:0:5::/80"))
    assert not parse_config('{"Network":"10.1.0.0/16"}').contains_subnet6(IPv6Network("fc00:0:0:5::/64"))
