"""The status page's history alone: fake statistics sampled under Trio's mock clock."""

from __future__ import annotations

import itertools
import json
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_mapper.engine.core.scheduler import JobRecord
from trio_mapper.engine.process.status_history import INTERVAL, MAX_SAMPLES, WINDOW, StatusHistory


def lane_stats(**overrides: Any) -> dict[str, Any]:
    budget = {
        "mode": "bucket",
        "effective": {"rpm": 600, "tpm": 120_000},
        "configured": {"rpm": 1000, "tpm": 120_000},
        "request_capacity": 600.0,
        "token_capacity": 120_000.0,
        "requests_used": 150.0,
        "tokens_used": 30_000.0,
        "requests_available": 450.0,
        "tokens_available": 90_000.0,
        "pause_remaining": 0.0,
        "learned_rpm": None,
        "learned_tpm": None,
        "correction": 1.0,
    }
    lane = {
        "queued": 2,
        "retry_wait": 1,
        "in_flight": 3,
        "succeeded": 10,
        "failed": 1,
        "upstream_429s": 0,
        "retries": 0,
        "estimated_prompt_tokens": 100,
        "actual_prompt_tokens": 90,
        "budget": budget,
        "tenants_queued": {"research": 2},
    }
    return lane | overrides


def at_rest() -> dict[str, Any]:
    lane = lane_stats(queued=0, retry_wait=0, in_flight=0)
    lane["budget"] = lane["budget"] | {"requests_used": 0.0, "tokens_used": 0.0}
    return lane


def tenant(tokens_24h: int = 0, queued: int = 0) -> dict[str, Any]:
    return {
        "priority": "default",
        "weight": 1.0,
        "rpm_cap": None,
        "tpm_cap": None,
        "daily_tokens": None,
        "daily_cost": None,
        "tokens_24h": tokens_24h,
        "cost_24h": 0.0,
        "queued": queued,
    }


@attrs.define
class FakeEngine:
    engine: dict[str, Any] = attrs.field(
        factory=lambda: {
            "version": "9.9",
            "uptime": 12.5,
            "pid": 4242,
            "socket": "/run/secret/engine.sock",
            "base_url": "https://upstream.example/v1",
            "outstanding": 6,
            "in_flight": 3,
            "budget": {"backend": "redis", "state": "ok", "engines": 2, "engine_id": "e1", "calls": 5},
            "tenants": {"research": tenant(), "default": tenant()},
        }
    )
    lanes: dict[str, dict[str, Any]] = attrs.field(factory=lambda: {"gpt-4o": lane_stats()})

    def history(self, **options: Any) -> StatusHistory:
        return StatusHistory(statistics=lambda: (self.engine, self.lanes), wall_clock=lambda: 1.7e9, **options)


def job(lane: str, queued: float) -> JobRecord:
    return JobRecord(
        lane=lane,
        identity="uid 1000",
        outcome="succeeded",
        attempts=1,
        rate_limited_attempts=0,
        queued=queued,
        upstream=0.1,
        charged_tokens=10,
    )


def test_the_window_is_fifteen_minutes_of_two_second_samples() -> None:
    assert (INTERVAL, WINDOW, MAX_SAMPLES) == (2.0, 900.0, 450)


async def test_samples_every_interval_on_trios_clock(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEngine()
    history = fake.history()
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(history.run)
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()
    assert [round(sample.at - start, 6) for sample in history.samples] == [0, 2, 4, 6, 8, 10]
    assert [sample.elapsed for sample in history.samples] == [INTERVAL] * 6
    assert all(sample.wall == 1.7e9 for sample in history.samples)


async def test_the_history_is_bounded_by_count_and_by_age(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEngine()
    history = fake.history(window=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        await trio.sleep(60.5)
        nursery.cancel_scope.cancel()
    assert len(history.samples) == 5 == history.samples.maxlen
    now = trio.current_time()
    assert all(now - sample.at <= 10.0 for sample in history.samples)
    # Irregular samples (a busy loop): age bounds them too. The last was taken at 60 s; now is 60.5 s.
    autojump_clock.jump(9.0)
    history.sample()
    assert [sample.at for sample in history.samples] == [60.0, 69.5]


async def test_a_late_wake_up_does_not_take_a_burst_of_samples(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEngine()
    calls: list[float] = []

    def slow_statistics() -> Any:
        calls.append(trio.current_time())
        if len(calls) == 2:
            autojump_clock.jump(7.0)  # the event loop was blocked for 7 s during this sample
        return fake.engine, fake.lanes

    history = StatusHistory(statistics=slow_statistics)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(history.run)
        await trio.sleep(14.5)
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(calls)]
    # The sample due at 4 s and the one due at 6 s are one sample, taken as soon as the loop is free again.
    assert gaps == [2.0, 7.0, 2.0, 2.0] and calls[0] == start


async def test_429s_and_retries_are_counted_per_interval(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEngine()
    fake.lanes["gpt-4o"] |= {"upstream_429s": 7, "retries": 9}
    history = fake.history()
    first = history.sample()
    # The first sample is the baseline: what happened before it is not "in the interval".
    assert (first.lanes["gpt-4o"].upstream_429s, first.lanes["gpt-4o"].retries) == (0, 0)
    fake.lanes["gpt-4o"] |= {"upstream_429s": 10, "retries": 14}
    # A lane that appeared since the previous sample counted from 0 in between.
    fake.lanes["gpt-4.1"] = lane_stats(upstream_429s=2, retries=3)
    second = history.sample()
    assert (second.lanes["gpt-4o"].upstream_429s, second.lanes["gpt-4o"].retries) == (3, 5)
    assert (second.lanes["gpt-4.1"].upstream_429s, second.lanes["gpt-4.1"].retries) == (2, 3)
    # A lane dropped and created again starts its counters again: all of them are new.
    fake.lanes["gpt-4.1"] = lane_stats(upstream_429s=1, retries=0)
    third = history.sample()
    assert (third.lanes["gpt-4.1"].upstream_429s, third.lanes["gpt-4.1"].retries) == (1, 0)
    assert (third.lanes["gpt-4o"].upstream_429s, third.lanes["gpt-4o"].retries) == (0, 0)


async def test_tenant_tokens_are_the_increase_of_their_24_hour_spending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEngine()
    fake.engine["tenants"]["research"] = tenant(tokens_24h=5000, queued=4)
    history = fake.history()
    assert history.sample().tenants["research"].tokens == 0
    fake.engine["tenants"]["research"] = tenant(tokens_24h=6200, queued=1)
    autojump_clock.jump(INTERVAL)
    sample = history.sample()
    assert (sample.tenants["research"].tokens, sample.tenants["research"].queued) == (1200, 1)
    # Spending ageing out of the 24 hours is no negative spending; a tenant added by a reload no spike.
    fake.engine["tenants"]["research"] = tenant(tokens_24h=100)
    fake.engine["tenants"]["batch"] = tenant(tokens_24h=90_000)
    autojump_clock.jump(4.0)  # a late sample: per minute counts the time that really passed
    sample = history.sample()
    assert sample.tenants["research"].tokens == 0 and sample.tenants["batch"].tokens == 0
    fake.engine["tenants"]["batch"] = tenant(tokens_24h=90_400)
    autojump_clock.jump(4.0)
    history.sample()
    columns = history.snapshot()["history"]["tenants"]
    assert columns["research"]["tokens"] == [0, 1200, 0, 0]
    assert columns["research"]["tokens_per_minute"] == [0.0, 36_000.0, 0.0, 0.0]
    assert columns["batch"]["tokens"] == [0, 0, 0, 400]
    assert columns["batch"]["tokens_per_minute"] == [0.0, 0.0, 0.0, 6000.0]
    assert columns["research"]["queued"] == [4, 1, 0, 0]


async def test_queue_waits_are_those_of_the_requests_answered_in_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeEngine()
    history = fake.history()
    for queued in (0.5, 2.5, 1.0):
        history.observe(job("gpt-4o", queued))
    first = history.sample().lanes["gpt-4o"]
    assert (first.answered, first.longest_wait, first.total_wait) == (3, 2.5, 4.0)
    second = history.sample().lanes["gpt-4o"]
    assert (second.answered, second.longest_wait) == (0, 0.0)
    columns = history.snapshot()["history"]["lanes"]["gpt-4o"]
    assert columns["longest_wait"] == [2.5, 0.0]
    assert columns["mean_wait"] == [pytest.approx(4.0 / 3, abs=1e-3), 0.0]


async def test_lanes_at_rest_are_left_out_and_the_busiest_kept(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEngine()
    fake.lanes = {f"idle-{i}": at_rest() for i in range(50)}
    fake.lanes |= {f"busy-{i}": lane_stats(queued=i) for i in range(5)}
    history = fake.history(max_lanes=3)
    sample = history.sample()
    assert list(sample.lanes) == ["busy-2", "busy-3", "busy-4"]
    snapshot = history.snapshot()
    # Every lane has its current figures; only the charted ones have a history.
    assert len(snapshot["lanes"]) == 55
    assert list(snapshot["history"]["lanes"]) == ["busy-2", "busy-3", "busy-4"]
    # A paused lane is not at rest, even with nothing in it.
    paused = at_rest()
    paused["budget"] = paused["budget"] | {"pause_remaining": 3.0}
    fake.lanes = {"paused": paused, "idle": at_rest()}
    assert list(history.sample().lanes) == ["paused"]


async def test_the_snapshot_is_columnar_and_shows_nothing_secret(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEngine()
    history = fake.history()
    history.sample()
    fake.lanes["gpt-4o"]["budget"] = fake.lanes["gpt-4o"]["budget"] | {"tokens_used": 60_000.0, "requests_used": 600.0}
    autojump_clock.jump(INTERVAL)
    history.sample()
    fake.lanes["newcomer"] = lane_stats()
    autojump_clock.jump(INTERVAL)
    history.sample()
    status, content_type, body = await history.respond()
    assert (status, content_type) == (200, "application/json")
    snapshot = json.loads(body)
    assert snapshot["interval"] == 2.0 and snapshot["window"] == 900.0
    assert snapshot["engine"] == {
        "version": "9.9",
        "uptime": 12.5,
        "outstanding": 6,
        "in_flight": 3,
        "budget": {"backend": "redis", "state": "ok", "engines": 2},
    }
    lane = snapshot["lanes"]["gpt-4o"]
    assert lane["queued"] == 2 and lane["budget"]["effective"] == {"rpm": 600, "tpm": 120_000}
    assert lane["budget"]["tokens_used"] == 60_000.0 and lane["tenants_queued"] == {"research": 2}
    assert set(snapshot["tenants"]) == {"research", "default"}
    assert "cost_24h" not in snapshot["tenants"]["research"]
    text = body.decode()
    for secret in ("upstream.example", "/run/secret", "4242", "engine_id"):
        assert secret not in text
    history_ = snapshot["history"]
    assert history_["time"] == [1.7e9] * 3
    columns = history_["lanes"]["gpt-4o"]
    assert columns["tokens_fraction"] == [0.25, 0.5, 0.5]
    assert columns["requests_fraction"] == [0.25, 1.0, 1.0]
    assert columns["tokens_used"] == [30_000.0, 60_000.0, 60_000.0]
    assert columns["queued"] == [2, 2, 2] and columns["in_flight"] == [3, 3, 3]
    # A lane absent from the first samples was at rest then: zeros, aligned with the time axis.
    assert history_["lanes"]["newcomer"]["queued"] == [0, 0, 2]
    assert all(len(values) == 3 for lane in history_["lanes"].values() for values in lane.values())


async def test_a_failing_provider_costs_samples_not_the_engine(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def statistics() -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug")
        return {}, {}

    history = StatusHistory(statistics=statistics)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        await trio.sleep(4.5)
        nursery.cancel_scope.cancel()
    assert calls == 3 and len(history.samples) == 2
    assert "sampling failed" in caplog.text


async def test_the_snapshot_tells_how_the_reloads_went_as_status_does(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeEngine()
    history = fake.history()
    assert "reloads" not in history.snapshot()["engine"]  # an engine that keeps no record says nothing
    fake.engine["reloads"] = {
        "applied": 2,
        "failed": 1,
        "succeeded_at": 1.7e9,
        "failure": {"at": 1.7e9 + 60, "reason": "2 problems in the settings (the log names each); …", "extra": 1},
        "not_applied": ["server.max_queued (needs a restart)"],
        "problems": ["server.rpm: expected an integer, got 'a value of the file'"],
    }
    shown = history.snapshot()["engine"]["reloads"]
    assert shown == {
        "applied": 2,
        "failed": 1,
        "succeeded_at": 1.7e9,
        "failure": {"at": 1.7e9 + 60, "reason": "2 problems in the settings (the log names each); …"},
        "not_applied": ["server.max_queued (needs a restart)"],
    }
    fake.engine["reloads"] |= {"failure": None}
    assert history.snapshot()["engine"]["reloads"]["failure"] is None
