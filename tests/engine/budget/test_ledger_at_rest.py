"""`LaneBudget.at_rest` and `Ledger.forget`: an evicted lane must not hand out budget the upstream still counts."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_mapper.engine.budget.interface import Cost, LaneBudget, Limits
from trio_mapper.engine.budget.ledger import Ledger
from trio_mapper.engine.budget.local import LocalMeter
from trio_mapper.engine.budget.queue import QueuedLaneBudget
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot


def _ledger(mode: str = "bucket", period: float = 60.0) -> Ledger:
    return Ledger(Limits(rpm=600, tpm=60_000), period, mode=mode)  # 10 requests, 1000 tokens per second


def _local(ledger: Ledger, name: str = "m") -> LaneBudget:
    lane = ledger.lane(name)
    assert isinstance(lane, QueuedLaneBudget) and isinstance(lane.meter, LocalMeter)
    return lane


@pytest.mark.parametrize("mode", ["bucket", "period"])
async def test_fresh_lane_is_at_rest(autojump_clock: trio.testing.MockClock, mode: str) -> None:
    lane = _local(_ledger(mode))
    assert lane.at_rest()
    assert lane.statistics().at_rest


async def test_spent_budget_is_not_at_rest_until_refilled(autojump_clock: trio.testing.MockClock) -> None:
    ledger = _ledger()
    lane = _local(ledger)
    r = await lane.reserve(Cost(800))
    assert not lane.at_rest()  # in flight
    lane.reconcile(r, prompt_tokens=None, snapshot=None)
    assert not lane.at_rest()  # nothing in flight, but 800 of the 1000-token bucket still spent
    assert not ledger.forget("m")
    assert ledger.lane("m") is lane  # kept: a fresh lane would start with a budget the upstream counts spent
    await trio.sleep(0.79)
    assert not lane.at_rest()
    await trio.sleep(0.02)
    assert lane.at_rest()
    assert ledger.forget("m")
    assert ledger.lane("m") is not lane


async def test_forget_keeps_a_lane_in_debt(autojump_clock: trio.testing.MockClock) -> None:
    ledger = _ledger()
    lane = _local(ledger)
    lane.reconcile(await lane.reserve(Cost(30_000)), prompt_tokens=None, snapshot=None)  # 29 s of debt
    await trio.sleep(20)
    assert not ledger.forget("m")
    # Had it been forgotten, a fresh lane would admit this at once; the kept one waits for the debt.
    start = trio.current_time()
    await ledger.lane("m").reserve(Cost(1000))
    assert trio.current_time() - start == pytest.approx(10.0)


async def test_paused_lane_is_not_at_rest(autojump_clock: trio.testing.MockClock) -> None:
    ledger = _ledger()
    lane = _local(ledger)
    lane.reconcile(
        await lane.reserve(Cost(1)),
        prompt_tokens=None,
        snapshot=RateLimitSnapshot(limit_requests=600, limit_tokens=60_000),  # so the 429 only pauses
    )
    await trio.sleep(5)
    assert lane.at_rest()
    lane.pause(30.0, "tokens")
    await trio.sleep(29)
    assert not lane.at_rest()
    assert not ledger.forget("m")
    await trio.sleep(1.5)  # the pause is over; the drained bucket needs one more second to refill
    assert not lane.at_rest()
    await trio.sleep(1)
    assert lane.at_rest()
    assert ledger.forget("m")


async def test_lane_with_waiters_is_not_at_rest(autojump_clock: trio.testing.MockClock) -> None:
    ledger = _ledger()
    lane = _local(ledger)
    lane.refund(await lane.reserve(Cost(1000)))
    assert lane.at_rest()
    lane.pause(10.0, None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.reserve, Cost(10))
        await trio.testing.wait_all_tasks_blocked()
        assert lane.statistics().waiters == 1
        assert not ledger.forget("m")
        nursery.cancel_scope.cancel()


async def test_period_lane_rests_once_its_window_is_untouched(autojump_clock: trio.testing.MockClock) -> None:
    ledger = _ledger("period", period=10.0)
    lane = _local(ledger)
    lane.reconcile(await lane.reserve(Cost(100)), prompt_tokens=None, snapshot=None)
    assert not lane.at_rest()
    await trio.sleep(10)
    assert lane.at_rest()


def test_forget_of_an_unknown_model_reports_it_gone() -> None:
    assert _ledger().forget("never-used")
