"""The client helpers: send OpenAI API requests through a running engine's Unix socket.

`Client` (blocking, thread-safe; `sync.py`) and `AsyncClient` (Trio or asyncio through anyio; `aio.py`) are
thin drivers of one sans-IO protocol core (`core.py`); their exceptions are in `errors.py`. Importing this
package stays light (msgspec and the standard library): `AsyncClient`, and with it anyio, loads on first use.
It never imports the engine.
"""

from typing import TYPE_CHECKING, Any

from trio_mapper.client.core import DEFAULT_WINDOW, PRIORITY_CLASSES, MapResult, Request, StreamChunk
from trio_mapper.client.errors import (
    ERROR_CLASSES,
    BudgetExhaustedError,
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
    error_class_for,
    may_succeed_later,
)
from trio_mapper.client.sync import Client, Stream

if TYPE_CHECKING:
    from trio_mapper.client.aio import AsyncClient, AsyncMapIterator, AsyncStream


def __getattr__(name: str) -> Any:
    # The async client needs anyio; a program using only the blocking Client should not pay for it.
    if name in {"AsyncClient", "AsyncMapIterator", "AsyncStream"}:
        from trio_mapper.client import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_WINDOW",
    "ERROR_CLASSES",
    "PRIORITY_CLASSES",
    "AsyncClient",
    "AsyncMapIterator",
    "AsyncStream",
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
    "Stream",
    "StreamChunk",
    "TrioMapperError",
    "UpstreamError",
    "UpstreamUnreachableError",
    "error_class_for",
    "may_succeed_later",
]
