"""extension: upstream ``backend/extension`` (v0.20.2; Documentation/extension.md), IPv4.

The backend runs the operator's shell commands (``sh -c``, with flanneld's environment plus the
variables below) instead of programming the kernel itself:

=====================  =======================  ==========================  =================  ===============
Backend key            runs                     variables                   stdin              on failure
=====================  =======================  ==========================  =================  ===============
PreStartupCommand      before the lease         —                           empty line         fatal (exit 1)
PostStartupCommand     after the lease          NETWORK, SUBNET, PUBLIC_IP  empty line         fatal (exit 1)
SubnetAddCommand       per added remote lease   SUBNET, PUBLIC_IP (remote)  remote BackendData retried
SubnetRemoveCommand    per removed remote lease SUBNET, PUBLIC_IP (remote)  remote BackendData retried (5×)
=====================  =======================  ==========================  =================  ===============

* The Pre command's output, trimmed, becomes the lease's ``BackendData`` as a JSON string (no Pre
  command: no BackendData; more than ``MAX_OUTPUT_BYTES`` is a startup error). A remote lease's
  BackendData must be a JSON string (or absent); otherwise upstream's "failed to unmarshal
  BackendData" is logged and the lease is skipped.
  Leases of another BackendType are ignored ("Ignoring non-extension subnet"), as upstream.
* Variables hold Go's renderings: ``SUBNET=10.5.3.0/24``, ``PUBLIC_IP=192.168.100.2``,
  ``NETWORK=10.5.0.0/16``. stdin is the BackendData text followed by a newline.
* MTU = the interface's; BackendType ``extension``.

What upstream lacks (its docs: "doesn't have a built in retry mechanism"):

* a failing command is logged on one line with its exit status (or the timeout) and its stderr;
  of each command's stdout and stderr only the first ``MAX_OUTPUT_BYTES`` are kept (a command
  printing without end costs no memory);
* a failed SubnetAddCommand is retried by the reconcile loop with a growing delay (2 s doubling to
  5 min) until it succeeds or the lease goes away; a failed SubnetRemoveCommand up to 5 times;
* no command ever blocks the event loop: each runs as an asyncio subprocess, commands of different
  peers run in parallel (at most ``MAX_PARALLEL``), those of one peer in order, and a command that
  runs longer than ``CommandTimeout`` seconds (a pyflanneld key, default 60; upstream ignores it)
  is killed with its whole process group;
* a remote lease renewed with the same attributes does not run SubnetAddCommand again (upstream
  runs it on every renewal); one whose PublicIP or BackendData changed runs SubnetRemoveCommand
  with the old values, then SubnetAddCommand with the new ones.

Differences kept on purpose: BackendData is the Pre command's stdout (upstream's code also mixes
in its stderr; its documentation says stdout). Commands should be idempotent (``ip route replace``
rather than upstream's example ``ip route add``): a restart runs SubnetAddCommand for every peer
again, and a command failing because its work is already done is retried like any other failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

import structlog

from ..config import json_type
from ..oneline import one_line
from ..subnet.lease import Lease
from .base import BackendContext, BackendError, BackendInfo, PeerSetBackend, register_backend

log = structlog.get_logger()

COMMAND_KEYS = ("PreStartupCommand", "PostStartupCommand", "SubnetAddCommand", "SubnetRemoveCommand")
DEFAULT_TIMEOUT_S = 60.0
KILL_WAIT_S = 2.0  # after SIGKILL, how long to wait for the process and its pipes
MAX_PARALLEL = 8  # commands running at once (peers at start: thousands of sh processes otherwise)
RETRY_MIN_S = 2.0
RETRY_MAX_S = 300.0
REMOVE_ATTEMPTS = 5
OUTPUT_LOG_CHARS = 500
# What is kept of a command's stdout and of its stderr; the rest is read and dropped, so a command
# that prints without end costs no memory. Pre's stdout is the lease's BackendData: more than this
# is refused (every host reads every lease).
MAX_OUTPUT_BYTES = 64 * 1024


@dataclass(frozen=True)
class CommandResult:
    """What one run of a command gave: exit status (None: it did not finish), stdout, stderr, and
    why it did not finish (``killed after 5s timeout``, ``cannot run sh: …``)."""

    status: int | None
    stdout: str = ""
    stderr: str = ""
    failure: str = ""
    stdout_cut: bool = False  # stdout went on past MAX_OUTPUT_BYTES (only the start is kept)

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.status == 0

    def problem(self) -> str:
        """One line: ``exit status 2: RTNETLINK answers: File exists`` / ``killed after 5s timeout``."""
        what = f"exit status {self.status}" if self.status is not None else self.failure
        err = one_line(self.stderr, OUTPUT_LOG_CHARS)
        return f"{what}: {err}" if err else what


async def run_shell(command: str, env: dict[str, str], stdin: str, timeout_s: float) -> CommandResult:
    """``sh -c command`` with flanneld's environment plus ``env``, ``stdin`` + newline on its stdin
    (upstream runCmd). Of stdout and stderr the first MAX_OUTPUT_BYTES each are kept. Never raises
    for the command's own failure; on timeout the command's process group is killed. Cancelling the
    caller kills it too."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **env}, start_new_session=True)
    except OSError as e:
        return CommandResult(None, failure=f"cannot run sh: {e.strerror or e}")

    async def communicate() -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        _, out, err = await asyncio.gather(_feed(proc.stdin, (stdin + "\n").encode()),
                                           _read_capped(proc.stdout), _read_capped(proc.stderr))
        await proc.wait()
        return out, err

    try:
        (out, out_cut), (err, _) = await asyncio.wait_for(communicate(), timeout_s)
    except TimeoutError:
        await _kill(proc)
        return CommandResult(None, failure=f"killed after {timeout_s:g}s timeout")
    except asyncio.CancelledError:
        await _kill(proc)
        raise
    return CommandResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                         stdout_cut=out_cut)


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data`` to the command's stdin and close it; a command that does not read it is fine."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        pipe.write(data)
        await pipe.drain()
    pipe.close()


async def _read_capped(pipe: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Read ``pipe`` to its end; (its first MAX_OUTPUT_BYTES, whether more came and was dropped)."""
    kept = bytearray()
    cut = False
    while chunk := await pipe.read(1 << 16):
        room = MAX_OUTPUT_BYTES - len(kept)
        cut = cut or len(chunk) > room
        kept += chunk[:max(room, 0)]
    return bytes(kept), cut


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (sh and what it started), then wait a little for it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        # wait() also waits for the pipes: a process that left the group may hold them open
        await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_WAIT_S)


def lease_env(lease: Lease) -> dict[str, str]:
    """SUBNET/PUBLIC_IP of a remote lease (upstream's Add/Remove variables), plus IPV6_SUBNET/PUBLIC_IPV6
    for a dual-stack lease: upstream's extension.md names these, its code (through v0.28) never sets them."""
    env = {"SUBNET": str(lease.subnet), "PUBLIC_IP": str(lease.attrs.public_ip)}
    if lease.subnet6 is not None:
        env |= {"IPV6_SUBNET": str(lease.subnet6), "PUBLIC_IPV6": str(lease.attrs.public_ipv6 or "")}
    return env


def backend_data_text(data: Any) -> str | None:
    """A remote lease's BackendData as the subnet commands' stdin: the JSON string's value, "" when
    absent or null; None when it is not a string (upstream: "failed to unmarshal BackendData")."""
    if data is None:
        return ""
    return data if isinstance(data, str) else None


def _log_crash(task: asyncio.Task) -> None:
    """A worker that died of a bug is logged (the reconcile loop starts the peer's worker again)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("extension worker failed", task=task.get_name(), error=repr(task.exception()))


@dataclass
class _Retry:
    attempts: int
    next_at: float  # time.monotonic()


@register_backend
class ExtensionBackend(PeerSetBackend):
    """The extension backend (upstream ``pkg/backend/extension``): the operator's shell commands per
    lifecycle step and per remote lease, with retries; see the module docstring."""
    type_name = "extension"
    reconcile_interval = 1.0  # only looks for due retries: cheap

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.commands: dict[str, str] = {}
        for key in COMMAND_KEYS:
            v = ctx.config.backend_option(key, "")
            if v is None:
                v = ""
            if not isinstance(v, str):
                raise BackendError(f"error decoding backend config: json: cannot unmarshal {json_type(v)} "
                                   f"into Go struct field .{key} of type string")
            self.commands[key] = v
        timeout = ctx.config.backend_option("CommandTimeout", DEFAULT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise BackendError(f"extension backend: CommandTimeout must be a positive number of seconds, "
                               f"got {json.dumps(timeout)}")
        self.timeout_s = float(timeout)
        self._added: dict[IPv4Network, Lease] = {}  # SubnetAddCommand succeeded for this lease
        self._retry: dict[IPv4Network, _Retry] = {}
        self._workers: dict[IPv4Network, asyncio.Task] = {}
        self._skipped: dict[IPv4Network, Lease] = {}  # warned once about this lease
        self._slots = asyncio.Semaphore(MAX_PARALLEL)

    # --- startup --------------------------------------------------------------------------------
    async def register(self) -> BackendInfo:
        data = None
        pre = self.commands["PreStartupCommand"]
        if pre:
            res = await self._startup_command("PreStartupCommand", {})
            if res.stdout_cut:
                raise BackendError(f"PreStartupCommand printed more than {MAX_OUTPUT_BYTES} bytes; its output "
                                   "becomes the lease's BackendData, which every host reads: print only what "
                                   "the SubnetAddCommand of the other hosts needs")
            data = res.stdout.strip()
        else:
            log.info("no pre startup command configured - skipping")
        return BackendInfo(mtu=self.ctx.ext.mtu, backend_type="extension", backend_data=data)

    async def start(self, own_lease: Lease) -> None:
        await super().start(own_lease)
        if self.commands["PostStartupCommand"]:
            await self._startup_command("PostStartupCommand", {
                "NETWORK": str(self.network), "SUBNET": str(own_lease.subnet),
                "PUBLIC_IP": str(self.ctx.ext.public_ip)})
        else:
            log.info("no post startup command configured - skipping")

    async def _startup_command(self, key: str, env: dict[str, str]) -> CommandResult:
        res = await run_shell(self.commands[key], env, "", self.timeout_s)
        if not res.ok:
            raise BackendError(f"{key} failed ({res.problem()}); fix the command in the network config's Backend")
        log.info("ran command", command=key, output=one_line(res.stdout, OUTPUT_LOG_CHARS))
        return res

    # --- peers: desired state in self.peers, applied state in self._added --------------------------
    async def ensure_peer(self, lease: Lease) -> None:
        self._kick(lease.subnet)

    async def drop_peer(self, lease: Lease) -> None:
        self._kick(lease.subnet)

    async def reconcile(self) -> None:
        """Start the retries that are due (and converge any peer left unconverged without one)."""
        now = time.monotonic()
        for sn in set(self.peers) | set(self._added):
            r = self._retry.get(sn)
            if (r.next_at <= now) if r is not None else not self._converged(sn):
                self._kick(sn)

    async def close(self) -> None:
        workers = list(self._workers.values())
        for t in workers:
            t.cancel()
        if workers:
            await asyncio.wait(workers, timeout=KILL_WAIT_S + 1)

    def _kick(self, sn: IPv4Network) -> None:
        """Make sure a worker converges this peer (one per subnet: its commands run in order)."""
        t = self._workers.get(sn)
        if t is None or t.done():
            t = asyncio.create_task(self._converge(sn), name=f"extension-{sn}")
            t.add_done_callback(_log_crash)
            self._workers[sn] = t

    def _wanted(self, sn: IPv4Network) -> tuple[Lease, str] | None:
        """The peer lease to have added for ``sn`` and its stdin text, or None (absent or skipped)."""
        lease = self.peers.get(sn)
        if lease is None:
            return None
        if lease.attrs.backend_type != self.type_name:
            self._skip_once(lease, "ignoring non-extension subnet", type=lease.attrs.backend_type)
            return None
        data = backend_data_text(lease.attrs.backend_data)
        if data is None:
            self._skip_once(lease, "failed to unmarshal BackendData: not a JSON string",
                            backend_data_type=json_type(lease.attrs.backend_data))
            return None
        return lease, data

    def _skip_once(self, lease: Lease, msg: str, **kw: Any) -> None:
        if self._skipped.get(lease.subnet) != lease:
            self._skipped[lease.subnet] = lease
            log.warning(msg, subnet=str(lease.subnet), public_ip=str(lease.attrs.public_ip), **kw)

    def _converged(self, sn: IPv4Network) -> bool:
        wanted, have = self._wanted(sn), self._added.get(sn)
        return (wanted[0].attrs if wanted else None) == (have.attrs if have else None)

    async def _converge(self, sn: IPv4Network) -> None:
        """Run Remove/Add until what was added for ``sn`` is what is wanted, or a command fails
        (then the reconcile loop retries when the delay is over, or an event for ``sn`` comes)."""
        while True:
            wanted = self._wanted(sn)
            have = self._added.get(sn)
            if have is not None and (wanted is None or wanted[0].attrs != have.attrs):
                if not await self._run_peer_command("SubnetRemoveCommand", have, sn):
                    return
                self._added.pop(sn, None)
                continue
            if wanted is not None and have is None:
                if await self._run_peer_command("SubnetAddCommand", wanted[0], sn, wanted[1]):
                    self._added[sn] = wanted[0]
                    continue
                now = self._wanted(sn)
                if now is None or now[0].attrs != wanted[0].attrs:
                    continue  # the lease changed while its command ran: act on the new one now
                return
            self._retry.pop(sn, None)
            if sn not in self.peers:
                self._skipped.pop(sn, None)
            return

    async def _run_peer_command(self, key: str, lease: Lease, sn: IPv4Network, stdin: str | None = None) -> bool:
        """Run one subnet command for ``lease``; True when it succeeded (or there is none, or a
        failing Remove was given up). A failure schedules a retry."""
        if not self.commands[key]:
            return True
        if stdin is None:
            stdin = backend_data_text(lease.attrs.backend_data) or ""
        fields = {"command": key, "subnet": str(lease.subnet), "public_ip": str(lease.attrs.public_ip)}
        async with self._slots:
            res = await run_shell(self.commands[key], lease_env(lease), stdin, self.timeout_s)
        if res.ok:
            log.info("ran command", **fields, output=one_line(res.stdout, OUTPUT_LOG_CHARS))
            return True
        r = self._retry.get(sn) or _Retry(0, 0.0)
        r.attempts += 1
        if key == "SubnetRemoveCommand" and r.attempts >= REMOVE_ATTEMPTS:
            log.error("command failed; giving up", **fields, error=res.problem(), attempts=r.attempts)
            self._retry.pop(sn, None)
            return True
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (r.attempts - 1))
        r.next_at = time.monotonic() + delay
        self._retry[sn] = r
        log.error("command failed", **fields, error=res.problem(), attempt=r.attempts, retry_in=delay)
        return False
