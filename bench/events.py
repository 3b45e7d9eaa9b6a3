"""Lease events while both daemons run: a burst of joins, and the latency of single joins.

One lab, one local etcd, one prefix; a host per flavour, both synced before anything is written
(each has the other's lease as its only peer). Timestamps from different processes are wall clock
(CLOCK_REALTIME is shared by all namespaces).

* ``burst`` — BURST joins written by ``etcd_probe.py load`` as fast as etcd takes them (64 in
  flight); ``kcount.py`` on each host timestamps route/ARP/FDB counts. Time from the first put to
  all programmed; what is missing once the counts stop moving (STALL_S without change after the
  writes, at most MAX_WAIT_S) is counted as lost events.
* ``join`` — JOINS leases put GAP_S apart (``etcd_probe.py joins`` records each put's send time);
  ``ip -ts monitor route`` in each host stamps the route's arrival on flannel.1 (vxlan programs
  ARP → FDB → route, so the route is the last of the three). A plain aetcd watch client in a
  third namespace gives the raw etcd watch latency of the same run. Then the same leases are
  deleted GAP_S apart (``etcd_probe.py leaves``): lease DELETE → the route's "Deleted" line.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

from lab import Lab
from lab.cluster import Daemon

from .flavours import (
    KernelWatch,
    Run,
    at_least,
    lease_count,
    probe,
    run_probe,
    settle,
    wait,
    wait_subnet_env,
    write_config,
)
from .table import Compare, Failed, at_most, count, ms, percentile, ratio_at_most, secs

BURST = 5000
STALL_S = 15.0
MAX_WAIT_S = 120.0
JOINS = 200
GAP_S = 0.05
FIRST_JOIN = 30_000  # leases 10.117.48.0/24 and up (burst: from 1)


def _both_running(lab: Lab, etcd, run: Run, prefix: str, tag: str) -> dict[str, Daemon]:
    """A synced daemon per flavour on ``prefix`` (each has the others' leases); name → Daemon."""
    write_config(etcd, prefix)
    daemons = {}
    for fl in run.flavours:
        d = daemons[fl.name] = fl.start(lab.add_host(f"{tag}{fl.name[:2]}"), etcd, prefix)
        wait_subnet_env(d)
    settle(list(daemons.values()), lease_count(etcd, prefix) - 1)
    return daemons


# -- burst ------------------------------------------------------------------------------------------
def burst_once(lab: Lab, etcd, run: Run, n: int, tag: str) -> dict[str, dict]:
    prefix = f"/bench/burst{tag}"
    daemons = _both_running(lab, etcd, run, prefix, f"b{tag}")
    base = lease_count(etcd, prefix) - 1
    watches = {k: KernelWatch(d.host, interval_s=0.1) for k, d in daemons.items()}
    try:
        time.sleep(0.5)  # first samples in
        out = run_probe(lab, etcd, "load", prefix, 1, n, name=f"burst{tag}")
        t_first = float(re.search(r"^start ([\d.]+)", out, re.M)[1])
        write_s, t_last = (float(x) for x in re.search(r"^done \d+ ([\d.]+) ([\d.]+)", out, re.M).groups())
        target = at_least(base + n)

        def settled() -> bool:
            now = time.time()
            for k, w in watches.items():
                if not daemons[k].alive:
                    raise RuntimeError(f"{k} exited during the burst: {daemons[k].log_text()[-1500:]}")
                s = w.samples()
                if not s or not target(s[-1][1:]) and now - max(s[-1][0], t_last) < STALL_S:
                    return False
            return True

        while not settled() and time.time() - t_last < MAX_WAIT_S:
            time.sleep(0.2)
        res = {}
        for k, w in watches.items():
            t_all = w.when(target, t_first)
            r, a, f = w.last()
            res[k] = {"write_s": write_s, "lost": n - min(r - base, a - base, f - base),
                      "all_s": t_all - t_first if t_all else None, "after_last_s": t_all - t_last if t_all else None,
                      "end": (r - base, a - base, f - base), "waited": time.time() - t_first}
        return res
    finally:
        for w in watches.values():
            w.stop()
        for d in daemons.values():
            d.stop()


def bench_burst(run: Run) -> list[Compare]:
    n = run.n(BURST)
    runs = []
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        for r in range(run.repeats):
            runs.append(burst_once(lab, etcd, run, n, str(r)))

    def col(flavour: str | None, key: str):
        if flavour is None:
            return None
        xs = [x[flavour] for x in runs]
        if any(x[key] is None for x in xs):
            bad = next(x for x in xs if x[key] is None)
            r, a, f = bad["end"]
            return Failed(f"not all: {min(r, a, f):,} of {n:,} after {bad['waited']:.0f} s")
        return [x[key] for x in xs]

    up = "upstream" if run.has_upstream else None
    t = Compare(f"Burst: {n:,} joins written as fast as etcd takes them, both daemons running "
                f"(vxlan, median of {run.repeats})", run.has_upstream)
    t.row("etcd: all puts acknowledged", col("pyflanneld", "write_s"), None, None, secs)
    t.row("first put → all programmed", col("pyflanneld", "all_s"), col(up, "all_s"),
          at_most(3.0, "≤ 3 s"), secs)
    t.row("last put acked → all programmed", col("pyflanneld", "after_last_s"), col(up, "after_last_s"), None, secs)
    t.row("lost events (never programmed)", col("pyflanneld", "lost"), col(up, "lost"), at_most(0, "0"), count, ratio=False)
    t.note(f"programmed = route, ARP and FDB of every new peer on flannel.1 (kcount.py, every 100 ms); the "
           f"counts are taken as final once they have not moved for {STALL_S:.0f} s after the last put")
    return [t]


# -- join latency -----------------------------------------------------------------------------------
_TS = re.compile(r"^\[(\S+)\]\s+(Deleted )?(\d+\.\d+\.\d+\.\d+/\d+) .*dev flannel\.1")


def _route_times(text: str, wanted: dict[str, float], deleted: bool = False) -> dict[str, float]:
    """subnet → unix time its route first appeared (deleted: went), from ``ip -ts monitor route``."""
    out = {}
    for ln in text.splitlines():
        m = _TS.match(ln)
        if m and bool(m[2]) == deleted and m[3] in wanted and m[3] not in out:
            out[m[3]] = datetime.fromisoformat(m[1]).timestamp()
    return out


def _sent(out: str) -> dict[str, float]:
    """subnet → unix time its request was sent, from ``etcd_probe.py joins|leaves`` output."""
    sent = {}
    for ln in out.splitlines():
        p = ln.split()
        if len(p) == 3:
            sent[p[2].rsplit("/", 1)[1].replace("-", "/")] = float(p[0])
    return sent


def _latencies(mons: dict, sent: dict[str, float], deleted: bool = False) -> dict[str, dict]:
    """flavour → {"lat": seconds from request to route change, "missing": routes that never changed}:
    all routes, or what there is after 30 s (upstream drops watch events)."""
    res = {}
    deadline = time.monotonic() + 30
    for k, m in mons.items():
        while True:
            got = _route_times(m.log_text(), sent, deleted)
            if len(got) == len(sent) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        res[k] = {"lat": [got[sn] - t0 for sn, t0 in sent.items() if sn in got], "missing": len(sent) - len(got)}
    return res


def join_once(lab: Lab, etcd, run: Run, n: int, tag: str) -> dict[str, list[float]]:
    prefix = f"/bench/join{tag}"
    daemons = _both_running(lab, etcd, run, prefix, f"j{tag}")
    mons = {k: lab.spawn(d.host.ns, ["ip", "-ts", "monitor", "route"], name=f"{d.host.name}-mon")
            for k, d in daemons.items()}
    raw = probe(lab, lab.add_host(f"j{tag}w").ns, etcd, "watch", prefix, name=f"j{tag}-watch")
    try:
        wait(lambda: "ready" in raw.log_text(), 30, "the raw watch client", 0.05)
        time.sleep(0.5)
        out = run_probe(lab, etcd, "joins", prefix, FIRST_JOIN, n, GAP_S, name=f"j{tag}-writer")
        sent = _sent(out)
        if len(sent) != n:
            raise RuntimeError(f"join writer: {len(sent)} of {n} puts: {out[-500:]}")

        def watched() -> dict[str, float]:
            got = {}
            for ln in raw.log_text().splitlines():
                p = ln.split()
                if len(p) == 3 and p[1] == "PUT":
                    got.setdefault(p[2].rsplit("/", 1)[1].replace("-", "/"), float(p[0]))
            return got

        res = _latencies(mons, sent)
        got_w = wait(lambda: (lambda g: g if len(g) == n else None)(watched()), 10, "all raw watch events", 0.1)
        res["raw"] = [got_w[sn] - t0 for sn, t0 in sent.items()]
        out = run_probe(lab, etcd, "leaves", prefix, FIRST_JOIN, n, GAP_S, name=f"j{tag}-deleter")
        gone = _sent(out)
        if len(gone) != n:
            raise RuntimeError(f"leave writer: {len(gone)} of {n} deletes: {out[-500:]}")
        for k, v in _latencies(mons, gone, deleted=True).items():
            res[k]["leave"] = v
        return res
    finally:
        for p in (*mons.values(), raw):
            p.stop()
        for d in daemons.values():
            d.stop()


def bench_join(run: Run) -> list[Compare]:
    n = run.n(JOINS)
    runs = []
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        for r in range(run.repeats):
            runs.append(join_once(lab, etcd, run, n, str(r)))

    def col(flavour: str | None, p: float | None):
        if flavour is None:
            return None
        if any(not x[flavour]["lat"] for x in runs):
            return Failed("no route at all")
        return [percentile(x[flavour]["lat"], p) if p else max(x[flavour]["lat"]) for x in runs]

    def missing(flavour: str | None):
        return None if flavour is None else [x[flavour]["missing"] for x in runs]

    def leave(flavour: str | None, p: float):
        if flavour is None:
            return None
        if any(not x[flavour]["leave"]["lat"] for x in runs):
            return Failed("no route removed at all")
        return [percentile(x[flavour]["leave"]["lat"], p) for x in runs]

    up = "upstream" if run.has_upstream else None
    t = Compare(f"Join latency: lease PUT → route on flannel.1, {n} joins {GAP_S * 1000:.0f} ms apart, then leaves, "
                f"both daemons running (vxlan, median of {run.repeats})", run.has_upstream)
    t.row("p50", col("pyflanneld", 50), col(up, 50), None, ms)
    t.row("p99", col("pyflanneld", 99), col(up, 99), ratio_at_most(1), ms)
    t.row("max", col("pyflanneld", None), col(up, None), None, ms)
    t.row("joins never programmed (30 s)", missing("pyflanneld"), missing(up), at_most(0, "0"), count, ratio=False)
    t.row("leave p50 (lease DELETE → route gone)", leave("pyflanneld", 50), leave(up, 50), None, ms)
    t.row("leave p99", leave("pyflanneld", 99), leave(up, 99), None, ms)
    t.note("percentiles over the joins that were programmed (leaves: over the routes removed)")
    raw50, raw99 = (percentile(x["raw"], 50) for x in runs), (percentile(x["raw"], 99) for x in runs)
    t.note(f"raw etcd watch (plain aetcd client, same run): p50 {ms(min(raw50))}, p99 {ms(max(raw99))} "
           "(best / worst over repeats)")
    return [t]


SCENARIOS = {"burst": bench_burst, "join": bench_join}
