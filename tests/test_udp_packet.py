"""Pure unit tests of the udp forwarder's per-packet logic (no kernel, no namespaces)."""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address

import pytest

from pyflanneld.udpfwd import control
from pyflanneld.udpfwd.control import Route
from pyflanneld.udpfwd.packet import (
    ICMP_DEST_UNREACH,
    ICMP_NET_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    RouteTable,
    checksum,
    decrement_ttl,
    ip_to_int,
    net_unreachable,
)


def slow_checksum(data: bytes) -> int:
    """RFC 1071 the textbook way, as the reference."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_header(*, src="10.5.1.2", dst="10.5.2.3", ttl=64, proto=IPPROTO_UDP, ident=0x1234,
              frag=0x4000, total=28, tos=0, options=b"") -> bytearray:
    ihl = 5 + len(options) // 4
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ident, frag, ttl, proto, 0,
                              IPv4Address(src).packed, IPv4Address(dst).packed) + options)
    struct.pack_into("!H", h, 10, slow_checksum(bytes(h)))
    return h


def packet(payload: bytes = b"abcdefgh", **kw) -> bytearray:
    opts = kw.get("options", b"")
    kw.setdefault("total", 20 + len(opts) + len(payload))
    return ip_header(**kw) + payload


def header_checksum_ok(h: bytes) -> bool:
    ihl = (h[0] & 0x0F) * 4
    return slow_checksum(bytes(h[:ihl])) == 0


# --- checksum ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 20, 21, 64, 1472])
def test_checksum_matches_reference(n):
    rng = random.Random(n)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert checksum(data) == slow_checksum(data)


def test_checksum_of_all_ones_word_and_zero():
    assert checksum(b"\xff\xff") == slow_checksum(b"\xff\xff") == 0
    assert checksum(b"\0\0\0\0") == slow_checksum(b"\0\0\0\0") == 0xFFFF


# --- TTL --------------------------------------------------------------------------------------


def test_ttl_decrement_matches_full_recomputation_random_headers():
    rng = random.Random(42)
    for _ in range(5000):
        h = ip_header(src=str(IPv4Address(rng.getrandbits(32))), dst=str(IPv4Address(rng.getrandbits(32))),
                      ttl=rng.randrange(2, 256), ident=rng.getrandbits(16), proto=rng.choice([1, 6, 17]),
                      frag=rng.choice([0, 0x4000, 0x2000 | 5]), total=rng.randrange(20, 65536),
                      tos=rng.randrange(256))
        expect = bytearray(h)
        expect[8] -= 1
        expect[10:12] = b"\0\0"
        struct.pack_into("!H", expect, 10, slow_checksum(bytes(expect)))
        assert decrement_ttl(h)
        assert h == expect, (h.hex(), expect.hex())
        assert header_checksum_ok(h)


def test_ttl_decrement_checksum_edge_values():
    """Headers whose checksum is 0xFEFF or 0xFFxx exercise the end-around carry."""
    rng = random.Random(7)
    seen = set()
    tries = 0
    while len(seen) < 3 and tries < 2_000_000:
        tries += 1
        h = ip_header(ttl=rng.randrange(2, 256), ident=rng.getrandbits(16))
        c = h[10] << 8 | h[11]
        kind = "feff" if c == 0xFEFF else "ffxx" if c >> 8 == 0xFF else "00xx" if c >> 8 == 0 else None
        if kind is None:
            continue
        seen.add(kind)
        expect = bytearray(h)
        expect[8] -= 1
        expect[10:12] = b"\0\0"
        struct.pack_into("!H", expect, 10, slow_checksum(bytes(expect)))
        assert decrement_ttl(h)
        assert h == expect, kind
    assert seen == {"feff", "ffxx", "00xx"}


def test_ttl_one_and_zero_are_dropped_untouched():
    for ttl in (1, 0):
        h = ip_header(ttl=ttl)
        before = bytes(h)
        assert decrement_ttl(h) is False
        assert bytes(h) == before


def test_ttl_two_becomes_one_and_is_forwarded():
    h = ip_header(ttl=2)
    assert decrement_ttl(h)
    assert h[8] == 1 and header_checksum_ok(h)


def test_ttl_decrement_on_memoryview_with_options():
    h = packet(options=b"\x01\x01\x01\x00")  # NOP NOP NOP EOL
    mv = memoryview(h)
    assert decrement_ttl(mv)
    assert h[8] == 63 and header_checksum_ok(h)


# --- ICMP net unreachable ---------------------------------------------------------------------

TUN_ADDR = ip_to_int("10.5.1.0")


def test_net_unreachable_layout_and_checksums():
    off = packet(b"\x12\x34\x00\x35" + b"\x00\x10\xab\xcd" + b"more payload", src="10.5.1.7", dst="10.5.9.9",
                 proto=IPPROTO_UDP, ttl=17)
    icmp = net_unreachable(off, TUN_ADDR)
    assert icmp is not None
    assert len(icmp) == 20 + 8 + 20 + 8
    # outer IP header: v4, ihl 5, tos 0, id 0, frag 0, TTL 8, proto ICMP, src = TUN address, dst = offender src
    ver_ihl, tos, total, ident, frag, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", icmp[:20])
    assert (ver_ihl, tos, total, ident, frag, ttl, proto) == (0x45, 0, len(icmp), 0, 0, 8, IPPROTO_ICMP)
    assert IPv4Address(src) == IPv4Address("10.5.1.0") and IPv4Address(dst) == IPv4Address("10.5.1.7")
    assert slow_checksum(icmp[:20]) == 0
    body = icmp[20:]
    assert body[0] == ICMP_DEST_UNREACH and body[1] == ICMP_NET_UNREACH
    assert body[4:8] == b"\0\0\0\0"
    assert slow_checksum(body) == 0
    # quotes the offender's header (unchanged TTL) + the first 8 payload bytes
    assert body[8:] == bytes(off[:28])


def test_net_unreachable_quotes_ip_options():
    opts = b"\x01\x01\x01\x00"
    off = packet(b"0123456789", options=opts, proto=IPPROTO_TCP)
    icmp = net_unreachable(off, TUN_ADDR)
    assert icmp is not None and len(icmp) == 20 + 8 + 24 + 8
    assert icmp[28:] == bytes(off[:32])
    assert slow_checksum(icmp[20:]) == 0


def test_net_unreachable_short_payload_is_zero_padded():
    off = packet(b"abc", proto=IPPROTO_UDP)
    icmp = net_unreachable(off, TUN_ADDR)
    assert icmp[28:] == bytes(off) + b"\0" * 5
    assert slow_checksum(icmp[20:]) == 0


def test_no_net_unreachable_for_icmp():
    assert net_unreachable(packet(proto=IPPROTO_ICMP), TUN_ADDR) is None


def test_no_net_unreachable_for_non_first_fragment():
    assert net_unreachable(packet(frag=0x2000 | 185), TUN_ADDR) is None  # MF + offset
    assert net_unreachable(packet(frag=185), TUN_ADDR) is None  # last fragment
    # the first fragment (MF, offset 0) and DF packets do get one
    assert net_unreachable(packet(frag=0x2000), TUN_ADDR) is not None
    assert net_unreachable(packet(frag=0x4000), TUN_ADDR) is not None


def test_no_net_unreachable_for_malformed():
    assert net_unreachable(b"\x45" + b"\0" * 10, TUN_ADDR) is None  # shorter than a header
    bad = packet()
    bad[0] = 0x44  # IHL 4
    assert net_unreachable(bad, TUN_ADDR) is None
    big = packet(options=b"\x01" * 40)  # IHL 15: upstream refuses (>= 20 + MAX_IPOPTLEN)
    assert net_unreachable(big, TUN_ADDR) is None


# --- route table ------------------------------------------------------------------------------


def test_route_lookup_same_prefix_len():
    rt: RouteTable[str] = RouteTable()
    rt.set(ip_to_int("10.5.2.0"), 24, "b")
    rt.set(ip_to_int("10.5.3.77"), 24, "c")  # host bits are masked off
    assert rt.lookup(ip_to_int("10.5.2.1")) == "b"
    assert rt.lookup(ip_to_int("10.5.2.255")) == "b"
    assert rt.lookup(ip_to_int("10.5.3.0")) == "c"
    assert rt.lookup(ip_to_int("10.5.4.1")) is None
    assert len(rt) == 2
    rt.set(ip_to_int("10.5.2.0"), 24, "b2")  # replace
    assert rt.lookup(ip_to_int("10.5.2.9")) == "b2" and len(rt) == 2
    assert rt.delete(ip_to_int("10.5.2.0"), 24)
    assert rt.lookup(ip_to_int("10.5.2.9")) is None
    assert not rt.delete(ip_to_int("10.5.2.0"), 24)
    rt.clear()
    assert rt.lookup(ip_to_int("10.5.3.1")) is None and len(rt) == 0 and rt.tables == []


def test_route_lookup_longest_prefix_first():
    rt: RouteTable[str] = RouteTable()
    rt.set(ip_to_int("10.5.0.0"), 16, "wide")
    rt.set(ip_to_int("10.5.7.0"), 24, "narrow")
    rt.set(ip_to_int("10.5.7.128"), 25, "narrower")
    assert rt.lookup(ip_to_int("10.5.7.200")) == "narrower"
    assert rt.lookup(ip_to_int("10.5.7.1")) == "narrow"
    assert rt.lookup(ip_to_int("10.5.8.1")) == "wide"
    assert rt.lookup(ip_to_int("10.6.0.1")) is None
    rt.delete(ip_to_int("10.5.7.128"), 25)
    assert [m for m, _ in rt.tables] == [0xFFFFFF00, 0xFFFF0000]
    assert dict((str(k), v) for k, v in rt.items()) == {"10.5.0.0/16": "wide", "10.5.7.0/24": "narrow"}


def test_route_lookup_zero_prefix():
    rt: RouteTable[str] = RouteTable()
    rt.set(0, 0, "default")
    assert rt.lookup(ip_to_int("1.2.3.4")) == "default"


# --- control messages -------------------------------------------------------------------------


def test_control_messages_round_trip():
    from ipaddress import IPv4Network

    routes = [Route(IPv4Network("10.5.2.0/24"), IPv4Address("192.168.100.2"), 8285),
              Route(IPv4Network("10.5.3.0/24"), IPv4Address("192.168.100.3"), 8285)]
    msg = control.encode_routes(control.REPLACE, routes)
    assert msg[:1] == control.REPLACE
    assert control.decode_routes(msg[1:]) == [
        (ip_to_int("10.5.2.0"), 24, ip_to_int("192.168.100.2"), 8285),
        (ip_to_int("10.5.3.0"), 24, ip_to_int("192.168.100.3"), 8285),
    ]
    d = control.encode_delete([IPv4Network("10.5.2.0/24")])
    assert control.decode_delete(d[1:]) == [(ip_to_int("10.5.2.0"), 24)]
    assert control.decode_routes(control.encode_routes(control.REPLACE, [])[1:]) == []
    tok, stats = control.decode_pong(control.encode_pong(7, {"udp_tx": 3}))
    assert tok == 7 and stats == {"udp_tx": 3}


# --- userspace TSO / GRO (offload worker) -----------------------------------------------------

from pyflanneld.udpfwd import gso  # noqa: E402

TS_OPT = b"\x01\x01\x08\x0a" + struct.pack("!II", 12345, 678)  # NOP NOP timestamps


def tcp_packet(payload: bytes, *, seq=1000, flags=gso.TCP_ACK | gso.TCP_PSH, ident=0x100, ttl=64,
               options=TS_OPT, ip_options=b"", src="10.5.1.0", dst="10.5.2.0", sport=40000, dport=5201,
               partial=False) -> bytearray:
    doff = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, 777, (doff // 4) << 4, flags, 501, 0, 0)
                    + options)
    ip = ip_header(src=src, dst=dst, ttl=ttl, proto=IPPROTO_TCP, ident=ident,
                   total=20 + len(ip_options) + doff + len(payload), options=ip_options)
    pseudo = IPv4Address(src).packed + IPv4Address(dst).packed + struct.pack("!BBH", 0, 6, doff + len(payload))
    if partial:  # CHECKSUM_PARTIAL as the kernel hands TSO packets to the TUN
        ck = ~slow_checksum(pseudo) & 0xFFFF
    else:
        ck = slow_checksum(pseudo + bytes(tcp) + payload)
    struct.pack_into("!H", tcp, 16, ck)
    return ip + tcp + payload


def reference_segments(sp: bytes, mss: int) -> list[bytes]:
    """What the kernel's tcp_gso_segment produces (checksums recomputed from scratch)."""
    ihl = (sp[0] & 15) * 4
    doff = (sp[ihl + 12] >> 4) * 4
    hlen = ihl + doff
    pay = sp[hlen:]
    n = -(-len(pay) // mss)
    ident = struct.unpack_from("!H", sp, 4)[0]
    seq = struct.unpack_from("!I", sp, ihl + 4)[0]
    fl = sp[ihl + 13]
    out = []
    for i in range(n):
        chunk = pay[i * mss:(i + 1) * mss]
        f = fl
        if i < n - 1:
            f &= ~(gso.TCP_FIN | gso.TCP_PSH) & 0xFF
        if i > 0:
            f &= ~gso.TCP_CWR & 0xFF
        h = bytearray(sp[:hlen])
        struct.pack_into("!HH", h, 2, hlen + len(chunk), (ident + i) & 0xFFFF)
        h[10:12] = b"\0\0"
        struct.pack_into("!H", h, 10, slow_checksum(bytes(h[:ihl])))
        struct.pack_into("!I", h, ihl + 4, (seq + i * mss) & 0xFFFFFFFF)
        h[ihl + 13] = f
        h[ihl + 16:ihl + 18] = b"\0\0"
        pseudo = bytes(h[12:20]) + struct.pack("!BBH", 0, 6, doff + len(chunk))
        struct.pack_into("!H", h, ihl + 16, slow_checksum(pseudo + bytes(h[ihl:]) + chunk))
        out.append(bytes(h) + chunk)
    return out


def run_segment(sp: bytes, mss: int, pkt_off: int = 12) -> list[bytes]:
    buf = bytearray(pkt_off + len(sp) + 8)
    buf[pkt_off:pkt_off + len(sp)] = sp
    out = bytearray(len(sp) + 200 * 64)
    total, seg_len = gso.segment(buf, pkt_off, len(sp), mss, out)
    assert total
    segs = []
    pos = 0
    while pos < total:
        segs.append(bytes(out[pos:pos + seg_len]))
        pos += seg_len
    segs[-1] = segs[-1][:total - (len(segs) - 1) * seg_len]
    return segs


@pytest.mark.parametrize("mss,paylen", [(1420, 1420 * 44), (1420, 1420 * 30 + 77), (1448, 5000),
                                        (1400, 1401), (1420, 100), (1418, 9000), (1419, 9000), (536, 20000)])
def test_segment_matches_kernel_semantics(mss, paylen):
    rng = random.Random(mss * 7 + paylen)
    payload = bytes(rng.randrange(256) for _ in range(paylen))
    for seq, ident, flags in [(1000, 0x100, gso.TCP_ACK | gso.TCP_PSH), (0xFFFFF000, 0xFFF0, gso.TCP_ACK),
                              (5, 7, gso.TCP_ACK | gso.TCP_PSH | gso.TCP_FIN | gso.TCP_CWR)]:
        sp = tcp_packet(payload, seq=seq, ident=ident, flags=flags, partial=True)
        got = run_segment(bytes(sp), mss)
        want = reference_segments(bytes(sp), mss)
        assert len(got) == len(want) == -(-paylen // mss)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"segment {i}: {g[:60].hex()} != {w[:60].hex()}"


def test_segment_unaligned_and_ip_options():
    payload = bytes(range(256)) * 30
    sp = tcp_packet(payload, ip_options=b"\x01\x01\x01\x00", options=b"", partial=True)
    for off in (12, 13, 14):
        assert run_segment(bytes(sp), 1000, pkt_off=off) == reference_segments(bytes(sp), 1000)


def test_segment_refuses_non_tcp():
    sp = packet(b"x" * 3000, proto=IPPROTO_UDP)
    assert gso.segment(bytearray(sp), 0, len(sp), 1000, bytearray(8000)) == (0, 0)


def gro_buffer(segs: list[bytes], off: int = 12) -> tuple[bytearray, int, int]:
    data = b"".join(segs)
    buf = bytearray(off + len(data))
    buf[off:] = data
    return buf, len(data), len(segs[0])


def test_coalesce_inverts_segment():
    payload = bytes(random.Random(3).randrange(256) for _ in range(1420 * 20 + 300))
    sp = tcp_packet(payload, flags=gso.TCP_ACK | gso.TCP_PSH, partial=True)
    segs = reference_segments(bytes(sp), 1420)
    buf, ln, g = gro_buffer(segs)
    out = bytearray(70000)
    n = gso.coalesce(buf, 12, ln, g, out)
    assert n == 10 + len(sp)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_off = gso.VNET.unpack_from(out, 0)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_off) == (
        gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.VIRTIO_NET_HDR_GSO_TCPV4, 52, 1420, 20, 16)
    merged = bytes(out[10:n])
    assert merged[52:] == payload
    assert header_checksum_ok(merged)
    # header = first segment's, with the total length, the last segment's PSH, a partial checksum
    assert merged[:20][:2] == sp[:2] and merged[2:4] == struct.pack("!H", len(sp))
    assert merged[4:6] == segs[0][4:6] and merged[12:20] == sp[12:20]
    assert merged[20:52][:16] == sp[20:52][:16] and merged[20 + 18:52] == sp[20 + 18:52]
    pseudo = sp[12:20] + struct.pack("!BBH", 0, 6, len(sp) - 20)
    assert merged[36:38] == struct.pack("!H", ~slow_checksum(pseudo) & 0xFFFF)


def test_coalesce_exact_multiple_keeps_last_psh():
    payload = bytes(1420 * 4)
    segs = reference_segments(bytes(tcp_packet(payload, partial=True)), 1420)
    buf, ln, g = gro_buffer(segs)
    out = bytearray(70000)
    n = gso.coalesce(buf, 12, ln, g, out)
    assert n and out[10 + 33] == gso.TCP_ACK | gso.TCP_PSH


@pytest.mark.parametrize("breakage", ["seq gap", "other flow", "other timestamp", "syn", "psh in middle",
                                      "udp", "fragment"])
def test_coalesce_refuses(breakage):
    payload = bytes(1420 * 6)
    sp = tcp_packet(payload, flags=gso.TCP_ACK, partial=True)
    segs = [bytearray(s) for s in reference_segments(bytes(sp), 1420)]
    s = segs[3]
    if breakage == "seq gap":
        struct.pack_into("!I", s, 24, struct.unpack_from("!I", s, 24)[0] + 1)
    elif breakage == "other flow":
        struct.pack_into("!H", s, 20, 40001)
    elif breakage == "other timestamp":
        s[20 + 24] ^= 1
    elif breakage == "syn":
        segs[0][33] |= gso.TCP_SYN
    elif breakage == "psh in middle":
        s[33] |= gso.TCP_PSH
    elif breakage == "udp":
        for x in segs:
            x[9] = IPPROTO_UDP
    elif breakage == "fragment":
        for x in segs:
            x[6] |= 0x20
    buf, ln, g = gro_buffer([bytes(x) for x in segs])
    assert gso.coalesce(buf, 12, ln, g, bytearray(70000)) == 0


def test_coalesce_two_gso_sends_of_one_super_packet():
    """A 64 KB super-packet leaves in two UDP GSO sends (65507-byte limit); both halves merge."""
    payload = bytes(random.Random(5).randrange(256) for _ in range(1420 * 44 + 700))
    sp = tcp_packet(payload, partial=True)
    segs = reference_segments(bytes(sp), 1420)
    first, second = b"".join(segs[:40]), b"".join(segs[40:])
    buf = bytearray(200000)
    buf[12:12 + len(first)] = first
    b2 = 100012
    buf[b2:b2 + len(second)] = second
    out = bytearray(70000)
    n = gso.coalesce(buf, 12, len(first), 1472, out, b2, len(second))
    assert n == 10 + len(sp)
    assert bytes(out[10 + 52:n]) == payload
    assert header_checksum_ok(bytes(out[10:n]))
    # a gap between the halves (a lost datagram) is not merged
    buf[b2:b2 + len(second) - 1472] = b"".join(segs[41:])
    assert gso.coalesce(buf, 12, len(first), 1472, out, b2, len(second) - 1472) == 0
    # too big for one IPv4 packet: not merged
    a = reference_segments(bytes(tcp_packet(bytes(1420 * 40), flags=gso.TCP_ACK, partial=True)), 1420)
    b = reference_segments(bytes(tcp_packet(bytes(1420 * 7), seq=1000 + 1420 * 40, ident=0x100 + 40,
                                            partial=True)), 1420)
    buf[12:12 + 1472 * 40] = b"".join(a)
    buf[b2:b2 + 1472 * 7] = b"".join(b)
    assert gso.coalesce(buf, 12, 1472 * 40, 1472, out, b2, 1472 * 6) != 0  # 46 segments fit
    assert gso.coalesce(buf, 12, 1472 * 40, 1472, out, b2, 1472 * 7) == 0  # 47 do not
