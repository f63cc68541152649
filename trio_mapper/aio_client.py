"""`AsyncClient`: the engine's client helper for async code, on Trio and asyncio alike (through anyio).

One connection carries any number of concurrent requests: a background reader task hands each reply to
whoever waits for its id, and a background writer task is the only one that ever writes. Callers queue
whole frames for it without blocking, so a cancelled caller can never leave half a frame on the wire.
(A shielded write is not enough: native asyncio cancellation, e.g. ``asyncio.wait_for``, goes through
anyio's shields.) Cancelling a waiting `AsyncClient.request` (a timeout, a cancelled scope) withdraws it
in the engine with a ``Cancel`` frame.

Imports msgspec, anyio, the standard library and the light `trio_mapper` modules only (never trio or
httpx directly: anyio loads the running event loop's backend itself).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trio_mapper.client import (
    _RECV_BYTES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_WINDOW,
    MAX_REPLY_FRAME_BYTES,
    MapResult,
    Reply,
    Request,
    check_welcome,
    coerce_request,
    default_client_name,
    describe_connection_loss,
    encode_hello,
    encode_submit,
    engine_unavailable,
    expect_result,
    logger,
    parse_frame,
    socket_source,
)
from trio_mapper.client_errors import (
    ConnectionLost,
    InvalidRequestError,
    ProtocolError,
    TrioMapperError,
)
from trio_mapper.paths import resolve_socket_path
from trio_mapper.protocol import (
    Cancel,
    FrameBuffer,
    FrameTooLarge,
    Ping,
    Pong,
    RequestId,
    Result,
    Stats,
    StatsRequest,
    Welcome,
    client_codec,
)

#: The writer joins queued frames into one write up to about this many bytes (fewer system calls).
_WRITE_BATCH_BYTES: Final = 1024 * 1024
#: The connection errors anyio streams raise once the peer or our side is gone.
_STREAM_ERRORS: Final = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


class _Waiter:
    """The sink for one `AsyncClient.request`/`stats`/`ping` call."""

    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Reply | None = None

    def deliver(self, request_id: RequestId, reply: Reply) -> None:
        self.reply = reply
        self.event.set()

    def fail(self) -> None:
        self.event.set()  # no reply: the caller raises the client's ConnectionLost


class _StreamSink:
    """The sink for one `AsyncMapIterator`: replies queue in a memory stream the iterator drains.

    Deliberately holds no reference to the iterator, so dropping the iterator (``break``) frees it.
    """

    __slots__ = ("send",)

    def __init__(self, send: MemoryObjectSendStream[tuple[RequestId, Reply]]) -> None:
        self.send = send

    def deliver(self, request_id: RequestId, reply: Reply) -> None:
        # ClosedResourceError: the iterator was closed and nobody wants this reply any more.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.send.send_nowait((request_id, reply))

    def fail(self) -> None:
        self.send.close()


_Sink = _Waiter | _StreamSink


class _Outgoing:
    """Bytes queued for the writer task. A queued ``Submit`` can still be withdrawn (never sent) until
    the writer commits to it; after that, giving up on the request needs a ``Cancel``."""

    __slots__ = ("committed", "data", "withdrawn")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.withdrawn = False
        self.committed = False


def _only_wraps(group: BaseExceptionGroup[BaseException], target: BaseException) -> bool:
    """Whether ``group`` is nothing but (nested) single-exception wrappers around ``target``."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if _same_exception(inner, target):
            return True
        if not isinstance(inner, BaseExceptionGroup):
            return False
        group = inner
    return False


def _same_exception(candidate: BaseException, target: BaseException) -> bool:
    """Identity, or for groups the same leaves: Trio rebuilds a group raised in a nursery (``split``)."""
    if candidate is target:
        return True
    if not (isinstance(candidate, BaseExceptionGroup) and isinstance(target, BaseExceptionGroup)):
        return False
    return (
        candidate.message == target.message
        and len(candidate.exceptions) == len(target.exceptions)
        and all(_same_exception(a, b) for a, b in zip(candidate.exceptions, target.exceptions, strict=True))
    )


class AsyncClient:
    """An async connection to the engine, shared by any number of concurrent calls.

    Use as ``async with AsyncClient() as client:``; leaving the block closes the connection.

    Args:
        socket_path: the engine's socket; else ``$TRIO_MAPPER_SOCKET``; else
            `trio_mapper.paths.default_socket_path()`.
        client_name: how the engine names this client in its logs and stats.
        connect_timeout: seconds allowed to connect and complete the handshake (None: no limit).
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
        self.connect_timeout = connect_timeout
        self.welcome: Welcome | None = None
        self._codec = client_codec()
        self._frames = FrameBuffer(MAX_REPLY_FRAME_BYTES)
        self._ids = itertools.count(1)
        self._sinks: dict[RequestId, _Sink] = {}
        self._stream: anyio.abc.ByteStream | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._background_scope: anyio.CancelScope | None = None
        # Frames for the writer task. Unbounded on purpose: producers include cleanup code that must not
        # block (a cancelled request, a dropped map iterator), and it holds at most one Submit per waiting
        # request plus one Cancel per abandoned one; callers bound those (a map's window, your tasks).
        self._outbox_send: MemoryObjectSendStream[_Outgoing] | None = None
        self._outbox_receive: MemoryObjectReceiveStream[_Outgoing] | None = None
        self._failure: str | None = None
        self._failure_cause: BaseException | None = None
        self._last_connection_error: TrioMapperError | None = None
        self._entered = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        if self._entered:
            raise RuntimeError("an AsyncClient can only be entered once")
        self._entered = True
        self._stream, self.welcome = await self._open()
        self._outbox_send, self._outbox_receive = anyio.create_memory_object_stream[_Outgoing](math.inf)
        self._background_scope = anyio.CancelScope()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._background)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        try:
            await self.aclose()
        finally:
            assert self._task_group is not None
            try:
                suppress = await self._task_group.__aexit__(exc_type, exc_value, traceback)
            except BaseExceptionGroup as group:
                # The body of `async with` runs inside our task group, whose exit wraps the body's own
                # exception in a group (Trio's strict groups, anyio on asyncio). The background tasks never
                # raise, so a group holding just that exception is only the wrapper: hand the caller back
                # exactly what its code raised.
                if exc_value is not None and _only_wraps(group, exc_value):
                    raise exc_value from None
                raise
        return suppress

    async def aclose(self) -> None:
        """Close the connection; calls still waiting raise `ConnectionLost`. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._fail("the client was closed", None)
        if self._background_scope is not None:
            self._background_scope.cancel()
        if self._stream is not None:
            await anyio.aclose_forcefully(self._stream)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._sinks)} in flight"
        return f"<AsyncClient {str(self.socket_path)!r} {state}>"

    # -- public API --------------------------------------------------------------------------------------

    async def request(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        method: str = "POST",
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> Any:
        """Send one request and wait for it; returns the upstream's JSON body (usually a dict).

        Raises the `TrioMapperError` subclass for the engine's error kind, or `ConnectionLost`. If the
        call is cancelled while waiting, the request is cancelled in the engine too.
        """
        result = await self.request_result(endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts)
        return result.body

    async def request_result(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        method: str = "POST",
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> Result:
        """Like `request`, but returns the whole protocol `Result` (status, headers, attempts, timings)."""
        self._check_usable()
        request = Request(endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts)
        request_id = next(self._ids)
        frame = self._encode_submit(request_id, request)
        return expect_result(await self._roundtrip(request_id, frame))

    def map(
        self,
        requests: Iterable[Any] | AsyncIterable[Any],
        *,
        endpoint: str | None = None,
        window: int = DEFAULT_WINDOW,
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> AsyncMapIterator:
        """Send many requests with at most ``window`` in flight; iterate `MapResult`s as they complete.

        ``requests`` may be a plain or an async iterable of `Request` objects, ``(endpoint, body)`` pairs,
        or body dicts (with ``endpoint=``); it is consumed lazily. Per-request failures are yielded
        (``MapResult.error``), a lost connection raises `ConnectionLost`. Leaving the loop, cancelling the
        enclosing scope or closing the iterator cancels the requests still outstanding in the engine; use
        ``async with client.map(...) as results:`` to make that happen at a precise point.
        """
        self._check_usable()
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        return AsyncMapIterator(self, requests, endpoint, window, deadline, max_attempts)

    async def stats(self) -> dict[str, Any]:
        """The engine's counters: ``{"engine": {...}, "lanes": {lane: {...}}}``."""
        self._check_usable()
        request_id = next(self._ids)
        reply = await self._roundtrip(request_id, self._codec.encode(StatsRequest(id=request_id)))
        if isinstance(reply, Stats):
            return {"engine": reply.engine, "lanes": reply.lanes}
        if isinstance(reply, TrioMapperError):
            raise reply
        raise ProtocolError("protocol_error", f"expected Stats, the engine sent {type(reply).__name__}")

    async def ping(self) -> float:
        """Round-trip to the engine; returns the seconds it took."""
        self._check_usable()
        request_id = next(self._ids)
        started = time.perf_counter()
        reply = await self._roundtrip(request_id, self._codec.encode(Ping(id=request_id)))
        if isinstance(reply, Pong):
            return time.perf_counter() - started
        if isinstance(reply, TrioMapperError):
            raise reply
        raise ProtocolError("protocol_error", f"expected Pong, the engine sent {type(reply).__name__}")

    # -- connection --------------------------------------------------------------------------------------

    async def _open(self) -> tuple[anyio.abc.ByteStream, Welcome]:
        path = self.socket_path
        try:
            with anyio.fail_after(self.connect_timeout):
                try:
                    stream: anyio.abc.ByteStream = await anyio.connect_unix(path)
                except OSError as exc:
                    raise engine_unavailable(path, exc, self._socket_source) from exc
                try:
                    await stream.send(encode_hello(self._codec, self.client_name))
                    reply = await self._read_handshake_reply(stream)
                    return stream, check_welcome(reply, path)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
        except TimeoutError as exc:
            reason = f"no answer to the handshake within {self.connect_timeout} s"
            raise engine_unavailable(path, reason, self._socket_source) from exc

    async def _read_handshake_reply(self, stream: anyio.abc.ByteStream) -> Reply:
        try:
            while True:
                frame = self._frames.next_frame()
                if frame is None:
                    self._frames.feed(await stream.receive(_RECV_BYTES))
                elif (parsed := parse_frame(self._codec, frame)) is not None:
                    return parsed[1]
        except _STREAM_ERRORS as exc:
            raise ConnectionLost(
                f"the engine at {self.socket_path} closed the connection during the handshake",
                socket_path=self.socket_path,
            ) from exc
        except FrameTooLarge as exc:
            raise ProtocolError("protocol_error", f"handshake reply refused: {exc}") from exc

    def _check_usable(self) -> None:
        if not self._entered:
            raise RuntimeError("AsyncClient is not connected: use `async with AsyncClient() as client:`")
        if self._failure is not None:
            raise self._lost()

    def _fail(self, reason: str, cause: BaseException | None) -> None:
        """Mark the connection dead and wake every waiter (they raise `ConnectionLost`). Never blocks."""
        if self._failure is not None:
            return
        self._failure = describe_connection_loss(reason, self._last_connection_error)
        self._failure_cause = cause if cause is not None else self._last_connection_error
        sinks = list(self._sinks.values())
        self._sinks.clear()
        for sink in sinks:
            sink.fail()
        if self._outbox_send is not None:
            self._outbox_send.close()

    def _lost(self) -> ConnectionLost:
        """A fresh exception per waiter: one instance raised in many tasks would tangle its traceback."""
        error = ConnectionLost(self._failure or "connection lost", socket_path=self.socket_path)
        error.__cause__ = self._failure_cause
        return error

    # -- background tasks --------------------------------------------------------------------------------

    async def _background(self) -> None:
        assert self._background_scope is not None
        with self._background_scope:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._write_frames)
                await self._read_replies()
                task_group.cancel_scope.cancel()

    async def _read_replies(self) -> None:
        """Dispatch every reply to its waiter until the connection ends. Never raises (but `Cancelled`):
        an exception here would cancel the code inside ``async with AsyncClient()``."""
        assert self._stream is not None
        try:
            while True:
                frame = self._frames.next_frame()
                if frame is None:
                    self._frames.feed(await self._stream.receive(_RECV_BYTES))
                    continue
                parsed = parse_frame(self._codec, frame)
                if parsed is not None:
                    self._dispatch(*parsed)
        except anyio.EndOfStream:
            self._fail(f"the engine at {self.socket_path} closed the connection", None)
        except _STREAM_ERRORS as exc:
            self._fail(f"reading from the engine failed: {exc!r}", exc)
        except FrameTooLarge as exc:
            self._fail(f"reply from the engine refused: {exc}", exc)
        except Exception as exc:
            logger.exception("trio-mapper client reader failed")
            self._fail(f"the client's reader failed: {exc!r}", exc)

    def _dispatch(self, request_id: RequestId | None, reply: Reply) -> None:
        if request_id is None:
            if isinstance(reply, TrioMapperError):
                self._last_connection_error = reply
                logger.warning("engine error about the connection: %s", reply)
            return
        sink = self._sinks.pop(request_id, None)
        if sink is not None:  # else: a request we gave up on; its late reply is dropped
            sink.deliver(request_id, reply)

    async def _write_frames(self) -> None:
        """The only writer: callers queue whole frames, so cancelling a caller never tears one."""
        assert self._outbox_receive is not None and self._stream is not None
        async with self._outbox_receive:
            async for first in self._outbox_receive:
                batch = [first]
                size = len(first.data)
                while size < _WRITE_BATCH_BYTES:  # what else is queued goes out in the same write
                    try:
                        batch.append(self._outbox_receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    size += len(batch[-1].data)
                live = [item for item in batch if not item.withdrawn]
                for item in live:
                    item.committed = True
                if not live:
                    continue
                try:
                    await self._stream.send(b"".join(item.data for item in live))
                except _STREAM_ERRORS as exc:
                    self._fail(f"sending to the engine failed: {exc!r}", exc)
                    return

    # -- sending -----------------------------------------------------------------------------------------

    def _encode_submit(self, request_id: RequestId, request: Request) -> bytes:
        assert self.welcome is not None
        return encode_submit(self._codec, request_id, request, self.welcome)

    def _enqueue(self, data: bytes) -> _Outgoing:
        """Queue whole frames for the writer task; never blocks."""
        if self._failure is not None or self._outbox_send is None:
            raise self._lost()
        outgoing = _Outgoing(data)
        try:
            self._outbox_send.send_nowait(outgoing)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._lost() from None
        return outgoing

    def _withdraw(self, request_id: RequestId, submit: _Outgoing) -> None:
        """Give up on a request without blocking: unsent, it is dropped; sent, it is cancelled."""
        if self._sinks.pop(request_id, None) is None:
            return  # answered already (or the connection is gone): nothing left to withdraw
        if not submit.committed:
            submit.withdrawn = True
            return
        with contextlib.suppress(ConnectionLost):
            self._enqueue(self._codec.encode(Cancel(id=request_id)))

    async def _roundtrip(self, request_id: RequestId, frame: bytes) -> Reply:
        waiter = _Waiter()
        outgoing = self._enqueue(frame)
        self._sinks[request_id] = waiter
        try:
            await waiter.event.wait()
        except BaseException:
            self._withdraw(request_id, outgoing)
            raise
        if waiter.reply is None:
            raise self._lost()
        return waiter.reply


class AsyncMapIterator:
    """What `AsyncClient.map` returns: an async iterator of `MapResult`, and an async context manager
    whose exit (like `aclose`) cancels the requests still outstanding."""

    def __init__(
        self,
        client: AsyncClient,
        requests: Iterable[Any] | AsyncIterable[Any],
        endpoint: str | None,
        window: int,
        deadline: float | None,
        max_attempts: int | None,
    ) -> None:
        self._client = client
        self._sync_items: Iterator[Any] | None = None
        self._async_items: AsyncIterator[Any] | None = None
        if isinstance(requests, AsyncIterable):
            self._async_items = aiter(requests)
        else:
            self._sync_items = iter(requests)
        self._endpoint = endpoint
        self._window = window
        self._deadline = deadline
        self._max_attempts = max_attempts
        send, self._replies = anyio.create_memory_object_stream[tuple[RequestId, Reply]](math.inf)
        self._sink = _StreamSink(send)
        self._in_flight: dict[RequestId, tuple[Any, Request, _Outgoing]] = {}
        self._ready: list[MapResult] = []
        self._exhausted = False
        self._finished = False

    def __aiter__(self) -> AsyncMapIterator:
        return self

    async def __anext__(self) -> MapResult:
        if self._finished:
            raise StopAsyncIteration
        try:
            await self._fill()
            if self._ready:
                return self._ready.pop(0)
            if not self._in_flight:
                self._finish()
                raise StopAsyncIteration
            try:
                request_id, reply = await self._replies.receive()
            except anyio.EndOfStream:
                raise self._client._lost() from None
        except StopAsyncIteration:
            raise
        except BaseException:
            self._finish()
            raise
        item, request, _ = self._in_flight.pop(request_id)
        if isinstance(reply, Result):
            return MapResult(item, request, result=reply)
        if isinstance(reply, TrioMapperError):
            return MapResult(item, request, error=reply)
        unexpected = type(reply).__name__
        error = ProtocolError(
            "protocol_error", f"expected a Result, the engine sent {unexpected}", request_id=request_id
        )
        return MapResult(item, request, error=error)

    async def _next_item(self) -> tuple[bool, Any]:
        if self._async_items is not None:
            try:
                return True, await anext(self._async_items)
            except StopAsyncIteration:
                return False, None
        assert self._sync_items is not None
        try:
            return True, next(self._sync_items)
        except StopIteration:
            return False, None

    async def _fill(self) -> None:
        client = self._client
        while not self._exhausted and len(self._in_flight) + len(self._ready) < self._window:
            more, item = await self._next_item()
            if not more:
                self._exhausted = True
                return
            request = coerce_request(
                item, endpoint=self._endpoint, deadline=self._deadline, max_attempts=self._max_attempts
            )
            request_id = next(client._ids)
            try:
                frame = client._encode_submit(request_id, request)
            except InvalidRequestError as exc:
                self._ready.append(MapResult(item, request, error=exc))
                continue
            outgoing = client._enqueue(frame)
            client._sinks[request_id] = self._sink
            self._in_flight[request_id] = (item, request, outgoing)

    def _finish(self) -> None:
        """Stop: cancel what is outstanding (without blocking, so it works from any cleanup path)."""
        if self._finished:
            return
        self._finished = True
        for request_id, (_, _, outgoing) in self._in_flight.items():
            self._client._withdraw(request_id, outgoing)
        self._in_flight.clear()
        self._sink.send.close()

    async def aclose(self) -> None:
        """Stop iterating and cancel the requests still outstanding. Safe to call twice."""
        self._finish()
        if self._async_items is not None and hasattr(self._async_items, "aclose"):
            await self._async_items.aclose()

    async def __aenter__(self) -> AsyncMapIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # `break` out of `async for` drops the iterator without closing it: cancel its requests then.
        with contextlib.suppress(Exception):
            self._finish()


__all__ = ["AsyncClient", "AsyncMapIterator"]
