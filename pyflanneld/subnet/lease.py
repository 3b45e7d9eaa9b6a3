"""Leases as stored in etcd: key names, the LeaseAttrs JSON, and lease events.

Byte-compatible with upstream flanneld (pkg/lease, pkg/subnet): key `10.5.52.0-24`
(dual stack `10.5.52.0-24&fc00:0:0:5::-64`, IPv6-only `0.0.0.0-0&fc00:0:0:5::-64`: upstream's
etcd manager always writes an IPv4 part, its zero value when IPv4 is off), value
`{"PublicIP":"…","PublicIPv6":null,"BackendType":"vxlan","BackendData":{…}}` — dual stack
`{"PublicIP":"…","PublicIPv6":"fd99::2","BackendType":"vxlan","BackendData":{…},"BackendV6Data":{…}}`
and IPv6-only `{"PublicIP":"0.0.0.0","PublicIPv6":"fd99::2","BackendType":"vxlan","BackendV6Data":{…}}`.
IPv6 addresses are written as Go prints them (:func:`go_ip6_text`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Any

from ..jsondecode import JSONValueError, decode_json

if TYPE_CHECKING:
    from .store import Record

# Upstream's subnetRegex (pkg/subnet/subnet.go), matched against the whole last path element here
# (upstream's is anchored only at the end). ASCII digits only, as Go's \d.
_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?", re.ASCII)
# A dotted quad as Go's net.ParseIP reads it (no leading zeros); parsed here without ipaddress's
# string parser, which dominates the cost of a relist of thousands of leases.
_IPV4_RE = re.compile(r"(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")
# Go's net.ParseMAC forms for a 6-byte address: aa:bb:cc:dd:ee:ff, aa-bb-…, aabb.ccdd.eeff.
_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}|[0-9a-f]{2}(?:-[0-9a-f]{2}){5}|[0-9a-f]{4}(?:\.[0-9a-f]{4}){2}")


class LeaseFormatError(ValueError):
    """A subnet key or lease value that cannot be decoded; the message names the field."""


def go_ip6_text(addr: IPv6Address) -> str:
    """An IPv6 address as upstream prints it (pkg/ip/ip6net.go IP6.String, then Go's net.IP):
    RFC 5952 text like Python's, except that a value in [2**24, 2**32) or in ::ffff:0:0/96 prints
    as dotted IPv4 (``::ffff:10.0.0.1`` → ``10.0.0.1``). Used for keys, PublicIPv6 and subnet.env."""
    v = int(addr)
    if (1 << 24) <= v < (1 << 32) or v >> 32 == 0xFFFF:
        return str(IPv4Address(v & 0xFFFFFFFF))
    return str(addr)


def subnet_key(subnet: IPv4Network, subnet6: IPv6Network | None = None) -> str:
    """`10.1.15.0/24` → `10.1.15.0-24` (the last path element of the etcd key); with an IPv6
    subnet upstream's MakeSubnetKey dual form `10.1.15.0-24&fc00:0:0:f::-64`. For an IPv6-only
    lease pass ``subnet`` = allocate.IPV4_OFF_SUBNET (0.0.0.0/0): `0.0.0.0-0&fc00:0:0:f::-64`."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if subnet6 is not None:
        key += f"&{go_ip6_text(subnet6.network_address)}-{subnet6.prefixlen}"
    return key


def _ipv4_int(s: str) -> int | None:
    """``a.b.c.d`` → its 32-bit value; None if ``s`` is not exactly a dotted quad."""
    m = _IPV4_RE.fullmatch(s)
    if m is None:
        return None
    a, b, c, d = map(int, m.groups())
    if a > 255 or b > 255 or c > 255 or d > 255:
        return None
    return a << 24 | b << 16 | c << 8 | d


def parse_subnet_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Inverse of :func:`subnet_key`; accepts a full etcd key too (uses the last path element).

    Mirrors upstream ParseSubnetKey: the IPv4 prefix length must fit 5 bits (0-31), the IPv6 one
    7 bits (0-127). Stricter than upstream in two ways that no key upstream writes can meet: the
    whole element must match (upstream ignores leading junk) and host bits must be zero.
    Raises :class:`LeaseFormatError`.
    """
    name = key.rsplit("/", 1)[-1]
    m = _KEY_RE.fullmatch(name)
    if not m:
        raise LeaseFormatError(f"not a subnet key: {shown_key(name)}")
    if len(m[2]) > 2 or int(m[2]) > 31 or (m[4] is not None and (len(m[4]) > 3 or int(m[4]) > 127)):
        raise LeaseFormatError(f"not a subnet key: {shown_key(name)} (prefix length out of range)")
    addr = _ipv4_int(m[1])
    if addr is None:
        raise LeaseFormatError(f"not a subnet key: {shown_key(name)} ({shown_key(m[1])} is not an IPv4 address)")
    try:
        sn = IPv4Network((addr, int(m[2])))
        sn6 = IPv6Network(f"{m[3]}/{m[4]}") if m[3] else None
    except ValueError as e:
        raise LeaseFormatError(f"not a subnet key: {shown_key(name)} ({shown_key(str(e))[1:-1]})") from None
    return sn, sn6


def shown_key(text: str, limit: int = 80) -> str:
    """A key (or part of one) as messages show it: quoted, control characters escaped, at most
    ``limit`` characters of it — an etcd key can be 1.5 MB long and hold newlines, which must not
    become a 1.5 MB log line or extra lines in /readyz."""
    r = repr(text[:limit])
    return r[:-1] + "..." + r[-1] if len(text) > limit else r


def log_key(key: str, limit: int = 80) -> str:
    """A record's key for a log field or a /readyz line: as it is when short and printable, else
    :func:`shown_key`."""
    return key if len(key) <= limit and key.isprintable() else shown_key(key, limit)


def parse_mac(value: Any) -> str | None:
    """A 6-byte MAC in one of Go's net.ParseMAC spellings → ``aa:bb:cc:dd:ee:ff``; else None."""
    if not isinstance(value, str):
        return None
    s = value.lower()
    if not _MAC_RE.fullmatch(s):
        return None
    if s[2] == ":":
        return value if s == value else s  # the caller's string when already normal: one copy per lease
    h = s.replace("-", "").replace(".", "")
    return f"{h[0:2]}:{h[2:4]}:{h[4:6]}:{h[6:8]}:{h[8:10]}:{h[10:12]}"


def vtep_mac(backend_data: Any) -> str | None:
    """The VtepMAC of a vxlan lease's BackendData (keys case-insensitive like Go), normalised; or
    None when absent or not a 6-byte MAC."""
    if not isinstance(backend_data, dict):
        return None
    return parse_mac(_fold(backend_data).get("vtepmac"))


def _fold(d: dict[str, Any]) -> dict[str, Any]:
    """Go's encoding/json matches keys case-insensitively; the last duplicate wins."""
    return {k.lower(): v for k, v in d.items()}


def _check_vxlan_data(data: Any, field: str = "BackendData") -> str | None:
    """upstream vxlanLeaseAttrs {VNI uint16; VtepMAC hardwareAddr}; VtepMAC must be usable as a
    remote VTEP: unicast and not all zeros. ``field``: BackendData or BackendV6Data (the IPv6
    device's, same shape), for the message."""
    if not isinstance(data, dict):
        return f"{field}: a vxlan lease needs an object with VtepMAC"
    d = _fold(data)
    raw_mac = d.get("vtepmac")
    if raw_mac is None:
        return f"{field}.VtepMAC: missing"
    mac = parse_mac(raw_mac)
    if mac is None:
        return f"{field}.VtepMAC: {_show(raw_mac)} is not a 6-byte MAC address"
    first = int(mac[:2], 16)
    if first & 1:
        return f"{field}.VtepMAC: {mac} is a multicast address"
    if mac == "00:00:00:00:00:00":
        return f"{field}.VtepMAC: {mac} is all zeros"
    vni = d.get("vni")
    if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni <= 0xFFFF):
        return f"{field}.VNI: {_show(vni)} is not an integer 0-65535"
    return None


WG_KEY_LEN = 32


def parse_wg_key(text: str) -> bytes:
    """A base64 WireGuard key (``wg genkey``/``wg pubkey`` output) → its 32 bytes; ValueError (one
    line) if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != WG_KEY_LEN:
        raise ValueError(f"{len(raw)} bytes instead of {WG_KEY_LEN}")
    return raw


def wg_public_key(data: Any) -> str | None:
    """upstream wireguardLeaseAttrs {PublicKey string}: the key, normalised base64, or None."""
    if not isinstance(data, dict):
        return None
    key = _fold(data).get("publickey")
    if not isinstance(key, str):
        return None
    try:
        return base64.b64encode(parse_wg_key(key)).decode()
    except ValueError:
        return None


def _check_wireguard_data(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "BackendData: a wireguard lease needs an object with PublicKey"
    if wg_public_key(data) is None:
        return f"BackendData.PublicKey: {_show(_fold(data).get('publickey'))} is not a base64 WireGuard key"
    return None


# BackendType → check of that type's BackendData (None: fine, else the problem). Types without an
# entry (host-gw, ipip, ipsec, udp/alloc "", ...) carry no BackendData the kernel depends on.
BACKEND_DATA_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "vxlan": _check_vxlan_data, "wireguard": _check_wireguard_data}
# The same for BackendV6Data (the IPv6 half of a dual-stack or IPv6-only lease).
BACKEND_V6_DATA_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "vxlan": lambda data: _check_vxlan_data(data, "BackendV6Data"),
}


def check_backend_data(backend_type: str, data: Any) -> str | None:
    """Is ``data`` valid BackendData for ``backend_type``? None if so, else a one-line problem."""
    check = BACKEND_DATA_CHECKS.get(backend_type)
    return check(data) if check else None


def check_backend_v6_data(backend_type: str, data: Any) -> str | None:
    """Is ``data`` valid BackendV6Data for ``backend_type``? None if so, else a one-line problem
    (naming BackendV6Data)."""
    check = BACKEND_V6_DATA_CHECKS.get(backend_type)
    return check(data) if check else None


def _show(v: Any) -> str:
    """A short rendering of a decoded JSON value for an error message (type for containers)."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "an array"
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_public_ip(v: Any) -> IPv4Address:
    """Upstream decodes PublicIP as ip.IP4 (a dotted string); anything else is no usable peer."""
    if v is None:
        raise LeaseFormatError("PublicIP: missing")
    if not isinstance(v, str):
        raise LeaseFormatError(f"PublicIP: {_show(v)} is not an IPv4 address string")
    n = _ipv4_int(v)
    if n is None:
        raise LeaseFormatError(f"PublicIP: {_show(v)} is not an IPv4 address")
    return IPv4Address(n)


def _check_public_ipv6(v: Any) -> IPv6Address | None:
    """Upstream decodes PublicIPv6 as *ip.IP6: null (no IPv6) or an address string; "" or a zone
    (``fe80::1%eth0``) are refused as by Go's net.ParseIP, an IPv4 text too (it is no IPv6 peer)."""
    if v is None:
        return None
    try:
        if not isinstance(v, str) or "%" in v:
            raise ValueError
        return IPv6Address(v)
    except ValueError:
        raise LeaseFormatError(f"PublicIPv6: {_show(v)} is not an IPv6 address") from None


def _compact(data: Any) -> Any:
    """Decoded BackendData as it is kept for the lease's lifetime: an object's keys interned (the
    JSON decoder makes new "VNI"/"VtepMAC" strings for every lease; thousands of peers share one)."""
    if isinstance(data, dict):
        return {sys.intern(k): v for k, v in data.items()}
    return data


# The value every flanneld writes for an IPv4 lease (Go's json.Marshal of LeaseAttrs; to_json here):
# {"PublicIP":"…","PublicIPv6":null[,"BackendType":"…"][,"BackendData":{"VNI":n,"VtepMAC":"…"}]}.
# Matched whole it has exactly one meaning (no escapes, duplicates, other keys or spacing; JSON
# integers without leading zeros), so LeaseAttrs.from_json reads it without the JSON decoder and
# the temporaries it makes per lease (most of a relist's time, and holes in the allocator's arenas
# between the leases that stay). tests/test_subnet_logic.py checks it against the general path.
_CANONICAL = re.compile(
    rb'\{"PublicIP":"([0-9.]{1,15})","PublicIPv6":null(?:,"BackendType":"([a-z0-9-]{1,32})")?'
    rb'(?:,"BackendData":\{"VNI":(0|[1-9][0-9]{0,8}),"VtepMAC":"([0-9a-f]{2}(?::[0-9a-f]{2}){5})"\})?\}')
_VNI, _VTEPMAC = sys.intern("VNI"), sys.intern("VtepMAC")


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """upstream pkg/lease LeaseAttrs: what a host publishes in its lease value.

    ``public_ip``: 0.0.0.0 in an IPv6-only lease (upstream's zero IP4). ``public_ipv6`` and
    ``backend_v6_data``: the IPv6 peer address and the IPv6 device's data (vxlan: the
    ``flannel-v6.<VNI>`` MAC), None when the host publishes no IPv6.
    """

    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON (dict, str, …) or None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Any = None

    def to_json(self) -> str:
        """Serialise in upstream's field order (PublicIP, PublicIPv6 — ``null`` when absent —,
        BackendType, BackendData, BackendV6Data); empty fields omitted like Go's `omitempty`."""
        pub6 = go_ip6_text(self.public_ipv6) if self.public_ipv6 is not None else None
        d: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": pub6}
        if self.backend_type:
            d["BackendType"] = self.backend_type
        if self.backend_data is not None:
            d["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            d["BackendV6Data"] = self.backend_v6_data
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> LeaseAttrs:
        """Decode a lease value (bounded, see jsondecode). PublicIP must be an IPv4 string,
        PublicIPv6 null or an IPv6 string, BackendType a string. BackendData/BackendV6Data are not
        checked here (see :func:`check_backend_data`, :func:`check_backend_v6_data`). Raises
        :class:`LeaseFormatError` naming the field.

        The value a flanneld writes (:data:`_CANONICAL`) is read without the JSON decoder, to the
        same result; any other value takes the general path (:meth:`decode`)."""
        m = _CANONICAL.fullmatch(raw) if isinstance(raw, bytes) else None
        if m is None:
            return cls.decode(raw)
        bt, vni, mac = m[2], m[3], m[4]
        return cls(public_ip=_check_public_ip(m[1].decode()),
                   backend_type=sys.intern(bt.decode()) if bt is not None else "",
                   backend_data={_VNI: int(vni), _VTEPMAC: mac.decode()} if vni is not None else None)

    @classmethod
    def decode(cls, raw: str | bytes) -> LeaseAttrs:
        """:meth:`from_json` through the bounded JSON decoder, for any value."""
        try:
            d = decode_json(raw)
        except JSONValueError as e:
            raise LeaseFormatError(f"lease value is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        d = _fold(d)
        pub = _check_public_ip(d.get("publicip"))
        bt = d.get("backendtype")
        if bt is None:
            bt = ""
        if not isinstance(bt, str):
            raise LeaseFormatError(f"BackendType: {_show(bt)} is not a string")
        pub6 = _check_public_ipv6(d.get("publicipv6"))
        return cls(
            public_ip=pub,
            backend_type=sys.intern(bt),
            backend_data=_compact(d.get("backenddata")),
            public_ipv6=pub6,
            backend_v6_data=_compact(d.get("backendv6data")),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """One subnet lease as flannel keeps it in etcd (upstream ``pkg/subnet`` Lease): the IPv4 subnet
    (0.0.0.0/0 for an IPv6-only lease), the attributes (the key's JSON value), the expiration (Unix
    seconds; None when unknown or for a reservation), whether it is a reservation (no TTL), the
    IPv6 subnet, and the key's revision. Equality ignores expiration and revision."""
    subnet: IPv4Network
    attrs: LeaseAttrs
    # Unix time the lease runs out; None when unknown (peers' leases) or never (reservations).
    expiration: float | None = field(default=None, compare=False)
    reserved: bool = False  # a key without TTL: an admin's reservation, never given a TTL by us
    subnet6: IPv6Network | None = None
    # Datastore bookkeeping: v3 mod_revision / v2 modifiedIndex of the key.
    revision: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        """The etcd key's last element (:func:`subnet_key`: ``10.5.1.0-24``, dual stack
        ``10.5.1.0-24&fd80:0:0:1::-64``)."""
        return subnet_key(self.subnet, self.subnet6)

    @property
    def peer_id(self) -> IPv4Network | IPv6Network:
        """What tells this lease apart from the others of one network (the backends' peer key):
        its IPv4 subnet, or for an IPv6-only lease (IPv4 part ``0.0.0.0/0``) its IPv6 subnet."""
        if self.subnet.prefixlen == 0 and self.subnet6 is not None:
            return self.subnet6
        return self.subnet

    def __str__(self) -> str:
        """The subnets, for logs: ``10.5.1.0/24``, ``10.5.1.0/24 fd80:0:0:1::/64`` (dual stack)
        or ``fd80:0:0:1::/64`` (IPv6-only)."""
        if self.subnet6 is None:
            return str(self.subnet)
        if self.subnet.prefixlen == 0:
            return str(self.subnet6)
        return f"{self.subnet} {self.subnet6}"

def lease_from_record(rec: Record, attrs: LeaseAttrs | None = None) -> Lease:
    """A datastore record as a Lease: key parsed, value decoded (:meth:`LeaseAttrs.from_json`),
    or ``attrs`` taken as the value when the caller has them (the record it just wrote). Per-lease
    format only; what depends on the config or on other leases is the LeaseBook's. Raises
    :class:`LeaseFormatError`."""
    sn, sn6 = parse_subnet_key(rec.key)
    if attrs is None:
        attrs = LeaseAttrs.from_json(rec.value)
    return Lease(sn, attrs, rec.expiration, not rec.has_ttl, sn6, rec.revision)
