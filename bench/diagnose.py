"""Diagnosis: where pyflanneld's memory, idle CPU and udp latency go (bench/README.md has the findings).

* ``imports`` — VmHWM and wall time of ``python -c "import X"`` per module (the bare interpreter
  first), and which heavy packages a module drags in.
* ``memory`` — tracemalloc in the daemon (bench/memtrace.py wraps pyflanneld's entry point): a
  snapshot of a daemon synced on 1 peer and one synced on 5,000 (fresh processes, like
  ``footprint``), compared line by line; the growth is shown per peer, grouped by the pyflanneld
  line that caused the allocation and by the package that made it; next to VmRSS growth (what
  tracemalloc cannot see: C allocations of grpc/OpenSSL, allocator slack).
* ``idle_profile`` — py-spy (``pip install '.[bench]'``) on a daemon idle after syncing 5,000 peers:
  active samples over IDLE_S seconds, by function (inclusive, pyflanneld frames) and by leaf.
* ``udp_latency`` — tcpdump on flannel0 and eth0 of both hosts during PINGS pings: each forwarder
  hop's latency (TUN → UDP on the sender, UDP → TUN on the receiver, both ways) for pyflanneld's
  forwarder (offload on, off, one worker) and upstream's C proxy (BENCH_UDP_VARIANTS="offload,upstream"
  picks some), each also with the forwarders at real-time priority (no delay by other load).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from lab import Lab

from .dataplane import Pair, _lab
from .flavours import (
    HERE,
    Flavour,
    Run,
    cpu_seconds,
    lease_count,
    preload,
    run_ns,
    settle,
    wait,
    wait_subnet_env,
    write_config,
)
from .table import Table, median, mib, ms, percentile

IMPORTS = ["structlog", "pyroute2", "grpc", "aetcd", "httpx", "numpy", "pyflanneld.netlink",
           "pyflanneld.subnet.etcdv3", "pyflanneld.daemon", "pyflanneld.daemon, pyflanneld.backend.vxlan",
           "pyflanneld.udpfwd.worker", "pyflanneld.udpfwd.offload"]
HEAVY = ["grpc", "aetcd", "google.protobuf", "pyroute2.netlink", "pyroute2.ndb", "pyroute2.ipdb", "httpx", "numpy",
         "structlog", "click", "yaml"]  # pyroute2.netlink: pyroute2 proper (pyflanneld.lean_imports registers a bare "pyroute2")
# the daemon's imports in the order it needs them (vxlan, etcd v3), then what it should not need
CHAIN = ["asyncio, ssl, json, logging, ipaddress", "structlog", "pyflanneld.netlink", "grpc", "aetcd",
         "pyflanneld.daemon", "pyflanneld.backend.vxlan",
         "pyflanneld.backend.udp, pyflanneld.backend.awsvpc, pyflanneld.backend.gce, pyflanneld.backend.extension",
         "numpy"]
MEMTRACE = str(HERE / "memtrace.py")
MEMORY_PEERS = 5000
TRACE_FRAMES = 40
IDLE_S = 20.0
PINGS = 200


# -- imports ----------------------------------------------------------------------------------------
_IMPORT_PROBE = """
import sys, time
t0 = time.perf_counter()
{imports}
dt = time.perf_counter() - t0
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(hwm, dt, ' '.join(m for m in {heavy!r} if m in sys.modules))
"""


_CHAIN_PROBE = """
import sys, time
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
print('-', rss(), 0.0)
for mods in {chain!r}:
    t0 = time.perf_counter()
    for m in mods.split(', '):
        __import__(m)
    print(mods.replace(' ', ''), rss(), time.perf_counter() - t0, flush=True)
"""


def bench_imports(run: Run) -> list[Table]:
    rows = []
    for mod in ["", *IMPORTS]:
        code = _IMPORT_PROBE.format(imports=f"import {mod}" if mod else "", heavy=HEAVY)
        samples = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            hwm, dt, *loaded = out.split()
            samples.append((int(hwm) * 1024, float(dt), loaded))
        rows.append((mod or "(bare interpreter)", median([s[0] for s in samples]), median([s[1] for s in samples]),
                     samples[0][2]))
    bare = rows[0][1]
    t = Table("Import cost: VmHWM of `python -c \"import X\"` (median of 3)",
              ["import", "VmHWM", "over bare", "import time", "heavy packages loaded"])
    for mod, hwm, dt, loaded in rows:
        t.add(mod, mib(hwm), mib(hwm - bare), ms(dt), " ".join(loaded) or "-")
    t.note("heavy = any of " + ", ".join(HEAVY) + " found in sys.modules afterwards")
    steps = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", _CHAIN_PROBE.format(chain=CHAIN)], capture_output=True,
                             text=True, check=True).stdout
        steps.append([ln.split() for ln in out.splitlines()])
    t2 = Table("… cumulative, in the daemon's order: VmRSS added by each step (median of 3)",
               ["then import", "VmRSS after", "added", "time"])
    for i in range(1, len(CHAIN) + 1):
        after = median([int(s[i][1]) for s in steps])
        added = median([int(s[i][1]) - int(s[i - 1][1]) for s in steps])
        t2.add(CHAIN[i - 1], mib(after), mib(added), ms(median([float(s[i][2]) for s in steps])))
    t2.note("pyflanneld.netlink: the parts of pyroute2 it uses (pyflanneld.lean_imports); the other backends "
            "(udp, cloud, extension: httpx, click, the udp supervisor) are imported only when configured "
            "(backend.base.BACKEND_MODULES); numpy: udp workers only, never the daemon")
    return [t, t2]


# -- memory: allocator figures and tracemalloc -----------------------------------------------------
def _probe_daemon(lab: Lab, etcd, prefix: str, name: str, frames: int) -> dict:
    """pyflanneld under memtrace.py synced on ``prefix``, SIGUSR2'd; memtrace's info (+ snapshot); stopped."""
    out = lab.tmp / name
    out.mkdir(parents=True, exist_ok=True)
    probe = Flavour("pyflanneld (memtrace)", (sys.executable, MEMTRACE, str(out), str(frames), "--"), "this tree")
    d = probe.start(lab.add_host(name), etcd, prefix)
    try:
        wait_subnet_env(d, 120)
        settle([d], lease_count(etcd, prefix) - 1, 300)
        time.sleep(3)
        d.process.signal(signal.SIGUSR2)
        wait(lambda: (out / "snapshot.done").exists(), 120, f"{name}: memory probe", 0.2)
        info = pickle.loads((out / "info.pickle").read_bytes())
        if frames:
            info["snapshot"] = tracemalloc.Snapshot.load(str(out / "snapshot.pickle"))
        return info
    finally:
        d.stop()


def _where(tb: tracemalloc.Traceback) -> tuple[str, str]:
    """(the innermost pyflanneld frames "file:line ← file:line ...", package of the allocating frame)."""
    frames = list(tb)[::-1]  # most recent call first
    ours = [f"{f.filename.split('/pyflanneld/', 1)[1]}:{f.lineno}" for f in frames if "/pyflanneld/" in f.filename]
    caller = " ← ".join(list(dict.fromkeys(ours))[:4]) or "(outside pyflanneld)"
    fn = frames[0].filename
    m = re.search(r"site-packages/([^/]+)", fn)
    if m:
        pkg = m[1].removesuffix(".py")
    elif "/pyflanneld/" in fn:
        pkg = "pyflanneld." + fn.split("/pyflanneld/", 1)[1].removesuffix(".py").replace("/", ".")
    else:
        pkg = "stdlib:" + Path(fn).stem
    return caller, pkg


def bench_memory(run: Run) -> list[Table]:
    n = run.n(MEMORY_PEERS)
    plain, traced = {}, {}
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        for peers in (1, n):
            prefix = f"/bench/mem{peers}"
            write_config(etcd, prefix)
            preload(lab, etcd, prefix, 1, peers)
            plain[peers] = _probe_daemon(lab, etcd, prefix, f"mem{peers}", 0)
            traced[peers] = _probe_daemon(lab, etcd, prefix, f"mem{peers}t", TRACE_FRAMES)
    per = max(1, n - 1)

    t0 = Table(f"Where the daemon's resident memory is, 1 and {n:,} peers (vxlan, untraced, 3 s after sync)",
               ["", "1 peer", f"{n:,} peers", "growth", "per peer"])
    lo, hi = plain[1], plain[n]

    def parts(i: dict) -> list[tuple[str, int]]:
        pm, mi = i["pymalloc"], i["mallinfo"]
        return [("VmRSS", i["VmRSS"]),
                ("pymalloc: live small objects", pm["allocated"]),
                ("pymalloc: free space in its arenas", pm["free"]),
                ("pymalloc: arenas mapped", pm["arenas"]),
                ("malloc: in use (large objects, C libraries)", mi["in_use"]),
                ("malloc: free, kept by the allocator", mi["free"]),
                ("VmRSS after gc + malloc_trim(0)", i["VmRSS_trimmed"])]

    for (label, a), (_, b) in zip(parts(lo), parts(hi), strict=True):
        t0.add(label, mib(a), mib(b), mib(b - a), f"{(b - a) / per:,.0f} B")
    t0.note("pymalloc serves objects ≤ 512 B from 1 MiB arenas it maps itself; malloc (glibc, all arenas) "
            "serves the rest and grpc/OpenSSL; resident = touched pages of both + libraries + stacks")

    diff = traced[n]["snapshot"].compare_to(traced[1]["snapshot"], "traceback")
    by_caller: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    for st in diff:
        caller, pkg = _where(st.traceback)
        by_caller[caller] += st.size_diff
        by_pkg[pkg] += st.size_diff
    grown = sum(st.size_diff for st in diff)
    t1 = Table(f"tracemalloc: live Python memory added from 1 to {n:,} peers, by the pyflanneld lines that "
               "allocated it (innermost first; top 15)", ["pyflanneld file:line ← callers", "growth", "per peer"])
    for k, v in by_caller.most_common(15):
        t1.add(k, mib(v), f"{v / per:,.0f} B")
    t1.note(f"total {mib(grown)} ({grown / per:,.0f} B/peer) of live traced memory; traced at the snapshot "
            f"{mib(traced[1]['traced'])} → {mib(traced[n]['traced'])}, peak since start "
            f"{mib(traced[1]['traced_peak'])} → {mib(traced[n]['traced_peak'])}")
    t2 = Table("… by the package of the allocating frame (top 12)", ["package", "growth", "per peer"])
    for k, v in by_pkg.most_common(12):
        t2.add(k, mib(v), f"{v / per:,.0f} B")
    t3 = Table("Packages loaded in the running daemon (vxlan, etcd v3)", ["package", "loaded"])
    for pkg in HEAVY:
        t3.add(pkg, "yes" if pkg in hi["modules"] else "no")
    return [t0, t1, t2, t3]


# -- idle profile: py-spy ---------------------------------------------------------------------------
def _py_spy() -> str | None:
    for cand in (Path(sys.executable).parent / "py-spy", shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def _frames(stack: str) -> list[str]:
    """py-spy raw stack "f (file:line);g (file:line)" → ["f (file)", ...], outermost first."""
    return [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]


def bench_idle_profile(run: Run) -> list[Table]:
    spy = _py_spy()
    if spy is None:
        t = Table("Idle profile", ["-"])
        t.note("py-spy not installed: `.venv/bin/pip install '.[bench]'` (or `pip install py-spy`)")
        return [t]
    n = run.n(MEMORY_PEERS)
    rate = 200
    with Lab() as lab:
        etcd = lab.start_etcd(enable_v2=False)
        prefix = "/bench/idle"
        write_config(etcd, prefix)
        preload(lab, etcd, prefix, 1, n)
        d = run.flavours[0].start(lab.add_host("idle"), etcd, prefix)
        wait_subnet_env(d)
        settle([d], n, 120)
        out = lab.tmp / "idle.txt"
        cpu0, t0 = cpu_seconds(d.pid), time.monotonic()
        subprocess.run([spy, "record", "--pid", str(d.pid), "--duration", str(int(IDLE_S)), "--rate", str(rate),
                        "--format", "raw", "--output", str(out), "--nonblocking"],
                       capture_output=True, text=True, check=True, timeout=IDLE_S + 60)
        cpu = (cpu_seconds(d.pid) - cpu0) / (time.monotonic() - t0)
        text = out.read_text()
        d.stop()
    stacks = []
    for ln in text.splitlines():
        stack, _, cnt = ln.rpartition(" ")
        if stack and cnt.isdigit():
            stacks.append((_frames(stack), int(cnt)))
    total = sum(c for _, c in stacks) or 1
    incl: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for frames, c in stacks:
        for f in set(frames):
            if "/pyflanneld/" in f or "pyflanneld" in f.split("(")[-1]:
                incl[f] += c
        leaf[frames[-1]] += c
    t = Table(f"py-spy on pyflanneld idle after syncing {n:,} peers ({IDLE_S:.0f} s, {rate} Hz, active samples only)",
              ["function (file)", "inclusive", "share of active"])
    for f, c in incl.most_common(15):
        t.add(f, f"{c / rate:.2f} s", f"{c / total * 100:.0f} %")
    t2 = Table("… leaf frames (where the time is spent)", ["function (file)", "self", "share of active"])
    for f, c in leaf.most_common(12):
        t2.add(f, f"{c / rate:.2f} s", f"{c / total * 100:.0f} %")
    t.note(f"daemon CPU over the window (/proc): {cpu * 100:.1f} % of a core; active samples: {total} "
           f"({total / rate:.1f} s of {IDLE_S:.0f} s)")
    return [t, t2]


# -- udp latency: per-hop, tcpdump ------------------------------------------------------------------
_PKT = re.compile(r"^(\d+\.\d+) IP (\S+) > (\S+): (.*)$")


def _capture(host, iface: str, flt: str, path: Path):
    return host.popen("tcpdump", "-i", iface, "-n", "-U", "-w", str(path), flt, name=f"tcpdump-{host.name}-{iface}")


def _read(path: Path) -> list[tuple[float, str, str, str]]:
    out = subprocess.run(["tcpdump", "-r", str(path), "-n", "-tt"], capture_output=True, text=True).stdout
    return [(float(m[1]), m[2], m[3], m[4]) for m in map(_PKT.match, out.splitlines()) if m]


def _realtime(pids: list[int], on: bool) -> None:
    """Put every thread of ``pids`` in SCHED_FIFO 10 (on) or back to SCHED_OTHER: with it, other load on
    the machine no longer delays the forwarders, so a hop shows its own cost (code, wake-up, caches)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            policy = os.SCHED_FIFO if on else os.SCHED_OTHER
            try:
                os.sched_setscheduler(int(task.name), policy, os.sched_param(10 if on else 0))
            except OSError:
                pass


def hop_latencies(pair: Pair, tmp: Path, realtime: bool = False) -> dict[str, list[float]]:
    """Ping a → b PINGS times with tcpdump on both hosts; per ping, each forwarder hop's latency (s)."""
    (ha, hb), (pa, pb) = (d.host for d in pair.daemons), pair.pods
    caps, procs = {}, []
    for h in (ha, hb):
        for iface, flt in (("flannel0", "icmp"), ("eth0", "udp port 8285")):
            caps[(h.name, iface)] = p = tmp / f"{h.name}-{iface}.pcap"
            procs.append(_capture(h, iface, flt, p))
    try:
        for proc in procs:
            wait(lambda proc=proc: "listening on" in proc.log_text(), 10, "tcpdump", 0.05)
        fwd = pair.forwarder_pids()
        if realtime:
            _realtime(fwd, True)
        ns0 = run_ns(fwd)
        rtt = pa.run("ping", "-n", "-c", str(PINGS), "-i", "0.01", "-W", "1", pb.address, check=False,
                     timeout=PINGS * 0.05 + 30).stdout
        cpu_ns = run_ns(fwd) - ns0
        time.sleep(0.3)
    finally:
        if realtime:
            _realtime(pair.forwarder_pids(), False)
        for proc in procs:
            proc.stop()
    a_tun, a_eth = _read(caps[(ha.name, "flannel0")]), _read(caps[(ha.name, "eth0")])
    b_tun, b_eth = _read(caps[(hb.name, "flannel0")]), _read(caps[(hb.name, "eth0")])

    def times(pkts, pred) -> list[float]:
        return [p[0] for p in pkts if pred(p)]

    a, b = ha.address, hb.address
    req_a = times(a_tun, lambda p: "echo request" in p[3])
    out_a = times(a_eth, lambda p: p[1].startswith(a + ".") and p[2].startswith(b + "."))
    in_b = times(b_eth, lambda p: p[1].startswith(a + ".") and p[2].startswith(b + "."))
    req_b = times(b_tun, lambda p: "echo request" in p[3])
    rep_b = times(b_tun, lambda p: "echo reply" in p[3])
    out_b = times(b_eth, lambda p: p[1].startswith(b + ".") and p[2].startswith(a + "."))
    in_a = times(a_eth, lambda p: p[1].startswith(b + ".") and p[2].startswith(a + "."))
    rep_a = times(a_tun, lambda p: "echo reply" in p[3])
    k = min(map(len, (req_a, out_a, in_b, req_b, rep_b, out_b, in_a, rep_a)))
    rtts = [float(x) / 1000 for x in re.findall(r"time=([\d.]+) ms", rtt)]
    return {"rtt": rtts, "pings": k, "cpu_per_hop": cpu_ns / 1e9 / max(1, 4 * len(rtts)),
            "a tun→udp": [out_a[i] - req_a[i] for i in range(k)],
            "b udp→tun": [req_b[i] - in_b[i] for i in range(k)],
            "b tun→udp": [out_b[i] - rep_b[i] for i in range(k)],
            "a udp→tun": [rep_a[i] - in_a[i] for i in range(k)],
            "wire": [in_b[i] - out_a[i] + in_a[i] - out_b[i] for i in range(k)]}


def bench_udp_latency(run: Run) -> list[Table]:
    variants = [(run.flavours[0], "pyflanneld (offload, default)", None),
                (run.flavours[0], "pyflanneld, per-packet", {"PYFLANNELD_UDP_OFFLOAD": "0"}),
                (run.flavours[0], "pyflanneld, 1 worker", {"PYFLANNELD_UDP_WORKERS": "1"})]
    if run.has_upstream:
        variants.append((run.flavours[1], "upstream (C proxy)", None))
    only = [w for w in os.environ.get("BENCH_UDP_VARIANTS", "").split(",") if w]  # e.g. "offload,upstream"
    variants = [v for v in variants if not only or any(w in v[1] for w in only)]
    hops = ["a tun→udp", "b udp→tun", "b tun→udp", "a udp→tun"]
    res: dict[str, list[dict]] = {}
    lab, etcd = _lab("udp")
    with lab:
        pairs = {label: Pair(lab, etcd, fl, f"l{i}", env) for i, (fl, label, env) in enumerate(variants)}
        for p in pairs.values():
            p.ready()
        for r in range(run.repeats):
            for rt in (False, True):
                for label, p in pairs.items():
                    key = f"{label}{', SCHED_FIFO' if rt else ''}"
                    d = lab.tmp / f"hops-{r}-{rt:d}-{list(pairs).index(label)}"
                    d.mkdir()
                    res.setdefault(key, []).append(hop_latencies(p, d, rt))
    t = Table(f"udp forwarder latency per hop: tcpdump on flannel0 and eth0 of both hosts, {PINGS} pings "
              "10 ms apart (median; p99 in brackets)",
              ["forwarder", "ping avg", *hops, "4 hops", "rest", "CPU per hop"])
    for label, rs in res.items():
        def agg(key: str, rs=rs) -> tuple[float, float]:
            vals = [v for r in rs for v in r[key]]
            return median(vals), percentile(vals, 99)

        cells = [f"{ms(agg(h)[0])} ({ms(agg(h)[1])})" for h in hops]
        rtt = [v for r in rs for v in r["rtt"]]
        four = [sum(r[h][i] for h in hops) for r in rs for i in range(r["pings"])]
        t.add(label, ms(statistics.fmean(rtt)), *cells, ms(median(four)), ms(statistics.fmean(rtt) - median(four)),
              f"{median([r['cpu_per_hop'] for r in rs]) * 1e6:.1f} µs")
    t.note("a = the pinging pod's host, b = the other; tun→udp: packet seen on flannel0 → its UDP datagram "
           "on eth0 (wake-up + forwarder work + send); udp→tun: datagram on eth0 → packet on flannel0; "
           "rest = ping average − 4 hops (pods, bridges, routing, the wire); CPU per hop = on-CPU time of the "
           "forwarder processes on both hosts (schedstat, all threads; upstream's include the Go runtime's) "
           "/ (4 × pings), kernel work done in their system calls included")
    t.note("SCHED_FIFO: the same, with the forwarders' threads at real-time priority 10 for the run, so that "
           "other load on the machine does not delay them: what is left is their own cost")
    return [t]


SCENARIOS = {"imports": bench_imports, "memory": bench_memory, "idle_profile": bench_idle_profile,
             "udp_latency": bench_udp_latency}
