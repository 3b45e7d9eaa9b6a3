"""A slow path to a server: a TCP proxy that holds every byte for a fixed time in each direction.

The lab's kernel has no `sch_netem` (tc netem delay), so a long round trip is made in user space:
the proxy runs in a lab namespace, accepts on its own port and forwards to the target, delivering
each chunk `delay_s` after it arrived, in order, both ways. A request/answer exchange then takes
2 × delay_s more — TLS and HTTP/2 handshakes and gRPC keepalive pings included (the TCP handshake
with the proxy itself is immediate).

Public API::

    proxy = DelayProxy(lab, target_ip, target_port, round_trip_s=6.0, ns=None, ip=UNDERLAY_GW)
    proxy.start(timeout=10) -> DelayProxy     # or etcd.slow_endpoint(6.0) for an EtcdServer
    proxy.ip, proxy.port, proxy.address ("ip:port"); proxy.stop()

Run as a process: ``python -m lab.delayproxy LISTEN_IP LISTEN_PORT TARGET_IP TARGET_PORT DELAY_S``
(prints "listening" once it accepts).
"""

from __future__ import annotations

import asyncio
import random
import sys

from .netns import UNDERLAY_GW, Lab, LabProcess


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader → writer, each chunk delayed by delay_s (order kept); EOF is passed on delayed too."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()


async def _serve(listen_ip: str, listen_port: int, target_ip: str, target_port: int, delay_s: float) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(target_ip, target_port)
        except OSError:
            c_writer.close()
            return
        pumps = [asyncio.create_task(_pump(c_reader, s_writer, delay_s)),
                 asyncio.create_task(_pump(s_reader, c_writer, delay_s))]
        try:
            await asyncio.gather(*pumps)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a reset on one side: close both
        finally:
            for p in pumps:
                p.cancel()
            for w in (c_writer, s_writer):
                w.close()

    server = await asyncio.start_server(handle, listen_ip, listen_port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


class DelayProxy:
    """The proxy as a lab process (see the module docstring)."""

    def __init__(self, lab: Lab, target_ip: str, target_port: int, round_trip_s: float, *, ns: str | None = None,
                 ip: str = UNDERLAY_GW, port: int | None = None) -> None:
        self.lab = lab
        self.ns = ns or lab.switch.ns
        self.ip = ip
        self.port = port or random.randint(40001, 50000)
        self.target = (target_ip, target_port)
        self.delay_s = round_trip_s / 2
        self.process: LabProcess | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self, timeout: float = 10) -> DelayProxy:
        argv = [sys.executable, "-m", "lab.delayproxy", self.ip, str(self.port), self.target[0],
                str(self.target[1]), str(self.delay_s)]
        self.process = self.lab.spawn(self.ns, argv, name=f"delayproxy-{self.port}")
        self.process.wait_log("listening", timeout, what=f"the delay proxy on {self.address}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


if __name__ == "__main__":
    lip, lport, tip, tport, delay = sys.argv[1:6]
    try:
        asyncio.run(_serve(lip, int(lport), tip, int(tport), float(delay)))
    except KeyboardInterrupt:
        pass
