"""`ReceivingBytes`, the total of request bytes a front is receiving at once: taken at once or waited for in turn."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_mapper.engine.fronts.receiving import MIN_RECEIVING_BYTES, ReceivingBytes, receiving_limit


def test_the_total_is_sixteen_requests_and_at_least_64_mib() -> None:
    assert receiving_limit(1024) == MIN_RECEIVING_BYTES == 64 << 20
    assert receiving_limit(32 << 20) == 512 << 20


def test_try_hold_takes_what_fits_and_nothing_else() -> None:
    total = ReceivingBytes(100)
    assert total.try_hold(60)
    assert not total.try_hold(41)
    assert total.held == 60
    total.release(60)
    assert total.try_hold(100)


async def test_waiters_get_room_in_turn_as_it_is_released(autojump_clock: trio.testing.MockClock) -> None:
    total = ReceivingBytes(100)
    granted: list[str] = []

    async def hold(name: str, size: int) -> None:
        await total.hold(size)
        granted.append(name)

    await total.hold(90)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "large", 95)
        await trio.sleep(1)
        nursery.start_soon(hold, "small", 10)  # it fits, but the large one waits ahead of it
        await trio.sleep(1)
        assert granted == [] and total.waiting == 2
        assert not total.try_hold(5), "nobody jumps the queue"
        total.release(90)
        await trio.sleep(1)
        # Trio wakes tasks made runnable together in no set order, so the grants are released one at a time.
        assert granted == ["large"] and total.held == 95 and total.waiting == 1
        total.release(95)
    assert granted == ["large", "small"]
    assert total.held == 10


async def test_a_waiter_that_is_cancelled_leaves_its_place_to_the_next(autojump_clock: trio.testing.MockClock) -> None:
    total = ReceivingBytes(100)
    await total.hold(50)
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(5):
            await total.hold(80)  # waits behind the 50, then gives up
        assert total.waiting == 0
        nursery.start_soon(total.hold, 50)
    assert total.held == 100


async def test_room_granted_to_a_waiter_being_cancelled_is_given_back(autojump_clock: trio.testing.MockClock) -> None:
    total = ReceivingBytes(100)
    await total.hold(100)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(total.hold, 100)
            await trio.sleep(1)
            scope.cancel()  # the waiter's cancel is on its way ...
            total.release(100)  # ... when the release grants it the room
    assert total.held == 0 and total.waiting == 0


async def test_a_request_larger_than_the_total_is_refused() -> None:
    with pytest.raises(ValueError, match="can never fit"):
        await ReceivingBytes(100).hold(101)
