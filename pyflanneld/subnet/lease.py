"""Leases as stored in etcd: key names, the LeaseAttrs JSON, and lease events.

Byte-compatible with upstream flanneld (pkg/lease, pkg/subnet): key `10.5.52.0-24`
(dual stack `10.5.52.0-24&fc00:0:0:5::-64`), value
`{"PublicIP":"…","PublicIPv6":null,"BackendType":"vxlan","BackendData":{…}}`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any, Literal

_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


class LeaseFormatError(ValueError):
    """A subnet key or lease value that cannot be decoded."""


def subnet_key(subnet: IPv4Network, subnet6: IPv6Network | None = None) -> str:
    """`10.1.15.0/24` → `10.1.15.0-24` (the last path element of the etcd key)."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if subnet6 is not None:
        key += f"&{subnet6.network_address}-{subnet6.prefixlen}"
    return key


def parse_subnet_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Inverse of :func:`subnet_key`; accepts a full etcd key too (uses the last path element)."""
    name = key.rsplit("/", 1)[-1]
    m = _KEY_RE.fullmatch(name)
    if not m:
        raise LeaseFormatError(f"not a subnet key: {name!r}")
    try:
        sn = IPv4Network(f"{m[1]}/{m[2]}")
        sn6 = IPv6Network(f"{m[3]}/{m[4]}") if m[3] else None
    except ValueError as e:
        raise LeaseFormatError(f"not a subnet key: {name!r} ({e})") from None
    return sn, sn6


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON (dict, str, …) or None
    public_ipv6: str | None = None
    backend_v6_data: Any = None

    def to_json(self) -> str:
        """Serialise in upstream's field order; empty fields omitted like Go's `omitempty`."""
        d: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": self.public_ipv6}
        if self.backend_type:
            d["BackendType"] = self.backend_type
        if self.backend_data is not None:
            d["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            d["BackendV6Data"] = self.backend_v6_data
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> LeaseAttrs:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseFormatError(f"lease value is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        d = {k.lower(): v for k, v in d.items()}  # Go's encoding/json matches keys case-insensitively
        try:
            pub = IPv4Address(d.get("publicip") or "0.0.0.0")
        except ValueError as e:
            raise LeaseFormatError(f"lease PublicIP: {e}") from None
        bt = d.get("backendtype") or ""
        if not isinstance(bt, str):
            raise LeaseFormatError("lease BackendType is not a string")
        return cls(
            public_ip=pub,
            backend_type=bt,
            backend_data=d.get("backenddata"),
            public_ipv6=d.get("publicipv6"),
            backend_v6_data=d.get("backendv6data"),
        )


@dataclass(frozen=True)
class Lease:
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
        return subnet_key(self.subnet, self.subnet6)

    def ttl_left(self, now: float | None = None) -> float:
        if self.expiration is None:
            return float("inf")
        return self.expiration - (time.time() if now is None else now)


@dataclass(frozen=True)
class LeaseEvent:
    type: Literal["added", "removed"]
    lease: Lease
