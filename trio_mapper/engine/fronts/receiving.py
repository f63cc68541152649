"""Bytes of requests being received, across all of one front's connections, and the most allowed at once.

Each request is capped (``max_frame_bytes``), but without a total, every connection the engine accepts could
hold a request's worth of bytes while it trickles in. Each front keeps a total: the HTTP front refuses a body
that would exceed it (503 ``overloaded``: the reply names the request), the msgpack front cannot (a frame not
yet read has no id to answer), so there a connection waits, unread, until frames ahead of it are whole.

One client (a uid, a client key) may hold at most a quarter of the total: bytes trickled in, or frames
announced and never sent, hold their room for the request's whole 60 s allowance, again and again, and a
total alone let one client keep everyone else's large requests waiting (or refused) that long.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Final, final

import trio

from trio_mapper.engine.fronts.throttle import LogThrottle

#: The total is this many requests of the largest size, and at least `MIN_RECEIVING_BYTES`.
RECEIVING_REQUESTS: Final = 16
MIN_RECEIVING_BYTES: Final = 64 << 20
#: One client holds at most this fraction of the total: four requests of the largest size, at the least.
CLIENT_SHARE: Final = 4


def receiving_limit(max_request_bytes: int) -> int:
    """The total for a front whose requests are at most ``max_request_bytes``; never below one request."""
    return max(MIN_RECEIVING_BYTES, RECEIVING_REQUESTS * max_request_bytes)


@final
class ReceivingBytes:
    """A count of bytes held against ``limit``, and against ``limit / CLIENT_SHARE`` per client: taken at once
    (`try_hold`) or waited for in turn (`hold`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.client_limit = limit // CLIENT_SHARE
        self.held = 0
        #: What each client holds (clients holding nothing are not kept).
        self._held_by: dict[Hashable, int] = {}
        #: Who waits in `hold`, first come first served, with how much each asks for and for whom.
        self._waiting: collections.OrderedDict[trio.Event, tuple[int, Hashable]] = collections.OrderedDict()
        #: For the front to log the waits at most once per interval (a client can make them happen).
        self.waits = LogThrottle()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def try_hold(self, size: int, client: Hashable) -> bool:
        """Hold ``size`` bytes for ``client`` if they fit now, in the total and in the client's share, and
        nobody waits ahead for the total; False otherwise (nothing held)."""
        if not self._fits(size, client) or any(self._within_share(*waiter) for waiter in self._waiting.values()):
            return False
        self._take(size, client)
        return True

    async def hold(self, size: int, client: Hashable) -> None:
        """Hold ``size`` bytes (at most ``client_limit``) for ``client``, waiting until they fit: behind earlier
        callers for the total, and until the client's own earlier requests leave room in its share.

        No checkpoint when they fit at once: callers read their connection next, which is one.
        """
        if size > self.client_limit:
            raise ValueError(f"{size} bytes can never fit in one client's share, {self.client_limit}")
        granted = trio.Event()
        self._waiting[granted] = (size, client)
        self._grant()
        if granted.is_set():
            return
        try:
            await granted.wait()
        except BaseException:
            if self._waiting.pop(granted, None) is None:
                self.release(size, client)  # granted while the cancel was on its way: given straight back
            else:
                self._grant()  # a large request at the head may have kept smaller ones behind it waiting
            raise

    def release(self, size: int, client: Hashable) -> None:
        if not size:
            return
        self.held -= size
        if (left := self._held_by[client] - size) > 0:
            self._held_by[client] = left
        else:
            del self._held_by[client]
        self._grant()

    def _within_share(self, size: int, client: Hashable) -> bool:
        return self._held_by.get(client, 0) + size <= self.client_limit

    def _fits(self, size: int, client: Hashable) -> bool:
        return self.held + size <= self.limit and self._within_share(size, client)

    def _take(self, size: int, client: Hashable) -> None:
        self.held += size
        self._held_by[client] = self._held_by.get(client, 0) + size

    def _grant(self) -> None:
        """Grant waiters in turn while the total allows; one whose client's share is full lets those behind
        it go first (it waits for its own client, not for them)."""
        for granted, (size, client) in list(self._waiting.items()):
            if not self._within_share(size, client):
                continue
            if self.held + size > self.limit:
                return
            del self._waiting[granted]
            self._take(size, client)
            granted.set()
