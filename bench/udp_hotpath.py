"""The udp forwarder's per-packet code path, in one process, without wake-ups (``udp_hotpath``).

A worker object (:class:`pyflanneld.udpfwd.worker.Worker` or the offload one) is fed one small
packet at a time, as a ping is: a SOCK_SEQPACKET socketpair stands in for the TUN (``readv`` and
``write`` behave alike: one packet per call), a UDP socket on 127.0.0.1 receives what it sends.
Per direction, ROUNDS packets; the CPU time (``time.process_time``: user + system of this process)
per packet, less the harness's own cost per round (the same loop with the worker call left out),
is what the worker's Python code and its system calls cost — the part of a forwarder hop that
does not depend on the machine's other load. Runs in a lab namespace (loopback only).

Also the route updates: the forwarder (``python -m pyflanneld.udpfwd --commands``, 2 workers) in
the namespace takes UPDATES route adds/deletes, each followed by ``sync``, which answers once every
worker has applied it; the wall time from the command to that answer (what a lease event costs
the data plane before the new route forwards).

    python -m bench udp_hotpath
    python bench/udp_hotpath.py worker          # internal: the measurement, inside the namespace
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import sys
import time

ROUNDS = 20000
UPDATES = 200
PING = bytes.fromhex("4500005400004000400100000a050102" "0a050202") + b"\x08\x00" + bytes(62)


def _ip_checksum(hdr: bytearray) -> None:
    hdr[10:12] = b"\0\0"
    s = sum(struct.unpack("!10H", bytes(hdr[:20])))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)


def measure(offload: bool) -> dict[str, float]:
    """µs of CPU per packet for tun→udp and udp→tun through a worker (offload or per-packet)."""
    from pyflanneld.udpfwd.worker import Worker, open_udp_socket

    pkt = bytearray(PING)
    _ip_checksum(pkt)
    wire = (bytes(10) if offload else b"") + bytes(pkt)  # TUN side: virtio-net header when offloading
    tun_worker, tun_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_worker.setblocking(False)
    ctl_worker, _ctl_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = open_udp_socket("127.0.0.1", 0)
    sock.setblocking(False)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    if offload:
        from pyflanneld.udpfwd.offload import OffloadWorker as cls
    else:
        cls = Worker
    w = cls(tun_fd=tun_worker.fileno(), sock=sock, ctl_fd=ctl_worker.fileno(), tun_ip=0x0A050100, mtu=1472)
    w.routes.set(0x0A050200, 24, w._next_hop(0x7F000001, sink.getsockname()[1]))
    src = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    to_worker = sock.getsockname()
    buf = bytearray(70000)

    def loop(step, feed, drain) -> float:
        t0 = time.process_time()
        for _ in range(ROUNDS):
            feed()
            step()
            drain()
        return (time.process_time() - t0) / ROUNDS * 1e6

    def nothing() -> None:
        pass

    out = {}
    feed_tun, drain_udp = (lambda: tun_peer.send(wire)), (lambda: sink.recv_into(buf))
    feed_udp, drain_tun = (lambda: src.sendto(pkt, to_worker)), (lambda: tun_peer.recv_into(buf))
    for _ in range(2):  # warm-up, then measured
        out["tun→udp"] = loop(w.tun_to_udp, feed_tun, drain_udp) - loop(nothing, feed_tun, lambda: tun_worker.recv_into(buf))
        out["udp→tun"] = loop(w.udp_to_tun, feed_udp, drain_tun) - loop(nothing, feed_udp, lambda: sock.recv_into(buf))
    if w.stats.udp_tx < ROUNDS or w.stats.tun_tx < ROUNDS:
        raise RuntimeError(f"worker did not forward every packet: {w.stats.as_dict()}")
    return out


def route_updates(host, n: int) -> list[float]:
    """Seconds from a route command to the forwarder's ``sync`` answer (every worker applied it), n times."""
    argv = ["ip", "netns", "exec", host.ns, sys.executable, "-m", "pyflanneld.udpfwd", "--network", "10.5.0.0/16",
            "--subnet", "10.5.1.0/24", "--bind", host.address, "--port", "8285", "--mtu", "1472",
            "--workers", "2", "--commands"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, bufsize=1, start_new_session=True)

    def answer() -> str:
        if not select.select([proc.stdout], [], [], 30)[0]:
            raise RuntimeError("the udp forwarder did not answer within 30 s")
        return proc.stdout.readline().strip()

    try:
        if answer() != "ready":
            raise RuntimeError("the udp forwarder did not start")
        took = []
        for i in range(n):
            line = "add 10.5.3.0/24 192.168.100.3" if i % 2 == 0 else "del 10.5.3.0/24"
            t0 = time.perf_counter()
            proc.stdin.write(f"{line}\nsync\n")
            proc.stdin.flush()
            if answer() != "ok":
                raise RuntimeError("the udp forwarder did not confirm a route update")
            took.append(time.perf_counter() - t0)
        return took
    finally:
        proc.terminate()
        proc.wait(10)


def bench_udp_hotpath(run) -> list:
    """The scenario: both worker kinds, measured in a lab namespace (``run``: bench.flavours.Run),
    and the forwarder's route updates."""
    from lab import Lab
    from lab.measure import percentile

    from .table import Table

    rows = {}
    updates: list[list[float]] = []
    with Lab() as lab:
        h = lab.add_host("hot")
        for kind in ("offload", "per-packet"):
            samples = []
            for _ in range(run.repeats):
                out = h.run(sys.executable, __file__, "worker", kind, timeout=300).stdout
                samples.append({k: float(v) for k, v in (ln.split("=") for ln in out.split())})
            rows[kind] = samples
        for _ in range(run.repeats):
            updates.append(route_updates(h, run.n(UPDATES)))
    t = Table(f"udp worker code path per small packet (CPU time, {ROUNDS:,} packets per direction, no wake-ups)",
              ["worker", "tun → udp", "udp → tun"])
    for kind, samples in rows.items():
        t.add(kind, *(f"{min(s[d] for s in samples):.1f} µs" for d in ("tun→udp", "udp→tun")))
    t.note("CPU time of the worker's Python code and its system calls per packet (best of the repeats), "
           "less the harness loop's own cost: the share of a forwarder hop that is ours, whatever the load")
    u = Table(f"udp forwarder route updates: command → every worker applied it ({len(updates[0])} adds/deletes, "
              "2 workers)", ["repeat", "p50", "p99", "max"])
    for i, took in enumerate(updates, 1):
        u.add(i, *(f"{v * 1000:.1f} ms" for v in (percentile(took, 50), percentile(took, 99), max(took))))
    u.note("wall time (it depends on the machine's load): the supervisor's command, the workers' control "
           "messages, the sync answer")
    return [t, u]


SCENARIOS = {"udp_hotpath": bench_udp_hotpath}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        raise SystemExit("usage: python -m bench udp_hotpath (the worker mode is internal)")
    res = measure(sys.argv[2] == "offload")
    print(" ".join(f"{k}={v:.2f}" for k, v in res.items()))
