"""CPU work that must not hold up the event loop: run in a worker thread that yields the CPU to the loop.

A worker thread alone takes the work off the loop's thread, but on a machine with few cores it still
competes with the loop for a core: measured with 4 MiB bodies flowing on two cores (bench/loop_stall.py,
docs/performance.md), the threads counting their tokens doubled the p99 latency of small requests on other
connections. Below the loop's priority, they take only the CPU the loop leaves, so every other connection's
replies, timers and new requests go first, and a large body waits a little longer for its count.

Linux sets a niceness per thread (its thread id); elsewhere the same call would lower the whole process, so
there the threads keep the process's priority.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Final, TypeVar

import trio

T = TypeVar("T")

#: How much nicer than the event loop's thread the worker threads are (niceness is capped at 19).
WORKER_NICENESS: Final = 10

_thread = threading.local()


async def run_in_background(function: Callable[..., T], *args: object, limiter: trio.CapacityLimiter) -> T:
    """``function(*args)`` in a worker thread below the event loop's priority; its result or its exception.

    ``limiter`` bounds how many such threads run at once (each is a core's worth of work).
    """
    return await trio.to_thread.run_sync(_below_the_loop, function, *args, limiter=limiter)


def _below_the_loop(function: Callable[..., T], *args: object) -> T:
    lower_this_threads_priority()
    return function(*args)


def lower_this_threads_priority() -> None:
    """Make the calling thread `WORKER_NICENESS` nicer than the process, once per thread (Linux only).

    Trio reuses its worker threads; a thread once lowered stays lowered, which is right for the engine's
    worker threads, all of them background work. Lowering needs no privilege; raising it back would.
    """
    if getattr(_thread, "lowered", False):
        return
    _thread.lowered = True
    if not sys.platform.startswith("linux"):
        return
    try:
        process_niceness = os.getpriority(os.PRIO_PROCESS, os.getpid())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, process_niceness + WORKER_NICENESS))
    except OSError:
        pass  # a sandbox that forbids it: the work still runs, at the loop's priority
