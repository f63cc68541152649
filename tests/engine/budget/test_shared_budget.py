"""The shared budget (`budget/shared.py`, `shared_budget.lua`) against a real redis-server.

Several `SharedBudget` instances in one test stand for several engines on one API key: each has its own
engine id and its own Redis client. Redis's clock is real, so nothing here runs on the autojump clock: limits
are small, intervals short, and every timing is asserted with a tolerance, never exactly. What the store holds
is read with the fixture's own raw RESP client, not with the client under test.
"""

from __future__ import annotations

import gc
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from redis_fixtures import RedisServer, cuttable_link, redis_server, redis_server_path

from trio_mapper.engine.budget import shared
from trio_mapper.engine.budget.interface import Cost, LaneBudget, Limits, RequestTooLarge, Reservation
from trio_mapper.engine.budget.ledger import Ledger
from trio_mapper.engine.budget.shared import (
    FailurePolicy,
    SharedBudget,
    SharedBudgetSettings,
    SharedMeter,
    canonical_api,
    key_identity,
)
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot

API_KEY = "sk-shared-budget-test-key-that-must-never-reach-redis-0123456789"
BASE_URL = "http://upstream.invalid/v1"
KEY_ID = key_identity(API_KEY, BASE_URL)
MODEL = "gpt-4o-mini"
PERIOD = 60.0


@pytest.fixture
def redis_executable() -> str:
    # A synchronous fixture, so that a missing redis-server skips (or fails) at setup with its reason: raised
    # from an async fixture, pytest-trio's nursery would wrap it.
    return redis_server_path()


@pytest.fixture
async def redis(redis_executable: str) -> AsyncIterator[RedisServer]:
    async with redis_server() as server:
        yield server


@attrs.define
class Engine:
    budget: SharedBudget
    ledger: Ledger
    lane: LaneBudget

    @property
    def meter(self) -> SharedMeter:
        meter = self.lane.meter  # type: ignore[attr-defined]
        assert isinstance(meter, SharedMeter)
        return meter


@asynccontextmanager
async def engines(
    redis: RedisServer,
    count: int,
    limits: Limits | Sequence[Limits],
    *,
    policy: FailurePolicy = "wait",
    redis_timeout: float = 0.5,
    urls: Sequence[str] = (),
) -> AsyncIterator[list[Engine]]:
    """``count`` engines on one key, each with its budget's tasks running and a lane for `MODEL`; ``limits``
    are every engine's, or each engine's in turn; ``urls`` the Redis URL of the first engines (a
    `cuttable_link`'s), the others' is ``redis``'s."""
    settings = SharedBudgetSettings(url=redis.url, failure_policy=policy, timeout=redis_timeout)
    told = [limits] * count if isinstance(limits, Limits) else list(limits)
    async with trio.open_nursery() as nursery:
        made = []
        for index in range(count):
            url = urls[index] if index < len(urls) else redis.url
            budget = SharedBudget(attrs.evolve(settings, url=url), key_id=KEY_ID, rng=random.Random(index))
            await nursery.start(budget.run)
            ledger = Ledger(told[index], PERIOD, meter_factory=budget)
            made.append(Engine(budget, ledger, ledger.lane(MODEL)))
        try:
            yield made
        finally:
            nursery.cancel_scope.cancel()


async def redis_time(redis: RedisServer) -> float:
    seconds, micros = await redis.command("TIME")
    return int(seconds) + int(micros) / 1e6


async def lane_state(redis: RedisServer, engine: Engine) -> dict[str, str]:
    raw = await redis.command("HGETALL", engine.budget.keys(MODEL)[0])
    return {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}


async def in_flight(redis: RedisServer, engine: Engine) -> tuple[int, int]:
    """(reservations, expiry entries) the store holds for the lane."""
    _, reservations, expiry, _ = engine.budget.keys(MODEL)
    return await redis.command("HLEN", reservations), await redis.command("ZCARD", expiry)


async def sent(budget: SharedBudget, calls_before: int) -> None:
    """Wait until what this process queued (refunds, settlements, pauses) reached the store: the settler
    sends them in the background, together, and a test must not read the store before they arrived."""
    with trio.fail_after(5):
        while budget.pending or budget.calls <= calls_before:  # noqa: ASYNC110 - the settler sets no event here
            await trio.sleep(0.01)


#: The script's operations that travel queued, as one word list of an ``apply`` call.
QUEUED_OPERATIONS = frozenset({"refund", "settle", "pause", "withdraw"})


async def script(engine: Engine, limits: Limits, op: str, *args: str | int | float) -> list[str]:
    """One direct run of the lane script, as the engine would send it (a retried call, say): its answer.

    ``refund``, ``settle``, ``pause`` and ``withdraw`` travel as the engine queues them (one queued operation of an
    ``apply`` call, answering ``done`` or ``settled``); ``charge`` takes ``TTL ID TOKENS REQUESTS``."""
    head: list[str | int | float] = [
        "apply" if op in QUEUED_OPERATIONS else op,
        limits.rpm,
        limits.tpm,
        PERIOD,
        engine.budget.engine_id,
        shared.IDLE_EXPIRY,
        engine.budget.reserved,
    ]
    if op in QUEUED_OPERATIONS:
        words = " ".join(str(arg) if arg != "" else "-" for arg in (op, *args))
        call = [*head, 1, words]
    else:
        call = [*head, 0, *args]
    reply = await engine.budget.call(engine.budget.keys(MODEL), call)
    return [item.decode() if isinstance(item, bytes) else str(item) for item in reply][12:]


#: The script stores its timestamps with Lua's ``tostring``, 14 significant digits: about 0.1 ms for a Redis
#: time near 1.7e9 s. A level rebuilt from two stored timestamps is exact to that much refill.
TS_RESOLUTION = 1e-4


def refilled(
    before: dict[str, str], after: dict[str, str], dim: str, per_second: float, capacity: float, change: float = 0.0
) -> Any:
    """The level ``after`` should hold: ``before``'s, refilled up to ``after``'s time (Redis's own clock), then
    ``change`` (a credit, or a charge when negative), never above ``capacity``; as a `pytest.approx` within
    what the stored timestamps' resolution allows."""
    level, ts = float(before[f"level_{dim}"]), float(before[f"ts_{dim}"])
    expected = min(capacity, level + max(0.0, float(after[f"ts_{dim}"]) - ts) * per_second)
    expected = min(capacity, expected + change)
    return pytest.approx(expected, abs=2 * TS_RESOLUTION * per_second + 1e-6)


async def grants_within(seconds: float, group: Sequence[Engine], tasks_per_engine: int) -> int:
    """How many reservations ``tasks_per_engine`` tasks on each engine of ``group`` are granted in ``seconds``,
    each task asking again as soon as it was granted (and settling at once)."""
    granted = 0

    async def reserver(engine: Engine) -> None:
        nonlocal granted
        while True:
            reservation = await engine.lane.reserve(Cost(tokens=1))
            granted += 1
            engine.lane.reconcile(reservation, prompt_tokens=None, snapshot=None)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for engine in group:
                for _ in range(tasks_per_engine):
                    nursery.start_soon(reserver, engine)
    return granted


def mark_id(reservation: Reservation) -> str:
    return reservation.mark.id  # type: ignore[attr-defined]


# --- atomicity -------------------------------------------------------------------------------------------------


def test_engines_that_spell_one_api_differently_share_its_budget() -> None:
    same = [
        "http://127.0.0.1:18001/v1",
        "http://127.0.0.1:18001/v1/",
        "HTTP://127.0.0.1:18001/v1",
        "http://127.0.0.1:18001/v1/../v1",
        " http://127.0.0.1:18001/v1 ",
    ]
    assert len({key_identity(API_KEY, url) for url in same}) == 1
    assert key_identity(API_KEY, "https://api.openai.com:443/v1/") == key_identity(API_KEY, "https://API.openai.com/v1")
    others = ["http://127.0.0.1:18002/v1", "http://127.0.0.1:18001/v2", "https://127.0.0.1:18001/v1"]
    assert len({key_identity(API_KEY, url) for url in [same[0], *others]}) == 4
    assert key_identity(API_KEY, same[0]) != key_identity(API_KEY + "x", same[0])
    assert canonical_api("http://[::1]:8000/v1/") == "http://[::1]:8000/v1"


async def test_concurrent_engines_never_grant_more_than_the_limit(redis: RedisServer) -> None:
    """3 engines x 8 reservers on one lane: what they are granted together over the run stays within the
    burst plus the refill over Redis's own measure of the interval, in both dimensions, and every grant the
    store made reached exactly one reserver."""
    limits = Limits(rpm=600, tpm=1800)  # 10 requests / 30 tokens a second; a cold lane holds one second
    rates = {"requests": limits.rpm / 60, "tokens": limits.tpm / 60}
    grants: list[tuple[float, int, Reservation]] = []
    rng = random.Random(7)
    async with engines(redis, 3, limits) as group:
        start_redis = await redis_time(redis)
        start = trio.current_time()

        async def reserver(index: int, engine: Engine) -> None:
            while True:
                reservation = await engine.lane.reserve(Cost(tokens=rng.randint(1, 5)))
                grants.append((trio.current_time(), index, reservation))
                engine.lane.reconcile(reservation, prompt_tokens=None, snapshot=None)

        with trio.move_on_after(2.0):
            async with trio.open_nursery() as nursery:
                for index, engine in enumerate(group):
                    for _ in range(8):
                        nursery.start_soon(reserver, index, engine)
        elapsed = await redis_time(redis) - start_redis
        assert elapsed == pytest.approx(trio.current_time() - start, abs=0.2)

        granted = {"requests": len(grants), "tokens": sum(r.cost.tokens for _, _, r in grants)}
        for dim, rate in rates.items():
            allowed = rate * 1.0 + rate * elapsed  # the cold burst, then the refill
            assert granted[dim] <= allowed + 1, (dim, granted, allowed, elapsed)
            assert granted[dim] >= 0.5 * allowed, f"the lane stalled: {granted} of {allowed} {dim}"
        # Any stretch between two grants, by this process's clock (receipt adds a little slack).
        times = sorted(at for at, _, _ in grants)
        for i, first in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= rates["requests"] * (1.0 + times[j] - first + 0.05) + 1, (first, times[j])

        # Not lost, not doubled: one reservation per grant the store counted, each id once, all settled.
        ids = [mark_id(r) for _, _, r in grants]
        assert len(set(ids)) == len(ids)
        assert sum(e.lane.statistics().reservations for e in group) == len(grants)
        assert int((await lane_state(redis, group[0]))["seq"]) == len(grants)
        assert all(any(index == i for _, index, _ in grants) for i in range(3)), "an engine was starved"
        with trio.fail_after(5):  # the settlements are on their way in the background
            while await in_flight(redis, group[0]) != (0, 0):  # noqa: ASYNC110 - another process: only the clock
                await trio.sleep(0.02)
        assert all(e.lane.statistics().in_flight == 0 for e in group)


async def test_requests_waiting_for_the_budget_ask_redis_when_it_may_have_room_not_in_a_loop(
    redis: RedisServer,
) -> None:
    """A reviewer's finding: a refused head woke itself and asked again at once, so an engine whose lane was
    saturated ran a thousand scripts a second (5,010 for 5 answers), enough to slow Redis past the budget's
    timeout. Now it sleeps until the ready-at Redis answered, or until something frees budget."""
    limits = Limits(rpm=60, tpm=1_000_000)  # a request a second, after the burst of one
    async with engines(redis, 1, limits) as (engine,):
        calls = engine.budget.calls
        granted = await grants_within(3.0, [engine], tasks_per_engine=20)
        made = engine.budget.calls - calls
    assert 2 <= granted <= 5
    # A grant, its settlement, a refusal, a heartbeat: a few calls a second, not a thousand.
    assert made <= 30, made  # 6 here; 2,901 before


async def test_engines_told_different_limits_keep_to_the_lowest(redis: RedisServer) -> None:
    """A reviewer's finding: each call refilled the lane at its own engine's limits, so an engine told 6000
    rpm beside one told 600 took 6.16x what 600 allows. The lowest limit an engine on the key was told holds
    for all of them."""
    low, high = Limits(rpm=600, tpm=600_000), Limits(rpm=6000, tpm=6_000_000)
    async with engines(redis, 2, [low, high]) as group:
        for engine in group:  # each engine's limits are known to the lane once it called
            engine.lane.refund(await engine.lane.reserve(Cost(tokens=1)))
        start_redis = await redis_time(redis)
        granted = await grants_within(2.0, group, tasks_per_engine=8)
        elapsed = await redis_time(redis) - start_redis
        assert group[1].lane.statistics().effective.rpm == low.rpm  # what the high engine shows, too
    allowed = low.rpm / 60 * (1.0 + elapsed)  # a cold lane's second of burst, then the refill
    assert granted <= allowed + 2, (granted, allowed)


# --- idempotent true-ups -------------------------------------------------------------------------------------


async def test_a_flood_on_one_engine_cannot_starve_a_big_request_on_another(redis: RedisServer) -> None:
    # 100 tokens a second, one second of burst. Engine A's flood of small requests alone would keep the level
    # below 90 for ever; B's refused head leaves a claim that A must leave room for.
    limits = Limits(rpm=60_000, tpm=6_000)
    async with engines(redis, 2, limits) as (a, b):
        stop = trio.Event()

        async def flood() -> None:
            while not stop.is_set():
                reservation = await a.lane.reserve(Cost(tokens=10, prompt_tokens=5))
                a.lane.reconcile(reservation, prompt_tokens=5, snapshot=None)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(flood)
            await trio.sleep(0.5)  # the flood has the lane
            started = trio.current_time()
            with trio.fail_after(5):
                await b.lane.reserve(Cost(tokens=90, prompt_tokens=50))
            waited = trio.current_time() - started
            stop.set()
        # 90 tokens take 0.9 s of refill; the claim's grace adds at most a little.
        assert waited < 3.0, waited


async def test_a_refund_or_settlement_applies_once_however_often_it_is_sent(redis: RedisServer) -> None:
    limits = Limits(rpm=600, tpm=6000)  # 100 tokens a second; the cold bucket holds 100
    rate, capacity = limits.tpm / 60, limits.tpm / 60
    async with engines(redis, 1, limits) as (engine,):
        meter, budget = engine.meter, engine.budget
        first = await engine.lane.reserve(Cost(tokens=60, prompt_tokens=60))
        second = await engine.lane.reserve(Cost(tokens=40, prompt_tokens=40))
        assert await in_flight(redis, engine) == (2, 2)

        # Through the meter: the second refund and a settlement after it are refused in this process.
        calls = budget.calls
        before = await lane_state(redis, engine)
        assert meter.refund(first) is True
        assert meter.refund(first) is False
        assert meter.settle(first, prompt_tokens=10, snapshot=None) is False
        await sent(budget, calls)
        after = await lane_state(redis, engine)
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity, 60)
        assert await in_flight(redis, engine) == (1, 1)

        # The same refund sent again, as a call retried after a lost reply: the store ignores it.
        before = after
        assert (await script(engine, limits, "refund", mark_id(first)))[0] == "settled"
        after = await lane_state(redis, engine)
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity)

        # A settlement that charges 30 more (usage above the estimate), then the same call again directly.
        calls = budget.calls
        before = await lane_state(redis, engine)
        assert meter.settle(second, prompt_tokens=70, snapshot=None) is True
        await sent(budget, calls)
        after = await lane_state(redis, engine)
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity, -30)
        before = after
        retried = await script(
            engine, limits, "settle", mark_id(second), 30, "", "", "", "", 0, 0, 0, 0, 0, 0, 1
        )  # fmt: skip
        assert retried[0] == "settled"
        assert (await script(engine, limits, "refund", mark_id(second)))[0] == "settled"
        after = await lane_state(redis, engine)
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity)
        assert await in_flight(redis, engine) == (0, 0)

        # Both calls direct, the first one applied: a reservation credited once.
        third = await engine.lane.reserve(Cost(tokens=50))
        before = await lane_state(redis, engine)
        assert (await script(engine, limits, "refund", mark_id(third)))[0] == "done"
        middle = await lane_state(redis, engine)
        assert float(middle["level_t"]) == refilled(before, middle, "t", rate, capacity, 50)
        assert (await script(engine, limits, "refund", mark_id(third)))[0] == "settled"
        calls = budget.calls
        assert meter.refund(third) is True  # this process did not know: the store still credits nothing
        await sent(budget, calls)
        after = await lane_state(redis, engine)
        assert float(after["level_t"]) == refilled(middle, after, "t", rate, capacity)

        stats = engine.lane.statistics()
        assert (stats.refunds, stats.reconciles, stats.in_flight) == (2, 1, 0)


async def test_an_expired_reservation_is_purged_without_credit(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "RESERVATION_TTL", 0.3)
    limits = Limits(rpm=600, tpm=6000)
    rate, capacity = limits.tpm / 60, limits.tpm / 60
    async with engines(redis, 1, limits) as (engine,):
        reservation = await engine.lane.reserve(Cost(tokens=100))  # the whole cold bucket
        before = await lane_state(redis, engine)
        assert await in_flight(redis, engine) == (1, 1)
        await trio.sleep(0.5)  # Redis's clock: nothing to wait on but real time

        answer = await script(engine, limits, "peek")
        assert answer == []
        after = await lane_state(redis, engine)
        assert await in_flight(redis, engine) == (0, 0)
        assert engine.meter.statistics().in_flight == 1  # this process still waits for its reply
        # Only the refill (about 50 tokens by now); a credit would have filled the bucket.
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity)
        assert float(after["level_t"]) < capacity - 10

        # The reply comes at last: settling it changes nothing in the store.
        calls = engine.budget.calls
        engine.lane.reconcile(
            reservation, prompt_tokens=None, snapshot=RateLimitSnapshot(remaining_tokens=0, remaining_requests=0)
        )
        await sent(engine.budget, calls)
        before, after = after, await lane_state(redis, engine)
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity)
        assert float(after["level_r"]) == refilled(before, after, "r", 10, 10)
        assert (await script(engine, limits, "refund", mark_id(reservation)))[0] == "settled"
        assert engine.meter.statistics().in_flight == 0

        # The script's own ttl argument: a reservation charged directly with a short life expires alike.
        granted = await script(engine, limits, "charge", 0.1, "direct:1", 5, 1)
        assert granted[0] == "1"  # one of one granted
        await trio.sleep(0.2)
        await script(engine, limits, "peek")
        assert await in_flight(redis, engine) == (0, 0)
        assert (await script(engine, limits, "settle", "direct:1", -5, "", "", "", "", 0, 0, 0, 0, 0, 0, 1))[0] == (
            "settled"
        )


# --- what one engine learns, every engine knows --------------------------------------------------------------


async def test_a_pause_through_one_engine_holds_the_others(redis: RedisServer) -> None:
    limits = Limits(rpm=600, tpm=60_000)
    pause = 0.6
    async with engines(redis, 2, limits) as (a, b):
        reservation = await a.lane.reserve(Cost(tokens=10))
        calls = a.budget.calls
        a.lane.reconcile(reservation, prompt_tokens=None, snapshot=None)
        paused_at = trio.current_time()
        a.lane.pause(pause, None)
        await sent(a.budget, calls)  # the settlement and the pause, in one call

        async def peek_while_waiting() -> None:
            await trio.sleep(0.1)
            stats = b.lane.statistics()
            assert stats.waiters == 1
            assert 0 < stats.pause_remaining <= pause
            assert stats.pauses == 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(peek_while_waiting)
            with trio.fail_after(pause + 2.0):
                await b.lane.reserve(Cost(tokens=10))
        waited = trio.current_time() - paused_at
        assert waited >= pause - 0.01
        assert b.lane.statistics().pauses == 1


async def test_lanes_the_ledger_drops_do_not_stay_with_the_shared_budget() -> None:
    """A reviewer's finding: each new model name's meter stayed in the budget's list after its lane was
    dropped (50,000 names: 68.8 MB, and 9.1 ms to read the pending count after every settling call)."""
    budget = SharedBudget(SharedBudgetSettings(url="redis://localhost:1/0"), key_id=KEY_ID)
    ledger = Ledger(Limits(rpm=600, tpm=60_000), PERIOD, meter_factory=budget)
    for index in range(2000):
        model = f"made-up-model-{index}"
        ledger.lane(model)
        assert ledger.forget(model)
    gc.collect()
    assert len(budget._meters) == 0
    assert budget.pending == 0


async def test_redis_clock_going_back_does_not_stall_the_lane(redis: RedisServer) -> None:
    """A reviewer's finding: after a failover to a Redis whose clock was 30 s behind, the stored times lay in
    the future, and the lane refilled nothing (0 grants in 5 s) until the clock caught up. A clock cannot be
    turned back here: the stored times are moved 30 s ahead instead, which is what the script then sees."""
    limits = Limits(rpm=600, tpm=60_000)
    async with engines(redis, 1, limits) as (engine,):
        calls = engine.budget.calls
        engine.lane.pause(1.0, None)  # a pause too, which must end by the new clock
        await sent(engine.budget, calls)
        state = await lane_state(redis, engine)
        shifted = [(name, str(float(state[name]) + 30.0)) for name in ("now", "ts_r", "ts_t", "paused_until")]
        await redis.command("HSET", engine.budget.keys(MODEL)[0], *[word for pair in shifted for word in pair])
        started = trio.current_time()
        with trio.fail_after(5):
            await engine.lane.reserve(Cost(tokens=10))
        # The time between the last call and the jump cannot be told from the jump, and is not counted: the
        # pause lasts that much longer (here its own second), not the 30 s.
        assert trio.current_time() - started < 3
        pause = await script(engine, limits, "pause", 1e9, "-", "-")
        assert pause[0] == "done"
        assert float((await lane_state(redis, engine))["paused_until"]) <= await redis_time(redis) + 120.5


async def test_a_pause_learned_from_redis_outlives_redis_forgetting_it(redis: RedisServer) -> None:
    """A reviewer's finding: after FLUSHALL (or a Redis restarted without its data) an engine held by another
    engine's pause was granted at once, 19 s before the pause's end, into the upstream's 429s."""
    limits = Limits(rpm=600, tpm=60_000)
    pause = 1.0
    async with engines(redis, 2, limits) as (a, b):
        calls = a.budget.calls
        a.lane.pause(pause, None)
        await sent(a.budget, calls)
        paused_at = trio.current_time()
        granted, ready_at = await b.meter.charge([Cost(tokens=10)])  # refused: b learns of the pause
        assert not granted and ready_at >= paused_at + pause - 0.1
        await redis.command("FLUSHALL")
        with trio.fail_after(pause + 2.0):
            await b.lane.reserve(Cost(tokens=10))
        assert trio.current_time() - paused_at >= pause - 0.05


async def test_a_lower_limit_header_seen_by_one_engine_is_in_force_on_every_engine(redis: RedisServer) -> None:
    limits = Limits(rpm=600, tpm=6000)
    async with engines(redis, 2, limits) as (a, b):
        warm = await b.lane.reserve(Cost(tokens=10))
        b.lane.refund(warm)
        assert b.lane.statistics().effective == limits

        reservation = await a.lane.reserve(Cost(tokens=10))
        calls = a.budget.calls
        a.lane.reconcile(reservation, prompt_tokens=None, snapshot=RateLimitSnapshot(limit_tokens=3000))
        await sent(a.budget, calls)
        assert a.lane.statistics().effective == Limits(rpm=600, tpm=3000)

        other = await b.lane.reserve(Cost(tokens=10))  # B's next call reads the store
        b.lane.refund(other)
        stats = b.lane.statistics()
        assert stats.effective == Limits(rpm=600, tpm=3000)
        assert stats.configured == limits
        assert stats.token_capacity <= 6000 / 60  # still the cold burst: the header only lowers
        with pytest.raises(RequestTooLarge):
            b.lane.check_admissible(Cost(tokens=4000))


async def test_a_cost_above_a_limit_lowered_elsewhere_is_refused_without_being_charged(
    redis: RedisServer,
) -> None:
    limits = Limits(rpm=600, tpm=6000)  # B believes 6000 TPM; A learns 600 from the upstream's headers
    async with engines(redis, 2, limits) as (a, b):
        reservation = await a.lane.reserve(Cost(tokens=10))
        calls = a.budget.calls
        a.lane.reconcile(reservation, prompt_tokens=None, snapshot=RateLimitSnapshot(limit_tokens=600))
        await sent(a.budget, calls)
        await trio.sleep(1.2)  # the bucket (100 tokens, now refilled at 10 a second) is full again

        b.lane.check_admissible(Cost(tokens=1000))  # B has not seen the header yet
        with pytest.raises(RequestTooLarge):
            await b.lane.reserve(Cost(tokens=1000))
        await trio.sleep(0.1)  # a refund, if one was sent, has arrived
        state = await lane_state(redis, b)
        assert await in_flight(redis, b) == (0, 0), "a reservation nobody will settle"
        assert float(state["level_t"]) >= 0, f"{state['level_t']} tokens: a debt for a request never sent"


# --- the store itself ---------------------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC16-XMODEM, what Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % 16384


def test_the_cluster_slot_computation() -> None:
    assert crc16(b"123456789") == 0x31C3
    assert key_slot("foo") == 12182  # CLUSTER KEYSLOT foo
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    # The first "{" and the first "}" after it; an empty tag hashes the whole key.
    assert key_slot("foo{bar}{zap}") == key_slot("bar")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % 16384


async def read_everything(redis: RedisServer) -> dict[bytes, list[bytes]]:
    """Every key of the server and what it holds: its value by type, and its DUMP (uncompressed)."""
    await redis.command("CONFIG", "SET", "rdbcompression", "no")  # DUMP then carries strings as they are
    keys: list[bytes] = []
    cursor = b"0"
    while True:
        cursor, batch = await redis.command("SCAN", cursor, "COUNT", 1000)
        keys.extend(batch)
        if cursor == b"0":
            break
    contents: dict[bytes, list[bytes]] = {}
    for key in keys:
        kind = await redis.command("TYPE", key)
        reads: dict[str, Sequence[Any]] = {
            "hash": ("HGETALL", key),
            "zset": ("ZRANGE", key, 0, -1, "WITHSCORES"),
            "string": ("GET", key),
            "list": ("LRANGE", key, 0, -1),
            "set": ("SMEMBERS", key),
        }
        assert kind in reads, f"{key!r} is a {kind}"
        value = await redis.command(*reads[kind])
        contents[key] = [*(value if isinstance(value, list) else [value]), await redis.command("DUMP", key)]
    return contents


async def test_the_api_key_never_reaches_redis_and_a_lane_keeps_to_one_slot(redis: RedisServer) -> None:
    limits = Limits(rpm=600, tpm=60_000)
    models = [MODEL, "text-embedding-3-small"]
    async with engines(redis, 2, limits) as group:
        for engine in group:
            for model in models:
                lane = engine.ledger.lane(model)
                kept = await lane.reserve(Cost(tokens=100, prompt_tokens=60))
                given_back = await lane.reserve(Cost(tokens=10))
                calls = engine.budget.calls
                lane.refund(given_back)
                lane.reconcile(
                    kept,
                    prompt_tokens=70,
                    snapshot=RateLimitSnapshot(
                        limit_requests=600, limit_tokens=50_000, remaining_requests=590, remaining_tokens=49_000
                    ),
                )
                await sent(engine.budget, calls)
                calls = engine.budget.calls
                lane.pause(0.01, "tokens")
                await sent(engine.budget, calls)
                await lane.reserve(Cost(tokens=5))  # one left in flight
        contents = await read_everything(redis)

        secret = API_KEY.encode()
        assert len(contents) >= 2 * 3 + 1, sorted(contents)  # two lanes' three keys, and the heartbeats
        for key, values in contents.items():
            assert secret not in key
            for value in values:
                assert value is None or secret not in value, key
            # Neither a fragment of the key long enough to mean something.
            assert secret[-24:] not in key and not any(v and secret[-24:] in v for v in values)
            assert key.startswith(b"trio-mapper:{" + KEY_ID.encode()), key

        budget = group[0].budget
        for model in models:
            lane_keys = budget.keys(model)
            # The claims hash exists only while some engine's head waits; the other three hold the lane.
            assert {k.encode() for k in lane_keys[:3]} <= set(contents)
            tags = {key[key.index("{") : key.index("}") + 1] for key in lane_keys}
            assert tags == {f"{{{KEY_ID}:{model}}}"}
            slots = {key_slot(key) for key in lane_keys}
            assert len(slots) == 1, (model, slots)
            coredis_utils = pytest.importorskip("coredis._utils")
            assert {coredis_utils.hash_slot(key.encode()) for key in lane_keys} == slots
        assert all(key.count(b"{") == 1 for key in contents)


# --- without Redis ------------------------------------------------------------------------------------------


@pytest.fixture
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats often enough that a test sees Redis come back (and the engines counted) in a fraction of a
    second instead of the production 2 s."""
    monkeypatch.setattr(shared, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "RECONNECT_INTERVAL", 0.1)
    # Scaled alike: silent after a few missed heartbeats; a cut-off engine's share starts soon after.
    monkeypatch.setattr(shared, "SILENT_AFTER", 0.3)
    monkeypatch.setattr(shared, "LOCAL_SHARE_DELAY", 0.3)


@pytest.mark.usefixtures("quick_reconnect")
async def test_wait_policy_holds_requests_until_redis_returns_and_a_restarted_redis_starts_cold(
    redis: RedisServer,
) -> None:
    limits = Limits(rpm=600, tpm=60_000)
    one_second = {"tokens": limits.tpm / 60, "requests": limits.rpm / 60}
    async with engines(redis, 1, limits, redis_timeout=0.3) as (engine,):
        reservation = await engine.lane.reserve(Cost(tokens=100))
        # A rested reply showing a big upstream burst: the lane's capacity grows well past one second.
        calls = engine.budget.calls
        engine.lane.reconcile(
            reservation, prompt_tokens=None, snapshot=RateLimitSnapshot(remaining_tokens=50_000, remaining_requests=500)
        )
        await sent(engine.budget, calls)
        assert engine.lane.statistics().token_capacity > 10 * one_second["tokens"]

        await redis.stop()
        granted = trio.Event()

        async def reserve() -> None:
            await engine.lane.reserve(Cost(tokens=100))
            granted.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reserve)
            await trio.sleep(0.8)
            assert not granted.is_set(), "granted while Redis was down, under the 'wait' policy"
            assert engine.budget.statistics()["state"] == "unreachable: holding requests"
            assert engine.lane.statistics().waiters == 1
            await redis.start()  # the same socket, every key lost
            with trio.fail_after(3):
                await granted.wait()
        assert engine.budget.statistics()["state"] == "ok"
        stats = engine.lane.statistics()
        # Cold: one second of refill at most, never the learned burst. (What is available is that second less
        # the 100 tokens just charged only until the next call refills them: 0.1 s later, on a busy machine.)
        assert stats.token_capacity <= one_second["tokens"] + 1e-6
        assert stats.request_capacity <= one_second["requests"] + 1e-6
        assert stats.tokens_available <= stats.token_capacity + 1e-6
        state = await lane_state(redis, engine)
        assert float(state["learned_t"]) == pytest.approx(one_second["tokens"])


async def test_wait_policy_notices_redis_back_within_the_reconnect_interval(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "HEARTBEAT_INTERVAL", 3.0)  # far longer than the reconnect interval: not what notices
    monkeypatch.setattr(shared, "RECONNECT_INTERVAL", 0.2)
    async with engines(redis, 1, Limits(rpm=600, tpm=60_000), redis_timeout=0.3) as (engine,):
        engine.lane.refund(await engine.lane.reserve(Cost(tokens=10)))
        await redis.stop()
        with trio.move_on_after(0.3):
            await engine.lane.reserve(Cost(tokens=10))
        assert engine.budget.statistics()["state"] == "unreachable: holding requests"
        await redis.start()
        back = trio.current_time()
        with trio.move_on_after(3 * shared.RECONNECT_INTERVAL + 0.5):
            await engine.lane.reserve(Cost(tokens=10))
        assert trio.current_time() - back < 3 * shared.RECONNECT_INTERVAL + 0.5, "held after Redis came back"


async def wait_for_engines(group: Sequence[Engine], count: int) -> None:
    with trio.fail_after(3):
        while any(engine.budget.engines != count for engine in group):  # noqa: ASYNC110 - heartbeats set no event
            await trio.sleep(0.02)


async def test_an_engine_that_stops_cleanly_stops_counting_at_once(redis: RedisServer) -> None:
    """Otherwise the others go on dividing by it (local share) until its heartbeat expires, 30 s later."""
    async with engines(redis, 2, Limits(rpm=1200, tpm=600_000)) as group:
        await wait_for_engines(group, 2)
        await group[1].budget.leave()
        await wait_for_engines(group[:1], 1)


@pytest.mark.usefixtures("quick_reconnect")
async def test_local_share_divides_the_limits_by_the_engines_seen(redis: RedisServer) -> None:
    limits = Limits(rpm=1200, tpm=600_000)  # 20 requests a second; each of 2 engines may take 10 locally
    async with engines(redis, 2, limits, policy="local-share", redis_timeout=0.3) as group:
        await wait_for_engines(group, 2)
        for engine in group:
            engine.lane.refund(await engine.lane.reserve(Cost(tokens=1)))
        await redis.stop()

        grants: dict[int, list[float]] = {0: [], 1: []}
        start = trio.current_time()

        async def reserver(index: int, engine: Engine) -> None:
            while True:
                reservation = await engine.lane.reserve(Cost(tokens=1))
                grants[index].append(trio.current_time() - start)
                engine.lane.reconcile(reservation, prompt_tokens=None, snapshot=None)

        with trio.move_on_after(1.0):
            async with trio.open_nursery() as nursery:
                for index, engine in enumerate(group):
                    for _ in range(4):
                        nursery.start_soon(reserver, index, engine)
        elapsed = trio.current_time() - start

        share = limits.rpm / 60 / 2  # requests a second for one engine
        for index, engine in enumerate(group):
            assert engine.budget.statistics()["state"] == "unreachable: local share 1/2"
            times = grants[index]
            assert times and times[0] < 0.5, "no local grant without Redis"
            # A cold local meter: one second of the share, then the share's refill; the full limits would
            # allow twice as much.
            assert share <= len(times) <= share + share * elapsed + 1, (index, len(times), elapsed)


async def test_engines_in_touch_with_redis_keep_room_for_one_cut_off_under_local_share(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer's finding: with one of three engines cut off from Redis (a partition), it spent its third
    locally while the other two spent the whole shared budget (1.47x the limits measured with two engines).
    Now the others keep its share for it, and it waits until they have before spending it."""
    monkeypatch.setattr(shared, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "RECONNECT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "SILENT_AFTER", 0.4)
    monkeypatch.setattr(shared, "LOCAL_SHARE_DELAY", 0.7)  # SILENT_AFTER, a heartbeat and margin, as in production
    limits = Limits(rpm=1200, tpm=6_000_000)  # 20 requests a second for the three together
    async with (
        cuttable_link(redis) as link,
        engines(redis, 3, limits, policy="local-share", redis_timeout=0.3, urls=[link.url]) as group,
    ):
        cut_off, *in_touch = group
        await wait_for_engines(group, 3)
        for engine in group:
            engine.lane.refund(await engine.lane.reserve(Cost(tokens=1)))
        link.cut()
        with trio.fail_after(5):
            while any(engine.budget.silent_sharers != 1 for engine in in_touch):  # noqa: ASYNC110 - heartbeats
                await trio.sleep(0.02)
        assert all(engine.budget.reserved == pytest.approx(1 / 3) for engine in in_touch)
        assert in_touch[0].budget.statistics()["kept_for_cut_off_engines"] == pytest.approx(1 / 3)

        grants: list[list[float]] = [[] for _ in group]
        start = trio.current_time()

        async def reserver(index: int) -> None:
            lane = group[index].lane
            while True:
                reservation = await lane.reserve(Cost(tokens=1))
                grants[index].append(trio.current_time() - start)
                lane.reconcile(reservation, prompt_tokens=None, snapshot=None)

        with trio.move_on_after(4.0):
            async with trio.open_nursery() as nursery:
                for index in range(len(group)):
                    for _ in range(4):
                        nursery.start_soon(reserver, index)
        assert cut_off.budget.statistics()["state"] == "unreachable: local share 1/3"
        # After the bursts (one second of refill each, drained at once by the eager reservers): the rate.
        steady = [sum(1 for at in times if at >= 1.5) for times in grants]
        rate = sum(steady) / 2.5
        assert rate <= limits.rpm / 60 * 1.12, (steady, rate)  # without the room kept: 20 + 6.7 a second
        assert steady[0] >= 0.7 * (limits.rpm / 60 / 3) * 2.5, steady  # the cut-off engine spends its share

        # Back in touch: its heartbeats count again, and the others use the whole limits again.
        link.mend()
        with trio.fail_after(5):
            while any(engine.budget.reserved for engine in in_touch):  # noqa: ASYNC110 - heartbeats
                await trio.sleep(0.02)
        assert cut_off.budget.statistics()["state"] == "ok"


async def test_an_engine_whose_answers_are_lost_is_kept_room_for_while_it_spends_its_share(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer's finding: an engine whose commands still reached Redis but whose answers were lost (a
    one-way fault; coredis keeps the connection after a timed-out command) went on being counted alive by its
    heartbeats, which ran, so the others kept no room for it, while it spent its share locally, having had no
    answer: (1 + 1/N)x the limits for as long as the fault lasted. A heartbeat now counts from the last one
    whose answer reached its engine, which is what the engine itself goes by."""
    monkeypatch.setattr(shared, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "RECONNECT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "SILENT_AFTER", 0.4)
    monkeypatch.setattr(shared, "LOCAL_SHARE_DELAY", 0.7)
    async with (
        cuttable_link(redis) as link,
        engines(
            redis, 2, Limits(rpm=1200, tpm=600_000), policy="local-share", redis_timeout=0.3, urls=[link.url]
        ) as group,
    ):
        deaf, in_touch = group
        await wait_for_engines(group, 2)
        for engine in group:
            engine.lane.refund(await engine.lane.reserve(Cost(tokens=1)))
        engines_key = deaf.budget._engines_keys[0]
        link.deafen()
        deafened_at = float(await redis.command("ZSCORE", engines_key, deaf.budget.engine_id))
        with trio.fail_after(5):
            while deaf.budget.available:  # noqa: ASYNC110 - the budget sets no event for this
                await trio.sleep(0.02)
        await trio.sleep(2.0)  # far past LOCAL_SHARE_DELAY: many heartbeats of both
        # Its heartbeats do reach Redis and run: it is still counted among the engines.
        assert float(await redis.command("ZSCORE", engines_key, deaf.budget.engine_id)) > deafened_at + 1.0
        assert deaf.budget.statistics()["state"] == "unreachable: local share 1/2"
        assert in_touch.budget.silent_sharers == 1
        assert in_touch.budget.reserved == pytest.approx(1 / 2)
        # Mended as such a fault ends, in a reset of the connections (the dropped answers are gone for good).
        link.cut()
        link.mend()
        with trio.fail_after(5):
            while not deaf.budget.available:  # noqa: ASYNC110 - heartbeats
                await trio.sleep(0.02)
        # Back, its first heartbeat acknowledges one from before the fault: it keeps no room for itself.
        assert deaf.budget.silent_sharers == 0 and deaf.budget.reserved == 0
        with trio.fail_after(5):
            while in_touch.budget.reserved:  # noqa: ASYNC110 - heartbeats
                await trio.sleep(0.02)


async def test_an_engine_that_waits_without_redis_is_not_kept_room_for(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``wait`` a cut-off engine spends nothing: the others keep nothing for it."""
    monkeypatch.setattr(shared, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "RECONNECT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "SILENT_AFTER", 0.4)
    async with (
        cuttable_link(redis) as link,
        engines(redis, 2, Limits(rpm=1200, tpm=600_000), policy="wait", redis_timeout=0.3, urls=[link.url]) as group,
    ):
        await wait_for_engines(group, 2)
        link.cut()
        await trio.sleep(1.0)  # several heartbeats past SILENT_AFTER: real time, Redis's clock
        assert group[1].budget.silent_sharers == 0 and group[1].budget.reserved == 0


async def test_local_share_holds_requests_until_a_heartbeat_has_counted_the_engines(redis: RedisServer) -> None:
    """A reviewer's finding: engines started while Redis was down each counted themselves alone and took the
    whole limits (three engines: 2.96x the key's limits). Without a count there is no share to take."""
    await redis.stop()
    async with engines(redis, 2, Limits(rpm=1200, tpm=600_000), policy="local-share", redis_timeout=0.3) as group:
        for engine in group:
            with trio.move_on_after(0.5) as waiting:
                await engine.lane.reserve(Cost(tokens=1))
            assert waiting.cancelled_caught, "granted locally with no idea how many engines share the key"
            state = engine.budget.statistics()["state"]
            assert state == "unreachable: holding requests until the engines on the key are counted"


@pytest.mark.usefixtures("quick_reconnect")
async def test_local_share_shows_in_the_lane_statistics(redis: RedisServer) -> None:
    limits = Limits(rpm=1200, tpm=600_000)
    async with engines(redis, 2, limits, policy="local-share", redis_timeout=0.3) as group:
        await wait_for_engines(group, 2)
        engine = group[0]
        engine.lane.refund(await engine.lane.reserve(Cost(tokens=1)))
        await redis.stop()
        held = await engine.lane.reserve(Cost(tokens=1))
        stats = engine.lane.statistics()
        assert stats.in_flight == 1
        assert stats.effective == Limits(rpm=600, tpm=300_000)
        engine.lane.refund(held)


async def test_a_frozen_redis_counts_as_unreachable_within_the_timeout(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "RECONNECT_INTERVAL", 0.1)
    timeout = 0.3
    async with engines(redis, 1, Limits(rpm=600, tpm=60_000), redis_timeout=timeout) as (engine,):
        engine.lane.refund(await engine.lane.reserve(Cost(tokens=10)))
        with redis.frozen():
            started = trio.current_time()
            with trio.fail_after(timeout + 1.0):
                granted, _ = await engine.meter.charge([Cost(tokens=10)])
            assert trio.current_time() - started <= timeout + 0.2
            assert not granted, "granted by a Redis that answers nothing"
            assert engine.budget.statistics()["state"] == "unreachable: holding requests"
            with trio.move_on_after(0.5) as waiting:
                await engine.lane.reserve(Cost(tokens=10))
            assert waiting.cancelled_caught
        with trio.fail_after(3):
            await engine.lane.reserve(Cost(tokens=10))
        assert engine.budget.statistics()["state"] == "ok"


async def test_a_charge_whose_answer_never_came_is_withdrawn(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A charge that times out in a frozen Redis runs when it thaws: what it granted nobody was told of, and it
    stayed spent (a batch of waiters' tokens, unused). The engine now withdraws it once Redis answers."""
    monkeypatch.setattr(shared, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(shared, "RECONNECT_INTERVAL", 0.1)
    limits = Limits(rpm=600, tpm=6000)  # 100 tokens a second; the cold bucket holds 100
    rate, capacity = limits.tpm / 60, limits.tpm / 60
    async with engines(redis, 1, limits, redis_timeout=0.3) as (engine,):
        calls = engine.budget.calls
        engine.lane.refund(await engine.lane.reserve(Cost(tokens=1)))
        await sent(engine.budget, calls)
        before = await lane_state(redis, engine)
        with redis.frozen():
            granted, _ = await engine.meter.charge([Cost(tokens=60), Cost(tokens=30)])
            assert not granted
            assert engine.meter.pending == 2  # the two withdrawals, sent once Redis answers
        with trio.fail_after(5):
            while engine.meter.pending:  # noqa: ASYNC110 - the settler sets no event for this
                await trio.sleep(0.01)
        after = await lane_state(redis, engine)
        # Only refill since: whether the held charge ran first (and was credited back) or not at all.
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity)
        reservations, _ = await in_flight(redis, engine)
        assert reservations == 0


async def test_a_charge_run_after_its_withdrawal_charges_nothing(redis: RedisServer) -> None:
    limits = Limits(rpm=600, tpm=6000)
    rate, capacity = limits.tpm / 60, limits.tpm / 60
    async with engines(redis, 1, limits) as (engine,):
        await script(engine, limits, "peek")
        before = await lane_state(redis, engine)
        # The withdrawal overtook its charge (another connection, a charge held in Redis's input).
        assert (await script(engine, limits, "withdraw", "late:1", 900))[0] == "settled"
        late = await script(engine, limits, "charge", 900, "late:1", 60, 1, "late:2", 30, 1)
        assert late[0] == "0"  # none granted
        after = await lane_state(redis, engine)
        assert float(after["level_t"]) == refilled(before, after, "t", rate, capacity)
        reservations, _ = await in_flight(redis, engine)
        assert reservations == 0
        # A charge never withdrawn is granted as ever.
        assert (await script(engine, limits, "charge", 900, "other:1", 10, 1))[0] == "1"


# --- round trips ---------------------------------------------------------------------------------------------


async def test_one_round_trip_admits_several_waiters_and_carries_the_settlements(redis: RedisServer) -> None:
    async with engines(redis, 1, Limits(rpm=600_000, tpm=60_000_000)) as (engine,):
        lane, budget = engine.lane, engine.budget
        calls = budget.calls
        reservations: list[Reservation] = []

        async def reserve() -> None:
            reservations.append(await lane.reserve(Cost(tokens=10)))

        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(reserve)
        assert len(reservations) == 32
        # The head asks for the waiters behind it too: far fewer calls than admissions.
        assert budget.calls - calls <= 8, budget.calls - calls

        # Sequential admissions: each one's settlement travels with the next charge, not in a call of its own.
        for reservation in reservations:
            lane.refund(reservation)
        calls = budget.calls
        for _ in range(20):
            lane.reconcile(await lane.reserve(Cost(tokens=10)), prompt_tokens=None, snapshot=None)
        assert budget.calls - calls <= 22, budget.calls - calls
        await sent(budget, calls)
        assert await in_flight(redis, engine) == (0, 0)


async def test_a_flushed_script_cache_is_loaded_again(redis: RedisServer) -> None:
    # EVALSHA answers NOSCRIPT after a Redis restart or SCRIPT FLUSH: the script is loaded and run again.
    async with engines(redis, 1, Limits(rpm=600_000, tpm=60_000_000)) as (engine,):
        engine.lane.refund(await engine.lane.reserve(Cost(tokens=10)))
        await redis.command("SCRIPT", "FLUSH")
        failures = engine.budget.failures
        with trio.fail_after(5):
            engine.lane.refund(await engine.lane.reserve(Cost(tokens=10)))
        assert engine.budget.failures == failures
        assert engine.budget.statistics()["state"] == "ok"
