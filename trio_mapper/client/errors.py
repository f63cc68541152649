"""Exceptions raised by the client helpers (`trio_mapper.client`, `trio_mapper.client.aio`).

The protocol core (`trio_mapper.client.core`) builds them as values (a request's error is an event's
outcome, a lost connection a state) and the drivers raise them in the caller that waits.

Every failure is a `TrioMapperError`. The engine's `ErrorKind` values each have a subclass named after them;
a kind this version does not know (sent by a newer engine) becomes a plain `TrioMapperError` carrying that
kind, so ``except TrioMapperError`` keeps working across upgrades. Two client-side classes cover the
connection itself: `EngineUnavailable` (nothing to connect to) and `ConnectionLost` (it went away).

Light on purpose: the standard library and `trio_mapper.wire` only.
"""

from __future__ import annotations

import os
from typing import Any, Final

from trio_mapper.kinds import is_transient_status
from trio_mapper.wire import ErrorKind, RequestId

#: Client-side kinds: never sent by the engine, so they cannot collide with an `ErrorKind`.
ENGINE_UNAVAILABLE_KIND: Final = "engine_unavailable"
CONNECTION_LOST_KIND: Final = "connection_lost"


class TrioMapperError(Exception):
    """A request (or the connection to the engine) failed.

    Attributes:
        kind: the engine's `ErrorKind` value as a string (or a client-side kind, see the subclasses).
        message: the human-readable explanation.
        status: the upstream HTTP status, when there was one.
        body: the upstream's error body (decoded JSON, or text), when there was one.
        headers: useful upstream headers (``x-request-id``, ``x-ratelimit-*``…).
        attempts: how many upstream attempts the engine made.
        request_id: the protocol id of the request this error settles, or None.
        param: the request body's field at fault (``messages[0].content``) when the engine refused the
            request itself, else None.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        attempts: int = 0,
        request_id: RequestId | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(kind, message)
        self.kind = str(kind)
        self.message = message
        self.status = status
        self.body = body
        self.headers = dict(headers) if headers else {}
        self.attempts = attempts
        self.request_id = request_id
        self.param = param

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return f"[{self.kind}]{status} {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, message={self.message!r}, status={self.status!r}, "
            f"attempts={self.attempts!r}, request_id={self.request_id!r})"
        )

    def __reduce__(self) -> Any:
        # Keyword-only arguments defeat Exception's default pickling (it replays ``self.args``); rebuild
        # from the attributes so errors cross process boundaries (multiprocessing, concurrent.futures).
        return (_rebuild, (type(self), dict(self.__dict__)))


def _rebuild(cls: type[TrioMapperError], state: dict[str, Any]) -> TrioMapperError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("kind"), state.get("message"))
    error.__dict__.update(state)
    return error


class InvalidRequestError(TrioMapperError):
    """The request itself is unusable (bad endpoint, body not an object, unknown model…): fix it."""


class UpstreamError(TrioMapperError):
    """The upstream answered with a final error (a 4xx other than rate limits, or 5xx retries ran out)."""


class RateLimitedError(TrioMapperError):
    """A 429 that cannot succeed (quota or spend limit exhausted), or rate-limit retries ran out."""


class RequestTooLargeError(TrioMapperError):
    """The request alone costs more tokens than the whole per-minute budget: it can never be admitted."""


class OverloadedError(TrioMapperError):
    """The engine's queue is full: try again later or lower your concurrency."""


class RequestTimeoutError(TrioMapperError):
    """The request's ``deadline`` passed before it completed (named so as not to shadow `TimeoutError`)."""


class RequestCancelledError(TrioMapperError):
    """The request was cancelled in the engine."""


class ShuttingDownError(TrioMapperError):
    """The engine is shutting down and did not start this request."""


class ProtocolError(TrioMapperError):
    """The engine and this client do not understand each other (version mismatch, malformed frame…)."""


class UpstreamUnreachableError(TrioMapperError):
    """The upstream could not be reached (DNS, refused, TLS) after all attempts."""


class InternalEngineError(TrioMapperError):
    """A bug in the engine; the message says what happened. Please report it."""


class ForbiddenError(TrioMapperError):
    """This client is not allowed to use the engine."""


class BudgetExhaustedError(TrioMapperError):
    """The client's tenant spent its daily token or cost budget; it refills as the day's spending ages out."""


class EngineUnavailable(TrioMapperError):
    """Nothing answers on the engine's socket; the message says which path was tried and how to start one."""

    def __init__(self, message: str, *, socket_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(ENGINE_UNAVAILABLE_KIND, message)
        self.socket_path = None if socket_path is None else os.fspath(socket_path)


class ConnectionLost(TrioMapperError):
    """The connection to the engine closed or broke while requests were outstanding (or it was closed).

    The clients connect again on their next call; what was outstanding is never sent again by them.

    Attributes:
        may_have_reached_upstream: for the error of one request (``request_id`` set): True when its frame
            had been written, so the engine may have run it (and its answer is lost); False when it was
            never sent, so resubmitting it cannot run it twice. None for the connection as a whole.
    """

    def __init__(
        self,
        message: str,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        request_id: RequestId | None = None,
        may_have_reached_upstream: bool | None = None,
    ) -> None:
        super().__init__(CONNECTION_LOST_KIND, message, request_id=request_id)
        self.socket_path = None if socket_path is None else os.fspath(socket_path)
        self.may_have_reached_upstream = may_have_reached_upstream


def stream_closed_early(request_id: RequestId | None) -> RequestCancelledError:
    """What iterating a stream that was closed before its end raises: ending quietly would pass a cut answer
    off as a whole one (a task that waited for a chunk with a timeout, then read on)."""
    return RequestCancelledError(
        ErrorKind.CANCELLED.value,
        "this stream was closed before its end (close(), leaving its with block, or a cancelled wait for its "
        "next chunk): its request was cancelled in the engine, and the rest of the answer is lost",
        request_id=request_id,
    )


#: The exception class for each engine `ErrorKind`.
ERROR_CLASSES: Final[dict[str, type[TrioMapperError]]] = {
    ErrorKind.INVALID_REQUEST: InvalidRequestError,
    ErrorKind.UPSTREAM_ERROR: UpstreamError,
    ErrorKind.RATE_LIMITED: RateLimitedError,
    ErrorKind.REQUEST_TOO_LARGE: RequestTooLargeError,
    ErrorKind.OVERLOADED: OverloadedError,
    ErrorKind.TIMEOUT: RequestTimeoutError,
    ErrorKind.CANCELLED: RequestCancelledError,
    ErrorKind.SHUTTING_DOWN: ShuttingDownError,
    ErrorKind.PROTOCOL_ERROR: ProtocolError,
    ErrorKind.UPSTREAM_UNREACHABLE: UpstreamUnreachableError,
    ErrorKind.INTERNAL_ERROR: InternalEngineError,
    ErrorKind.FORBIDDEN: ForbiddenError,
    ErrorKind.BUDGET_EXHAUSTED: BudgetExhaustedError,
}


#: Kinds of failure that may pass: the same request, sent again later unchanged, may succeed, because what
#: stood in its way was the moment (the upstream's limits or health, the engine's queue or restart, a
#: deadline, a daily budget), not the request. The other kinds fail again until the request, the engine's
#: configuration or the account changes. ``upstream_error`` depends on its status: see `may_succeed_later`.
TRANSIENT_KINDS: Final[frozenset[str]] = frozenset(
    {
        ErrorKind.RATE_LIMITED,
        ErrorKind.OVERLOADED,
        ErrorKind.TIMEOUT,
        ErrorKind.CANCELLED,
        ErrorKind.SHUTTING_DOWN,
        ErrorKind.UPSTREAM_UNREACHABLE,
        ErrorKind.BUDGET_EXHAUSTED,
        ENGINE_UNAVAILABLE_KIND,
        CONNECTION_LOST_KIND,
    }
)


def may_succeed_later(error: TrioMapperError) -> bool:
    """Whether sending the same request again, unchanged, may succeed (later: the engine has retried it already).

    True for the `TRANSIENT_KINDS` (a rate limit or quota, a full queue, a deadline, an engine stopping, an
    unreachable upstream, a spent daily budget, a lost connection) and for an ``upstream_error`` whose status
    is 408, 409 or 5xx (or unknown). False for what fails again as it is: the request itself
    (``invalid_request``, ``request_too_large``, an upstream 4xx such as a 400), this client's permission
    (``forbidden``), a disagreement or a bug (``protocol_error``, ``internal_error``), and a kind this version
    does not know.
    """
    if error.kind == ErrorKind.UPSTREAM_ERROR:
        status = error.status
        # A status of the moment means the engine's attempts ran out, not that the request is wrong.
        return status is None or is_transient_status(status)
    return error.kind in TRANSIENT_KINDS


def error_class_for(kind: str) -> type[TrioMapperError]:
    """The class for an error kind; `TrioMapperError` itself for kinds this version does not know."""
    return ERROR_CLASSES.get(str(kind), TrioMapperError)


def make_error(
    kind: str,
    message: str,
    *,
    status: int | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    attempts: int = 0,
    request_id: RequestId | None = None,
    param: str | None = None,
) -> TrioMapperError:
    """Build the exception for an engine ``Error`` reply (any kind, known or not)."""
    return error_class_for(kind)(
        str(kind),
        message,
        status=status,
        body=body,
        headers=headers,
        attempts=attempts,
        request_id=request_id,
        param=param,
    )


__all__ = [
    "ERROR_CLASSES",
    "TRANSIENT_KINDS",
    "BudgetExhaustedError",
    "ConnectionLost",
    "EngineUnavailable",
    "ForbiddenError",
    "InternalEngineError",
    "InvalidRequestError",
    "OverloadedError",
    "ProtocolError",
    "RateLimitedError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "ShuttingDownError",
    "TrioMapperError",
    "UpstreamError",
    "UpstreamUnreachableError",
    "error_class_for",
    "make_error",
    "may_succeed_later",
]
