"""The metrics module alone: fake statistics and a fake observer feed, scraped through its own registry; the
readiness check against a fake upstream under Trio's mock clock."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_mapper.engine.core.scheduler import JobRecord
from trio_mapper.engine.process.metrics import KEY_REFUSED, OTHER, EngineMetrics, Readiness, healthz

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def lane_stats(**overrides: Any) -> dict[str, Any]:
    budget = {
        "effective": {"rpm": 500, "tpm": 200_000},
        "configured": {"rpm": 1000, "tpm": 300_000},
        "request_capacity": 500.0,
        "token_capacity": 200_000.0,
        "requests_used": 3.0,
        "tokens_used": 1500.0,
        "requests_available": 497.0,
        "tokens_available": -20.0,
        "pause_remaining": 0.0,
        "correction": 1.0,
        "learned_rpm": None,
        "learned_tpm": 1234.5,
    }
    lane = {
        "queued": 2,
        "retry_wait": 1,
        "in_flight": 3,
        "succeeded": 10,
        "failed": 1,
        "upstream_429s": 4,
        "retries": 5,
        "estimated_prompt_tokens": 100,
        "actual_prompt_tokens": 90,
        "budget": budget,
    }
    return lane | overrides


@attrs.define
class FakeEngine:
    engine: dict[str, Any] = attrs.field(
        factory=lambda: {
            "version": "9.9",
            "outstanding": 6,
            "accepted": 12,
            "http_requests": {"requests": 7},
            "queued_bytes": 4096,
            "max_queued_bytes": None,  # a scheduler built without the limit
            "unsent_reply_bytes": 1500,
            "max_unsent_reply_bytes": 1 << 30,
        }
    )
    lanes: dict[str, dict[str, Any]] = attrs.field(factory=lambda: {"gpt-4o": lane_stats()})
    clients: dict[str, dict[str, int]] = attrs.field(factory=dict)

    def metrics(self, **options: Any) -> EngineMetrics:
        return EngineMetrics(
            statistics=lambda: (self.engine, self.lanes), clients=lambda: self.clients, **({"max_lanes": 8} | options)
        )


def record(lane: str = "gpt-4o", identity: str = "uid 1000", **overrides: Any) -> JobRecord:
    fields: dict[str, Any] = {
        "lane": lane,
        "identity": identity,
        "outcome": "succeeded",
        "attempts": 1,
        "rate_limited_attempts": 0,
        "queued": 0.02,
        "upstream": 0.3,
        "charged_tokens": 50,
    }
    return JobRecord(**(fields | overrides))


def scrape(metrics: EngineMetrics) -> Samples:
    samples: Samples = {}
    names = []
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.append(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert len(names) == len(set(names)), "a family was exposed twice"
    return samples


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_statistics_are_read_at_scrape_time() -> None:
    fake = FakeEngine(clients={"key alice": {"queued": 2, "retry_wait": 0, "in_flight": 1}})
    metrics = fake.metrics()
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_build_info", version="9.9") == 1
    assert get(samples, "trio_mapper_outstanding_requests") == 6
    assert get(samples, "trio_mapper_accepted_requests_total") == 12
    assert get(samples, "trio_mapper_queued_request_bytes") == 4096
    assert get(samples, "trio_mapper_max_queued_request_bytes") is None  # no limit: no sample, not a crash
    assert get(samples, "trio_mapper_unsent_reply_bytes") == 1500
    assert get(samples, "trio_mapper_max_unsent_reply_bytes") == 1 << 30
    assert get(samples, "trio_mapper_http_requests_total") == 7
    assert get(samples, "trio_mapper_lane_queued_requests", lane="gpt-4o") == 2
    assert get(samples, "trio_mapper_lane_upstream_429s_total", lane="gpt-4o") == 4
    assert get(samples, "trio_mapper_lane_limit_requests_per_minute", lane="gpt-4o") == 500
    assert get(samples, "trio_mapper_lane_configured_limit_tokens_per_minute", lane="gpt-4o") == 300_000
    assert get(samples, "trio_mapper_lane_budget_remaining_tokens", lane="gpt-4o") == -20  # debt
    assert get(samples, "trio_mapper_lane_learned_limit_tokens_per_minute", lane="gpt-4o") == 1234.5
    assert get(samples, "trio_mapper_lane_learned_limit_requests_per_minute", lane="gpt-4o") is None  # not learned
    assert get(samples, "trio_mapper_client_in_flight_requests", identity="key alice") == 1
    # Read again at the next scrape: nothing is cached.
    fake.lanes["gpt-4o"]["queued"] = 0
    fake.clients.clear()
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_lane_queued_requests", lane="gpt-4o") == 0
    # An identity seen once keeps its series, at 0, rather than leaving a gap in a graph.
    assert get(samples, "trio_mapper_client_in_flight_requests", identity="key alice") == 0


def test_before_the_scheduler_exists_the_exposition_is_valid_and_empty() -> None:
    metrics = EngineMetrics(statistics=lambda: ({}, {}), clients=dict, max_lanes=8)
    samples = scrape(metrics)
    assert not [key for key in samples if key[0].startswith("trio_mapper_lane_")]


def test_finished_jobs_feed_histograms_and_client_counters() -> None:
    metrics = FakeEngine().metrics()
    metrics.observe(record(queued=0.02, upstream=0.3))
    metrics.observe(record(attempts=3, rate_limited_attempts=2, queued=7.0, upstream=1.5, charged_tokens=70))
    metrics.observe(
        record(identity="key bob", outcome="timeout", attempts=0, queued=30.0, upstream=0.0, charged_tokens=0)
    )
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_count", lane="gpt-4o") == 3
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_bucket", lane="gpt-4o", le="0.025") == 1
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_sum", lane="gpt-4o") == pytest.approx(37.02)
    # The request never sent has no upstream time: two observations, not three.
    assert get(samples, "trio_mapper_lane_upstream_seconds_count", lane="gpt-4o") == 2
    assert get(samples, "trio_mapper_lane_upstream_seconds_sum", lane="gpt-4o") == pytest.approx(1.8)
    assert get(samples, "trio_mapper_client_requests_total", identity="uid 1000", outcome="succeeded") == 2
    assert get(samples, "trio_mapper_client_requests_total", identity="key bob", outcome="timeout") == 1
    assert get(samples, "trio_mapper_client_charged_tokens_total", identity="uid 1000") == 120
    assert get(samples, "trio_mapper_client_upstream_429s_total", identity="uid 1000") == 2
    assert get(samples, "trio_mapper_client_retries_total", identity="uid 1000") == 2
    assert get(samples, "trio_mapper_client_queue_wait_seconds_total", identity="key bob") == 30
    # An identity seen before keeps its gauges, at 0, when it has nothing outstanding.
    assert get(samples, "trio_mapper_client_queued_requests", identity="key bob") == 0


def test_label_values_are_bounded_and_dropped_lanes_take_their_series_along() -> None:
    fake = FakeEngine(lanes={f"m{i}": lane_stats() for i in range(3)})
    metrics = fake.metrics(max_lanes=2, max_identities=2)
    for i in range(3):
        metrics.observe(record(lane=f"m{i}", identity=f"key k{i}"))
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_count", lane="m1") == 1
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_count", lane="m2") is None
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_count", lane=OTHER) == 1
    assert get(samples, "trio_mapper_client_requests_total", identity=OTHER, outcome="succeeded") == 1
    # The scheduler evicted m0 (idle) for another model: its observed series go, and the freed label serves m3.
    del fake.lanes["m0"]
    fake.lanes["m3"] = lane_stats()
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_count", lane="m0") is None
    metrics.observe(record(lane="m3"))
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_lane_queue_wait_seconds_count", lane="m3") == 1


@attrs.frozen
class Contact:
    at: float
    reachable: bool
    detail: str = ""
    status: int | None = None


@attrs.define
class FakeUpstream:
    answer: int | None = 200
    delay: float = 0.0
    probes: int = 0
    contact: Contact | None = None
    shutting_down: bool = False
    budget_problem: str | None = None

    async def probe(self) -> int:
        self.probes += 1
        await trio.sleep(self.delay)
        if self.answer is None:
            raise ConnectionRefusedError("connection refused by upstream.example:443")
        return self.answer

    def readiness(self) -> Readiness:
        return Readiness(
            shutting_down=lambda: self.shutting_down,
            last_contact=lambda: self.contact,
            probe=self.probe,
            budget_problem=lambda: self.budget_problem,
        )


async def test_health_is_always_ok() -> None:
    assert await healthz() == (200, "application/json", b'{"status": "ok"}')


async def test_recent_traffic_decides_and_an_idle_engine_probes_sparingly(autojump_clock: trio.abc.Clock) -> None:
    upstream = FakeUpstream(contact=Contact(trio.current_time(), reachable=True))
    readiness = upstream.readiness()
    ready, body = await readiness.check()
    assert ready and body["upstream"]["checked_by"] == "traffic" and upstream.probes == 0
    await trio.sleep(31)  # idle: the last exchange is too old to say anything
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(readiness.check)  # at once: one probe answers them all
    assert upstream.probes == 1
    ready, body = await readiness.check()
    assert ready and body["upstream"]["checked_by"] == "probe" and upstream.probes == 1
    status, content_type, payload = await readiness.respond()
    assert (status, content_type) == (200, "application/json") and b'"ready"' in payload


async def test_an_unreachable_upstream_is_checked_again_after_a_few_seconds(autojump_clock: trio.abc.Clock) -> None:
    upstream = FakeUpstream(answer=None)
    readiness = upstream.readiness()
    status, _, payload = await readiness.respond()
    assert status == 503 and b"ConnectionRefusedError" in payload
    assert b"upstream.example" not in payload  # the class, never the message that names the host
    await readiness.check()
    assert upstream.probes == 1  # reused
    await trio.sleep(6)
    upstream.answer = 200
    ready, _ = await readiness.check()
    assert ready and upstream.probes == 2
    # Traffic newer than the probe wins: a failure to connect just now.
    await trio.sleep(1)
    upstream.contact = Contact(trio.current_time(), reachable=False, detail="ConnectTimeout")
    ready, body = await readiness.check()
    assert not ready and body["upstream"] == {
        "reachable": False,
        "checked_by": "traffic",
        "seconds_ago": 0.0,
        "detail": "ConnectTimeout",
    }


async def test_a_slow_probe_or_a_shutdown_is_not_ready(autojump_clock: trio.abc.Clock) -> None:
    upstream = FakeUpstream(delay=10.0)
    readiness = upstream.readiness()
    started = trio.current_time()
    ready, body = await readiness.check()
    assert not ready and body["upstream"]["detail"] == "no answer within 2s"
    assert trio.current_time() - started == pytest.approx(2.0)
    upstream.shutting_down = True
    assert await readiness.check() == (False, {"status": "not_ready", "shutting_down": True, "upstream": None})
    assert upstream.probes == 1


async def test_an_upstream_refusing_the_key_or_a_budget_holding_everything_is_not_ready(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstream = FakeUpstream(answer=401)
    readiness = upstream.readiness()
    ready, body = await readiness.check()
    assert not ready and body["upstream"]["reachable"] and body["upstream"]["detail"] == KEY_REFUSED
    # Traffic newer than the probe: the key works again (a reload), then fails again.
    await trio.sleep(1)
    upstream.contact = Contact(trio.current_time(), reachable=True, status=200)
    assert (await readiness.check())[0]
    upstream.contact = Contact(trio.current_time(), reachable=True, status=401)
    assert not (await readiness.check())[0]
    upstream.contact = Contact(trio.current_time(), reachable=True, status=400)  # one client's bad request
    assert (await readiness.check())[0]
    upstream.budget_problem = "the shared budget's Redis is unreachable"
    ready, body = await readiness.check()
    assert not ready and body["status"] == "not_ready" and body["budget"] == upstream.budget_problem


def test_a_shared_budget_shows_whether_redis_answers() -> None:
    fake = FakeEngine()
    metrics = fake.metrics()
    assert get(scrape(metrics), "trio_mapper_budget_redis_up", failure_policy="wait") is None  # local budget
    fake.engine["budget"] = {"backend": "redis", "state": "ok", "engines": 3, "failure_policy": "wait", "calls": 9}
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_budget_redis_up", failure_policy="wait") == 1
    assert get(samples, "trio_mapper_budget_engines") == 3
    assert get(samples, "trio_mapper_budget_redis_calls_total") == 9
    fake.engine["budget"] |= {"state": "unreachable: holding requests", "failures": 2}
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_budget_redis_up", failure_policy="wait") == 0
    assert get(samples, "trio_mapper_budget_redis_failures_total") == 2
    assert get(samples, "trio_mapper_budget_kept_for_cut_off_engines") == 0
    fake.engine["budget"] |= {"kept_for_cut_off_engines": 0.5}  # one of two local-share engines went silent
    assert get(scrape(metrics), "trio_mapper_budget_kept_for_cut_off_engines") == 0.5


def test_reloads_show_how_the_last_one_went() -> None:
    fake = FakeEngine()
    metrics = fake.metrics()
    assert get(scrape(metrics), "trio_mapper_config_last_reload_successful") is None  # not serving yet
    fake.engine["reloads"] = {"applied": 0, "failed": 0, "succeeded_at": 1000.0, "failure": None, "not_applied": []}
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_config_last_reload_successful") == 1  # the start's settings
    assert get(samples, "trio_mapper_config_last_reload_success_timestamp_seconds") == 1000
    assert get(samples, "trio_mapper_config_reloads_total", result="failed") == 0
    fake.engine["reloads"] |= {"failed": 1, "failure": {"at": 1060.0, "reason": "server.rpm: expected an integer"}}
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_config_reloads_total", result="failed") == 1
    assert get(samples, "trio_mapper_config_last_reload_successful") == 0
    fake.engine["reloads"] |= {"applied": 1, "succeeded_at": 1120.0, "failure": None, "not_applied": ["a", "b"]}
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_config_reloads_total", result="applied") == 1
    assert get(samples, "trio_mapper_config_last_reload_successful") == 1
    assert get(samples, "trio_mapper_config_last_reload_success_timestamp_seconds") == 1120
    assert get(samples, "trio_mapper_config_settings_not_applied") == 2


def tenant_stats(**overrides: Any) -> dict[str, Any]:
    tenant = {"priority": "default", "weight": 1.0, "rpm_cap": None, "tpm_cap": None, "daily_tokens": None,
              "daily_cost": None, "tokens_24h": 0, "cost_24h": 0.0, "queued": 0}  # fmt: skip
    return tenant | overrides


def test_each_tenant_has_its_usage_and_queue() -> None:
    fake = FakeEngine()
    fake.engine["tenants"] = {
        "nightly": tenant_stats(priority="batch", daily_tokens=2_000_000, tokens_24h=1_234_567, queued=412),
        "alice": tenant_stats(priority="interactive", tokens_24h=9_876, cost_24h=0.42),
        "default": tenant_stats(tokens_24h=5),
    }
    metrics = fake.metrics()
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_tenant_tokens_24h", tenant="nightly") == 1_234_567
    assert get(samples, "trio_mapper_tenant_queued", tenant="nightly") == 412
    assert get(samples, "trio_mapper_tenant_cost_24h", tenant="nightly") == 0  # no price table: 0, not absent
    assert get(samples, "trio_mapper_tenant_cost_24h", tenant="alice") == pytest.approx(0.42)
    assert get(samples, "trio_mapper_tenant_tokens_24h", tenant="default") == 5
    assert get(samples, "trio_mapper_tenant_daily_tokens_budget", tenant="nightly") == 2_000_000
    assert get(samples, "trio_mapper_tenant_daily_tokens_budget", tenant="alice") is None  # no budget, no series
    # A reload removed a tenant: its series go with it (they are read afresh at each scrape).
    del fake.engine["tenants"]["alice"]
    fake.engine["tenants"]["nightly"]["queued"] = 0
    samples = scrape(metrics)
    assert get(samples, "trio_mapper_tenant_tokens_24h", tenant="alice") is None
    assert get(samples, "trio_mapper_tenant_queued", tenant="nightly") == 0


def test_tenant_labels_are_bounded() -> None:
    fake = FakeEngine()
    fake.engine["tenants"] = {f"t{i}": tenant_stats(tokens_24h=10 * i, queued=1) for i in range(5)}
    samples = scrape(fake.metrics(max_tenants=3))
    tenants = {dict(labels)["tenant"] for name, labels in samples if name == "trio_mapper_tenant_tokens_24h"}
    assert tenants == {"t0", "t1", "t2", OTHER}
    # The rest are summed, so that the totals still add up.
    assert get(samples, "trio_mapper_tenant_tokens_24h", tenant=OTHER) == 30 + 40
    assert get(samples, "trio_mapper_tenant_queued", tenant=OTHER) == 2
