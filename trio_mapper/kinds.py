"""The stable error kinds: the one vocabulary of failure that the engine's core, its fronts and the clients share.

Clients branch on these values, so an existing value never changes meaning; new kinds may be added. This
module depends on nothing, so every layer may import it.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

__all__ = ["PRIORITY_CLASSES", "ErrorKind", "Priority", "is_transient_status"]

Priority = Literal["interactive", "default", "batch"]
#: The priority classes of requests, highest first: what a tenant is configured with (the engine's
#: ``[tenants.NAME]``) and what a request may ask for (that class or a lower one, never a higher one).
PRIORITY_CLASSES: Final[tuple[Priority, ...]] = ("interactive", "default", "batch")


class ErrorKind(enum.StrEnum):
    """Stable error kinds: clients branch on these, so existing values never change meaning."""

    #: The request itself is unusable (bad endpoint, body not an object, unknown model…). Fix the request.
    INVALID_REQUEST = "invalid_request"
    #: The upstream answered with a final error (4xx other than rate limits, or retries exhausted on 5xx).
    UPSTREAM_ERROR = "upstream_error"
    #: A 429 that can never succeed (quota exhausted, spend limit), or rate-limit retries ran out.
    RATE_LIMITED = "rate_limited"
    #: The request alone costs more tokens than the whole per-minute budget: it can never be admitted.
    REQUEST_TOO_LARGE = "request_too_large"
    #: The engine's queue is full; try again later or lower your concurrency.
    OVERLOADED = "overloaded"
    #: The request's deadline passed before it completed.
    TIMEOUT = "timeout"
    #: The client cancelled the request.
    CANCELLED = "cancelled"
    #: The engine is shutting down and did not start this request.
    SHUTTING_DOWN = "shutting_down"
    #: The frame or message broke the protocol (undecodable, unknown type, wrong field type, no handshake…).
    PROTOCOL_ERROR = "protocol_error"
    #: The upstream could not be reached (DNS, refused, TLS) after all attempts.
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    #: A bug in the engine; the message says what happened. Please report it.
    INTERNAL_ERROR = "internal_error"
    #: This client is not allowed to use the engine.
    FORBIDDEN = "forbidden"
    #: The client's tenant spent its daily token or cost budget (the engine's configuration); it refills as
    #: the last 24 hours' spending ages out. Retrying sooner cannot help.
    BUDGET_EXHAUSTED = "budget_exhausted"


def is_transient_status(status: int) -> bool:
    """Whether an upstream's HTTP status is a fault of the moment (408, 409 or 5xx): what the engine retries
    with backoff, and what a client may send again later once the engine's retries ran out."""
    return status in (408, 409) or status >= 500
