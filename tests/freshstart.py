""""Ends exactly as a fresh start would": snapshot everything an operator checks on a pyflanneld
host, restart the daemon on the same etcd data and compare.

Public API::

    n = Notifications(lab)           # a NOTIFY_SOCKET listener (thread); n.env for start_daemon
    n.messages -> list[str]; n.count("READY=1"); n.close()
    s = snapshot(host, daemon, etcd, dev="flannel.1")   # dict[str, object], see below
    settle(host, daemon, etcd, ...) -> dict   # /readyz 200 and two equal snapshots in a row
    diff(a, b) -> list[str]                   # one line per differing item ("" when equal)
    assert_like_fresh_start(host, daemon, etcd, notes=None) -> dict   # settle, restart, settle,
        # compare; AssertionError listing every difference (the daemon's log tail included)

What a snapshot holds (each item compared as a whole): the main routing table; PERMANENT ARP
entries and the FDB of the overlay device; its link details (MAC, MTU, state, VNI, local, lower
device by name) and IPv4 addresses; the TUN (udp) link and addresses; subnet.env's bytes; every key
under the etcd prefix with its value and whether it carries a TTL (the lease id itself changes with
each renewal); flannel's iptables rules (``iptables -S``, both tables); /peers; /readyz (status and
first line). Independent of the daemon's own code: what ``ip``, ``bridge``, ``iptables``, etcdctl
and curl print.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from pathlib import Path

from helpers import wait_for
from test_faults import HZ, PREFIX, http_get


class Notifications:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; records every message."""

    def __init__(self, lab) -> None:
        self.path = Path(tempfile.mkdtemp(dir=lab.tmp)) / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.times: list[float] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.times.append(time.monotonic())
            self.messages.append(data.decode(errors="replace"))

    def count(self, msg: str) -> int:
        return sum(1 for m in self.messages if m == msg)

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


def _lines(text: str) -> list[str]:
    return sorted(" ".join(ln.split()) for ln in text.splitlines() if ln.strip())


def _link(host, dev: str) -> dict | None:
    if not host.link_exists(dev):
        return None
    d = host.ip_json("-d", "link", "show", dev)[0]
    names = {x["ifindex"]: x["ifname"] for x in host.ip_json("link", "show")}
    info = dict((d.get("linkinfo") or {}).get("info_data") or {})
    lower = info.pop("link", None) or d.get("link")
    if isinstance(lower, int):
        lower = names.get(lower, lower)
    return {"address": d.get("address"), "mtu": d.get("mtu"), "up": "UP" in d.get("flags", []),
            "kind": (d.get("linkinfo") or {}).get("info_kind"), "lower": lower, **info}


def _addrs(host, dev: str) -> list[str]:
    if not host.link_exists(dev):
        return []
    return sorted(f"{a['local']}/{a['prefixlen']}" for i in host.ip_json("-4", "addr", "show", "dev", dev)
                  for a in i["addr_info"])


def _etcd_keys(etcd) -> dict[str, object]:
    out: dict[str, object] = {}
    raw = json.loads(etcd.etcdctl("get", PREFIX, "--prefix", "-w", "json"))
    import base64
    for kv in raw.get("kvs") or []:
        key = base64.b64decode(kv["key"]).decode()
        value = base64.b64decode(kv.get("value", "")).decode(errors="replace")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        out[key] = (value, "ttl" if int(kv.get("lease", 0)) else "no ttl")
    return out


def _iptables(host) -> list[str]:
    out = []
    for table in ("nat", "filter"):
        cp = host.run("iptables", "-w", "-t", table, "-S", check=False)
        out += [f"{table}: {ln}" for ln in cp.stdout.splitlines() if "FLANNEL" in ln or "flannel" in ln]
    return sorted(out)


def snapshot(host, daemon, etcd, dev: str = "flannel.1", port: int = HZ) -> dict[str, object]:
    """Everything an operator checks on ``host`` (see the module docstring)."""
    s: dict[str, object] = {}
    s["routes"] = _lines(host.ip("route", "show"))
    if host.link_exists(dev):
        s["neigh"] = [ln for ln in _lines(host.ip("neigh", "show", "dev", dev)) if "PERMANENT" in ln]
        s["fdb"] = _lines(host.bridge("fdb", "show", "dev", dev))
    s["link"] = _link(host, dev)
    s["addresses"] = _addrs(host, dev)
    s["tun"] = _link(host, "flannel0")
    s["tun addresses"] = _addrs(host, "flannel0")
    try:
        s["subnet.env"] = daemon.subnet_file.read_bytes()
    except FileNotFoundError:
        s["subnet.env"] = None
    s["etcd"] = _etcd_keys(etcd)
    s["iptables"] = _iptables(host)
    code, body = http_get(host, "/peers", port)
    s["/peers"] = json.loads(body) if code == 200 else (code, body)
    code, body = http_get(host, "/readyz", port)
    s["/readyz"] = (code, body.splitlines()[0] if body else "")
    return s


def diff(a: dict, b: dict) -> list[str]:
    """One line per item that differs between two snapshots."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, list) and isinstance(y, list):
            gone = [i for i in x if i not in y]
            new = [i for i in y if i not in x]
            out.append(f"{k}: only before {gone}; only after {new}")
        elif isinstance(x, dict) and isinstance(y, dict):
            keys = sorted(set(x) | set(y), key=str)
            out.append(f"{k}: " + "; ".join(f"{j}: {x.get(j)!r} != {y.get(j)!r}" for j in keys if x.get(j) != y.get(j)))
        else:
            out.append(f"{k}: {x!r} != {y!r}")
    return out


def settle(host, daemon, etcd, timeout: float = 60, dev: str = "flannel.1", quiet_s: float = 2.0,
           need_ready: bool = True) -> dict:
    """Wait until /readyz is 200 (unless need_ready is False) and the snapshot stays the same for
    ``quiet_s``; return it."""
    last: dict | None = None
    since = time.monotonic()
    deadline = time.monotonic() + timeout
    while True:
        s = snapshot(host, daemon, etcd, dev)
        ready = s["/readyz"][0] == 200 or not need_ready
        if s != last or not ready:
            last, since = s, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return s
        if time.monotonic() >= deadline:
            raise AssertionError(f"{host.name} did not settle in {timeout}s; last snapshot {last}\n"
                                 f"log:\n{daemon.log_text()[-4000:]}")
        time.sleep(0.3)


def assert_like_fresh_start(host, daemon, etcd, dev: str = "flannel.1", timeout: float = 60,
                            notes: Notifications | None = None) -> dict:
    """Settle, then restart the daemon (SIGTERM, same flags, same etcd data, same kernel) and
    settle again: both snapshots must be equal. Returns the fresh start's snapshot. With
    ``notes``, the fresh start must also send READY=1 exactly once."""
    before = settle(host, daemon, etcd, timeout, dev)
    assert daemon.stop(timeout=10) == 0, daemon.log_text()[-3000:]
    sent = notes.count("READY=1") if notes else 0
    daemon.restart()
    after = settle(host, daemon, etcd, timeout, dev)
    problems = diff(before, after)
    assert not problems, ("after the transition vs a fresh start:\n  " + "\n  ".join(problems)
                          + f"\nlog:\n{daemon.log_text()[-5000:]}")
    if notes is not None:
        wait_for(lambda: notes.count("READY=1") == sent + 1, 30, "READY=1 from the fresh start", 0.1)
    return after
