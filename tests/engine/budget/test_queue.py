"""The waiting queue and the lane it makes with a meter, over a fake meter: the queue needs nothing of the local one.

All on the autojump clock.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from trio_mapper.engine.budget.interface import (
    Cost,
    LaneStatistics,
    Limits,
    Meter,
    Mode,
    RequestTooLarge,
    Reservation,
    check_cost,
)
from trio_mapper.engine.budget.ledger import Ledger
from trio_mapper.engine.budget.queue import QueuedLaneBudget, WaitQueue
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot


class FakeMeter:
    """A `Meter` that grants one cost at each of the given times (trio's clock), whatever the cost.

    It records every cost it is asked about, and keeps no budget: what the queue does is all there is.
    """

    def __init__(self, grant_times: list[float], *, name: str = "fake", limit: int = 1000) -> None:
        self.name = name
        self.grant_times = sorted(grant_times)
        self.limit = limit
        self.asked: list[Cost] = []
        self.granted: list[Reservation] = []
        self.refunded: list[Reservation] = []
        self.settled: list[Reservation] = []
        self.paused = 0

    def __repr__(self) -> str:
        return f"<FakeMeter {self.name!r}>"

    def check_admissible(self, cost: Cost) -> None:
        check_cost(self.name, Limits(rpm=self.limit, tpm=self.limit), cost)

    def try_charge(self, cost: Cost) -> Reservation | float:
        self.check_admissible(cost)
        self.asked.append(cost)
        now = trio.current_time()
        if not self.grant_times:
            return math.inf
        if self.grant_times[0] > now:
            return self.grant_times[0]
        self.grant_times.pop(0)
        reservation = Reservation(self.name, cost, now, cost.tokens, mark=len(self.granted))
        self.granted.append(reservation)
        return reservation

    def _settle(self, reservation: Reservation, into: list[Reservation]) -> bool:
        if reservation.settled:
            return False
        reservation.settled = True
        into.append(reservation)
        return True

    def refund(self, reservation: Reservation) -> bool:
        return self._settle(reservation, self.refunded)

    def settle(
        self, reservation: Reservation, *, prompt_tokens: int | None, snapshot: RateLimitSnapshot | None
    ) -> bool:
        return self._settle(reservation, self.settled)

    def pause(self, wait: float | None, scope: str | None) -> None:
        self.paused += 1

    def update_limits(self, limits: Limits) -> None:
        self.limit = limits.tpm

    def in_flight(self) -> int:
        return len(self.granted) - len(self.refunded) - len(self.settled)

    def at_rest(self) -> bool:
        return self.in_flight() == 0

    def statistics(self) -> LaneStatistics:
        limits = Limits(rpm=self.limit, tpm=self.limit)
        return LaneStatistics(
            name=self.name,
            mode="fake",
            period=60.0,
            configured=limits,
            effective=limits,
            token_capacity=0.0,
            request_capacity=0.0,
            tokens_used=0.0,
            requests_used=0.0,
            tokens_available=0.0,
            requests_available=0.0,
            waiters=0,
            in_flight=self.in_flight(),
            paused_until=None,
            pause_remaining=0.0,
            pauses=self.paused,
            estimated_prompt_tokens=0,
            actual_prompt_tokens=0,
            correction=1.0,
            reservations=len(self.granted),
            refunds=len(self.refunded),
            reconciles=len(self.settled),
            at_rest=self.at_rest(),
        )


def _now() -> float:
    return trio.current_time()


async def _queue_up(queue: WaitQueue, costs: list[int], admitted: dict[int, float], nursery: trio.Nursery) -> None:
    """Start one task per cost, in order, each recording when the queue admitted it."""

    async def one(tokens: int) -> None:
        await queue.reserve(Cost(tokens))
        admitted[tokens] = _now()

    for tokens in costs:
        nursery.start_soon(one, tokens)
        await trio.testing.wait_all_tasks_blocked()


async def test_fast_path_charges_at_once_and_is_a_checkpoint(autojump_clock: trio.testing.MockClock) -> None:
    meter = FakeMeter([0.0])
    queue = WaitQueue(meter)
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.reserve(Cost(1))
    assert scope.cancelled_caught
    assert meter.asked == []  # cancelled before the meter was asked: nothing charged
    start = _now()
    reservation = await queue.reserve(Cost(1))
    assert _now() == start
    assert meter.granted == [reservation]


async def test_waiters_sleep_until_ready_at_and_go_in_order(autojump_clock: trio.testing.MockClock) -> None:
    start = _now()
    meter = FakeMeter([start + 5, start + 7, start + 7, start + 30])
    queue = WaitQueue(meter)
    admitted: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        await _queue_up(queue, [1, 2, 3, 4], admitted, nursery)
        assert len(queue) == 4
    # Nothing but the meter's ready-at times woke them: no refund, no other event.
    assert admitted == {1: start + 5, 2: start + 7, 3: start + 7, 4: start + 30}
    # Only the head is ever asked: the costs the meter saw come in queue order.
    order = [cost.tokens for cost in meter.asked]
    assert order == sorted(order)
    assert len(queue) == 0


async def test_cost_is_constant_per_admission(autojump_clock: trio.testing.MockClock) -> None:
    n = 1000
    start = _now()
    meter = FakeMeter([start + 1 + i for i in range(n)])
    queue = WaitQueue(meter)
    admitted: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        await _queue_up(queue, list(range(n)), admitted, nursery)
    assert [admitted[i] for i in range(n)] == [start + 1 + i for i in range(n)]
    assert len(meter.asked) <= 3 * n  # the head only, a bounded number of times each: never the whole line


async def test_changed_admits_what_now_fits_at_once(autojump_clock: trio.testing.MockClock) -> None:
    start = _now()
    meter = FakeMeter([start + 100, start + 100, start + 200])
    queue = WaitQueue(meter)
    admitted: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        await _queue_up(queue, [1, 2, 3], admitted, nursery)
        await trio.sleep(10)
        meter.grant_times[:2] = [start + 10, start + 10]  # budget came back (a refund, say)
        queue.changed()
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == {1: start + 10, 2: start + 10}
    assert admitted[3] == start + 200


async def test_cancelled_head_leaves_and_the_next_asks(autojump_clock: trio.testing.MockClock) -> None:
    start = _now()
    meter = FakeMeter([start + 50, start + 60])
    queue = WaitQueue(meter)
    done: list[str] = []

    async def head(scope: trio.CancelScope) -> None:
        with scope:
            await queue.reserve(Cost(10))
            done.append("head")

    async def second() -> None:
        await queue.reserve(Cost(20))
        done.append(f"second at {_now() - start:g}")

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(head, scope)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.sleep(5)
        scope.cancel()
    assert done == ["second at 50"]
    assert [r.cost.tokens for r in meter.granted] == [20]
    assert meter.refunded == []


async def test_granted_while_cancelled_is_given_back(autojump_clock: trio.testing.MockClock) -> None:
    start = _now()
    meter = FakeMeter([start + 100, start + 100])
    queue = WaitQueue(meter)
    got: list[Reservation] = []

    async def waiter(scope: trio.CancelScope) -> None:
        with scope:
            got.append(await queue.reserve(Cost(10)))

    async def second() -> None:
        got.append(await queue.reserve(Cost(20)))

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, scope)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        # In one step: the cancellation is on its way, then budget comes back and the pump grants the head.
        scope.cancel()
        meter.grant_times[:1] = [start]
        queue.changed()
        assert [r.cost.tokens for r in meter.granted] == [10]
    assert [r.cost.tokens for r in meter.refunded] == [10]  # handed straight back to the meter
    assert [r.cost.tokens for r in got] == [20]  # and the next waiter went on
    assert got[0].reserved_at == start + 100


async def test_waiter_too_large_for_lowered_limit_fails(autojump_clock: trio.testing.MockClock) -> None:
    start = _now()
    meter = FakeMeter([start + 100, start + 100], limit=1000)
    queue = WaitQueue(meter)
    results: list[str] = []

    async def one(tokens: int) -> None:
        try:
            await queue.reserve(Cost(tokens))
            results.append(f"{tokens} at {_now() - start:g}")
        except RequestTooLarge:
            results.append(f"{tokens} too large at {_now() - start:g}")

    async with trio.open_nursery() as nursery:
        for tokens in (900, 10):
            nursery.start_soon(one, tokens)
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        meter.limit = 500
        queue.changed()
    assert results == ["900 too large at 1", "10 at 100"]
    with pytest.raises(RequestTooLarge):
        await queue.reserve(Cost(501))  # at once, without queueing


async def test_lane_forwards_to_the_meter_and_wakes_the_head(autojump_clock: trio.testing.MockClock) -> None:
    start = _now()
    meter = FakeMeter([start, start + 100])
    lane = QueuedLaneBudget(meter)
    assert lane.name == "fake"
    first = await lane.reserve(Cost(1))
    assert not lane.at_rest()  # in flight, as the meter says
    lane.reconcile(first, prompt_tokens=None, snapshot=None)
    assert meter.settled == [first]
    assert lane.at_rest()
    admitted: list[float] = []

    async def waiter() -> None:
        await lane.reserve(Cost(2))
        admitted.append(_now())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        stats = lane.statistics()
        assert stats.waiters == 1
        assert not stats.at_rest  # the meter is at rest, but someone waits
        assert not lane.at_rest()
        asked = len(meter.asked)
        lane.refund(first)  # settled already: the meter ignores it and nobody is woken
        lane.reconcile(first, prompt_tokens=5, snapshot=None)
        assert len(meter.asked) == asked
        assert meter.refunded == []
        lane.pause(1.0, "tokens")  # the meter changed: the head asks again
        await trio.testing.wait_all_tasks_blocked()
        assert meter.paused == 1
        assert len(meter.asked) > asked
        lane.update_limits(Limits(rpm=10, tpm=10))
        with pytest.raises(RequestTooLarge):
            lane.check_admissible(Cost(11))
    assert admitted == [start + 100]
    assert lane.statistics().waiters == 0


async def test_ledger_builds_lanes_from_its_meter_factory(autojump_clock: trio.testing.MockClock) -> None:
    made: list[tuple[str, Limits, float, str, float]] = []
    meters: dict[str, FakeMeter] = {}

    def factory(lane: str, limits: Limits, *, period: float, mode: Mode, origin: float) -> Meter:
        made.append((lane, limits, period, mode, origin))
        meters[lane] = FakeMeter([_now()], name=lane)
        return meters[lane]

    start = _now()
    ledger = Ledger(
        Limits(rpm=60, tpm=600), 30.0, per_model={"b": Limits(rpm=6, tpm=60)}, mode="period", meter_factory=factory
    )
    lane = ledger.lane("a")
    assert isinstance(lane, QueuedLaneBudget)
    assert lane.meter is meters["a"]
    assert ledger.lane("a") is lane
    await trio.sleep(1)
    ledger.lane("b")
    assert made == [
        ("a", Limits(rpm=60, tpm=600), 30.0, "period", start),
        ("b", Limits(rpm=6, tpm=60), 30.0, "period", start),  # windows align on the ledger's start
    ]
    reservation = await lane.reserve(Cost(5))
    assert not ledger.forget("a")  # the meter has it in flight
    lane.refund(reservation)
    assert ledger.forget("a")
    assert set(ledger.statistics()) == {"b"}
