"""strongSwan's IKE daemon ``charon`` as a child process, driven over VICI (the ``vici`` package).

Upstream ``pkg/backend/ipsec/handle_charon.go``: charon is searched in the usual places, started
as a child that dies with flanneld (``Pdeathsig``; here ``setpriv --pdeathsig``), its output
passed through, and spoken to over ``unix:///var/run/charon.vici`` — one short VICI session per
request. The VICI client is synchronous: each request runs in a worker thread with a socket
timeout, so the daemon's loop never blocks on charon.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
import vici

log = structlog.get_logger()

# upstream's search order: PATH, then where distributions put it (Debian: /usr/lib/ipsec/charon)
CHARON_PATHS = ("charon", "/usr/lib/strongswan/charon", "/usr/lib/ipsec/charon",
                "/usr/libexec/strongswan/charon", "/usr/libexec/ipsec/charon")
VICI_SOCKET = "/var/run/charon.vici"
REQUEST_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


class CharonError(Exception):
    """charon cannot be found, started or reached; ``str()`` is one line naming the fix."""


def find_charon(paths: tuple[str, ...] = CHARON_PATHS) -> str:
    """The first charon executable of ``paths`` (names are looked up in PATH)."""
    for p in paths:
        found = shutil.which(p)
        if found:
            return found
    raise CharonError(f"No valid charon executable found at paths {list(paths)}: install strongSwan's IKE "
                      "daemon (Debian: apt-get install strongswan-charon strongswan-swanctl)")


class Charon:
    """One charon child process and VICI requests to it."""

    def __init__(self, path: str, socket_path: str = VICI_SOCKET) -> None:
        self.path = path
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def alive(self) -> bool:
        """True while the charon child process runs."""
        return self.proc is not None and self.proc.returncode is None

    async def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start charon and wait until its VICI socket answers. Raises CharonError."""
        argv = [self.path]
        if shutil.which("setpriv"):  # dies with us, like upstream's Pdeathsig
            argv = ["setpriv", "--pdeathsig", "TERM", "--", self.path]
        try:
            self.proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=sys.stderr, stderr=sys.stderr)
        except OSError as e:
            raise CharonError(f"cannot start charon ({self.path}): {e.strerror}") from None
        log.info("charon daemon started", path=self.path, pid=self.proc.pid)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if not self.alive:
                raise CharonError(f"charon ({self.path}) exited at start with status {self.proc.returncode}: "
                                  f"is another charon running (its pid file, {self.socket_path})? see its log "
                                  "lines above")
            try:
                await self.request(lambda s: s.version())
                return
            except CharonError:
                if time.monotonic() >= deadline:
                    raise CharonError(f"charon's VICI socket {self.socket_path} did not answer within "
                                      f"{ready_timeout_s:.0f} s") from None
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT_S); upstream stops charon when it exits."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        log.info("stopped charon daemon")

    async def request(self, fn: Callable[[vici.Session], Any]) -> Any:
        """Run ``fn(session)`` on a fresh VICI session in a worker thread. Raises CharonError."""
        def call() -> Any:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.settimeout(REQUEST_TIMEOUT_S)
                s.connect(self.socket_path)
                return fn(vici.Session(s))
            finally:
                s.close()

        try:
            return await asyncio.to_thread(call)
        except (OSError, vici.exception.SessionException, vici.exception.CommandException) as e:
            raise CharonError(f"charon VICI request failed: {e}") from None

    # --- the requests upstream makes ------------------------------------------------------------
    async def load_shared_key(self, owner_ip: str, psk: str) -> None:
        """``load-shared``: the IKE PSK for ``owner_ip`` (an id per owner: reloading replaces it)."""
        await self.request(lambda s: s.load_shared({"id": f"flannel-{owner_ip}", "type": "IKE", "data": psk,
                                                    "owners": [owner_ip]}))

    async def load_conn(self, name: str, conf: dict[str, Any]) -> None:
        """Load (add or replace) the VICI connection ``name`` with swanctl-style settings ``conf``
        (upstream's loadConnection). Raises CharonError."""
        await self.request(lambda s: s.load_conn({name: conf}))

    async def unload_conn(self, name: str) -> None:
        """Unload the VICI connection ``name`` (upstream's unloadConnection). Raises CharonError."""
        await self.request(lambda s: s.unload_conn({"name": name}))

    async def conn_names(self) -> set[str]:
        """Names of the loaded connections (``swanctl --list-conns``)."""
        def names(s: vici.Session) -> set[str]:
            out: set[str] = set()
            for c in s.list_conns():
                out |= {k.decode() if isinstance(k, bytes) else k for k in c}
            return out

        return await self.request(names)
