"""trio-mapper: one local engine that owns an OpenAI API key and its rate limits.

Importing this package stays light (msgspec, anyio and the standard library): client programs do not pull
in trio or httpx. The engine itself lives in `trio_mapper.engine`.
"""

__version__ = "0.1.0"

from .aio_client import AsyncClient, AsyncMapIterator
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
