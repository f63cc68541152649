"""The waiting line in front of a remote meter, with a scripted meter standing in for the store: who asks,
for whom, and what happens to grants whose waiters are gone."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio
import trio.testing

from trio_mapper.engine.budget.interface import Cost, LaneStatistics, Limits, Reservation
from trio_mapper.engine.budget.queue import RemoteWaitQueue


class ScriptedMeter:
    """Grants every cost it is asked for, once the test lets the call answer."""

    remote = True
    name = "lane"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.refunded: list[Reservation] = []
        #: The call that is out waits for this; each call has its own.
        self.gate = trio.Event()
        self.asked = trio.Event()
        self._listeners: list[Callable[[], None]] = []

    def check_admissible(self, cost: Cost) -> None:
        pass

    async def charge(self, costs: Sequence[Cost]) -> tuple[list[Reservation], float]:
        self.calls.append(len(costs))
        gate = self.gate = trio.Event()
        self.asked.set()
        await gate.wait()
        now = trio.current_time()
        return [Reservation(self.name, cost, now, cost.tokens) for cost in costs], now

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def refund(self, reservation: Reservation) -> bool:
        self.refunded.append(reservation)
        return True

    def settle(self, reservation: Reservation, *, prompt_tokens: int | None, snapshot: object) -> bool:
        return True

    def pause(self, wait: float | None, scope: str | None) -> None:
        pass

    def update_limits(self, limits: Limits) -> None:
        pass

    def at_rest(self) -> bool:
        return True

    def statistics(self) -> LaneStatistics:
        raise NotImplementedError


async def test_the_head_asks_for_the_waiters_behind_it_and_a_waiter_gone_meanwhile_gives_its_grant_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    meter = ScriptedMeter()
    queue = RemoteWaitQueue(meter)  # type: ignore[arg-type]
    got: dict[str, Reservation] = {}

    async def reserve(name: str, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            got[name] = await queue.reserve(Cost(tokens=10))

    leaving = trio.CancelScope()

    async with trio.open_nursery() as nursery:
        # The first head's call is out; b and c queue behind it.
        nursery.start_soon(reserve, "a")
        await meter.asked.wait()
        meter.asked = trio.Event()
        nursery.start_soon(reserve, "b")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reserve, "c", leaving)
        meter.gate.set()  # a is granted; b becomes the head and asks for b and c
        await meter.asked.wait()
        # c gives up while b's call (for b and c) is out.
        await trio.testing.wait_all_tasks_blocked()
        leaving.cancel()
        await trio.testing.wait_all_tasks_blocked()
        meter.gate.set()
    assert meter.calls[:2] == [1, 2]
    assert set(got) == {"a", "b"}
    # The grant made for c, who had left, went straight back.
    assert len(meter.refunded) == 1 and meter.refunded[0] is not got["b"]


class RefusingMeter(ScriptedMeter):
    """Answers at once; refuses every cost until ``opens_at``, saying so as its ready-at."""

    def __init__(self, opens_at: float) -> None:
        super().__init__()
        self.opens_at = opens_at

    async def charge(self, costs: Sequence[Cost]) -> tuple[list[Reservation], float]:
        self.calls.append(len(costs))
        assert len(self.calls) < 100, "asked again and again"
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        if now < self.opens_at:
            return [], self.opens_at
        return [Reservation(self.name, cost, now, cost.tokens) for cost in costs], now


async def test_a_refused_head_sleeps_until_its_ready_time_instead_of_asking_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reviewer's finding: the refused head woke itself and asked again at once, a thousand scripts a second
    per waiting lane on every engine, until Redis slowed past the budget's timeout."""
    meter = RefusingMeter(opens_at=trio.current_time() + 0.9)
    queue = RemoteWaitQueue(meter)  # type: ignore[arg-type]
    reservation = await queue.reserve(Cost(tokens=90))
    assert reservation.cost.tokens == 90
    assert meter.calls == [1, 1]  # refused once (ready in 0.9 s), then granted
