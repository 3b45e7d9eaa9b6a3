"""Peers in etcd before the daemon starts: start-up, idle footprint, and memory over churn.

All vxlan, one lab and one local etcd (tmpfs) per scenario; every daemon in a fresh host namespace.
Peers are written by ``etcd_probe.py load`` (unique subnet, VtepMAC and PublicIP each, so three
kernel entries per peer); ``kcount.py`` in the host timestamps the entries on flannel.1.

* ``start`` — for 0, 1,000 and 5,000 peers: spawn → subnet.env (polled every 5 ms) and spawn → all
  peers' route, ARP and FDB entries programmed. Flavours alternate, ``repeats`` times each.
* ``footprint`` — 1 and 5,000 peers: both daemons started (one after the other), then idle CPU over
  IDLE_S seconds after sync and VmRSS at its end; memory growth is VmRSS(5,000) − VmRSS(1).
* ``churn`` — pyflanneld only: CHURN_ROUNDS rounds of 5,000 joins (waited until programmed) and
  5,000 leaves; VmRSS after each round. Growth is judged late vs early (last round against the
  second: the first warms the allocator up). Upstream is not run: it does not program a burst of
  joins (see the ``burst`` scenario), so a round never completes.
"""

from __future__ import annotations

import time

from lab import Lab

from .flavours import (
    Flavour,
    KernelWatch,
    Run,
    at_least,
    at_most,
    cpu_seconds,
    lease_count,
    preload,
    run_probe,
    settle,
    status,
    wait_subnet_env,
    write_config,
)
from .table import Compare, Failed, mib, pct, ratio_at_most, secs
from .table import at_most as goal_at_most

START_PEERS = (0, 1000, 5000)
FOOTPRINT_PEERS = (1, 5000)
IDLE_S = 20.0
CHURN_PEERS = 5000  # joins, then as many leaves, per round
CHURN_ROUNDS = 4  # 4 × 10,000 = 40,000 events
SYNC_TIMEOUT_S = 120.0


def start_one(lab: Lab, etcd, fl: Flavour, prefix: str, name: str) -> tuple[float, float | Failed]:
    """A fresh host: spawn → subnet.env, spawn → every peer programmed (seconds); the daemon is stopped."""
    host = lab.add_host(name)
    peers = lease_count(etcd, prefix)
    watch = KernelWatch(host)
    t0 = time.time()
    d = fl.start(host, etcd, prefix)
    try:
        env_s = wait_subnet_env(d) - t0
        try:
            all_s: float | Failed = watch.wait(at_least(peers), SYNC_TIMEOUT_S, f"{name}: {peers} peers",
                                               daemon=d) - t0
        except RuntimeError:
            all_s = Failed(f"{min(watch.last())} of {peers} after {SYNC_TIMEOUT_S:.0f} s")
    finally:
        d.stop()
        watch.stop()
    return env_s, all_s


def bench_start(run: Run) -> list[Compare]:
    t = Compare(f"Start-up: N vxlan peers in etcd, fresh host (median of {run.repeats})", run.has_upstream)
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        host_no = 0
        for full in START_PEERS:
            n = run.n(full)
            env: dict[str, list[float]] = {fl.name: [] for fl in run.flavours}
            done: dict[str, list[float] | Failed] = {fl.name: [] for fl in run.flavours}
            for fl in run.flavours:
                prefix = f"/bench/start{n}-{fl.name}"
                write_config(etcd, prefix)
                preload(lab, etcd, prefix, 1, n)
            for _ in range(run.repeats):
                for fl in run.flavours:  # alternating: both see the same machine load
                    host_no += 1
                    e, a = start_one(lab, etcd, fl, f"/bench/start{n}-{fl.name}", f"st{host_no}")
                    env[fl.name].append(e)
                    if isinstance(a, Failed):
                        done[fl.name] = a
                    elif not isinstance(done[fl.name], Failed):
                        done[fl.name].append(a)
            up = "upstream" if run.has_upstream else None
            t.row(f"{n:,} peers: spawn → subnet.env", env["pyflanneld"], env.get(up), ratio_at_most(1), secs)
            if n:
                t.row(f"{n:,} peers: spawn → all {3 * n:,} entries", done["pyflanneld"], done.get(up),
                      ratio_at_most(1), secs)
    t.note("spawn = the process is started (interpreter start and imports included); entries = route, "
           "ARP and FDB of each peer on flannel.1, counted by kcount.py every 50 ms; earlier runs' leases "
           "stay in etcd and count as peers of the next start")
    return [t]


# -- idle footprint ---------------------------------------------------------------------------------
def footprint_once(lab: Lab, etcd, run: Run, n: int, tag: str) -> dict[str, dict]:
    """Both flavours on ``n`` peers (+ each other), synced, then IDLE_S idle: CPU fraction and VmRSS."""
    prefix = f"/bench/fp{n}"
    if lease_count(etcd, prefix) == 0:
        write_config(etcd, prefix)
        preload(lab, etcd, prefix, 1, n)
    daemons = {}
    try:
        for fl in run.flavours:
            d = daemons[fl.name] = fl.start(lab.add_host(f"fp{tag}{fl.name[:2]}"), etcd, prefix)
            wait_subnet_env(d)
        settle(list(daemons.values()), lease_count(etcd, prefix) - 1, SYNC_TIMEOUT_S)  # + each other
        cpu0 = {k: cpu_seconds(d.pid) for k, d in daemons.items()}
        t0 = time.monotonic()
        time.sleep(IDLE_S)
        elapsed = time.monotonic() - t0
        return {k: {"cpu": (cpu_seconds(d.pid) - cpu0[k]) / elapsed, **status(d.pid)} for k, d in daemons.items()}
    finally:
        for d in daemons.values():
            d.stop()


def bench_footprint(run: Run) -> list[Compare]:
    lo, hi = (run.n(n) for n in FOOTPRINT_PEERS)
    res: dict[int, list[dict[str, dict]]] = {lo: [], hi: []}
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        for r in range(run.repeats):
            for n in (lo, hi):
                res[n].append(footprint_once(lab, etcd, run, n, f"{r}{'a' if n == lo else 'b'}"))

    def vals(n: int, flavour: str | None, key: str) -> list[float] | None:
        if flavour is None:
            return None
        return [x[flavour][key] for x in res[n]]

    up = "upstream" if run.has_upstream else None
    growth = {fl: None if fl is None else [b[fl]["VmRSS"] - a[fl]["VmRSS"] for a, b in zip(res[lo], res[hi], strict=True)]
              for fl in ("pyflanneld", up)}
    t = Compare(f"Idle footprint after sync (vxlan, {IDLE_S:.0f} s idle, median of {run.repeats})", run.has_upstream)
    one = f"{lo:,} peer{'s' if lo != 1 else ''}"
    t.row(f"idle CPU, {one}", vals(lo, "pyflanneld", "cpu"), vals(lo, up, "cpu"), None, pct)
    t.row(f"idle CPU, {hi:,} peers", vals(hi, "pyflanneld", "cpu"), vals(hi, up, "cpu"),
          goal_at_most(0.01, "≤ 1 % of a core"), pct)
    t.row(f"VmRSS, {one}", vals(lo, "pyflanneld", "VmRSS"), vals(lo, up, "VmRSS"), None, mib)
    t.row(f"VmRSS, {hi:,} peers", vals(hi, "pyflanneld", "VmRSS"), vals(hi, up, "VmRSS"), ratio_at_most(1.6), mib)
    t.row(f"memory growth {one} → {hi:,}", growth["pyflanneld"], growth[up], ratio_at_most(1.5), mib)
    t.row(f"VmHWM, {hi:,} peers", vals(hi, "pyflanneld", "VmHWM"), vals(hi, up, "VmHWM"), None, mib)
    t.note("both daemons run at once on the same leases (each also has the other's); CPU = utime+stime of the "
           "daemon process over the idle window, 100 % = one core; VmRSS at the window's end")
    return [t]


# -- churn ------------------------------------------------------------------------------------------
def bench_churn(run: Run) -> list[Compare]:
    half = run.n(CHURN_PEERS)
    events = 2 * half * CHURN_ROUNDS
    per_round: list[list[int]] = []
    add_s: list[float] = []
    hwm = []
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        prefix = "/bench/churn"
        write_config(etcd, prefix)
        host = lab.add_host("churn")
        watch = KernelWatch(host, interval_s=0.1)
        ours = run.flavours[0]
        for _ in range(run.repeats):
            d = ours.start(host, etcd, prefix)
            try:
                wait_subnet_env(d)
                rss = []
                for rnd in range(CHURN_ROUNDS):
                    t0 = time.time()
                    preload(lab, etcd, prefix, 1, half)
                    watch.wait(at_least(half), SYNC_TIMEOUT_S, f"churn round {rnd}: {half} joins", t0, d)
                    add_s.append(watch.when(at_least(half), t0) - t0)
                    t1 = time.time()
                    run_probe(lab, etcd, "unload", prefix, 1, half, name="unload")
                    watch.wait(at_most(0), SYNC_TIMEOUT_S, f"churn round {rnd}: {half} leaves", t1, d)
                    time.sleep(1)
                    rss.append(status(d.pid)["VmRSS"])
                per_round.append(rss)
                hwm.append(status(d.pid)["VmHWM"])
            finally:
                d.stop()
            etcd.etcdctl("del", "--prefix", f"{prefix}/subnets/")
            d.subnet_file.unlink(missing_ok=True)
        watch.stop()
    t = Compare(f"Memory over churn: {CHURN_ROUNDS} rounds of {half:,} joins + {half:,} leaves "
                f"({events:,} events), pyflanneld", False)
    for rnd in range(CHURN_ROUNDS):
        t.row(f"VmRSS after {2 * half * (rnd + 1):,} events", [r[rnd] for r in per_round], fmt=mib)
    late_vs_early = [r[-1] / r[1] - 1 for r in per_round]
    t.row(f"growth, after {events:,} vs after {4 * half:,} events", late_vs_early,
          goal=goal_at_most(0.05, "≤ +5 % (no growth)"), fmt=pct)
    t.row("VmHWM over the run", hwm, fmt=mib)
    t.row(f"a round's {half:,} joins: first put → all programmed", add_s, fmt=secs)
    t.note("upstream not run here: it does not finish programming a burst of joins (see burst), so its "
           "rounds would never complete")
    return [t]


SCENARIOS = {"start": bench_start, "footprint": bench_footprint, "churn": bench_churn}
