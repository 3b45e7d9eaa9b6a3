"""Route-update messages from the daemon to the forwarder workers (one SOCK_SEQPACKET pair per worker).

Like upstream's control socketpair (CMD_SET_ROUTE / CMD_DEL_ROUTE / CMD_STOP), with batching:
one datagram carries any number of routes, so a lease snapshot is applied atomically.

    b"S" + n × (dst u32, prefixlen u8, next_hop u32, port u16)   set routes
    b"D" + n × (dst u32, prefixlen u8)                           delete routes
    b"R" + n × (dst u32, prefixlen u8, next_hop u32, port u16)   replace the whole table
    b"P" + token u32                                             ping: worker answers b"P" + token + stats JSON
    b"Q"                                                         stop
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

SET = b"S"
DEL = b"D"
REPLACE = b"R"
PING = b"P"
STOP = b"Q"

_ROUTE = struct.Struct("!IBIH")
_DEST = struct.Struct("!IB")
_TOKEN = struct.Struct("!I")
MAX_MSG = 1 << 20  # SO_SNDBUF/SO_RCVBUF of the pair, and the worker's receive size


@dataclass(frozen=True)
class Route:
    """One forwarder route: packets for ``dst`` go in UDP to ``next_hop``:``port``."""
    dst: IPv4Network
    next_hop: IPv4Address
    port: int


def encode_routes(kind: bytes, routes: Iterable[Route]) -> bytes:
    """A SET or REPLACE message (``kind``) carrying ``routes`` (13 bytes each, network byte order)."""
    return kind + b"".join(_ROUTE.pack(int(r.dst.network_address), r.dst.prefixlen, int(r.next_hop), r.port)
                           for r in routes)


def encode_delete(dsts: Iterable[IPv4Network]) -> bytes:
    """A DEL message removing the routes for ``dsts`` (5 bytes each)."""
    return DEL + b"".join(_DEST.pack(int(d.network_address), d.prefixlen) for d in dsts)


def encode_ping(token: int) -> bytes:
    """A PING message with ``token`` (u32): the worker answers with :func:`encode_pong`."""
    return PING + _TOKEN.pack(token)


def decode_routes(body: bytes) -> list[tuple[int, int, int, int]]:
    """→ [(dst, prefixlen, next_hop, port)]"""
    return [_ROUTE.unpack_from(body, off) for off in range(0, len(body) - _ROUTE.size + 1, _ROUTE.size)]


def decode_delete(body: bytes) -> list[tuple[int, int]]:
    """The body of a DEL message (after its kind byte) → [(dst as int, prefixlen)]."""
    return [_DEST.unpack_from(body, off) for off in range(0, len(body) - _DEST.size + 1, _DEST.size)]


def encode_pong(token: int, stats: dict) -> bytes:
    """A worker's answer to PING ``token``: the token and its counters ``stats`` as JSON."""
    return PING + _TOKEN.pack(token) + json.dumps(stats).encode()


def decode_pong(msg: bytes) -> tuple[int, dict]:
    """A whole PONG message → (token, the counters dict; {} when it carries none)."""
    return _TOKEN.unpack_from(msg, 1)[0], json.loads(msg[5:] or b"{}")
