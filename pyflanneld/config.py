"""The network config JSON stored at `<prefix>/config`, parsed and validated like upstream.

Upstream (pkg/subnet/config.go) decodes with Go's encoding/json: keys match case-insensitively,
unknown keys are ignored, a wrong JSON type is an error. `Backend` absent means `udp`.
Error texts of `CheckNetworkConfig` are reproduced verbatim; where upstream's text does not say
which field is wrong, it is prefixed with the field's name (``Network: invalid CIDR address: …``).

IPv4 and IPv6 (upstream ``CheckNetworkConfig``): the IPv4 fields are checked when ``EnableIPv4``
(default true), the IPv6 ones when ``EnableIPv6``; both off is "none defined stack" (upstream's
main.go). With ``EnableIPv4: false`` (IPv6-only) the IPv4 fields are still decoded (a malformed
value is an error, as for Go's decoder) but not checked, and :attr:`NetworkConfig.network` is
None: there is no IPv4 network to route or masquerade.

Beyond upstream: the JSON is decoded with bounds (jsondecode: depth, size, NaN/Infinity and
out-of-range numbers are errors, never RecursionError/OverflowError), integer fields must be JSON
integers in range (Go's uint), and SubnetMin must not be greater than SubnetMax (IPv6 likewise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from .jsondecode import JSONValueError, decode_json

_CIDR_RE = re.compile(r"([^/]*)/([0-9]{1,10})", re.ASCII)  # Go's net.ParseCIDR: addr "/" decimal
_UINT_MAX = (1 << 64) - 1


class ConfigError(ValueError):
    """The config is missing or invalid; the message is upstream's text (naming the field)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        if field and field not in message:
            message = f"{field}: {message}"
        super().__init__(message)


@dataclass(frozen=True)
class NetworkConfig:
    """A checked network config (upstream subnet.Config after CheckNetworkConfig).

    IPv4 (``enable_ipv4``): ``network``, ``subnet_len``, ``subnet_min``/``subnet_max`` (the first
    and last subnet's network address). With IPv4 off: ``network`` None, ``subnet_len`` 0 and
    both bounds 0.0.0.0 (upstream's zero values). IPv6 (``enable_ipv6``): ``ipv6_network``,
    ``ipv6_subnet_len``, ``ipv6_subnet_min``/``ipv6_subnet_max``; None/0 with IPv6 off.
    """

    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    enable_nftables: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    raw: str = field(default="", compare=False, hash=False)

    def backend_option(self, name: str, default: Any = None) -> Any:
        """A `Backend` field, matched case-insensitively like Go's JSON decoder."""
        for k, v in self.backend.items():
            if k.lower() == name.lower():
                return v
        return default

    def contains_subnet(self, sn: IPv4Network) -> bool:
        """Is `sn` a subnet this config could have handed out (right length, within min..max)?
        Upstream isSubnetConfigCompat; always False with IPv4 off."""
        return (
            self.network is not None
            and sn.prefixlen == self.subnet_len
            and self.subnet_min <= sn.network_address <= self.subnet_max
        )

    def contains_subnet6(self, sn6: IPv6Network) -> bool:
        """The IPv6 twin of :meth:`contains_subnet` (upstream isIPv6SubnetConfigCompat for a
        non-empty subnet): right length, network address within IPv6SubnetMin..IPv6SubnetMax.
        Always False with IPv6 off."""
        return (
            self.ipv6_network is not None
            and self.ipv6_subnet_min is not None
            and self.ipv6_subnet_max is not None
            and sn6.prefixlen == self.ipv6_subnet_len
            and self.ipv6_subnet_min <= sn6.network_address <= self.ipv6_subnet_max
        )


_KNOWN = {
    "network": "Network",
    "ipv6network": "IPv6Network",
    "enableipv4": "EnableIPv4",
    "enableipv6": "EnableIPv6",
    "enablenftables": "EnableNFTables",
    "subnetlen": "SubnetLen",
    "subnetmin": "SubnetMin",
    "subnetmax": "SubnetMax",
    "ipv6subnetlen": "IPv6SubnetLen",
    "ipv6subnetmin": "IPv6SubnetMin",
    "ipv6subnetmax": "IPv6SubnetMax",
    "backend": "Backend",
}


def _fold(d: dict[str, Any]) -> dict[str, Any]:
    """Go's decoder: for each known field, take a case-insensitive match (last one wins)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        canon = _KNOWN.get(k.lower())
        if canon:
            out[canon] = v
    return out


def _typed(d: dict[str, Any], key: str, typ: type, tname: str) -> Any:
    """A field of Go type ``tname``: None when absent/null, else the value; ConfigError (Go's
    decoder text) for a wrong JSON type. ``int`` fields are Go uints: a JSON integer literal
    (not 24.0, not 1e2) in 0..2**64-1."""
    v = d.get(key)
    if v is None:
        return None
    if typ is int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _UINT_MAX:
            what = f"number {v!r}" if isinstance(v, (int, float)) and not isinstance(v, bool) else json_type(v)
            raise ConfigError(f"json: cannot unmarshal {what} into Go struct field Config.{key} of type {tname}")
        return v
    if not isinstance(v, typ):
        raise ConfigError(f"json: cannot unmarshal {json_type(v)} into Go struct field Config.{key} of type {tname}")
    return v


def json_type(v: Any) -> str:
    """The JSON type name Go's decoder errors use for a decoded value."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def _parse_cidr(s: str, key: str) -> IPv4Network | IPv6Network:
    """Go's net.ParseCIDR: ``<IPv4 or IPv6 address>/<decimal prefix length>``, host bits masked
    off; nothing else (no bare address, no netmask). Error: upstream's ``invalid CIDR address: s``."""
    m = _CIDR_RE.fullmatch(s)
    if m is not None:
        plen = int(m[2])
        try:
            if plen <= 32:
                return IPv4Network((int(IPv4Address(m[1])), plen), strict=False)
        except ValueError:
            pass
        try:
            if plen <= 128 and "%" not in m[1]:
                return IPv6Network((int(IPv6Address(m[1])), plen), strict=False)
        except ValueError:
            pass
    raise ConfigError(f"invalid CIDR address: {s if len(s) <= 60 else s[:57] + '...'}", key)


def _parse_v4_net(s: str) -> IPv4Network:
    net = _parse_cidr(s, "Network")
    if not isinstance(net, IPv4Network):
        raise ConfigError("invalid IPv4 CIDR format", "Network")
    return net


def _parse_v4_ip(s: Any, key: str) -> IPv4Address:
    if not isinstance(s, str):
        raise ConfigError("invalid IP address format", key)
    try:
        return IPv4Address(s)
    except ValueError:
        try:
            IPv6Address(s)
        except ValueError:
            raise ConfigError("invalid IP address format", key) from None
        raise ConfigError("invalid IPv4 address format", key) from None


def parse_config(raw: str | bytes) -> NetworkConfig:
    """Parse and validate; raises :class:`ConfigError` (only) with upstream's message."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        doc = decode_json(raw)
    except JSONValueError as e:
        raise ConfigError(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"json: cannot unmarshal {json_type(doc)} into Go value of type subnet.Config")
    d = _fold(doc)

    enable_ipv4 = _typed(d, "EnableIPv4", bool, "bool")
    enable_ipv4 = True if enable_ipv4 is None else enable_ipv4
    enable_ipv6 = bool(_typed(d, "EnableIPv6", bool, "bool"))
    enable_nft = bool(_typed(d, "EnableNFTables", bool, "bool"))

    backend = d.get("Backend")
    if backend is None:
        backend_type = "udp"
        backend = {}
    else:
        if not isinstance(backend, dict):
            raise ConfigError(
                f"error decoding Backend property of config: json: cannot unmarshal {json_type(backend)} "
                "into Go value of type struct { Type string }"
            )
        bt = next((v for k, v in backend.items() if k.lower() == "type"), None)
        if bt is not None and not isinstance(bt, str):
            raise ConfigError(
                "error decoding Backend property of config: json: cannot unmarshal "
                f"{json_type(bt)} into Go struct field .Type of type string"
            )
        backend_type = bt or ""
        if not backend_type:
            raise ConfigError("unknown backend type: ", "Backend.Type")

    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("none defined stack: set EnableIPv4 or EnableIPv6 to true")
    v4 = _parse_v4(d) if enable_ipv4 else _decode_v4(d)
    v6 = _parse_v6(d) if enable_ipv6 else _decode_v6(d)

    return NetworkConfig(
        network=v4[0],
        subnet_len=v4[1],
        subnet_min=v4[2],
        subnet_max=v4[3],
        backend_type=backend_type,
        backend=backend,
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        enable_nftables=enable_nft,
        ipv6_network=v6[0],
        ipv6_subnet_len=v6[1],
        ipv6_subnet_min=v6[2],
        ipv6_subnet_max=v6[3],
        raw=raw,
    )


def _parse_v4(d: dict[str, Any]) -> tuple[IPv4Network, int, IPv4Address, IPv4Address]:
    """The IPv4 part of upstream CheckNetworkConfig: (Network, SubnetLen, SubnetMin, SubnetMax)."""
    net_s = _typed(d, "Network", str, "ip.IP4Net")
    if not net_s:
        raise ConfigError("please define a correct Network parameter in the flannel config")
    network = _parse_v4_net(net_s)
    if network.prefixlen == 0:  # upstream's IP4Net.Empty(): 0.0.0.0/0 is "no Network"
        raise ConfigError("please define a correct Network parameter in the flannel config")

    subnet_len = _typed(d, "SubnetLen", int, "uint")
    if subnet_len:  # Go: zero value means "unset"
        if subnet_len > 30:
            raise ConfigError("SubnetLen must be less than /31")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets", "SubnetLen")
    else:
        if network.prefixlen > 28:
            raise ConfigError("network is too small. Minimum useful network prefix is /28", "Network")
        subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    net_start = int(network.network_address)
    net_end = int(network.broadcast_address)

    # Upstream's zero value means "unset": absent, null or "0.0.0.0" (what Go marshals for an unset
    # ip.IP4, e.g. a config dumped by a tool) all take the default.
    smin = d.get("SubnetMin")
    subnet_min = IPv4Address(0) if smin in (None, "") else _parse_v4_ip(smin, "SubnetMin")
    if int(subnet_min) == 0:
        subnet_min = IPv4Address(net_start + size)
    elif subnet_min not in network:
        raise ConfigError("SubnetMin is not in the range of the Network")

    smax = d.get("SubnetMax")
    subnet_max = IPv4Address(0) if smax in (None, "") else _parse_v4_ip(smax, "SubnetMax")
    if int(subnet_max) == 0:
        subnet_max = IPv4Address(net_end + 1 - size)
    elif subnet_max not in network:
        raise ConfigError("SubnetMax is not in the range of the Network")

    mask = (0xFFFFFFFF << (32 - subnet_len)) & 0xFFFFFFFF
    if int(subnet_min) & ~mask & 0xFFFFFFFF:
        raise ConfigError(f"SubnetMin is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) & ~mask & 0xFFFFFFFF:
        raise ConfigError(f"SubnetMax is not on a SubnetLen boundary: {subnet_max}")
    if subnet_min > subnet_max:  # upstream accepts this and then finds no subnet to lease
        raise ConfigError(f"SubnetMin {subnet_min} is greater than SubnetMax {subnet_max}: no subnet to lease")
    return network, subnet_len, subnet_min, subnet_max


def _decode_v4(d: dict[str, Any]) -> tuple[None, int, IPv4Address, IPv4Address]:
    """IPv4 off (IPv6-only): the IPv4 fields are decoded like Go's decoder would (a malformed
    value is still an error) but not checked, and take upstream's zero values."""
    net_s = _typed(d, "Network", str, "ip.IP4Net")
    if net_s:
        _parse_v4_net(net_s)
    _typed(d, "SubnetLen", int, "uint")
    for key in ("SubnetMin", "SubnetMax"):
        if d.get(key) not in (None, ""):
            _parse_v4_ip(d[key], key)
    zero = IPv4Address(0)
    return None, 0, zero, zero


def _parse_v6(d: dict[str, Any]) -> tuple[IPv6Network, int, IPv6Address, IPv6Address]:
    """The IPv6 part of upstream CheckNetworkConfig: (IPv6Network, IPv6SubnetLen, IPv6SubnetMin,
    IPv6SubnetMax), with upstream's texts and checks in its order."""
    net_s = _typed(d, "IPv6Network", str, "ip.IP6Net")
    if not net_s:
        raise ConfigError("please define a correct IPv6Network parameter in the flannel config")
    net = _parse_cidr(net_s, "IPv6Network")
    if not isinstance(net, IPv6Network):
        raise ConfigError("invalid IPv6 CIDR format", "IPv6Network")
    if net.prefixlen == 0:  # upstream's IP6Net.Empty(): ::/0 is "no IPv6Network"
        raise ConfigError("please define a correct IPv6Network parameter in the flannel config")
    ln = _typed(d, "IPv6SubnetLen", int, "uint")
    if ln:
        if ln > 126:
            raise ConfigError("SubnetLen must be less than /127", "IPv6SubnetLen")
        if ln < net.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets", "IPv6SubnetLen")
    else:
        if net.prefixlen > 124:
            raise ConfigError("IPv6Network is too small. Minimum useful network prefix is /124")
        ln = 64 if net.prefixlen <= 62 else net.prefixlen + 2
    size = 1 << (128 - ln)
    start, end = int(net.network_address), int(net.broadcast_address)

    def ip6(key: str, default: int, label: str) -> IPv6Address:
        v = d.get(key)
        if v in (None, ""):
            return IPv6Address(default)
        try:
            if not isinstance(v, str) or "%" in v:
                raise ValueError
            a = IPv6Address(v)
        except ValueError:
            raise ConfigError("invalid IPv6 address format", key) from None
        if a not in net:
            raise ConfigError(f"{label} is not in the range of the IPv6Network")
        return a

    mn = ip6("IPv6SubnetMin", start + size, "IPv6SubnetMin")
    mx = ip6("IPv6SubnetMax", end + 1 - size, "IPv6SubnetMax")
    if int(mn) % size:
        raise ConfigError(f"IPv6SubnetMin is not on a SubnetLen boundary: {mn}")
    if int(mx) % size:
        raise ConfigError(f"IPv6SubnetMax is not on a SubnetLen boundary: {mx}")
    if mn > mx:
        raise ConfigError(f"IPv6SubnetMin {mn} is greater than IPv6SubnetMax {mx}: no subnet to lease")
    return net, ln, mn, mx


def _decode_v6(d: dict[str, Any]) -> tuple[None, int, None, None]:
    """IPv6 off: the IPv6 fields are decoded like Go's decoder would (a malformed value is an
    error) but not checked; the config carries no IPv6 part."""
    net_s = _typed(d, "IPv6Network", str, "ip.IP6Net")
    if net_s:
        _parse_cidr(net_s, "IPv6Network")
    _typed(d, "IPv6SubnetLen", int, "uint")
    for key in ("IPv6SubnetMin", "IPv6SubnetMax"):
        v = d.get(key)
        if v not in (None, "") and not (isinstance(v, str) and _is_ip(v)):
            raise ConfigError("invalid IP address format", key)
    return None, 0, None, None


def _is_ip(s: str) -> bool:
    """Would Go's net.ParseIP accept ``s`` (an IPv4 or IPv6 address, no zone)?"""
    try:
        IPv4Address(s) if ":" not in s else IPv6Address(s)
    except ValueError:
        return False
    return "%" not in s
