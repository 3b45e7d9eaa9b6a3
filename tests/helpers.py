"""Small helpers shared by the daemon-level tests (lab fixtures live in conftest.py)."""

from __future__ import annotations

import time
from ipaddress import IPv4Network

PREFIX = "/coreos.com/network"


def wait_for(pred, timeout=10.0, interval=0.05, what="condition"):
    """Poll pred() until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def subnet_of(env: dict) -> IPv4Network:
    """The leased subnet from a subnet.env dict (FLANNEL_SUBNET is its first address)."""
    return IPv4Network(env["FLANNEL_SUBNET"], strict=False)


def key_of(sn: IPv4Network | str, prefix: str = PREFIX) -> str:
    """The etcd key of a subnet's lease, e.g. /coreos.com/network/subnets/10.1.5.0-24."""
    sn = IPv4Network(sn)
    return f"{prefix}/subnets/{sn.network_address}-{sn.prefixlen}"


def http_get(host, port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path from inside a lab host: (status, body); (0, "") if refused."""
    p = host.run("curl", "-s", "--max-time", "3", "-o", "/dev/stdout", "-w", "\n%{http_code}",
                 f"http://127.0.0.1:{port}{path}", check=False)
    body, _, code = p.stdout.rpartition("\n")
    return int(code or 0), body
