"""udp backend data plane vs kernel vxlan, pod to pod, through the real daemon.

For each data plane a fresh lab: two hosts on the lab switch, etcd, pyflanneld on both, docker0
and one pod per host (as Docker does with subnet.env). Then from pod h1 → pod h2:

* iperf3 TCP for DURATION s with 1 and with 4 parallel streams (receiver's rate);
* forwarder CPU: utime+stime of all udp worker processes on both hosts during the iperf run,
  in % of one core (vxlan: none, the kernel does it in softirq);
* ping RTT p50/p99 over PINGS pings (idle network).

Data planes: ``vxlan``; ``udp per-packet`` (PYFLANNELD_UDP_OFFLOAD=0: recvmmsg/sendmmsg batches,
multi-queue TUN, SO_REUSEPORT, PYFLANNELD_UDP_WORKERS workers); ``udp offload`` (the default: TCP
super-packets from a virtio-net TUN cut in userspace and sent with UDP GSO, received with UDP GRO
and written back as super-packets). The machine's other load is printed: both hosts and both
forwarders share its CPUs with iperf3.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lab import Lab, start_daemon
from lab.cluster import udp_worker_pids
from lab.measure import MeasureError, iperf3_client, iperf3_server, percentile, ping_rtts_ms

from .table import Table

DURATION = int(os.environ.get("BENCH_UDP_SECONDS", "10"))  # BENCH_UDP_PLANES="udp offload" picks
PINGS = 200
PREFIX = "/coreos.com/network"
PLANES = [
    ("vxlan", {"Type": "vxlan"}, {}),
    ("udp per-packet", {"Type": "udp"}, {"PYFLANNELD_UDP_OFFLOAD": "0"}),
    ("udp offload", {"Type": "udp"}, {}),  # the default
]


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except OSError:
            pass
    return total


def _iperf(src, dst, streams: int, worker_pids: list[int]) -> tuple[float, float]:
    """→ (Gbit/s received, forwarder CPU % of one core)."""
    with iperf3_server(dst):
        c0, t0 = _cpu_ticks(worker_pids), time.monotonic()
        gbps = iperf3_client(src, dst, DURATION, streams)
        c1, t1 = _cpu_ticks(worker_pids), time.monotonic()
    cpu = (c1 - c0) / os.sysconf("SC_CLK_TCK") / (t1 - t0) * 100
    return gbps, cpu


def _ping(src, dst) -> tuple[float, float, int]:
    try:
        rtts = ping_rtts_ms(src, dst.address, PINGS, 0.01)
    except MeasureError:
        return float("nan"), float("nan"), PINGS
    return percentile(rtts, 50), percentile(rtts, 99), PINGS - len(rtts)


def bench_plane(name: str, backend: dict, env: dict) -> dict:
    with Lab() as lab:
        etcd = lab.start_etcd()
        etcd.put(f"{PREFIX}/config", json.dumps({"Network": "10.5.0.0/16", "Backend": backend}))
        hosts = [lab.add_host("h1"), lab.add_host("h2")]
        daemons = [start_daemon(h, "--iface", "eth0", env=env or None) for h in hosts]
        pods = []
        for h, d in zip(hosts, daemons, strict=True):
            senv = d.wait_subnet_env(timeout=30)
            h.make_bridge("docker0", senv["FLANNEL_SUBNET"], mtu=senv["FLANNEL_MTU"])
            pods.append(lab.add_pod(h, "p1"))
        if not pods[0].wait_ping(pods[1].address, timeout=10):
            raise RuntimeError(f"{name}: pods cannot reach each other")
        workers = [p for d in daemons for p in udp_worker_pids(d.pid)]
        res = {"plane": name, "workers": len(workers) // 2 if workers else 0,
               "mtu": senv["FLANNEL_MTU"]}
        res["p50"], res["p99"], res["lost"] = _ping(pods[0], pods[1])
        for streams in (1, 4):
            res[f"gbps{streams}"], res[f"cpu{streams}"] = _iperf(pods[0], pods[1], streams, workers)
        return res


def run() -> str:
    load0 = os.getloadavg()[0]
    only = [x for x in os.environ.get("BENCH_UDP_PLANES", "").split(",") if x]
    results = [bench_plane(n, b, e) for n, b, e in PLANES if not only or n in only or n == "vxlan"]
    t = Table(f"udp backend vs vxlan, pod to pod, iperf3 TCP {DURATION} s",
              ["data plane", "workers/host", "MTU", "1 stream", "4 streams", "fwd CPU (1/4 str.)",
               "ping p50", "ping p99", "udp/vxlan (1 str.)"])
    vx = results[0]["gbps1"]
    for r in results:
        cpu = "kernel" if r["plane"] == "vxlan" else f"{r['cpu1']:.0f}% / {r['cpu4']:.0f}%"
        t.add(r["plane"], r["workers"] or "-", r["mtu"], f"{r['gbps1']:.2f} Gbit/s", f"{r['gbps4']:.2f} Gbit/s",
              cpu, f"{r['p50']:.3f} ms", f"{r['p99']:.3f} ms",
              "-" if r["plane"] == "vxlan" else f"{r['gbps1'] / vx:.2f}" if vx else "-")
    t.note(f"{os.cpu_count()} CPUs shared by both hosts, iperf3 and the forwarders; load average "
           f"{load0:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the machine skews udp, "
           "which competes as a normal process, more than vxlan, which runs in softirq)")
    t.note("fwd CPU: all udp worker processes of both hosts, 100% = one core")
    t.note("goal from issue 4: udp/vxlan ≥ 0.6")
    return str(t)


if __name__ == "__main__":
    print(run())
