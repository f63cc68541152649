from __future__ import annotations

import email.utils

import httpx
import pytest

from trio_mapper.engine.upstream.ratelimit_headers import (
    RateLimitSnapshot,
    budget_headers,
    format_duration,
    parse_duration,
    retry_after_seconds,
)

NOW = 1_750_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12ms", 0.012),
        ("9ms", 0.009),
        ("1s", 1.0),
        ("9.816s", 9.816),
        ("6m0s", 360.0),
        ("1m30.5s", 90.5),
        ("2h3m", 7380.0),
        ("1h0m0s", 3600.0),
        ("1.5us", 1.5e-6),
        ("1.5\u00b5s", 1.5e-6),
        ("1.5\u03bcs", 1.5e-6),
        ("250ns", 2.5e-7),
        (".5s", 0.5),
        ("0", 0.0),
        (" 20ms ", 0.02),
        ("-1s", -1.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "-1", "s", "ms", "1.2.3s", "1m 2s", "abc", "1d", "1S", "∞s", "nan"])
def test_parse_duration_garbage(text: str) -> None:
    assert parse_duration(text) is None


def test_snapshot_from_openai_headers() -> None:
    headers = httpx.Headers(
        {
            "x-ratelimit-limit-requests": "5000",
            "x-ratelimit-limit-tokens": "160000",
            "x-ratelimit-remaining-requests": "4999",
            "x-ratelimit-remaining-tokens": "159976",
            "x-ratelimit-reset-requests": "12ms",
            "x-ratelimit-reset-tokens": "9ms",
            "x-request-id": "req_deaa3616cbd15d33b4db96b3ba74d2b4",
        }
    )
    snapshot = RateLimitSnapshot.from_headers(headers)
    assert snapshot == RateLimitSnapshot(5000, 160000, 4999, 159976, 0.012, 0.009)
    assert not snapshot.is_empty


def test_snapshot_plain_dict_is_case_insensitive() -> None:
    snapshot = RateLimitSnapshot.from_headers(
        {"X-RateLimit-Remaining-Tokens": "12", "X-RATELIMIT-RESET-TOKENS": "6m0s"}
    )
    assert snapshot.remaining_tokens == 12
    assert snapshot.reset_tokens == 360.0
    assert snapshot.limit_requests is None


def test_snapshot_missing_headers() -> None:
    snapshot = RateLimitSnapshot.from_headers({"content-type": "application/json"})
    assert snapshot == RateLimitSnapshot()
    assert snapshot.is_empty


def test_snapshot_azure_sentinels_and_garbage() -> None:
    # Azure sends only the remaining pair, and -1 when it does not know.
    snapshot = RateLimitSnapshot.from_headers(
        {
            "x-ratelimit-remaining-requests": "-1",
            "x-ratelimit-remaining-tokens": "-1",
            "x-ratelimit-limit-tokens": "lots",
            "x-ratelimit-reset-tokens": "-1",
            "x-ratelimit-reset-requests": "soon",
        }
    )
    assert snapshot == RateLimitSnapshot()


def test_snapshot_reset_as_plain_seconds() -> None:
    assert RateLimitSnapshot.from_headers({"x-ratelimit-reset-requests": "1.5"}).reset_requests == 1.5
    assert RateLimitSnapshot.from_headers({"x-ratelimit-reset-requests": "0s"}).reset_requests == 0.0


def test_retry_after_ms_wins() -> None:
    headers = {"retry-after-ms": "1500.5", "retry-after": "20"}
    assert retry_after_seconds(headers, "Please try again in 6m0s.") == pytest.approx(1.5005)


def test_retry_after_seconds_header() -> None:
    assert retry_after_seconds(httpx.Headers({"Retry-After": "20"})) == 20.0
    assert retry_after_seconds({"Retry-After": "2.5"}) == 2.5


def test_retry_after_http_date() -> None:
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=NOW) == pytest.approx(30.0)


def test_retry_after_http_date_in_the_past_is_ignored() -> None:
    date = email.utils.formatdate(NOW - 30, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=NOW) is None


def test_unusable_header_falls_through_to_the_next_source() -> None:
    headers = {"retry-after-ms": "0", "retry-after": "-3"}
    assert retry_after_seconds(headers, "Please try again in 644ms. Visit https://…") == pytest.approx(0.644)
    assert retry_after_seconds({"retry-after-ms": "soon", "retry-after": "4"}) == 4.0
    assert retry_after_seconds({"retry-after": "inf"}) is None
    assert retry_after_seconds({"retry-after": "not a date"}) is None


@pytest.mark.parametrize(
    ("message", "seconds"),
    [
        (
            "Rate limit reached for gpt-4o-mini in org org-abc on tokens per min (TPM): Limit 30000, "
            "Used 29937, Requested 385. Please try again in 644ms. Visit "
            "https://platform.openai.com/account/rate-limits",
            0.644,
        ),
        ("Please try again in 1.5s.", 1.5),
        ("Please try again in 6m0s.", 360.0),
        ("Please try again in 20s.", 20.0),
        ("on requests per day (RPD): Limit 200, Used 200, Requested 1. Please try again in 7m12s.", 432.0),
        (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have "
            "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 3 seconds.",
            3.0,
        ),
        ("Please retry after 1 second.", 1.0),
        ("Try again in 2 minutes", 120.0),
        ("Please try again in 500 milliseconds", 0.5),
    ],
)
def test_retry_after_from_message(message: str, seconds: float) -> None:
    assert retry_after_seconds({}, message) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "message",
    [None, "", "You exceeded your current quota", "Please try again later.", "Please try again in 0s."],
)
def test_retry_after_nothing_usable(message: str | None) -> None:
    assert retry_after_seconds({}, message) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.012, "12ms"), (1.0, "1s"), (9.8164, "9.816s"), (360.0, "6m0s"), (90.5, "1m30.5s")],
)
def test_format_duration_writes_what_parse_duration_reads(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds, abs=0.001)


def test_budget_headers_read_back_as_a_snapshot() -> None:
    headers = budget_headers(
        limit_requests=5000,
        limit_tokens=160000,
        remaining_requests=4999.7,
        remaining_tokens=-3.0,
        reset_requests=0.012,
        reset_tokens=None,
    )
    assert headers["x-ratelimit-remaining-requests"] == "4999"
    assert headers["x-ratelimit-remaining-tokens"] == "0"  # debt is shown as nothing left
    assert "x-ratelimit-reset-tokens" not in headers
    snapshot = RateLimitSnapshot.from_headers(headers)
    assert (snapshot.limit_requests, snapshot.limit_tokens) == (5000, 160000)
    assert snapshot.reset_requests == pytest.approx(0.012)
