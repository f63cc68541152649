"""Which upstream outcomes are retried, how long to wait, and what to tell the client when we give up.

Pure functions, no I/O: the engine feeds them a status, headers and decoded body (or an exception) and acts on
the verdict. Unlike the official SDK, which never reads the body, a 429 is classified by its error code and
type first, because a quota or spend-limit 429 never clears by waiting and "Request too large" never fits.

Precedence, highest first:

1. 2xx is `Success`.
2. A body that says the request can never succeed is a `FinalFailure`, whatever ``x-should-retry`` says:
   ``insufficient_quota``, ``credit_balance_exhausted``, ``*_spend_limit_exceeded`` and
   ``*_usage_limit_exceeded`` (as code or type, any status), and a 429 whose message starts "Request too
   large".
3. ``x-should-retry: true|false`` from the upstream decides next, as the official SDK lets it.
4. The status: 429 is a `RateLimitRetry`; 408, 409 and 5xx a `BackoffRetry`; anything else is final.

A 1xx as the final answer (a 101 Switching Protocols, which h11 raises as `SwitchedProtocols`) is final before
any of these: no OpenAI-compatible API answers so, and retrying would only ask the same server again.

A verdict's wait may exceed `MAX_HONOURED_WAIT`. It stays retryable: a 429's wait pauses the model's lane for
at most the cap (the scheduler's choice; the request waits on until its deadline), and `backoff_delay` never
sleeps longer than the cap (it falls back to the exponential schedule), so a wild ``retry-after`` cannot park
a request for an hour.

Every message built here is client-facing and says what to do. Upstream text passes through `_scrub`, which
masks anything shaped like an API key or a bearer token; no header value other than the waits is read.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
import httpx

from trio_mapper.engine.upstream.client import SwitchedProtocols
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot, retry_after_seconds
from trio_mapper.kinds import ErrorKind, is_transient_status

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "MAX_HONOURED_WAIT",
    "BackoffRetry",
    "FinalFailure",
    "RateLimitRetry",
    "Success",
    "UpstreamError",
    "Verdict",
    "backoff_delay",
    "classify_exception",
    "classify_response",
    "classify_stream_error",
    "exhausted",
    "parse_error_body",
]

#: The longest upstream-requested wait `backoff_delay` honours, in seconds, as in the official SDK.
MAX_HONOURED_WAIT: Final = 120.0
#: Upstream attempts per request, retries included, when the client does not say. The SDK makes 3; we allow
#: more because the engine paces admissions (so a retry rarely adds load) and callers are batch jobs that
#: prefer a late answer to a failure: 5 backoffs of 0.5, 1, 2, 4, 8 s ride out ~15 s of 5xx or network
#: trouble, and past that the outage is real and the client should hear about it.
DEFAULT_MAX_ATTEMPTS: Final[int] = 6

# Exponential backoff schedule of the official SDK (INITIAL_RETRY_DELAY, MAX_RETRY_DELAY).
_INITIAL_DELAY: Final = 0.5
_MAX_DELAY: Final = 8.0
_JITTER: Final = 0.25
# 2.0 ** 1100 overflows a float; the delay is capped at 8 s long before this exponent.
_MAX_EXPONENT: Final = 30

_QUOTA_CODES: Final = frozenset({"insufficient_quota", "credit_balance_exhausted"})
_LIMIT_SUFFIXES: Final = ("_spend_limit_exceeded", "_usage_limit_exceeded")
# Upstream messages are quoted, but an HTML error page or a runaway message must not flood the client.
_MAX_QUOTED_CHARS: Final = 300
_SECRET: Final = re.compile(
    r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-*.]{4,}|\b(?:Bearer|Basic)\s+[A-Za-z0-9_\-.~+/=*]+", re.IGNORECASE
)
_HTML_TITLE: Final = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG: Final = re.compile(r"<[^>]+>")


@attrs.frozen
class Success:
    """A 2xx reply: hand it to the client."""


@attrs.frozen
class RateLimitRetry:
    """A retryable 429: pause the model's lane for `wait` seconds (the engine's own pacing if None), retry."""

    wait: float | None
    #: Which budget ran out, when the upstream said; None means unknown (treat as both).
    scope: Literal["requests", "tokens"] | None
    #: The upstream's reason, scrubbed, for the client-facing message if retries run out.
    reason: str = ""


@attrs.frozen
class BackoffRetry:
    """A transient failure (408, 409, 5xx, timeout, connection): retry after `backoff_delay`."""

    wait_hint: float | None
    reason: str
    #: The kind to report if every attempt fails this way: unreachable for connection failures.
    exhausted_kind: ErrorKind = ErrorKind.UPSTREAM_ERROR


@attrs.frozen
class FinalFailure:
    """An outcome that retrying cannot change: answer the client with `kind` and `message`."""

    kind: ErrorKind
    message: str


Verdict = Success | RateLimitRetry | BackoffRetry | FinalFailure


@attrs.frozen
class UpstreamError:
    """The fields of an OpenAI-style ``{"error": {...}}`` body, each "" when absent; text already scrubbed.

    The message is kept whole (the wait it names may come late in it); `describe` shortens it for display.
    """

    message: str = ""
    type: str = ""
    code: str = ""
    param: str = ""
    #: True when the body was not JSON (an HTML page from a CDN or proxy, or plain text).
    not_json: bool = False

    def describe(self, status: int | None = None) -> str:
        """A short quotation such as ``HTTP 400 context_length_exceeded: "This model's maximum…"``."""
        label = self.code or self.type
        head = " ".join(part for part in (f"HTTP {status}" if status else "", label) if part)
        if self.not_json:
            head = f"{head} (not JSON)" if head else "(not JSON)"
        if not self.message:
            return head or "no details"
        quoted = f'"{_shorten(self.message)}"'
        return f"{head}: {quoted}" if head else quoted


def _scrub(text: str) -> str:
    """Mask credentials (a 401 message echoes a partly masked key) and fold whitespace."""
    return _SECRET.sub("[redacted]", " ".join(text.split()))


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_QUOTED_CHARS else text[: _MAX_QUOTED_CHARS - 1].rstrip() + "…"


def _text(value: Any) -> str:
    if value is None:
        return ""
    return _scrub(value if isinstance(value, str) else str(value))


def parse_error_body(body: Any) -> UpstreamError:
    """The error fields of a decoded body, tolerating every shape seen in the wild (Azure, proxies, HTML)."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            return UpstreamError(
                message=_text(error.get("message")),
                type=_text(error.get("type")),
                code=_text(error.get("code")),
                param=_text(error.get("param")),
            )
        if isinstance(error, str):
            return UpstreamError(message=_text(error))
        # Some gateways answer {"message": "...", "code": ...} without the "error" envelope.
        return UpstreamError(message=_text(body.get("message")), code=_text(body.get("code")))
    if isinstance(body, bytes | bytearray):
        body = bytes(body).decode("utf-8", "replace")
    if isinstance(body, str):
        title = _HTML_TITLE.search(body)
        text = title.group(1) if title else _TAG.sub(" ", body)
        return UpstreamError(message=_text(text), not_json=True)
    return UpstreamError()


def _is_quota(error: UpstreamError) -> bool:
    return any(value in _QUOTA_CODES or value.endswith(_LIMIT_SUFFIXES) for value in (error.code, error.type) if value)


def _is_too_large(status: int, error: UpstreamError) -> bool:
    return status == 429 and error.message.lower().startswith("request too large")


def _quota_failure(status: int, error: UpstreamError) -> FinalFailure:
    label = error.code or error.type
    if label in _QUOTA_CODES:
        advice = "check the plan and billing details of the API key's organization (add credit if needed)"
        what = "The API key's quota is exhausted"
    else:
        advice = "raise the limit in the project's or organization's settings, or wait until it resets"
        what = "A spend or usage limit of the API key's project is reached"
    return FinalFailure(
        ErrorKind.RATE_LIMITED,
        f"{what} ({error.describe(status)}): {advice}; this request was not retried.",
    )


def _too_large_failure(status: int, error: UpstreamError) -> FinalFailure:
    return FinalFailure(
        ErrorKind.REQUEST_TOO_LARGE,
        f"The request alone exceeds the model's tokens-per-minute limit ({error.describe(status)}): shorten "
        "the input or lower max_tokens, or use a model with a higher limit; it can never succeed as is, so "
        "it was not retried.",
    )


def _advice_for(status: int, error: UpstreamError) -> str:
    code = error.code
    if status == 401 or code == "invalid_api_key":
        return "check OPENAI_API_KEY (and the organization/project settings) of the engine"
    if code == "context_length_exceeded":
        return "shorten the messages or lower max_tokens to fit the model's context window"
    if code == "model_not_found" or status == 404:
        return "check the model name, that the API key's project has access to it, and the endpoint path"
    if status == 403:
        return "check that the API key's project may use this model or endpoint, and the region it runs from"
    if status == 413:
        return "send a smaller request body"
    if 400 <= status < 500:
        param = f" (parameter {error.param!r})" if error.param else ""
        return f"fix the request{param} as the message says"
    return "try again later; if it persists check the upstream's status page"


def _final_upstream(status: int, error: UpstreamError, *, note: str = "") -> FinalFailure:
    return FinalFailure(
        ErrorKind.UPSTREAM_ERROR,
        f"The upstream rejected the request ({error.describe(status)}): {_advice_for(status, error)}; "
        f"{note or 'this request was not retried'}.",
    )


def _informational(status: int) -> FinalFailure:
    """A 1xx as the final answer: 101 Switching Protocols (h11 raises `SwitchedProtocols` for it), or any other
    that a transport delivered (httpcore skips them, waiting for the final answer)."""
    return FinalFailure(
        ErrorKind.UPSTREAM_ERROR,
        f"The upstream answered HTTP {status}, an informational status that no OpenAI-compatible API answers "
        "these endpoints with (the engine asks it to switch to no other protocol): check that the engine's base "
        "URL points at an OpenAI-compatible API, and any proxy on the way; this request was not retried.",
    )


def _scope(error: UpstreamError, headers: Mapping[str, str]) -> Literal["requests", "tokens"] | None:
    if error.type in {"requests", "tokens"}:
        return "tokens" if error.type == "tokens" else "requests"
    message = error.message.lower()
    if "on tokens per" in message:
        return "tokens"
    if "on requests per" in message:
        return "requests"
    # Without a word from the body, the budget that reads zero is the one that ran out.
    snapshot = RateLimitSnapshot.from_headers(headers)
    tokens_out = snapshot.remaining_tokens == 0
    requests_out = snapshot.remaining_requests == 0
    if tokens_out != requests_out:
        return "tokens" if tokens_out else "requests"
    return None


def _should_retry(headers: Mapping[str, str]) -> bool | None:
    value = next((v for k, v in headers.items() if str(k).lower() == "x-should-retry"), None)
    if value is None:
        return None
    text = str(value).strip().lower()
    return True if text == "true" else False if text == "false" else None


def classify_response(status: int, headers: Mapping[str, str], body: Any) -> Verdict:
    """Decide what to do with an upstream HTTP response (see the module docstring for the precedence).

    Args:
        body: the decoded JSON body, or the text of a non-JSON body, or None when empty.
    """
    if 200 <= status < 300:
        return Success()
    if status < 200:
        return _informational(status)
    error = parse_error_body(body)
    if _is_quota(error):
        return _quota_failure(status, error)
    if _is_too_large(status, error):
        return _too_large_failure(status, error)

    wait = retry_after_seconds(headers, error.message or None)
    reason = error.describe(status)
    match _should_retry(headers):
        case False:
            if status == 429:
                return FinalFailure(
                    ErrorKind.RATE_LIMITED,
                    f"The upstream refused the request for its rate limits and asked not to retry "
                    f"({reason}): lower the request rate or raise the limits; this request was not retried.",
                )
            return _final_upstream(status, error, note="the upstream asked not to retry it")
        case True if status != 429:
            return BackoffRetry(wait, f"{reason}; the upstream asked to retry")
    if status == 429:
        return RateLimitRetry(wait, _scope(error, headers), reason)
    if is_transient_status(status):
        return BackoffRetry(wait, reason)
    return _final_upstream(status, error)


def classify_exception(exc: BaseException) -> Verdict:
    """Decide what to do when the HTTP exchange raised instead of answering.

    Raises:
        BaseException: `exc` itself when it is not an `Exception` (``trio.Cancelled``, ``KeyboardInterrupt``):
            those must propagate, never become a verdict.
    """
    if not isinstance(exc, Exception):
        raise exc
    detail = _text(str(exc))
    described = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        # Our own request or base URL is malformed; sending it again cannot help.
        return FinalFailure(
            ErrorKind.INTERNAL_ERROR,
            f"The engine could not send the request ({described}): check the engine's base URL setting; "
            "if it is right, please report this as a bug.",
        )
    if isinstance(exc, SwitchedProtocols):  # a RemoteProtocolError, but no passing one
        return _informational(101)
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError | httpx.ProxyError):
        return BackoffRetry(None, described, ErrorKind.UPSTREAM_UNREACHABLE)
    if isinstance(exc, httpx.TransportError):
        return BackoffRetry(None, described)
    if isinstance(exc, httpx.DecodingError):  # ReplyTooLarge too: a reply beyond what the engine holds
        return FinalFailure(
            ErrorKind.UPSTREAM_ERROR,
            f"The upstream's response could not be read ({described}): try again later; it was not "
            "retried because the upstream may already have processed (and billed) the request.",
        )
    return FinalFailure(
        ErrorKind.INTERNAL_ERROR,
        f"Unexpected error while calling the upstream ({described}): please report this as a bug.",
    )


def classify_stream_error(error: Any) -> FinalFailure:
    """The final answer to a stream that the upstream ended with an error event after it had started.

    The event reached the client (the SDK raises `APIError` at a chat or completions one); the reply is
    incomplete, and it is never retried, whatever the error, since part of it is with the client.

    Args:
        error: the event's data as `StreamRelay.error` holds it.
    """
    return FinalFailure(
        ErrorKind.UPSTREAM_ERROR,
        f"The upstream ended the stream with an error after it had started — {parse_error_body(error).describe()}. "
        "The reply is incomplete, and it was not retried because part of it had reached the client: submit it "
        "again.",
    )


def backoff_delay(attempt: int, *, hint: float | None = None, rng: random.Random | None = None) -> float:
    """Seconds to sleep after failed attempt number `attempt` (1-based: 1 after the first failure).

    The upstream's `hint` wins when 0 < hint ≤ `MAX_HONOURED_WAIT`; otherwise the SDK's schedule
    ``min(0.5 · 2^(attempt-1), 8) · (1 - 0.25 · U)`` with U uniform in [0, 1), i.e. 0.5, 1, 2, 4, 8, 8… minus
    up to 25 % jitter so that clients that failed together do not retry together.

    Raises:
        ValueError: `attempt` < 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    if hint is not None and 0 < hint <= MAX_HONOURED_WAIT:
        return hint
    base = min(_INITIAL_DELAY * 2.0 ** min(attempt - 1, _MAX_EXPONENT), _MAX_DELAY)
    draw = (rng or random).random()
    return base * (1 - _JITTER * draw)


def exhausted(verdict: BackoffRetry, *, attempts: int) -> FinalFailure:
    """The final answer when the engine stops retrying `verdict`, the last fault.

    Only faults run out: a rate-limit 429 is never final (the request waits for budget until its deadline).

    Args:
        attempts: how many upstream attempts ended in a fault.
    """
    plural = "attempt" if attempts == 1 else "attempts"
    why = f"still failing after {attempts} {plural}"
    if verdict.exhausted_kind is ErrorKind.UPSTREAM_UNREACHABLE:
        return FinalFailure(
            ErrorKind.UPSTREAM_UNREACHABLE,
            f"The upstream could not be reached, {why} (last error: {verdict.reason}): check the network, "
            "DNS, proxy settings and the engine's base URL.",
        )
    return FinalFailure(
        verdict.exhausted_kind,
        f"The upstream kept failing, {why} (last answer: {verdict.reason}): try again later; if it persists "
        "check the upstream's status page.",
    )
