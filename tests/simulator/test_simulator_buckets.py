"""Token-bucket admission: pure bucket logic with explicit times, then the app under autojump_clock."""

from __future__ import annotations

import json

import pytest
import trio
from simulator_fixtures import MODEL, chat_body, fast_config, make_app

from trio_mapper.simulator.buckets import ModelBuckets, RateLimits, TokenBucket, format_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.012, "12ms"),
        (1 / (5000 / 60), "12ms"),  # the reference's 5000 RPM example, despite float noise
        (0.0001, "1ms"),  # rounded up: waiting the advertised time must be enough
        (1.0, "1s"),
        (9.816, "9.816s"),
        (59.97, "59.97s"),
        (360.0, "6m0s"),
        (90.5, "1m30.5s"),
        (3600.0, "1h0m0s"),
    ],
)
def test_format_duration_is_go_style(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def _buckets(rpm: int, tpm: int, quantum: float = 60.0) -> ModelBuckets:
    return RateLimits((rpm, tpm), {}, quantum).buckets(MODEL, 0.0)


def test_reference_header_example() -> None:
    buckets = _buckets(5000, 160_000)
    assert buckets.admit(24, 0.0) is None
    headers = dict(buckets.headers())
    assert headers[b"x-ratelimit-limit-requests"] == b"5000"
    assert headers[b"x-ratelimit-remaining-requests"] == b"4999"
    assert headers[b"x-ratelimit-reset-requests"] == b"12ms"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"159976"
    assert headers[b"x-ratelimit-reset-tokens"] == b"9ms"


def test_full_minute_burst_then_requests_rejection_with_wait() -> None:
    buckets = _buckets(rpm=60, tpm=10_000)
    for _ in range(60):
        assert buckets.admit(1, 0.0) is None
    rejection = buckets.admit(1, 0.0)
    assert rejection is not None
    assert (rejection.kind, rejection.limit, rejection.used, rejection.requested) == ("requests", 60, 60, 1)
    assert rejection.wait == pytest.approx(1.0)
    # Just before the wait is over: still refused; at it: admitted.
    assert buckets.admit(1, 0.99) is not None
    assert buckets.admit(1, 1.0) is None


def test_rejection_is_not_charged() -> None:
    buckets = _buckets(rpm=1000, tpm=100)
    assert buckets.admit(80, 0.0) is None
    rejection = buckets.admit(50, 0.0)
    assert rejection is not None and rejection.kind == "tokens"
    assert (rejection.used, rejection.requested) == (80, 50)
    # 30 tokens short at 100/60 tokens per second.
    assert rejection.wait == pytest.approx(30 / (100 / 60))
    assert buckets.tokens.remaining == 20
    assert buckets.requests.remaining == 999


def test_quantum_limits_the_burst_but_not_the_rate() -> None:
    buckets = _buckets(rpm=600, tpm=1_000_000, quantum=1.0)
    admitted_at_once = 0
    while buckets.admit(1, 0.0) is None and admitted_at_once < 1000:
        admitted_at_once += 1
    # One second of budget: 600 / 60.
    assert admitted_at_once == 10
    # Over the next minute the bucket admits the per-minute rate (10 per second).
    admitted = sum(buckets.admit(1, step / 100) is None for step in range(1, 6001))
    assert admitted == pytest.approx(600, abs=1)


def test_request_bigger_than_quantized_bucket_goes_into_debt() -> None:
    # capacity = 6000 * 1 / 60 = 100 tokens, but a 500-token request is within the per-minute limit.
    buckets = _buckets(rpm=1000, tpm=6000, quantum=1.0)
    assert buckets.tokens.capacity == pytest.approx(100)
    assert buckets.admit(500, 0.0) is None
    assert buckets.tokens.level == pytest.approx(-400)
    assert buckets.tokens.remaining == 0
    rejection = buckets.admit(10, 0.0)
    assert rejection is not None and rejection.kind == "tokens"
    # 410 tokens to regain at 100 tokens per second.
    assert rejection.wait == pytest.approx(4.1)


def test_request_over_the_whole_limit_is_too_large_and_never_admitted() -> None:
    buckets = _buckets(rpm=10, tpm=1000)
    rejection = buckets.admit(1001, 0.0)
    assert rejection is not None
    assert (rejection.kind, rejection.limit, rejection.requested, rejection.wait) == ("too_large", 1000, 1001, None)
    assert buckets.admit(1001, 3600.0) is not None
    assert buckets.tokens.remaining == 1000


def test_bucket_never_overfills() -> None:
    bucket = TokenBucket.per_minute(120, 60.0, now=0.0)
    bucket.take(1)
    bucket.refill(1000.0)
    assert bucket.level == 120
    assert bucket.until_full == 0.0


def test_per_model_limits_table() -> None:
    limits = RateLimits((100, 1000), {"gpt-4o": (5, 50)}, 60.0)
    assert limits.buckets("gpt-4o", 0.0).requests.limit == 5
    assert limits.buckets("anything-else", 0.0).tokens.limit == 1000


async def test_app_admission_follows_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    # prompt "hi" = 8 tokens, max_tokens 2: cost 10 of a 20-token minute.
    call = make_app(fast_config(rpm=100, tpm=20))
    body = chat_body("hi", max_tokens=2)
    assert (await call.request("POST", "/v1/chat/completions", body))[0] == 200
    assert (await call.request("POST", "/v1/chat/completions", body))[0] == 200
    status, headers, payload = await call.request("POST", "/v1/chat/completions", body)
    assert status == 429
    assert json.loads(payload)["error"]["type"] == "tokens"
    await trio.sleep(int(headers["retry-after-ms"]) / 1000)
    status, headers, _ = await call.request("POST", "/v1/chat/completions", body)
    assert status == 200
    assert headers["x-ratelimit-remaining-tokens"] == "0"


async def test_latency_model_under_autojump(autojump_clock: trio.abc.Clock) -> None:
    call = make_app(fast_config(latency_ms=200.0, per_token_latency_ms=10.0))
    before = trio.current_time()
    status, _, payload = await call.request("POST", "/v1/chat/completions", chat_body(max_tokens=5))
    assert status == 200
    assert json.loads(payload)["usage"]["completion_tokens"] == 5
    assert trio.current_time() - before == pytest.approx(0.2 + 5 * 0.01)


async def test_slow_replies_add_slow_ms(autojump_clock: trio.abc.Clock) -> None:
    call = make_app(fast_config(slow_rate=1.0, slow_ms=3000.0, latency_ms=100.0))
    before = trio.current_time()
    status, _, _ = await call.request("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
    assert status == 200
    assert trio.current_time() - before == pytest.approx(3.1)
