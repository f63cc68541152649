"""The local meter alone, without a queue: the `Meter` contract's atomic steps. Autojump clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_mapper.engine.budget.interface import Cost, Limits, Meter, RequestTooLarge, Reservation
from trio_mapper.engine.budget.local import DEFAULT_PAUSE, LocalMeter
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot


def _meter(rpm: int = 600, tpm: int = 60_000, *, mode: str = "bucket", name: str = "m") -> LocalMeter:
    # 10 requests and 1000 tokens per second; a fresh bucket holds one second of refill.
    return LocalMeter(name, Limits(rpm=rpm, tpm=tpm), period=60.0, mode=mode, origin=trio.current_time())  # type: ignore[arg-type]


def _granted(answer: Reservation | float) -> Reservation:
    assert isinstance(answer, Reservation), answer
    return answer


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        LocalMeter("m", Limits(rpm=1, tpm=1), period=60.0, mode="leaky", origin=0.0)  # type: ignore[arg-type]


async def test_try_charge_grants_or_says_when(autojump_clock: trio.testing.MockClock) -> None:
    meter: Meter = _meter()
    start = trio.current_time()
    reservation = _granted(meter.try_charge(Cost(600)))
    assert reservation.reserved_at == start
    assert reservation.charged_tokens == 600
    assert reservation.lane == "m"
    assert not reservation.settled
    before = meter.statistics()
    assert before.tokens_available == pytest.approx(400)
    assert before.in_flight == 1
    # 600 more do not fit: the answer is when they would (200 short at 1000 per second), and nothing is charged.
    assert meter.try_charge(Cost(600)) == pytest.approx(start + 0.2)
    assert meter.statistics() == before
    await trio.sleep(0.2)
    _granted(meter.try_charge(Cost(600)))
    # A cost bigger than the bucket is not refused for ever: ready once the bucket is full, then into debt.
    assert meter.try_charge(Cost(5000)) == pytest.approx(start + 1.2)


async def test_ready_at_while_paused_is_after_the_pause(autojump_clock: trio.testing.MockClock) -> None:
    meter = _meter()
    start = trio.current_time()
    meter.pause(5.0, "requests")
    # The requests bucket is empty when the pause ends; one request refills in 0.1 s.
    assert meter.try_charge(Cost(1)) == pytest.approx(start + 5.1)
    meter.pause(None, "tokens")  # a shorter pause does not shorten the one in force
    assert meter.statistics().paused_until == pytest.approx(start + 5.0)
    assert DEFAULT_PAUSE < 5.0
    await trio.sleep(5.1)
    _granted(meter.try_charge(Cost(1)))


async def test_try_charge_refuses_what_the_limits_in_force_cannot_admit(autojump_clock: trio.testing.MockClock) -> None:
    meter = _meter()
    with pytest.raises(RequestTooLarge):
        meter.try_charge(Cost(60_001))
    r = _granted(meter.try_charge(Cost(10)))
    meter.settle(r, prompt_tokens=None, snapshot=RateLimitSnapshot(limit_tokens=30_000))
    with pytest.raises(RequestTooLarge):
        meter.check_admissible(Cost(30_001))
    with pytest.raises(RequestTooLarge):
        meter.try_charge(Cost(30_001))


async def test_settling_is_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    meter = _meter()
    r = _granted(meter.try_charge(Cost(500)))
    assert meter.refund(r)
    assert r.settled
    after = meter.statistics()
    assert after.in_flight == 0
    assert after.tokens_available == pytest.approx(1000)
    # Again, either way: nothing changes and the meter says so.
    assert not meter.refund(r)
    assert not meter.settle(r, prompt_tokens=300, snapshot=RateLimitSnapshot(remaining_tokens=0))
    assert meter.statistics() == after
    s = _granted(meter.try_charge(Cost(500, prompt_tokens=400)))
    assert meter.settle(s, prompt_tokens=600, snapshot=None)
    assert meter.statistics().tokens_available == pytest.approx(300)  # 200 more prompt than estimated
    assert not meter.settle(s, prompt_tokens=600, snapshot=None)
    assert meter.statistics().tokens_available == pytest.approx(300)


async def test_a_reservation_of_another_meter_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    mine, other = _meter(name="a"), _meter(name="b")
    r = _granted(other.try_charge(Cost(1)))
    with pytest.raises(ValueError, match="lane 'b' given to lane 'a'"):
        mine.refund(r)
    forged = Reservation("a", Cost(1), trio.current_time(), 1)  # no mark of this meter's
    with pytest.raises(ValueError):
        mine.settle(forged, prompt_tokens=None, snapshot=None)
    assert other.statistics().in_flight == 1


@pytest.mark.parametrize("mode", ["bucket", "period"])
async def test_at_rest_is_the_meter_full_and_nothing_in_flight(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    meter = _meter(mode=mode)
    assert meter.at_rest()
    r = _granted(meter.try_charge(Cost(100)))
    assert not meter.at_rest()
    meter.settle(r, prompt_tokens=None, snapshot=None)
    assert not meter.at_rest()  # 100 tokens still spent
    await trio.sleep(60)
    assert meter.at_rest()
    stats = meter.statistics()
    assert stats.at_rest
    assert stats.waiters == 0  # a meter has no queue: the lane adds its own
