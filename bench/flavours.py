"""The daemons under test and the shared measuring kit of the side-by-side benchmarks.

A :class:`Flavour` is one flanneld implementation: ``pyflanneld`` (this repository's console script;
with ``BENCH_PYFLANNELD_TREE=<dir>`` the pyflanneld package of another checkout instead, run with
this venv's libraries: before/after figures of a change, e.g. main's tree against a branch's) or
``upstream`` (the real flanneld v0.20.2, ``$FLANNELD_UPSTREAM`` or the archive that
``lab.upstream`` decompresses). Both run the same way: in a lab host namespace of their own, against
the same etcd, with the same flags (``--etcd-endpoints --etcd-prefix --subnet-file --iface``) and
network config.

Also here: the network config of the control-plane scenarios (:func:`write_config`), leases in bulk
through ``etcd_probe.py`` (:func:`preload`), peer counts in etcd, ``/proc`` readings (VmRSS, CPU
seconds) and :class:`KernelWatch`, a ``kcount.py`` process that timestamps a host's kernel entries.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import Host, Lab, start_daemon
from lab.cluster import Daemon, pyflanneld_argv
from lab.upstream import missing_reason, upstream_binary
from lab.wait import WaitTimeout, wait_for

HERE = Path(__file__).parent
PROBE = str(HERE / "etcd_probe.py")
KCOUNT = str(HERE / "kcount.py")
UPSTREAM_VERSION = "v0.20.2"  # etcd v3 only, like our default
MiB = 1024 * 1024

# Peers' leases (etcd_probe.py) are 10.<i//256>.<i%256>.0/24 for i < 51,200; the daemons' own
# subnets come from SubnetMin..SubnetMax above that, so a burst of writes never hits a live lease.
NETWORK = "10.0.0.0/8"
SUBNET_MIN, SUBNET_MAX = "10.200.0.0", "10.255.255.0"


@dataclass(frozen=True)
class Flavour:
    """One flanneld implementation: ``name`` ("pyflanneld" | "upstream") and the command that runs it."""

    name: str
    argv: tuple[str, ...]
    version: str
    env: tuple[tuple[str, str], ...] = ()

    def start(self, host: Host, etcd, prefix: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
        """Start it in ``host`` (``--iface eth0``, ``--etcd-prefix prefix``, lab subnet file)."""
        return start_daemon(host, "--etcd-prefix", prefix, "--iface", "eth0", *args, etcd=etcd,
                            binary=list(self.argv), env={**dict(self.env), **(env or {})})


def flavours() -> tuple[list[Flavour], str | None]:
    """(the flavours available, None) or ([pyflanneld], one line saying why upstream is missing)."""
    tree = os.environ.get("BENCH_PYFLANNELD_TREE")
    if tree:
        if not (Path(tree) / "pyflanneld" / "__main__.py").is_file():
            raise RuntimeError(f"BENCH_PYFLANNELD_TREE={tree}: no pyflanneld package there")
        # -S: no site, so the venv's editable install of this tree does not shadow the other one;
        # -P: nor does the working directory (python -m puts it first on sys.path)
        site = next(p for p in sys.path if p.endswith("site-packages"))
        ours = Flavour("pyflanneld", (sys.executable, "-S", "-P", "-m", "pyflanneld"), tree,
                       (("PYTHONPATH", f"{Path(tree).resolve()}{os.pathsep}{site}"),))
    else:
        argv = pyflanneld_argv()
        if len(argv) == 1 and not Path(argv[0]).exists():
            raise RuntimeError(f"pyflanneld not found at {argv[0]}: run `make setup` first")
        ours = Flavour("pyflanneld", tuple(argv), "this tree")
    given = os.environ.get("FLANNELD_UPSTREAM")
    binary = upstream_binary(UPSTREAM_VERSION)
    if binary is None:
        why = (f"FLANNELD_UPSTREAM={given} is not an executable file" if given
               else missing_reason(UPSTREAM_VERSION))
        return [ours], f"{why}: pyflanneld columns only"
    return [ours, Flavour("upstream", (str(binary),), given or UPSTREAM_VERSION)], None


# -- etcd -------------------------------------------------------------------------------------------
def write_config(etcd, prefix: str, backend: str = "vxlan") -> None:
    """The control-plane scenarios' network config (vxlan, own subnets above the peers' range)."""
    etcd.put(f"{prefix}/config", json.dumps({"Network": NETWORK, "SubnetMin": SUBNET_MIN,
                                             "SubnetMax": SUBNET_MAX, "Backend": {"Type": backend}}))


def probe(lab: Lab, ns: str, etcd, *args: object, name: str):
    """Start ``etcd_probe.py`` (see there) in namespace ``ns``; returns the LabProcess."""
    host = etcd.local_endpoint.split("://")[1] if ns == etcd.ns else f"{etcd.ip}:{etcd.client_port}"
    return lab.spawn(ns, [sys.executable, PROBE, host, *map(str, args)], name=name,
                     env={"PYTHONUNBUFFERED": "1"})


def run_probe(lab: Lab, etcd, *args: object, name: str, timeout: float = 300) -> str:
    """Run ``etcd_probe.py`` next to etcd to completion; returns its output (raises on failure)."""
    p = probe(lab, etcd.ns, etcd, *args, name=name)
    rc = p.wait(timeout)
    if rc != 0:
        raise RuntimeError(f"{name} failed ({rc}): {p.log_text()[-2000:]}")
    return p.log_text()


def preload(lab: Lab, etcd, prefix: str, first: int, n: int) -> float:
    """Put leases first..first+n-1 (as fast as etcd takes them); returns the seconds it took."""
    if n <= 0:
        return 0.0
    out = run_probe(lab, etcd, "load", prefix, first, n, name=f"load-{prefix.strip('/').replace('/', '-')}")
    return float(re.search(r"^done \d+ ([\d.]+)", out, re.M)[1])


def lease_count(etcd, prefix: str) -> int:
    """Number of subnet leases under ``prefix`` in etcd."""
    out = etcd.etcdctl("get", "--prefix", "--keys-only", "--limit", "1", "-w", "json", f"{prefix}/subnets/")
    return int(json.loads(out).get("count", 0))


# -- /proc ------------------------------------------------------------------------------------------
def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = ln.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def cpu_seconds(pids: int | Sequence[int]) -> float:
    """utime + stime of ``pids`` (all threads), in seconds; a vanished pid counts 0."""
    total = 0
    for pid in [pids] if isinstance(pids, int) else pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_ns(pids: Sequence[int]) -> int:
    """Nanoseconds ``pids`` (all their threads) have spent on a CPU (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


# -- waiting ----------------------------------------------------------------------------------------
def wait(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.005):
    """lab.wait.wait_for (pred's truthy value), with the benchmarks' failure: RuntimeError naming
    ``what`` after ``timeout`` s (a scenario catches it and goes on with the others)."""
    try:
        return wait_for(pred, timeout, what, interval)
    except WaitTimeout as e:
        raise RuntimeError(f"benchmark: {e}") from None


def wait_subnet_env(d: Daemon, timeout: float = 60) -> float:
    """Wait for ``d``'s subnet.env (polled every 5 ms); returns the unix time it was seen."""
    def seen() -> float | None:
        if d.subnet_file.exists():
            return time.time()
        if not d.alive:
            raise RuntimeError(f"{d.host.name}: daemon exited ({d.returncode}) before subnet.env: "
                               f"{d.log_text()[-1500:]}")
        return None

    return wait(seen, timeout, f"{d.host.name} subnet.env")


class KernelWatch:
    """``kcount.py`` in a host: (unix time, routes, ARP, FDB) of flannel.1 whenever they change."""

    def __init__(self, host: Host, interval_s: float = 0.05, dev: str = "flannel.1") -> None:
        self.host = host
        self.proc = host.lab.spawn(host.ns, [sys.executable, KCOUNT, dev, str(interval_s)],
                                   name=f"{host.name}-kcount", env={"PYTHONUNBUFFERED": "1"})

    def samples(self) -> list[tuple[float, int, int, int]]:
        out = []
        for ln in self.proc.log_text().splitlines():
            p = ln.split()
            if len(p) == 4:
                out.append((float(p[0]), int(p[1]), int(p[2]), int(p[3])))
        return out

    def last(self) -> tuple[int, int, int]:
        s = self.samples()
        return s[-1][1:] if s else (0, 0, 0)

    def when(self, pred: Callable[[tuple[int, int, int]], bool], since: float = 0.0) -> float | None:
        """Unix time of the first sample at or after ``since`` whose counts satisfy ``pred``."""
        for t, *c in self.samples():
            if t >= since and pred(tuple(c)):
                return t
        return None

    def wait(self, pred: Callable[[tuple[int, int, int]], bool], timeout: float, what: str,
             since: float = 0.0, daemon: Daemon | None = None) -> float:
        """Like :meth:`when`, waiting up to ``timeout`` s (raises with the last counts; or if ``daemon`` dies)."""
        def check() -> float | None:
            if daemon is not None and not daemon.alive:
                raise RuntimeError(f"{daemon.host.name}: daemon exited ({daemon.returncode}) while waiting "
                                   f"for {what}: {daemon.log_text()[-1500:]}")
            if not self.proc.alive:
                raise RuntimeError(f"{self.host.name}: kcount exited: {self.proc.log_text()[-500:]}")
            return self.when(pred, since)

        try:
            return wait(check, timeout, what, 0.05)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; last routes/ARP/FDB {self.last()}") from None

    def stop(self) -> None:
        self.proc.stop()


def at_least(n: int) -> Callable[[tuple[int, int, int]], bool]:
    """Predicate for KernelWatch: routes, ARP and FDB all ≥ n."""
    return lambda c: min(c) >= n


def at_most(n: int) -> Callable[[tuple[int, int, int]], bool]:
    """Predicate for KernelWatch: routes, ARP and FDB all ≤ n."""
    return lambda c: max(c) <= n


# -- one benchmark run ------------------------------------------------------------------------------
@dataclass
class Run:
    """What every scenario gets: repeats, the scale factor (1 = the issue's sizes) and the flavours."""

    repeats: int
    scale: float
    flavours: list[Flavour]

    def n(self, full: int) -> int:
        """A size of the full benchmark (peers, events) at this run's scale (never 0 unless full is)."""
        return max(1, round(full * self.scale)) if full else 0

    @property
    def has_upstream(self) -> bool:
        return len(self.flavours) > 1


def settle(daemons: Sequence[Daemon], peers: int, timeout: float = 30) -> int:
    """Wait until every daemon has ``peers`` peers' route, ARP and FDB on flannel.1 (vxlan).

    A daemon still short of them after ``timeout`` s is restarted once (a start lists every lease):
    upstream v0.20.2 applies only the first event of each etcd watch response (``watchSubnets`` in
    its subnet/etcd/registry.go reads ``wresp.Events[0]``), so two leases written close together,
    e.g. by two hosts starting at once, can leave it without one. Returns the number of restarts.
    """
    restarts = 0
    for d in daemons:
        w = KernelWatch(d.host, interval_s=0.2)
        try:
            try:
                w.wait(at_least(peers), timeout, f"{d.host.name}: {peers} peers", daemon=d)
            except RuntimeError:
                restarts += 1
                d.restart()
                wait_subnet_env(d)
                w.wait(at_least(peers), timeout, f"{d.host.name}: {peers} peers after a restart",
                       since=time.time(), daemon=d)
        finally:
            w.stop()
    return restarts
