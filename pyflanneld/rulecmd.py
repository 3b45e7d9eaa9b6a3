"""Running the rule tools (iptables, iptables-restore, nft) without blocking the event loop.

The kernel adapter shared by :mod:`pyflanneld.iptables` and :mod:`pyflanneld.nftables`: one
asyncio subprocess per call, a timeout after which the tool is killed, and every failure turned
into a one-line :class:`RulesError` carrying the tool's stderr.
"""

from __future__ import annotations

import asyncio

from .oneline import one_line

CMD_TIMEOUT_S = 30.0


class RulesError(Exception):
    """A rule tool failed, timed out, or the rules cannot be installed at all; the message is one
    line naming the command and its stderr (or the cause and the fix)."""


async def run_command(argv: list[str], stdin: str | None = None, timeout_s: float = CMD_TIMEOUT_S) -> str:
    """Run ``argv`` (with ``stdin`` text if given) and return its stdout.

    Raises :class:`RulesError` on a non-zero exit (message: the first words of argv and the
    whitespace-collapsed stderr), on a timeout (the process is killed), or when argv[0] cannot be
    executed. A cancelled caller kills the process too.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise RulesError(f"{argv[0]}: {e.strerror or e}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None),
                                          timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RulesError(f"{argv[0]} timed out after {timeout_s:.0f}s") from None
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        msg = one_line(err.decode(errors="replace")) or f"exit status {proc.returncode}"
        raise RulesError(f"{' '.join(argv[:4])}: {msg}")
    return out.decode(errors="replace")
