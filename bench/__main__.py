"""`python -m bench [NAME ...]`: run each benchmark module's run() and print the table it returns.

A module takes part by existing in MODULES and defining ``run() -> str`` (Markdown-ish text, e.g. from
bench.table.Table). Names on the command line pick a subset: `python -m bench control_plane`.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

MODULES = ["control_plane", "netlink_cost", "udp"]


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    wanted = argv or MODULES
    unknown = [n for n in wanted if n not in MODULES]
    if unknown:
        print(f"bench: unknown module(s) {unknown}; known: {MODULES}", file=sys.stderr)
        return 2
    failed = 0
    for name in wanted:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                continue  # not written yet
            raise
        run = getattr(mod, "run", None)
        if run is None:
            continue
        t0 = time.monotonic()
        print(f"# bench.{name}", flush=True)
        try:
            print(run(), flush=True)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            print(f"bench.{name} failed: {e}", file=sys.stderr, flush=True)
            failed += 1
        print(f"(bench.{name}: {time.monotonic() - t0:.0f} s)\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
