"""The real upstream flanneld binaries, for interop tests and side-by-side benchmarks.

They are shipped xz-compressed outside the repository (``../shared/upstream/flanneld-<tag>.xz``
next to the checkout on the development machines). ``upstream_binary("v0.20.2")`` finds the
archive, decompresses it once into a cache directory and returns the executable's path, or
``None`` when no archive is available (a fresh CI machine has none): callers then skip with
:func:`missing_reason`.

Lookup order for the archive: ``$FLANNELD_UPSTREAM`` (a path to an already decompressed binary,
used for any tag), ``$PYFLANNELD_UPSTREAM_DIR``, ``<repo>/../shared/upstream``, and the parent
directories of the repository up to ``/`` (``<dir>/shared/upstream``), so git worktrees placed
elsewhere find it too.
"""

from __future__ import annotations

import lzma
import os
import shutil
from pathlib import Path

from . import ROOT
from .wait import WaitTimeout, wait_for

VERSIONS = ("v0.20.2", "v0.17.0")  # v0.20.2: etcd v3; v0.17.0: etcd v2 (start etcd with --enable-v2)
CACHE = Path(os.environ.get("PYFLANNELD_UPSTREAM_CACHE", "/var/tmp/pyflanneld-upstream"))


def _archive_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("PYFLANNELD_UPSTREAM_DIR"):
        dirs.append(Path(os.environ["PYFLANNELD_UPSTREAM_DIR"]))
    for parent in [ROOT, *ROOT.parents]:
        dirs.append(parent / "shared" / "upstream")
    return dirs


def archive(version: str = "v0.20.2") -> Path | None:
    """The ``flanneld-<version>.xz`` archive, or None."""
    for d in _archive_dirs():
        p = d / f"flanneld-{version}.xz"
        if p.is_file():
            return p
    return None


def upstream_binary(version: str = "v0.20.2") -> Path | None:
    """Path of a runnable upstream flanneld ``version`` (decompressed and cached), or None."""
    given = os.environ.get("FLANNELD_UPSTREAM")
    if given:
        return Path(given) if os.access(given, os.X_OK) else None
    src = archive(version)
    if src is None:
        return None
    out = CACHE / f"flanneld-{version}"
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with lzma.open(src) as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    tmp.chmod(0o755)
    tmp.replace(out)
    return out


def missing_reason(version: str = "v0.20.2") -> str:
    """Why upstream_binary(version) is None, for a test's skip reason."""
    looked = ", ".join(str(d) for d in _archive_dirs()[:3])
    return (f"upstream flanneld {version} not available: no flanneld-{version}.xz in {looked}, ... "
            "and FLANNELD_UPSTREAM not set")


def settle(daemon, converged, timeout: float, what: str, poll_s: float = 0.1) -> bool:
    """Wait until ``converged()`` holds for a host running upstream flanneld v0.20.2.

    Upstream v0.20.2 handles only the first event of each etcd watch response
    (``subnet/etcd/registry.go``: ``wresp.Events[0] //TODO``): a lease created in the same response
    as another event is never programmed. A test about pyflanneld must not fail on that, so when
    ``converged()`` is still false after ``timeout`` seconds the upstream daemon is restarted once
    (it lists every lease at start) and waited for again. Returns True when the restart was needed;
    raises lab.wait.WaitTimeout (an AssertionError) naming ``what`` if it still does not converge.
    ``daemon`` is a lab.cluster.Daemon.
    """
    try:
        wait_for(converged, timeout, what, interval=poll_s)
        return False
    except WaitTimeout:
        daemon.restart()
    wait_for(converged, timeout, f"{what} (upstream restarted once after {timeout} s)", interval=poll_s)
    return True
