"""`AsyncClient`: the engine's client helper for async code, on Trio and asyncio alike (through anyio).

How the work is divided: the protocol (handshake, ids, the outstanding requests, decoding and routing
replies, why the connection ended, ``map()``'s window) is `trio_mapper.client.core`, a state machine with
no I/O that the blocking `trio_mapper.client.sync.Client` shares. This module is its anyio driver, three kinds
of task around one connection:

- The reader feeds what the socket returns to the core and hands each event to the task waiting for it.
  It never waits for anything but the socket, so the connection is read however the writes are doing (the
  engine stops reading a connection whose replies nobody reads: docs/protocol.md, Session item 8).
- The writer is the only task that writes. Callers queue whole frames for it without blocking, so a
  cancelled caller can never leave half a frame on the wire. (A shielded write is not enough: native
  asyncio cancellation, e.g. ``asyncio.wait_for``, goes through anyio's shields.) A queued ``Submit`` not
  written yet is withdrawn instead of cancelled.
- Each ``map()`` has a feeder that pulls its input and submits it as the window has room, so answers
  already in come back while a slow input makes the feeder wait.

Cancelling a waiting `AsyncClient.request` (a timeout, a cancelled scope) withdraws it in the engine with a
``Cancel`` frame; so does leaving an `AsyncClient.stream` early.

Imports msgspec, anyio, the standard library and the light `trio_mapper` modules only (never trio or
httpx directly: anyio loads the running event loop's backend itself).
"""

from __future__ import annotations

import contextlib
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

from trio_mapper.client.core import (
    DEFAULT_WINDOW,
    Answered,
    ChunkReceived,
    ClientConnection,
    ConnectionClosed,
    MapResult,
    MapWindow,
    PongReceived,
    Reply,
    Request,
    State,
    StatsReceived,
    StreamChunk,
    StreamState,
    default_client_name,
    logger,
    unwrap,
)
from trio_mapper.client.errors import ConnectionLost, stream_closed_early
from trio_mapper.client.sync import (
    _RECV_BYTES,
    DEFAULT_CONNECT_TIMEOUT,
    SocketChoice,
    engine_unavailable,
)
from trio_mapper.wire import RequestId, Result, Welcome

#: The writer joins queued frames into one write up to about this many bytes (fewer system calls).
_WRITE_BATCH_BYTES: Final = 1024 * 1024
#: The connection errors anyio streams raise once the peer or our side is gone.
_STREAM_ERRORS: Final = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


class _Waiter:
    """Where the reply to one `AsyncClient.request`/`stats`/`ping` lands."""

    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Reply | None = None

    def deliver(self, reply: Reply) -> None:
        self.reply = reply
        self.event.set()

    def fail(self) -> None:
        self.event.set()  # no reply: the caller raises the connection's ConnectionLost


class _Outgoing:
    """Frames queued for the writer task. A queued ``Submit`` can still be withdrawn (never written) until
    the writer takes it; after that, giving up on the request needs a ``Cancel``."""

    __slots__ = ("data", "request_id", "withdrawn")

    def __init__(self, data: bytes, request_id: RequestId | None) -> None:
        self.data = data
        self.request_id = request_id
        self.withdrawn = False


class _Flag:
    """A "something changed, look again" signal for one waiting task: `set` any number of times; `wait`
    returns at once if it was set since the last `wait` returned."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class _StreamWaiter:
    """Where one `AsyncClient.stream`'s chunks and end land. Never refers to its `AsyncStream`, so that
    dropping the stream object finalises it even though the core still holds this."""

    __slots__ = ("news", "state")

    def __init__(self) -> None:
        self.state = StreamState()
        self.news = _Flag()

    def deliver(self, event: ChunkReceived | Answered) -> None:
        self.state.deliver(event)
        self.news.set()

    def fail(self) -> None:
        self.news.set()  # the consumer finds the connection closed


class AsyncStream:
    """The chunks of one streamed request, as `AsyncClient.stream` returns it: ``async for`` it for
    `StreamChunk`s.

    The final `Result` (status, headers with ``x-request-id``, attempts, timings) is ``result`` once the
    iteration ended; an error the stream ended with is raised by the iteration, after the chunks that came
    before it. Leaving early cancels the request in the engine, which closes the upstream's stream at once:
    at a precise point with ``async with client.stream(...) as chunks:`` or ``aclose()``; when the
    object is dropped otherwise (``break`` out of ``async for``: at once in CPython). Cancelling a task
    waiting for the next chunk does it too.
    """

    def __init__(self, client: AsyncClient, request_id: RequestId, waiter: _StreamWaiter) -> None:
        self.request_id = request_id
        #: The final `Result` once the stream ended successfully; None before.
        self.result: Result | None = None
        self._client = client
        self._waiter = waiter
        self._over = False
        #: Closed before the end came: iterating further raises instead of ending as if whole.
        self._closed_early = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamChunk:
        state = self._waiter.state
        while True:
            if self._over:  # ended, or closed: what is still buffered is not wanted
                if self._closed_early:
                    raise stream_closed_early(self.request_id)
                raise StopAsyncIteration
            chunk = state.next_chunk()
            if chunk is not None:
                return chunk
            if state.done:
                self._over = True
                self.result = state.finish()  # raises the error the stream ended with
                raise StopAsyncIteration
            if self._client._core.closed:
                self._over = True
                raise self._client._core.connection_lost()
            try:
                await self._waiter.news.wait()
            except BaseException:  # cancelled while waiting: nobody will read the rest
                self.close()
                raise

    def close(self) -> None:
        """Stop without blocking: the request is cancelled in the engine unless it already ended. Safe to
        call twice."""
        if self._over:
            return
        self._over = self._closed_early = True
        self._client._withdraw((self.request_id,))

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # `break` out of `async for` drops the stream without closing it: cancel its request then.
        if not getattr(self, "_over", True):
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        return f"<AsyncStream id={self.request_id!r} {'over' if self._over else 'open'}>"


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
        socket_path: the engine's socket; else ``$TRIO_MAPPER_SOCKET``; else the first of
            `trio_mapper.paths.default_socket_paths()` that exists: this user's engine's, then the system
            service's.
        client_name: how the engine names this client in its logs and stats; an engine with tenants also
            matches it against each tenant's ``names`` (default: ``"<program>[<pid>]"``).
        priority: the priority class of this client's requests when a call names none: ``"interactive"``,
            ``"default"`` or ``"batch"``. None (the default) leaves it to the engine: the class of the
            client's tenant. That class is a ceiling: asking for a lower class (a batch job asking for
            ``"batch"``) takes effect, asking for a higher one gets the tenant's class.
        connect_timeout: seconds allowed to connect and complete the handshake (None: no limit).

    Raises:
        ValueError: ``priority`` is not one of the three classes.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        client_name: str | None = None,
        priority: str | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._socket = SocketChoice.resolve(socket_path)
        self.socket_path: Path = self._socket.path
        self.client_name = client_name if client_name is not None else default_client_name()
        self.connect_timeout = connect_timeout
        self._core = ClientConnection(socket_path=self.socket_path, client_name=self.client_name, priority=priority)
        self._stream: anyio.abc.ByteStream | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._background_scope: anyio.CancelScope | None = None
        # Frames for the writer task. Unbounded on purpose: producers include cleanup code that must not
        # block (a cancelled request, a dropped map iterator), and it holds at most one Submit per waiting
        # request plus one Cancel per abandoned one; callers bound those (a map's window, your tasks).
        self._outbox_send: MemoryObjectSendStream[_Outgoing] | None = None
        self._outbox_receive: MemoryObjectReceiveStream[_Outgoing] | None = None
        #: Queued frames of requests the writer has not taken yet, by id: those can be withdrawn.
        self._unsent: dict[RequestId, _Outgoing] = {}
        #: The maps in progress, stopped when the client closes.
        self._maps: set[_MapRun] = set()
        self._entered = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        if self._entered:
            raise RuntimeError("an AsyncClient can only be entered once")
        self._entered = True
        self._stream = await self._open()
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
        self._core.close()
        self._process_events()
        for run in list(self._maps):
            run.finish()
        if self._background_scope is not None:
            self._background_scope.cancel()
        if self._stream is not None:
            await anyio.aclose_forcefully(self._stream)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def priority(self) -> str | None:
        """The priority class asked for by calls that name none (None: the class of the client's tenant)."""
        return self._core.priority

    @property
    def welcome(self) -> Welcome | None:
        """The engine's `Welcome`, once connected."""
        return self._core.welcome

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._core.outstanding)} in flight"
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
        priority: str | None = None,
    ) -> Any:
        """Send one request and wait for it; returns the upstream's JSON body (usually a dict).

        ``priority`` is the class to queue it in (``"interactive"``, ``"default"``, ``"batch"``); None uses
        the client's ``priority``, else the class of the client's tenant. The tenant's class is a ceiling: a
        lower class takes effect, a higher one gets the tenant's.

        Raises the `TrioMapperError` subclass for the engine's error kind, or `ConnectionLost`; `ValueError`
        for a ``priority`` that is not a class (nothing is sent). If the call is cancelled while waiting, the
        request is cancelled in the engine too.
        """
        result = await self.request_result(
            endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts, priority=priority
        )
        return result.body

    async def request_result(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        method: str = "POST",
        deadline: float | None = None,
        max_attempts: int | None = None,
        priority: str | None = None,
    ) -> Result:
        """Like `request`, but returns the whole protocol `Result` (status, headers, attempts, timings)."""
        self._check_usable()
        waiter = _Waiter()
        # Queued before the first checkpoint: requests go out in the order their callers ran.
        request = Request(
            endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts, priority=priority
        )
        request_id, frame = self._core.submit(request, waiter)
        self._enqueue(frame, request_id)
        result: Result = unwrap(await self._wait(request_id, waiter))
        return result

    def stream(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        deadline: float | None = None,
        max_attempts: int | None = None,
        priority: str | None = None,
    ) -> AsyncStream:
        """Send one request as a stream: ``async for`` what this returns for its chunks as they come.

        Not a coroutine: the request is sent when this is called. ``body`` is what `request` takes;
        ``"stream": true`` is set here. Each item is a `StreamChunk` (see `trio_mapper.client.sync.Client.stream`
        for what it holds); ``priority`` is as for `request`. Raises, from this call: `ValueError` for a
        ``priority`` that is not a class, `ProtocolError` when the engine is too old to stream,
        `InvalidRequestError` for a frame larger than the engine accepts, `ConnectionLost`; from the iteration:
        the `TrioMapperError` subclass ``request`` would raise for the engine's error kind, or `ConnectionLost`.
        """
        self._check_usable()
        waiter = _StreamWaiter()
        request = Request(endpoint, body, deadline=deadline, max_attempts=max_attempts, priority=priority)
        request_id, frame = self._core.submit(request, waiter, stream=True)
        self._enqueue(frame, request_id)
        return AsyncStream(self, request_id, waiter)

    def map(
        self,
        requests: Iterable[Any] | AsyncIterable[Any],
        *,
        endpoint: str | None = None,
        window: int = DEFAULT_WINDOW,
        deadline: float | None = None,
        max_attempts: int | None = None,
        priority: str | None = None,
    ) -> AsyncMapIterator:
        """Send many requests with at most ``window`` in flight; iterate `MapResult`s as they complete.

        ``requests`` may be a plain or an async iterable of `Request` objects, ``(endpoint, body)`` pairs,
        or body dicts (with ``endpoint=``). ``deadline``, ``max_attempts`` and ``priority`` apply to the
        items that do not set their own; ``priority`` as for `request` (a batch job may ask for ``"batch"``;
        `ValueError`, raised here, for a value that is not a class). The input is consumed lazily, by a
        task of the client's, so answers come back while the input is slow to produce the next item.
        Per-request failures are yielded (``MapResult.error``), a lost connection raises `ConnectionLost`.
        Leaving the loop, cancelling the enclosing scope or closing the iterator cancels the requests still
        outstanding in the engine; use ``async with client.map(...) as results:`` to make that happen at a
        precise point.
        """
        self._check_usable()
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        return AsyncMapIterator(self, requests, endpoint, window, deadline, max_attempts, priority)

    async def stats(self) -> dict[str, Any]:
        """The engine's counters: ``{"engine": {...}, "lanes": {lane: {...}}}``."""
        self._check_usable()
        waiter = _Waiter()
        request_id, frame = self._core.stats(waiter)
        self._enqueue(frame, request_id)
        stats: dict[str, Any] = unwrap(await self._wait(request_id, waiter))
        return stats

    async def ping(self) -> float:
        """Round-trip to the engine; returns the seconds it took."""
        self._check_usable()
        waiter = _Waiter()
        started = time.perf_counter()
        request_id, frame = self._core.ping(waiter)
        self._enqueue(frame, request_id)
        unwrap(await self._wait(request_id, waiter))
        return time.perf_counter() - started

    # -- connection --------------------------------------------------------------------------------------

    async def _open(self) -> anyio.abc.ByteStream:
        path = self.socket_path
        try:
            with anyio.fail_after(self.connect_timeout):
                try:
                    stream: anyio.abc.ByteStream = await anyio.connect_unix(path)
                except OSError as exc:
                    raise engine_unavailable(self._socket, exc) from exc
                try:
                    await self._handshake(stream)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
                return stream
        except TimeoutError as exc:
            reason = f"no answer to the handshake within {self.connect_timeout} s"
            raise engine_unavailable(self._socket, reason) from exc

    async def _handshake(self, stream: anyio.abc.ByteStream) -> None:
        core = self._core
        try:
            await stream.send(core.send_hello())
            while core.state is State.HANDSHAKING:
                try:
                    data = await stream.receive(_RECV_BYTES)
                except anyio.EndOfStream:
                    data = b""
                core.receive_data(data)
                for _ in core.events():  # Welcomed, or ConnectionClosed; nothing is outstanding yet
                    pass
        except _STREAM_ERRORS as exc:
            core.fail(f"the handshake failed: {exc!r}", exc)  # ConnectionLost("…closed the connection during…")
        if core.welcome is None:
            assert core.error is not None
            raise core.error

    def _check_usable(self) -> None:
        if not self._entered:
            raise RuntimeError("AsyncClient is not connected: use `async with AsyncClient() as client:`")
        if self._core.closed:
            raise self._core.connection_lost()

    def _fail(self, reason: str, cause: BaseException | None) -> None:
        """The transport broke: close the core and wake every waiter (they raise `ConnectionLost`)."""
        self._core.fail(reason, cause)
        self._process_events()

    def _process_events(self) -> None:
        """Hand each of the core's events to whoever waits for it. Never blocks."""
        for event in self._core.events():
            if isinstance(event, Answered | ChunkReceived | StatsReceived | PongReceived):
                event.context.deliver(event)
            elif isinstance(event, ConnectionClosed):
                for context in event.orphans:
                    context.fail()
                for run in list(self._maps):
                    run.fail()
                self._unsent.clear()
                if self._outbox_send is not None:
                    self._outbox_send.close()
                if self._background_scope is not None:
                    self._background_scope.cancel()

    # -- background tasks --------------------------------------------------------------------------------

    async def _background(self) -> None:
        assert self._background_scope is not None
        with self._background_scope:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._write_frames)
                await self._read_replies()
                task_group.cancel_scope.cancel()

    async def _read_replies(self) -> None:
        """Feed the core what the engine sends until the connection ends. Never raises (but `Cancelled`):
        an exception here would cancel the code inside ``async with AsyncClient()``."""
        assert self._stream is not None
        try:
            while True:
                self._process_events()
                if self._core.closed:
                    return
                try:
                    data = await self._stream.receive(_RECV_BYTES)
                except anyio.EndOfStream:
                    data = b""
                self._core.receive_data(data)
        except _STREAM_ERRORS as exc:
            self._fail(f"reading from the engine failed: {exc!r}", exc)
        except Exception as exc:
            logger.exception("trio-mapper client reader failed")
            self._fail(f"the client's reader failed: {exc!r}", exc)

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
                    if item.request_id is not None:
                        self._unsent.pop(item.request_id, None)  # taken: too late to withdraw
                if not live:
                    continue
                try:
                    await self._stream.send(b"".join(item.data for item in live))
                except _STREAM_ERRORS as exc:
                    self._fail(f"sending to the engine failed: {exc!r}", exc)
                    return

    # -- sending -----------------------------------------------------------------------------------------

    def _enqueue(self, data: bytes, request_id: RequestId | None = None) -> None:
        """Queue whole frames for the writer task (a request's own frame with its id); never blocks."""
        if self._core.closed or self._outbox_send is None:
            raise self._core.connection_lost()
        outgoing = _Outgoing(data, request_id)
        try:
            self._outbox_send.send_nowait(outgoing)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._core.connection_lost() from None
        if request_id is not None:
            self._unsent[request_id] = outgoing

    def _withdraw(self, request_ids: Iterable[RequestId]) -> None:
        """Give up on requests without blocking: unsent, they are dropped; sent, they are cancelled."""
        written = []
        for request_id in request_ids:
            outgoing = self._unsent.pop(request_id, None)
            if outgoing is None:
                written.append(request_id)
            else:
                outgoing.withdrawn = True
                self._core.forget((request_id,))
        frames = self._core.cancel(written)  # only for those not answered yet
        if frames:
            with contextlib.suppress(ConnectionLost):
                self._enqueue(frames)

    async def _wait(self, request_id: RequestId, waiter: _Waiter) -> Reply:
        try:
            await waiter.event.wait()
        except BaseException:
            self._withdraw((request_id,))
            raise
        if waiter.reply is None:
            raise self._core.connection_lost()
        return waiter.reply


class _MapRun:
    """One `AsyncClient.map` in progress: its `MapWindow`, the feeder task that pulls its input, and the
    flags between them and the reader task (all in one event loop: no locks).

    The `AsyncMapIterator` the caller holds wraps it; nothing here refers to that iterator, so dropping it
    (``break`` out of ``async for``) lets its ``__del__`` stop the run.
    """

    def __init__(
        self,
        client: AsyncClient,
        requests: Iterable[Any] | AsyncIterable[Any],
        endpoint: str | None,
        window: int,
        deadline: float | None,
        max_attempts: int | None,
        priority: str | None = None,
    ) -> None:
        self.client = client
        self.window = MapWindow(
            client._core,
            endpoint=endpoint,
            window=window,
            deadline=deadline,
            max_attempts=max_attempts,
            priority=priority,
            context=self,
        )
        self.sync_items: Iterator[Any] | None = None
        self.async_items: AsyncIterator[Any] | None = None
        if isinstance(requests, AsyncIterable):
            self.async_items = aiter(requests)
        else:
            self.sync_items = iter(requests)
        #: Set when there may be something for the consumer: a result, the feeder's end, the connection's.
        self.results = _Flag()
        #: Set when the feeder may go on: the consumer took a result (room in the window), or the run ended.
        self.room = _Flag()
        self.feeder_scope = anyio.CancelScope()
        self.feeder_done = anyio.Event()
        self.started = False
        self.finished = False
        #: What pulling or submitting the input raised; the consumer raises it.
        self.error: BaseException | None = None

    # -- the consumer (AsyncMapIterator) -----------------------------------------------------------------

    async def next_result(self) -> MapResult:
        client = self.client
        if not self.started:
            if client._core.closed or client._task_group is None:
                raise client._core.connection_lost()
            self.started = True
            client._maps.add(self)
            client._task_group.start_soon(self._feed)
        while True:
            if self.error is not None:
                raise self.error
            result = self.window.next_result()
            if result is not None:
                self.room.set()
                return result
            if self.window.done:
                raise StopAsyncIteration
            if client._core.closed:
                raise client._core.connection_lost()
            await self.results.wait()

    def finish(self) -> None:
        """Stop without blocking (so it works from any cleanup path): end the feeder, withdraw the requests
        in flight. Safe to call twice."""
        if self.finished:
            return
        self.finished = True
        self.client._maps.discard(self)
        self.feeder_scope.cancel()
        self.room.set()
        self.client._withdraw(self.window.close())

    async def aclose(self) -> None:
        self.finish()
        if self.started:
            with anyio.CancelScope(shield=True):
                await self.feeder_done.wait()  # the feeder lets go of the input before it is closed here
        if self.async_items is not None and hasattr(self.async_items, "aclose"):
            await self.async_items.aclose()

    # -- the reader task (contexts of the window's requests) ---------------------------------------------

    def deliver(self, event: Answered) -> None:
        self.window.deliver(event)
        self.results.set()

    def fail(self) -> None:
        self.results.set()  # the consumer finds the connection closed

    # -- the feeder task ---------------------------------------------------------------------------------

    async def _feed(self) -> None:
        """Pull the input while the window has room, and submit it. Never raises (but `Cancelled`): it runs in
        the client's task group."""
        try:
            with self.feeder_scope:
                while not self.finished:
                    if not self.window.wants_input:
                        await self.room.wait()
                        continue
                    try:
                        if self.async_items is not None:
                            item = await anext(self.async_items)
                        else:
                            assert self.sync_items is not None
                            item = next(self.sync_items)
                    except (StopIteration, StopAsyncIteration):
                        self.window.end_of_input()
                        return
                    if self.finished:
                        return
                    request_id, frame = self.window.add(item)
                    if frame:
                        self.client._enqueue(frame, request_id)
                    self.results.set()  # a request refused locally is a result already
        except Exception as exc:
            self.error = exc
        finally:
            self.results.set()
            self.feeder_done.set()


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
        priority: str | None = None,
    ) -> None:
        self._run = _MapRun(client, requests, endpoint, window, deadline, max_attempts, priority)

    def __aiter__(self) -> AsyncMapIterator:
        return self

    async def __anext__(self) -> MapResult:
        run = self._run
        if run.finished:
            raise StopAsyncIteration
        try:
            return await run.next_result()
        except BaseException:  # StopAsyncIteration included: the run is over either way
            run.finish()
            raise

    async def aclose(self) -> None:
        """Stop iterating and cancel the requests still outstanding. Safe to call twice."""
        await self._run.aclose()

    async def __aenter__(self) -> AsyncMapIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # `break` out of `async for` drops the iterator without closing it: cancel its requests then.
        with contextlib.suppress(Exception):
            self._run.finish()


__all__ = ["AsyncClient", "AsyncMapIterator", "AsyncStream"]
