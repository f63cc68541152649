"""Who may hold a connection to the TCP port: any local user may open one, only a client key keeps one.

The port holds at most a share of the engine's open files, so that it can never take the descriptors the
Unix sockets' clients need. A plain cap on its own hands those slots to whoever takes them first: a local
user with no key could open them all and keep them, sending a header line now and then (hypercorn's
timeouts are per read), and every key holder would be refused. So a connection is *unproven* until a
request on it carries a valid client key, and an unproven one
- is closed `FIRST_REQUEST_TIMEOUT` after it was accepted, and
- gives way, oldest first, when the port is full and another connection arrives.

A key holder's connection is never closed to make room: it keeps the ordinary keep-alive rules. A flood of
keyless connections can still delay a key holder by the time it takes to connect, never lock it out: its
connection is the newest, so the last to give way.
"""

from __future__ import annotations

import logging
from typing import Final

import attrs
import trio

from trio_mapper.engine.fronts.throttle import LogThrottle

log = logging.getLogger("trio_mapper.http")

#: Seconds a TCP connection has to send a request with a valid client key. A client sends its request as
#: soon as it has connected, over loopback: this only has to outlast a machine too busy to schedule it.
FIRST_REQUEST_TIMEOUT: Final = 10.0


@attrs.define(eq=False)
class TcpSlot:
    """One admitted TCP connection."""

    stream: trio.SocketStream
    deadline: float
    #: Whether it still counts against the limit (not once closed to make room or for its deadline).
    counted: bool = True


class TcpGate:
    """Admits TCP connections up to `limit`; run `close_expired` beside them."""

    def __init__(self, limit: int, *, first_request_timeout: float = FIRST_REQUEST_TIMEOUT) -> None:
        self.limit = limit
        self.first_request_timeout = first_request_timeout
        #: Connections counted against the limit.
        self.open = 0
        #: Unproven connections in the order they arrived, which is also the order of their deadlines.
        self._unproven: dict[TcpSlot, None] = {}
        self._arrival = trio.Event()
        self._made_room = LogThrottle()
        self._refused = LogThrottle()
        self._expired = LogThrottle()

    def admit(self, stream: trio.SocketStream) -> TcpSlot | None:
        """The new connection's slot, closing the oldest unproven one if the port is full; None if every
        connection has shown a key (the caller closes this one)."""
        if self.open >= self.limit:
            if not self._unproven:
                if (count := self._refused.count()) is not None:
                    log.warning(
                        "http (tcp): %d connection(s) closed unserved: %d TCP connections with a client key are "
                        "open, the most the engine allows (a quarter of its open-file limit; raise LimitNOFILE if "
                        "clients need more)",
                        count,
                        self.open,
                    )
                return None
            self._close(next(iter(self._unproven)))
            if (count := self._made_room.count()) is not None:
                log.warning(
                    "http (tcp): %d connection(s) that had sent no request with a client key closed to make room: "
                    "the port is full (%d connections, a quarter of the engine's open-file limit)",
                    count,
                    self.limit,
                )
        slot = TcpSlot(stream, trio.current_time() + self.first_request_timeout)
        self._unproven[slot] = None
        self.open += 1
        self._arrival.set()
        return slot

    def prove(self, slot: TcpSlot) -> None:
        """A request on this connection carried a valid client key: it stays, on keep-alive's terms."""
        self._unproven.pop(slot, None)

    def release(self, slot: TcpSlot) -> None:
        """The connection has ended."""
        self._unproven.pop(slot, None)
        if slot.counted:
            slot.counted = False
            self.open -= 1

    async def close_expired(self) -> None:
        """Close each unproven connection at its deadline, for ever."""
        while True:
            if not self._unproven:
                self._arrival = trio.Event()
                await self._arrival.wait()
                continue
            oldest = next(iter(self._unproven))
            if trio.current_time() < oldest.deadline:
                await trio.sleep_until(oldest.deadline)
                continue  # it may have shown a key meanwhile
            self._close(oldest)
            if (count := self._expired.count()) is not None:
                log.info(
                    "http (tcp): %d connection(s) closed: no request with a valid client key within %.0fs",
                    count,
                    self.first_request_timeout,
                )

    def _close(self, slot: TcpSlot) -> None:
        self.release(slot)
        # Closing the socket wakes its reader (hypercorn's) with ClosedResourceError, which ends the
        # connection as if the client had gone; the descriptor is free at once.
        slot.stream.socket.close()
