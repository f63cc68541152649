"""The operators' routes end to end: ``/metrics``, ``/healthz`` and ``/readyz`` of the engine as a real subprocess,
scraped over its real HTTP sockets, with the simulator (or nothing at all) as the upstream."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import trio
from conftest import TEST_API_KEY, EngineProcess, simulator
from prometheus_client.parser import text_string_to_metric_families
from raw_client import RawClient, chat
from test_http_front import (
    CLIENT_KEY,
    MESSAGES,
    MODEL,
    async_unix_sdk,
    engine_stats,
    free_port,
    http_engine,
    http_socket,
)

UNIX = f"uid {os.getuid()}"
ALICE = "key alice"


@asynccontextmanager
async def unix_http(engine: EngineProcess) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(uds=http_socket(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        yield client


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, list[str]]:
    """Every sample by (name, labels), and the family names in the order they came."""
    samples: Samples = {}
    families: list[str] = []
    for family in text_string_to_metric_families(text):
        families.append(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


async def test_metrics_count_per_lane_and_per_client(short_tmp: Path) -> None:
    # 120 rpm in bursts of 2 (quantum 1 s): a dozen requests at once meet 429s; one in four attempts fails
    # with a 500 and is retried.
    async with (
        simulator(rpm=120, quantum=1.0, fail_rate=0.25) as url,
        http_engine(short_tmp, url, "--max-attempts", "20") as (engine, tcp_url),
        async_unix_sdk(engine, max_retries=0) as unix_client,
        openai.AsyncOpenAI(api_key=CLIENT_KEY, base_url=tcp_url, max_retries=0) as tcp_client,
    ):

        async def call(client: openai.AsyncOpenAI) -> None:
            assert (await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)).choices

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(call, unix_client)
                for _ in range(4):
                    nursery.start_soon(call, tcp_client)
            async with await RawClient.connect(str(engine.socket)) as raw:
                for i in range(2):
                    assert (await raw.request(chat(i)))["type"] == "result"
        stats = await engine_stats(engine)
        async with unix_http(engine) as http:
            scrape = await http.get("/metrics")
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain")
        text = scrape.text
    assert TEST_API_KEY not in text and CLIENT_KEY not in text

    samples, families = parse(text)
    assert len(families) == len(set(families))
    lane = stats["lanes"][MODEL]
    requests = 12
    assert value(samples, "trio_mapper_lane_succeeded_requests_total", lane=MODEL) == requests == lane["succeeded"]
    assert value(samples, "trio_mapper_lane_failed_requests_total", lane=MODEL) == 0
    rate_limited = value(samples, "trio_mapper_lane_upstream_429s_total", lane=MODEL)
    retries = value(samples, "trio_mapper_lane_retries_total", lane=MODEL)
    assert rate_limited == lane["upstream_429s"] >= 1
    assert retries == lane["retries"] > rate_limited  # the 500s were retried too
    # Every finished request observed once in each histogram.
    assert value(samples, "trio_mapper_lane_queue_wait_seconds_count", lane=MODEL) == requests
    assert value(samples, "trio_mapper_lane_upstream_seconds_count", lane=MODEL) == requests
    assert value(samples, "trio_mapper_lane_upstream_seconds_bucket", lane=MODEL, le="+Inf") == requests
    assert value(samples, "trio_mapper_lane_upstream_seconds_sum", lane=MODEL) > 0
    # Nothing left in the lane.
    for state in ("queued", "retry_wait", "in_flight"):
        assert value(samples, f"trio_mapper_lane_{state}_requests", lane=MODEL) == 0
        assert value(samples, f"trio_mapper_client_{state}_requests", identity=UNIX) == 0
    # The budget: what is configured (--rpm), what is in force (the simulator's headers lowered it).
    assert value(samples, "trio_mapper_lane_configured_limit_requests_per_minute", lane=MODEL) == 100_000
    assert value(samples, "trio_mapper_lane_limit_requests_per_minute", lane=MODEL) == 120
    assert value(samples, "trio_mapper_lane_limit_tokens_per_minute", lane=MODEL) == lane["budget"]["effective"]["tpm"]
    assert value(samples, "trio_mapper_lane_budget_capacity_requests", lane=MODEL) > 0
    used = value(samples, "trio_mapper_lane_budget_used_requests", lane=MODEL)
    remaining = value(samples, "trio_mapper_lane_budget_remaining_requests", lane=MODEL)
    assert used >= 0 and remaining <= value(samples, "trio_mapper_lane_budget_capacity_requests", lane=MODEL)
    assert "trio_mapper_lane_pause_remaining_seconds" in families
    # Per client: the Unix socket's clients (HTTP and msgpack) are one uid; the TCP one is its key's name.
    assert value(samples, "trio_mapper_client_requests_total", identity=UNIX, outcome="succeeded") == 8
    assert value(samples, "trio_mapper_client_requests_total", identity=ALICE, outcome="succeeded") == 4
    assert total(samples, "trio_mapper_client_upstream_429s_total") == rate_limited
    assert total(samples, "trio_mapper_client_retries_total") == retries
    assert value(samples, "trio_mapper_client_charged_tokens_total", identity=ALICE) > 0
    assert value(samples, "trio_mapper_client_queue_wait_seconds_total", identity=UNIX) >= 0
    # The engine and the HTTP front.
    assert value(samples, "trio_mapper_accepted_requests_total") == requests
    assert value(samples, "trio_mapper_http_requests_total") == 10  # the scrape is not an API request
    assert value(samples, "trio_mapper_http_unauthorized_total") == 0
    assert value(samples, "trio_mapper_outstanding_requests") == 0
    assert value(samples, "trio_mapper_max_concurrent_requests") == 32
    assert total(samples, "trio_mapper_build_info") == 1
    assert value(samples, "trio_mapper_process_resident_memory_bytes") > 0


async def test_access_rules_and_health_over_tcp_and_the_unix_socket(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        root = tcp_url.removesuffix("/v1")
        async with httpx.AsyncClient(base_url=root) as tcp:
            no_key = await tcp.get("/metrics")
            wrong_key = await tcp.get("/metrics", headers={"authorization": "Bearer tm-wrong-key-0123456789abcdef"})
            with_key = await tcp.get("/metrics", headers={"authorization": f"Bearer {CLIENT_KEY}"})
            alive = await tcp.get("/healthz")
            alive_head = await tcp.head("/healthz")  # what uptime monitors often send
            ready_head = await tcp.head("/readyz")
            probed_with_query = await tcp.get("/healthz?probe=1")
            ready = await tcp.get("/readyz")
            posted = await tcp.post("/metrics", headers={"authorization": f"Bearer {CLIENT_KEY}"})
            query = await tcp.get("/metrics?name[]=x", headers={"authorization": f"Bearer {CLIENT_KEY}"})
            unknown = await tcp.get("/metricz", headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        assert wrong_key.status_code == 401
        assert with_key.status_code == 200 and "trio_mapper_http_unauthorized_total 2.0" in with_key.text
        assert alive.status_code == 200 and alive.json() == {"status": "ok"}
        assert probed_with_query.status_code == 404  # no key needed to hear why, as the docs say
        assert "takes no query string" in probed_with_query.json()["error"]["message"]
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready" and ready.json()["upstream"]["reachable"] is True
        assert ready.json()["upstream"]["checked_by"] == "probe"  # nothing had been sent yet: it probed
        assert alive_head.status_code == 200 and alive_head.content == b""
        assert ready_head.status_code == 200 and ready_head.content == b""
        assert posted.status_code == 405 and posted.headers["allow"] == "GET, HEAD"
        assert query.status_code == 404 and "/metrics takes no query string" in query.json()["error"]["message"]
        assert unknown.status_code == 404
        assert "GET /metrics, GET /healthz, GET /readyz" in unknown.json()["error"]["message"]

        async with unix_http(engine) as unix:
            assert (await unix.get("/healthz")).status_code == 200
            # HEAD of a route the upstream answers would cost an upstream request: refused, saying what to use.
            models_head = await unix.head("/v1/models")
            assert models_head.status_code == 405 and models_head.headers["allow"] == "GET"
            chat_get = await unix.get("/v1/chat/completions")
            assert chat_get.status_code == 405 and chat_get.headers["allow"] == "POST"
            assert "takes POST, not GET" in chat_get.json()["error"]["message"]
            # The connection still serves requests after replies without a body.
            assert (await unix.get("/healthz")).json() == {"status": "ok"}
            assert (await unix.get("/readyz")).json()["upstream"]["checked_by"] == "probe"  # the last exchange
            assert (await unix.get("/metrics")).status_code == 200
            # SIGHUP reloads the settings; the metrics are the same ones, registered once, still counting.
            engine.process.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                while "reloaded" not in engine.log:  # noqa: ASYNC110 - another process's log: only the clock
                    await trio.sleep(0.05)
            scrape = await unix.get("/metrics")
        samples, families = parse(scrape.text)
        assert len(families) == len(set(families))
        assert value(samples, "trio_mapper_http_unauthorized_total") == 2
        # Operators' requests are not API requests: only the 404s and the wrong query string counted.
        stats = (await engine_stats(engine))["engine"]["http_requests"]
        assert stats["requests"] == 5 and stats["not_found"] == 3  # the two 405s of API routes count as requests
        assert TEST_API_KEY not in scrape.text and TEST_API_KEY not in engine.log


async def test_readyz_is_503_when_the_upstream_is_unreachable(short_tmp: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    async with http_engine(short_tmp, closed) as (engine, _), unix_http(engine) as http:
        alive = await http.get("/healthz")
        ready = await http.get("/readyz")
        again = await http.get("/readyz")
    assert alive.status_code == 200
    assert ready.status_code == 503
    body: dict[str, Any] = ready.json()
    assert body["status"] == "not_ready" and body["shutting_down"] is False
    assert body["upstream"]["reachable"] is False and body["upstream"]["detail"] == "ConnectError"
    # Asked again at once: the failure is reused, not probed again (nothing new was sent).
    assert again.status_code == 503 and again.json()["upstream"]["seconds_ago"] >= 0
    assert "127.0.0.1" not in ready.text


async def test_readyz_is_503_when_the_upstream_refuses_the_key(short_tmp: Path) -> None:
    """Reachable is not ready: with a wrong key (or an organization the key is not in) every request fails
    upstream_authentication, and a load balancer must hear so."""
    async with (
        simulator(api_key="sk-the-only-key-the-simulator-takes-0123") as url,
        http_engine(short_tmp, url) as (engine, _),
        unix_http(engine) as http,
    ):
        ready = await http.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready" and body["upstream"]["reachable"] is True
    assert "refused the engine's key (HTTP 401)" in body["upstream"]["detail"]


async def test_readyz_is_503_while_a_shared_budgets_redis_is_down(short_tmp: Path) -> None:
    """Under the 'wait' failure policy nothing is sent until Redis answers: the engine is not ready."""
    redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with (
        simulator() as url,
        http_engine(short_tmp, url, "--budget", redis) as (engine, _),
        unix_http(engine) as http,
    ):
        with trio.fail_after(20):
            while (ready := await http.get("/readyz")).status_code == 200:  # noqa: ASYNC110 - another process
                await trio.sleep(0.1)
    assert ready.status_code == 503
    assert "Redis is unreachable" in ready.json()["budget"]


async def test_readyz_is_503_while_the_engine_stops(short_tmp: Path) -> None:
    async with (
        simulator(latency_ms=1500.0) as url,
        http_engine(short_tmp, url) as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
        unix_http(engine) as http,
    ):
        assert (await http.get("/readyz")).status_code == 200  # also opens the connection used below
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.chat.completions.create, model=MODEL, messages=MESSAGES))
            await trio.sleep(0.5)
            engine.process.send_signal(signal.SIGTERM)
            await trio.sleep(0.3)
            # The grace period: the request above is still in flight, an open connection is still served.
            stopping = await http.get("/readyz")
        assert stopping.status_code == 503
        assert stopping.json() == {"status": "not_ready", "shutting_down": True, "upstream": None}
