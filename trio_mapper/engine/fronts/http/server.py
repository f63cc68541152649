"""Serving `OpenAIApp` with hypercorn's Trio worker on listeners the engine made (its Unix socket, a loopback port).

hypercorn's ``serve`` opens its own sockets; here the engine opens them (the Unix one with the msgpack
socket's permission and directory rules, `fronts.unix.listener`), accepts in its own front nursery (so
SIGTERM stops accepting with the msgpack front) and hands each connection to hypercorn's `TCPServer`, which
speaks HTTP/1.1 and calls the app. The connection's peer credentials travel in the ASGI scope's ``state``.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Literal, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app

from trio_mapper.engine.fronts.http.app import PEER, TRANSPORT, OpenAIApp
from trio_mapper.engine.fronts.throttle import LogThrottle
from trio_mapper.engine.fronts.unix.listener import accept_forever
from trio_mapper.engine.fronts.unix.peers import peer_credentials

log = logging.getLogger("trio_mapper.http")

#: Longer than httpx's idle expiry (5 s), so clients close idle connections rather than race our close.
KEEP_ALIVE_TIMEOUT: Final = 75.0
#: How long shutdown waits for requests already answered by the core to finish writing their replies.
FLUSH_TIMEOUT: Final = 5.0
#: How long one write may wait for a client that reads nothing (the core gives a stream's reader as long).
SEND_STALL_TIMEOUT: Final = 60.0

Transport = Literal["unix", "tcp"]


def _hypercorn_config() -> HypercornConfig:
    config = HypercornConfig()
    config.accesslog = None  # one line per request costs more than the request; failures are logged by the core
    config.errorlog = logging.getLogger("trio_mapper.http.hypercorn")
    config.include_server_header = False
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    return config


class _TCPServer(TCPServer):
    """hypercorn's connection, closed as soon as the client has gone.

    hypercorn 0.18 leaves the keep-alive timer running when the client closes its end, and the connection's
    task group waits for it: the socket stayed open (CLOSE-WAIT) for the whole keep-alive timeout, so a
    client opening and closing connections in a loop could use up the engine's file descriptors. Stopping
    the timer at the end of input is not enough: a reply that ends afterwards starts it again.
    """

    def __init__(self, *args: Any, sending: set[trio.CancelScope], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sending = sending
        self._client_gone = False

    async def _read_data(self) -> None:
        await super()._read_data()
        self._client_gone = True
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's, with the write bounded. It is shielded, so that a reply is never cut half-way by a
        cancel, but hypercorn's waits for ever: a client that stopped reading (a large reply, never read)
        held its connection and buffers, and kept the engine from exiting on SIGTERM, until it went away."""
        if isinstance(event, Updated) and event.idle and self._client_gone:
            # A reply that ended after the client closed its end: hypercorn would start waiting for the next
            # request (KEEP_ALIVE_TIMEOUT) on a connection nobody will send one on.
            return None
        if not isinstance(event, RawData):
            return await super().protocol_send(event)
        async with self.send_lock:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_STALL_TIMEOUT) as writing:
                self._sending.add(writing)
                try:
                    await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
                    return
                finally:
                    self._sending.discard(writing)
            if writing.cancelled_caught:
                # Part of the write may be out: the connection cannot carry anything more.
                log.info(
                    "http: a client read none of its reply for %.0fs, or the engine is stopping; closed",
                    SEND_STALL_TIMEOUT,
                )
                await trio.aclose_forcefully(self.stream)
                await self.protocol.handle(Closed())


class HttpServer:
    """Runs the HTTP connections of every HTTP listener. Start `run` in the connections nursery, run an
    `accept_loop` per listener in the front nursery, and call `begin_close` once the core has answered all."""

    def __init__(self, app: OpenAIApp, *, max_tcp_connections: int) -> None:
        self.app = app
        #: Any local user may connect to a TCP port, without a key until the first request: past this many
        #: TCP connections new ones are closed at once, so that idle ones cannot take every descriptor and
        #: lock out the Unix sockets' clients too.
        self.max_tcp_connections = max_tcp_connections
        self.tcp_connections = 0
        self._refusals = LogThrottle()
        self._config = _hypercorn_config()
        self._context = WorkerContext(None)
        self._wrapped = wrap_app(cast(ASGIFramework, app), self._config.wsgi_max_body_size, "asgi")
        self._handlers: trio.Nursery | None = None
        self._closing = trio.Event()
        #: The writes in progress (`_TCPServer.protocol_send`), cut when shutdown's flush time is up.
        self._sending: set[trio.CancelScope] = set()
        self.connections = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._handlers = nursery
            task_status.started()
            await self._closing.wait()
            # Replies still being written get FLUSH_TIMEOUT; idle keep-alive connections are closed at once.
            await self._context.terminated.set()
            with trio.move_on_after(FLUSH_TIMEOUT):
                await self.app.wait_idle()
            for writing in self._sending:
                writing.cancel()  # shielded from the nursery's cancel, not from their own
            nursery.cancel_scope.cancel()

    def begin_close(self) -> None:
        self._closing.set()

    async def accept_loop(self, listener: trio.SocketListener, transport: Transport) -> None:
        handlers = self._handlers
        assert handlers is not None, "HttpServer.run must be started before accepting"

        def serve(stream: trio.SocketStream) -> None:
            if transport == "tcp":
                if self.tcp_connections >= self.max_tcp_connections:
                    return self._refuse(stream)
                self.tcp_connections += 1  # now, not when its task starts: the next accept may come first
            handlers.start_soon(self._serve_connection, stream, transport)

        await accept_forever(listener, serve, f"http ({transport})")

    def _refuse(self, stream: trio.SocketStream) -> None:
        stream.socket.close()  # at once: nothing is owed to a connection that was never served
        if (count := self._refusals.count()) is not None:
            log.warning(
                "http (tcp): %d connection(s) closed unserved: %d TCP connections are open, the most the engine "
                "allows (a quarter of its open-file limit; raise LimitNOFILE if clients need more)",
                count,
                self.tcp_connections,
            )

    async def _serve_connection(self, stream: trio.SocketStream, transport: Transport) -> None:
        state: dict[str, Any] = {TRANSPORT: transport}
        if transport == "unix":
            state[PEER] = peer_credentials(stream.socket)
        self.connections += 1
        try:
            server = _TCPServer(
                self._wrapped, self._config, self._context, state, cast(Any, stream), sending=self._sending
            )
            await server.run()
        except Exception:
            # One broken connection must never take the engine down.
            log.exception("http connection: unexpected error; connection closed")
        finally:
            self.connections -= 1
            if transport == "tcp":
                self.tcp_connections -= 1
