"""/healthz, /readyz and /peers on --healthz-ip:--healthz-port (a tiny asyncio HTTP server).

/peers (pyflanneld only) lists the remote leases this host has programmed, as JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import structlog

log = structlog.get_logger()


class HealthServer:
    def __init__(self, host: str, port: int, readiness: Callable[[], tuple[bool, str]],
                 peers: Callable[[], list[dict]] | None = None) -> None:
        self.host, self.port, self.readiness, self.peers = host, port, readiness, peers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("health server listening", address=f"{self.host}:{self.port}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/healthz":
                code, body = 200, "flanneld is running"
            elif path == "/readyz":
                ok, why = self.readiness()
                code, body = (200, "flanneld is ready") if ok else (503, f"flanneld is not ready yet: {why}")
            elif path == "/peers" and self.peers is not None:
                code, body = 200, json.dumps(self.peers(), indent=1)
            else:
                code, body = 404, "not found"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            data = body.encode()
            writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 3)
            except TimeoutError:
                pass
