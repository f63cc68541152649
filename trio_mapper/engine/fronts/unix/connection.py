"""Client connections: framing, the handshake, dispatch to the scheduler, and replies written whole.

Each connection runs two tasks: a reader that decodes frames and hands requests to the scheduler, and a
writer that is the only task to write on the socket, so frames never interleave and a reply is never
half-sent unless the connection itself is being torn down. An exception in one connection is logged and
closes that connection only.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Final, cast

import attrs
import msgspec
import trio

from trio_mapper._version import __version__
from trio_mapper.bodies import decode_body
from trio_mapper.engine.core.outcome import Chunk, ClientIdentity, Failed, Finished, Outcome, RequestSpec, Started
from trio_mapper.engine.core.scheduler import Scheduler
from trio_mapper.engine.fronts.receiving import ReceivingBytes, receiving_limit
from trio_mapper.engine.fronts.unsent import UnsentReplies
from trio_mapper.engine.upstream.client import ReplyBody
from trio_mapper.wire import (
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    Cancel,
    Error,
    ErrorKind,
    FrameBuffer,
    FrameTooLarge,
    Hello,
    Message,
    Ping,
    Pong,
    RequestId,
    Result,
    Stats,
    StatsRequest,
    Submit,
    Welcome,
    describe_decode_error,
    engine_codec,
    salvage_request_id,
)
from trio_mapper.wire import Chunk as WireChunk
from trio_mapper.wire import Timings as WireTimings

log = logging.getLogger("trio_mapper.server")

#: Bytes asked of the socket per read; frames larger than this arrive over several reads.
READ_CHUNK: Final = 64 * 1024
#: A client must say hello this soon after connecting, so idle half-open connections do not pile up.
HANDSHAKE_TIMEOUT: Final = 30.0
#: A frame that has started must finish arriving this soon; a client that sends half a frame and stalls
#: would otherwise pin up to max_frame_bytes of buffer forever.
FRAME_STALL_TIMEOUT: Final = 60.0
#: Replies waiting to be written beyond which the reader stops reading: a client that floods pings
#: without reading replies gets backpressure instead of growing the engine's memory.
OUTBOX_HIGH_WATER: Final = 10_000
#: Bytes of replies waiting to be written beyond which the engine stops reading the client's frames, and
#: disconnects it (its requests cancelled) if it then reads none of its replies for `OUTBOX_STALL_TIMEOUT`.
#: Replies of requests already accepted keep arriving whether or not the client reads, so message counts
#: alone do not bound them. Not a disconnection on its own: a client reading large replies slowly (a map of
#: embedding batches of 130 MB each, decoded one by one) passes it while reading.
OUTBOX_MAX_BYTES: Final = 256 * 1024 * 1024
#: How long a client past `OUTBOX_MAX_BYTES` may read nothing before it is disconnected.
OUTBOX_STALL_TIMEOUT: Final = 60.0
#: Writes go out in pieces of at most this size, so that a client reading a large reply is seen progressing.
WRITE_PIECE_BYTES: Final = 1024 * 1024
#: Unsent reply bytes above which a stream's next chunk waits (`Connection.relay`). The upstream's events then
#: stay in the upstream connection, whose read pauses (TCP slows the upstream), instead of piling up here: a
#: client that stops reading a stream costs the engine about this much, not the whole completion, and never
#: nears OUTBOX_MAX_BYTES (which would disconnect it). A chunk is a few hundred bytes, so this is thousands of
#: chunks ahead of a client that keeps up: it never waits.
STREAM_HIGH_WATER_BYTES: Final = 1024 * 1024
#: How long shutdown waits for a connection to flush its last replies.
FLUSH_TIMEOUT: Final = 5.0

#: The last frame of a connection the engine closes to shut down (a connection-level ``shutting_down`` error):
#: every request the engine read on it has been answered before it, so a request still unanswered never ran.
GOODBYE: Final = (
    "the engine is shutting down: it has answered every request it read on this connection and reads no more. "
    "A request still unanswered was not read and never ran: resubmit it to the next engine"
)

StatsProvider = Callable[[], tuple[dict[str, Any], dict[str, dict[str, Any]]]]

#: How an HTTP request begins (``POST /v1/…``, ``GET /…``, HTTP/2's ``PRI * …``): an OpenAI client pointed at
#: this socket instead of the HTTP API's. Read as a length prefix these bytes declare a frame of a gigabyte or
#: more, so they can only arrive here as a refused frame.
_HTTP_REQUEST_START: Final = re.compile(rb"[A-Z]{3}[A-Z ]")


def _spec(message: Submit) -> RequestSpec:
    return RequestSpec(
        endpoint=message.endpoint,
        body=message.body,
        method=message.method,
        deadline=message.deadline,
        max_attempts=message.max_attempts,
        priority=message.priority,
    )


class _CloseConnection(Exception):
    """Raised inside the reader to end the connection after the replies so far are flushed."""


class Connection:
    """One client connection; also the `ReplySink` its requests answer through."""

    _numbers = itertools.count(1)

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        scheduler: Scheduler,
        stats: StatsProvider,
        max_frame_bytes: int,
        peer: str = "",
        identity: str = "unknown peer",
        client: ClientIdentity | None = None,
        unsent: UnsentReplies | None = None,
        receiving: ReceivingBytes | None = None,
        http_api: Sequence[str] = (),
    ) -> None:
        self.number = next(self._numbers)
        self.peer = peer
        self._identity = identity
        #: The peer's uid/gid; the name its hello gives is added at the handshake.
        self._client = client if client is not None else ClientIdentity()
        self._stream = stream
        self._scheduler = scheduler
        self._stats = stats
        self._max_frame_bytes = max_frame_bytes
        self._codec = engine_codec()
        self._outbox: deque[bytes] = deque()
        #: The write in progress, whose deadline is set once the client is past `OUTBOX_MAX_BYTES`.
        self._writing: trio.CancelScope | None = None
        #: This connection's replies not yet on the socket (queued, and taken by the writer but not written), counted
        #: in the engine-wide bound on unsent replies (the daemon shares one with the HTTP front), which disconnects
        #: the client holding the most when it is passed: the per-connection cap alone would let many slow readers
        #: hold cap x connections.
        self._unsent = (unsent if unsent is not None else UnsentReplies()).holder(self.stop_for_unread_replies)
        #: Bytes of large frames being received, across all connections (the daemon shares one).
        self._receiving = receiving if receiving is not None else ReceivingBytes(receiving_limit(max_frame_bytes))
        #: Where the engine serves its OpenAI HTTP API (``unix:/path``, ``http://host:port``), for an HTTP client
        #: that connected here by mistake; read when one does (the daemon fills it as its listeners open).
        self._http_api = http_api
        self._closed = False
        #: Set by `close_for_shutdown`: the reader stops where it waits for input.
        self._stopping = False
        #: The reader's wait for input (bytes, or room for a large frame), which `close_for_shutdown` cancels.
        self._waiting_for_input: trio.CancelScope | None = None
        self._outbox_changed = trio.Event()
        self._outbox_drained = trio.Event()
        self._draining = False
        self._scope = trio.CancelScope()
        self._opened_at = trio.current_time()
        self.handshaken = False
        self._json_bodies = False
        #: The protocol minor agreed in the handshake; chunk frames need 1.
        self.minor = 0

    @property
    def client_key(self) -> int:
        return self.number

    @property
    def client(self) -> ClientIdentity:
        return self._client

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def label(self) -> str:
        return f"conn#{self.number}{f' ({self.peer})' if self.peer else ''}"

    @property
    def unsent_bytes(self) -> int:
        """Reply bytes not yet on the socket, as the engine-wide bound counts them."""
        return self._unsent.size

    def deliver(self, message: Message) -> None:
        if self._closed:
            return  # nobody is left to read it
        self._enqueue(self._encode(message))

    def _enqueue(self, frame: bytes) -> None:
        self._outbox.append(frame)
        self._unsent.grow(len(frame))
        self._outbox_changed.set()
        if self._writing is not None and self._over_outbox_limit():
            self._writing.deadline = min(self._writing.deadline, trio.current_time() + OUTBOX_STALL_TIMEOUT)

    def _over_outbox_limit(self) -> bool:
        return self._unsent.size > OUTBOX_MAX_BYTES

    def stop_for_unread_replies(self, why: str) -> None:
        """Disconnect a client that does not read its replies (its requests are withdrawn)."""
        if not self._scope.cancel_called:
            log.warning(
                "%s has %d MiB of replies it does not read (%s); disconnecting it",
                self.label,
                self._unsent.size // 2**20,
                why,
            )
            self._scope.cancel()

    def disconnect(self, why: str) -> None:
        """Close the connection now (its requests are withdrawn), saying why in the log."""
        if not self._scope.cancel_called:
            log.warning("%s: disconnected: %s", self.label, why)
            self._scope.cancel()

    def _drop_outbox(self) -> None:
        self._outbox.clear()

    def begin_close(self) -> None:
        """Finish writing what is queued, then close; a client that does not read gets FLUSH_TIMEOUT."""
        self._draining = True
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + FLUSH_TIMEOUT)
        self._outbox_changed.set()

    def close_for_shutdown(self) -> None:
        """The engine is stopping and has answered every request it accepted: stop reading, answer what was
        read, say goodbye (`GOODBYE`), flush and close; a client that does not read gets FLUSH_TIMEOUT.

        Closing while the client writes leaves a race: a request that arrives just then, unread, would look to
        the client like one the engine may have run. The goodbye ends it, as HTTP/2's GOAWAY does: every frame
        the reader took is answered before it, so what is still unanswered when it arrives was never read.
        The reader stops only where it waits for input, never inside a frame it has taken.
        """
        self._stopping = True
        if self._waiting_for_input is not None:
            self._waiting_for_input.cancel()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + FLUSH_TIMEOUT)

    async def serve(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    try:
                        await self._read_loop()
                    except _CloseConnection:
                        self.begin_close()
                        return
                    if self._stopping:
                        if self.handshaken:
                            self.deliver(Error(id=None, kind=ErrorKind.SHUTTING_DOWN, message=GOODBYE))
                        self.begin_close()
                        return
                    # The peer closed: nobody is left to read replies.
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # The client went away mid-write: routine, not an engine error.
            log.debug("%s: connection lost: %r", self.label, group.exceptions[0])
        finally:
            self._closed = True
            self._drop_outbox()
            self._outbox_drained.set()  # a stream waiting for room: there is none to wait for any more
            self._unsent.release()  # what was queued, and what the writer had taken and not written
            with trio.CancelScope(shield=True):
                await self._scheduler.forget_owner(self)
                with trio.move_on_after(1):
                    await self._stream.aclose()
            log.debug("%s closed", self.label)

    # --- writing -------------------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            if not self._outbox:
                if self._draining:
                    self._scope.cancel()
                    return
                self._outbox_changed = trio.Event()
                await self._outbox_changed.wait()
                continue
            frames: list[bytes] = []
            while self._outbox and len(frames) < 256:
                frames.append(self._outbox.popleft())
            data = b"".join(frames)
            # Still counted (`_unsent`) until written: up to 256 replies, each of any size, would otherwise leave
            # the bounds unnoticed while the client does not read them.
            if not await self._send_in_pieces(data):
                return self.stop_for_unread_replies(
                    f"over the {OUTBOX_MAX_BYTES // 2**20} MiB allowed per connection, and none of it read for "
                    f"{OUTBOX_STALL_TIMEOUT:.0f}s"
                )
            # Set, then renewed: everyone waiting now wakes (the reader, any number of streams' relays) and
            # checks again; a waiter that replaced the event itself could orphan another waiting on the old one.
            drained, self._outbox_drained = self._outbox_drained, trio.Event()
            drained.set()

    async def _send_in_pieces(self, data: bytes) -> bool:
        """Write ``data``; False if the client, past `OUTBOX_MAX_BYTES`, read none of it for the stall timeout
        (the connection cannot carry anything more then: part of a piece may be out)."""
        view = memoryview(data) if len(data) > WRITE_PIECE_BYTES else None
        for start in range(0, len(data), WRITE_PIECE_BYTES):
            piece = data if view is None else view[start : start + WRITE_PIECE_BYTES]
            with trio.CancelScope() as writing:
                self._writing = writing
                if self._over_outbox_limit():
                    writing.deadline = trio.current_time() + OUTBOX_STALL_TIMEOUT
                await self._stream.send_all(piece)
            self._writing = None
            if writing.cancelled_caught:
                return False
            self._unsent.shrink(len(piece))
        return True

    def report(self, request_id: Hashable | None, event: Outcome) -> None:
        """A request's event from the core, rendered as this protocol's reply (`ReplySink`)."""
        match event:
            case Started():
                # Nothing to send: a whole reply is one frame, and a stream's status and headers travel in
                # its final Result (a client has nothing to do with them before its chunks).
                pass
            case Finished():
                self.deliver(
                    Result(
                        id=cast(RequestId, request_id),
                        status=event.status,
                        body=None if event.streamed else self._render_body(event.body),
                        headers=dict(event.headers),
                        attempts=event.attempts,
                        timings=WireTimings(
                            queued=event.timings.queued, upstream=event.timings.upstream, total=event.timings.total
                        ),
                        streamed=event.streamed,
                    )
                )
            case Failed():
                self.deliver(
                    Error(
                        id=cast(RequestId | None, request_id),
                        kind=event.kind,
                        message=event.message,
                        status=event.status,
                        body=self._render_body(event.body) if event.body is not None else None,
                        headers=dict(event.headers),
                        attempts=event.attempts,
                        param=event.param,
                    )
                )

    async def relay(self, request_id: Hashable, chunk: Chunk) -> None:
        """One chunk of a streamed reply, as a chunk frame; then waits while this connection's unsent replies
        exceed STREAM_HIGH_WATER_BYTES, which pauses the upstream read behind it (`ReplySink.relay`).

        Runs in the core's attempt task, not this connection's: it waits on the writer's drained event, and
        the core cancels it when the request ends (a cancel, the client gone, the deadline).

        Raises:
            msgspec.EncodeError, OverflowError…: the chunk cannot be carried in msgpack. Unlike `deliver`, the
                failure is not turned into an Error frame here: the core ends the request with internal_error,
                so the client still gets exactly one final reply, after the chunks it did get.
        """
        if self._closed:
            return  # nobody is left to read it; the core is withdrawing the request
        raw = chunk.data.encode()
        data = raw if self._json_bodies else decode_body(raw)
        self._enqueue(self._codec.encode(WireChunk(id=cast(RequestId, request_id), data=data, event=chunk.event)))
        while self._unsent.size > STREAM_HIGH_WATER_BYTES and not self._closed:
            await self._outbox_drained.wait()

    def _render_body(self, body: ReplyBody) -> Any:
        """An upstream body as this connection asked for it: its bytes, or its decoded values."""
        return body.content if self._json_bodies else body.decoded()

    def _encode(self, message: Message) -> bytes:
        try:
            return self._codec.encode(message)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            # An upstream body msgpack cannot carry (an integer beyond 64 bits, say): the request still
            # gets its one final reply, and the other requests on this connection are unaffected.
            request_id = getattr(message, "id", None)
            log.warning("%s: cannot encode the reply to id=%r: %s", self.label, request_id, exc)
            return self._codec.encode(
                Error(
                    id=request_id,
                    kind=ErrorKind.INTERNAL_ERROR,
                    message=f"the upstream's reply could not be encoded as msgpack ({exc}); please report it",
                )
            )

    # --- reading -------------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        buffer = FrameBuffer(self._max_frame_bytes)
        frame_started: float | None = None
        #: The frame in progress's length, when it is held against the total of frames being received.
        held = 0
        try:
            while True:
                try:
                    payload = buffer.next_frame()
                except FrameTooLarge as exc:
                    if not self.handshaken and _HTTP_REQUEST_START.match(buffer.head(4)):
                        self._answer_http_client()
                        raise _CloseConnection from None
                    self.deliver(
                        Error(
                            id=None,
                            kind=ErrorKind.PROTOCOL_ERROR,
                            message=f"{exc}; the connection is closed. Send smaller requests, or raise the "
                            "engine's max_frame_bytes",
                        )
                    )
                    log.info("%s sent a frame of %d bytes (limit %d); closing", self.label, exc.length, exc.limit)
                    raise _CloseConnection from None
                if payload is not None:
                    # Held until the core has the request: decoded and waiting for the token-counting thread,
                    # a body takes many times its size (a reviewer's 60 frames of 3.6 MiB took 4 GiB).
                    await self._handle_frame(payload)
                    self._receiving.release(held, self._client.uid)
                    held = 0
                    if len(self._outbox) > OUTBOX_HIGH_WATER or self._over_outbox_limit():
                        await self._wait_for_outbox_to_drain()
                    continue
                if not buffer.pending_bytes:
                    frame_started = None
                elif not held and (declared := buffer.declared_length) is not None and declared > READ_CHUNK:
                    # Smaller frames are bounded by the read size; a larger one is read only once its length
                    # fits in the total, and the time it waits for that is not the client's to finish it in.
                    with self._input_wait() as waiting:
                        await self._hold_room_for(declared)
                        held = declared
                    if waiting.cancelled_caught:
                        return
                    frame_started = None
                if buffer.pending_bytes and frame_started is None:
                    frame_started = trio.current_time()
                with self._input_wait() as waiting:
                    data = await self._receive(frame_started)
                if waiting.cancelled_caught:
                    return  # closing for the engine's shutdown; a part of a frame was not read
                if not data:
                    if buffer.pending_bytes:
                        log.info("%s closed in the middle of a frame", self.label)
                    return
                buffer.feed(data)
        finally:
            self._receiving.release(held, self._client.uid)

    def _answer_http_client(self) -> None:
        """An HTTP client (the SDK, curl) given this socket instead of the HTTP API's: answer in HTTP, which it
        can read, with where to go, rather than a msgpack frame it reports as a broken connection."""
        # The socket as the path httpx.HTTPTransport(uds=...) takes, the port as the base URL the SDK takes.
        places = [where[5:] if where.startswith("unix:") else f"{where}/v1" for where in self._http_api]
        if places:
            hint = f"point HTTP clients at {' or '.join(places)} (docs/http.md)"
        else:
            hint = "this engine serves no HTTP API (its HTTP socket is off and it has no --http port)"
        message = (
            "this is the trio-mapper engine's msgpack socket (docs/protocol.md), not its OpenAI-compatible HTTP "
            f"API: {hint}"
        )
        body = msgspec.json.encode(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "wrong_socket"}}
        )
        head = (
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-should-retry: false\r\nconnection: close\r\n\r\n"
        )
        self._enqueue(head.encode() + body)
        log.info("%s spoke HTTP on the msgpack socket: answered with where the HTTP API is, and closed", self.label)

    def _input_wait(self) -> trio.CancelScope:
        """The scope of one wait for input, cancelled by `close_for_shutdown` (or at once if it came first).
        Trio's receive_some, cancelled, has taken nothing: the bytes not read stay unread."""
        scope = trio.CancelScope()
        if self._stopping:
            scope.cancel()
        self._waiting_for_input = scope
        return scope

    async def _hold_room_for(self, length: int) -> None:
        if not self._receiving.try_hold(length, self._client.uid):
            if (count := self._receiving.waits.count()) is not None:
                log.warning(
                    "msgpack: %d large frame(s) waited, unread, for room: frames being received hold %d of "
                    "the %d MiB the engine allows at once (16 x max_frame_bytes, at least 64 MiB), or their uid "
                    "its quarter of it",
                    count,
                    self._receiving.held >> 20,
                    self._receiving.limit >> 20,
                )
            await self._receiving.hold(length, self._client.uid)

    async def _receive(self, frame_started: float | None) -> bytes | bytearray:
        """The next bytes, within the handshake's or the current frame's total allowance (not per read:
        a client trickling a byte a minute must not pin a frame buffer forever)."""
        if not self.handshaken:
            deadline, what, allowance = self._opened_at + HANDSHAKE_TIMEOUT, "say hello", HANDSHAKE_TIMEOUT
        elif frame_started is not None:
            deadline, what, allowance = frame_started + FRAME_STALL_TIMEOUT, "finish a frame", FRAME_STALL_TIMEOUT
        else:
            return await self._stream.receive_some(READ_CHUNK)
        with trio.move_on_at(deadline):
            return await self._stream.receive_some(READ_CHUNK)
        self.deliver(
            Error(
                id=None,
                kind=ErrorKind.PROTOCOL_ERROR,
                message=f"the client took longer than {allowance:.0f}s to {what}; the connection is closed",
            )
        )
        raise _CloseConnection

    async def _wait_for_outbox_to_drain(self) -> None:
        while not self._closed and (
            len(self._outbox) > OUTBOX_HIGH_WATER // 2 or self._unsent.size > OUTBOX_MAX_BYTES // 2
        ):
            await self._outbox_drained.wait()

    def _protocol_error(self, request_id: Any, message: str) -> None:
        self.deliver(Error(id=request_id, kind=ErrorKind.PROTOCOL_ERROR, message=message))

    async def _handle_frame(self, payload: bytes | memoryview) -> None:
        try:
            message = self._codec.decode(payload)
        except (msgspec.MsgspecError, ValueError) as exc:
            request_id = salvage_request_id(payload)
            if request_id is not None and self._scheduler.is_outstanding(self, request_id):
                request_id = None  # that id's final reply is still to come; this error must not read as it
            log.info("%s sent an invalid frame: %s", self.label, exc)
            if not self.handshaken:
                # A client whose first frame is not even a message speaks something else: no point going on.
                self._protocol_error(
                    None,
                    f"invalid first frame: {describe_decode_error(exc)}; the first frame must be a hello with "
                    f"protocol={PROTOCOL_VERSION}. The connection is closed",
                )
                raise _CloseConnection from None
            return self._protocol_error(request_id, f"invalid frame: {describe_decode_error(exc)}")

        if not self.handshaken:
            if not isinstance(message, Hello):
                self._protocol_error(
                    None,
                    f"the first frame must be a hello with protocol={PROTOCOL_VERSION}; the connection is closed",
                )
                raise _CloseConnection
            if message.protocol != PROTOCOL_VERSION:
                self._protocol_error(
                    None,
                    f"this engine speaks protocol {PROTOCOL_VERSION}, the client asked for {message.protocol}; "
                    "upgrade the client or the engine so they match. The connection is closed",
                )
                raise _CloseConnection
            self.handshaken = True
            # An unknown format is not an error: the welcome says which one this connection gets.
            self._json_bodies = message.body_format == "json"
            if message.client:
                self._client = attrs.evolve(self._client, name=message.client)
            # The lower of the two, so neither side sends what the other cannot read.
            self.minor = max(0, min(message.minor, PROTOCOL_MINOR))
            log.debug("%s: hello from %r (minor %d)", self.label, message.client, message.minor)
            welcome = Welcome(
                protocol=PROTOCOL_VERSION,
                server=f"trio-mapper/{__version__}",
                max_frame_bytes=self._max_frame_bytes,
                body_format="json" if self._json_bodies else "msgpack",
                minor=self.minor,
            )
            self.deliver(welcome)
            return

        match message:
            case Submit() if (
                self.minor < 1
                and message.body.get("stream") is True
                # A duplicate of an outstanding id goes on to intake, which refuses it without naming the id.
                and not self._scheduler.is_outstanding(self, message.id)
            ):
                # A client that did not offer minor 1 would not know what to do with chunk frames.
                self.deliver(
                    Error(
                        id=message.id,
                        kind=ErrorKind.INVALID_REQUEST,
                        message="stream=true needs protocol minor 1 on the msgpack socket, and this client's hello "
                        "did not offer it (minor 0), so it cannot take the chunk frames of a stream. Upgrade the "
                        "client (to one that says hello with minor=1, such as trio-mapper's Client.stream()), send "
                        "the request without stream=true, or use the HTTP front",
                    )
                )
            case Submit():
                try:
                    await self._scheduler.intake(self, message.id, _spec(message), size_bytes=len(payload))
                except Exception:
                    # A bug must cost one request, not the connection and every request on it.
                    log.exception("%s: internal error while accepting id=%r", self.label, message.id)
                    self.deliver(
                        Error(
                            id=message.id,
                            kind=ErrorKind.INTERNAL_ERROR,
                            message="the engine failed to accept this request (a bug, logged by the engine); "
                            "please report it",
                        )
                    )
            case Cancel(id=request_id):
                self._scheduler.cancel(self, request_id)
            case StatsRequest(id=request_id):
                engine, lanes = self._stats()
                self.deliver(Stats(id=request_id, engine=engine, lanes=lanes))
            case Ping(id=request_id):
                self.deliver(Pong(id=request_id))
            case Hello():
                self._protocol_error(None, "hello was already received on this connection; ignored")
            case _:  # pragma: no cover - the union is exhaustive
                self._protocol_error(None, f"unexpected message {type(message).__name__}")
