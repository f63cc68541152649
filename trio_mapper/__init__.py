"""trio-mapper: one local engine that owns an OpenAI API key and its rate limits.

Importing this package stays light (msgspec and the standard library): client programs do not pull in trio
or httpx, and the async client (with anyio) loads on first use of `AsyncClient`. The engine itself lives in
`trio_mapper.engine`.
"""

from typing import TYPE_CHECKING, Any

from trio_mapper.client import (
    DEFAULT_WINDOW,
    BudgetExhaustedError,
    Client,
    ConnectionLost,
    EngineUnavailable,
    ForbiddenError,
    InternalEngineError,
    InvalidRequestError,
    MapResult,
    OverloadedError,
    ProtocolError,
    RateLimitedError,
    Request,
    RequestCancelledError,
    RequestTimeoutError,
    RequestTooLargeError,
    ShuttingDownError,
    TrioMapperError,
    UpstreamError,
    UpstreamUnreachableError,
)

from ._version import __version__

if TYPE_CHECKING:
    from trio_mapper.client.aio import AsyncClient, AsyncMapIterator


def __getattr__(name: str) -> Any:
    # The async client needs anyio; a program using only the blocking Client should not pay for it.
    if name in {"AsyncClient", "AsyncMapIterator"}:
        from trio_mapper.client import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'trio_mapper' has no attribute {name!r}")


__all__ = [
    "DEFAULT_WINDOW",
    "AsyncClient",
    "AsyncMapIterator",
    "BudgetExhaustedError",
    "Client",
    "ConnectionLost",
    "EngineUnavailable",
    "ForbiddenError",
    "InternalEngineError",
    "InvalidRequestError",
    "MapResult",
    "OverloadedError",
    "ProtocolError",
    "RateLimitedError",
    "Request",
    "RequestCancelledError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "ShuttingDownError",
    "TrioMapperError",
    "UpstreamError",
    "UpstreamUnreachableError",
    "__version__",
]
