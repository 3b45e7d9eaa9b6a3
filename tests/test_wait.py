"""lab.wait.wait_for, the one way the lab and the tests wait (no root needed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from lab.wait import WaitTimeout, wait_for, wait_for_async, wait_timed


def test_returns_the_predicates_first_truthy_value():
    calls = []

    def pred():
        calls.append(1)
        return len(calls) >= 3 and {"subnet": "10.5.1.0/24"}

    assert wait_for(pred, 30, "three calls", interval=0.001) == {"subnet": "10.5.1.0/24"}
    assert len(calls) == 3


def test_elapsed_time_is_available():
    t0 = time.monotonic()
    value, elapsed = wait_timed(lambda: time.monotonic() - t0 >= 0.05 and "done", 30, "50 ms", interval=0.01)
    assert value == "done"
    assert 0.05 <= elapsed <= time.monotonic() - t0


def test_timeout_names_what_was_awaited_the_time_and_the_detail():
    with pytest.raises(WaitTimeout) as e:
        wait_for(lambda: [], 0.1, "h1's routes", interval=0.01, detail=lambda: {"10.5.2.0/24"})
    assert isinstance(e.value, AssertionError)  # pytest reports it as a failed check
    msg = str(e.value)
    assert msg.startswith("timed out after 0.1 s (limit 0.1 s) waiting for h1's routes: ")
    assert msg.endswith("{'10.5.2.0/24'}")
    assert e.value.what == "h1's routes" and 0.1 <= e.value.elapsed_s < 5


def test_the_predicate_is_called_at_the_deadline_too():
    t0 = time.monotonic()
    # true only from 0.2 s on; the interval (10 s) is longer than the timeout (0.2 s)
    assert wait_for(lambda: time.monotonic() - t0 >= 0.2, 0.2, "the deadline", interval=10)


def test_without_a_description_the_predicate_source_is_named():
    with pytest.raises(WaitTimeout, match=r"waiting for .*lambda: 1 == 2"):
        wait_for(lambda: 1 == 2, 0)


def test_an_exception_from_the_predicate_ends_the_wait_at_once():
    def pred():
        raise LookupError("the daemon exited")

    t0 = time.monotonic()
    with pytest.raises(LookupError, match="the daemon exited"):
        wait_for(pred, 30, "never")
    assert time.monotonic() - t0 < 30


def test_an_interval_passed_where_the_description_goes_is_refused():
    # the old tests/helpers.py order was (pred, timeout, interval, what)
    with pytest.raises(TypeError, match="describes the condition"):
        wait_for(lambda: True, 30, 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="describes the condition"):
        wait_for(lambda: True, 30, 0.1, "what")  # type: ignore[arg-type]


def test_the_async_variant_lets_the_loop_run_meanwhile():
    async def main():
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, done.set)
        assert await wait_for_async(done.is_set, 30, "the timer", interval=0.01)
        with pytest.raises(WaitTimeout, match="waiting for never"):
            await wait_for_async(lambda: None, 0.05, "never", interval=0.01)

    asyncio.run(main())


def test_an_interval_of_zero_polls_without_sleeping():
    calls = []
    assert wait_for(lambda: calls.append(1) or len(calls) == 3, 5, "three calls", interval=0)
