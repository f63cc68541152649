"""The upstream's connections: httpx's pool on httpcore's Trio backend, each request written in one send.

httpcore writes a request as separate events: its head, then its body, each a `send_all` and a checkpoint.
On a busy event loop the body leaves a scheduling pass after the head, and the upstream reads twice before it
can start; measured through the HTTP front, that cost a stream's first chunk 0.2 to 0.9 ms (docs/performance.md).
Here the first write of each exchange (the head) is held, without a checkpoint, until the next one (the body,
or the empty end of a request without one), and both leave in one send: one TCP segment, one TLS record.
"""

from __future__ import annotations

import ssl
from typing import Any, final

import httpcore
import httpx


def upstream_transport(limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncHTTPTransport:
    """httpx's transport to the upstream, as `httpx.AsyncHTTPTransport(limits=limits, trust_env=False)` builds it,
    on connections that write each request in one send.

    Args:
        ssl_context: shared by the pools (loading certificates takes tens of milliseconds). None verifies
            servers against certifi's bundle, as httpx does (the environment's ``SSL_CERT_FILE`` is not read,
            as with ``trust_env=False``).
    """
    ssl_context = ssl_context or httpx.create_ssl_context(trust_env=False)
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits, trust_env=False)
    # httpx takes no network backend; its transport is this pool with httpx's own defaults, rebuilt with one.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_WholeRequests(httpcore.TrioBackend()),
    )
    return transport


@final
class _WholeRequests(httpcore.AsyncNetworkBackend):
    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _HeadHeldForBody(await self._backend.connect_tcp(*args, **kwargs))

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        return _HeadHeldForBody(await self._backend.connect_unix_socket(*args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


@final
class _HeadHeldForBody(httpcore.AsyncNetworkStream):
    """A connection whose first write after a read (a request's head) waits for the next write (its body)."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._held: bytes | None = None
        #: True when the next write starts a request: at first, and after each read of a reply.
        self._at_request_start = True

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 (httpcore's)
        if self._at_request_start:
            # No checkpoint: httpcore goes straight on to write the body, in this same step.
            self._at_request_start = False
            self._held = buffer
            return
        held, self._held = self._held, None
        await self._stream.write(held + buffer if held else buffer, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 (httpcore's)
        if self._held:  # a request that was not followed by a write: never the case with httpcore's HTTP/1.1
            held, self._held = self._held, None
            await self._stream.write(held, timeout)
        self._at_request_start = True
        return await self._stream.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._held = None
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
    ) -> httpcore.AsyncNetworkStream:
        return _HeadHeldForBody(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)
