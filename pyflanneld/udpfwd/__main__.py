"""Run the udp forwarder alone with a static route table (tests, benchmarks, debugging).

    ip netns exec HOST python -m pyflanneld.udpfwd --network 10.5.0.0/16 --subnet 10.5.1.0/24 \\
        --bind 192.168.100.1 --mtu 1472 --route 10.5.2.0/24=192.168.100.2 [--commands]

Creates and configures the TUN (as the udp backend does), starts the workers, prints ``ready``.
With ``--commands`` it reads lines from stdin: ``add SUBNET IP``, ``del SUBNET``,
``replace SUBNET=IP ...``, ``sync`` (answers ``ok`` once every worker applied all updates),
``stats`` (answers one JSON line), ``check`` (restart dead workers; answers the count);
EOF stops. SIGTERM/SIGINT stop the workers and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import signal
import sys
import threading
from ipaddress import IPv4Address, IPv4Network

from .control import Route
from .device import configure_tun
from .supervisor import Forwarder, default_workers


def _route(spec: str, port: int) -> Route:
    dst, _, nh = spec.partition("=")
    return Route(IPv4Network(dst), IPv4Address(nh), port)


def _command(fwd: Forwarder, words: list[str], port: int) -> None:
    if not words:
        return
    cmd = words[0]
    try:
        if cmd == "add":
            fwd.add_route(Route(IPv4Network(words[1]), IPv4Address(words[2]), port))
        elif cmd == "del":
            fwd.del_route(IPv4Network(words[1]))
        elif cmd == "replace":
            fwd.set_routes(_route(w, port) for w in words[1:])
        elif cmd == "sync":
            fwd.sync()
            print("ok", flush=True)
        elif cmd == "stats":
            print(json.dumps(fwd.sync()), flush=True)
        elif cmd == "check":
            print(fwd.check(), flush=True)
        else:
            print(f"error unknown command {cmd}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"error {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m pyflanneld.udpfwd`` (see the module docstring): parse ``argv`` (default
    ``sys.argv[1:]``), run the forwarder until EOF on stdin (``--commands``) or a signal; returns the
    exit status (0)."""
    ap = argparse.ArgumentParser(prog="python -m pyflanneld.udpfwd")
    ap.add_argument("--tun", default="flannel0")
    ap.add_argument("--network", required=True, type=IPv4Network)
    ap.add_argument("--subnet", required=True, type=IPv4Network, help="this host's lease subnet")
    ap.add_argument("--bind", required=True, type=IPv4Address)
    ap.add_argument("--port", type=int, default=8285)
    ap.add_argument("--mtu", type=int, default=1472)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                    help="TCP segmentation/coalescing (default: on unless PYFLANNELD_UDP_OFFLOAD=0)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--route", action="append", default=[], help="SUBNET=NEXT_HOP_IP")
    ap.add_argument("--commands", action="store_true", help="read commands from stdin")
    args = ap.parse_args(argv)
    try:
        from ..log import setup
        setup()
    except ImportError:  # pragma: no cover
        pass

    fwd = Forwarder(tun_name=args.tun, bind_ip=args.bind, port=args.port, tun_ip=args.subnet.network_address,
                    mtu=args.mtu, workers=args.workers or default_workers(), offload=args.offload,
                    batch=args.batch)
    fwd.open_device()
    asyncio.run(configure_tun(args.tun, args.subnet.network_address, args.mtu, args.network, offload=fwd.offload))
    fwd.set_routes(_route(r, args.port) for r in args.route)
    fwd.start()
    fwd.wait_ready(15)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)

    lines: queue.Queue[str | None] = queue.Queue()
    if args.commands:
        def reader() -> None:  # only reads: workers are spawned by the main thread (PDEATHSIG)
            for line in sys.stdin:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
    while not stop.is_set():
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            break
        _command(fwd, line.split(), args.port)
    fwd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
