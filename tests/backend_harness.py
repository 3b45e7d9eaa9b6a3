"""Drive one backend in a lab host namespace, the way the daemon will (tests only).

The test side::

    proc = BackendProc(host, config_json, log_dir=lab.tmp)     # starts this file in host.ns
    info = proc.call("register")                                # {"mtu", "backend_type", "backend_data"}
    proc.call("start", lease=lease_json(...))
    proc.call("set_peers", leases=[...]); proc.call("add_peer", lease=...); proc.call("reconcile")
    proc.call("update_peers", changed=[...], removed=[...])     # one batch of events
    proc.close()                                                # backend.close(), process exits
    proc.log()                                                  # its structlog output

The driver side (``python tests/backend_harness.py`` inside the namespace) reads one JSON command per
line on stdin and answers one JSON line on stdout: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "type": "BackendError"}``. Logs go to stderr (the log file).
Leases travel as ``{"subnet": "10.5.2.0/24", "attrs": "<LeaseAttrs JSON as stored in etcd>"}``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the interpreter running the tests (the lab starts its processes with it too)


def lease_json(subnet: str, public_ip: str, backend_type: str = "vxlan", backend_data: Any = None,
               ttl: float = 3600) -> dict:
    """A lease as the driver expects it (attrs serialised exactly like etcd's value)."""
    attrs: dict[str, Any] = {"PublicIP": public_ip, "PublicIPv6": None}
    if backend_type:
        attrs["BackendType"] = backend_type
    if backend_data is not None:
        attrs["BackendData"] = backend_data
    return {"subnet": subnet, "attrs": json.dumps(attrs, separators=(",", ":")), "expiration": time.time() + ttl}


def vxlan_lease(subnet: str, public_ip: str, mac: str, vni: int = 1) -> dict:
    return lease_json(subnet, public_ip, "vxlan", {"VNI": vni, "VtepMAC": mac})


class DriverError(RuntimeError):
    def __init__(self, message: str, type_: str) -> None:
        super().__init__(message)
        self.type = type_


class BackendProc:
    """A backend living in its own process inside a lab host's namespace."""

    def __init__(self, host: Any, config: str | dict, *, iface: str = "eth0", public_ip: str | None = None,
                 log_dir: Path | None = None, user: str | None = None, name: str = "backend") -> None:
        self.host = host
        log_dir = Path(log_dir or host.lab.tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while (log_dir / f"{host.name}-{name}.{n}.log").exists():
            n += 1
        self.log_path = log_dir / f"{host.name}-{name}.{n}.log"
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        argv = [PYTHON, __file__]
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log_file, env=env, text=True, start_new_session=True,
        )
        cfg = config if isinstance(config, str) else json.dumps(config)
        self.call("init", config=cfg, iface=iface, public_ip=public_ip)

    def call(self, op: str, timeout: float = 30, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # the driver answers every command (timeouts: pytest-timeout)
        if not line:
            raise RuntimeError(f"backend driver on {self.host.name} died; log:\n{self.log()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise DriverError(reply["error"], reply["type"])
        return reply.get("result")

    def log(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def close(self, timeout: float = 10) -> None:
        """backend.close() then exit; kernel state stays (like a daemon shutdown)."""
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except Exception:  # noqa: BLE001
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()

    def kill(self) -> None:
        """SIGKILL (a crashed daemon): nothing is cleaned up."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=5)


# --- multi-host setups ------------------------------------------------------------------------------


@dataclass
class Node:
    """A lab host running one backend, with docker0 on its subnet and one pod."""

    host: Any
    proc: BackendProc
    info: dict
    subnet: str
    lease: dict
    pod: Any = None


def start_node(lab: Any, name: str, subnet: str, config: str | dict, *, underlay: str | None = None,
               host: Any = None, pod: bool = True, start: bool = True, **proc_kw: Any) -> Node:
    """Host ``name`` (or an existing ``host``) with a backend registered and started on ``subnet``;
    docker0 = first address of the subnet with the backend's MTU; one pod when ``pod``."""
    host = host or lab.add_host(name, subnet=underlay)
    proc = BackendProc(host, config, log_dir=lab.tmp, **proc_kw)
    info = proc.call("register")
    public_ip = proc_kw.get("public_ip") or host.address
    lease = lease_json(subnet, public_ip, info["backend_type"], info["backend_data"])
    node = Node(host, proc, info, subnet, lease)
    if start:
        proc.call("start", lease=lease)
    if pod:
        first = next(ipaddress.ip_network(subnet).hosts())
        if "docker0" not in host.bridges:
            host.make_bridge("docker0", f"{first}/{ipaddress.ip_network(subnet).prefixlen}", mtu=info["mtu"])
        node.pod = lab.add_pod(host, "p1")
    return node


def connect(nodes: list[Node]) -> None:
    """Every node gets the others' leases as its first snapshot (set_peers)."""
    for n in nodes:
        n.proc.call("set_peers", leases=[m.lease for m in nodes if m is not n])


def lines(text: str) -> set[str]:
    """Non-empty, stripped lines of a command's output, as a set."""
    return {ln.strip() for ln in text.splitlines() if ln.strip()}


# --- driver side ------------------------------------------------------------------------------------


async def _driver() -> None:
    import asyncio
    from ipaddress import IPv4Address, IPv4Network

    import structlog

    from pyflanneld.backend import BackendContext, ExternalInterface, backend_class
    from pyflanneld.config import parse_config
    from pyflanneld.netlink import Netlink
    from pyflanneld.subnet.lease import Lease, LeaseAttrs

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    out = sys.stdout
    backend = None
    timer: asyncio.Task | None = None

    def lease(d: dict) -> Lease:
        return Lease(IPv4Network(d["subnet"]), LeaseAttrs.from_json(d["attrs"]), d.get("expiration"))

    async def every(period: float) -> None:
        while True:
            await asyncio.sleep(period)
            await backend.reconcile()

    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            result: Any = None
            if op == "init":
                cfg = parse_config(cmd["config"])
                async with Netlink() as nl:
                    link = await nl.link(name=cmd["iface"])
                    addrs = await nl.addresses(link.index)
                ip = addrs[0].ip
                ext = ExternalInterface(name=link.name, index=link.index, ip=ip,
                                        public_ip=IPv4Address(cmd.get("public_ip") or ip), mtu=link.mtu)
                ctx = BackendContext(config=cfg, backend_config=cfg.backend, ext=ext, options=None)
                backend = backend_class(cfg.backend_type)(ctx)
                result = {"index": link.index, "ip": str(ip)}
            elif op == "register":
                info = await backend.register()
                result = {"mtu": info.mtu, "backend_type": info.backend_type, "backend_data": info.backend_data}
            elif op == "start":
                await backend.start(lease(cmd["lease"]))
            elif op == "set_peers":
                await backend.set_peers([lease(d) for d in cmd["leases"]])
            elif op == "add_peer":
                await backend.add_peer(lease(cmd["lease"]))
            elif op == "remove_peer":
                await backend.remove_peer(lease(cmd["lease"]))
            elif op == "update_peers":  # one batch of lease events, as the converger hands them over
                await backend.update_peers([lease(d) for d in cmd.get("changed", [])],
                                           [lease(d) for d in cmd.get("removed", [])])
            elif op == "reconcile":
                await backend.reconcile()
            elif op == "timer":  # run reconcile() periodically, like the daemon
                timer = asyncio.create_task(every(float(cmd["period"])))
            elif op == "exit":
                if timer is not None:
                    timer.cancel()
                if backend is not None:
                    await backend.close()
                out.write(json.dumps({"ok": True}) + "\n")
                out.flush()
                return
            else:
                raise ValueError(f"unknown op {op}")
            reply = {"ok": True, "result": result}
        except Exception as e:  # noqa: BLE001 - reported to the test
            reply = {"ok": False, "error": str(e), "type": type(e).__name__}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    import asyncio

    asyncio.run(_driver())
