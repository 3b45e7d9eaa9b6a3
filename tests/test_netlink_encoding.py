"""The hand-written batch encoder (pyflanneld.netlink.BatchOp) against pyroute2's own encoder.

Each BatchOp constructor must produce the same bytes pyroute2 encodes for a message with the same
header, fields and attributes (attributes listed in the encoder's order: the kernel does not care
about their order, so the test fixes it to compare bytes). Pure: no root, no kernel.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from pyflanneld.netlink import BatchOp, Route, _raw_events, event_key

RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
REQUEST_ACK = 0x1 | 0x4
REPLACE = REQUEST_ACK | 0x100 | 0x400  # NLM_F_REPLACE | NLM_F_CREATE
AF_BRIDGE = 7
NUD_NOARP, NUD_PERMANENT, NTF_SELF = 0x40, 0x80, 0x02
MAC = "0e:2a:11:22:33:44"


def pyroute2_bytes(cls, msg_type: int, flags: int, fields: dict, attrs: list) -> bytes:
    m = cls()
    for k, v in fields.items():
        m[k] = v
    m["attrs"] = attrs
    m["header"]["type"] = msg_type
    m["header"]["flags"] = flags
    m.encode()
    return bytes(m.data)


def neigh_fields(family: int, index: int, state: int, flags: int = 0) -> dict:
    return {"family": family, "ifindex": index, "state": state, "flags": flags, "ndm_type": 0}


def route_fields(r: Route, proto: int, scope: int, kind: int) -> dict:
    family = socket.AF_INET6 if r.dst.version == 6 else socket.AF_INET
    return {"family": family, "dst_len": r.dst.prefixlen, "src_len": 0, "tos": 0,
            "table": r.table if r.table < 256 else 252, "proto": proto, "scope": scope, "type": kind,
            "flags": 4 if r.onlink else 0}


def route_attrs(r: Route) -> list:
    attrs = [("RTA_DST", str(r.dst.network_address)), ("RTA_TABLE", r.table)]
    if r.gateway is not None:
        attrs.append(("RTA_GATEWAY", str(r.gateway)))
    if r.oif is not None:
        attrs.append(("RTA_OIF", r.oif))
    return attrs


def test_replace_neighbour_is_pyroute2s_encoding():
    op = BatchOp.replace_neighbour(7, IPv4Address("10.5.3.0"), MAC)
    want = pyroute2_bytes(ndmsg, RTM_NEWNEIGH, REPLACE, neigh_fields(socket.AF_INET, 7, NUD_PERMANENT),
                          [("NDA_DST", "10.5.3.0"), ("NDA_LLADDR", MAC)])
    assert op.msg == want and not op.delete


def test_delete_neighbour_is_pyroute2s_encoding():
    op = BatchOp.delete_neighbour(7, IPv4Address("10.5.3.0"))
    want = pyroute2_bytes(ndmsg, RTM_DELNEIGH, REQUEST_ACK, neigh_fields(socket.AF_INET, 7, NUD_PERMANENT),
                          [("NDA_DST", "10.5.3.0")])
    assert op.msg == want and op.delete


def test_replace_fdb_is_pyroute2s_encoding():
    op = BatchOp.replace_fdb(9, MAC, IPv4Address("192.168.100.3"))
    want = pyroute2_bytes(ndmsg, RTM_NEWNEIGH, REPLACE,
                          neigh_fields(AF_BRIDGE, 9, NUD_PERMANENT | NUD_NOARP, NTF_SELF),
                          [("NDA_LLADDR", MAC), ("NDA_DST", "192.168.100.3")])
    assert op.msg == want and not op.delete


@pytest.mark.parametrize("dst", [IPv4Address("192.168.100.3"), None])
def test_delete_fdb_is_pyroute2s_encoding(dst):
    op = BatchOp.delete_fdb(9, MAC, dst)
    attrs = [("NDA_LLADDR", MAC)] + ([("NDA_DST", str(dst))] if dst is not None else [])
    want = pyroute2_bytes(ndmsg, RTM_DELNEIGH, REQUEST_ACK,
                          neigh_fields(AF_BRIDGE, 9, NUD_PERMANENT | NUD_NOARP, NTF_SELF), attrs)
    assert op.msg == want and op.delete


@pytest.mark.parametrize("route", [
    Route(IPv4Network("10.5.3.0/24"), IPv4Address("10.5.3.0"), 11, onlink=True),  # vxlan
    Route(IPv4Network("10.5.4.0/24"), IPv4Address("192.168.100.4"), 2),  # host-gw / DirectRouting
    Route(IPv4Network("10.5.5.0/24"), IPv4Address("192.168.100.5"), 2, table=1000),  # table > 255
    Route(IPv6Network("fd80:0:0:3::/64"), IPv6Address("fd80:0:0:3::"), 12, onlink=True),  # vxlan, IPv6
    Route(IPv6Network("fd80:0:0:4::/64"), IPv6Address("fd99::4"), 2),  # host-gw / DirectRouting, IPv6
])
def test_replace_route_is_pyroute2s_encoding(route):
    op = BatchOp.replace_route(route)
    want = pyroute2_bytes(rtmsg, RTM_NEWROUTE, REPLACE, route_fields(route, 3, 0, 1), route_attrs(route))
    assert op.msg == want and not op.delete


@pytest.mark.parametrize("route", [
    Route(IPv4Network("10.5.3.0/24"), IPv4Address("10.5.3.0"), 11, onlink=True),
    Route(IPv4Network("10.5.6.0/24"), None, 11),  # no gateway: any scope (RT_SCOPE_NOWHERE)
    Route(IPv6Network("fd80:0:0:3::/64"), IPv6Address("fd80:0:0:3::"), 12, onlink=True),
    Route(IPv6Network("fd80:0:0:6::/64"), None, 12),
])
def test_delete_route_is_pyroute2s_encoding(route):
    op = BatchOp.delete_route(route)
    scope = 0 if route.gateway is not None else 255
    want = pyroute2_bytes(rtmsg, RTM_DELROUTE, REQUEST_ACK, route_fields(route, 0, scope, 0), route_attrs(route))
    assert op.msg == want and op.delete


def test_replace_route_without_gateway_is_refused():
    with pytest.raises(ValueError, match="needs a gateway"):
        BatchOp.replace_route(Route(IPv4Network("10.5.6.0/24"), None, 11))


# --- IPv6 (issue 13.5): the same messages with AF_INET6 neighbours and 16-byte addresses ------------
V6_PEER, V6_PUBLIC = IPv6Address("fd80:0:0:3::"), IPv6Address("fd99::3")


def test_replace_ipv6_neighbour_is_pyroute2s_encoding():
    op = BatchOp.replace_neighbour(12, V6_PEER, MAC)
    want = pyroute2_bytes(ndmsg, RTM_NEWNEIGH, REPLACE, neigh_fields(socket.AF_INET6, 12, NUD_PERMANENT),
                          [("NDA_DST", str(V6_PEER)), ("NDA_LLADDR", MAC)])
    assert op.msg == want and not op.delete and len(op.msg) == 16 + 12 + 20 + 12


def test_delete_ipv6_neighbour_is_pyroute2s_encoding():
    op = BatchOp.delete_neighbour(12, V6_PEER)
    want = pyroute2_bytes(ndmsg, RTM_DELNEIGH, REQUEST_ACK, neigh_fields(socket.AF_INET6, 12, NUD_PERMANENT),
                          [("NDA_DST", str(V6_PEER))])
    assert op.msg == want and op.delete


def test_ipv6_fdb_is_pyroute2s_encoding():
    op = BatchOp.replace_fdb(12, MAC, V6_PUBLIC)
    fields = neigh_fields(AF_BRIDGE, 12, NUD_PERMANENT | NUD_NOARP, NTF_SELF)
    assert op.msg == pyroute2_bytes(ndmsg, RTM_NEWNEIGH, REPLACE, fields,
                                    [("NDA_LLADDR", MAC), ("NDA_DST", str(V6_PUBLIC))])
    op = BatchOp.delete_fdb(12, MAC, V6_PUBLIC)
    assert op.msg == pyroute2_bytes(ndmsg, RTM_DELNEIGH, REQUEST_ACK, fields,
                                    [("NDA_LLADDR", MAC), ("NDA_DST", str(V6_PUBLIC))]) and op.delete


# --- expectations: an op's event_key is the key of the notification the monitor decodes for it ----
@pytest.mark.parametrize("op", [
    BatchOp.replace_neighbour(7, IPv4Address("10.5.3.0"), MAC),
    BatchOp.delete_neighbour(7, IPv4Address("10.5.3.0")),
    BatchOp.replace_fdb(9, MAC, IPv4Address("192.168.100.3")),
    BatchOp.delete_fdb(9, MAC, IPv4Address("192.168.100.3")),
    BatchOp.delete_fdb(9, MAC, None),
    BatchOp.replace_route(Route(IPv4Network("10.5.3.0/24"), IPv4Address("10.5.3.0"), 11, onlink=True)),
    BatchOp.delete_route(Route(IPv4Network("10.5.6.0/24"), None, 11)),
    BatchOp.delete_route_raw(int(IPv4Address("10.5.4.0")), 24, int(IPv4Address("192.168.100.4")), 2, False),
    BatchOp.replace_neighbour(12, V6_PEER, MAC),
    BatchOp.delete_neighbour(12, V6_PEER),
    BatchOp.replace_fdb(12, MAC, V6_PUBLIC),
    BatchOp.delete_fdb(12, MAC, V6_PUBLIC),
    BatchOp.replace_route(Route(IPv6Network("fd80:0:0:3::/64"), V6_PEER, 12, onlink=True)),
    BatchOp.delete_route_raw(int(IPv6Network("fd80:0:0:4::/64").network_address), 64, int(V6_PUBLIC), 2, False,
                             family=socket.AF_INET6),
], ids=lambda op: op.what)
def test_event_key_names_the_notification_the_op_causes(op):
    # the kernel's notification of a change carries the request's header type and body: decoding the
    # request as a notification gives the Event the monitor sees
    (ev,) = _raw_events(op.msg)
    assert op.event_key() == event_key(ev.action, ev.kind, ev.dst)
    others = {event_key(a, k, "10.5.3.0") for a in ("new", "del") for k in ("route", "neigh", "fdb")}
    assert len(others) == 6  # action and kind are part of the key
    assert event_key(ev.action, ev.kind, "10.99.99.0") != op.event_key()  # and so is the destination
