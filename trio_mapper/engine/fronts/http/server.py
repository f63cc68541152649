"""Serving `OpenAIApp` with hypercorn's Trio worker on listeners the engine made (its Unix socket, a loopback port).

hypercorn's ``serve`` opens its own sockets; here the engine opens them (the Unix one with the msgpack
socket's permission and directory rules, `fronts.unix.listener`), accepts in its own front nursery (so
SIGTERM stops accepting with the msgpack front) and hands each connection to hypercorn's `TCPServer`, which
speaks HTTP/1.1 and calls the app. The connection's peer credentials travel in the ASGI scope's ``state``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Final, Literal, cast

import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h11
import hypercorn.protocol
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, Data, EndBody, EndData, Trailers
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIFramework, ASGIReceiveCallable, ASGIReceiveEvent, H11SendableEvent
from hypercorn.utils import wrap_app

from trio_mapper.engine.fronts.http.app import KEY_ACCEPTED, PEER, TRANSPORT, OpenAIApp
from trio_mapper.engine.fronts.http.errors import body_headers, error_body, retry_headers
from trio_mapper.engine.fronts.http.tcp_gate import TcpGate, TcpSlot
from trio_mapper.engine.fronts.unix.listener import accept_forever
from trio_mapper.engine.fronts.unix.peers import peer_credentials
from trio_mapper.engine.fronts.unsent import UnsentHolder, UnsentReplies
from trio_mapper.text import escape_control_characters, shorten

log = logging.getLogger("trio_mapper.http")

#: Longer than httpx's idle expiry (5 s), so clients close idle connections rather than race our close.
KEEP_ALIVE_TIMEOUT: Final = 75.0
#: How long shutdown waits for requests already answered by the core to finish writing their replies.
FLUSH_TIMEOUT: Final = 5.0
#: A reply's head goes out in one write with its body up to this size (`_TCPServer.protocol_send`), apart
#: beyond it.
MAX_JOINED_BODY_BYTES: Final = 256 * 1024
#: How long one write may wait for a client that reads nothing (the core gives a stream's reader as long).
#: Within it, clients that read nothing could hold a reply each (an embeddings batch is 100 MB of JSON): the
#: bytes being written count in the engine-wide bound on unsent replies (`fronts.unsent`), shared with the
#: msgpack front, which cuts the largest holder on either front when it is passed.
SEND_STALL_TIMEOUT: Final = 60.0

Transport = Literal["unix", "tcp"]


def _hypercorn_config() -> HypercornConfig:
    config = HypercornConfig()
    config.accesslog = None  # one line per request costs more than the request; failures are logged by the core
    config.errorlog = logging.getLogger("trio_mapper.http.hypercorn")
    config.include_server_header = False
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    return config


class _KeepAliveTimer:
    """hypercorn's keep-alive timer (its `TrioSingleTask`), restarted and stopped without waiting.

    hypercorn's takes a lock (a scheduling point) to stop the timer when a request begins, and to restart it
    when a reply ends it waits, under that lock, until the new timer task has started: two to three passes
    of the event loop per request, one of them between a request's arrival and its dispatch. Here neither
    operation awaits anything, so neither needs the lock: the timer task is started and cancelled, not waited
    for (a timer cancelled before it runs ends at its first checkpoint).
    """

    def __init__(self) -> None:
        self._running: trio.CancelScope | None = None

    async def restart(self, task_group: TaskGroup, action: Callable[[], Awaitable[None]]) -> None:
        await self.stop()
        self._running = running = trio.CancelScope()
        task_group.spawn(self._run, running, action)

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()
            self._running = None

    @staticmethod
    async def _run(running: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
        with running:
            await action()


class _TCPServer(TCPServer):
    """hypercorn's connection, closed as soon as the client has gone, with fewer writes (`protocol_send`),
    each bounded in time, and a cheaper keep-alive timer (`_KeepAliveTimer`).

    hypercorn 0.18 leaves the keep-alive timer running when the client closes its end, and the connection's
    task group waits for it: the socket stayed open (CLOSE-WAIT) for the whole keep-alive timeout, so a
    client opening and closing connections in a loop could use up the engine's file descriptors. Stopping
    the timer at the end of input is not enough: a reply that ends afterwards starts it again.
    """

    def __init__(self, *args: Any, sending: ReplyWrites, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = cast(Any, _KeepAliveTimer())
        self._sending = sending
        self._client_gone = False
        #: A reply's head waiting for the first part of its body (`protocol_send`).
        self._held_head = b""

    async def _read_data(self) -> None:
        await super()._read_data()
        self._client_gone = True
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's, with a reply's head written together with what follows it, and every write bounded."""
        if isinstance(event, RawData):
            if not self._held_head and _is_final_response_head(event.data):
                # Held until the next write, which follows at once (a whole reply's body, a stream's first
                # chunk, or h11's end of an empty body): one write for both is one pass of the event loop
                # fewer for the reply, and one wake-up fewer for the client, which needs the body anyway.
                self._held_head = event.data
                return None
            head, self._held_head = self._held_head, b""
            if len(event.data) > MAX_JOINED_BODY_BYTES:
                # Joined, a reply of 100 MB would be copied whole, holding the loop longer than a write costs.
                if head:
                    await self._write(head)
                await self._write(event.data)
            elif head or event.data:  # h11 ends a body whose length was announced with an empty write
                await self._write(head + event.data)
            return None
        if self._held_head:  # a reply cut short after its head (the app failed, the connection closes)
            data, self._held_head = self._held_head, b""
            await self._write(data)
        if isinstance(event, Updated) and event.idle and self._client_gone:
            # A reply that ended after the client closed its end: hypercorn would start waiting for the next
            # request (KEEP_ALIVE_TIMEOUT) on a connection nobody will send one on.
            return None
        return await super().protocol_send(event)

    async def _write(self, data: bytes) -> None:
        """hypercorn's write, bounded. It is shielded, so that a reply is never cut half-way by a cancel, but
        hypercorn's waits for ever: a client that stopped reading (a large reply, never read) held its
        connection and buffers, and kept the engine from exiting on SIGTERM, until it went away."""
        # Taken without a scheduling point when free (it nearly always is: one reply at a time); the write
        # itself is one.
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_STALL_TIMEOUT) as writing:
                self._sending.add(writing, len(data))
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
                    return
                finally:
                    self._sending.remove(writing)
            if writing.cancelled_caught:
                # Part of the write may be out: the connection cannot carry anything more. A cut by the
                # unsent-reply bound or by shutdown was logged with its reason by whoever cut it.
                if trio.current_time() >= writing.deadline:
                    log.info("http: a client read none of its reply for %.0fs; closed", SEND_STALL_TIMEOUT)
                await trio.aclose_forcefully(self.stream)
                await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()


class ReplyWrites:
    """The HTTP front's writes in progress on every connection (and HTTP/2 replies waiting for the client's
    window), each counted in the engine-wide bound on unsent replies, which cuts the largest holder on either
    front; all cut when shutdown's flush time is up."""

    def __init__(self, unsent: UnsentReplies) -> None:
        self.unsent = unsent
        self._writes: dict[trio.CancelScope, UnsentHolder] = {}

    def add(self, write: trio.CancelScope, size: int) -> None:
        """A write of ``size`` bytes begins; the bound cuts it by cancelling ``write``."""

        def cut(why: str) -> None:
            log.warning("http: a reply of %d MiB being written is cut (%s)", size >> 20, why)
            write.cancel()

        self._writes[write] = self.unsent.holder(cut, size)

    def remove(self, write: trio.CancelScope) -> None:
        holder = self._writes.pop(write, None)
        if holder is not None:
            holder.release()

    def cut_all(self) -> None:
        if self._writes:
            log.warning(
                "http: shutdown's flush time (%.0fs) is up: cut %d replies still being written",
                FLUSH_TIMEOUT,
                len(self._writes),
            )
        for write in self._writes:
            write.cancel()


def _is_final_response_head(data: bytes) -> bool:
    """Whether h11 wrote a response's head, other than an informational one (``100 Continue``: the client
    waits for it before it sends the body, so it must go out at once). Bodies do not begin so, and if one
    did, it would only be written one event later."""
    return data.startswith(b"HTTP/1.1 ") and data[9:10] != b"1"


class _H11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 connection, whose own refusals say in OpenAI's shape what was wrong, and which
    invites a request's body (``100 Continue``) only once the app asks for it.

    hypercorn refuses a request h11 cannot read (a malformed request line or header, a head larger than h11's
    incomplete-event limit, a Transfer-Encoding other than chunked) before the app sees it, with a bare status
    and an empty body: the SDK showed "Error code: 400" and nothing more. Each refusal now carries an error
    body saying what was wrong and what to do (`_refusal_body`); its status, and the connection's closing
    after it, are hypercorn's.

    hypercorn sends ``100 Continue`` as soon as it has read the head of a request that asks for it, before the
    app runs: a client without a key on the TCP port was invited to send its body, which the app then refused
    (401) unread. It now goes out when the app first asks for the body: as RFC 9110 (10.1.1) asks, a request
    whose head decides its answer (a 401, a 404) gets that answer and no invitation.
    """

    def __init__(self, app: AppWrapper, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        self._served_app = self.app
        self.app = self._serve

    async def _serve(
        self,
        scope: Any,
        receive: ASGIReceiveCallable,
        send: Any,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        if self.connection.they_are_waiting_for_100_continue:
            receive = functools.partial(self._continue_then_receive, receive)
        await self._served_app(scope, receive, send, sync_spawn, call_soon)

    async def _continue_then_receive(self, receive: ASGIReceiveCallable) -> ASGIReceiveEvent:
        # h11 stops waiting once the client sends the body anyway (curl does after a second) or a reply began.
        if self.connection.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=self.config.response_headers("h11"))
            await super()._send_h11_event(continue_)
        return await receive()

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        if isinstance(event, h11.InformationalResponse) and event.status_code == 100:
            return None  # hypercorn's, before the app runs: `_continue_then_receive` sends it when it is time
        return await super()._send_h11_event(event)

    async def _send_error_response(self, status_code: int) -> None:
        # hypercorn calls it while it handles h11's RemoteProtocolError, which says what was wrong.
        error = sys.exception()
        reason = str(error) if isinstance(error, h11.RemoteProtocolError) else ""
        body = _refusal_body(status_code, reason, self.config.h11_max_incomplete_size)
        headers = [*body_headers(body), (b"connection", b"close"), *retry_headers(None)]
        headers += self.config.response_headers("h11")
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))  # for a HEAD request h11 refuses it: the head alone goes
        await self._send_h11_event(h11.EndOfMessage())


#: What to do about a request h11 refused as malformed (a 400), by the start of h11's reason.
_MALFORMED_ADVICE: Final = (
    ("Missing mandatory Host", "send a Host header, which HTTP/1.1 requires"),
    ("Found multiple Host", "send one Host header"),
    ("conflicting Content-Length", "send one Content-Length header, the body's length in bytes"),
    ("bad Content-Length", "send one Content-Length header, the body's length in bytes"),
    ("illegal chunk header", "frame a chunked body as RFC 9112 (7.1) says, or send it with Content-Length"),
    ("malformed chunk footer", "frame a chunked body as RFC 9112 (7.1) says, or send it with Content-Length"),
    ("peer", "the client closed its end before the request was whole; keep it open until the reply has come"),
)
#: For any other 400: the request line or a header line (h11 names which).
_MALFORMED_DEFAULT: Final = (
    "send a request line (METHOD /path HTTP/1.1), then header lines (Name: value, visible ASCII), each ending "
    "in CRLF, then an empty line"
)


def _refusal_body(status: int, reason: str, max_head_bytes: int) -> bytes:
    """The OpenAI-shaped body of hypercorn's refusal (``status``) of a request h11 could not read, for h11's
    ``reason`` (empty if unknown)."""
    shown = shorten(escape_control_characters(reason), 200) or f"HTTP {status}"
    if status == 431:
        message = (
            f"the request's head (its request line and headers) is larger than the engine accepts ({max_head_bytes} "
            "bytes); send fewer or shorter headers, or a shorter URL"
        )
        code = "request_head_too_large"
    elif status == 501:
        message = (
            f"the engine cannot read this request's body ({shown}): it reads bodies sent with Content-Length, or "
            "with one Transfer-Encoding: chunked header; send the body uncompressed, framed by one of those"
        )
        code = "unsupported_transfer_encoding"
    else:
        advice = next((advice for start, advice in _MALFORMED_ADVICE if reason.startswith(start)), _MALFORMED_DEFAULT)
        message = f"the request is not well-formed HTTP/1.1 ({shown}); {advice}"
        code = "malformed_request"
    return error_body(message, "invalid_request_error", code)


# `ProtocolWrapper` looks the class up by this name for each connection.
hypercorn.protocol.H11Protocol = _H11Protocol  # type: ignore[misc]


#: The `ReplyWrites` of the connection being served, for its HTTP/2 streams (hypercorn builds `_H2Protocol`
#: itself, from its own arguments, when a connection turns out to speak HTTP/2).
_replies_being_written: contextvars.ContextVar[ReplyWrites] = contextvars.ContextVar("replies_being_written")

#: The events of a reply that wait for the client's flow-control window (hypercorn's stream buffer).
_FLOW_CONTROLLED: Final = (Body, Data, EndBody, EndData, Trailers)


class _H2Protocol(H2Protocol):
    """hypercorn's HTTP/2 connection, which survives a request's body arriving after its reply, and bounds
    what its replies hold while they wait for the client's flow-control window.

    The engine answers some requests before reading their bodies (a 401, a 404). hypercorn 0.18 forgets a
    stream once its reply is out, then looks it up for the body's next DATA frame: the KeyError ended the
    connection, and with it every other request on it (pgjones/hypercorn#329, fix proposed in #334). Such
    frames are now only acknowledged, for the connection's flow control, as hypercorn already does for the
    end of such a body.

    hypercorn keeps a reply's body in the stream's buffer until the client's window lets it out, and waits
    for that without limit: a client that never opens its window (a zero initial window) held whole replies,
    outside the bounds HTTP/1.1 writes have (`_TCPServer._write`). Each wait is now bounded as those writes
    are, in time (SEND_STALL_TIMEOUT) and in bytes (the engine-wide `UnsentReplies`); a reply past either is
    reset, as if the client had reset it: its buffer is freed and the app sees the client gone.
    """

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, _FLOW_CONTROLLED):
            return await super().stream_send(event)
        buffer = self.stream_buffers.get(event.stream_id)
        held = (len(buffer.buffer) if buffer is not None else 0) + len(getattr(event, "data", b""))
        sending = _replies_being_written.get()
        with trio.CancelScope(deadline=trio.current_time() + SEND_STALL_TIMEOUT) as waiting:
            sending.add(waiting, held)
            try:
                await super().stream_send(event)
            finally:
                sending.remove(waiting)
        if waiting.cancelled_caught:
            log.info(
                "http/2: a client let none of its reply through for %.0fs, its reply was cut to bound the unsent "
                "replies of both fronts, or the engine is stopping; stream reset",
                SEND_STALL_TIMEOUT,
            )
            await self._reset_stream(event.stream_id)
        return None

    async def _reset_stream(self, stream_id: int) -> None:
        """What hypercorn does when the client resets a stream, after telling the client so."""
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the stream (or connection) closed meanwhile
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None:
            await buffer.close()
        await self._close_stream(stream_id)
        await self._window_updated(stream_id)  # hypercorn's sender then forgets the stream's buffer
        await self._flush()

    async def _priority_updated(self, event: h2.events.PriorityUpdated) -> None:
        """Ignored, as RFC 9113 (5.3.2) lets a server ignore the priorities it deprecates. hypercorn 0.18 kept
        each stream a PRIORITY frame named, opened or not (and each stream one depends on), in a tree that
        raises at its 1,001st: any client, keyless on the TCP port too, ended its connection with a traceback
        logged at ERROR each time. (hypercorn already left out the priorities that HEADERS frames carry.)"""

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        await super()._handle_events(cast(list[h2.events.Event], self._for_open_streams(events)))

    def _for_open_streams(self, events: Iterable[h2.events.Event]) -> Iterator[h2.events.Event]:
        # A generator, so that each event is checked when hypercorn comes to it: an earlier event of the
        # same batch may be the one that ends a stream.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                continue
            if isinstance(event, h2.events.RequestReceived) and not _can_make_stream(event.headers or []):
                # Refused as HTTP/2 refuses a malformed request (RFC 9113 8.1.1): its stream alone is reset.
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                continue
            yield event


def _can_make_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether hypercorn 0.18 can make a stream of a request with these headers. It fails (UnboundLocalError,
    UnicodeDecodeError) on a plain CONNECT, which has no :path, and on a :method or :path that is not ASCII:
    any client, a keyless one on the TCP port too, ended its connection with every other request on it, and
    had a traceback logged each time."""
    pseudo = {name: value for name, value in headers if name in {b":method", b":path"}}
    return b":path" in pseudo and all(value.isascii() for value in pseudo.values())


# `ProtocolWrapper` looks the class up by this name each time a connection turns out to speak HTTP/2.
hypercorn.protocol.H2Protocol = _H2Protocol  # type: ignore[misc]

#: The most frames (HEADERS, then CONTINUATIONs) h2 gathers into one header block, which it holds whole until
#: the block ends; past it, the connection is closed. h2's default, 64 frames of 16 KiB (hypercorn's largest
#: inbound frame), let each connection hold a megabyte: keyless TCP connections, which may each live 10 s
#: (`TcpGate`), held gigabytes between them, where HTTP/1.1's hold 16 KiB (h11's incomplete-event limit). Four
#: frames carry any header list within the 64 KiB hypercorn announces (SETTINGS_MAX_HEADER_LIST_SIZE), which
#: HPACK never makes larger. Read by h2 each time; the engine's only HTTP/2 is its front's (httpx upstream is
#: HTTP/1.1).
MAX_HEADER_BLOCK_FRAMES: Final = 4
h2.frame_buffer.CONTINUATION_BACKLOG = MAX_HEADER_BLOCK_FRAMES


class HttpServer:
    """Runs the HTTP connections of every HTTP listener. Start `run` in the connections nursery, run an
    `accept_loop` per listener in the front nursery, and call `begin_close` once the core has answered all.

    Args:
        unsent: the engine-wide bound on unsent replies, shared with the msgpack front.
    """

    def __init__(self, app: OpenAIApp, *, max_tcp_connections: int, unsent: UnsentReplies) -> None:
        self.app = app
        #: Any local user may connect to a TCP port, without a key until the first request: the port holds at
        #: most this many connections, so that it cannot take every descriptor and lock out the Unix sockets'
        #: clients too, and those that show no key give way to those that do (`TcpGate`).
        self.tcp_gate = TcpGate(max_tcp_connections)
        self._config = _hypercorn_config()
        self._context = WorkerContext(None)
        self._wrapped = wrap_app(cast(ASGIFramework, app), self._config.wsgi_max_body_size, "asgi")
        self._handlers: trio.Nursery | None = None
        self._closing = trio.Event()
        #: The writes in progress (`_TCPServer.protocol_send`), counted in ``unsent`` (the engine-wide bound,
        #: which the daemon shares with the msgpack front) and cut when shutdown's flush time is up.
        self._sending = ReplyWrites(unsent)
        self.connections = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._handlers = nursery
            nursery.start_soon(self.tcp_gate.close_expired)
            task_status.started()
            await self._closing.wait()
            # Replies still being written get FLUSH_TIMEOUT; idle keep-alive connections are closed at once.
            await self._context.terminated.set()
            with trio.move_on_after(FLUSH_TIMEOUT):
                await self.app.wait_idle()
            self._sending.cut_all()  # shielded from the nursery's cancel, not from their own
            nursery.cancel_scope.cancel()

    def begin_close(self) -> None:
        self._closing.set()

    async def accept_loop(self, listener: trio.SocketListener, transport: Transport) -> None:
        handlers = self._handlers
        assert handlers is not None, "HttpServer.run must be started before accepting"

        def serve(stream: trio.SocketStream) -> None:
            # Admitted now, not when its task starts: the next accept may come first.
            slot = self.tcp_gate.admit(stream) if transport == "tcp" else None
            if transport == "tcp" and slot is None:
                stream.socket.close()  # at once: nothing is owed to a connection that was never served
                return
            handlers.start_soon(self._serve_connection, stream, transport, slot)

        await accept_forever(listener, serve, f"http ({transport})")

    async def _serve_connection(self, stream: trio.SocketStream, transport: Transport, slot: TcpSlot | None) -> None:
        state: dict[str, Any] = {TRANSPORT: transport}
        if transport == "unix":
            state[PEER] = peer_credentials(stream.socket)
        if slot is not None:
            state[KEY_ACCEPTED] = functools.partial(self.tcp_gate.prove, slot)
        self.connections += 1
        _replies_being_written.set(self._sending)
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
            if slot is not None:
                self.tcp_gate.release(slot)
