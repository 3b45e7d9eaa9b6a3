"""`python -m bench [--repeats N] [--scale F] [SCENARIO|FAMILY ...]`: run scenarios, print their tables.

Scenarios (module → scenarios; a family name runs all of its scenarios):

    scale      start footprint churn      N peers before start; idle CPU/RSS; RSS over churn
    events     burst join                 a 5,000-join burst while both run; join latency
    dataplane  udp throughput             udp forwarder vs upstream's C proxy; vxlan/host-gw vs veth
    diagnose   imports memory idle_profile udp_latency   where the costs are (see bench/README.md)
    udp_hotpath                           CPU per small packet of the udp worker's code path
    netlink_cost                          per-peer netlink cost, adapter vs batched raw netlink

Without arguments: every scenario of the issue and ``imports`` (memory, idle_profile, udp_latency,
udp_hotpath and netlink_cost are diagnosis tools, run by name). ``--repeats`` repeats each measurement (tables show the
median and the range), ``--scale 0.1`` shrinks peer counts and event counts tenfold (a quick check
that the harness works; its figures are not the issue's). Upstream runs next to pyflanneld when
its binary is there ($FLANNELD_UPSTREAM, else lab.upstream's v0.20.2 archive).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

FAMILIES = {
    "scale": ["start", "footprint", "churn"],
    "events": ["burst", "join"],
    "dataplane": ["udp", "throughput"],
    "diagnose": ["imports", "memory", "idle_profile", "udp_latency"],
    "udp_hotpath": ["udp_hotpath"],
    "netlink_cost": ["netlink_cost"],
}
MODULE_OF = {s: m for m, ss in FAMILIES.items() for s in ss}
DEFAULT = ["start", "footprint", "churn", "burst", "join", "udp", "throughput", "imports"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("names", nargs="*", help="scenarios or families (default: the issue's scenarios)")
    ap.add_argument("--repeats", type=int, default=int(os.environ.get("BENCH_REPEATS", "1")))
    ap.add_argument("--scale", type=float, default=float(os.environ.get("BENCH_SCALE", "1")))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    wanted: list[str] = []
    for name in args.names or DEFAULT:
        if name in FAMILIES:
            wanted += FAMILIES[name]
        elif name in MODULE_OF:
            wanted.append(name)
        else:
            print(f"bench: unknown scenario {name!r}; known: {', '.join([*FAMILIES, *MODULE_OF])}",
                  file=sys.stderr)
            return 2
    if args.repeats < 1 or not 0 < args.scale <= 1:
        print("bench: --repeats must be ≥ 1 and --scale in (0, 1]", file=sys.stderr)
        return 2

    from .flavours import Run, flavours

    found, missing = flavours()
    run = Run(args.repeats, args.scale, found)
    load = os.getloadavg()
    print(f"# pyflanneld ({found[0].version}) side by side with upstream flanneld "
          f"({found[-1].version if run.has_upstream else 'absent'})")
    print(f"machine: {os.cpu_count()} CPUs, kernel {platform.release()}, Python {platform.python_version()}; "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; repeats {run.repeats}, scale {run.scale:g}")
    if missing:
        print(f"upstream: {missing}")
    print(flush=True)

    failed, verdicts = 0, []
    for name in dict.fromkeys(wanted):
        mod = importlib.import_module(f"bench.{MODULE_OF[name]}")
        t0 = time.monotonic()
        print(f"# {name}", flush=True)
        try:
            for table in mod.SCENARIOS[name](run):
                print(table, flush=True)
                verdicts += [(name, metric, met) for metric, met in getattr(table, "results", [])]
        except Exception as e:  # noqa: BLE001 - one failing scenario must not hide the others
            print(f"bench {name} failed: {e}", file=sys.stderr, flush=True)
            failed += 1
        print(f"({name}: {time.monotonic() - t0:.0f} s, load average {os.getloadavg()[0]:.1f})\n", flush=True)
    if verdicts:
        judged = [v for v in verdicts if v[2] is not None]
        missed = [f"{s}: {m}" for s, m, ok in judged if not ok]
        print(f"# goals: {len(judged) - len(missed)} of {len(judged)} met"
              + (f"; not met: {'; '.join(missed)}" if missed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
