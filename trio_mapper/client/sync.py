"""Client helpers for the trio-mapper engine: send OpenAI API requests through its Unix socket.

`Client` is for plain blocking code (the standard library's `socket`; thread-safe). `AsyncClient`
(`trio_mapper.client.aio`) runs on Trio and asyncio alike through anyio.

How the work is divided: the protocol itself (handshake, ids, the table of outstanding requests, decoding
and routing replies, why the connection ended, ``map()``'s window) is `trio_mapper.client.core`, a state
machine with no I/O shared by both clients. This module is its blocking driver: it owns the socket and
the threads' waiting, and nothing else.

The driver: the socket is non-blocking, and at most one thread at a time, *the pump*, does its I/O. The
pump polls the socket for reading always and for writing while bytes wait in the outbox, feeds what it
reads to the core and hands each event to the caller it answers. A caller appends whole frames to the
outbox and writes what the socket takes at once, without blocking (under the lock, so writes never
interleave); the rest waits for the pump, which it pokes awake through a socket pair. Then it waits on a
condition variable; a caller that needs progress while no thread pumps becomes the pump. Since the one thread that
writes also reads whenever it waits to write, a full reply queue can never stop the writes (the engine
stops reading a connection whose replies nobody reads: docs/protocol.md, Session item 8), and no lock is
held while anyone blocks.

The socket, the core and the outbox are one `_Session`. When the connection is lost (an engine restart),
the session's waiters raise `ConnectionLost`; the next call opens a new session, and nothing outstanding on
the old one is sent again.

This module is deliberately light: msgspec, the standard library and the light `trio_mapper` modules.
Importing it never imports trio, httpx or anyio.

Wire protocol in short (see `trio_mapper.wire`): the first frame is ``Hello``, the engine answers
``Welcome``; then many requests are in flight at once, each with an id chosen here; replies arrive in
completion order, exactly one final ``Result``/``Error`` per id; ``Cancel(id)`` withdraws a request.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import math
import os
import pwd
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

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
    default_client_name,
    unwrap,
)
from trio_mapper.client.errors import (
    ConnectionLost,
    EngineUnavailable,
    TrioMapperError,
    stream_closed_early,
)
from trio_mapper.paths import SOCKET_ENV_VAR, default_socket_path, default_socket_paths, resolve_socket_path
from trio_mapper.wire import RequestId, Result, Welcome

#: Seconds allowed to connect and complete the handshake.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: Bytes asked of one recv() at most.
_RECV_BYTES: Final = 256 * 1024
#: poll() flags saying the socket has something to read, or the connection ended (recv() then says how).
_READABLE: Final = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
_WRITABLE: Final = select.POLLOUT | select.POLLERR | select.POLLHUP


# --- connecting ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketChoice:
    """The socket a client uses and where that came from, so that a failure names what was tried."""

    path: Path
    #: Where the path came from, for messages: "given explicitly", "from $TRIO_MAPPER_SOCKET", "the default path".
    source: str
    #: Chosen among `trio_mapper.paths.default_socket_paths`: a missing socket names them all.
    is_default: bool

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None) -> SocketChoice:
        """`resolve_socket_path`'s answer, and where it came from."""
        path = resolve_socket_path(explicit)
        if explicit:
            return cls(path, "given explicitly", is_default=False)
        if os.environ.get(SOCKET_ENV_VAR):
            return cls(path, f"from ${SOCKET_ENV_VAR}", is_default=False)
        return cls(path, "the default path", is_default=True)

    def refuse_if_impersonable(self) -> None:
        """Raise `EngineUnavailable` if this is a default path whose directory another user could have made.

        Without ``$XDG_RUNTIME_DIR`` the default is under /tmp, where anyone may create
        ``trio-mapper-<uid>`` first and listen there: a fake engine would read every request sent to it. The
        engine refuses such a directory for its socket; a client must refuse it too. A path the user named is
        their choice, and is not checked.
        """
        if not self.is_default:
            return
        directory = self.path.parent
        try:
            info = os.lstat(directory)
        except OSError:
            return  # nothing there: connecting says so
        me = os.getuid()
        if stat.S_ISDIR(info.st_mode) and info.st_uid in (me, 0) and not info.st_mode & 0o022:
            return
        kind = "directory" if stat.S_ISDIR(info.st_mode) else "symbolic link or file"
        raise EngineUnavailable(
            f"refusing the default socket {self.path}: its {kind} {directory} is {_user_name(info.st_uid)}'s, mode "
            f"{stat.S_IMODE(info.st_mode):04o}, where only this user ({_user_name(me)}) or root may own it and no "
            "one else may write to it: another user could be listening there in the engine's place, to read "
            f"every request. Remove it if it is not meant to be there, or point ${SOCKET_ENV_VAR} (or "
            "socket_path=) at your engine's socket.",
            socket_path=self.path,
        )


def engine_unavailable(choice: SocketChoice, exc: BaseException | str) -> EngineUnavailable:
    """The `EngineUnavailable` for a failed connect: which path was tried, why it failed, and what to do."""
    path = choice.path
    pointer = f"or point ${SOCKET_ENV_VAR} (or socket_path=) at the socket of a running engine"
    if isinstance(exc, FileNotFoundError) and choice.is_default:
        own, *system = default_socket_paths()
        where = f"no socket at {own} (an engine of this user's)"
        if system:
            where += f" nor at {system[0]} (the system service's, systemd/trio-mapper.socket)"
        return EngineUnavailable(
            f"cannot reach a trio-mapper engine: {where}. Start one with `trio-mapper launch-engine` (it needs "
            "OPENAI_API_KEY and its rate limits: see `trio-mapper launch-engine --help`), or the system service "
            f"(`sudo systemctl enable --now trio-mapper.socket`, docs/systemd.md), {pointer}.",
            socket_path=path,
        )
    cannot = f"cannot reach the trio-mapper engine at {path} ({choice.source})"
    if isinstance(exc, PermissionError):
        # Starting an engine would not help here: one is there, and this user is not let in.
        return EngineUnavailable(f"{cannot}: {_access_denied(path)}", socket_path=path)
    if isinstance(exc, FileNotFoundError):
        reason = "no such socket file"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused: the socket file exists but no engine is listening (stale socket?)"
    elif isinstance(exc, BaseException):
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    else:
        reason = exc
    launch = "trio-mapper launch-engine"
    if path != default_socket_path():
        launch += f" --socket {path}"
    return EngineUnavailable(
        f"{cannot}: {reason}. Start one with `{launch}` (it needs OPENAI_API_KEY and its rate limits: see "
        f"`trio-mapper launch-engine --help`), {pointer}.",
        socket_path=path,
    )


def _access_denied(path: Path) -> str:
    """Why this user may not connect to the socket at ``path`` (as far as its metadata tells), and what to do."""
    me = _user_name(os.getuid())
    try:
        info = os.stat(path)
    except OSError:
        problem = f"permission denied: the socket's directory {path.parent} is closed to this user ({me})"
        group = None
    else:
        group = _group_name(info.st_gid)
        problem = (
            f"permission denied: the socket exists, but this user ({me}) may not connect to it (it is "
            f"{_user_name(info.st_uid)}:{group}, mode {stat.S_IMODE(info.st_mode):04o})"
        )
    member = f"the socket's group ({group})" if group is not None else "the socket's group"
    return (
        f"{problem}. Whoever may open the socket may spend the engine's key, so its permissions decide who may: "
        f"ask the engine's operator to add {me} to {member}. Under systemd that is SocketGroup= of "
        f"trio-mapper.socket, trio-mapper by default: `sudo usermod -aG trio-mapper {me}`, effective from the next "
        "login. An engine that creates its own socket lets its group in with socket_mode (--socket-mode, 0660 by "
        "default), in a directory the group may enter. An engine whose config sets allowed_uids/allowed_gids must "
        "also list this user or one of its groups."
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- the blocking client ----------------------------------------------------------------------------------


class _Session:
    """One connection to the engine: its socket, its protocol core, and the bytes on their way out.

    A `Client` has one at a time. Once it is lost, the client's next call opens another; a request is
    waited for on the session it went out on, so it can never take another connection's reply (ids start
    again at 1 on each). Everything here is guarded by the client's lock.
    """

    __slots__ = ("core", "deferred_cancels", "outbox", "poller", "queued", "released", "sent", "sock")

    def __init__(self, core: ClientConnection, sock: socket.socket, wake_read: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.poller.register(wake_read, select.POLLIN)
        self.outbox = bytearray()  # whole frames, in order; written from the front
        self.queued = 0  # bytes ever put in the outbox…
        self.sent = 0  # …and written to the socket: a caller waits for its frame with these
        #: Requests to cancel that a finaliser could not take the lock for (`Client._give_up_soon`). A deque:
        #: its append and popleft are atomic, so a finaliser adds to it without the lock and nothing is lost.
        #: Per session: an id names a request of its own connection only.
        self.deferred_cancels: collections.deque[RequestId] = collections.deque()
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.sock.close()


class _StreamWaiter:
    """Where one `Client.stream`'s chunks and end land (written by the pump, under the lock). Never refers
    to its `Stream`, so that dropping the `Stream` finalises it even though the core still holds this."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = StreamState()

    def deliver(self, event: ChunkReceived | Answered) -> None:
        self.state.deliver(event)


class Stream:
    """The chunks of one streamed request, as `Client.stream` returns it: iterate it for `StreamChunk`s.

    The final `Result` (status, headers with ``x-request-id``, attempts, timings) is ``result`` once the
    iteration ended; an error the stream ended with is raised by the iteration, after the chunks that came
    before it. Leaving early (``close()``, the ``with`` block, or dropping the object, as a ``for`` loop left
    by ``break`` or an exception does in CPython) cancels the request in the engine, which closes the
    upstream's stream at once.
    """

    def __init__(
        self, client: Client, session: _Session, request_id: RequestId, waiter: _StreamWaiter, sent_at: int
    ) -> None:
        self.request_id = request_id
        #: The final `Result` once the stream ended successfully; None before.
        self.result: Result | None = None
        self._client = client
        self._session = session
        self._waiter = waiter
        self._sent_at = sent_at
        self._over = False
        #: Closed before the end came: iterating further raises instead of ending as if whole.
        self._closed_early = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamChunk:
        client, session, state = self._client, self._session, self._waiter.state
        while True:
            if self._over:  # ended, or closed: what is still buffered is not wanted
                if self._closed_early:
                    raise stream_closed_early(self.request_id)
                raise StopIteration
            with client._lock:
                chunk = state.next_chunk()
                done = state.done
                lost = session.core.closed and not state.has_news
            if chunk is not None:
                return chunk
            if done:
                self._over = True
                self.result = state.finish()  # raises the error the stream ended with
                raise StopIteration
            if lost:  # the connection ended before the stream did
                self.close()
                raise client._lost(session, self.request_id, self._sent_at)
            try:
                client._progress(session, lambda: state.has_news or session.core.closed)
            except BaseException:  # Ctrl+C: nothing more will be read for this stream
                self.close()
                raise

    def close(self) -> None:
        """Stop: the request is cancelled in the engine unless it already ended. Safe to call twice."""
        if self._over:
            return
        self._over = self._closed_early = True
        self._client._give_up(self._session, (self.request_id,))

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped without being finished (a `for` loop left by break or an exception): cancel the request.
        # Never block here: the collector may run this in a thread that holds the client's lock.
        if not getattr(self, "_over", True):
            self._over = True
            with contextlib.suppress(Exception):
                self._client._give_up_soon(self._session, self.request_id)

    def __repr__(self) -> str:
        return f"<Stream id={self.request_id!r} {'over' if self._over else 'open'}>"


class _Waiter:
    """Where the reply to one `Client.request`/`stats`/`ping` lands (written by the pump, under the lock)."""

    __slots__ = ("reply",)

    def __init__(self) -> None:
        self.reply: Reply | None = None

    def deliver(self, event: Reply) -> None:
        self.reply = event


class Client:
    """A blocking connection to the engine. Thread-safe: threads may call `request` concurrently and
    their requests share the one connection (whichever thread waits does the I/O for everybody).

    Connects and handshakes in the constructor, so an absent engine raises `EngineUnavailable` right
    away. Use as a context manager or call `close()` (idempotent).

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
        connect_timeout: seconds allowed to connect and complete the handshake (each time it connects).

    Raises:
        ValueError: ``priority`` is not one of the three classes (before connecting).
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
        # Guards the sessions, the flags below and the waiters; never held while a thread blocks in I/O.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pumping: _Session | None = None  # the session a thread is the pump of (see the module docstring)
        self._poked = False  # a wake-up byte is on its way to the pump
        self._reconnecting = False  # a thread is opening the next session, without the lock
        self._closed = False
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_released = False
        try:
            self._wake_read.setblocking(False)
            self._wake_write.setblocking(False)
            core, sock = self._open_connection()
            self._session = _Session(core, sock, self._wake_read)
        except BaseException:
            self._wake_read.close()
            self._wake_write.close()
            raise

    # -- public API --------------------------------------------------------------------------------------

    def request(
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
        for a ``priority`` that is not a class (nothing is sent). After a lost connection, what connecting
        again raises (`EngineUnavailable`…).
        """
        return self.request_result(
            endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts, priority=priority
        ).body

    def request_result(
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
        request = Request(
            endpoint, body, method=method, deadline=deadline, max_attempts=max_attempts, priority=priority
        )
        waiter = _Waiter()
        with self._lock:
            session = self._usable_session()
            request_id, frame = session.core.submit(request, waiter)
            sent_at = self._queue(session, frame)
        result: Result = unwrap(self._wait(session, request_id, waiter, sent_at))
        return result

    def stream(
        self,
        endpoint: str,
        body: Mapping[str, Any],
        *,
        deadline: float | None = None,
        max_attempts: int | None = None,
        priority: str | None = None,
    ) -> Stream:
        """Send one request as a stream: iterate what this returns for its chunks as the upstream generates them.

        ``body`` is what `request` takes; ``"stream": true`` is set here. Each item is a `StreamChunk`: its
        ``data`` the event's decoded JSON (a ``chat.completion.chunk`` dict, a completions chunk, a Responses
        API event), its ``event`` the Responses API's event name. The engine's usage chunk is not among them
        unless the body asks for it (``"stream_options": {"include_usage": true}``). ``priority`` is as for
        `request`.

        Raises, from this call: `ValueError` for a ``priority`` that is not a class, `ProtocolError` when the
        engine is too old to stream (upgrade it), `InvalidRequestError` for a frame larger than the engine
        accepts, what connecting again raises after a lost connection. From the iteration: the
        `TrioMapperError` subclass ``request`` would raise for the engine's error kind (a failure before or
        during the stream), or `ConnectionLost`.
        """
        request = Request(endpoint, body, deadline=deadline, max_attempts=max_attempts, priority=priority)
        waiter = _StreamWaiter()
        with self._lock:
            session = self._usable_session()
            request_id, frame = session.core.submit(request, waiter, stream=True)
            sent_at = self._queue(session, frame)
        return Stream(self, session, request_id, waiter, sent_at)

    def map(
        self,
        requests: Iterable[Any],
        *,
        endpoint: str | None = None,
        window: int = DEFAULT_WINDOW,
        deadline: float | None = None,
        max_attempts: int | None = None,
        priority: str | None = None,
    ) -> Generator[MapResult, None, None]:
        """Send many requests with at most ``window`` in flight; yield a `MapResult` per item as it completes.

        Items are `Request` objects, ``(endpoint, body)`` pairs, or body dicts (with ``endpoint=``).
        ``deadline``, ``max_attempts`` and ``priority`` apply to the items that do not set their own (a
        `Request`'s fields); ``priority`` as for `request` (a batch job may ask for ``"batch"``; `ValueError`,
        raised here, for a value that is not a class). The iterable is consumed lazily. Per-request failures
        are yielded (``MapResult.error``), not raised; a lost connection raises `ConnectionLost` (the map's
        requests in flight are not sent again; another ``map`` connects again). Closing the generator
        (leaving a ``for`` loop in CPython, or ``contextlib.closing``) cancels the requests still outstanding
        in the engine.
        """
        with self._lock:
            session = self._usable_session()
            state = MapWindow(
                session.core,
                endpoint=endpoint,
                window=window,
                deadline=deadline,
                max_attempts=max_attempts,
                priority=priority,
            )
        return self._map(session, iter(requests), state)

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The engine's counters: ``{"engine": {...}, "lanes": {lane: {...}}}``.

        Raises:
            TimeoutError: ``timeout`` seconds passed without the answer (None: wait as long as it takes).
        """
        waiter = _Waiter()
        with self._lock:
            session = self._usable_session()
            request_id, frame = session.core.stats(waiter)
            self._queue(session, frame)
        stats: dict[str, Any] = unwrap(self._wait(session, request_id, waiter, None, timeout))
        return stats

    def ping(self) -> float:
        """Round-trip to the engine; returns the seconds it took."""
        waiter = _Waiter()
        with self._lock:
            session = self._usable_session()
            started = time.perf_counter()
            request_id, frame = session.core.ping(waiter)
            self._queue(session, frame)
        unwrap(self._wait(session, request_id, waiter, None))
        return time.perf_counter() - started

    def close(self) -> None:
        """Close the connection; callers still waiting get `ConnectionLost`. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session = self._session
            session.core.close()
            self._dispatch(session)
            if self._pumping is not None:
                self._poke()  # the pump lets go of the sockets when it sees the connection closed
            self._release_wake()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def welcome(self) -> Welcome:
        """The `Welcome` of the engine this client is (or was last) connected to."""
        welcome = self._session.core.welcome
        assert welcome is not None  # a session is kept only once its handshake succeeded
        return welcome

    @property
    def priority(self) -> str | None:
        """The priority class asked for by calls that name none (None: the class of the client's tenant)."""
        return self._priority

    @property
    def _core(self) -> ClientConnection:
        """The current connection's protocol core."""
        return self._session.core

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._session.core.outstanding)} in flight"
        return f"<Client {str(self.socket_path)!r} {state}>"

    # -- connection --------------------------------------------------------------------------------------

    def _open_connection(self) -> tuple[ClientConnection, socket.socket]:
        """Connect and handshake; returns the open core and its (non-blocking) socket. Blocking, and never
        under the lock: nothing else knows this socket yet."""
        timeout = self.connect_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        core = ClientConnection(socket_path=self.socket_path, client_name=self.client_name, priority=self._priority)
        sock = self._connect(timeout)
        try:
            try:
                sock.sendall(core.send_hello())
            except TimeoutError:
                raise
            except OSError:
                pass  # the engine may have said why it closed (a refusal): read it below
            while core.state is State.HANDSHAKING:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                try:
                    data = sock.recv(_RECV_BYTES)
                except TimeoutError:
                    raise
                except OSError as exc:
                    core.fail(f"the handshake failed: {exc!r}", exc)
                    break
                core.receive_data(data)
                for _ in core.events():  # Welcomed, or ConnectionClosed: nothing is outstanding yet
                    pass
            if core.welcome is None:
                assert core.error is not None
                raise core.error
            sock.setblocking(False)
        except TimeoutError as exc:
            sock.close()
            reason = "the engine did not answer the handshake in time"
            raise engine_unavailable(self._socket, reason) from exc
        except BaseException:
            sock.close()
            raise
        return core, sock

    def _connect(self, timeout: float | None) -> socket.socket:
        self._socket.refuse_if_impersonable()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(self.socket_path))
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise engine_unavailable(self._socket, f"no answer within {timeout} s") from exc
            raise engine_unavailable(self._socket, exc) from exc
        return sock

    def _usable_session(self) -> _Session:
        """The open session for a new request (lock held); after a lost connection, a new one.

        The lock is released while connecting, so that the other threads carry on. A failed attempt raises
        to this call (the next call tries again), and no request is moved from the lost session to the new.
        """
        while True:
            if self._closed:
                raise self._session.core.connection_lost()  # "the client was closed"
            if not self._session.core.closed and self._pumping is None:
                # Nobody reads while no call waits: an engine that went away meanwhile (a restart) is noticed
                # here, so that this call connects again instead of sending into a dead connection.
                self._read(self._session)
            if not self._session.core.closed:
                return self._session
            if self._reconnecting:
                self._changed.wait()
                continue
            self._reconnecting = True
            self._lock.release()
            try:
                core, sock = self._open_connection()
            finally:
                self._lock.acquire()
                self._reconnecting = False
                self._changed.notify_all()
            if self._closed:  # closed meanwhile: the loop raises
                sock.close()
                continue
            self._session = _Session(core, sock, self._wake_read)

    def _retire(self, session: _Session) -> None:
        """Close a lost session's socket once no thread pumps it (lock held)."""
        if session.core.closed and self._pumping is not session:
            session.release()

    def _release_wake(self) -> None:
        """Close the wake-up sockets once the client is closed and no thread pumps (lock held)."""
        if self._closed and self._pumping is None and not self._wake_released:
            self._wake_released = True
            self._wake_read.close()
            self._wake_write.close()

    # -- waiting: the pump -------------------------------------------------------------------------------

    def _queue(self, session: _Session, frames: bytes) -> int:
        """Append whole frames to the outbox and write what the socket takes now, without blocking (lock
        held); returns the `_Session.sent` count at which they are out. What is left goes out with the pump."""
        if session.deferred_cancels:
            frames = self._take_deferred_cancels(session) + frames
        if frames and not session.core.closed:
            session.outbox += frames
            session.queued += len(frames)
            self._write(session)
            if session.outbox:
                self._poke()
        return session.queued

    def _poke(self) -> None:
        """Wake the pump from poll() (lock held): there is something new to write, or to notice."""
        if self._pumping is not None and not self._poked:
            self._poked = True
            with contextlib.suppress(OSError):
                self._wake_write.send(b"\0")

    def _wait(
        self,
        session: _Session,
        request_id: RequestId,
        waiter: _Waiter,
        sent_at: int | None,
        timeout: float | None = None,
    ) -> Reply:
        """The reply for ``request_id``; if this call ends otherwise (ConnectionLost, Ctrl+C, ``timeout``),
        the request is cancelled in the engine. ``sent_at``: where the request's submit frame ends in the
        session's output (None for stats and pings), to say whether a lost request may have been run."""
        try:
            self._progress(session, lambda: waiter.reply is not None or session.core.closed, timeout)
        finally:
            if waiter.reply is None:
                self._give_up(session, (request_id,))
        if waiter.reply is None:
            raise self._lost(session, request_id, sent_at)
        return waiter.reply

    def _lost(self, session: _Session, request_id: RequestId, sent_at: int | None) -> ConnectionLost:
        """The error for a request of a session that ended before its reply."""
        with self._lock:
            if sent_at is None:
                return session.core.connection_lost()
            return session.core.request_lost(request_id, sent=session.sent >= sent_at)

    def _give_up_soon(self, session: _Session, request_id: RequestId) -> None:
        """`_give_up` for finalisers: never blocks. Without the lock at once, the cancel waits for whichever
        thread next writes or pumps."""
        if self._lock.acquire(blocking=False):
            try:
                self._queue(session, session.core.cancel((request_id,)))
            finally:
                self._lock.release()
        else:
            session.deferred_cancels.append(request_id)

    def _take_deferred_cancels(self, session: _Session) -> bytes:
        """The cancel frames `_give_up_soon` left for later (lock held)."""
        request_ids = []
        while session.deferred_cancels:
            request_ids.append(session.deferred_cancels.popleft())
        return session.core.cancel(request_ids)

    def _give_up(self, session: _Session, request_ids: Iterable[RequestId]) -> None:
        """Forget these requests; those not answered yet are cancelled in the engine (best effort)."""
        with self._lock:
            frames = session.core.cancel(request_ids)
            sent_at = self._queue(session, frames)
        if frames:
            with contextlib.suppress(TrioMapperError, OSError):
                self._progress(session, lambda: session.sent >= sent_at)

    def _progress(self, session: _Session, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Return once ``done()`` holds (checked under the lock). Meanwhile this thread is the pump of
        ``session``, or waits while another thread is a pump.

        Raises:
            ConnectionLost: the session's connection closed first.
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not done():
                if session.core.closed:
                    raise session.core.connection_lost()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                if self._pumping is not None:
                    self._changed.wait(remaining)
                    continue
                self._pumping = session
                try:
                    while not done() and not session.core.closed:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise TimeoutError
                        self._pump_once(session, remaining)
                finally:
                    self._pumping = None
                    self._retire(session)
                    self._release_wake()
                    self._changed.notify_all()

    def _pump_once(self, session: _Session, timeout: float | None) -> None:
        """Wait until the socket can be read or written (or a poke), then read and write what it can
        (lock held, released while polling)."""
        self._poked = False
        with contextlib.suppress(OSError):
            while self._wake_read.recv(64):
                pass
        if session.deferred_cancels:
            self._queue(session, b"")
        session.poller.modify(session.sock, select.POLLIN | (select.POLLOUT if session.outbox else 0))
        self._lock.release()
        try:
            ready = session.poller.poll(None if timeout is None else math.ceil(timeout * 1000))
        finally:
            self._lock.acquire()
        flags = next((events for fd, events in ready if fd == session.sock.fileno()), 0)
        if flags & _READABLE:
            self._read(session)
        if flags & _WRITABLE and session.outbox and not session.core.closed:
            self._write(session)
        self._changed.notify_all()

    def _read(self, session: _Session) -> None:
        core = session.core
        try:
            try:
                data = session.sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                core.fail(f"reading from the engine failed: {exc}", exc)
            else:
                core.receive_data(data)
            self._dispatch(session)
        except BaseException as exc:
            # Interrupted (Ctrl+C…) between taking bytes from the socket and handing their replies out:
            # some may be lost, so no reply can be trusted to come any more.
            core.fail("interrupted while reading from the engine; the connection was closed", exc)
            self._dispatch(session)
            raise

    def _write(self, session: _Session) -> None:
        """Write what the socket takes now (lock held; the writes of all threads are serialised by it)."""
        core = session.core
        try:
            try:
                sent = session.sock.send(session.outbox)  # as much as the socket takes
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._read_last_words(session)
                core.fail(f"sending to the engine failed: {exc}", exc)
                self._dispatch(session)
                return
            del session.outbox[:sent]
            session.sent += sent
        except BaseException as exc:
            # Interrupted (Ctrl+C…) partway: whether the bytes went out is unknown, so the engine can no
            # longer parse this stream, and this connection is finished.
            core.fail("interrupted while sending a frame; the connection was closed", exc)
            self._dispatch(session)
            raise

    def _read_last_words(self, session: _Session) -> None:
        """After a failed write, read what the engine sent before it went away (its reason for closing)."""
        while not session.core.closed:
            try:
                data = session.sock.recv(_RECV_BYTES)
            except OSError:
                return
            session.core.receive_data(data)
            self._dispatch(session)
            if not data:
                return

    def _dispatch(self, session: _Session) -> None:
        """Hand each event to whoever waits for it (lock held)."""
        for event in session.core.events():
            if isinstance(event, Answered | ChunkReceived | StatsReceived | PongReceived):
                event.context.deliver(event)
            elif isinstance(event, ConnectionClosed):  # waiters see the core closed: they raise ConnectionLost
                session.outbox.clear()
                with contextlib.suppress(OSError):
                    session.sock.shutdown(socket.SHUT_RDWR)
                self._retire(session)
        self._changed.notify_all()

    # -- map ---------------------------------------------------------------------------------------------

    def _map(self, session: _Session, items: Iterator[Any], window: MapWindow) -> Generator[MapResult, None, None]:
        try:
            while True:
                with self._lock:
                    wants_input = window.wants_input
                    result = None if wants_input else window.next_result()
                    finished = window.done
                if wants_input:  # fill the window first, as the engine works on all of it meanwhile
                    self._pull(session, items, window)
                elif result is not None:
                    yield result
                elif finished:
                    return
                else:
                    self._progress(session, lambda: window.has_results)
        finally:
            with self._lock:
                in_flight = window.close()
            self._give_up(session, in_flight)

    def _pull(self, session: _Session, items: Iterator[Any], window: MapWindow) -> None:
        """Submit the next input item, and wait until it is written (reading replies meanwhile)."""
        try:
            item = next(items)
        except StopIteration:
            with self._lock:
                window.end_of_input()
            return
        with self._lock:
            _, frame = window.add(item)
            sent_at = self._queue(session, frame)
        self._progress(session, lambda: session.sent >= sent_at)


__all__ = ["DEFAULT_CONNECT_TIMEOUT", "Client", "SocketChoice", "Stream", "engine_unavailable"]
