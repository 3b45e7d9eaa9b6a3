"""Data plane, pod to pod through the real daemons: udp forwarder vs upstream's C proxy; vxlan, host-gw.

One lab per backend, one etcd, one network (10.5.0.0/16); for each flavour (and variant) two hosts
with its daemon, a docker0 bridge from subnet.env and one pod each, so both flavours share one
overlay (as in a mixed cluster) but each pair's traffic only crosses its own daemons. Per pair,
from pod a to pod b, one after the other (alternating flavours on each repeat):

* ping: PINGS pings 10 ms apart → average, p50, p99 (idle network);
* iperf3 TCP for IPERF_S seconds, 1 (and for udp 4) streams → receiver's rate; for udp the
  forwarder's CPU over the run (pyflanneld: its worker processes on both hosts; upstream: the
  flanneld processes, whose C proxy is a thread of it), 100 % = one core.

``udp`` also runs pyflanneld's per-packet mode (PYFLANNELD_UDP_OFFLOAD=0) as an extra row.
``throughput`` adds raw veth: iperf3 between two hosts' eth0 over the lab switch, no daemon.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from lab import Lab
from lab.cluster import udp_worker_pids
from lab.measure import iperf3_client, iperf3_server, ping_rtts_ms

from .flavours import Flavour, Run, cpu_seconds
from .table import Compare, gbps, ms, pct, percentile, ratio_at_least, ratio_at_most

IPERF_S = int(os.environ.get("BENCH_IPERF_SECONDS", "5"))
PINGS = 200
NETWORK = "10.5.0.0/16"


def iperf(src, dst, streams: int = 1, cpu_pids: list[int] = ()) -> tuple[float, float]:
    """iperf3 TCP src → dst for IPERF_S s: (bits/s received, CPU of ``cpu_pids`` as a fraction of a core)."""
    with iperf3_server(dst):
        c0, t0 = cpu_seconds(list(cpu_pids)), time.monotonic()
        bits = iperf3_client(src, dst, IPERF_S, streams) * 1e9
        cpu = (cpu_seconds(list(cpu_pids)) - c0) / (time.monotonic() - t0)
    return bits, cpu


def ping(src, dst) -> dict[str, float]:
    """PINGS pings 10 ms apart: avg, p50, p99 (seconds) and lost (count)."""
    rtts = [x / 1000 for x in ping_rtts_ms(src, dst.address, PINGS, 0.01)]
    return {"avg": statistics.fmean(rtts), "p50": percentile(rtts, 50), "p99": percentile(rtts, 99),
            "lost": PINGS - len(rtts)}


class Pair:
    """Two hosts running one flavour's daemon, a pod on each: ``a`` → ``b`` is what gets measured."""

    def __init__(self, lab: Lab, etcd, fl: Flavour, tag: str, env: dict[str, str] | None = None) -> None:
        self.flavour = fl
        hosts = [lab.add_host(f"{tag}a"), lab.add_host(f"{tag}b")]
        self.daemons = [fl.start(h, etcd, "/coreos.com/network", env=env) for h in hosts]
        self.pods = []
        for h, d in zip(hosts, self.daemons, strict=True):
            senv = d.wait_subnet_env(timeout=60)
            h.make_bridge("docker0", senv["FLANNEL_SUBNET"], mtu=senv["FLANNEL_MTU"])
            self.pods.append(lab.add_pod(h, "p"))
        self.mtu = senv["FLANNEL_MTU"]

    def ready(self, timeout: float = 15) -> None:
        """Wait until pod a reaches pod b; restart a daemon that missed its partner's lease (see
        flavours.settle: upstream drops watch events), a first then b; count that in ``restarts``."""
        self.restarts = 0
        for d in [None, *self.daemons]:
            if d is not None:
                d.restart()
                d.wait_subnet_env(timeout=60)
                self.restarts += 1
            if self.pods[0].wait_ping(self.pods[1].address, timeout=timeout):
                return
        raise RuntimeError(f"{self.flavour.name}: pods cannot reach each other; log: "
                           f"{self.daemons[0].log_text()[-1500:]}")

    def forwarder_pids(self) -> list[int]:
        """Processes doing the udp backend's forwarding on both hosts."""
        if self.flavour.name == "upstream":
            return [d.pid for d in self.daemons]
        return [p for d in self.daemons for p in udp_worker_pids(d.pid)]


def _restarts(pairs) -> str:
    n = sum(p.restarts for p in pairs)
    return (f"daemons restarted because they missed their partner's lease: {n} (upstream v0.20.2 applies "
            "only the first event of an etcd watch response)")


def _lab(backend: str) -> tuple[Lab, object]:
    lab = Lab()
    etcd = lab.start_etcd(enable_v2=False)
    etcd.put("/coreos.com/network/config", json.dumps({"Network": NETWORK, "Backend": {"Type": backend}}))
    return lab, etcd


# -- udp --------------------------------------------------------------------------------------------
def bench_udp(run: Run) -> list[Compare]:
    variants = [(fl.name, fl, None) for fl in run.flavours]
    variants.append(("per-packet", run.flavours[0], {"PYFLANNELD_UDP_OFFLOAD": "0"}))
    res: dict[str, list[dict]] = {v[0]: [] for v in variants}
    lab, etcd = _lab("udp")
    with lab:
        pairs = {name: Pair(lab, etcd, fl, f"u{i}", env) for i, (name, fl, env) in enumerate(variants)}
        for p in pairs.values():
            p.ready()
        for _ in range(run.repeats):
            for name, p in pairs.items():
                a, b = p.pods
                r = ping(a, b)
                r["bps1"], r["cpu1"] = iperf(a, b, 1, p.forwarder_pids())
                r["bps4"], _ = iperf(a, b, 4)
                r["workers"] = len(p.forwarder_pids()) // 2
                res[name].append(r)

    def col(name: str | None, key: str):
        return None if name is None else [r[key] for r in res[name]]

    up = "upstream" if run.has_upstream else None
    t = Compare(f"udp backend, pod to pod: pyflanneld's forwarder vs upstream's C proxy (iperf3 {IPERF_S} s, "
                f"{PINGS} pings; median of {run.repeats})", run.has_upstream)
    t.row("throughput, 1 TCP stream", col("pyflanneld", "bps1"), col(up, "bps1"), ratio_at_least(3), gbps)
    t.row("throughput, 4 TCP streams", col("pyflanneld", "bps4"), col(up, "bps4"), None, gbps)
    t.row("ping average", col("pyflanneld", "avg"), col(up, "avg"), ratio_at_most(1), ms)
    t.row("ping p50", col("pyflanneld", "p50"), col(up, "p50"), None, ms)
    t.row("ping p99", col("pyflanneld", "p99"), col(up, "p99"), ratio_at_most(1), ms)
    t.row("forwarder CPU, 1 stream (both hosts)", col("pyflanneld", "cpu1"), col(up, "cpu1"), None, pct)
    t.row("per-packet mode (OFFLOAD=0): 1 stream", col("per-packet", "bps1"), None, None, gbps)
    t.row("per-packet mode: ping average", col("per-packet", "avg"), None, None, ms)
    t.row("per-packet mode: ping p99", col("per-packet", "p99"), None, None, ms)
    lost = sum(r["lost"] for rs in res.values() for r in rs)
    t.note(f"pyflanneld: {res['pyflanneld'][0]['workers']} worker process(es) per host, offload (TSO/GRO) on "
           f"unless noted; upstream: one C proxy thread per host; lost pings over all rows: {lost}")
    t.note(_restarts(pairs.values()))
    t.note(f"{os.cpu_count()} CPUs shared by both hosts, iperf3 and the forwarders: other load on the machine "
           "skews udp (a normal process) more than vxlan (softirq)")
    return [t]


# -- kernel data planes vs raw veth -----------------------------------------------------------------
def bench_throughput(run: Run) -> list[Compare]:
    res: dict[tuple[str, str], list[dict]] = {}
    raw: list[dict] = []
    notes = []
    for backend in ("vxlan", "host-gw"):
        lab, etcd = _lab(backend)
        with lab:
            pairs = {fl.name: Pair(lab, etcd, fl, f"{backend[0]}{i}") for i, fl in enumerate(run.flavours)}
            for p in pairs.values():
                p.ready()
            notes.append(_restarts(pairs.values()))
            for _ in range(run.repeats):
                if backend == "vxlan":
                    h1, h2 = (d.host for d in pairs["pyflanneld"].daemons)
                    r = ping(h1, h2)
                    r["bps"], _ = iperf(h1, h2)
                    raw.append(r)
                for name, p in pairs.items():
                    r = ping(*p.pods)
                    r["bps"], _ = iperf(*p.pods)
                    res.setdefault((backend, name), []).append(r)

    up = "upstream" if run.has_upstream else None

    def col(backend: str, name: str | None, key: str = "bps", per_raw: bool = False):
        if name is None:
            return None
        vals = [r[key] for r in res[(backend, name)]]
        return [v / w["bps"] for v, w in zip(vals, raw, strict=True)] if per_raw else vals

    t = Compare(f"Kernel data planes, 1 TCP stream pod to pod, next to raw veth (iperf3 {IPERF_S} s; "
                f"median of {run.repeats})", run.has_upstream)
    t.row("raw veth, host to host (no daemon)", [r["bps"] for r in raw], None, None, gbps)
    for backend in ("vxlan", "host-gw"):
        t.row(f"{backend}", col(backend, "pyflanneld"), col(backend, up), ratio_at_least(0.9), gbps)
        t.row(f"{backend} / raw veth", col(backend, "pyflanneld", per_raw=True), col(backend, up, per_raw=True),
              None, pct)
        t.row(f"{backend} ping average", col(backend, "pyflanneld", "avg"), col(backend, up, "avg"), None, ms)
    t.note("vxlan and host-gw forward in the kernel: the daemons only program it, so ≈ upstream is the "
           f"expectation (goal ≥ 0.9× catches a wrong MTU or route); raw veth ping average "
           f"{ms(statistics.median([r['avg'] for r in raw]))}")
    for n in dict.fromkeys(notes):
        t.note(n)
    return [t]


SCENARIOS = {"udp": bench_udp, "throughput": bench_throughput}
