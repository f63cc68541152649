"""The client side of the protocol as a state machine with no I/O (sans-IO, the way h11 and wsproto are built).

`ClientConnection` is everything the clients know about the protocol: the handshake, request ids, the table
of outstanding requests, decoding replies and routing them to the request they answer, and why the
connection ended. Bytes in, events out: feed what the socket returned to `ClientConnection.receive_data`
(``b""`` when the engine closed its end) and take events from `ClientConnection.next_event` /
`ClientConnection.events`. Requests in, bytes out: `send_hello`, `submit`, `cancel`, `stats` and `ping`
return the bytes to write. `MapWindow` is ``map()``'s window on top of it: it says when to pull the next
input item, makes the ``Submit`` for it, and turns replies into `MapResult` objects in completion order.
`StreamState` is ``stream()``'s: a streamed request's chunks in order, then its end.

Nothing here blocks, sleeps, reads a clock, owns a socket or a thread, or raises because of what the engine
sent: a bad frame becomes an error event for its request, a broken connection the `ConnectionClosed`
event and the `State.CLOSED` state. The drivers own the rest. `trio_mapper.client.sync.Client` moves the bytes
with standard-library sockets for any number of threads; `trio_mapper.client.aio.AsyncClient` with anyio
tasks on Trio or asyncio. Each is a short loop (read, ``receive_data``, hand each event to whoever waits
for it; write what the core returned) plus the waiting its callers do, so a protocol rule is written (and
tested, without sockets: tests/client/test_client_core.py) once.

The core is not thread-safe: a driver serialises calls to it (`Client` under its lock; `AsyncClient` runs
it in one event loop).

Light like the clients: msgspec, the standard library and the light `trio_mapper` modules only.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
import os
import sys
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from trio_mapper.bodies import is_binary_type
from trio_mapper.client.errors import (
    ConnectionLost,
    InvalidRequestError,
    ProtocolError,
    ShuttingDownError,
    TrioMapperError,
    make_error,
)
from trio_mapper.text import shorten
from trio_mapper.wire import (
    LENGTH_PREFIX,
    PRIORITY_CLASSES,
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Codec,
    Error,
    FrameBuffer,
    FrameTooLarge,
    Hello,
    Ping,
    Pong,
    RequestId,
    Result,
    Stats,
    StatsRequest,
    Submit,
    Welcome,
    client_codec,
    decode_body,
    salvage_request_id,
)

logger = logging.getLogger("trio_mapper.client")

#: Largest reply frame accepted from the engine. `Welcome.max_frame_bytes` bounds what the engine *accepts*;
#: replies carry upstream bodies (a large embeddings batch is tens of MB once msgpack'd), so this is
#: generous. It only exists so a corrupt length prefix cannot make us buffer gigabytes.
MAX_REPLY_FRAME_BYTES: Final = 512 * 1024 * 1024
#: How many requests `map` keeps in flight unless told otherwise.
DEFAULT_WINDOW: Final = 64


def check_priority(priority: str | None) -> str | None:
    """``priority`` itself when it is None or one of `PRIORITY_CLASSES`; else `ValueError` naming the classes.

    Checked here, before anything is sent, so a typo fails at the call that made it rather than as an
    ``invalid_request`` reply (the engine refuses it too).
    """
    if priority is None or (isinstance(priority, str) and priority in PRIORITY_CLASSES):
        return priority
    raise ValueError(
        f"priority must be one of {', '.join(repr(c) for c in PRIORITY_CLASSES)}, or None for the class of "
        f"the client's tenant; got {priority!r}"
    )


# --- what map() takes and gives ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One API request for `Client.map` / `AsyncClient.map` (``request()`` takes the same fields directly).

    Args:
        endpoint: a relative API path such as ``/v1/chat/completions``.
        body: the JSON request body.
        method: the HTTP method (``GET`` for e.g. ``/v1/models``).
        deadline: seconds the engine may spend on it (from when it reads the request) before answering
            with a `RequestTimeoutError`; None uses ``map(deadline=...)``, else no deadline.
        max_attempts: upstream attempts at most, retries included; None uses ``map(max_attempts=...)``,
            else the engine's default.
        priority: the priority class to queue it in (``interactive``, ``default`` or ``batch``); None uses
            ``map(priority=...)``, else the client's ``priority``, else the class of the client's tenant. A
            request may ask for a class *lower* than its tenant's, never a higher one: the engine takes the
            lower of the two. Any other value raises `ValueError` here.
        tag: anything of yours (a row id, a file name…); never sent, handed back in `MapResult.request`.
    """

    endpoint: str
    body: Mapping[str, Any]
    _: KW_ONLY
    method: str = "POST"
    deadline: float | None = None
    max_attempts: int | None = None
    priority: str | None = None
    tag: Any = None

    def __post_init__(self) -> None:
        check_priority(self.priority)


@dataclass(frozen=True, slots=True)
class MapResult:
    """One completed item of ``map()``.

    Unpacks as ``(input, outcome)``: ``for item, outcome in client.map(...)``.

    Attributes:
        input: the item exactly as it came out of your iterable.
        request: that item as a `Request` (with map's defaults applied; ``request.tag`` is yours).
        result: the protocol `Result` (status, headers, attempts, timings) on success, else None.
        error: the `TrioMapperError` on failure, else None.
    """

    input: Any
    request: Request
    result: Result | None = None
    error: TrioMapperError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def body(self) -> Any:
        """The upstream's JSON body on success (usually a dict), None on failure."""
        return None if self.result is None else self.result.body

    @property
    def outcome(self) -> Any:
        """The body on success, the exception instance on failure."""
        return self.error if self.error is not None else self.body

    def unwrap(self) -> Any:
        """The body on success; raises the error on failure."""
        if self.error is not None:
            raise self.error
        return self.body

    def __iter__(self) -> Iterator[Any]:
        return iter((self.input, self.outcome))


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One event of a streamed reply, as ``stream()`` yields it.

    Attributes:
        data: the event's data, decoded: for every OpenAI stream a dict (a ``chat.completion.chunk``, a
            ``text_completion`` chunk, a Responses API event). A string if an event was not JSON.
        event: the server-sent event's name: the Responses API names its events (``response.created``,
            ``response.output_text.delta``… the same name as ``data["type"]``); None for chat and completions.
    """

    data: Any
    event: str | None = None


def coerce_request(
    item: Any,
    *,
    endpoint: str | None,
    deadline: float | None,
    max_attempts: int | None,
    priority: str | None = None,
) -> Request:
    """Turn one ``map()`` input into a `Request`: a `Request`, an ``(endpoint, body)`` pair, or a body dict
    (which needs ``map(endpoint=...)``). Map-wide ``deadline``/``max_attempts``/``priority`` fill the gaps."""
    if isinstance(item, Request):
        request = item
    elif isinstance(item, Mapping):
        if endpoint is None:
            raise TypeError("map() got a body dict but no endpoint: pass map(..., endpoint='/v1/...')")
        request = Request(endpoint, item)
    elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        request = Request(item[0], item[1])
    else:
        raise TypeError(
            f"map() items must be a Request, an (endpoint, body) pair or a body dict; got {type(item).__name__}"
        )
    defaults: dict[str, Any] = {"deadline": deadline, "max_attempts": max_attempts, "priority": priority}
    gaps = {name: value for name, value in defaults.items() if value is not None and getattr(request, name) is None}
    return dataclasses.replace(request, **gaps) if gaps else request


def default_client_name() -> str:
    """What `Hello.client` says unless told otherwise: ``"<program>[<pid>]"``."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{program}[{os.getpid()}]"


# --- events -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The engine accepted the handshake; the connection is `State.OPEN`."""

    welcome: Welcome


@dataclass(frozen=True, slots=True)
class Answered:
    """The final reply to a `ClientConnection.submit`: the upstream's `Result`, or the error it ended with."""

    request_id: RequestId
    outcome: Result | TrioMapperError
    #: What the driver passed to ``submit(..., context=)``: whoever waits for this reply.
    context: Any


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """One chunk of a request submitted with ``stream=True``; its chunks come in order, then its `Answered`."""

    request_id: RequestId
    chunk: StreamChunk
    context: Any


@dataclass(frozen=True, slots=True)
class StatsReceived:
    """The reply to `ClientConnection.stats`: ``{"engine": {...}, "lanes": {...}}``, or an error."""

    request_id: RequestId
    outcome: dict[str, Any] | TrioMapperError
    context: Any


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The reply to `ClientConnection.ping` (the driver measures the round trip), or an error."""

    request_id: RequestId
    outcome: Pong | TrioMapperError
    context: Any


@dataclass(frozen=True, slots=True)
class ConnectionLevelError:
    """An ``error`` with no request id: a problem with the connection's input, or the engine's reason for
    closing it. The connection stays open (unless a `ConnectionClosed` follows); the text is quoted in the
    `ConnectionLost` that ends it."""

    error: TrioMapperError


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over (the engine closed it, the transport broke, a reply was unusable, or the client
    closed it); no event follows. Emitted once.

    Attributes:
        error: what to raise: a `ConnectionLost`; during the handshake, the engine's refusal (its own
            error class) or a `ProtocolError`.
        orphans: the contexts of the requests still outstanding, which will now never be answered.
    """

    error: TrioMapperError
    orphans: tuple[Any, ...]


#: The events that answer one request; ``request_id`` and ``context`` say which.
Reply = Answered | StatsReceived | PongReceived
#: The events for one request's context: its chunks (a stream), then its reply.
RequestEvent = Reply | ChunkReceived
Event = Welcomed | Answered | ChunkReceived | StatsReceived | PongReceived | ConnectionLevelError | ConnectionClosed


def unwrap(reply: Reply) -> Any:
    """A reply's value (a `Result`, the stats dict or a `Pong`); raises it when it is an error."""
    if isinstance(reply.outcome, TrioMapperError):
        raise reply.outcome
    return reply.outcome


# --- decoding engine frames -------------------------------------------------------------------------------


class _LenientError(msgspec.Struct, tag_field="type", tag="error", forbid_unknown_fields=False):
    """`Error` that also decodes when fields are missing (an engine's bug, or a newer engine's frame),
    so that its request still gets an error instead of a generic decode failure."""

    id: RequestId | None
    kind: str
    message: str = ""
    status: int | None = None
    body: Any = None
    headers: dict[str, str] = {}
    attempts: int = 0
    param: str | None = None


#: Message types this client knows; protocol.md allows new ones within a version, so others are skipped.
_KNOWN_ENGINE_TYPES: Final = frozenset(
    str(cls.__struct_config__.tag) for cls in (Welcome, Result, Chunk, Error, Stats, Pong)
)


def _message_type(frame: bytes | memoryview) -> Any:
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    return raw.get("type") if isinstance(raw, dict) else None


def _decoded(body: Any, headers: Mapping[str, str] | None = None) -> Any:
    """A body sent in the "json" format (bytes, see `Hello.body_format`), decoded here in the client; the
    bytes themselves when the upstream's ``content-type`` says they are binary (speech's audio)."""
    if not isinstance(body, bytes) or (headers is not None and is_binary_type(headers.get("content-type"))):
        return body
    return decode_body(body)


def error_from_message(message: Error | _LenientError) -> TrioMapperError:
    return make_error(
        str(message.kind),
        message.message,
        status=message.status,
        body=_decoded(message.body),
        headers=message.headers,
        attempts=message.attempts,
        request_id=message.id,
        param=message.param,
    )


#: What `parse_frame` gives: a message to route, or the exception an ``error`` frame stands for.
Parsed = Welcome | Result | StreamChunk | Stats | Pong | TrioMapperError


def parse_frame(codec: Codec, frame: bytes | memoryview) -> tuple[RequestId | None, Parsed] | None:
    """Decode one engine frame into ``(id, message)``; ``id`` is None for connection-level messages.

    Returns None for a message type this client does not know (a newer engine's addition: ignored).
    Never raises for a bad frame: it becomes a `ProtocolError` (for the id it names, when it names one).
    """
    try:
        message = codec.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        message_type = _message_type(frame)
        if isinstance(message_type, str) and message_type not in _KNOWN_ENGINE_TYPES:
            logger.debug("ignoring a %r message from the engine (unknown to this client)", message_type)
            return None
        try:
            lenient = msgspec.msgpack.decode(frame, type=_LenientError)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
            request_id = salvage_request_id(frame)
            return request_id, ProtocolError(
                "protocol_error",
                f"could not decode a frame from the engine: {exc}",
                request_id=request_id,
            )
        return lenient.id, error_from_message(lenient)
    if isinstance(message, Error):
        return message.id, error_from_message(message)
    if isinstance(message, Result):
        return message.id, msgspec.structs.replace(message, body=_decoded(message.body, message.headers))
    if isinstance(message, Chunk):
        return message.id, StreamChunk(_decoded(message.data), message.event)
    if isinstance(message, Welcome):
        return None, message
    assert isinstance(message, Stats | Pong)
    return message.id, message


def describe_connection_loss(reason: str, last_error: TrioMapperError | None) -> str:
    if last_error is not None:
        return f"{reason}; the engine's last word: {last_error}"
    return reason


# --- the connection ---------------------------------------------------------------------------------------


class State(enum.Enum):
    #: Nothing sent yet: call `ClientConnection.send_hello` first.
    IDLE = "idle"
    #: ``hello`` sent; waiting for ``welcome``.
    HANDSHAKING = "handshaking"
    #: Requests may be sent.
    OPEN = "open"
    #: Over, for the reason in `ClientConnection.error`; nothing more is sent or received.
    CLOSED = "closed"


_Kind = Literal["submit", "stream", "stats", "ping"]
#: What each kind of request expects back, for the message when the engine sends something else.
_EXPECTED: Final[dict[_Kind, tuple[type, str]]] = {
    "submit": (Result, "a Result"),
    "stream": (Result, "a Result"),
    "stats": (Stats, "Stats"),
    "ping": (Pong, "Pong"),
}


class ClientConnection:
    """One client connection's protocol state, with no I/O. See the module docstring.

    Args:
        socket_path: the engine's socket, named in error messages (never opened here).
        client_name: what ``hello`` tells the engine about this client (a tenant's ``names`` match it).
        priority: the priority class of submits whose `Request` names none (see `Request.priority`); None
            leaves it to the engine: the class of the client's tenant.
        max_reply_frame_bytes: the largest reply frame accepted; a longer one closes the connection.

    Raises:
        ValueError: ``priority`` is not one of `PRIORITY_CLASSES`.
    """

    def __init__(
        self,
        *,
        socket_path: str | os.PathLike[str] = "",
        client_name: str | None = None,
        priority: str | None = None,
        max_reply_frame_bytes: int = MAX_REPLY_FRAME_BYTES,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.client_name = client_name if client_name is not None else default_client_name()
        #: The class asked for by submits that name none (None: the tenant's).
        self.priority = check_priority(priority)
        self.state = State.IDLE
        #: The engine's `Welcome`, once `State.OPEN`.
        self.welcome: Welcome | None = None
        #: Why the connection is `State.CLOSED` (the `ConnectionClosed` event's error), else None.
        self.error: TrioMapperError | None = None
        self._codec = client_codec()
        self._frames = FrameBuffer(max_reply_frame_bytes)
        self._ids = itertools.count(1)
        self._outstanding: dict[RequestId, tuple[_Kind, Any]] = {}
        self._eof = False
        self._closed_event: ConnectionClosed | None = None
        self._closed_event_taken = False
        self._loss_reason = ""
        self._loss_cause: BaseException | None = None
        self._last_connection_error: TrioMapperError | None = None
        #: Closed by `close` rather than lost: nothing reconnects, and the errors must not say it will.
        self._closed_by_client = False
        #: The engine said goodbye (a connection-level ``shutting_down``): it answered every request it had read
        #: and reads no more, so whatever is unanswered from then on never reached it.
        self._engine_stopped_reading = False

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state.value} {len(self._outstanding)} outstanding>"

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def outstanding(self) -> dict[RequestId, Any]:
        """id → context of every request sent and not answered yet (a copy)."""
        return {request_id: context for request_id, (_, context) in self._outstanding.items()}

    # -- requests in, bytes out --------------------------------------------------------------------------

    def send_hello(self) -> bytes:
        """The ``hello`` frame; it opens the handshake."""
        if self.state is not State.IDLE:
            raise RuntimeError(f"hello is the first frame; the connection is {self.state.value}")
        self.state = State.HANDSHAKING
        # Bodies in the "json" format: the engine forwards the upstream's bytes and this process decodes them.
        hello = Hello(protocol=PROTOCOL_VERSION, client=self.client_name, body_format="json", minor=PROTOCOL_MINOR)
        return self._codec.encode(hello)

    @property
    def can_stream(self) -> bool:
        """Whether the engine takes streamed requests (it agreed to protocol minor 1 in its welcome)."""
        return self.welcome is not None and self.welcome.minor >= 1

    def submit(self, request: Request, context: Any = None, *, stream: bool = False) -> tuple[RequestId, bytes]:
        """A new id for ``request`` and its ``submit`` frame; its reply will be an `Answered` event.

        With ``stream=True`` the body is sent with ``"stream": true`` (set here, whatever the body said) and
        the reply comes as `ChunkReceived` events, in order, then the `Answered` event (a `Result` whose
        ``body`` is None and ``streamed`` true, or the error the stream ended with). Without it, a body that
        says ``"stream": true`` is refused: its reply would come in pieces nobody asked for.

        The frame's ``priority`` is the request's, else this connection's `priority`, else None (the engine
        then uses the class of the client's tenant, which is also the highest class it grants).

        Raises:
            ValueError: the priority is not one of `PRIORITY_CLASSES` (nothing is outstanding or sent).
            InvalidRequestError: the frame is larger than the engine accepts (it would close the connection),
                or the body asks for a stream without ``stream=True``; nothing is outstanding and nothing is
                to be sent.
            ProtocolError: ``stream=True``, and the engine is too old to stream (nothing is sent).
            ConnectionLost: the connection is closed.
        """
        self._check_open()
        assert self.welcome is not None
        priority = check_priority(request.priority if request.priority is not None else self.priority)
        if stream and not self.can_stream:
            raise ProtocolError(
                "protocol_error",
                f"the engine at {self.socket_path} ({self.welcome.server}) cannot stream replies on this socket "
                f"(it speaks protocol {self.welcome.protocol} minor {self.welcome.minor}; streams need minor "
                f"{PROTOCOL_MINOR}): upgrade the engine, or send the request whole with request()",
            )
        request_id = next(self._ids)
        if stream:
            body = {**request.body, "stream": True}
        elif request.body.get("stream") is True:
            raise InvalidRequestError(
                "invalid_request",
                'the body says "stream": true: use stream() to receive the reply as it is generated, or drop '
                '"stream" to get it whole',
                request_id=request_id,
            )
        else:
            body = request.body if isinstance(request.body, dict) else dict(request.body)
        message = Submit(
            id=request_id,
            endpoint=request.endpoint,
            body=body,
            method=request.method,
            deadline=request.deadline,
            max_attempts=request.max_attempts,
            priority=priority,
        )
        try:
            frame = self._codec.encode(message)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
            # What msgpack cannot carry (an integer beyond 64 bits, an object, nesting beyond its limit) is
            # this request's fault, answered like any other invalid request: the others carry on.
            raise InvalidRequestError(
                "invalid_request",
                f"the request cannot be encoded as msgpack ({shorten(str(exc) or type(exc).__name__, 200)}); "
                "bodies are JSON values: objects, arrays, strings, numbers within 64 bits, booleans and null",
                request_id=request_id,
            ) from None
        size, limit = len(frame) - LENGTH_PREFIX.size, self.welcome.max_frame_bytes
        if size > limit:
            raise InvalidRequestError(
                "invalid_request",
                f"the request is {size} bytes once encoded; the engine accepts frames of at most {limit} bytes",
                request_id=request_id,
            )
        self._outstanding[request_id] = ("stream" if stream else "submit", context)
        return request_id, frame

    def stats(self, context: Any = None) -> tuple[RequestId, bytes]:
        """A ``stats`` frame; its reply will be a `StatsReceived` event. Raises `ConnectionLost` when closed."""
        self._check_open()
        request_id = next(self._ids)
        self._outstanding[request_id] = ("stats", context)
        return request_id, self._codec.encode(StatsRequest(id=request_id))

    def ping(self, context: Any = None) -> tuple[RequestId, bytes]:
        """A ``ping`` frame; its reply will be a `PongReceived` event. Raises `ConnectionLost` when closed."""
        self._check_open()
        request_id = next(self._ids)
        self._outstanding[request_id] = ("ping", context)
        return request_id, self._codec.encode(Ping(id=request_id))

    def cancel(self, request_ids: Iterable[RequestId]) -> bytes:
        """Give up on these requests: their replies will be dropped. Returns ``cancel`` frames for the submits
        among them still outstanding (the engine stops working on them); ``b""`` when there are none or the
        connection is closed."""
        return b"".join(
            self._codec.encode(Cancel(id=request_id))
            for request_id in request_ids
            if (entry := self._outstanding.pop(request_id, None)) is not None and entry[0] in {"submit", "stream"}
        )

    def forget(self, request_ids: Iterable[RequestId]) -> None:
        """Give up on requests whose frames were never written (the driver dropped them): no ``cancel``."""
        for request_id in request_ids:
            self._outstanding.pop(request_id, None)

    # -- bytes in, events out ----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes the engine sent, as they came; ``b""`` means it closed its end. Never raises."""
        if self.closed or self._eof:
            return
        if data:
            self._frames.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed (or the connection is closed and its
        `ConnectionClosed` was taken). Never raises because of what the engine sent."""
        while True:
            if self.closed:
                return self._take_closed_event()
            try:
                frame = self._frames.next_frame()
            except FrameTooLarge as exc:
                if self.state is State.OPEN:
                    self._close(f"reply from the engine refused: {exc}", exc)
                elif self._frames.head(5) == b"HTTP/":
                    self._close_with(ProtocolError("protocol_error", self._answered_in_http()))
                else:
                    self._close_with(ProtocolError("protocol_error", f"handshake reply refused: {exc}"))
                continue
            if frame is None:
                if not self._eof:
                    return None
                if self.state is State.OPEN:
                    self._close(f"the engine at {self.socket_path} went away (it closed the connection)", None)
                else:
                    self._close(self._handshake_lost(), None)
                continue
            parsed = parse_frame(self._codec, frame)
            if parsed is None:
                continue
            event = self._handshake(parsed[1]) if self.state is not State.OPEN else self._route(*parsed)
            if event is not None:
                return event

    def _answered_in_http(self) -> str:
        """Why a handshake got an HTTP reply: the path is an HTTP server's, most likely the engine's own HTTP API
        socket (``engine.sock.http``), one suffix away from the msgpack socket this client speaks to."""
        path = str(self.socket_path)
        hint = f"; its msgpack socket is {path.removesuffix('.http')}" if path.endswith(".http") else ""
        return (
            f"{path} answered in HTTP: it is an HTTP server (such as the engine's OpenAI HTTP API, for the openai "
            f"SDK), not the engine's msgpack socket{hint}"
        )

    def events(self) -> Iterator[Event]:
        """Every event available now."""
        while (event := self.next_event()) is not None:
            yield event

    # -- failure -----------------------------------------------------------------------------------------

    def fail(self, reason: str, cause: BaseException | None = None) -> None:
        """The driver's transport broke (or it gave up on it): close, with ``reason`` for every waiter.
        The `ConnectionClosed` event comes next. Does nothing when already closed."""
        if not self.closed:
            self._close(reason if self.state is State.OPEN else self._handshake_lost(), cause)

    def close(self) -> None:
        """The client closes the connection: waiters get ``ConnectionLost("the client was closed")``."""
        if not self.closed:
            self._closed_by_client = True
        self.fail("the client was closed")

    def connection_lost(self) -> ConnectionLost:
        """A fresh `ConnectionLost` saying why the connection ended (one instance raised in many threads or
        tasks would tangle its traceback); its ``__cause__`` is the underlying error."""
        error = ConnectionLost(self._loss_reason or "connection lost", socket_path=self.socket_path)
        error.__cause__ = self._loss_cause
        return error

    def request_lost(self, request_id: RequestId, *, sent: bool) -> ConnectionLost:
        """The error for a request that was still outstanding when the connection ended, saying whether it
        may have reached the upstream; its ``__cause__`` is the underlying error.

        The drivers never send such a request again by themselves, on the next connection or otherwise: the
        engine may have run it, and only the caller knows whether running it twice is acceptable (answers
        are exactly-once per connection, not across two). ``sent`` is whether the request's frame had been
        written whole to the socket, which only the driver knows: a frame never written whole never reached
        the engine, which acts on whole frames only. After the engine's goodbye no request reached it.
        """
        if sent and self._engine_stopped_reading:
            sent = False
            fate = f"request {request_id!r} was not read by the engine: it never ran; resubmit it"
        elif sent:
            fate = (
                f"request {request_id!r} was outstanding: the engine may have sent it upstream (and spent its "
                "tokens) before the connection ended, and its answer is lost. It was not sent again: resubmit it "
                "if running it twice is acceptable"
            )
        else:
            fate = f"request {request_id!r} had not been sent yet, so it never reached the engine: resubmit it"
        # Both drivers open a new connection on the next call after a lost one (never after close()).
        reconnect = "" if self._closed_by_client else ". The client connects again on its next call"
        error = ConnectionLost(
            f"{self._loss_reason or 'connection lost'}; {fate}{reconnect}",
            socket_path=self.socket_path,
            request_id=request_id,
            may_have_reached_upstream=sent,
        )
        error.__cause__ = self._loss_cause
        return error

    # -- internals ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state is State.OPEN:
            return
        if self.state is State.CLOSED:
            raise self.connection_lost()
        raise RuntimeError(f"the handshake is not done (the connection is {self.state.value})")

    def _handshake_lost(self) -> str:
        return f"the engine at {self.socket_path} closed the connection during the handshake"

    def _close(self, reason: str, cause: BaseException | None) -> None:
        self._loss_reason = describe_connection_loss(reason, self._last_connection_error)
        self._loss_cause = cause if cause is not None else self._last_connection_error
        self._close_with(self.connection_lost())

    def _close_with(self, error: TrioMapperError) -> None:
        if not self._loss_reason:  # a handshake refusal: later callers get this reason too
            self._loss_reason = f"the connection was refused: {error}"
            self._loss_cause = error
        self.state = State.CLOSED
        self.error = error
        orphans = tuple(context for _, context in self._outstanding.values())
        self._outstanding.clear()
        self._closed_event = ConnectionClosed(error, orphans)

    def _take_closed_event(self) -> ConnectionClosed | None:
        if self._closed_event_taken:
            return None
        self._closed_event_taken = True
        return self._closed_event

    def _handshake(self, message: Parsed) -> Event | None:
        """The engine's first frame."""
        path = self.socket_path
        if isinstance(message, Welcome):
            if message.protocol != PROTOCOL_VERSION:
                self._close_with(
                    ProtocolError(
                        "protocol_error",
                        f"the engine at {path} ({message.server}) speaks protocol {message.protocol}, this client "
                        f"speaks protocol {PROTOCOL_VERSION}: upgrade trio-mapper so both sides match",
                    )
                )
                return None
            self.state = State.OPEN
            self.welcome = message
            return Welcomed(message)
        if isinstance(message, TrioMapperError):
            message.message = (
                f"the engine at {path} refused the handshake (this client speaks protocol {PROTOCOL_VERSION}): "
                f"{message.message}"
            )
            self._close_with(message)
            return None
        self._close_with(
            ProtocolError(
                "protocol_error",
                f"the engine at {path} answered the handshake with {type(message).__name__} instead of Welcome",
            )
        )
        return None

    def _route(self, request_id: RequestId | None, message: Parsed) -> Event | None:
        """A reply after the handshake: the event for the request it answers, if we still wait for it."""
        if request_id is None:
            if isinstance(message, TrioMapperError):
                self._last_connection_error = message
                if isinstance(message, ShuttingDownError):
                    # The goodbye: nothing more comes, and nothing sent now would be read. Closed at once, so
                    # that the drivers' next call connects to the next engine instead of writing into this one.
                    self._engine_stopped_reading = True
                    logger.info("the engine is shutting down: %s", message)
                    self._close(f"the engine at {self.socket_path} is shutting down", None)
                else:
                    logger.warning("engine error about the connection: %s", message)
                return ConnectionLevelError(message)
            return None  # a second welcome: nothing to do with it
        if isinstance(message, StreamChunk):
            return self._chunk(request_id, message)
        entry = self._outstanding.pop(request_id, None)
        if entry is None:
            return None  # a request we gave up on (cancelled, interrupted): its late reply is dropped
        kind, context = entry
        outcome: Any = message
        if not isinstance(message, TrioMapperError):
            expected, name = _EXPECTED[kind]
            if not isinstance(message, expected):
                outcome = ProtocolError(
                    "protocol_error",
                    f"expected {name}, the engine sent {type(message).__name__}",
                    request_id=request_id,
                )
        if kind in {"submit", "stream"}:
            return Answered(request_id, outcome, context)
        if kind == "stats":
            if isinstance(outcome, Stats):
                outcome = {"engine": outcome.engine, "lanes": outcome.lanes}
            return StatsReceived(request_id, outcome, context)
        return PongReceived(request_id, outcome, context)

    def _chunk(self, request_id: RequestId, chunk: StreamChunk) -> Event | None:
        entry = self._outstanding.get(request_id)
        if entry is None:
            return None  # a stream we gave up on: its chunks keep coming until the engine reads our cancel
        kind, context = entry
        if kind == "stream":
            return ChunkReceived(request_id, chunk, context)
        # The engine streamed a reply nobody asked to stream (`submit` refuses stream bodies, so only an
        # engine's bug gets here). Ignoring the chunks would make the request succeed with a body of None, a
        # silent wrong answer: fail it instead, and drop what else comes for it.
        del self._outstanding[request_id]
        error = ProtocolError(
            "protocol_error",
            f"the engine sent a chunk for request {request_id!r}, which was not submitted as a stream",
            request_id=request_id,
        )
        if kind == "submit":
            return Answered(request_id, error, context)
        if kind == "stats":
            return StatsReceived(request_id, error, context)
        return PongReceived(request_id, error, context)


# --- map()'s window ---------------------------------------------------------------------------------------


class MapWindow:
    """``map()`` without I/O: which input to pull, what to submit, and the results in completion order.

    A driver loops: while `wants_input`, pull an item and write what `add` returns (`end_of_input` when the
    input runs out); hand each `Answered` event for this window to `deliver`; give the user `next_result`
    until it is None; stop when `done`. At most ``window`` requests are in flight or answered-but-not-taken,
    so the input is pulled only about ``window`` items ahead of the caller. Never blocks.

    Args:
        connection: the `ClientConnection` the requests go through.
        endpoint, deadline, max_attempts, priority: map()'s defaults for the items (see `coerce_request`).
        window: requests in flight at most.
        context: what the replies' events carry (default: this window), for the driver's routing.
    """

    def __init__(
        self,
        connection: ClientConnection,
        *,
        endpoint: str | None = None,
        window: int = DEFAULT_WINDOW,
        deadline: float | None = None,
        max_attempts: int | None = None,
        priority: str | None = None,
        context: Any = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self._priority = check_priority(priority)
        self._connection = connection
        self._endpoint = endpoint
        self._window = window
        self._deadline = deadline
        self._max_attempts = max_attempts
        self._context = self if context is None else context
        self._in_flight: dict[RequestId, tuple[Any, Request]] = {}
        self._ready: collections.deque[MapResult] = collections.deque()
        self._input_done = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<MapWindow {len(self._in_flight)} in flight, {len(self._ready)} ready of {self._window}>"

    @property
    def wants_input(self) -> bool:
        """Whether to pull the next input item now."""
        return not (self._input_done or self._closed) and len(self._in_flight) + len(self._ready) < self._window

    @property
    def in_flight(self) -> Mapping[RequestId, tuple[Any, Request]]:
        return types.MappingProxyType(self._in_flight)

    @property
    def has_results(self) -> bool:
        return bool(self._ready)

    @property
    def done(self) -> bool:
        """The input ran out and every result was taken (or the window was closed)."""
        return self._closed or (self._input_done and not self._in_flight and not self._ready)

    def add(self, item: Any) -> tuple[RequestId | None, bytes]:
        """Submit one input item; returns its id and the bytes to write.

        A request refused locally (larger than the engine accepts) becomes a failed result at once, and
        nothing is to be written (``b""``).

        Raises:
            TypeError: the item is not something ``map()`` takes.
            ConnectionLost: the connection is closed.
        """
        request = coerce_request(
            item,
            endpoint=self._endpoint,
            deadline=self._deadline,
            max_attempts=self._max_attempts,
            priority=self._priority,
        )
        try:
            request_id, frame = self._connection.submit(request, self._context)
        except InvalidRequestError as exc:
            self._ready.append(MapResult(item, request, error=exc))
            return exc.request_id, b""
        self._in_flight[request_id] = (item, request)
        return request_id, frame

    def end_of_input(self) -> None:
        self._input_done = True

    def deliver(self, event: Answered) -> None:
        """The reply to one of this window's requests."""
        entry = self._in_flight.pop(event.request_id, None)
        if entry is None or self._closed:
            return
        item, request = entry
        if isinstance(event.outcome, Result):
            self._ready.append(MapResult(item, request, result=event.outcome))
        else:
            self._ready.append(MapResult(item, request, error=event.outcome))

    def next_result(self) -> MapResult | None:
        """The oldest result not yet taken, or None."""
        return self._ready.popleft() if self._ready and not self._closed else None

    def close(self) -> list[RequestId]:
        """Stop: no more input or results. Returns the ids still in flight, for the driver to cancel
        (`ClientConnection.cancel`) or, if never written, forget."""
        self._closed = True
        self._ready.clear()
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        return in_flight


# --- stream()'s state -------------------------------------------------------------------------------------


class StreamState:
    """One streamed request without I/O: its chunks in the order they came, then how it ended.

    The driver hands it the request's `ChunkReceived` and `Answered` events (`deliver`) and its caller takes
    chunks (`next_chunk`) until there are none and `done`; then `finish` returns the final `Result` or raises
    the error the stream ended with. Chunks are buffered without a bound: the engine paces the stream to
    the connection's reading, not to this caller's, so a caller slower than the upstream holds the rest of
    the reply here (a completion's worth of small chunks, at most).
    """

    def __init__(self) -> None:
        self._chunks: collections.deque[StreamChunk] = collections.deque()
        self._outcome: Result | TrioMapperError | None = None

    def __repr__(self) -> str:
        return f"<StreamState {len(self._chunks)} buffered{', ended' if self._outcome is not None else ''}>"

    def deliver(self, event: ChunkReceived | Answered) -> None:
        if isinstance(event, ChunkReceived):
            self._chunks.append(event.chunk)
            return
        outcome = event.outcome
        if isinstance(outcome, Result) and not outcome.streamed and outcome.body is not None:
            # The upstream answered whole (an endpoint that does not stream, or one that ignored "stream"):
            # the body is the stream's one chunk, rather than lost.
            self._chunks.append(StreamChunk(outcome.body))
        self._outcome = outcome

    @property
    def has_news(self) -> bool:
        """Whether `next_chunk` or `finish` has something for the caller."""
        return bool(self._chunks) or self._outcome is not None

    @property
    def done(self) -> bool:
        """The request ended and every chunk was taken."""
        return self._outcome is not None and not self._chunks

    def next_chunk(self) -> StreamChunk | None:
        """The oldest chunk not taken yet, or None."""
        return self._chunks.popleft() if self._chunks else None

    def finish(self) -> Result:
        """The final `Result` (status, headers, attempts, timings) once `done`; raises the error it ended with."""
        if self._outcome is None:
            raise RuntimeError("the stream has not ended")
        if isinstance(self._outcome, TrioMapperError):
            raise self._outcome
        return self._outcome


__all__ = [
    "DEFAULT_WINDOW",
    "MAX_REPLY_FRAME_BYTES",
    "PRIORITY_CLASSES",
    "Answered",
    "ChunkReceived",
    "ClientConnection",
    "ConnectionClosed",
    "ConnectionLevelError",
    "Event",
    "MapResult",
    "MapWindow",
    "PongReceived",
    "Reply",
    "Request",
    "RequestEvent",
    "State",
    "StatsReceived",
    "StreamChunk",
    "StreamState",
    "Welcomed",
    "check_priority",
    "coerce_request",
    "default_client_name",
    "parse_frame",
    "unwrap",
]
