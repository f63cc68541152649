"""Background work: a worker thread below the event loop's priority (real threads, real syscalls)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import trio

from trio_mapper.engine.core.background import WORKER_NICENESS, run_in_background

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")


def niceness_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
async def test_the_work_runs_nicer_than_the_event_loop_which_keeps_its_priority() -> None:
    loop_before = niceness_of_this_thread()
    process = os.getpriority(os.PRIO_PROCESS, os.getpid())

    def work() -> tuple[int, int]:
        return threading.get_native_id(), niceness_of_this_thread()

    thread, niceness = await run_in_background(work, limiter=trio.CapacityLimiter(1))
    assert thread != threading.get_native_id()
    assert niceness == min(19, process + WORKER_NICENESS)
    assert niceness_of_this_thread() == loop_before
    # A reused thread is lowered once, not again on every call.
    assert (await run_in_background(work, limiter=trio.CapacityLimiter(1)))[1] == niceness


async def test_results_and_exceptions_come_back() -> None:
    limiter = trio.CapacityLimiter(1)
    assert await run_in_background(divmod, 7, 2, limiter=limiter) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        await run_in_background(divmod, 7, 0, limiter=limiter)
