"""`make demo`: the main job for real on this one machine.

A local etcd and three simulated hosts (network namespaces on a bridge "switch"), pyflanneld on
each; a docker0-like bridge per host configured from that host's subnet.env (--bip, --mtu), two
pods per host; then every pod pings every other pod across hosts. Then what that data plane costs,
pod to pod across hosts: iperf3 TCP throughput (IPERF_SECONDS) and ping latency (avg, p99 of PINGS).
Runs vxlan, host-gw and udp, cleans up, and ends with the three backends' figures side by side.
Then a dual-stack run (vxlan with EnableIPv6: each host an IPv4 and an IPv6 subnet, pods with both
addresses) where every pod pings every other over IPv4 and over IPv6.
Exit status 0 only if every ping got through and every figure could be taken.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import netns
from .cluster import start_daemon
from .measure import MeasureError, iperf3_gbps, percentile, ping_rtts_ms

HOSTS = ("h1", "h2", "h3")
PODS_PER_HOST = 2
NETWORK = "10.5.0.0/16"
IPV6_NETWORK = "fd80::/48"
BACKENDS = (("vxlan", {"Type": "vxlan"}), ("host-gw", {"Type": "host-gw"}), ("udp", {"Type": "udp"}))
IPERF_SECONDS = 2
PINGS = 100  # 10 ms apart: one second

GREEN, RED, BOLD, RESET = ("\033[32m", "\033[31m", "\033[1m", "\033[0m") if sys.stdout.isatty() else ("",) * 4


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*map(str, r)) for r in rows)])


@dataclass(frozen=True)
class Figures:
    """What one data plane costs, pod to pod across hosts."""

    gbps: float  # iperf3 TCP, receiver's rate
    rtt_avg_ms: float
    rtt_p99_ms: float
    pings_lost: int

    def throughput(self) -> str:
        return f"{self.gbps:.2f} Gbit/s" if self.gbps >= 1 else f"{self.gbps * 1000:.0f} Mbit/s"


def measure(src: netns.Host, dst: netns.Host) -> Figures:
    """Latency first (idle network), then throughput. Raises MeasureError."""
    rtts = ping_rtts_ms(src, dst.address, PINGS, 0.01)
    gbps = iperf3_gbps(src, dst, IPERF_SECONDS)
    return Figures(gbps, statistics.fmean(rtts), percentile(rtts, 99), PINGS - len(rtts))


def figures_line(name: str, f: Figures) -> str:
    """One line per backend, e.g. `figures over vxlan: throughput 9.81 Gbit/s, latency avg 0.052 ms,
    p99 0.110 ms` (tests parse it)."""
    lost = f", {f.pings_lost} of {PINGS} pings lost" if f.pings_lost else ""
    return (f"figures over {name}: throughput {f.throughput()}, latency avg {f.rtt_avg_ms:.3f} ms, "
            f"p99 {f.rtt_p99_ms:.3f} ms{lost}")


def run_backend(name: str, backend: dict) -> tuple[bool, Figures | None]:
    print(f"\n{BOLD}== backend {name} =={RESET}")
    t0 = time.monotonic()
    with netns.Lab() as lab:
        etcd = lab.start_etcd()
        etcd.put("/coreos.com/network/config", json.dumps({"Network": NETWORK, "Backend": backend}))
        hosts = [lab.add_host(h) for h in HOSTS]
        daemons = [start_daemon(h, "--iface", "eth0") for h in hosts]
        envs = [d.wait_subnet_env(timeout=20) for d in daemons]
        ready_s = time.monotonic() - t0

        pods = []
        for h, env in zip(hosts, envs, strict=True):
            # what docker does with mk-docker-opts' --bip/--mtu
            h.make_bridge("docker0", env["FLANNEL_SUBNET"], mtu=env["FLANNEL_MTU"])
            pods += [lab.add_pod(h, f"p{i}") for i in range(1, PODS_PER_HOST + 1)]

        leases = etcd.get_prefix("/coreos.com/network/subnets/")
        rows = []
        for h, env in zip(hosts, envs, strict=True):
            rows.append([h.name, h.address, env["FLANNEL_SUBNET"], lease_key(leases, h), name, env["FLANNEL_MTU"]])
        print(_table(rows, ["host", "public IP", "subnet.env FLANNEL_SUBNET", "lease in etcd", "backend", "MTU"]))
        print(f"(3 daemons ready {ready_s:.2f} s after start, etcd included)\n")

        good, total = ping_matrix(pods, name)
        src, dst = pods[0], pods[PODS_PER_HOST]  # first pod of h1 → first pod of h2
        print(f"\npod-to-pod {src.host.name}/{src.name} → {dst.host.name}/{dst.name}: iperf3 TCP "
              f"{IPERF_SECONDS} s, {PINGS} pings 10 ms apart")
        figures = None
        try:
            figures = measure(src, dst)
            print(figures_line(name, figures))
        except MeasureError as e:
            print(f"{RED}figures over {name}: not measured: {e}{RESET}")
        for d in daemons:
            d.stop()
        return good == total, figures


def lease_key(leases: dict[str, str], h: netns.Host) -> str:
    """The last part of the etcd key of ``h``'s lease (found by its PublicIP), or "-"."""
    return next((k.rsplit("/", 1)[-1] for k, v in leases.items() if json.loads(v)["PublicIP"] == h.address), "-")


def ping_matrix(pods: list[netns.Pod], over: str, v6: bool = False) -> tuple[int, int]:
    """Every pod pings every other (IPv6 addresses when ``v6``), shown as a matrix and a summary
    line; (pairs that got through, pairs)."""
    def addr(p: netns.Pod) -> str:
        return (p.address6 if v6 else p.address) or "-"

    # Converged within a second of the last lease; give the watches that moment.
    pairs = [(a, b) for a in pods for b in pods if a is not b]
    with ThreadPoolExecutor(max_workers=8) as ex:
        results = dict(zip(pairs, ex.map(lambda p: p[0].wait_ping(addr(p[1]), timeout=20), pairs), strict=True))
    header = ["from \\ to"] + [f"{p.host.name}/{p.name} {addr(p)}" for p in pods]
    matrix = []
    for a in pods:
        row = [f"{a.host.name}/{a.name} {addr(a)}"]
        for b in pods:
            if a is b:
                row.append("·")
            else:
                row.append("ok" if results[(a, b)] else "FAIL")
        matrix.append(row)
    print(_table(matrix, header).replace(" ok", f" {GREEN}ok{RESET}").replace("FAIL", f"{RED}FAIL{RESET}"))
    good = sum(results.values())
    cross = sum(1 for (a, b), ok in results.items() if ok and a.host is not b.host)
    print(f"\n{good}/{len(results)} pod pairs reachable ({cross} of them across hosts) over {over}")
    return good, len(results)


def run_dual_stack() -> bool:
    """vxlan with EnableIPv6: every pod reaches every other over IPv4 and over IPv6."""
    print(f"\n{BOLD}== dual stack (vxlan, IPv4 and IPv6) =={RESET}")
    t0 = time.monotonic()
    with netns.Lab() as lab:
        etcd = lab.start_etcd()
        etcd.put("/coreos.com/network/config", json.dumps({"Network": NETWORK, "EnableIPv6": True,
                                                           "IPv6Network": IPV6_NETWORK, "Backend": {"Type": "vxlan"}}))
        hosts = [lab.add_host(h, ipv6=True) for h in HOSTS]
        daemons = [start_daemon(h, "--iface", "eth0") for h in hosts]
        envs = [d.wait_subnet_env(timeout=20) for d in daemons]
        ready_s = time.monotonic() - t0
        pods = []
        for h, env in zip(hosts, envs, strict=True):
            # what docker does with `pyflanneld docker-opts`: --bip, --mtu, --ipv6 --fixed-cidr-v6
            h.make_bridge("docker0", env["FLANNEL_SUBNET"], mtu=env["FLANNEL_MTU"], cidr6=env["FLANNEL_IPV6_SUBNET"])
            pods += [lab.add_pod(h, f"p{i}") for i in range(1, PODS_PER_HOST + 1)]
        leases = etcd.get_prefix("/coreos.com/network/subnets/")
        rows = []
        for h, env in zip(hosts, envs, strict=True):
            rows.append([h.name, f"{h.address} {h.address6}", env["FLANNEL_SUBNET"], env["FLANNEL_IPV6_SUBNET"],
                         lease_key(leases, h)])
        print(_table(rows, ["host", "public IPs", "FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET", "lease in etcd"]))
        print(f"(3 daemons ready {ready_s:.2f} s after start, etcd included)\n")
        good4, total4 = ping_matrix(pods, "IPv4 (dual stack)")
        print()
        good6, total6 = ping_matrix(pods, "IPv6 (dual stack)", v6=True)
        for d in daemons:
            d.stop()
        return good4 == total4 and good6 == total6


def summary(figures: dict[str, Figures | None]) -> str:
    """The backends side by side."""
    rows = [[name, f.throughput(), f"{f.rtt_avg_ms:.3f} ms", f"{f.rtt_p99_ms:.3f} ms"] if f else
            [name, "-", "-", "-"] for name, f in figures.items()]
    return (_table(rows, ["backend", "throughput", "latency avg", "latency p99"]) +
            f"\n(pod h1/p1 → pod h2/p1; iperf3 TCP {IPERF_SECONDS} s, {PINGS} pings. All hosts share this "
            "machine's CPUs: compare the rows with each other, not with real NICs.)")


def main() -> int:
    print(f"{BOLD}pyflanneld demo{RESET}: etcd + {len(HOSTS)} hosts in network namespaces, "
          f"{PODS_PER_HOST} pods per host, Network {NETWORK}")
    ok = True
    figures: dict[str, Figures | None] = {}
    for name, backend in BACKENDS:
        reached, figures[name] = run_backend(name, backend)
        ok &= reached and figures[name] is not None
    print(f"\n{BOLD}== what each data plane costs =={RESET}")
    print(summary(figures))
    ok &= run_dual_stack()
    verdict = (GREEN + "all pods reached each other on every backend, and over IPv4 and IPv6 in dual stack" if ok
               else RED + "some pings failed or figures are missing")
    print(f"\n{BOLD}{verdict}{RESET}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
