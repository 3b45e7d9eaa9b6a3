"""An abusive HTTP client for the health port's tests: many idle connections that each send one
more header every few seconds and never finish their request (slowloris), reconnecting when
closed, plus one request line of ``--long-line`` bytes.

    ip netns exec HOST python -m lab.slowloris --port 8471 --connections 1100 --interval 3

Raises its own RLIMIT_NOFILE to fit the connections. Every ``--interval`` seconds it prints one
JSON line: ``{"open": N, "connects": N, "closed_by_server": N, "long_line_status": "431"|"closed"|null}``.
Runs until killed (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource


async def _slow_client(host: str, port: int, interval: float, stats: dict) -> None:
    while True:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            stats["connects"] += 1
            stats["open"] += 1
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                n = 0
                while True:
                    await writer.drain()
                    try:  # a read returns b"" (or fails) once the server closed us
                        data = await asyncio.wait_for(reader.read(1024), interval)
                    except TimeoutError:
                        data = None
                    if data is not None:
                        stats["closed_by_server"] += 1
                        break
                    n += 1
                    writer.write(f"X-Slow-{n}: {n}\r\n".encode())
            finally:
                stats["open"] -= 1
        except (OSError, TimeoutError):
            pass
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(interval)


async def _long_line(host: str, port: int, size: int, stats: dict) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        writer.write(b"GET /" + b"a" * size + b" HTTP/1.1\r\n\r\n")
        try:
            await writer.drain()
        except OSError:
            pass
        status = await asyncio.wait_for(reader.read(64), 10)
        stats["long_line_status"] = status.split(b" ")[1].decode() if status.startswith(b"HTTP/1.1 ") else "closed"
        writer.close()
    except (OSError, TimeoutError):
        stats["long_line_status"] = "closed"


async def main(args: argparse.Namespace) -> None:
    stats = {"open": 0, "connects": 0, "closed_by_server": 0, "long_line_status": None}
    clients = [asyncio.create_task(_slow_client(args.host, args.port, args.interval, stats))
               for _ in range(args.connections)]
    if args.long_line:
        clients.append(asyncio.create_task(_long_line(args.host, args.port, args.long_line, stats)))
    while True:
        await asyncio.sleep(args.interval)
        print(json.dumps(stats), flush=True)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1100)
    p.add_argument("--interval", type=float, default=3.0)
    p.add_argument("--long-line", type=int, default=100_000, help="bytes of one request line (0: none)")
    args = p.parse_args()
    want = args.connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
