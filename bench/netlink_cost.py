"""What programming vxlan peers costs: the daemon's netlink adapter vs batched raw netlink.

Each vxlan peer is three kernel entries (ARP, FDB, route). The daemon's adapter
(pyflanneld.netlink.Netlink, over pyroute2's AsyncIPRoute) makes one request per entry and waits
for its answer; "batched" builds the same RTM_NEWNEIGH/RTM_NEWROUTE messages with struct and sends
256 per sendmsg, then reads the 256 acks. "dump" is one reconcile pass's reading (routes,
neighbours, FDB of flannel.1 through the adapter). All in a lab namespace with a real vxlan device.

    python -m bench netlink_cost
    python bench/netlink_cost.py worker adapter|batched|dump N     # inside a namespace (internal)
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from ipaddress import IPv4Address, IPv4Network

N_ADAPTER = 2000
N_BATCHED = 5000
BATCH = 256

NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR, RTM_NEWROUTE, RTM_NEWNEIGH = 2, 24, 28
NUD_NOARP, NUD_PERMANENT, NTF_SELF = 0x40, 0x80, 0x02
AF_BRIDGE, RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST, RTNH_F_ONLINK = 7, 254, 3, 1, 4
NDA_DST, NDA_LLADDR, RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 2, 1, 4, 5


def peers(n: int):
    """(subnet, VtepMAC, PublicIP) of peer i, as bench/etcd_probe.py writes them."""
    for i in range(1, n + 1):
        sn = IPv4Network(f"10.{i // 256}.{i % 256}.0/24")
        mac = "02:be:%02x:%02x:%02x:%02x" % ((i >> 24) & 255, (i >> 16) & 255, (i >> 8) & 255, i & 255)
        yield sn, mac, IPv4Address(f"172.{16 + (i >> 16) % 16}.{(i >> 8) & 255}.{i & 255}")


# -- raw messages -----------------------------------------------------------------------------------
def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("HH", n, kind) + payload + b"\0" * (-n % 4)


def _msg(kind: int, body: bytes) -> bytes:
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return struct.pack("IHHII", 16 + len(body), kind, flags, 0, 0) + body  # seq filled in at send


def neigh_msg(family: int, ifindex: int, state: int, flags: int, dst: IPv4Address, mac: str) -> bytes:
    body = struct.pack("BxxxiHBB", family, ifindex, state, flags, 0)
    body += _attr(NDA_DST, dst.packed) + _attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
    return _msg(RTM_NEWNEIGH, body)


def route_msg(dst: IPv4Network, gateway: IPv4Address, oif: int) -> bytes:
    body = struct.pack("BBBBBBBBI", socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0,
                       RTN_UNICAST, RTNH_F_ONLINK)
    body += _attr(RTA_DST, dst.network_address.packed) + _attr(RTA_GATEWAY, gateway.packed)
    body += _attr(RTA_OIF, struct.pack("i", oif))
    return _msg(RTM_NEWROUTE, body)


def send_batched(msgs: list[bytes], batch: int = BATCH) -> list[int]:
    """Send msgs `batch` per sendmsg; return the errno of every failed one (empty: all applied)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    errors = []
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((0, 0))
        seq = 0
        for i in range(0, len(msgs), batch):
            chunk = msgs[i:i + batch]
            buf = bytearray()
            for m in chunk:
                seq += 1
                buf += m[:8] + struct.pack("I", seq) + m[12:]
            s.send(bytes(buf))
            acked = 0
            while acked < len(chunk):
                data = s.recv(1 << 20)
                off = 0
                while off < len(data):
                    length, kind = struct.unpack_from("IH", data, off)
                    if kind == NLMSG_ERROR:
                        code = struct.unpack_from("i", data, off + 16)[0]
                        if code:
                            errors.append(-code)
                        acked += 1
                    off += (length + 3) & ~3
    finally:
        s.close()
    return errors


# -- the worker (inside the namespace) --------------------------------------------------------------
async def _adapter(ifindex: int, n: int) -> None:
    from pyflanneld.netlink import Netlink, Route

    nl = Netlink()
    try:
        for sn, mac, pub in peers(n):
            gw = sn.network_address
            await nl.replace_neighbour(ifindex, gw, mac)
            await nl.replace_fdb(ifindex, mac, pub)
            await nl.replace_route(Route(sn, gw, ifindex, onlink=True))
    finally:
        await nl.close()


async def _dump(ifindex: int) -> tuple[int, int, int]:
    from pyflanneld.netlink import Netlink

    nl = Netlink()
    try:
        return len(await nl.routes()), len(await nl.neighbours(ifindex)), len(await nl.fdb(ifindex))
    finally:
        await nl.close()


def worker(mode: str, n: int) -> None:
    import pyflanneld.netlink  # noqa: F401 - imports are not part of the timing

    ifindex = socket.if_nametoindex("flannel.1")
    t0 = time.perf_counter()
    if mode == "adapter":
        asyncio.run(_adapter(ifindex, n))
    elif mode == "batched":
        msgs = []
        for sn, mac, pub in peers(n):
            gw = sn.network_address
            msgs += [neigh_msg(socket.AF_INET, ifindex, NUD_PERMANENT, 0, gw, mac),
                     neigh_msg(AF_BRIDGE, ifindex, NUD_PERMANENT | NUD_NOARP, NTF_SELF, pub, mac),
                     route_msg(sn, gw, ifindex)]
        errors = send_batched(msgs)
        if errors:
            raise SystemExit(f"{len(errors)} requests failed, e.g. errno {errors[0]}")
    elif mode == "dump":
        print("counts", *asyncio.run(_dump(ifindex)))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(f"seconds {time.perf_counter() - t0:.4f}", flush=True)


# -- the benchmark ----------------------------------------------------------------------------------
def bench_netlink_cost(run) -> list:
    """The scenario (``run``: bench.flavours.Run, unused: this measures pyflanneld's adapter alone)."""
    from lab import Lab

    from .table import Table

    def fresh_device(h) -> None:
        if h.link_exists("flannel.1"):
            h.ip("link", "del", "flannel.1")
        h.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", h.address, "dev", "eth0",
             "dstport", "8472", "nolearning")
        h.ip("link", "set", "flannel.1", "up")

    def timed(h, mode: str, n: int) -> tuple[float, str]:
        cp = h.run(sys.executable, __file__, "worker", mode, str(n), timeout=300)
        out = cp.stdout
        return float(out.split("seconds")[1].split()[0]), out

    def entries(h) -> tuple[int, int, int]:
        return (h.ip("route", "show", "dev", "flannel.1").count("\n"),
                h.ip("neigh", "show", "dev", "flannel.1").count("PERMANENT"),
                h.bridge("fdb", "show", "dev", "flannel.1").count(" dst "))

    with Lab() as lab:
        h = lab.add_host("nl1")
        fresh_device(h)
        t_adapter, _ = timed(h, "adapter", N_ADAPTER)
        assert entries(h) == (N_ADAPTER,) * 3, entries(h)
        fresh_device(h)
        t_batched, _ = timed(h, "batched", N_BATCHED)
        assert entries(h) == (N_BATCHED,) * 3, entries(h)
        t_dump, out = timed(h, "dump", 0)
        counts = [int(x) for x in out.split("counts")[1].split()[:3]]
        assert counts[0] >= N_BATCHED and counts[1:] == [N_BATCHED, N_BATCHED], out  # + main-table routes

    t = Table("Netlink cost of vxlan peers (ARP + FDB + route each)",
              ["method", "peers", "seconds", "µs per peer", "→ 5,000 peers"])
    for label, n, secs in (("daemon adapter (pyroute2, 1 request/entry)", N_ADAPTER, t_adapter),
                           (f"batched raw netlink ({BATCH} msgs/sendmsg)", N_BATCHED, t_batched)):
        t.add(label, n, f"{secs:.2f}", f"{secs / n * 1e6:.0f}", f"{secs / n * 5000:.2f} s")
    t.add("one reconcile read (3 dumps via adapter)", N_BATCHED, f"{t_dump:.2f}", f"{t_dump / N_BATCHED * 1e6:.0f}",
          f"{t_dump:.2f} s every 10 s")
    t.note(f"batched is {t_adapter / N_ADAPTER / (t_batched / N_BATCHED):.0f}× cheaper per peer "
           "(timings exclude interpreter start and imports)")
    return [t]


SCENARIOS = {"netlink_cost": bench_netlink_cost}


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "worker":
        raise SystemExit("usage: python -m bench netlink_cost (the worker mode is internal)")
    worker(sys.argv[2], int(sys.argv[3]))
