"""`ReceivingBytes`, the total of request bytes a front is receiving at once, and each client's share of it
(a quarter): taken at once or waited for in turn."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_mapper.engine.fronts.receiving import MIN_RECEIVING_BYTES, ReceivingBytes, receiving_limit


def test_the_total_is_sixteen_requests_and_at_least_64_mib() -> None:
    assert receiving_limit(1024) == MIN_RECEIVING_BYTES == 64 << 20
    assert receiving_limit(32 << 20) == 512 << 20


def test_try_hold_takes_what_fits_and_nothing_else() -> None:
    total = ReceivingBytes(400)
    assert [total.try_hold(100, client) for client in "abc"] == [True, True, True]
    assert not total.try_hold(101, "d")
    assert total.held == 300
    total.release(100, "a")
    assert total.try_hold(100, "d")


def test_one_client_holds_at_most_a_quarter_of_the_total() -> None:
    total = ReceivingBytes(400)
    assert total.client_limit == 100
    assert total.try_hold(60, "greedy")
    assert not total.try_hold(41, "greedy")
    assert total.try_hold(100, "other"), "the others' room is untouched"
    total.release(60, "greedy")
    assert total.try_hold(100, "greedy")


async def test_waiters_get_room_in_turn_as_it_is_released(autojump_clock: trio.testing.MockClock) -> None:
    total = ReceivingBytes(400)
    granted: list[str] = []

    async def hold(name: str, size: int) -> None:
        await total.hold(size, name)
        granted.append(name)

    for client in "abc":
        await total.hold(100, client)
    await total.hold(90, "d")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, "large", 95)
        await trio.sleep(1)
        nursery.start_soon(hold, "small", 10)  # it fits, but the large one waits ahead of it
        await trio.sleep(1)
        assert granted == [] and total.waiting == 2
        assert not total.try_hold(5, "e"), "nobody jumps the queue"
        total.release(90, "d")
        await trio.sleep(1)
        # Trio wakes tasks made runnable together in no set order, so the grants are released one at a time.
        assert granted == ["large"] and total.held == 395 and total.waiting == 1
        total.release(95, "large")
    assert granted == ["large", "small"]
    assert total.held == 310


async def test_a_client_waiting_for_its_own_share_does_not_hold_up_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The attack this answers: one client announcing large requests and never sending them kept every other
    client's large requests waiting, or refused."""
    total = ReceivingBytes(400)
    await total.hold(100, "stalling")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(total.hold, 100, "stalling")  # waits for its own share, however much room is left
        await trio.sleep(1)
        assert total.waiting == 1
        with trio.fail_after(1):
            await total.hold(100, "other")  # behind it in line, but not behind its share
        assert total.try_hold(100, "third")
        assert total.held == 300
        total.release(100, "stalling")
    assert total.held == 300 and total.waiting == 0


async def test_a_waiter_that_is_cancelled_leaves_its_place_to_the_next(autojump_clock: trio.testing.MockClock) -> None:
    total = ReceivingBytes(400)
    for client in "abc":
        await total.hold(100, client)
    await total.hold(50, "d")
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(5):
            await total.hold(80, "e")  # waits behind the 50, then gives up
        assert total.waiting == 0
        nursery.start_soon(total.hold, 50, "e")
    assert total.held == 400


async def test_room_granted_to_a_waiter_being_cancelled_is_given_back(autojump_clock: trio.testing.MockClock) -> None:
    total = ReceivingBytes(400)
    await total.hold(100, "a")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(total.hold, 100, "a")
            await trio.sleep(1)
            scope.cancel()  # the waiter's cancel is on its way ...
            total.release(100, "a")  # ... when the release grants it the room
    assert total.held == 0 and total.waiting == 0


async def test_a_request_larger_than_a_clients_share_is_refused() -> None:
    with pytest.raises(ValueError, match="can never fit in one client's share, 100"):
        await ReceivingBytes(400).hold(101, "a")
