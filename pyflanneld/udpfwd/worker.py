"""One forwarder worker process: ``python -m pyflanneld.udpfwd.worker --tun flannel0 ...``.

Each worker opens its own queue of the multi-queue TUN device and its own ``SO_REUSEPORT`` UDP
socket, so N workers forward in parallel without sharing a GIL. It never runs on the daemon's
asyncio loop and never forks the daemon: the daemon starts it with ``subprocess`` and talks to it
over a SOCK_SEQPACKET fd (``--ctl-fd``, see :mod:`.control`).

Packet paths (upstream ``proxy_amd64.c`` semantics):

* TUN → UDP: route lookup on the destination; no route → ICMP net unreachable written back into
  the TUN; TTL − 1 (drop at 0); the raw IPv4 packet is the UDP payload, sent to next_hop:port.
* UDP → TUN: TTL − 1 (drop at 0), write to the TUN.

Reads are batched: up to ``--batch`` packets per readiness event; the first is sent at once
(``sendto``: a lone packet never waits for the read that finds the queue empty), the others with
one ``sendmmsg``; UDP is received with ``recvmmsg``. With ``--offload`` the TUN uses virtio-net headers and the
socket UDP GSO/GRO, see :mod:`.offload`.

The worker dies with its parent (``PR_SET_PDEATHSIG``) and stops cleanly on SIGTERM/SIGINT or a
STOP message; it removes nothing (the TUN queue just closes with the process).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from ipaddress import IPv4Address

import structlog

from . import control, tun
from .mmsg import MsgBatch, make_sockaddr
from .packet import RouteTable, net_unreachable

log = structlog.get_logger()

PR_SET_PDEATHSIG = 1
SO_REUSEPORT = 15
DEFAULT_BATCH = 64
SOCK_BUF = 4 << 20

_U32 = struct.Struct("!I").unpack_from


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent thread exits (PR_SET_PDEATHSIG).
    Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def open_udp_socket(bind_ip: str, port: int) -> socket.socket:
    """A UDP socket bound to ``bind_ip``:``port`` with SO_REUSEPORT (one per worker: the kernel spreads
    the flows) and large buffers where allowed. Raises OSError (e.g. the address is not local)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass
    s.bind((bind_ip, port))
    return s


class Stats:
    """A worker's counters (sent to the daemon in each pong; /metrics sums them over the workers).

    Per direction, in inner IPv4 packets as carried one per UDP datagram (a TSO super-packet counts
    as the segments it is sent as): egress (TUN → UDP) forwarded ``udp_tx`` packets / ``tx_bytes``,
    dropped ``tx_drop`` / ``tx_drop_bytes``; ingress (UDP → TUN) forwarded ``tun_tx`` / ``rx_bytes``,
    dropped ``rx_drop`` / ``rx_drop_bytes``. Reads and why packets were dropped: ``tun_rx`` (TUN
    reads), ``udp_rx`` (datagrams received), ``no_route``, ``ttl_drop``, ``bad`` (malformed, or
    refused by the TUN); ``ctl`` control messages, ``gso`` super-packets sent or written, ``split`` GRO
    buffers that could not be coalesced.
    """

    __slots__ = ("tun_rx", "udp_tx", "udp_rx", "tun_tx", "no_route", "ttl_drop", "bad", "ctl", "gso", "split",
                 "tx_bytes", "rx_bytes", "tx_drop", "tx_drop_bytes", "rx_drop", "rx_drop_bytes")

    def __init__(self) -> None:
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        """The counters by name (what a PONG carries)."""
        return {k: getattr(self, k) for k in self.__slots__}


class Worker:
    """One forwarder worker (see the module docstring): its TUN queue ``tun_fd``, UDP socket ``sock``,
    control socket ``ctl_fd``, the TUN's address ``tun_ip`` (an int, source of ICMP errors), ``mtu``,
    ``batch`` packets per wake-up and its ``index``. :meth:`run` forwards until stopped."""
    def __init__(self, *, tun_fd: int, sock: socket.socket, ctl_fd: int, tun_ip: int,
                 mtu: int, batch: int = DEFAULT_BATCH, index: int = 0) -> None:
        self.tun = tun_fd
        self.sock = sock
        self.sock_fd = sock.fileno()
        self.ctl = ctl_fd
        self.tun_ip = tun_ip
        self.mtu = mtu
        self.batch = batch
        self.index = index
        # next hop value: (address of its ctypes sockaddr_in, (ip, port))
        self.routes: RouteTable[tuple[int, tuple[str, int]]] = RouteTable()
        self._sockaddrs: dict[tuple[int, int], object] = {}  # keeps the ctypes sockaddrs alive
        self.stats = Stats()
        self.running = True
        slot = max(2048, mtu + 64)
        self.tx = MsgBatch(batch, slot)  # TUN → UDP
        self.rx = MsgBatch(batch, slot)  # UDP → TUN
        self._tx_lists = [[s] for s in self.tx.slots]

    # --- control ----------------------------------------------------------------------------

    def _next_hop(self, ip: int, port: int) -> tuple[int, tuple[str, int]]:
        key = (ip, port)
        sa = self._sockaddrs.get(key)
        if sa is None:
            sa = self._sockaddrs[key] = make_sockaddr(str(IPv4Address(ip)), port)
        return ctypes.addressof(sa), (str(IPv4Address(ip)), port)

    def handle_control(self) -> None:
        """Apply every pending control message (SET, REPLACE, DEL, PING, STOP) without blocking; the
        daemon closing its end stops the worker."""
        while True:
            try:
                msg = self._ctl_sock.recv(control.MAX_MSG)
            except BlockingIOError:
                return
            if not msg:  # the daemon closed its end: it is gone
                self.running = False
                return
            self.stats.ctl += 1
            kind, body = msg[:1], msg[1:]
            if kind in (control.SET, control.REPLACE):
                if kind == control.REPLACE:
                    self.routes.clear()
                for dst, plen, nh, port in control.decode_routes(body):
                    self.routes.set(dst, plen, self._next_hop(nh, port))
            elif kind == control.DEL:
                for dst, plen in control.decode_delete(body):
                    self.routes.delete(dst, plen)
            elif kind == control.PING:
                token = struct.unpack_from("!I", body)[0]
                st = self.stats.as_dict()
                st["routes"] = len(self.routes)
                st["pid"] = os.getpid()
                self._ctl_sock.send(control.encode_pong(token, st))
            elif kind == control.STOP:
                self.running = False
                return

    # --- packet paths (hot) ------------------------------------------------------------------

    def tun_to_udp(self) -> None:
        """Forward up to ``batch`` packets read from the TUN: route lookup, TTL − 1 (checksum updated
        in place), sent in UDP to the next hop; no route → ICMP net unreachable into the TUN. The hot
        path: one loop with its names in locals, no calls per packet beyond the system calls."""
        tx = self.tx
        slots = tx.slots
        lists = self._tx_lists
        iov_q = tx.iov_q
        hdr_q = tx.hdr_q
        readv = os.readv
        fd = self.tun
        tables = self.routes.tables
        batch = self.batch
        n = 0
        reads = 0
        queued = 0  # bytes in the n slots queued for sendmmsg
        while n < batch and reads < batch:
            try:
                ln = readv(fd, lists[n])
            except BlockingIOError:
                break
            reads += 1
            p = slots[n]
            if ln < 20 or p[0] >> 4 != 4:
                self.stats.bad += 1
                self.drop_tx(ln)
                continue
            dst = _U32(p, 16)[0]
            nh = None
            for mask, tbl in tables:
                nh = tbl.get(dst & mask)
                if nh is not None:
                    break
            if nh is None:
                self.no_route(p[:ln])
                continue
            ttl = p[8]
            if ttl <= 1:
                self.stats.ttl_drop += 1
                self.drop_tx(ln)
                continue
            p[8] = ttl - 1
            c = (p[10] << 8 | p[11]) + 0x100
            if c >= 0xFFFF:
                c = (c + 1) & 0xFFFF
            p[10] = c >> 8
            p[11] = c & 0xFF
            if reads == 1:  # the first packet of a wake-up goes out at once: see _send_one
                self.stats.udp_tx += self._send_one(p[:ln], nh)
                continue
            iov_q[2 * n + 1] = ln
            hdr_q[n * 8] = nh[0]
            n += 1
            queued += ln
        self.stats.tun_rx += reads
        if n:
            self.flush(n, queued)

    def flush(self, n: int, nbytes: int) -> None:
        """``sendmmsg`` the first ``n`` tx slots (``nbytes`` in all) and count what went out."""
        tx = self.tx
        sent = tx.send(self.sock_fd, n)
        self.stats.udp_tx += sent
        self.stats.tx_bytes += nbytes
        if sent < n:
            self.stats.tx_bytes -= tx.refused_bytes
            self.drop_tx(tx.refused_bytes, n - sent)

    def drop_tx(self, nbytes: int, packets: int = 1) -> None:
        """Count ``packets`` egress packets (``nbytes`` in all) as dropped."""
        self.stats.tx_drop += packets
        self.stats.tx_drop_bytes += nbytes

    def drop_rx(self, nbytes: int, packets: int = 1) -> None:
        """Count ``packets`` ingress packets (``nbytes`` in all) as dropped."""
        self.stats.rx_drop += packets
        self.stats.rx_drop_bytes += nbytes

    def _send_one(self, pkt: memoryview, nh: tuple[int, tuple[str, int]]) -> int:
        """Send one datagram now with a plain ``sendto``; 1 if it went out.

        The first packet read after a wake-up is sent before the next read is tried, so a lone
        packet (a ping, a request) never waits for the read that finds the queue empty; what
        follows in the same wake-up is batched into one ``sendmmsg``. A refused datagram (a
        firewall, no route) is dropped, as upstream drops a failed ``sendto``.
        """
        try:
            self.sock.sendto(pkt, nh[1])
        except OSError:
            self.drop_tx(len(pkt))
            return 0
        self.stats.tx_bytes += len(pkt)
        return 1

    def udp_to_tun(self) -> None:
        """Write the packets of one recvmmsg batch to the TUN (TTL − 1, dropped at 0; bad ones counted)."""
        rx = self.rx
        n = rx.recv(self.sock_fd)
        if not n:
            return
        self.stats.udp_rx += n
        slots = rx.slots
        hdr_i = rx.hdr_i
        write = os.write
        fd = self.tun
        sent = 0
        sent_bytes = 0
        for i in range(n):
            ln = hdr_i[i * 16 + 14]
            p = slots[i]
            if ln < 20 or ln > rx.slot_size or p[0] >> 4 != 4:
                self.stats.bad += 1
                self.drop_rx(ln)
                continue
            ttl = p[8]
            if ttl <= 1:
                self.stats.ttl_drop += 1
                self.drop_rx(ln)
                continue
            p[8] = ttl - 1
            c = (p[10] << 8 | p[11]) + 0x100
            if c >= 0xFFFF:
                c = (c + 1) & 0xFFFF
            p[10] = c >> 8
            p[11] = c & 0xFF
            try:
                write(fd, p[:ln])
                sent += 1
                sent_bytes += ln
            except BlockingIOError:
                self.drop_rx(ln)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EIO):
                    raise
                self.stats.bad += 1
                self.drop_rx(ln)
        self.stats.tun_tx += sent
        self.stats.rx_bytes += sent_bytes

    def no_route(self, pkt: memoryview) -> None:
        """Count ``pkt`` (an IPv4 packet without a route) as dropped and answer it with ICMP net
        unreachable written into the TUN (upstream's send_net_unreachable)."""
        self.stats.no_route += 1
        self.drop_tx(len(pkt))
        icmp = net_unreachable(pkt, self.tun_ip)
        if icmp is not None:
            try:
                os.write(self.tun, icmp)
            except OSError:
                pass

    # --- loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Forward until SIGTERM/SIGINT, a STOP message or the daemon's end of the control socket closes;
        SIGHUP is ignored. Waits in epoll on the TUN queue, the socket, the control socket and
        the signal wake-up pipe."""
        self._ctl_sock = socket.socket(fileno=self.ctl)
        self._ctl_sock.setblocking(False)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

        def _stop(signum, frame):
            self.running = False

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `systemctl kill -s HUP` reaches us too: keep forwarding
        ep = select.epoll()
        ep.register(self.ctl, select.EPOLLIN)
        ep.register(wake_r, select.EPOLLIN)
        ep.register(self.tun, select.EPOLLIN)
        ep.register(self.sock_fd, select.EPOLLIN)
        tun_fd, sock_fd, ctl_fd = self.tun, self.sock_fd, self.ctl
        tun_to_udp, udp_to_tun = self.tun_to_udp, self.udp_to_tun
        while self.running:
            try:
                events = ep.poll(5.0)
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd == tun_fd:
                    tun_to_udp()
                elif fd == sock_fd:
                    udp_to_tun()
                elif fd == ctl_fd:
                    self.handle_control()
                else:
                    try:
                        os.read(wake_r, 64)
                    except BlockingIOError:
                        pass
        ep.close()


def _setup_logging() -> None:
    try:
        from ..log import setup
    except ImportError:  # pragma: no cover
        return
    setup(int(os.environ.get("PYFLANNELD_UDP_DEBUG", "0")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line (``argv``, default ``sys.argv[1:]``) as an argparse Namespace; exits 2
    on a usage error."""
    ap = argparse.ArgumentParser(prog="python -m pyflanneld.udpfwd.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--tun", required=True, help="TUN device name (flannel0)")
    ap.add_argument("--bind", required=True, help="local IP to bind the UDP socket to")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tun-ip", required=True, help="the TUN's address (source of ICMP errors)")
    ap.add_argument("--mtu", type=int, required=True)
    ap.add_argument("--ctl-fd", type=int, required=True)
    ap.add_argument("--parent", type=int, default=0, help="exit if this pid is not our parent")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--offload", action="store_true", help="virtio-net headers on the TUN, UDP GSO/GRO")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The worker process: returns 0 after a clean stop, 1 when the daemon died before it could set
    PR_SET_PDEATHSIG, 2 when the TUN queue or the socket cannot be opened (one log line)."""
    args = parse_args(argv)
    set_pdeathsig(signal.SIGTERM)
    if args.parent and os.getppid() != args.parent:
        return 1  # the daemon died before we set PDEATHSIG
    _setup_logging()
    blog = log.bind(worker=args.index, pid=os.getpid())
    try:
        tun_fd = tun.open_queue(args.tun, tun.tun_flags(multi_queue=True, vnet_hdr=args.offload))
        sock = open_udp_socket(args.bind, args.port)
    except OSError as e:
        blog.error("udp worker cannot start", error=str(e))
        return 2
    if args.offload:
        from .offload import OffloadWorker as cls
    else:
        cls = Worker
    w = cls(tun_fd=tun_fd, sock=sock, ctl_fd=args.ctl_fd, tun_ip=int(IPv4Address(args.tun_ip)),
            mtu=args.mtu, batch=args.batch, index=args.index)
    blog.debug("udp worker started", tun=args.tun, bind=f"{args.bind}:{args.port}", offload=args.offload)
    t0 = time.monotonic()
    prof_path = os.environ.get("PYFLANNELD_UDP_PROFILE")
    try:
        if prof_path:  # debugging aid: cProfile stats per worker
            import cProfile

            cProfile.runctx("w.run()", globals(), {"w": w}, f"{prof_path}.{args.index}.{os.getpid()}")
        else:
            w.run()
    finally:
        os.close(tun_fd)
        sock.close()
    blog.debug("udp worker stopped", uptime=round(time.monotonic() - t0, 1),
               stats=json.dumps(w.stats.as_dict(), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
