"""Bytes of replies the engine holds for clients that have not read them, across both fronts, and the most
allowed at once.

Each front bounds what one client may hold (the msgpack front its outbox, the HTTP front each write in time),
but clients that each stay under that could together hold the engine's memory: many slow readers, on either
front or on both. The engine keeps one total: every holder (a msgpack connection's unsent replies, an HTTP
write, an HTTP/2 reply waiting for the client's window) counts its bytes here, and when the total passes
`MAX_UNSENT_REPLY_BYTES` the largest holders are cut, whichever front they are on. Each front says how its
holders are cut (`UnsentReplies.holder`'s ``cut``): the msgpack front disconnects the client, the HTTP front
cuts the write (its connection closed) or resets the HTTP/2 stream.

A holder changes its count on every frame, so counting is two additions and a comparison; only a total over
the bound looks at the holders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, final

#: Bytes of unsent replies, on all connections of both fronts together, beyond which the largest holders are
#: cut. No setting exposes it; read when `UnsentReplies` is made (the daemon makes one for the engine's life).
MAX_UNSENT_REPLY_BYTES: Final = 1024 * 1024 * 1024

#: Told why a holder is cut; the front logs it with what it cuts, and frees the bytes (now or once the
#: connection's task unwinds), calling `UnsentHolder.release`.
Cut = Callable[[str], None]


@final
class UnsentHolder:
    """One holder's unsent bytes, counted in its `UnsentReplies`."""

    __slots__ = ("_cut", "_replies", "cut_called", "size")

    def __init__(self, replies: UnsentReplies, cut: Cut) -> None:
        self._replies = replies
        self._cut = cut
        self.size = 0
        #: Cut for the bound: its bytes are on their way out, and count no more when choosing whom to cut.
        self.cut_called = False

    def grow(self, size: int) -> None:
        """``size`` more bytes held; may cut this holder or another if the total passes the bound."""
        self.size += size
        replies = self._replies
        replies.total += size
        if replies.total > replies.max_bytes:
            replies._cut_largest()

    def shrink(self, size: int) -> None:
        """``size`` bytes sent (or dropped)."""
        self.size -= size
        self._replies.total -= size

    def release(self) -> None:
        """The holder is gone: its bytes count no more. Safe to call twice."""
        self._replies.total -= self.size
        self.size = 0
        self._replies._holders.discard(self)

    def cut(self, why: str) -> None:
        """Cut this holder by its front's means, once."""
        if not self.cut_called:
            self.cut_called = True
            self._cut(why)


@final
class UnsentReplies:
    """The unsent reply bytes of every holder, on both fronts, bounded engine-wide by cutting the largest."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = MAX_UNSENT_REPLY_BYTES if max_bytes is None else max_bytes
        self.total = 0
        self._holders: set[UnsentHolder] = set()

    def __repr__(self) -> str:
        return f"<UnsentReplies {self.total} of {self.max_bytes} bytes, {len(self._holders)} holders>"

    def holder(self, cut: Cut, size: int = 0) -> UnsentHolder:
        """A new holder of ``size`` bytes, which ``cut`` cuts (by its front's means) when the bound needs it."""
        holder = UnsentHolder(self, cut)
        self._holders.add(holder)
        if size:
            holder.grow(size)
        return holder

    def _cut_largest(self) -> None:
        """Over the bound: cut the largest holders until what the others hold fits. Holders already cut are
        not counted (their bytes are being freed), so one passing moment does not cut a second holder."""
        leaving = sum(holder.size for holder in self._holders if holder.cut_called)
        while self.total - leaving > self.max_bytes:
            staying = [holder for holder in self._holders if not holder.cut_called]
            largest = max(staying, key=lambda holder: holder.size, default=None)
            if largest is None or not largest.size:
                return  # never a client holding nothing
            leaving += largest.size
            largest.cut(
                f"clients on both fronts together have {self.total >> 20} MiB of replies unread, over the "
                f"{self.max_bytes >> 20} MiB the engine holds at most, and this one holds the most"
            )
