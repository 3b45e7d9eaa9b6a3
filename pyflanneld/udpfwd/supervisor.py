"""The daemon's side of the forwarder: hold the TUN device, run the worker processes, push routes.

:class:`Forwarder` never forks the (grpc-laden) daemon: workers are fresh interpreters started with
``subprocess`` (``python -m pyflanneld.udpfwd.worker``), each opening its own TUN queue and
SO_REUSEPORT socket. The daemon keeps one *detached* queue of the multi-queue TUN open, so the
device lives exactly as long as the daemon (upstream: the TUN disappears with flanneld) and
survives a worker restart; a detached queue gets no packets.

Route updates are small SEQPACKET messages to every worker (:mod:`.control`); a worker applies them
between two packet batches (< 1 ms). All methods are quick and non-blocking except :meth:`sync`,
:meth:`wait_ready` and :meth:`stop`, which wait for the workers (bounded by a timeout).

Spawn workers from the thread that will outlive them (the daemon's main thread): the kernel sends
``PR_SET_PDEATHSIG`` when the *thread* that forked a child exits.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import structlog

from . import control, tun
from .control import Route

log = structlog.get_logger()

_PKG_ROOT = str(Path(__file__).resolve().parent.parent.parent)


def default_workers() -> int:
    """How many workers to run: ``$PYFLANNELD_UDP_WORKERS`` when it is a number (at least 1; else a
    warning), otherwise the number of CPUs."""
    env = os.environ.get("PYFLANNELD_UDP_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            log.warning("ignoring PYFLANNELD_UDP_WORKERS: not a number", value=env)
    return max(1, os.cpu_count() or 1)


def default_offload() -> bool:
    """TCP segmentation/coalescing offload (:mod:`.offload`): on unless PYFLANNELD_UDP_OFFLOAD=0."""
    return os.environ.get("PYFLANNELD_UDP_OFFLOAD", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class _WorkerProc:
    index: int
    proc: subprocess.Popen
    ctl: socket.socket
    started: float = field(default_factory=time.monotonic)
    counters: dict[str, int] = field(default_factory=dict)  # its Stats as last polled


class Forwarder:
    """The udp backend's forwarder (see the module docstring): the TUN ``tun_name`` (address
    ``tun_ip``, ``mtu`` bytes), ``workers`` worker processes (default :func:`default_workers`)
    bound to ``bind_ip``:``port``, with offload when asked and possible (default
    :func:`default_offload`), reading up to ``batch`` packets per wake-up; ``routes`` is the table
    every worker holds."""
    def __init__(self, *, tun_name: str, bind_ip: IPv4Address | str, port: int, tun_ip: IPv4Address | str,
                 mtu: int, workers: int | None = None, offload: bool | None = None, batch: int = 64,
                 python: str = sys.executable) -> None:
        self.tun_name = tun_name
        self.bind_ip = str(bind_ip)
        self.port = port
        self.tun_ip = str(tun_ip)
        self.mtu = mtu
        self.nworkers = workers if workers is not None else default_workers()
        self.offload = default_offload() if offload is None else offload
        self.batch = batch
        self.python = python
        self.routes: dict[IPv4Network, Route] = {}
        self.workers: list[_WorkerProc] = []
        self.holder_fd: int | None = None
        self._tokens = itertools.count(1)
        self.retired: dict[str, int] = {}  # the last polled counters of workers that exited, summed
        self.polling = asyncio.Lock()  # held by poll_counters: take it to close control sockets meanwhile

    # --- device ------------------------------------------------------------------------------

    def open_device(self) -> None:
        """Create (or attach to) the TUN device and keep one detached queue open.

        Offload needs numpy and a kernel that takes TUNSETOFFLOAD; without them the per-packet
        forwarder is used (logged once).
        """
        if self.holder_fd is not None:
            return
        if self.offload and importlib.util.find_spec("numpy") is None:
            log.warning("udp offload off: numpy is not installed (pip install numpy)")
            self.offload = False
        if self.offload:
            try:
                self.holder_fd = self._open_holder(vnet_hdr=True)
                return
            except OSError as e:
                if isinstance(e, tun.TunError) and e.errno != errno.EINVAL:
                    raise
                log.warning("udp offload off: the TUN does not take virtio-net offloads", error=str(e))
                self.offload = False
        self.holder_fd = self._open_holder(vnet_hdr=False)

    def _open_holder(self, vnet_hdr: bool) -> int:
        fd = tun.open_queue(self.tun_name, tun.tun_flags(multi_queue=True, vnet_hdr=vnet_hdr))
        try:
            tun.set_offload(fd, tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO_ECN if vnet_hdr else 0)
            tun.set_queue_enabled(fd, False)
        except OSError:
            os.close(fd)
            raise
        return fd

    # --- workers -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the device (:meth:`open_device`) and spawn the workers with the current routes. Raises
        OSError (tun.TunError) when the TUN cannot be made."""
        self.open_device()
        for i in range(self.nworkers):
            self.workers.append(self._spawn(i))
        log.info("udp forwarder started", device=self.tun_name, workers=self.nworkers,
                 bind=f"{self.bind_ip}:{self.port}", offload=self.offload)

    def _spawn(self, index: int) -> _WorkerProc:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, control.MAX_MSG)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, control.MAX_MSG)
        argv = [self.python, "-m", "pyflanneld.udpfwd.worker", "--tun", self.tun_name, "--bind", self.bind_ip,
                "--port", str(self.port), "--tun-ip", self.tun_ip, "--mtu", str(self.mtu),
                "--ctl-fd", str(child.fileno()), "--parent", str(os.getpid()), "--index", str(index),
                "--batch", str(self.batch)]
        if self.offload:
            argv.append("--offload")
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")  # numpy's BLAS thread pool is of no use to a worker
        try:
            proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            child.close()
        parent.setblocking(False)
        wp = _WorkerProc(index, proc, parent)
        self._send(wp, control.encode_routes(control.REPLACE, self.routes.values()))
        return wp

    def _send(self, wp: _WorkerProc, msg: bytes) -> None:
        try:
            wp.ctl.send(msg)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError, OSError) as e:
            log.warning("udp worker did not take a route update; restarting it", worker=wp.index,
                        pid=wp.proc.pid, error=str(e))
            self._kill(wp)

    def _broadcast(self, msg: bytes) -> None:
        for wp in list(self.workers):
            self._send(wp, msg)

    def check(self) -> int:
        """Restart workers that died; returns how many were restarted."""
        restarted = 0
        for i, wp in enumerate(self.workers):
            if wp.proc.poll() is not None:
                log.warning("udp worker exited; restarting it", worker=wp.index, pid=wp.proc.pid,
                            rc=wp.proc.returncode)
                add_counters(self.retired, wp.counters)
                wp.ctl.close()
                self.workers[i] = self._spawn(wp.index)
                restarted += 1
        return restarted

    def _kill(self, wp: _WorkerProc) -> None:
        if wp.proc.poll() is None:
            wp.proc.kill()

    # --- routes ------------------------------------------------------------------------------

    def set_routes(self, routes: Iterable[Route]) -> None:
        """Make the table exactly ``routes`` (one atomic message per worker)."""
        self.routes = {r.dst: r for r in routes}
        self._broadcast(control.encode_routes(control.REPLACE, self.routes.values()))

    def add_route(self, route: Route) -> None:
        """Set ``route`` in every worker (nothing is sent when it is already there)."""
        if self.routes.get(route.dst) == route:
            return
        self.routes[route.dst] = route
        self._broadcast(control.encode_routes(control.SET, [route]))

    def del_route(self, dst: IPv4Network) -> None:
        """Remove the route for ``dst`` from every worker (nothing is sent when there is none)."""
        if self.routes.pop(dst, None) is None:
            return
        self._broadcast(control.encode_delete([dst]))

    # --- synchronisation ---------------------------------------------------------------------

    def sync(self, timeout_s: float = 5.0) -> list[dict]:
        """Ping every worker and wait for the answers: all earlier route updates are applied.

        Returns each worker's counters (plus ``routes`` and ``pid``); raises TimeoutError.
        """
        token = next(self._tokens)
        pending = {wp.ctl.fileno(): wp for wp in self.workers}
        for wp in self.workers:
            self._send(wp, control.encode_ping(token))
        out: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"udp workers did not answer: {[wp.index for wp in pending.values()]}")
            ready, _, _ = select.select(list(pending), [], [], left)
            for fd in ready:
                wp = pending[fd]
                try:
                    msg = wp.ctl.recv(control.MAX_MSG)
                except BlockingIOError:
                    continue
                if not msg:
                    raise TimeoutError(f"udp worker {wp.index} exited (rc={wp.proc.poll()})")
                if msg[:1] == control.PING:
                    tok, stats = control.decode_pong(msg)
                    if tok == token:
                        out[wp.index] = stats
                        del pending[fd]
        return [out[i] for i in sorted(out)]

    async def poll_counters(self, timeout_s: float = 1.0) -> dict[str, int]:
        """The workers' counters (:class:`~pyflanneld.udpfwd.worker.Stats`) summed, those of
        workers that exited included (the totals never go down), for /metrics. Asks every worker
        (a ping on its control socket, answered between two packet batches) on the running loop,
        never blocking it; a worker that does not answer within ``timeout_s`` seconds counts with
        its last answer. The daemon's loop must be the only reader of the control sockets
        (:meth:`sync` is for a forwarder without a loop)."""
        async with self.polling:
            token = next(self._tokens)
            loop = asyncio.get_running_loop()

            async def ask(wp: _WorkerProc) -> None:
                self._send(wp, control.encode_ping(token))
                while True:
                    msg = await loop.sock_recv(wp.ctl, control.MAX_MSG)
                    if not msg:
                        return  # exited: check() restarts it
                    if msg[:1] == control.PING:
                        tok, stats = control.decode_pong(msg)
                        if tok == token:
                            wp.counters = {k: v for k, v in stats.items() if k not in ("pid", "routes")}
                            return

            tasks = [asyncio.ensure_future(ask(wp)) for wp in self.workers]
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)  # their reads end before the lock goes
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        log.debug("udp worker did not answer a counter poll", error=str(t.exception()))
        return self.totals()

    def totals(self) -> dict[str, int]:
        """The counters as last polled, summed over all workers (exited ones included)."""
        total = dict(self.retired)
        for wp in self.workers:
            add_counters(total, wp.counters)
        return total

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until every worker has applied every update so far (:meth:`sync`); raises
        TimeoutError after ``timeout_s`` seconds."""
        self.sync(timeout_s)

    def stats(self) -> dict[str, int]:
        """The workers' counters summed (:meth:`sync`: blocks until each answered)."""
        total: dict[str, int] = {}
        for st in self.sync():
            for k, v in st.items():
                if k != "pid":
                    total[k] = total.get(k, 0) + v
        return total

    @property
    def pids(self) -> list[int]:
        """The process ids of the running workers."""
        return [wp.proc.pid for wp in self.workers]

    # --- shutdown ----------------------------------------------------------------------------

    def stop(self, timeout_s: float = 2.0, close_device: bool = True) -> None:
        """Stop the workers (STOP message, then SIGTERM, then SIGKILL); close the device holder."""
        for wp in self.workers:
            try:
                wp.ctl.send(control.STOP)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for wp in self.workers:
                left = max(0.0, deadline - time.monotonic())
                try:
                    wp.proc.wait(left)
                except subprocess.TimeoutExpired:
                    wp.proc.send_signal(sig)
            deadline = time.monotonic() + timeout_s
        for wp in self.workers:
            try:
                wp.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            add_counters(self.retired, wp.counters)
            wp.ctl.close()
        if self.workers:
            log.info("udp forwarder stopped", device=self.tun_name, workers=len(self.workers))
        self.workers = []
        if close_device and self.holder_fd is not None:
            os.close(self.holder_fd)
            self.holder_fd = None


def add_counters(total: dict[str, int], counters: dict[str, int]) -> None:
    """total += counters, key by key."""
    for k, v in counters.items():
        total[k] = total.get(k, 0) + v
