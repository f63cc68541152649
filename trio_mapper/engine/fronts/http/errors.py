"""Engine failures as OpenAI error replies: the status and ``{"error": {...}}`` body the official SDK turns into
the matching exception, and the ``x-should-retry`` / ``retry-after`` headers that steer its retries.

The engine has already retried what was worth retrying, so a final failure says ``x-should-retry: false``
unless waiting can help (the engine is busy or restarting), where it says ``retry-after`` (and ``retry-after-ms``)
instead.
"""

from __future__ import annotations

from typing import Final

import attrs
import msgspec

from trio_mapper.engine.core.outcome import Failed
from trio_mapper.kinds import ErrorKind

Headers = list[tuple[bytes, bytes]]


@attrs.frozen
class ErrorShape:
    status: int
    type: str
    #: None: retry-after is not sent, and x-should-retry is false. A number: retry-after, and the SDK may retry.
    retry_after: int | None = None


#: Every kind the core reports, as HTTP. Timeouts are 504 (the SDK raises InternalServerError and retries it,
#: as it would a 408): the engine is a gateway whose upstream did not answer in time; 408 would say that the
#: client was too slow to send its request, and the SDK has no exception class of its own for it. A timeout
#: may succeed later (the queue drains), so the SDK may retry it, as it retries its own timeouts.
SHAPES: Final[dict[ErrorKind, ErrorShape]] = {
    ErrorKind.INVALID_REQUEST: ErrorShape(400, "invalid_request_error"),
    # 400, not 413: the SDK raises BadRequestError for it (413 has no class of its own), and it can never succeed.
    ErrorKind.REQUEST_TOO_LARGE: ErrorShape(400, "invalid_request_error"),
    ErrorKind.RATE_LIMITED: ErrorShape(429, "insufficient_quota"),
    ErrorKind.OVERLOADED: ErrorShape(503, "server_error", retry_after=1),
    ErrorKind.TIMEOUT: ErrorShape(504, "timeout", retry_after=1),
    ErrorKind.SHUTTING_DOWN: ErrorShape(503, "server_error", retry_after=1),
    ErrorKind.UPSTREAM_UNREACHABLE: ErrorShape(502, "server_error"),
    ErrorKind.UPSTREAM_ERROR: ErrorShape(502, "server_error"),
    ErrorKind.INTERNAL_ERROR: ErrorShape(500, "server_error"),
    ErrorKind.CANCELLED: ErrorShape(499, "cancelled"),
    ErrorKind.PROTOCOL_ERROR: ErrorShape(400, "invalid_request_error"),
    ErrorKind.FORBIDDEN: ErrorShape(403, "permission_denied"),
    # 429 as OpenAI answers a spent quota (the SDK raises RateLimitError), and final: it refills over hours.
    ErrorKind.BUDGET_EXHAUSTED: ErrorShape(429, "insufficient_quota"),
}
#: Kinds where the same request may succeed later; every other final failure says x-should-retry: false.
_WORTH_WAITING: Final = frozenset({ErrorKind.SHUTTING_DOWN, ErrorKind.OVERLOADED, ErrorKind.TIMEOUT})
#: The ``code`` of the body for each kind: OpenAI's own where one exists, else the engine's kind.
CODES: Final[dict[ErrorKind, str]] = {ErrorKind.RATE_LIMITED: "insufficient_quota"}

_encoder: Final = msgspec.json.Encoder()


def body_headers(body: bytes, content_type: bytes = b"application/json") -> Headers:
    """The head of a whole reply, JSON unless said: its type, and its length, so the body goes out as is (no
    chunked framing)."""
    return [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return _encoder.encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


def retry_headers(retry_after: int | None) -> Headers:
    """``x-should-retry``, and when a retry may help, the wait in both forms OpenAI sends: the official SDKs
    read ``retry-after-ms`` first, other clients (and proxies) ``retry-after``."""
    if retry_after is None:
        return [(b"x-should-retry", b"false")]
    return [
        (b"x-should-retry", b"true"),
        (b"retry-after", str(retry_after).encode()),
        (b"retry-after-ms", str(retry_after * 1000).encode()),
    ]


def render_failure(event: Failed) -> tuple[int, Headers, bytes]:
    """Status, headers and body for a final failure.

    An upstream's own final answer (a 4xx, a quota 429, a 5xx after the engine's retries) passes through with
    its status and body, so the SDK raises what it would have raised talking to the upstream directly; but an
    upstream 401 is about the engine's key, not the client's, and is a 502.
    """
    shape = SHAPES.get(event.kind, SHAPES[ErrorKind.INTERNAL_ERROR])
    if event.status == 401:
        # The upstream refused the engine's own key. Passed through, the SDK would raise AuthenticationError and
        # the client would look for a fault in its key, which was never sent upstream: this is the gateway's.
        return 502, retry_headers(None), error_body(event.message, "server_error", "upstream_authentication")
    if event.status is not None and event.body is not None and event.status >= 400:
        retry = shape.retry_after if event.kind in _WORTH_WAITING else None
        status = event.status
        if event.kind is ErrorKind.TIMEOUT:
            status = 504  # the last answer was retryable, but the deadline ran out: the SDK must see a timeout
        body = event.body.content if event.body.content.lstrip().startswith(b"{") else b""
        if not body or event.kind is ErrorKind.TIMEOUT:
            body = error_body(event.message, shape.type, CODES.get(event.kind, event.kind.value))
        return status, retry_headers(retry), body
    return (
        shape.status,
        retry_headers(shape.retry_after),
        error_body(event.message, shape.type, CODES.get(event.kind, event.kind.value), event.param),
    )


def stream_error_event(event: Failed, *, responses_api: bool, sequence_number: int) -> bytes:
    """The event that ends a stream which failed after it started (its status line has gone out as a 200).

    Chat and completions streams end with ``data: {"error": {...}}``, on which the SDK raises `APIError`; the
    Responses API has a typed ``error`` event of its own.
    """
    shape = SHAPES.get(event.kind, SHAPES[ErrorKind.INTERNAL_ERROR])
    code = CODES.get(event.kind, event.kind.value)
    if responses_api:
        payload = {
            "type": "error",
            "code": code,
            "message": event.message,
            "param": None,
            "sequence_number": sequence_number,
        }
        return b"event: error\ndata: " + _encoder.encode(payload) + b"\n\n"
    return b"data: " + error_body(event.message, shape.type, code) + b"\n\n"
