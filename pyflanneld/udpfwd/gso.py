"""TCP segmentation (TSO) and coalescing (GRO) of IPv4 packets in userspace, vectorised with numpy.

Pure functions over caller-owned buffers (no system calls), used by :mod:`.offload`:

* :func:`segment` — one TCP super-packet → MSS-sized IPv4/TCP packets, as the kernel's
  ``tcp_gso_segment``/``inet_gso_segment`` cut it: IP ID + i, seq + i·MSS, FIN/PSH on the last
  segment only, CWR on the first only, complete IP and TCP checksums.
* :func:`coalesce` — equal-size consecutive segments of one TCP flow (a UDP_GRO buffer) → one
  super-packet behind a virtio-net GSO header with a partial checksum; None if they are not.

Checksums are one's complement sums assembled from a constant part (the header without its
varying fields), the varying fields and each segment's payload sum (one numpy pass).
"""

from __future__ import annotations

import struct

import numpy as np

from .packet import checksum

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_ECN = 0x80
VNET = struct.Struct("<BBHHHH")
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = 1, 2, 4, 8, 16, 32, 64, 128
_AR64 = np.arange(2048, dtype=np.uint64)


def fold(s: int) -> int:
    """Fold a one's complement sum ``s`` (any size) into 16 bits (the end of an Internet checksum,
    before inverting)."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def sum16(b) -> int:
    """One's complement sum (not inverted) of ``b``."""
    return ~checksum(b) & 0xFFFF


def segment(buf, pkt_off: int, ln: int, mss: int, out) -> tuple[int, int]:
    """Cut the TCP super-packet ``buf[pkt_off:pkt_off+ln]`` into ``out``.

    ``buf``/``out``: writable buffers (``out`` ≥ ln + 64 headers). Returns ``(total, seg_len)``:
    ``out[:total]`` holds the segments back to back, each ``seg_len`` bytes but the last.
    ``(0, 0)`` for a packet that is not IPv4/TCP.
    """
    mv = memoryview(buf).cast("B")
    p = mv[pkt_off:pkt_off + ln]
    ihl = (p[0] & 0x0F) * 4
    if p[0] >> 4 != 4 or p[9] != 6 or ihl < 20 or ln < ihl + 20:
        return 0, 0
    doff = (p[ihl + 12] >> 4) * 4
    hlen = ihl + doff
    paylen = ln - hlen
    if doff < 20 or paylen <= 0 or mss <= 0:
        return 0, 0
    seg_len = hlen + mss
    nseg = -(-paylen // mss)
    n_full = paylen // mss
    rem = paylen - n_full * mss
    fl = p[ihl + 13]
    hi = p[ihl + 12] << 8
    if nseg == 1:
        first_w = mid_w = last_w = hi | fl
    else:
        first_w = hi | (fl & ~(TCP_FIN | TCP_PSH) & 0xFF)
        mid_w = first_w & ~TCP_CWR
        last_w = hi | (fl & ~TCP_CWR & 0xFF)
    # constant parts: header words except tot_len, id, checksums, seq, flags; + pseudo header
    ipw = struct.unpack_from(f"!{ihl // 2}H", p, 0)
    ip_const = sum(ipw) - ipw[1] - ipw[2] - ipw[5]
    tw = struct.unpack_from(f"!{doff // 2}H", p, ihl)
    tcp_const = (sum(tw) - tw[2] - tw[3] - tw[6] - tw[8]
                 + ipw[6] + ipw[7] + ipw[8] + ipw[9] + (ipw[4] & 0xFF))
    ip_id = ipw[2]
    seq0 = (tw[2] << 16) | tw[3]
    omv = memoryview(out).cast("B")
    if n_full and mss % 2 == 0 and hlen % 2 == 0:
        src = np.frombuffer(buf, dtype=np.uint8, count=ln, offset=pkt_off)
        o = np.frombuffer(out, dtype=np.uint8, count=n_full * seg_len)
        o2 = o.reshape(n_full, seg_len)
        o2[:, :hlen] = src[:hlen]
        o2[:, hlen:] = src[hlen:hlen + n_full * mss].reshape(n_full, mss)
        ar = _AR64[:n_full] if n_full <= len(_AR64) else np.arange(n_full, dtype=np.uint64)
        ids = (ar + ip_id) & 0xFFFF
        seqs = (ar * mss + seq0) & 0xFFFFFFFF
        if mss % 4 == 0 and (pkt_off + hlen) % 4 == 0:
            v = np.frombuffer(buf, dtype=">u4", count=n_full * mss // 4,
                              offset=pkt_off + hlen).reshape(n_full, mss // 4)
        else:
            v = np.frombuffer(buf, dtype=">u2", count=n_full * mss // 2,
                              offset=pkt_off + hlen).reshape(n_full, mss // 2)
        tcp = v.sum(axis=1, dtype=np.uint64) + seqs + (tcp_const + mid_w + seg_len - ihl)
        tcp[0] += first_w - mid_w
        if not rem and n_full > 1:
            tcp[-1] += last_w - mid_w
        ipc = ids + (ip_const + seg_len)
        for _ in range(3):
            tcp = (tcp & 0xFFFF) + (tcp >> 16)
        ipc = (ipc & 0xFFFF) + (ipc >> 16)
        ipc = (ipc & 0xFFFF) + (ipc >> 16)
        w = o.view(">u2").reshape(n_full, seg_len // 2)
        t = ihl // 2
        w[:, 1] = seg_len
        w[:, 2] = ids
        w[:, 5] = ~ipc
        w[:, t + 2] = seqs >> 16
        w[:, t + 3] = seqs
        w[:, t + 6] = mid_w
        w[0, t + 6] = first_w
        if not rem and n_full > 1:
            w[-1, t + 6] = last_w
        w[:, t + 8] = ~tcp
        first_slow = n_full
    else:
        first_slow = 0
    # the rest (a short last segment, or everything for odd sizes): one at a time
    pos = first_slow * seg_len
    for i in range(first_slow, nseg):
        a = hlen + i * mss
        plen = min(mss, paylen - i * mss)
        tot = hlen + plen
        omv[pos:pos + hlen] = p[:hlen]
        omv[pos + hlen:pos + tot] = p[a:a + plen]
        ident = (ip_id + i) & 0xFFFF
        seq = (seq0 + i * mss) & 0xFFFFFFFF
        flw = first_w if i == 0 else last_w if i == nseg - 1 else mid_w
        ipck = ~fold(ip_const + tot + ident) & 0xFFFF
        tcpck = ~fold(tcp_const + flw + (tot - ihl) + (seq >> 16) + (seq & 0xFFFF)
                      + sum16(omv[pos + hlen:pos + tot])) & 0xFFFF
        struct.pack_into("!HH", omv, pos + 2, tot, ident)
        U16.pack_into(omv, pos + 10, ipck)
        U32.pack_into(omv, pos + ihl + 4, seq)
        U16.pack_into(omv, pos + ihl + 12, flw)
        U16.pack_into(omv, pos + ihl + 16, tcpck)
        pos += tot
    return pos, seg_len


_MASKS: dict[tuple[int, int, bool], np.ndarray] = {}


def _mask_for(ihl: int, hlen: int, tail: bool = False) -> np.ndarray:
    """Header bytes (0xFF) or bits that must be equal in every segment of a coalescable run
    (``tail``: for a shorter last segment, whose total length differs)."""
    key = (ihl, hlen, tail)
    m = _MASKS.get(key)
    if m is None:
        m = np.full(hlen, 0xFF, dtype=np.uint8)
        m[[4, 5, 10, 11]] = 0  # IP ID, header checksum
        m[ihl + 4:ihl + 8] = 0  # seq (checked to be consecutive)
        m[ihl + 13] = 0xFF & ~(TCP_PSH | TCP_FIN)  # PSH/FIN: only the last may have them
        m[[ihl + 16, ihl + 17]] = 0  # TCP checksum
        if tail:
            m[[2, 3]] = 0  # total length
        m = _MASKS[key] = m
    return m


def coalesce(buf, base: int, ln: int, g: int, out, base2: int = -1, ln2: int = 0) -> int:
    """Merge the ``g``-byte segments at ``buf[base:base+ln]`` (the last may be shorter) into ``out``.

    With ``base2``/``ln2`` a second buffer of the same segment size follows the first (which must
    then end on a full segment): one TCP super-packet the sender had to send in two UDP GSO calls.
    Returns the number of bytes of ``out`` to write to the TUN (virtio-net header + packet, TTL not
    yet decremented), or 0 when the segments are not consecutive data of one TCP flow with equal
    headers or would exceed 64 KB (then the caller forwards them otherwise).
    """
    mv = memoryview(buf).cast("B")
    p = mv[base:base + ln]
    if base2 >= 0:
        if ln % g or ln2 < g:
            return 0
        tail_base, tail_ln = base2, ln2
    else:
        tail_base, tail_ln = base, ln
    n_tail_full = tail_ln // g
    rem = tail_ln - n_tail_full * g
    if ln < g or p[0] >> 4 != 4 or p[9] != 6 or (p[6] & 0x3F) or p[7]:
        return 0
    ihl = (p[0] & 0x0F) * 4
    if g < ihl + 20:
        return 0
    doff = (p[ihl + 12] >> 4) * 4
    hlen = ihl + doff
    paylen = g - hlen
    f0 = p[ihl + 13]
    if (doff < 20 or paylen <= 0 or (rem and rem <= hlen) or U16.unpack_from(p, 2)[0] != g
            or f0 & (TCP_SYN | TCP_RST | TCP_URG | TCP_FIN | TCP_PSH) or not f0 & TCP_ACK):
        return 0
    mask = _mask_for(ihl, hlen)
    tail_arr = np.frombuffer(buf, dtype=np.uint8, count=tail_ln, offset=tail_base)
    if base2 >= 0:
        first = np.frombuffer(buf, dtype=np.uint8, count=ln, offset=base).reshape(ln // g, g)
        rows = np.concatenate((first, tail_arr[:n_tail_full * g].reshape(n_tail_full, g)))
    else:
        rows = tail_arr[:n_tail_full * g].reshape(n_tail_full, g)
    n_full = len(rows)
    if n_full < 1:
        return 0
    total_pay = n_full * paylen + (rem - hlen if rem else 0)
    total = hlen + total_pay
    if total > 65535:
        return 0
    seq0 = U32.unpack_from(p, ihl + 4)[0]
    last_fl = f0
    if n_full > 1:
        hdr = rows[:, :hlen]
        # every header byte equal to the first segment's, except IP ID/checksum, seq, PSH/FIN, TCP checksum
        if ((hdr ^ hdr[0]) & mask).any():
            return 0
        fl = rows[:, ihl + 13]
        last_fl = int(fl[-1])
        if (fl[:-1] & (TCP_PSH | TCP_FIN)).any() or (last_fl & TCP_FIN and rem) or (rem and last_fl & TCP_PSH):
            return 0
        want = ((_AR64[:n_full] * paylen + seq0) & 0xFFFFFFFF).astype(">u4").view(np.uint8).reshape(n_full, 4)
        if not (rows[:, ihl + 4:ihl + 8] == want).all():
            return 0
    elif last_fl & TCP_FIN and rem:
        return 0
    if rem:
        t = n_tail_full * g
        last = tail_arr[t:t + rem]
        lf = int(last[ihl + 13])
        tp = mv[tail_base + t:tail_base + t + rem]
        if (((last[:hlen] ^ rows[0, :hlen]) & _mask_for(ihl, hlen, tail=True)).any()
                or U16.unpack_from(tp, 2)[0] != rem
                or U32.unpack_from(tp, ihl + 4)[0] != (seq0 + n_full * paylen) & 0xFFFFFFFF):
            return 0
        last_fl = lf
    H = VNET_HDR_LEN
    o = np.frombuffer(out, dtype=np.uint8, count=H + total)
    o[H:H + hlen] = rows[0, :hlen]
    o[H + hlen:H + hlen + n_full * paylen].reshape(n_full, paylen)[:] = rows[:, hlen:]
    if rem:
        o[H + hlen + n_full * paylen:H + total] = tail_arr[n_tail_full * g + hlen:tail_ln]
    omv = memoryview(out).cast("B")
    h = omv[H:H + hlen]
    h[ihl + 13] = f0 | (last_fl & (TCP_PSH | TCP_FIN))
    U16.pack_into(h, 2, total)
    h[10] = h[11] = 0
    U16.pack_into(h, 10, checksum(h[:ihl]))
    # partial checksum: the field holds the (not inverted) pseudo-header sum; the kernel finishes it
    U16.pack_into(h, ihl + 16, fold(sum(struct.unpack_from("!4H", h, 12)) + 6 + (total - ihl)))
    gso_type = VIRTIO_NET_HDR_GSO_TCPV4 | (VIRTIO_NET_HDR_GSO_ECN if f0 & TCP_CWR else 0)
    VNET.pack_into(omv, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hlen, paylen, ihl, 16)
    return H + total
