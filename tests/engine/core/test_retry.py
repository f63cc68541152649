from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
import trio

from trio_mapper.engine.core.retry import (
    DEFAULT_MAX_ATTEMPTS,
    MAX_HONOURED_WAIT,
    BackoffRetry,
    FinalFailure,
    RateLimitRetry,
    Success,
    backoff_delay,
    classify_exception,
    classify_response,
    classify_stream_error,
    exhausted,
    parse_error_body,
)
from trio_mapper.engine.upstream.client import SwitchedProtocols
from trio_mapper.wire import ErrorKind


def error(message: str, type: str | None = None, code: str | None = None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


TPM_MESSAGE = (
    "Rate limit reached for gpt-4o-mini in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Used 29937, Requested 385. Please try again in 644ms. Visit "
    "https://platform.openai.com/account/rate-limits to learn more."
)
RPM_MESSAGE = (
    "Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): Limit 500, Used 500, "
    "Requested 1. Please try again in 120ms."
)
TOO_LARGE_MESSAGE = (
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Requested "
    "31538. The input or output tokens must be reduced in order to run successfully."
)
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more information on "
    "this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
KEY_MESSAGE = (
    "Incorrect API key provided: sk-proj-abcd****************************wxyz. You can find your API key at "
    "https://platform.openai.com/account/api-keys."
)
HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    "</center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)


# --- the reference table --------------------------------------------------------------------------


def test_2xx_is_success() -> None:
    assert classify_response(200, {}, {"id": "chatcmpl-1"}) == Success()
    assert classify_response(201, {"x-should-retry": "true"}, None) == Success()


def test_429_tokens_rate_limit() -> None:
    verdict = classify_response(429, {}, error(TPM_MESSAGE, "tokens", "rate_limit_exceeded"))
    assert isinstance(verdict, RateLimitRetry)
    assert verdict.wait == pytest.approx(0.644)
    assert verdict.scope == "tokens"
    assert "rate_limit_exceeded" in verdict.reason


def test_429_requests_rate_limit_prefers_headers_for_the_wait() -> None:
    headers = {"retry-after-ms": "250", "retry-after": "1"}
    verdict = classify_response(429, headers, error(RPM_MESSAGE, "requests", "rate_limit_exceeded"))
    assert isinstance(verdict, RateLimitRetry)
    assert (verdict.wait, verdict.scope) == (0.25, "requests")


def test_429_scope_from_message_when_type_is_missing() -> None:
    verdict = classify_response(429, {}, error(RPM_MESSAGE, None, "rate_limit_exceeded"))
    assert isinstance(verdict, RateLimitRetry)
    assert verdict.scope == "requests"
    assert verdict.wait == pytest.approx(0.12)


def test_429_scope_from_headers_when_body_is_silent() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-remaining-tokens": "0",
        "retry-after": "2",
    }
    assert classify_response(429, headers, None) == RateLimitRetry(2.0, "tokens", "HTTP 429")


def test_429_request_too_large_is_final() -> None:
    verdict = classify_response(429, {"retry-after": "1"}, error(TOO_LARGE_MESSAGE, "tokens", "rate_limit_exceeded"))
    assert isinstance(verdict, FinalFailure)
    assert verdict.kind is ErrorKind.REQUEST_TOO_LARGE
    assert "31538" in verdict.message
    assert "max_tokens" in verdict.message
    assert "not retried" in verdict.message


@pytest.mark.parametrize(
    "body",
    [
        error(QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"),
        error(QUOTA_MESSAGE, "insufficient_quota", None),
        error(QUOTA_MESSAGE, None, "insufficient_quota"),
        error("Your credit balance is too low.", "invalid_request_error", "credit_balance_exhausted"),
        error("Project spend limit reached.", "invalid_request_error", "project_spend_limit_exceeded"),
        error("Organization usage limit reached.", "organization_usage_limit_exceeded", None),
    ],
)
def test_quota_and_spend_limits_are_never_retried(body: Any) -> None:
    verdict = classify_response(429, {"retry-after": "20"}, body)
    assert isinstance(verdict, FinalFailure)
    assert verdict.kind is ErrorKind.RATE_LIMITED
    assert "not retried" in verdict.message


def test_quota_message_says_what_to_do() -> None:
    verdict = classify_response(429, {}, error(QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"))
    assert isinstance(verdict, FinalFailure)
    assert verdict.message.startswith("The API key's quota is exhausted (HTTP 429 insufficient_quota")
    assert "billing" in verdict.message


def test_quota_code_is_final_whatever_the_status() -> None:
    verdict = classify_response(403, {}, error(QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"))
    assert isinstance(verdict, FinalFailure)
    assert verdict.kind is ErrorKind.RATE_LIMITED


def test_azure_429() -> None:
    body = {
        "error": {
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
            "2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry "
            "after 3 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further "
            "increase the default rate limit.",
        }
    }
    verdict = classify_response(429, {"x-ratelimit-remaining-requests": "-1"}, body)
    assert isinstance(verdict, RateLimitRetry)
    assert verdict.wait == 3.0
    assert verdict.scope is None


def test_azure_429_with_retry_after_ms() -> None:
    verdict = classify_response(429, {"retry-after-ms": "2500"}, {"error": {"code": "429", "message": "busy"}})
    assert isinstance(verdict, RateLimitRetry)
    assert verdict.wait == 2.5


@pytest.mark.parametrize("body", [None, "", HTML_502, "Too Many Requests", b"", ["unexpected"], 42])
def test_429_without_a_json_error_is_retried(body: Any) -> None:
    verdict = classify_response(429, {"retry-after": "7"}, body)
    assert isinstance(verdict, RateLimitRetry)
    assert verdict.wait == 7.0


@pytest.mark.parametrize(
    ("status", "body", "advice"),
    [
        (
            400,
            error(
                "This model's maximum context length is 128000 tokens. However, your messages resulted in "
                "130000 tokens.",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            ),
            "shorten the messages",
        ),
        (
            400,
            error(
                "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                "'max_completion_tokens' instead.",
                "invalid_request_error",
                "unsupported_parameter",
                "max_tokens",
            ),
            "parameter 'max_tokens'",
        ),
        (401, error(KEY_MESSAGE, "invalid_request_error", "invalid_api_key"), "check OPENAI_API_KEY"),
        (
            403,
            error(
                "Country, region, or territory not supported",
                "request_forbidden",
                "unsupported_country_region_territory",
            ),
            "region",
        ),
        (
            404,
            error(
                "The model `gpt-5-ultra` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
            "check the model name",
        ),
        (422, error("Unprocessable", "invalid_request_error"), "fix the request"),
        (413, "<html><title>413 Request Entity Too Large</title></html>", "smaller request body"),
        (418, None, "fix the request"),
    ],
)
def test_other_4xx_are_final_upstream_errors(status: int, body: Any, advice: str) -> None:
    verdict = classify_response(status, {"retry-after": "1"}, body)
    assert isinstance(verdict, FinalFailure)
    assert verdict.kind is ErrorKind.UPSTREAM_ERROR
    assert f"HTTP {status}" in verdict.message
    assert advice in verdict.message
    assert "not retried" in verdict.message
    upstream = parse_error_body(body)
    if upstream.code:
        assert upstream.code in verdict.message


def test_401_message_never_contains_the_key() -> None:
    verdict = classify_response(401, {}, error(KEY_MESSAGE, "invalid_request_error", "invalid_api_key"))
    assert isinstance(verdict, FinalFailure)
    assert "sk-" not in verdict.message
    assert "wxyz" not in verdict.message
    assert "[redacted]" in verdict.message


def test_bearer_tokens_are_scrubbed() -> None:
    body = {"error": {"message": "bad header Authorization: Bearer sk-live-123456789 rejected", "code": "x"}}
    verdict = classify_response(400, {}, body)
    assert isinstance(verdict, FinalFailure)
    assert "123456789" not in verdict.message


def test_long_upstream_messages_are_truncated() -> None:
    verdict = classify_response(400, {}, error("x " * 5000, "invalid_request_error"))
    assert isinstance(verdict, FinalFailure)
    assert len(verdict.message) < 600


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, error("The server had an error processing your request. Sorry about that!", "server_error")),
        (502, HTML_502),
        (
            503,
            error(
                "That model is currently overloaded with other requests.",
                "server_error",
                "server_is_overloaded",
            ),
        ),
        (504, None),
        (520, ""),
        (408, None),
        (409, {"error": {"message": "Conflict", "type": None, "code": None}}),
    ],
)
def test_transient_statuses_back_off(status: int, body: Any) -> None:
    verdict = classify_response(status, {}, body)
    assert isinstance(verdict, BackoffRetry)
    assert verdict.wait_hint is None
    assert f"HTTP {status}" in verdict.reason
    assert verdict.exhausted_kind is ErrorKind.UPSTREAM_ERROR


def test_html_502_reason_is_the_page_title() -> None:
    verdict = classify_response(502, {}, HTML_502)
    assert isinstance(verdict, BackoffRetry)
    assert verdict.reason == 'HTTP 502 (not JSON): "502 Bad Gateway"'


def test_5xx_honours_retry_after() -> None:
    verdict = classify_response(503, {"Retry-After": "4"}, None)
    assert verdict == BackoffRetry(4.0, "HTTP 503")


def test_long_wait_stays_retryable() -> None:
    verdict = classify_response(429, {"retry-after": "3600"}, error(RPM_MESSAGE, "requests", "rate_limit_exceeded"))
    assert isinstance(verdict, RateLimitRetry)
    assert verdict.wait == 3600.0
    assert backoff_delay(1, hint=verdict.wait, rng=random.Random(1)) <= 0.5


# --- x-should-retry -------------------------------------------------------------------------------


def test_should_retry_false_stops_a_5xx() -> None:
    verdict = classify_response(500, {"x-should-retry": "false"}, error("boom", "server_error"))
    assert isinstance(verdict, FinalFailure)
    assert verdict.kind is ErrorKind.UPSTREAM_ERROR
    assert "asked not to retry" in verdict.message


def test_should_retry_false_stops_a_429() -> None:
    verdict = classify_response(429, {"X-Should-Retry": "false"}, error(TPM_MESSAGE, "tokens", "rate_limit_exceeded"))
    assert isinstance(verdict, FinalFailure)
    assert verdict.kind is ErrorKind.RATE_LIMITED


def test_should_retry_true_retries_a_4xx() -> None:
    verdict = classify_response(400, {"x-should-retry": "true", "retry-after": "2"}, error("flaky", "x"))
    assert isinstance(verdict, BackoffRetry)
    assert verdict.wait_hint == 2.0


def test_should_retry_true_keeps_a_429_a_rate_limit() -> None:
    verdict = classify_response(429, httpx.Headers({"x-should-retry": "true"}), None)
    assert isinstance(verdict, RateLimitRetry)


@pytest.mark.parametrize(
    "body",
    [
        error(QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"),
        error(TOO_LARGE_MESSAGE, "tokens", "rate_limit_exceeded"),
    ],
)
def test_should_retry_true_never_overrides_a_final_body(body: Any) -> None:
    verdict = classify_response(429, {"x-should-retry": "true"}, body)
    assert isinstance(verdict, FinalFailure)


def test_should_retry_garbage_is_ignored() -> None:
    assert isinstance(classify_response(500, {"x-should-retry": "maybe"}, None), BackoffRetry)


# --- error bodies ---------------------------------------------------------------------------------


def test_parse_error_body_shapes() -> None:
    assert parse_error_body({"error": "plain string"}).message == "plain string"
    assert parse_error_body({"message": "no envelope", "code": 7}).code == "7"
    assert parse_error_body({"error": {"code": 429}}).code == "429"
    assert parse_error_body(None).describe(504) == "HTTP 504"
    assert parse_error_body([1, 2]).describe() == "no details"
    assert parse_error_body("  Bad\n gateway  ").describe(502) == 'HTTP 502 (not JSON): "Bad gateway"'


# --- exceptions -----------------------------------------------------------------------------------

REQUEST = httpx.Request("POST", "https://api.openai.com/v1/chat/completions")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectTimeout("timed out", request=REQUEST), ErrorKind.UPSTREAM_UNREACHABLE),
        (
            httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=REQUEST),
            ErrorKind.UPSTREAM_UNREACHABLE,
        ),
        (httpx.ProxyError("proxy said no", request=REQUEST), ErrorKind.UPSTREAM_UNREACHABLE),
        (httpx.ReadTimeout("read timed out", request=REQUEST), ErrorKind.UPSTREAM_ERROR),
        (httpx.WriteTimeout("", request=REQUEST), ErrorKind.UPSTREAM_ERROR),
        (httpx.PoolTimeout("", request=REQUEST), ErrorKind.UPSTREAM_ERROR),
        (
            httpx.RemoteProtocolError("Server disconnected without sending a response.", request=REQUEST),
            ErrorKind.UPSTREAM_ERROR,
        ),
        (httpx.ReadError("connection reset", request=REQUEST), ErrorKind.UPSTREAM_ERROR),
        (httpx.WriteError("broken pipe", request=REQUEST), ErrorKind.UPSTREAM_ERROR),
        (httpx.CloseError("", request=REQUEST), ErrorKind.UPSTREAM_ERROR),
    ],
)
def test_transport_errors_back_off(exc: Exception, kind: ErrorKind) -> None:
    verdict = classify_exception(exc)
    assert isinstance(verdict, BackoffRetry)
    assert verdict.exhausted_kind is kind
    assert type(exc).__name__ in verdict.reason


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (
            httpx.UnsupportedProtocol("Request URL is missing an 'http://' or 'https://' protocol."),
            ErrorKind.INTERNAL_ERROR,
        ),
        (httpx.LocalProtocolError("Illegal header value"), ErrorKind.INTERNAL_ERROR),
        (httpx.DecodingError("bad gzip"), ErrorKind.UPSTREAM_ERROR),
        (ValueError("oops"), ErrorKind.INTERNAL_ERROR),
        (RuntimeError(), ErrorKind.INTERNAL_ERROR),
    ],
)
def test_other_exceptions_are_final(exc: Exception, kind: ErrorKind) -> None:
    verdict = classify_exception(exc)
    assert isinstance(verdict, FinalFailure)
    assert verdict.kind is kind


@pytest.mark.parametrize("status", [100, 101, 103, 199])
def test_an_informational_status_as_the_answer_is_final(status: int) -> None:
    verdict = classify_response(status, {"x-should-retry": "true"}, None)
    assert isinstance(verdict, FinalFailure) and verdict.kind is ErrorKind.UPSTREAM_ERROR
    assert f"answered HTTP {status}" in verdict.message and "not retried" in verdict.message


def test_a_switch_of_protocols_is_final_not_a_passing_protocol_error() -> None:
    # As h11 (under httpcore) reports a 101 to a request that proposed no upgrade: it never arrives as a response.
    verdict = classify_exception(SwitchedProtocols("the upstream answered 101 Switching Protocols"))
    assert verdict == classify_response(101, {}, None)
    assert isinstance(classify_exception(httpx.RemoteProtocolError("Server disconnected")), BackoffRetry)


def test_exception_messages_are_scrubbed() -> None:
    verdict = classify_exception(ValueError("header Authorization: Bearer sk-secret-value-123"))
    assert isinstance(verdict, FinalFailure)
    assert "secret" not in verdict.message


@pytest.mark.parametrize(
    ("error", "quoted"),
    [
        ({"error": {"message": "The server had an error", "type": "server_error"}}, 'server_error: "The server'),
        # The Responses API's error event, and the response of its response.failed event.
        ({"type": "error", "code": "server_error", "message": "boom", "param": None}, 'server_error: "boom"'),
        ({"status": "failed", "error": {"code": "rate_limit_exceeded", "message": "slow"}}, 'exceeded: "slow"'),
        ({"error": {"message": "key sk-proj-abcdef0123456789 leaked"}}, "key [redacted] leaked"),
        ("overloaded", '(not JSON): "overloaded"'),
    ],
)
def test_an_error_that_ends_a_stream_is_final_and_quoted(error: Any, quoted: str) -> None:
    verdict = classify_stream_error(error)
    assert verdict.kind is ErrorKind.UPSTREAM_ERROR
    assert quoted in verdict.message and "not retried" in verdict.message


def test_cancellation_is_never_swallowed() -> None:
    with pytest.raises(KeyboardInterrupt):
        classify_exception(KeyboardInterrupt())


async def test_trio_cancelled_propagates() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            with pytest.raises(trio.Cancelled):
                classify_exception(exc)
            raise


# --- backoff --------------------------------------------------------------------------------------


def test_backoff_schedule_bounds() -> None:
    rng = random.Random(1234)
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (50, 8.0), (5000, 8.0)]:
        for _ in range(200):
            delay = backoff_delay(attempt, rng=rng)
            assert 0.75 * base < delay <= base


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    first = [backoff_delay(n, rng=random.Random(7)) for n in range(1, 8)]
    again = [backoff_delay(n, rng=random.Random(7)) for n in range(1, 8)]
    assert first == again


def test_backoff_jitter_extremes() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    assert backoff_delay(3, rng=Fixed(0.0)) == 2.0
    assert backoff_delay(3, rng=Fixed(0.999999)) == pytest.approx(1.5, abs=1e-5)


@pytest.mark.parametrize(
    ("hint", "honoured"),
    [(0.644, True), (120.0, True), (3.0, True), (0.0, False), (-1.0, False), (120.5, False), (None, False)],
)
def test_backoff_hint(hint: float | None, honoured: bool) -> None:
    delay = backoff_delay(2, hint=hint, rng=random.Random(0))
    if honoured:
        assert delay == hint
    else:
        assert 0.75 <= delay <= 1.0


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_delay(0)


def test_defaults() -> None:
    assert MAX_HONOURED_WAIT == 120.0
    assert 3 <= DEFAULT_MAX_ATTEMPTS <= 10


# --- giving up ------------------------------------------------------------------------------------


def test_exhausted_unreachable() -> None:
    verdict = classify_exception(httpx.ConnectError("Name or service not known", request=REQUEST))
    assert isinstance(verdict, BackoffRetry)
    final = exhausted(verdict, attempts=6)
    assert final.kind is ErrorKind.UPSTREAM_UNREACHABLE
    assert "DNS" in final.message
    assert "Name or service not known" in final.message


def test_exhausted_5xx() -> None:
    verdict = classify_response(
        503, {}, error("That model is currently overloaded.", "server_error", "server_is_overloaded")
    )
    assert isinstance(verdict, BackoffRetry)
    final = exhausted(verdict, attempts=1)
    assert final.kind is ErrorKind.UPSTREAM_ERROR
    assert "after 1 attempt " in final.message
    assert "server_is_overloaded" in final.message


def test_wait_late_in_a_long_message_is_still_found() -> None:
    body = {"error": {"code": "429", "message": "Rate limited. " + "Details. " * 60 + "Please retry after 9 seconds."}}
    verdict = classify_response(429, {}, body)
    assert isinstance(verdict, RateLimitRetry)
    assert verdict.wait == 9.0
    assert len(verdict.reason) < 400
