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

Those tasks, the core and the socket are one `_Link`. When the connection is lost (an engine restart), the
link's waiters raise `ConnectionLost` and its tasks end; the next call opens a new link, and nothing
outstanding on the old one is sent again.

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
    check_priority,
    coerce_request,
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
#: After a failed write, how long the reader has to read the engine's last frames before the write's failure
#: closes the connection (the engine's close follows them at once: this is only a bound).
LAST_WORDS_TIMEOUT: Final = 1.0
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


class _Link:
    """One connection to the engine and what belongs to it alone: its protocol core, its byte stream, the
    writer's queue, and the scope of its reader and writer tasks.

    An `AsyncClient` has one at a time. Once it is lost, the client's next call opens another; a request
    waits on the link it went out on, so it can never take another connection's reply (ids start again at
    1 on each).
    """

    __slots__ = ("core", "never_sent", "outbox_receive", "outbox_send", "scope", "stream", "unsent")

    def __init__(self, core: ClientConnection, stream: anyio.abc.ByteStream) -> None:
        self.core = core
        self.stream = stream
        # Frames for the writer task. Unbounded on purpose: producers include cleanup code that must not
        # block (a cancelled request, a dropped map iterator), and it holds at most one Submit per waiting
        # request plus one Cancel per abandoned one; callers bound those (a map's window, your tasks).
        self.outbox_send: MemoryObjectSendStream[_Outgoing]
        self.outbox_receive: MemoryObjectReceiveStream[_Outgoing]
        self.outbox_send, self.outbox_receive = anyio.create_memory_object_stream[_Outgoing](math.inf)
        #: Queued frames of requests the writer has not taken yet, by id: those can be withdrawn.
        self.unsent: dict[RequestId, _Outgoing] = {}
        #: The requests still unsent when the connection ended: they never reached the engine.
        self.never_sent: frozenset[RequestId] = frozenset()
        #: The reader's and the writer's.
        self.scope = anyio.CancelScope()


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

    def __init__(self, client: AsyncClient, request: Request, waiter: _StreamWaiter) -> None:
        #: The request's id on its connection; None until it is sent.
        self.request_id: RequestId | None = None
        #: The final `Result` once the stream ended successfully; None before.
        self.result: Result | None = None
        self._client = client
        self._request = request
        self._waiter = waiter
        self._link: _Link | None = None
        self._over = False
        #: Closed before the end came: iterating further raises instead of ending as if whole.
        self._closed_early = False

    def _submit(self, link: _Link) -> None:
        self.request_id, frame = link.core.submit(self._request, self._waiter, stream=True)
        self._link = link
        self._client._enqueue(link, frame, self.request_id)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamChunk:
        state = self._waiter.state
        if self._link is None and not self._over:
            # `stream()` found the connection lost and cannot await a new one: the first chunk's wait does.
            self._submit(await self._client._usable_link())
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
            assert self._link is not None and self.request_id is not None
            if self._link.core.closed:  # the connection ended before the stream did
                self.close()
                raise self._client._lost(self._link, self.request_id)
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
        if self._link is not None and self.request_id is not None:
            self._client._withdraw(self._link, (self.request_id,))

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

    When the connection is lost (the engine restarted, say), the calls waiting on it raise `ConnectionLost`,
    which says whether each request may have reached the upstream; none is sent again. The next call
    connects again, to the same socket: if that fails, it raises what connecting raised (`EngineUnavailable`,
    or the engine's refusal), and the call after it tries again.

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
        connect_timeout: seconds allowed to connect and complete the handshake, each time it connects
            (None: no limit).

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
        self._priority = check_priority(priority)
        self._socket = SocketChoice.resolve(socket_path)
        self.socket_path: Path = self._socket.path
        self.client_name = client_name if client_name is not None else default_client_name()
        self.connect_timeout = connect_timeout
        #: The current connection; None before ``async with``.
        self._link: _Link | None = None
        #: Held while a lost connection is replaced, so that concurrent calls open one, not one each.
        self._reconnecting: anyio.Lock | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        #: The maps in progress, stopped when the client closes.
        self._maps: set[_MapRun] = set()
        self._entered = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        if self._entered:
            raise RuntimeError("an AsyncClient can only be entered once")
        self._entered = True
        self._link = link = await self._open()
        self._reconnecting = anyio.Lock()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._background, link)
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
        link = self._link
        if link is None:
            return
        link.core.close()
        self._process_events(link)
        for run in list(self._maps):
            run.finish()
        link.scope.cancel()
        await anyio.aclose_forcefully(link.stream)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def priority(self) -> str | None:
        """The priority class asked for by calls that name none (None: the class of the client's tenant)."""
        return self._priority

    @property
    def welcome(self) -> Welcome | None:
        """The `Welcome` of the engine this client is (or was last) connected to; None before ``async with``."""
        return None if self._link is None else self._link.core.welcome

    @property
    def _core(self) -> ClientConnection:
        """The current connection's protocol core."""
        assert self._link is not None, "not connected: use `async with AsyncClient() as client:`"
        return self._link.core

    def __repr__(self) -> str:
        if self._closed or self._link is None:
            state = "closed" if self._closed else "not connected"
        else:
            state = f"{len(self._link.core.outstanding)} in flight"
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
        request is cancelled in the engine too. After a lost connection, what connecting again raises
        (`EngineUnavailable`…).
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
        waiter = _Waiter()
        request = Request(
            endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts, priority=priority
        )
        # Queued before the first checkpoint (there is one only to connect again): requests go out in the
        # order their callers ran.
        link = await self._usable_link()
        request_id, frame = link.core.submit(request, waiter)
        self._enqueue(link, frame, request_id)
        result: Result = unwrap(await self._wait(link, request_id, waiter, submitted=True))
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

        Not a coroutine: the request is sent when this is called (after a lost connection, by the first wait
        for a chunk, which connects again first). ``body`` is what `request` takes;
        ``"stream": true`` is set here. Each item is a `StreamChunk` (see `trio_mapper.client.sync.Client.stream`
        for what it holds); ``priority`` is as for `request`. Raises, from this call: `ValueError` for a
        ``priority`` that is not a class, `ProtocolError` when the engine is too old to stream,
        `InvalidRequestError` for a frame larger than the engine accepts (those three from the first wait for a
        chunk when it is the one that sends the request); from the iteration: the `TrioMapperError` subclass
        ``request`` would raise for the engine's error kind, or `ConnectionLost`.
        """
        link = self._current()
        request = Request(endpoint, body, deadline=deadline, max_attempts=max_attempts, priority=priority)
        stream = AsyncStream(self, request, _StreamWaiter())
        if not link.core.closed:
            stream._submit(link)
        return stream

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
        precise point. A map made after a lost connection connects again when it is first iterated.
        """
        self._current()
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        check_priority(priority)
        return AsyncMapIterator(self, requests, endpoint, window, deadline, max_attempts, priority)

    async def stats(self) -> dict[str, Any]:
        """The engine's counters: ``{"engine": {...}, "lanes": {lane: {...}}}``."""
        waiter = _Waiter()
        link = await self._usable_link()
        request_id, frame = link.core.stats(waiter)
        self._enqueue(link, frame, request_id)
        stats: dict[str, Any] = unwrap(await self._wait(link, request_id, waiter))
        return stats

    async def ping(self) -> float:
        """Round-trip to the engine; returns the seconds it took."""
        waiter = _Waiter()
        link = await self._usable_link()
        started = time.perf_counter()
        request_id, frame = link.core.ping(waiter)
        self._enqueue(link, frame, request_id)
        unwrap(await self._wait(link, request_id, waiter))
        return time.perf_counter() - started

    # -- connection --------------------------------------------------------------------------------------

    async def _open(self) -> _Link:
        """Connect and handshake."""
        choice = self._socket
        choice.refuse_if_impersonable()
        core = ClientConnection(socket_path=self.socket_path, client_name=self.client_name, priority=self._priority)
        try:
            with anyio.fail_after(self.connect_timeout):
                try:
                    stream: anyio.abc.ByteStream = await anyio.connect_unix(choice.path)
                except OSError as exc:
                    raise engine_unavailable(choice, exc) from exc
                try:
                    await self._handshake(core, stream)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
        except TimeoutError as exc:
            reason = f"no answer to the handshake within {self.connect_timeout} s"
            raise engine_unavailable(choice, reason) from exc
        return _Link(core, stream)

    @staticmethod
    async def _handshake(core: ClientConnection, stream: anyio.abc.ByteStream) -> None:
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

    def _current(self) -> _Link:
        """The current link, lost or not; raises when the client is not in use."""
        if not self._entered or self._link is None:
            raise RuntimeError("AsyncClient is not connected: use `async with AsyncClient() as client:`")
        if self._closed:
            raise self._link.core.connection_lost()  # "the client was closed"
        return self._link

    async def _usable_link(self) -> _Link:
        """The open link for a new request; after a lost connection, a new one.

        No checkpoint while the connection is open, so that requests go out in the order their callers
        ran. One attempt to connect again, whose failure this call raises (the next call tries again); no
        request is moved from the lost link to the new.
        """
        link = self._current()
        if not link.core.closed:
            return link
        assert self._reconnecting is not None and self._task_group is not None
        async with self._reconnecting:
            link = self._current()
            if link.core.closed:  # no other call connected again meanwhile
                fresh = await self._open()
                if self._closed:
                    await anyio.aclose_forcefully(fresh.stream)
                    raise link.core.connection_lost()  # "the client was closed"
                self._link = link = fresh
                self._task_group.start_soon(self._background, fresh)
        return link

    def _fail(self, link: _Link, reason: str, cause: BaseException | None) -> None:
        """The transport broke: close the core and wake every waiter (they raise `ConnectionLost`)."""
        link.core.fail(reason, cause)
        self._process_events(link)

    def _process_events(self, link: _Link) -> None:
        """Hand each of the core's events to whoever waits for it. Never blocks."""
        for event in link.core.events():
            if isinstance(event, Answered | ChunkReceived | StatsReceived | PongReceived):
                event.context.deliver(event)
            elif isinstance(event, ConnectionClosed):
                link.never_sent = frozenset(link.unsent)
                for context in event.orphans:
                    context.fail()
                for run in list(self._maps):
                    if run.link is link:
                        run.fail()
                link.unsent.clear()
                link.outbox_send.close()
                link.scope.cancel()

    def _lost(self, link: _Link, request_id: RequestId) -> ConnectionLost:
        """The error for a request of a link that ended before its reply."""
        return link.core.request_lost(request_id, sent=request_id not in link.never_sent)

    # -- background tasks --------------------------------------------------------------------------------

    async def _background(self, link: _Link) -> None:
        try:
            with link.scope:
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(self._write_frames, link)
                    await self._read_replies(link)
                    task_group.cancel_scope.cancel()
        finally:
            # A lost link's socket is closed here (the current one's by aclose too: closing twice is harmless).
            await anyio.aclose_forcefully(link.stream)

    async def _read_replies(self, link: _Link) -> None:
        """Feed the core what the engine sends until the connection ends. Never raises (but `Cancelled`):
        an exception here would cancel the code inside ``async with AsyncClient()``."""
        core = link.core
        try:
            while True:
                self._process_events(link)
                if core.closed:
                    return
                try:
                    data = await link.stream.receive(_RECV_BYTES)
                except anyio.EndOfStream:
                    data = b""
                core.receive_data(data)
        except _STREAM_ERRORS as exc:
            self._fail(link, f"reading from the engine failed: {exc!r}", exc)
        except Exception as exc:
            logger.exception("trio-mapper client reader failed")
            self._fail(link, f"the client's reader failed: {exc!r}", exc)

    async def _write_frames(self, link: _Link) -> None:
        """The only writer: callers queue whole frames, so cancelling a caller never tears one."""
        outbox = link.outbox_receive
        async with outbox:
            async for first in outbox:
                batch = [first]
                size = len(first.data)
                while size < _WRITE_BATCH_BYTES:  # what else is queued goes out in the same write
                    try:
                        batch.append(outbox.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    size += len(batch[-1].data)
                live = [item for item in batch if not item.withdrawn]
                for item in live:
                    if item.request_id is not None:
                        link.unsent.pop(item.request_id, None)  # taken: too late to withdraw
                if not live:
                    continue
                try:
                    await link.stream.send(b"".join(item.data for item in live))
                except _STREAM_ERRORS as exc:
                    # The engine closed: what it said last (its goodbye, which tells the requests it never read
                    # from those that may have run) may still be unread. The reader closes the link with it, which
                    # cancels this wait; the failed write decides only if the reader has not done so by then.
                    await anyio.sleep(LAST_WORDS_TIMEOUT)
                    self._fail(link, f"sending to the engine failed: {exc!r}", exc)
                    return

    # -- sending -----------------------------------------------------------------------------------------

    def _enqueue(self, link: _Link, data: bytes, request_id: RequestId | None = None) -> None:
        """Queue whole frames for the writer task (a request's own frame with its id); never blocks."""
        if link.core.closed:
            raise link.core.connection_lost()
        outgoing = _Outgoing(data, request_id)
        try:
            link.outbox_send.send_nowait(outgoing)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise link.core.connection_lost() from None
        if request_id is not None:
            link.unsent[request_id] = outgoing

    def _withdraw(self, link: _Link, request_ids: Iterable[RequestId]) -> None:
        """Give up on requests without blocking: unsent, they are dropped; sent, they are cancelled."""
        written = []
        for request_id in request_ids:
            outgoing = link.unsent.pop(request_id, None)
            if outgoing is None:
                written.append(request_id)
            else:
                outgoing.withdrawn = True
                link.core.forget((request_id,))
        frames = link.core.cancel(written)  # only for those not answered yet
        if frames:
            with contextlib.suppress(ConnectionLost):
                self._enqueue(link, frames)

    async def _wait(self, link: _Link, request_id: RequestId, waiter: _Waiter, *, submitted: bool = False) -> Reply:
        """The reply for ``request_id``; ``submitted`` for a request (not a stats or a ping), whose loss says
        whether it may have reached the upstream."""
        try:
            await waiter.event.wait()
        except BaseException:
            self._withdraw(link, (request_id,))
            raise
        if waiter.reply is None:
            raise self._lost(link, request_id) if submitted else link.core.connection_lost()
        return waiter.reply


class _MapRun:
    """One `AsyncClient.map` in progress: its `MapWindow`, the feeder task that pulls its input, and the
    flags between them and the reader task (all in one event loop: no locks).

    The window is made on the first ``next_result``, on the connection of that moment: ``map()`` is not a
    coroutine, so it cannot connect again after a lost connection, and the first wait for a result can.

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
        self._options: dict[str, Any] = {
            "endpoint": endpoint,
            "window": window,
            "deadline": deadline,
            "max_attempts": max_attempts,
            "priority": priority,
        }
        #: Set by the first ``next_result``: the connection the requests go out on, and the window on it.
        self.link: _Link | None = None
        self.window: MapWindow | None = None
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
        #: Once the connection is lost: a failed result for each item that was pulled and not answered.
        self.lost: list[MapResult] = []
        self.lost_taken = False

    # -- the consumer (AsyncMapIterator) -----------------------------------------------------------------

    async def next_result(self) -> MapResult:
        client = self.client
        if not self.started:
            link = await client._usable_link()
            if self.finished:  # closed while connecting
                raise StopAsyncIteration
            assert client._task_group is not None
            self.link, self.window = link, MapWindow(link.core, **self._options, context=self)
            self.started = True
            client._maps.add(self)
            client._task_group.start_soon(self._feed)
        assert self.link is not None and self.window is not None
        while True:
            if self.error is not None:
                raise self.error
            result = self.window.next_result()
            if result is not None:
                self.room.set()
                return result
            if self.window.done:
                raise StopAsyncIteration
            if self.link.core.closed:
                raise self.link.core.connection_lost()
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
        if self.link is not None and self.window is not None:
            self.client._withdraw(self.link, self.window.close())

    async def aclose(self) -> None:
        self.finish()
        if self.started:
            with anyio.CancelScope(shield=True):
                await self.feeder_done.wait()  # the feeder lets go of the input before it is closed here
        if self.async_items is not None and hasattr(self.async_items, "aclose"):
            await self.async_items.aclose()

    # -- the reader task (contexts of the window's requests) ---------------------------------------------

    def deliver(self, event: Answered) -> None:
        assert self.window is not None  # its requests went out through it
        self.window.deliver(event)
        self.results.set()

    def fail(self) -> None:
        """The connection ended: what is still in flight is lost, each saying whether it had been sent. Called
        once for the run and once for each of its requests outstanding (the run is their context)."""
        assert self.link is not None and self.window is not None  # only a started run is among the client's
        if not self.lost_taken:
            self.lost_taken = True
            self.lost.extend(
                MapResult(item, request, error=self.client._lost(self.link, request_id))
                for request_id, (item, request) in self.window.in_flight.items()
            )
        self.results.set()  # the consumer finds the connection closed

    # -- the feeder task ---------------------------------------------------------------------------------

    async def _feed(self) -> None:
        """Pull the input while the window has room, and submit it. Never raises (but `Cancelled`): it runs in
        the client's task group."""
        assert self.link is not None and self.window is not None
        link, window = self.link, self.window
        try:
            with self.feeder_scope:
                while not self.finished:
                    if not window.wants_input:
                        await self.room.wait()
                        continue
                    try:
                        if self.async_items is not None:
                            item = await anext(self.async_items)
                        else:
                            assert self.sync_items is not None
                            item = next(self.sync_items)
                    except (StopIteration, StopAsyncIteration):
                        window.end_of_input()
                        return
                    if self.finished:
                        return
                    if link.core.closed:  # lost while the input was pulled: this item never went out
                        self.lost.append(self._never_sent(item))
                        return
                    request_id, frame = window.add(item)
                    if frame:
                        self.client._enqueue(link, frame, request_id)
                    self.results.set()  # a request refused locally is a result already
        except Exception as exc:
            self.error = exc
        finally:
            self.results.set()
            self.feeder_done.set()

    def _never_sent(self, item: Any) -> MapResult:
        assert self.link is not None
        options = {name: value for name, value in self._options.items() if name != "window"}
        error = self.link.core.connection_lost()
        error.may_have_reached_upstream = False
        return MapResult(item, coerce_request(item, **options), error=error)


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

    @property
    def lost(self) -> list[MapResult]:
        """After the map raised `ConnectionLost`: a result for each item taken from the input and not answered,
        in the order they were taken; empty before.

        Each ``error`` is a `ConnectionLost` whose ``may_have_reached_upstream`` says whether the request had
        been sent (the engine may have run it) or not (it never reached the engine: resubmitting it cannot run
        it twice). The items answered before the connection ended were yielded, as usual.
        """
        return list(self._run.lost)

    async def __aenter__(self) -> AsyncMapIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # `break` out of `async for` drops the iterator without closing it: cancel its requests then.
        with contextlib.suppress(Exception):
            self._run.finish()


__all__ = ["AsyncClient", "AsyncMapIterator", "AsyncStream"]
