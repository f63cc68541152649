"""`LogThrottle` alone, under autojump_clock (a unit test of one module)."""

from __future__ import annotations

import trio
import trio.testing

from trio_mapper.engine.fronts.throttle import LogThrottle


async def test_a_line_is_due_at_most_once_per_interval_and_covers_what_happened_since(
    autojump_clock: trio.testing.MockClock,
) -> None:
    throttle = LogThrottle(10.0)
    due = []
    for _ in range(25):  # one occurrence a second
        due.append(throttle.count())
        await trio.sleep(1)
    assert [(second, count) for second, count in enumerate(due) if count is not None] == [(0, 1), (10, 10), (20, 10)]
