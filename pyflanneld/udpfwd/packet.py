"""Per-packet logic of the udp backend, as upstream's C proxy (`pkg/backend/udp/proxy_amd64.c`) does it.

Everything here works on a writable buffer (``bytearray``/``memoryview``) holding one IPv4 packet
at offset 0 and allocates nothing on the forwarding path:

* :func:`decrement_ttl` — TTL − 1 with the RFC 1624 incremental header-checksum update; a packet
  whose TTL would reach 0 is dropped (upstream: ``decrement_ttl``);
* :func:`net_unreachable` — the ICMP "destination net unreachable" (type 3 code 0) upstream writes
  back into the TUN for a destination without a route (never about ICMP, never for a non-first
  fragment); source = the TUN's address, TTL 8, quoting the offender's IP header + 8 bytes;
* :class:`RouteTable` — destination → next hop in O(1): one dict per prefix length keyed by
  ``dst & mask`` (every flannel lease has the same SubnetLen, so that is one dict lookup).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Generic, TypeVar

V = TypeVar("V")

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
ICMP_TTL = 8  # upstream's TTL for the ICMP it synthesises
MAX_IPOPTLEN = 40
MIN_IP_HEADER = 20


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the one's complement of the one's complement sum.

    Not on the per-packet path (only for ICMP synthesis and tests): a big-integer conversion keeps
    it short. The sum of 16-bit words mod 0xFFFF equals the integer value mod 0xFFFF, since
    2**16 ≡ 1 (mod 0xFFFF).
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = int.from_bytes(data, "big") % 0xFFFF + initial
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    # A non-zero sum that is ≡ 0 (mod 0xFFFF) is 0xFFFF in one's complement (−0 only for all zeros).
    if s == 0 and any(data):
        s = 0xFFFF
    return ~s & 0xFFFF


def decrement_ttl(pkt: bytearray | memoryview) -> bool:
    """TTL − 1 with an incremental checksum update (RFC 1624); False = drop (TTL would reach 0).

    ``HC' = HC + 0x0100`` in one's complement arithmetic (the TTL is the high byte of its 16-bit
    word). Like upstream, the result equals a full recomputation: 0xFEFF becomes 0x0000, not 0xFFFF.
    """
    ttl = pkt[8]
    if ttl <= 1:
        return False
    pkt[8] = ttl - 1
    c = (pkt[10] << 8 | pkt[11]) + 0x100
    if c >= 0xFFFF:
        c = (c + 1) & 0xFFFF
    pkt[10] = c >> 8
    pkt[11] = c & 0xFF
    return True


def net_unreachable(offender: bytes | bytearray | memoryview, tun_addr: int) -> bytes | None:
    """The ICMP net-unreachable packet answering ``offender``, or None when none is due.

    None for: a malformed header (IHL < 5 or options ≥ 40 bytes, as upstream), an ICMP offender
    (RFC 792: no ICMP about ICMP), a non-first fragment. The quoted part is the offender's IP header
    plus its first 8 payload bytes (zero-padded if the packet is shorter).
    """
    if len(offender) < MIN_IP_HEADER:
        return None
    ihl = (offender[0] & 0x0F) * 4
    if ihl < MIN_IP_HEADER or ihl >= MIN_IP_HEADER + MAX_IPOPTLEN:
        return None
    if offender[9] == IPPROTO_ICMP:
        return None
    if (offender[6] << 8 | offender[7]) & 0x1FFF:
        return None
    quoted = bytes(offender[: ihl + 8]).ljust(ihl + 8, b"\0")
    icmp = bytearray(8) + quoted
    icmp[0] = ICMP_DEST_UNREACH
    icmp[1] = ICMP_NET_UNREACH
    struct.pack_into("!H", icmp, 2, checksum(icmp))
    total = MIN_IP_HEADER + len(icmp)
    src = tun_addr.to_bytes(4, "big")
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, ICMP_TTL, IPPROTO_ICMP, 0,
                               src, bytes(offender[12:16])))
    struct.pack_into("!H", ip, 10, checksum(ip))
    return bytes(ip + icmp)


def mask_of(prefixlen: int) -> int:
    """The IPv4 netmask of ``prefixlen`` (0..32) as a 32-bit int."""
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF if prefixlen else 0


class RouteTable(Generic[V]):
    """Destination prefix → value, longest prefix first, one dict lookup per distinct prefix length.

    flannel's routes are the leases' subnets, which all share the Network's SubnetLen, so a lookup
    is a single ``dict.get(dst & mask)``.
    """

    def __init__(self) -> None:
        self._by_len: dict[int, dict[int, V]] = {}
        # (mask, dict) pairs, longest prefix first; rebuilt on change, read on every packet.
        self.tables: list[tuple[int, dict[int, V]]] = []

    def _rebuild(self) -> None:
        self.tables = [(mask_of(plen), self._by_len[plen])
                       for plen in sorted(self._by_len, reverse=True) if self._by_len[plen]]

    def set(self, net: int, prefixlen: int, value: V) -> None:
        """Route ``net``/``prefixlen`` (ints; host bits ignored) to ``value``, replacing an earlier one."""
        mask = mask_of(prefixlen)
        tbl = self._by_len.setdefault(prefixlen, {})
        fresh = not tbl
        tbl[net & mask] = value
        if fresh:
            self._rebuild()

    def delete(self, net: int, prefixlen: int) -> bool:
        """Remove the route for ``net``/``prefixlen``; True when there was one."""
        tbl = self._by_len.get(prefixlen)
        if not tbl or tbl.pop(net & mask_of(prefixlen), None) is None:
            return False
        if not tbl:
            self._rebuild()
        return True

    def clear(self) -> None:
        """Remove every route."""
        self._by_len.clear()
        self.tables = []

    def lookup(self, dst: int) -> V | None:
        """The value of the longest prefix holding ``dst`` (an IPv4 address as int); None without one."""
        for mask, tbl in self.tables:
            v = tbl.get(dst & mask)
            if v is not None:
                return v
        return None

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_len.values())

    def items(self) -> Iterator[tuple[IPv4Network, V]]:
        """Every route as (IPv4Network, value), in no particular order."""
        for plen, tbl in self._by_len.items():
            for net, v in tbl.items():
                yield IPv4Network((net, plen)), v


def ip_to_int(ip: IPv4Address | str) -> int:
    """An IPv4 address (object or text) as its 32-bit int. Raises ValueError for anything else."""
    return int(IPv4Address(ip))
