"""Run pyflanneld with a memory probe; SIGUSR2 writes what its memory is made of (bench ``memory``).

    python memtrace.py OUT_DIR FRAMES -- <pyflanneld flags>

FRAMES > 0: tracemalloc runs from before pyflanneld is imported, FRAMES frames per allocation, and
SIGUSR2 also writes OUT_DIR/snapshot.pickle (tracemalloc.Snapshot.dump). FRAMES = 0: no tracing,
the daemon's memory is as in production. Either way SIGUSR2 writes OUT_DIR/info.pickle, then
touches OUT_DIR/snapshot.done. info holds, in bytes:

* ``VmRSS`` and the loaded ``modules``;
* ``pymalloc``: the allocator's own figures from ``sys._debugmallocstats()`` (arenas mapped, bytes
  in allocated blocks = live small objects, free bytes inside the arenas);
* ``mallinfo``: glibc's ``mallinfo2()`` (``heap`` = non-mmapped heap of all arenas, ``mmapped``,
  ``in_use``, ``free``): large objects, C libraries (grpc, OpenSSL) and what they freed;
* ``traced``/``traced_peak`` (tracing only, read before the snapshot is built);
* ``VmRSS_trimmed``: VmRSS after ``gc.collect()`` and ``malloc_trim(0)`` — the difference is free
  memory the allocators kept resident.

Diagnosis only: tracing slows the daemon down and costs memory of its own.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import re
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))


def _mallinfo() -> dict[str, int]:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return {"heap": m.arena, "mmapped": m.hblkhd, "in_use": m.uordblks + m.hblkhd, "free": m.fordblks}


def _pymalloc() -> dict[str, int]:
    """Parse sys._debugmallocstats() (it writes to fd 2, so that is redirected for the call)."""
    with tempfile.TemporaryFile("w+") as tmp:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()

    def field(label: str) -> int:
        m = re.search(rf"^{re.escape(label)}\s*=\s*([\d,]+)", text, re.M)
        return int(m[1].replace(",", "")) if m else 0

    def product(what: str) -> int:  # "<n> arenas * <size> bytes/arena", "<n> unused pools * <size> bytes"
        m = re.search(rf"^(\d+) {what} \* (\d+) bytes", text, re.M)
        return int(m[1]) * int(m[2]) if m else 0

    return {"arenas": product("arenas"), "allocated": field("# bytes in allocated blocks"),
            "free": field("# bytes in available blocks") + product("unused pools")}


def _dump(out: Path) -> None:
    info: dict = {}
    if tracemalloc.is_tracing():
        info["traced"], info["traced_peak"] = tracemalloc.get_traced_memory()
        tracemalloc.take_snapshot().dump(str(out / "snapshot.pickle"))
    info.update(VmRSS=_rss(), modules=sorted(sys.modules), pymalloc=_pymalloc(), mallinfo=_mallinfo())
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    info["VmRSS_trimmed"] = _rss()
    (out / "info.pickle").write_bytes(pickle.dumps(info))
    (out / "snapshot.done").touch()


def main() -> None:
    out, frames, sep, *args = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: python memtrace.py OUT_DIR FRAMES -- <pyflanneld flags>")
    out_dir = Path(out)
    if int(frames) > 0:
        tracemalloc.start(int(frames))
    signal.signal(signal.SIGUSR2, lambda *_: _dump(out_dir))
    from pyflanneld.cli import main as pyflanneld

    pyflanneld(args)


if __name__ == "__main__":
    main()
