"""The one way the lab and the tests wait: poll a condition until it holds, or fail saying what.

    value = wait_for(lambda: d.subnet_env(), 20, "h1's subnet.env")          # pred's truthy value
    value, seconds = wait_timed(lambda: peers_of(h1) == want, 20, "h1 sees h2")
    wait_for(lambda: state(h) == want, 20, "h1's routes", detail=lambda: state(h))
    await wait_for_async(lambda: peer in backend.peers, 20, "the peer")     # in asyncio code

``pred`` is called at once and then every ``interval`` seconds until it returns something truthy;
that value is returned. After ``timeout`` seconds without it, :class:`WaitTimeout` (an
AssertionError, so pytest shows it as a failed check) says what was awaited, for how long, and
``detail()`` if given (a state dump or a log tail, computed only then). An exception raised by
``pred`` ends the wait at once: a lab wait raises LabError from its predicate when the process it
waits on has exited, instead of waiting out its timeout.

Timeouts are for correctness: make them generous (the machine may be loaded). How fast something
happens is measured by the benchmarks (``bench/``), not asserted by a test.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.05  # default interval between two calls of the predicate, in seconds


class WaitTimeout(AssertionError):
    """A condition did not hold in time. ``what`` names it, ``elapsed_s`` is the time waited."""

    def __init__(self, what: str, elapsed_s: float, timeout_s: float, detail: str = "") -> None:
        msg = f"timed out after {elapsed_s:.1f} s (limit {timeout_s:g} s) waiting for {what}"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.what, self.elapsed_s, self.timeout_s = what, elapsed_s, timeout_s


def describe(pred: Callable[[], object]) -> str:
    """A name for a predicate when the caller gave none: its source line, else its repr."""
    try:
        src = " ".join(inspect.getsource(pred).split())
    except (OSError, TypeError):
        return repr(pred)
    return src if len(src) <= 200 else src[:197] + "..."


class _Poll:
    """The state of one wait; ``step()`` calls the predicate once."""

    def __init__(self, pred: Callable[[], T], timeout: float, what: str | None, interval: float,
                 detail: Callable[[], object] | None) -> None:
        if (what is not None and not isinstance(what, str)) or isinstance(interval, str):
            raise TypeError(f"wait_for(pred, timeout, what, interval): `what` describes the condition (a str), "
                            f"got {what!r}; the poll interval comes after it (or as interval=)")
        self.pred, self.timeout, self.what, self.interval, self.detail = pred, timeout, what, interval, detail
        self.start = time.monotonic()

    def step(self) -> tuple[T, float, float | None]:
        """(pred's value, seconds waited so far, seconds to sleep before the next call or None: done)."""
        value = self.pred()
        elapsed = time.monotonic() - self.start
        if value:
            return value, elapsed, None
        if elapsed >= self.timeout:
            raise WaitTimeout(self.what or describe(self.pred), elapsed, self.timeout,
                              str(self.detail()) if self.detail else "")
        return value, elapsed, min(self.interval, self.timeout - elapsed)  # the last call comes at the deadline


def wait_timed(pred: Callable[[], T], timeout: float = 30.0, what: str | None = None, interval: float = POLL_S,
               *, detail: Callable[[], object] | None = None) -> tuple[T, float]:
    """Like :func:`wait_for`, and also the seconds it took: ``(value, elapsed_s)``."""
    poll = _Poll(pred, timeout, what, interval, detail)
    while True:
        value, elapsed, pause = poll.step()
        if pause is None:
            return value, elapsed
        time.sleep(pause)


def wait_for(pred: Callable[[], T], timeout: float = 30.0, what: str | None = None, interval: float = POLL_S,
             *, detail: Callable[[], object] | None = None) -> T:
    """Poll ``pred()`` every ``interval`` s until truthy and return that value; after ``timeout`` s
    raise :class:`WaitTimeout` naming ``what`` (default: the predicate's source) with ``detail()``."""
    return wait_timed(pred, timeout, what, interval, detail=detail)[0]


async def wait_for_async(pred: Callable[[], T], timeout: float = 30.0, what: str | None = None,
                         interval: float = POLL_S, *, detail: Callable[[], object] | None = None) -> T:
    """:func:`wait_for` inside asyncio code: the same, but the event loop runs between two calls."""
    poll = _Poll(pred, timeout, what, interval, detail)
    while True:
        value, _, pause = poll.step()
        if pause is None:
            return value
        await asyncio.sleep(pause)
