"""Client helpers for the trio-mapper engine: send OpenAI API requests through its Unix socket.

`Client` is for plain blocking code (the standard library's `socket`; thread-safe). `AsyncClient`
(`trio_mapper.aio_client`, re-exported here lazily) runs on Trio and asyncio alike through anyio.

This module is deliberately light: msgspec, the standard library, `trio_mapper.protocol` and
`trio_mapper.paths`. Importing it never imports trio, httpx or anyio.

Wire protocol in short (see `trio_mapper.protocol`): the first frame is ``Hello``, the engine answers
``Welcome``; then many requests are in flight at once, each with an id chosen here; replies arrive in
completion order, exactly one final ``Result``/``Error`` per id; ``Cancel(id)`` withdraws a request.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from trio_mapper.client_errors import (
    ERROR_CLASSES,
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
    make_error,
)
from trio_mapper.paths import SOCKET_ENV_VAR, default_socket_path, resolve_socket_path
from trio_mapper.protocol import (
    PROTOCOL_VERSION,
    Cancel,
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

if TYPE_CHECKING:
    from trio_mapper.aio_client import AsyncClient, AsyncMapIterator

logger = logging.getLogger("trio_mapper.client")

#: Largest reply frame accepted from the engine. `Welcome.max_frame_bytes` bounds what the engine *accepts*;
#: replies carry upstream bodies (a large embeddings batch is tens of MB once msgpack'd), so this is
#: generous. It only exists so a corrupt length prefix cannot make us buffer gigabytes.
MAX_REPLY_FRAME_BYTES: Final = 512 * 1024 * 1024
#: How many requests `map` keeps in flight unless told otherwise.
DEFAULT_WINDOW: Final = 64
#: Seconds allowed to connect and complete the handshake.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
_RECV_BYTES: Final = 256 * 1024


# --- shared by Client and AsyncClient ---------------------------------------------------------------------


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
        tag: anything of yours (a row id, a file name…); never sent, handed back in `MapResult.request`.
    """

    endpoint: str
    body: Mapping[str, Any]
    _: KW_ONLY
    method: str = "POST"
    deadline: float | None = None
    max_attempts: int | None = None
    tag: Any = None


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


def coerce_request(
    item: Any,
    *,
    endpoint: str | None,
    deadline: float | None,
    max_attempts: int | None,
) -> Request:
    """Turn one ``map()`` input into a `Request`: a `Request`, an ``(endpoint, body)`` pair, or a body dict
    (which needs ``map(endpoint=...)``). Map-wide ``deadline``/``max_attempts`` fill the gaps."""
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
    if (request.deadline is None and deadline is not None) or (
        request.max_attempts is None and max_attempts is not None
    ):
        request = Request(
            request.endpoint,
            request.body,
            method=request.method,
            deadline=request.deadline if request.deadline is not None else deadline,
            max_attempts=request.max_attempts if request.max_attempts is not None else max_attempts,
            tag=request.tag,
        )
    return request


def submit_message(request_id: RequestId, request: Request) -> Submit:
    body = request.body if isinstance(request.body, dict) else dict(request.body)
    return Submit(
        id=request_id,
        endpoint=request.endpoint,
        body=body,
        method=request.method,
        deadline=request.deadline,
        max_attempts=request.max_attempts,
    )


class _LenientError(msgspec.Struct, tag_field="type", tag="error", forbid_unknown_fields=False):
    """`Error` with ``kind`` as a plain string: a newer engine's unknown kind must not make the frame
    undecodable (`protocol.Error.kind` is the `ErrorKind` enum, which rejects values it does not know)."""

    id: RequestId | None
    kind: str
    message: str = ""
    status: int | None = None
    body: Any = None
    headers: dict[str, str] = {}
    attempts: int = 0


#: What `parse_frame` yields: a message to dispatch, or the exception an ``Error`` reply stands for.
Reply = Welcome | Result | Stats | Pong | TrioMapperError


def encode_submit(codec: Codec, request_id: RequestId, request: Request, welcome: Welcome) -> bytes:
    """The Submit frame, refused locally when larger than the engine accepts (it would close the connection)."""
    frame = codec.encode(submit_message(request_id, request))
    limit = welcome.max_frame_bytes
    if len(frame) - 4 > limit:
        raise InvalidRequestError(
            "invalid_request",
            f"the request is {len(frame) - 4} bytes once encoded; the engine accepts frames of at most {limit} bytes",
            request_id=request_id,
        )
    return frame


def error_from_message(message: Error | _LenientError) -> TrioMapperError:
    return make_error(
        str(message.kind),
        message.message,
        status=message.status,
        body=message.body,
        headers=message.headers,
        attempts=message.attempts,
        request_id=message.id,
    )


#: Message types this client knows; protocol.md allows new ones within a version, so others are skipped.
_KNOWN_ENGINE_TYPES: Final = frozenset(str(cls.__struct_config__.tag) for cls in (Welcome, Result, Error, Stats, Pong))


def _message_type(frame: bytes) -> Any:
    try:
        raw = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    return raw.get("type") if isinstance(raw, dict) else None


def encode_hello(codec: Codec, client_name: str) -> bytes:
    # Bodies in the "json" format: the engine forwards the upstream's bytes and this process decodes them.
    return codec.encode(Hello(protocol=PROTOCOL_VERSION, client=client_name, body_format="json"))


def _decoded(body: Any) -> Any:
    """A body sent in the "json" format (bytes, see `Hello.body_format`), decoded here in the client."""
    return decode_body(body) if isinstance(body, bytes) else body


def parse_frame(codec: Codec, frame: bytes) -> tuple[RequestId | None, Reply] | None:
    """Decode one engine frame into ``(id, reply)``; ``id`` is None for connection-level messages.

    Returns None for a message type this client does not know (a newer engine's addition: ignored).
    Never raises for a bad frame: it becomes a `ProtocolError` (for the id it names, when it names one).
    """
    try:
        message = codec.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        message_type = _message_type(frame)
        if isinstance(message_type, str) and message_type not in _KNOWN_ENGINE_TYPES:
            logger.debug("ignoring a %r message from the engine (unknown to this client)", message_type)
            return None
        try:
            lenient = msgspec.msgpack.decode(frame, type=_LenientError)
        except (msgspec.DecodeError, msgspec.ValidationError):
            request_id = salvage_request_id(frame)
            return request_id, ProtocolError(
                "protocol_error",
                f"could not decode a frame from the engine: {exc}",
                request_id=request_id,
            )
        return lenient.id, error_from_message(msgspec.structs.replace(lenient, body=_decoded(lenient.body)))
    if isinstance(message, Result | Error):
        message = msgspec.structs.replace(message, body=_decoded(message.body))
    if isinstance(message, Error):
        return message.id, error_from_message(message)
    if isinstance(message, Welcome):
        return None, message
    assert isinstance(message, Result | Stats | Pong)
    return message.id, message


def socket_source(explicit: str | os.PathLike[str] | None) -> str:
    """Where `resolve_socket_path` took the path from, for error messages."""
    if explicit:
        return "given explicitly"
    if os.environ.get(SOCKET_ENV_VAR):
        return f"from ${SOCKET_ENV_VAR}"
    return "the default path"


def engine_unavailable(path: Path, exc: BaseException | str, source: str) -> EngineUnavailable:
    """The `EngineUnavailable` for a failed connect, saying which path was tried and how to start one."""
    if isinstance(exc, FileNotFoundError):
        reason = "no such socket file"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused: the socket file exists but no engine is listening (stale socket?)"
    elif isinstance(exc, PermissionError):
        reason = "permission denied: the socket belongs to another user or its directory is private"
    elif isinstance(exc, BaseException):
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    else:
        reason = exc
    launch = "trio-mapper launch-engine"
    if path != default_socket_path():
        launch += f" --socket {path}"
    return EngineUnavailable(
        f"cannot reach the trio-mapper engine at {path} ({source}): {reason}. "
        f"Start one with `{launch}` (it needs OPENAI_API_KEY and its rate limits: see "
        f"`trio-mapper launch-engine --help`), or point ${SOCKET_ENV_VAR} (or socket_path=) at the socket "
        "of a running engine.",
        socket_path=path,
    )


def check_welcome(reply: Reply | None, path: Path) -> Welcome:
    """Validate the engine's answer to ``Hello``; raises `ProtocolError` (or the engine's error)."""
    if isinstance(reply, Welcome):
        if reply.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                "protocol_error",
                f"the engine at {path} ({reply.server}) speaks protocol {reply.protocol}, this client speaks "
                f"protocol {PROTOCOL_VERSION}: upgrade trio-mapper so both sides match",
            )
        return reply
    if isinstance(reply, TrioMapperError):
        reply.message = (
            f"the engine at {path} refused the handshake (this client speaks protocol {PROTOCOL_VERSION}): "
            f"{reply.message}"
        )
        raise reply
    raise ProtocolError(
        "protocol_error",
        f"the engine at {path} answered the handshake with {type(reply).__name__} instead of Welcome",
    )


def expect_result(reply: Reply) -> Result:
    if isinstance(reply, Result):
        return reply
    if isinstance(reply, TrioMapperError):
        raise reply
    raise ProtocolError("protocol_error", f"expected a Result, the engine sent {type(reply).__name__}")


def default_client_name() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{program}[{os.getpid()}]"


def describe_connection_loss(reason: str, last_error: TrioMapperError | None) -> str:
    if last_error is not None:
        return f"{reason}; the engine's last word: {last_error}"
    return reason


# --- the blocking client ----------------------------------------------------------------------------------


class _Closed(Exception):
    """Raised by `Client._read_reply` when the engine closed its end."""


class _Sink:
    """Where replies for one caller's ids collect (`Client.request` has one id, `map` up to ``window``)."""

    __slots__ = ("replies",)

    def __init__(self) -> None:
        self.replies: collections.deque[tuple[RequestId, Reply]] = collections.deque()


class Client:
    """A blocking connection to the engine. Thread-safe: threads may call `request` concurrently and
    their requests share the one connection (whichever thread waits reads for everybody).

    Connects and handshakes in the constructor, so an absent engine raises `EngineUnavailable` right
    away. Use as a context manager or call `close()` (idempotent).

    Args:
        socket_path: the engine's socket; else ``$TRIO_MAPPER_SOCKET``; else
            `trio_mapper.paths.default_socket_path()`.
        client_name: how the engine names this client in its logs and stats.
        connect_timeout: seconds allowed to connect and complete the handshake.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        client_name: str | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.socket_path: Path = resolve_socket_path(socket_path)
        self._socket_source = socket_source(socket_path)
        self.client_name = client_name if client_name is not None else default_client_name()
        self._codec = client_codec()
        self._frames = FrameBuffer(MAX_REPLY_FRAME_BYTES)
        self._ids = itertools.count(1)
        self._state = threading.Lock()
        self._changed = threading.Condition(self._state)
        self._send_lock = threading.Lock()
        self._sinks: dict[RequestId, _Sink] = {}
        self._reading = False
        self._failure: str | None = None
        self._failure_cause: BaseException | None = None
        self._last_connection_error: TrioMapperError | None = None
        self._closed = False
        self._sock = self._connect(connect_timeout)
        try:
            self.welcome: Welcome = self._handshake()
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(None)

    # -- public API --------------------------------------------------------------------------------------

    def request(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        method: str = "POST",
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> Any:
        """Send one request and wait for it; returns the upstream's JSON body (usually a dict).

        Raises the `TrioMapperError` subclass for the engine's error kind, or `ConnectionLost`.
        """
        return self.request_result(endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts).body

    def request_result(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        method: str = "POST",
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> Result:
        """Like `request`, but returns the whole protocol `Result` (status, headers, attempts, timings)."""
        request = Request(endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts)
        request_id = next(self._ids)
        frame = self._encode_submit(request_id, request)
        _, reply = self._roundtrip(request_id, frame)
        return expect_result(reply)

    def map(
        self,
        requests: Iterable[Any],
        *,
        endpoint: str | None = None,
        window: int = DEFAULT_WINDOW,
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> Generator[MapResult, None, None]:
        """Send many requests with at most ``window`` in flight; yield a `MapResult` per item as it completes.

        Items are `Request` objects, ``(endpoint, body)`` pairs, or body dicts (with ``endpoint=``).
        The iterable is consumed lazily. Per-request failures are yielded (``MapResult.error``), not
        raised; a lost connection raises `ConnectionLost`. Closing the generator (leaving a ``for`` loop
        in CPython, or ``contextlib.closing``) cancels the requests still outstanding in the engine.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        return self._map(iter(requests), endpoint, window, deadline, max_attempts)

    def stats(self) -> dict[str, Any]:
        """The engine's counters: ``{"engine": {...}, "lanes": {lane: {...}}}``."""
        request_id = next(self._ids)
        _, reply = self._roundtrip(request_id, self._codec.encode(StatsRequest(id=request_id)))
        if isinstance(reply, Stats):
            return {"engine": reply.engine, "lanes": reply.lanes}
        if isinstance(reply, TrioMapperError):
            raise reply
        raise ProtocolError("protocol_error", f"expected Stats, the engine sent {type(reply).__name__}")

    def ping(self) -> float:
        """Round-trip to the engine; returns the seconds it took."""
        request_id = next(self._ids)
        started = time.perf_counter()
        _, reply = self._roundtrip(request_id, self._codec.encode(Ping(id=request_id)))
        if isinstance(reply, Pong):
            return time.perf_counter() - started
        if isinstance(reply, TrioMapperError):
            raise reply
        raise ProtocolError("protocol_error", f"expected Pong, the engine sent {type(reply).__name__}")

    def close(self) -> None:
        """Close the connection; callers still waiting get `ConnectionLost`. Safe to call twice."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        self._fail("the client was closed", None)
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._sinks)} in flight"
        return f"<Client {str(self.socket_path)!r} {state}>"

    # -- connection --------------------------------------------------------------------------------------

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(self.socket_path))
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise engine_unavailable(
                    self.socket_path, f"no answer within {timeout} s", self._socket_source
                ) from exc
            raise engine_unavailable(self.socket_path, exc, self._socket_source) from exc
        return sock

    def _handshake(self) -> Welcome:
        try:
            self._sock.sendall(encode_hello(self._codec, self.client_name))
            _, reply = self._read_reply()
        except TimeoutError as exc:
            reason = "the engine did not answer the handshake in time"
            raise engine_unavailable(self.socket_path, reason, self._socket_source) from exc
        except (OSError, _Closed) as exc:
            raise ConnectionLost(
                f"the engine at {self.socket_path} closed the connection during the handshake",
                socket_path=self.socket_path,
            ) from exc
        return check_welcome(reply, self.socket_path)

    def _read_reply(self) -> tuple[RequestId | None, Reply]:
        """Block until one whole frame arrived; only one thread at a time (the current reader) calls this."""
        while True:
            try:
                frame = self._frames.next_frame()
            except FrameTooLarge as exc:
                raise ProtocolError("protocol_error", f"reply from the engine refused: {exc}") from exc
            if frame is not None:
                parsed = parse_frame(self._codec, frame)
                if parsed is not None:
                    return parsed
                continue
            data = self._sock.recv(_RECV_BYTES)
            if not data:
                raise _Closed
            self._frames.feed(data)

    def _fail(self, reason: str, cause: BaseException | None) -> None:
        """Mark the connection dead and wake every waiter (they raise `ConnectionLost`)."""
        with self._state:
            if self._failure is not None:
                return
            self._failure = describe_connection_loss(reason, self._last_connection_error)
            self._failure_cause = cause if cause is not None else self._last_connection_error
            self._changed.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv()

    def _lost(self) -> ConnectionLost:
        error = ConnectionLost(self._failure or "connection lost", socket_path=self.socket_path)
        error.__cause__ = self._failure_cause
        return error

    # -- sending -----------------------------------------------------------------------------------------

    def _encode_submit(self, request_id: RequestId, request: Request) -> bytes:
        return encode_submit(self._codec, request_id, request, self.welcome)

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            if self._failure is not None:
                raise self._lost()
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                self._fail(f"sending to the engine failed: {exc}", exc)
                raise self._lost() from exc
            except BaseException as exc:
                # Interrupted (KeyboardInterrupt…) partway: part of a frame may be on the wire and the
                # stream can no longer be parsed by the engine, so this connection is finished.
                self._fail("interrupted while sending a frame; the connection was closed", exc)
                raise

    def _cancel_outstanding(self, request_ids: Iterable[RequestId]) -> None:
        """Forget these ids; those with no final reply yet are cancelled in the engine (best effort)."""
        with self._state:
            pending = [rid for rid in request_ids if self._sinks.pop(rid, None) is not None]
            alive = self._failure is None
        if not pending or not alive:
            return
        with contextlib.suppress(TrioMapperError, OSError):
            self._send(b"".join(self._codec.encode(Cancel(id=rid)) for rid in pending))

    # -- receiving ---------------------------------------------------------------------------------------

    def _roundtrip(self, request_id: RequestId, frame: bytes) -> tuple[RequestId, Reply]:
        sink = _Sink()
        with self._state:
            self._sinks[request_id] = sink
        try:
            self._send(frame)
            return self._wait(sink)
        finally:
            self._cancel_outstanding((request_id,))

    def _wait(self, sink: _Sink) -> tuple[RequestId, Reply]:
        """The next reply for one of ``sink``'s ids; this thread reads the socket if nobody else is."""
        with self._state:
            while True:
                if sink.replies:
                    return sink.replies.popleft()
                if self._failure is not None:
                    raise self._lost()
                if self._reading:
                    self._changed.wait()
                    continue
                self._reading = True
                self._state.release()
                try:
                    reply = self._read_one()
                finally:
                    self._state.acquire()
                    self._reading = False
                    self._changed.notify_all()
                if reply is not None:
                    self._dispatch(*reply)

    def _read_one(self) -> tuple[RequestId | None, Reply] | None:
        """Read one reply without holding the state lock; a dead connection is recorded, not raised."""
        try:
            return self._read_reply()
        except _Closed:
            self._fail(f"the engine at {self.socket_path} closed the connection", None)
        except ProtocolError as exc:
            self._fail(str(exc), exc)
        except OSError as exc:
            self._fail(f"reading from the engine failed: {exc}", exc)
        return None

    def _dispatch(self, request_id: RequestId | None, reply: Reply) -> None:
        """Route one reply (state lock held)."""
        if request_id is None:
            if isinstance(reply, TrioMapperError):
                self._last_connection_error = reply
                logger.warning("engine error about the connection: %s", reply)
            return
        sink = self._sinks.pop(request_id, None)
        if sink is None:
            return  # a request we gave up on (cancelled, interrupted): its late reply is dropped
        sink.replies.append((request_id, reply))

    # -- map ---------------------------------------------------------------------------------------------

    def _map(
        self,
        items: Iterator[Any],
        endpoint: str | None,
        window: int,
        deadline: float | None,
        max_attempts: int | None,
    ) -> Generator[MapResult, None, None]:
        sink = _Sink()
        in_flight: dict[RequestId, tuple[Any, Request]] = {}
        ready: collections.deque[MapResult] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) + len(ready) < window:
                    try:
                        item = next(items)
                    except StopIteration:
                        exhausted = True
                        break
                    request = coerce_request(item, endpoint=endpoint, deadline=deadline, max_attempts=max_attempts)
                    new_id = next(self._ids)
                    try:
                        frame = self._encode_submit(new_id, request)
                    except InvalidRequestError as exc:
                        ready.append(MapResult(item, request, error=exc))
                        continue
                    with self._state:
                        self._sinks[new_id] = sink
                    in_flight[new_id] = (item, request)
                    self._send(frame)
                if ready:
                    yield ready.popleft()
                    continue
                if not in_flight:
                    return
                request_id, reply = self._wait(sink)
                item, request = in_flight.pop(request_id)
                if isinstance(reply, Result):
                    yield MapResult(item, request, result=reply)
                elif isinstance(reply, TrioMapperError):
                    yield MapResult(item, request, error=reply)
                else:
                    error = ProtocolError(
                        "protocol_error",
                        f"expected a Result, the engine sent {type(reply).__name__}",
                        request_id=request_id,
                    )
                    yield MapResult(item, request, error=error)
        finally:
            if in_flight:
                self._cancel_outstanding(in_flight)


def __getattr__(name: str) -> Any:
    # AsyncClient needs anyio: import it only when asked for, keeping `import trio_mapper.client` light.
    if name in {"AsyncClient", "AsyncMapIterator"}:
        from trio_mapper import aio_client

        return getattr(aio_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_WINDOW",
    "ERROR_CLASSES",
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
    "error_class_for",
]
