"""Control-plane benchmarks: start-up, join convergence against raw etcd watch latency, and scale.

Everything runs in a private lab (namespaces + a local etcd in the switch namespace, on tmpfs), with
the vxlan backend. Timestamps from different processes are wall-clock (CLOCK_REALTIME is shared by
all namespaces on the machine).

* start: spawn → subnet.env written (fresh host: new lease; restart: lease reused), median of 10;
  "import" is `python -c "import pyflanneld.daemon, pyflanneld.backend.vxlan"` alone.
* join: a writer puts a new vxlan lease every 50 ms (200 times); on the watching host `ip -ts monitor
  route` stamps the route's arrival, and a plain aetcd watch client (bench/etcd_probe.py) in the same
  namespace stamps the etcd event. Latency = stamp − time the put was sent.
* scale: N leases already in etcd, then the daemon starts; time until N routes, N permanent ARP and
  N FDB entries are on flannel.1; VmHWM; idle CPU over 30 s (3 reconcile passes); then ROUNDS rounds
  of 10,000 lease events (5,000 adds, programmed, then 5,000 removes) and VmRSS after each round.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from lab import Lab, start_daemon
from lab.cluster import pyflanneld_argv

from .table import Table, median, ms, percentile, verdict

PROBE = str(Path(__file__).with_name("etcd_probe.py"))
REPEATS = 10
JOINS = 200
JOIN_GAP = 0.05
SCALES = (1000, 5000)
CHURN = 10_000
IDLE = 30.0
ROUNDS = 4  # churn rounds; RSS after round 4 vs round 2 (round 1 warms the allocator up)
MiB = 1024 * 1024


def _config(etcd, prefix: str, network: str = "10.0.0.0/8") -> None:
    etcd.put(f"{prefix}/config", json.dumps({"Network": network, "Backend": {"Type": "vxlan"}}))


def _probe(lab: Lab, ns: str, etcd, *args: object, name: str):
    host = etcd.local_endpoint.split("://")[1] if ns == etcd.ns else f"{etcd.ip}:{etcd.client_port}"
    return lab.spawn(ns, [sys.executable, PROBE, host, *map(str, args)], name=name,
                     env={"PYTHONUNBUFFERED": "1"})


def _wait(pred, timeout: float, what: str, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"benchmark: timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _wait_line(proc, text: str, timeout: float = 20) -> None:
    _wait(lambda: text in proc.log_text() or (not proc.alive and _fail(proc, text)), timeout,
          f"{proc.name}: {text!r}", 0.01)


def _fail(proc, text: str) -> bool:
    raise RuntimeError(f"{proc.name} exited before {text!r}: {proc.log_text()[-2000:]}")


def _run_probe(lab: Lab, etcd, *args: object, name: str, timeout: float = 120) -> str:
    p = _probe(lab, etcd.ns, etcd, *args, name=name)
    rc = p.wait(timeout)
    if rc != 0:
        raise RuntimeError(f"{name} failed ({rc}): {p.log_text()[-2000:]}")
    return p.log_text()


def _status(pid: int) -> dict[str, int]:
    out = {}
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = ln.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _counts(host) -> tuple[int, int, int]:
    routes = host.ip("route", "show", "dev", "flannel.1", check=False).count("\n")
    neigh = host.ip("neigh", "show", "dev", "flannel.1", check=False).count("PERMANENT")
    fdb = host.bridge("fdb", "show", "dev", "flannel.1", check=False).count(" dst ")
    return routes, neigh, fdb


# -- start-up ---------------------------------------------------------------------------------------
def bench_start(lab: Lab, etcd) -> Table:
    prefix = "/bench/start"
    _config(etcd, prefix, "10.5.0.0/16")
    imports = []

    def one(host, restart_of=None) -> tuple[float, float]:
        t0 = time.monotonic()  # interleaved with the starts, so that both see the same machine load
        subprocess.run([sys.executable, "-c", "import pyflanneld.daemon, pyflanneld.backend.vxlan"], check=True)
        imports.append(time.monotonic() - t0)
        if restart_of is not None:
            restart_of.subnet_file.unlink(missing_ok=True)
        t0 = time.monotonic()
        if restart_of is None:
            d = start_daemon(host, "--etcd-prefix", prefix, etcd=etcd)
        else:
            d = restart_of
            d.restart()
        _wait(lambda: d.subnet_file.exists(), 30, f"{host.name} subnet.env")
        wall = time.monotonic() - t0
        m = _wait(lambda: re.findall(r"flannel is ready.*seconds=([\d.]+)", d.log_text()), 5, "ready line", 0.01)
        d.stop()
        return wall, float(m[-1])

    fresh = [one(lab.add_host(f"s{i}")) for i in range(REPEATS)]
    h = lab.add_host("sr")
    d = start_daemon(h, "--etcd-prefix", prefix, etcd=etcd)
    d.wait_subnet_env(30)
    d.stop()
    again = [one(h, restart_of=d) for _ in range(REPEATS)]

    t = Table("Start-up (vxlan, local etcd; median of 10)", ["case", "spawn → subnet.env", "in-daemon (seconds=)",
                                                            "goal", "met"])
    for label, rows in (("fresh host (new lease)", fresh), ("restart (lease reused)", again)):
        wall = median([r[0] for r in rows])
        t.add(label, ms(wall), ms(median([r[1] for r in rows])), "≤ 1 s", verdict(wall <= 1.0))
    t.add("python + imports only", ms(median(imports)), "-", "-", "-")
    t.note("spawn → subnet.env includes interpreter start and imports; seconds= is the daemon's own "
           "figure, from its first line of code (options parsed) to subnet.env written")
    return t


# -- join convergence -------------------------------------------------------------------------------
_TS = re.compile(r"^\[(\S+)\]\s+(\d+\.\d+\.\d+\.\d+/\d+) .*dev flannel\.1")


def bench_join(lab: Lab, etcd) -> Table:
    prefix = "/bench/join"
    _config(etcd, prefix)
    h = lab.add_host("j1")
    d = start_daemon(h, "--etcd-prefix", prefix, etcd=etcd)
    d.wait_subnet_env(30)
    mon = lab.spawn(h.ns, ["ip", "-ts", "monitor", "route"], name="j1-monitor")
    watch = _probe(lab, h.ns, etcd, "watch", prefix, name="j1-watch")
    _wait_line(watch, "ready")
    time.sleep(0.5)
    first = 60_000
    writes = _run_probe(lab, etcd, "joins", prefix, first, JOINS, JOIN_GAP, name="join-writer")
    sent = {}
    for ln in writes.splitlines():
        p = ln.split()
        if len(p) == 3:
            sent[p[2].rsplit("/", 1)[1].replace("-", "/")] = float(p[0])
    assert len(sent) == JOINS, writes[-500:]

    def routes() -> dict[str, float]:
        out = {}
        for ln in mon.log_text().splitlines():
            m = _TS.match(ln)
            if m and m[2] in sent and m[2] not in out:
                out[m[2]] = datetime.fromisoformat(m[1]).timestamp()
        return out

    def watched() -> dict[str, float]:
        out = {}
        for ln in watch.log_text().splitlines():
            p = ln.split()
            if len(p) == 3 and p[1] == "PUT":
                sn = p[2].rsplit("/", 1)[1].replace("-", "/")
                out.setdefault(sn, float(p[0]))
        return out

    def complete(found: dict[str, float]) -> dict[str, float] | None:
        return found if len(found) == JOINS else None

    got_r = _wait(lambda: complete(routes()), 30, "all join routes", 0.1)
    got_w = _wait(lambda: complete(watched()), 10, "all watch events", 0.1)
    mon.stop()
    watch.stop()
    d.stop()
    join = [got_r[sn] - t0 for sn, t0 in sent.items()]
    raw = [got_w[sn] - t0 for sn, t0 in sent.items()]
    j50, j99, r50, r99 = percentile(join, 50), percentile(join, 99), percentile(raw, 50), percentile(raw, 99)
    t = Table(f"Join convergence ({JOINS} joins, {int(JOIN_GAP * 1000)} ms apart; vxlan)",
              ["measure", "p50", "p99", "max"])
    t.add("raw etcd watch (aetcd client, same netns)", ms(r50), ms(r99), ms(max(raw)))
    t.add("lease PUT → route on flannel.1", ms(j50), ms(j99), ms(max(join)))
    t.add("ratio route / raw watch", f"{j50 / r50:.1f}×", f"{j99 / r99:.1f}×", "-")
    t.note(f"goal: join p99 ≤ 3× raw watch p99 and ≤ 100 ms → "
           f"{verdict(j99 <= 3 * r99)} (≤ 3×), {verdict(j99 <= 0.1)} (≤ 100 ms)")
    t.note(f"absolute margin over the raw watch: p50 {ms(j50 - r50)}, p99 {ms(j99 - r99)}")
    return t


# -- scale ------------------------------------------------------------------------------------------
def bench_scale(lab: Lab, etcd, n: int) -> dict:
    prefix = f"/bench/scale{n}"
    _config(etcd, prefix)
    out = _run_probe(lab, etcd, "load", prefix, 1, n, name=f"load{n}")
    load_s = float(out.split("done")[1].split()[1])
    h = lab.add_host(f"n{n}")
    t0 = time.monotonic()
    d = start_daemon(h, "--etcd-prefix", prefix, etcd=etcd)
    ready_at = None
    while True:
        if ready_at is None and d.subnet_file.exists():
            ready_at = time.monotonic() - t0
        r, a, f = _counts(h)
        if ready_at is not None and r >= n and a >= n and f >= n:
            done = time.monotonic() - t0
            break
        if not d.alive or time.monotonic() - t0 > 120:
            raise RuntimeError(f"scale {n}: {r}/{a}/{f} entries after {time.monotonic() - t0:.0f}s; "
                               f"{d.log_text()[-2000:]}")
        time.sleep(0.05)
    ready_line = re.findall(r"flannel is ready.*seconds=([\d.]+)", d.log_text())
    st0 = _status(d.pid)
    cpu0, t_idle = _cpu_seconds(d.pid), time.monotonic()
    time.sleep(IDLE)  # IDLE / 10 s reconcile passes
    idle_cpu = (_cpu_seconds(d.pid) - cpu0) / (time.monotonic() - t_idle)
    st_idle = _status(d.pid)
    rss, burst = [], []
    half = CHURN // 2
    for rnd in range(ROUNDS):
        first = 20_000 + rnd % 2 * half  # subnets 10.78.32.0/24 and up: clear of the N preloaded ones
        t1 = time.monotonic()
        _run_probe(lab, etcd, "load", prefix, first, half, name=f"churn{n}-{rnd}-add")
        _wait(lambda: _counts(h) == (n + half,) * 3, 180, f"scale {n}: {half} more peers programmed", 0.2)
        burst.append(time.monotonic() - t1)
        _run_probe(lab, etcd, "unload", prefix, first, half, name=f"churn{n}-{rnd}-del")
        _wait(lambda: _counts(h) == (n, n, n), 180, f"scale {n}: back to {n} entries after churn", 0.2)
        time.sleep(1)
        rss.append(_status(d.pid))
    d.stop()
    etcd.etcdctl("del", "--prefix", f"{prefix}/")
    return {"n": n, "load_s": load_s, "ready": ready_at, "ready_line": float(ready_line[0]) if ready_line else None,
            "programmed": done, "hwm": st0["VmHWM"], "rss0": st0["VmRSS"], "rss": [s["VmRSS"] for s in rss],
            "idle_cpu": idle_cpu, "rss_idle": st_idle["VmRSS"], "burst": burst,
            "hwm_end": rss[-1]["VmHWM"]}


def scale_table(results: list[dict]) -> Table:
    t = Table("Scale: N peer leases in etcd before the daemon starts (vxlan)",
              ["N", "subnet.env", "N routes+ARP+FDB", "VmHWM at sync", f"idle CPU ({IDLE:.0f} s)",
               "VmRSS idle", f"VmRSS after {CHURN:,} events", f"after {2 * CHURN:,}", f"after {ROUNDS * CHURN:,}",
               "VmHWM end"])
    for r in results:
        t.add(r["n"], ms(r["ready"]), f"{r['programmed']:.2f} s", f"{r['hwm'] / MiB:.1f} MiB",
              f"{r['idle_cpu'] * 100:.1f} %", f"{r['rss_idle'] / MiB:.1f} MiB", f"{r['rss'][0] / MiB:.1f} MiB",
              f"{r['rss'][1] / MiB:.1f} MiB", f"{r['rss'][-1] / MiB:.1f} MiB", f"{r['hwm_end'] / MiB:.1f} MiB")
    big = results[-1]
    t.note(f"goal: {big['n']} leases programmed ≤ 3 s → {verdict(big['programmed'] <= 3)}; "
           f"RSS ≤ 60 MiB → {verdict(big['hwm_end'] <= 60 * MiB)} (VmHWM over the whole run); "
           f"no growth over churn → {verdict(big['rss'][-1] <= big['rss'][1] * 1.05)} "
           f"(after {ROUNDS * CHURN:,} vs {2 * CHURN:,} events, ≤ +5 %)")
    t.note(f"a burst of {CHURN // 2:,} joins (written as fast as etcd takes them) was programmed in "
           + ", ".join(f"{min(r['burst']):.1f} s (N={r['n']})" for r in results))
    t.note("times from process spawn (includes interpreter start); entries counted with ip/bridge every "
           f"50 ms; a churn round = {CHURN // 2:,} adds then as many removes of other leases; N = 0 is the "
           "idle baseline; preload: "
           + ", ".join(f"{r['n']} in {r['load_s']:.1f} s" for r in results))
    return t


def run() -> str:
    argv = pyflanneld_argv()
    if not Path(argv[0]).exists() and len(argv) == 1:
        raise RuntimeError(f"pyflanneld not found at {argv[0]}: run `make setup` first")
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        tables = [bench_start(lab, etcd), bench_join(lab, etcd),
                  scale_table([bench_scale(lab, etcd, n) for n in (0, *SCALES)])]
    load = os.getloadavg()
    return "\n".join(str(t) for t in tables) + (
        f"\nmachine: {os.cpu_count()} CPUs, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")


if __name__ == "__main__":
    print(run())
