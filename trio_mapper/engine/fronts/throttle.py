"""Log lines about something a client can make happen at will, written at most once per interval.

A refusal logged each time it happens lets any client flood the log (a keyless request to the TCP port, a
connection over the limit, an accept that fails for want of descriptors); one line per interval, with how
often it happened since the last, says as much.
"""

from __future__ import annotations

import math
from typing import Final

import trio

#: Seconds between two lines about the same thing.
LOG_INTERVAL: Final = 10.0


class LogThrottle:
    """Counts occurrences; `count` says when a line is due, and how many it covers."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._since_logged = 0
        self._logged_at = -math.inf

    def count(self) -> int | None:
        """Count one occurrence. Returns how many happened since the last line when a line is due, else None."""
        self._since_logged += 1
        now = trio.current_time()
        if now - self._logged_at < self.interval:
            return None
        covered, self._since_logged, self._logged_at = self._since_logged, 0, now
        return covered
