"""trio-mapper: one local engine that owns an OpenAI API key and its rate limits.

Importing this package stays light (msgspec and the standard library): client programs do not pull in trio
or httpx, and the async client (with anyio) loads on first use of `AsyncClient`. The engine itself lives in
`trio_mapper.engine`.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .client import DEFAULT_WINDOW, Client, MapResult, Request
from .client_errors import (
    ConnectionLost,
    EngineUnavailable,
    ForbiddenError,
    InternalEngineError,
    InvalidRequestError,
    OverloadedError,
    ProtocolError,
    RateLimitedError,
    RequestCancelledError,
    RequestTimeoutError,
    RequestTooLargeError,
    ShuttingDownError,
    TrioMapperError,
    UpstreamError,
    UpstreamUnreachableError,
)

if TYPE_CHECKING:
    from .aio_client import AsyncClient, AsyncMapIterator


def __getattr__(name: str) -> Any:
    # The async client needs anyio; a program using only the blocking Client should not pay for it.
    if name in {"AsyncClient", "AsyncMapIterator"}:
        from . import aio_client

        return getattr(aio_client, name)
    raise AttributeError(f"module 'trio_mapper' has no attribute {name!r}")


__all__ = [
    "DEFAULT_WINDOW",
    "AsyncClient",
    "AsyncMapIterator",
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
