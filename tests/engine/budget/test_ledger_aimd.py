"""Learning the rate from 429s alone (AIMD), when the upstream sends no limit header: autojump clock."""

from __future__ import annotations

import itertools
import random

import attrs
import pytest
import trio
import trio.testing
from test_ledger import FakeUpstream, simulate

from trio_mapper.engine.budget import local as local_module
from trio_mapper.engine.budget.interface import Cost, LaneBudget, Limits, Reservation
from trio_mapper.engine.budget.ledger import Ledger
from trio_mapper.engine.budget.local import LocalMeter
from trio_mapper.engine.budget.queue import QueuedLaneBudget
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot

NO_HEADERS = RateLimitSnapshot()
FIRST = local_module.AIMD_DECREASE_ISOLATED  # a 429 after a quiet spell
AGAIN = local_module.AIMD_DECREASE  # one soon after a decrease


def _lane(rpm: int = 600, tpm: int = 60_000, *, mode: str = "bucket") -> LaneBudget:
    lane = Ledger(Limits(rpm=rpm, tpm=tpm), 60.0, mode=mode).lane("m")
    assert isinstance(lane, QueuedLaneBudget) and isinstance(lane.meter, LocalMeter)
    return lane


def _refused(lane: LaneBudget, reservation: Reservation, scope: str | None = "tokens", wait: float = 0.5) -> None:
    """What the scheduler does with a retryable 429: reconcile with the reply, then pause."""
    lane.reconcile(reservation, prompt_tokens=None, snapshot=NO_HEADERS)
    lane.pause(wait, scope)


async def test_429_without_limit_headers_lowers_the_pace_of_its_dimension(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lane = _lane(rpm=600, tpm=60_000)  # 1000 tokens per second
    _refused(lane, await lane.reserve(Cost(100)), "tokens")
    stats = lane.statistics()
    assert stats.learned_tpm == pytest.approx(60_000 * FIRST)
    assert stats.learned_rpm is None  # the 429 named tokens
    assert stats.rate_decreases == 1
    # The limits in force are unchanged (check_admissible and the status still show them); the pace is lower.
    assert stats.effective == Limits(rpm=600, tpm=60_000)
    lane.check_admissible(Cost(60_000))
    await trio.sleep(0.5)  # the pause: the bucket is empty when it ends
    start = trio.current_time()
    for _ in range(3):
        await lane.reserve(Cost(700))
    # 800 tokens a second now, not 1000.
    assert trio.current_time() - start == pytest.approx(3 * 700 / (60_000 * FIRST / 60))


async def test_one_overshoot_lowers_the_pace_once(autojump_clock: trio.testing.MockClock) -> None:
    lane = _lane(rpm=60_000, tpm=60_000_000)
    sent_together = [await lane.reserve(Cost(10)) for _ in range(5)]
    for reservation in sent_together:  # five 429s from one burst: one decrease
        _refused(lane, reservation)
    assert lane.statistics().rate_decreases == 1
    assert lane.statistics().learned_tpm == pytest.approx(60_000_000 * FIRST)
    await trio.sleep(1)
    # A request admitted after that decrease and still refused is new evidence: the pace is still too high,
    # and by much, since it came so soon.
    _refused(lane, await lane.reserve(Cost(10)))
    assert lane.statistics().rate_decreases == 2
    assert lane.statistics().learned_tpm == pytest.approx(60_000_000 * FIRST * AGAIN)
    for _ in range(20):  # clean replies, each of about two seconds at the pace: it grows 0.5 % per reply
        lane.reconcile(await lane.reserve(Cost(1_000_000)), prompt_tokens=None, snapshot=NO_HEADERS)
    grown = lane.statistics().learned_tpm
    assert grown > 60_000_000 * FIRST * AGAIN * (1 + local_module.REPEAT_GROWTH)
    # Refused once it had grown back: the top of a sawtooth, the shallower step again.
    _refused(lane, await lane.reserve(Cost(10)))
    assert lane.statistics().learned_tpm == pytest.approx(grown * FIRST)


async def test_limit_headers_keep_priority_over_429s(autojump_clock: trio.testing.MockClock) -> None:
    lane = _lane(rpm=1200, tpm=120_000)
    told = RateLimitSnapshot(limit_requests=600, limit_tokens=60_000, remaining_requests=5, remaining_tokens=500)
    lane.reconcile(await lane.reserve(Cost(100)), prompt_tokens=None, snapshot=told)
    r = await lane.reserve(Cost(100))
    lane.reconcile(r, prompt_tokens=None, snapshot=told)
    lane.pause(0.5, "tokens")
    stats = lane.statistics()
    assert stats.effective == Limits(rpm=600, tpm=60_000)  # from the headers
    assert stats.learned_tpm is None
    assert stats.rate_decreases == 0


async def test_pace_grows_back_with_clean_replies_never_above_the_configured_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lane = _lane(rpm=60_000, tpm=6_000)  # 100 tokens per second
    _refused(lane, await lane.reserve(Cost(10)))
    low = lane.statistics().learned_tpm
    assert low == pytest.approx(6_000 * FIRST)
    await trio.sleep(1000)  # time alone, without replies, teaches nothing
    assert lane.statistics().learned_tpm == low
    paces = [low]
    for _ in range(400):
        lane.reconcile(await lane.reserve(Cost(70)), prompt_tokens=None, snapshot=NO_HEADERS)  # clean replies
        paces.append(lane.statistics().learned_tpm)
    assert paces == sorted(paces)
    steps = [b - a for a, b in itertools.pairwise(paces)]
    # Never more than AIMD_INCREASE_PER_REPLY of the old peak per reply, and never above the configured limit.
    assert max(steps) <= local_module.AIMD_INCREASE_PER_REPLY * 6_000 + 1e-6
    assert paces[-1] == 6_000
    assert lane.statistics().rate_decreases == 1


async def test_a_429_takes_back_the_growth_its_own_reply_gave(autojump_clock: trio.testing.MockClock) -> None:
    lane = _lane(rpm=60_000, tpm=60_000)
    _refused(lane, await lane.reserve(Cost(10)))
    for _ in range(20):
        lane.reconcile(await lane.reserve(Cost(1000)), prompt_tokens=None, snapshot=NO_HEADERS)
    grown = lane.statistics().learned_tpm
    r = await lane.reserve(Cost(1000))
    lane.reconcile(r, prompt_tokens=None, snapshot=NO_HEADERS)
    assert lane.statistics().learned_tpm > grown  # a reply: it might have been clean
    lane.pause(0.1, "tokens")  # it was a 429
    assert lane.statistics().learned_tpm == pytest.approx(grown * FIRST)


async def test_429_naming_no_budget_lowers_the_one_that_ran_low(autojump_clock: trio.testing.MockClock) -> None:
    lane = _lane(rpm=600, tpm=60_000)
    r = await lane.reserve(Cost(900))  # the token bucket (1000) is nearly empty, requests (10) barely touched
    _refused(lane, r, scope=None)
    stats = lane.statistics()
    assert stats.learned_tpm == pytest.approx(60_000 * FIRST)
    assert stats.learned_rpm is None


async def test_pace_has_a_floor(autojump_clock: trio.testing.MockClock) -> None:
    lane = _lane(rpm=60_000, tpm=60_000)
    for _ in range(40):
        _refused(lane, await lane.reserve(Cost(1)))
        await trio.sleep(1)
    assert lane.statistics().learned_tpm == pytest.approx(local_module.AIMD_FLOOR * 60_000)
    assert lane.statistics().rate_decreases == 40


@pytest.mark.parametrize("wait", [True, False])
async def test_simulation_without_headers_converges_on_the_real_rate(
    autojump_clock: trio.testing.MockClock, wait: bool
) -> None:
    # tests/test_ledger.py's simulation, the upstream sending no header at all (and with `wait` False, no
    # wait on its 429s), the engine told twice its limits. Before the engine learned from 429s this drew
    # ~280 429s for 450 jobs.
    real = Limits(rpm=600, tpm=60_000)
    told = Limits(rpm=1200, tpm=120_000)
    result = await simulate(mode="bucket", configured=told, upstream=real, send_headers=False, send_wait=wait)
    print(result)
    assert result.stats.effective == told  # nothing told it otherwise
    assert result.rejections <= 0.05 * result.attempts
    assert result.efficiency >= 0.8
    assert result.stats.learned_tpm is not None
    assert 0.75 * real.tpm <= result.stats.learned_tpm <= 1.25 * real.tpm


async def test_simulation_with_exact_limits_and_no_headers_loses_little(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = Limits(rpm=600, tpm=60_000)
    result = await simulate(mode="bucket", configured=limits, upstream=limits, send_headers=False)
    print(result)
    assert result.rejections <= 0.02 * result.attempts
    assert result.efficiency >= 0.85


async def test_request_above_the_learned_pace_still_runs(autojump_clock: trio.testing.MockClock) -> None:
    lane = _lane(rpm=600, tpm=60_000)
    _refused(lane, await lane.reserve(Cost(100)))
    assert lane.statistics().learned_tpm == pytest.approx(48_000)
    # Within the limit the upstream may still allow; the learned pace only spaces admissions out.
    with trio.fail_after(120):
        await lane.reserve(Cost(55_000))
    assert lane.statistics().tokens_available < 0  # in debt, paid off at the learned pace


async def test_reload_keeps_the_learned_pace_under_the_new_limit(autojump_clock: trio.testing.MockClock) -> None:
    lane = _lane(rpm=600, tpm=60_000)
    _refused(lane, await lane.reserve(Cost(100)))
    lane.update_limits(Limits(rpm=600, tpm=120_000))
    assert lane.statistics().learned_tpm == pytest.approx(48_000)  # the upstream did not change
    lane.update_limits(Limits(rpm=600, tpm=30_000))
    assert lane.statistics().learned_tpm == pytest.approx(30_000)


@attrs.frozen
class JobResult:
    sends: int
    rejections: int
    #: The minimum time (tokens charged beyond the upstream's burst, over its rate) / the time taken.
    throughput: float
    learned_tpm: float | None


async def simulate_job(
    factor: float,
    *,
    requests: int = 560,
    rpm: int = 12_000,
    tpm: int = 240_000,
    burst: float = 1.0,
    concurrency: int = 64,
    send_wait: bool = True,
    seed: int = 1,
) -> JobResult:
    """bench/ratelimit.py's nohdr-second-* job without sockets: all requests at once, 171 tokens each,
    50-100 ms latency, against an upstream that sends no header, the engine told ``factor`` x its limits."""
    rng = random.Random(seed)
    lane = Ledger(Limits(rpm=int(rpm * factor), tpm=int(tpm * factor)), 60.0).lane("m")
    upstream = FakeUpstream(rpm, tpm, burst=burst, send_headers=False, send_wait=send_wait)
    limiter = trio.CapacityLimiter(concurrency)
    sends = rejections = 0

    async def job() -> None:
        nonlocal sends, rejections
        while True:
            reservation = await lane.reserve(Cost(171, prompt_tokens=71))
            async with limiter:
                sends += 1
                await trio.sleep(0.002)
                ok, snapshot, wait, scope = upstream.admit(171)
                await trio.sleep(rng.uniform(0.05, 0.1) if ok else 0.005)
            lane.reconcile(reservation, prompt_tokens=71 if ok else None, snapshot=snapshot)
            if ok:
                return
            rejections += 1
            lane.pause(wait, scope)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(requests):
            nursery.start_soon(job)
    minimum = max(0.0, requests * 171 - tpm / 60 * burst) / (tpm / 60)
    return JobResult(sends, rejections, minimum / (trio.current_time() - start), lane.statistics().learned_tpm)


@pytest.mark.parametrize(("factor", "send_wait"), [(2.0, True), (1.5, True), (2.0, False)])
async def test_job_simulation_meets_the_goals(
    autojump_clock: trio.testing.MockClock, factor: float, send_wait: bool
) -> None:
    # The goals for an upstream without headers: at most 5 % of sends refused, at least 85 % of the real rate.
    # Most of the 429s are the first burst: one second at the configured rate before any reply.
    results = [await simulate_job(factor, send_wait=send_wait, seed=seed) for seed in (1, 2, 3)]
    print(results)
    assert sum(r.rejections for r in results) <= 0.05 * sum(r.sends for r in results)
    assert min(r.throughput for r in results) >= 0.85
