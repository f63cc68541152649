"""Bytes of requests being received, across all of one front's connections, and the most allowed at once.

Each request is capped (``max_frame_bytes``), but without a total, every connection the engine accepts could
hold a request's worth of bytes while it trickles in. Each front keeps a total: the HTTP front refuses a body
that would exceed it (503 ``overloaded``: the reply names the request), the msgpack front cannot (a frame not
yet read has no id to answer), so there a connection waits, unread, until frames ahead of it are whole.
"""

from __future__ import annotations

import collections
from typing import Final, final

import trio

from trio_mapper.engine.fronts.throttle import LogThrottle

#: The total is this many requests of the largest size, and at least `MIN_RECEIVING_BYTES`.
RECEIVING_REQUESTS: Final = 16
MIN_RECEIVING_BYTES: Final = 64 << 20


def receiving_limit(max_request_bytes: int) -> int:
    """The total for a front whose requests are at most ``max_request_bytes``; never below one request."""
    return max(MIN_RECEIVING_BYTES, RECEIVING_REQUESTS * max_request_bytes)


@final
class ReceivingBytes:
    """A count of bytes held against ``limit``: taken at once (`try_hold`) or waited for in turn (`hold`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        #: Who waits in `hold`, first come first served, with how much each asks for.
        self._waiting: collections.OrderedDict[trio.Event, int] = collections.OrderedDict()
        #: For the front to log the waits at most once per interval (a client can make them happen).
        self.waits = LogThrottle()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def try_hold(self, size: int) -> bool:
        """Hold ``size`` bytes if they fit now and nobody waits ahead; False otherwise (nothing held)."""
        if self._waiting or self.held + size > self.limit:
            return False
        self.held += size
        return True

    async def hold(self, size: int) -> None:
        """Hold ``size`` bytes (at most ``limit``), waiting behind earlier callers until they fit.

        No checkpoint when they fit at once: callers read their connection next, which is one.
        """
        if size > self.limit:
            raise ValueError(f"{size} bytes can never fit in a total of {self.limit}")
        if self.try_hold(size):
            return
        granted = trio.Event()
        self._waiting[granted] = size
        try:
            await granted.wait()
        except BaseException:
            if self._waiting.pop(granted, None) is None:
                self.release(size)  # granted while the cancel was on its way: given straight back
            else:
                self._grant()  # a large request at the head may have kept smaller ones behind it waiting
            raise

    def release(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            granted, size = next(iter(self._waiting.items()))
            if self.held + size > self.limit:
                return
            del self._waiting[granted]
            self.held += size
            granted.set()
