"""A small etcd v3 client the benchmarks run inside lab namespaces (aetcd, like the daemon).

    python etcd_probe.py HOST:PORT watch PREFIX                 # one line per event: "<unix time> PUT|DELETE <key>"
    python etcd_probe.py HOST:PORT joins PREFIX FIRST N GAP     # put N leases GAP s apart: "<t_sent> <t_acked> <key>"
    python etcd_probe.py HOST:PORT leaves PREFIX FIRST N GAP    # delete them GAP s apart, the same lines
    python etcd_probe.py HOST:PORT load PREFIX FIRST N          # put N leases as fast as etcd takes them
    python etcd_probe.py HOST:PORT unload PREFIX FIRST N        # delete them again
        (load/unload print "start <unix time of the first request>" and, at the end,
         "done N <seconds> <unix time the last answer arrived>")

Lease i is subnet 10.<i // 256>.<i % 256>.0/24 with a vxlan BackendData (a MAC derived from i) and a
PublicIP in 172.16.0.0/12, so each one is three kernel entries on a vxlan host. Like a real
flanneld's, the keys carry an etcd lease (one 24 h lease granted per run): watchers that look up
its TTL (upstream does, per event) pay what they pay in production. Printing goes to
stdout, flushed per line ("ready" first, once connected).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aetcd

CONCURRENCY = 64
LEASE_TTL_S = 24 * 3600


def subnet_key(prefix: str, i: int) -> str:
    return f"{prefix}/subnets/10.{i // 256}.{i % 256}.0-24"


def lease_value(i: int) -> str:
    mac = "02:%02x:%02x:%02x:%02x:%02x" % (0xBE, (i >> 24) & 255, (i >> 16) & 255, (i >> 8) & 255, i & 255)
    public_ip = f"172.{16 + (i >> 16) % 16}.{(i >> 8) & 255}.{i & 255}"
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": mac}}, separators=(",", ":"))


def say(*parts: object) -> None:
    print(*parts, flush=True)


async def main(argv: list[str]) -> None:
    hostport, mode, prefix, *rest = argv
    host, port = hostport.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=30) as c:
        await c.get(b"/probe")  # connect now, not on the first timed call
        if mode == "watch":
            it = await c.watch_prefix(f"{prefix}/subnets/".encode())
            say("ready")
            async for ev in it:
                say(f"{time.time():.6f}", ev.kind, ev.kv.key.decode())
            return
        first, n = int(rest[0]), int(rest[1])
        lease = None if mode in ("unload", "leaves") else await c.lease(LEASE_TTL_S)
        say("ready")
        if mode in ("joins", "leaves"):
            gap = float(rest[2])
            for i in range(first, first + n):
                key = subnet_key(prefix, i)
                t0 = time.time()
                if mode == "joins":
                    await c.put(key.encode(), lease_value(i).encode(), lease=lease)
                else:
                    await c.delete(key.encode())
                say(f"{t0:.6f} {time.time():.6f} {key}")
                await asyncio.sleep(gap)
            return
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with sem:
                key = subnet_key(prefix, i).encode()
                if mode == "load":
                    await c.put(key, lease_value(i).encode(), lease=lease)
                else:
                    await c.delete(key)

        say(f"start {time.time():.6f}")
        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(first, first + n)))
        say(f"done {n} {time.monotonic() - t0:.3f} {time.time():.6f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
