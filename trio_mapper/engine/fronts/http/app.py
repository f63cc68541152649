"""The OpenAI-compatible HTTP API as an ASGI app: each request becomes a `RequestSpec` for the core, and its
outcome an OpenAI-shaped reply.

Only the listed endpoints are served, always on the engine's own base URL: the request's Host, its absolute
target or its path cannot point the engine anywhere else. The client's Authorization header is its key for
this engine (TCP), never forwarded; the engine adds the real key upstream.

A streamed reply (``"stream": true``) goes out as server-sent events, each written as soon as the core relays
it. A failure after the first event ends the stream with an error event in OpenAI's format, since the status
line has gone out already.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, Final, Protocol
from urllib.parse import quote

import attrs
import msgspec
import trio

from trio_mapper import collector
from trio_mapper.engine.core.outcome import (
    Chunk,
    ClientIdentity,
    Failed,
    Finished,
    Outcome,
    ReplySink,
    RequestSpec,
    Started,
)
from trio_mapper.engine.fronts.http.errors import (
    Headers,
    body_headers,
    error_body,
    render_failure,
    retry_headers,
    stream_error_event,
)
from trio_mapper.engine.fronts.http.keys import ClientKeys
from trio_mapper.engine.fronts.receiving import ReceivingBytes, receiving_limit
from trio_mapper.engine.fronts.throttle import LogThrottle
from trio_mapper.engine.fronts.unix.peers import PeerCredentials, is_allowed
from trio_mapper.kinds import ErrorKind
from trio_mapper.text import escape_control_characters, shorten

log = logging.getLogger("trio_mapper.http")

#: (method, path) pairs served; everything else is a 404 that lists them.
ENDPOINTS: Final = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
    "/v1/responses": "POST",
    "/v1/moderations": "POST",
    "/v1/images/generations": "POST",
    "/v1/audio/speech": "POST",
    "/v1/models": "GET",
}
#: ``GET /v1/models/{model}`` (the SDK's ``models.retrieve``, a common start-up check): the rest of the path is
#: the model id, slashes included (``meta-llama/Llama-3.1-8B-Instruct``, which the SDK sends as ``%2F``).
MODEL_PREFIX: Final = "/v1/models/"
#: Characters a model id keeps as they are in the upstream path; the rest are percent-encoded as the SDK does.
_MODEL_ID_SAFE: Final = "-._~:"
#: Client headers offered to the core for forwarding (the upstream client filters them again).
FORWARDED: Final = ("openai-beta",)
#: Upstream reply headers passed back to clients. The upstream's x-ratelimit-* stay in the engine: replies
#: carry the engine's own (its budget for the model, which every client shares), from ``budget_headers``.
UPSTREAM_REPLY_HEADERS: Final = ("x-request-id", "openai-processing-ms", "openai-model", "openai-version")
#: The request header that asks for a lower priority class (``batch``); a tenant's class is its ceiling.
PRIORITY_HEADER: Final = "x-trio-mapper-priority"
#: Seconds taken off the SDK's read timeout (x-stainless-read-timeout) so the engine answers first.
READ_TIMEOUT_MARGIN: Final = 1.0
#: Where the official SDKs say how long they wait, in order of preference: the Python SDK's read timeout, else
#: the timeout the SDKs for other languages send (truncated to whole seconds, so "0" below one second).
SDK_TIMEOUT_HEADERS: Final = ("x-stainless-read-timeout", "x-stainless-timeout")
#: Scope state keys the server sets per connection.
TRANSPORT: Final = "trio_mapper.transport"
PEER: Final = "trio_mapper.peer"
#: Called when a request on a TCP connection carried a valid client key (`TcpGate.prove`).
KEY_ACCEPTED: Final = "trio_mapper.key_accepted"

#: Chunks relayed but not yet written beyond which the core's relay waits: a few smooth out scheduling; more
#: would only hide a slow client from the upstream (whose stream is then read at the client's pace).
MAX_BUFFERED_CHUNKS: Final = 16
#: How long a client has to send a request's whole body (as the msgpack socket allows for a frame).
BODY_TIMEOUT: Final = 60.0

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_EVENT_STREAM: Final = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE: Final = b"data: [DONE]\n\n"


#: An operational route's answer: status, content type, body.
OperationReply = tuple[int, str, bytes]


@attrs.frozen
class Operation:
    """A GET route for operators (metrics, health checks), answered by what the daemon injects: the front serves
    it without knowing what it is. Not an API request: never given to the scheduler, not counted in ``requests``.
    """

    respond: Callable[[], Awaitable[OperationReply]]
    #: Served over TCP without a client key: only for answers that reveal nothing (health checks). Over the Unix
    #: socket the uid/gid allow-lists apply to every route alike.
    keyless: bool = False
    #: Reply headers besides the content type: a static file may be cached, a status page sets its policies.
    headers: tuple[tuple[str, str], ...] = (("cache-control", "no-store"),)
    #: Named in the 404 that lists what is served (static files are not: the page names them).
    listed: bool = True


class Intake(Protocol):
    """What the front needs of the scheduler: hand a request in, withdraw it."""

    async def intake(self, owner: ReplySink, request_id: Hashable, spec: RequestSpec, *, size_bytes: int) -> None: ...

    def cancel(self, owner: ReplySink, request_id: Hashable) -> bool: ...


@attrs.define
class HttpStats:
    requests: int = 0
    unauthorized: int = 0
    not_found: int = 0
    #: Requests the SDK sent again (``x-stainless-retry-count`` > 0): retries the engine could not spare it.
    sdk_retries: int = 0
    disconnected: int = 0


class _Refusal(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        param: str | None = None,
        *,
        retry_after: int | None = None,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        #: None: final (x-should-retry: false); seconds: the same request may succeed after them.
        self.retry_after = retry_after
        #: Any other header the status calls for (a 405's ``Allow``, a 401's ``WWW-Authenticate``…).
        self.extra_headers = list(extra_headers)

    @classmethod
    def wrong_method(cls, path: str, method: str, allowed: str) -> _Refusal:
        return cls(
            405,
            f"{path} takes {allowed.replace(', ', ' or ')}, not {method}",
            "invalid_request_error",
            "method_not_allowed",
            # RFC 9110 requires it on a 405: the methods the path takes.
            extra_headers=[(b"allow", allowed.encode())],
        )

    def headers(self) -> Headers:
        return retry_headers(self.retry_after) + self.extra_headers


@attrs.frozen
class _Caller:
    """Who sent an HTTP request, as the core needs to know it."""

    #: Fairness between clients is by this key.
    client_key: Hashable
    #: Stable name for statistics and metrics.
    identity: str
    label: str
    client: ClientIdentity


class _RequestSink:
    """One HTTP request's `ReplySink`: its events, in order, for the handler task that writes the reply."""

    def __init__(self, caller: _Caller) -> None:
        self._caller = caller
        # Unbounded so that `report` never blocks; `relay` keeps the chunks in it few.
        self._events, self._pending = trio.open_memory_channel[Outcome | Chunk](math.inf)
        self._taken = trio.Event()
        #: The final event came: what is written from here on is the reply's end.
        self.answered = False

    @property
    def client_key(self) -> Hashable:
        return self._caller.client_key

    @property
    def client(self) -> ClientIdentity:
        return self._caller.client

    @property
    def identity(self) -> str:
        return self._caller.identity

    @property
    def label(self) -> str:
        return self._caller.label

    def report(self, request_id: Hashable | None, event: Outcome) -> None:
        self._events.send_nowait(event)

    async def relay(self, request_id: Hashable, chunk: Chunk) -> None:
        self._events.send_nowait(chunk)
        while self._events.statistics().current_buffer_used > MAX_BUFFERED_CHUNKS:
            self._taken = trio.Event()
            await self._taken.wait()

    async def next_events(self) -> list[Outcome | Chunk]:
        """The next event and every one already queued behind it, so that chunks the upstream sent together
        go out in one write."""
        events = [await self._pending.receive()]
        while True:
            try:
                events.append(self._pending.receive_nowait())
            except trio.WouldBlock:
                break
        self._taken.set()
        return events


class OpenAIApp:
    """The ASGI app. ``keys`` and the uid/gid allow-lists may be replaced while serving (SIGHUP)."""

    def __init__(
        self,
        scheduler: Intake,
        *,
        max_body_bytes: int,
        keys: ClientKeys | None = None,
        allowed_uids: list[int] | None = None,
        allowed_gids: list[int] | None = None,
        budget_headers: Callable[[str], Mapping[str, str]] | None = None,
        operations: Mapping[str, Operation] | None = None,
    ) -> None:
        self._scheduler = scheduler
        self.max_body_bytes = max_body_bytes
        self.keys = keys or ClientKeys()
        self.allowed_uids = allowed_uids or []
        self.allowed_gids = allowed_gids or []
        #: ``x-ratelimit-*`` describing the engine's budget for a model (the daemon's view of the ledger).
        self._budget_headers = budget_headers
        #: Operational GET routes by path (``/metrics``, ``/healthz``, ``/readyz``), from the daemon.
        self._operations: Mapping[str, Operation] = operations or {}
        self.stats = HttpStats()
        self._unauthorized = LogThrottle()
        #: Bytes of request bodies received but not yet whole, across all requests: each connection (each
        #: HTTP/2 stream) may hold one body for up to BODY_TIMEOUT, and without a total a few hundred slow
        #: uploads held gigabytes.
        self.receiving = ReceivingBytes(receiving_limit(max_body_bytes))
        #: Requests between their first byte and their reply's last.
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._ids = itertools.count(1)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            return await _refuse_websocket(scope, receive, send)
        if scope["type"] != "http":
            return  # no lifespan
        self.active += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        started = False

        async def send_noting_start(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._handle(scope, receive, send_noting_start)
        except Exception:
            # A bug must cost this request an OpenAI-shaped 500 (when its reply has not begun), never the
            # server's bare one or the connection.
            log.exception("internal error while answering %s %s", scope["method"], shorten(scope["path"], 200))
            if not started:
                message = "the engine failed on this request (a bug, logged by the engine); please report it"
                await _reply(send, 500, retry_headers(None), error_body(message, "server_error", "internal_error"))
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request is between its first byte and its reply's last."""
        await self._idle.wait()

    async def _handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        operation = self._operations.get(scope["path"])
        if operation is not None and not scope.get("query_string"):
            return await self._operate(scope, operation, send)
        self.stats.requests += 1
        if operation is not None:
            # Before any key check: a probe's /healthz?x=1 is a 404 saying why, over TCP as over the socket.
            self.stats.not_found += 1
            return await _reply(send, 404, retry_headers(None), error_body(*_no_query_string(scope["path"])))
        headers = _headers(scope)
        try:
            if int(headers.get("x-stainless-retry-count", "0")) > 0:
                self.stats.sdk_retries += 1
        except ValueError:
            pass
        try:
            caller = self._identify(scope, headers)
            spec, size = await self._request(scope, headers, receive, caller.identity)
        except _Disconnected:
            self.stats.disconnected += 1
            return
        except _Refusal as refusal:
            return await _reply(
                send,
                refusal.status,
                refusal.headers(),
                error_body(refusal.message, refusal.type, refusal.code, refusal.param),
            )
        sink = _RequestSink(caller)
        request_id = next(self._ids)
        try:
            await self._scheduler.intake(sink, request_id, spec, size_bytes=size)
        except Exception:
            # A bug must cost this request an OpenAI-shaped 500, like any other internal error.
            log.exception("%s: internal error while accepting a request", caller.label)
            sink.report(
                request_id,
                Failed(
                    kind=ErrorKind.INTERNAL_ERROR,
                    message="the engine failed to accept this request (a bug, logged by the engine); please report it",
                ),
            )
        finally:
            # Held until the core has the request: decoded and waiting for the token-counting thread, a body
            # takes many times its size (a reviewer's 25 bodies at once peaked at 1.27 GiB).
            self.receiving.release(size, caller.identity)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cancel_on_disconnect, receive, sink, request_id, nursery.cancel_scope)
            await self._respond(send, sink, spec)
            nursery.cancel_scope.cancel()

    async def _operate(self, scope: dict[str, Any], operation: Operation, send: Send) -> None:
        """An operator's GET (or HEAD, which monitors use: hypercorn leaves the body out): the client checked
        like any other (a key over TCP unless the route is keyless), then whatever the route's provider answers."""
        method: str = scope["method"]
        try:
            if method not in {"GET", "HEAD"}:
                raise _Refusal.wrong_method(scope["path"], method, "GET, HEAD")
            if not operation.keyless or (scope.get("state") or {}).get(TRANSPORT) == "unix":
                self._identify(scope, _headers(scope))
            status, content_type, body = await operation.respond()
        except _Refusal as refusal:
            return await _reply(
                send, refusal.status, refusal.headers(), error_body(refusal.message, refusal.type, refusal.code)
            )
        # A provider's bug is the request fence's (`__call__`): an OpenAI-shaped 500, logged.
        headers = [(b"content-type", content_type.encode())]
        headers += [(name.encode(), value.encode()) for name, value in operation.headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _cancel_on_disconnect(
        self, receive: Receive, sink: _RequestSink, request_id: Hashable, reply: trio.CancelScope
    ) -> None:
        """The client went away: withdraw its request (a stream's upstream connection closes at once) and stop
        writing its reply, since nobody is left to read it."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if sink.answered:
            return  # hypercorn reports the end of every exchange as a disconnect, once the reply is out
        self.stats.disconnected += 1
        reply.cancel()  # first, so that the `cancelled` reported next is never written
        self._scheduler.cancel(sink, request_id)

    async def _respond(self, send: Send, sink: _RequestSink, spec: RequestSpec) -> None:
        """Write the request's events as its reply: whole when it is, event by event when it streams."""
        model = spec.body.get("model")
        # Read when the reply's head goes out, not now: by then this request is charged, as OpenAI's are.
        model_name = model if isinstance(model, str) else ""
        streaming = False
        relayed = 0
        final: Finished | Failed | None = None
        while final is None:
            events: list[bytes] = []  # chunks that arrived together: one write
            for event in await sink.next_events():
                match event:
                    case Started(streaming=True):
                        streaming = True
                        engine = _engine_headers(event.queued, event.attempts)
                        budget = self._budget_list(model_name)
                        headers = _EVENT_STREAM + _upstream_headers(event.headers) + budget + engine
                        await send({"type": "http.response.start", "status": event.status, "headers": headers})
                    case Chunk() if streaming:
                        relayed += 1
                        events.append(_sse(event))
                    case Finished() | Failed():
                        final = event
            if events and final is None:
                await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
        sink.answered = True
        if not streaming:
            return await self._render(send, final, self._budget_list(model_name), spec)
        responses_api = spec.endpoint == "/v1/responses"
        if isinstance(final, Failed):
            # An upstream's error event ended the stream: the client has it, and the SDK raised at it.
            tail = (
                b""
                if final.error_relayed
                else stream_error_event(final, responses_api=responses_api, sequence_number=relayed)
            )
        else:
            tail = b"" if responses_api else _DONE  # the Responses API sends no [DONE]
        await send({"type": "http.response.body", "body": b"".join(events) + tail, "more_body": False})

    def _budget_list(self, model: str) -> Headers:
        budget = self._budget_headers(model) if self._budget_headers is not None else {}
        return [(name.encode(), value.encode()) for name, value in budget.items()]

    def _identify(self, scope: dict[str, Any], headers: Mapping[str, str]) -> _Caller:
        """Who is asking; refuses clients that may not use the engine."""
        state = scope.get("state") or {}
        if state.get(TRANSPORT) == "unix":
            peer: PeerCredentials | None = state.get(PEER)
            if not is_allowed(peer, self.allowed_uids, self.allowed_gids):
                raise _Refusal(
                    403,
                    "this client's uid/gid is not in the engine's allowed_uids/allowed_gids; ask the operator",
                    "permission_denied",
                    "forbidden",
                )
            who = f"uid {peer.uid}" if peer is not None else "unknown peer"
            client = (
                ClientIdentity(uid=peer.uid, gid=peer.gid, groups=peer.groups) if peer is not None else ClientIdentity()
            )
            # Turns go by process, as they go by connection on the msgpack socket: an SDK's pooled connections
            # come and go, and two scripts of one user are two clients. Statistics name the uid.
            turns = ("http", peer.uid, peer.pid) if peer is not None else ("http", who)
            return _Caller(turns, who, f"http {peer.label if peer is not None else who}", client)
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        name = self.keys.identify(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
        # `headers` keeps the last of repeated ones: with two, a right key after a wrong one would let it in, and
        # one before it be refused as missing, when nothing says which the client meant.
        repeated = sum(field == b"authorization" for field, _ in scope["headers"]) > 1
        if name is None or repeated:
            self.stats.unauthorized += 1
            # Anyone may knock on the port: one line per interval, not one per request, or the log floods.
            if (count := self._unauthorized.count()) is not None:
                log.info(
                    "http: refused %d request(s) without a valid client key (%d in all)",
                    count,
                    self.stats.unauthorized,
                )
            raise _Refusal(
                401,
                f"{'more than one Authorization header' if repeated else 'missing or unknown client key'}: send one "
                "Authorization: Bearer <key> header with a key from the engine's keys file (over the Unix socket no "
                "key is needed)",
                "invalid_request_error",
                "invalid_api_key",
                # RFC 9110 requires it on a 401: the scheme the key goes in (clients that ask first read it).
                extra_headers=[(b"www-authenticate", b'Bearer realm="trio-mapper"')],
            )
        if (key_accepted := state.get(KEY_ACCEPTED)) is not None:
            key_accepted()
        return _Caller(("http key", name), f"key {name}", f"http key {name!r}", ClientIdentity(key=name))

    async def _request(
        self, scope: dict[str, Any], headers: Mapping[str, str], receive: Receive, client: str
    ) -> tuple[RequestSpec, int]:
        path: str = scope["path"]
        method: str = scope["method"]
        expected = ENDPOINTS.get(path)
        model_name = path.removeprefix(MODEL_PREFIX) if path.startswith(MODEL_PREFIX) else ""
        if expected is None and model_name:
            expected = "GET"  # the core checks the id as it checks every endpoint (no climbing out of models/)
        if scope.get("query_string") and expected is not None:
            self.stats.not_found += 1
            raise _Refusal(404, *_no_query_string(path))
        if expected is None:
            self.stats.not_found += 1
            listed = [f"GET {p}" for p, operation in self._operations.items() if operation.listed]
            served = ", ".join([*(f"{m} {p}" for p, m in ENDPOINTS.items()), f"GET {MODEL_PREFIX}{{model}}", *listed])
            versioned = "/v1" + path
            hint = (
                f" (did you mean {versioned}? A base URL for this engine ends in /v1)"
                if versioned in ENDPOINTS or versioned.startswith(MODEL_PREFIX)
                else ""
            )
            raise _Refusal(
                404,
                f"{method} {shorten(escape_control_characters(path), 200)} is not served by this engine{hint}; "
                f"it serves {served}",
                "invalid_request_error",
                "unknown_url",
            )
        if method != expected:
            raise _Refusal.wrong_method(path, method, expected)
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding not in {"", "identity"}:
            raise _Refusal(
                415,
                f"the engine does not decode Content-Encoding: {shorten(escape_control_characters(encoding), 40)}; "
                "send the body uncompressed",
                "invalid_request_error",
                "unsupported_content_encoding",
                # RFC 7694: a client that compresses its requests learns from it to send them plain.
                extra_headers=[(b"accept-encoding", b"identity")],
            )
        raw = await self._read_body(receive, client)
        try:
            body = _decoded_body(raw) if expected == "POST" else {}
        except BaseException:
            self.receiving.release(len(raw), client)
            raise
        sdk_timeout = _sdk_timeout(headers)
        spec = RequestSpec(
            # ASGI's path is decoded: a model id goes on encoded again, one path segment whatever it holds.
            endpoint=MODEL_PREFIX + quote(model_name, safe=_MODEL_ID_SAFE) if model_name else path,
            body=body,
            method=method,
            # Answer before the SDK gives up, but let an attempt already sent run until it does.
            deadline=max(sdk_timeout - READ_TIMEOUT_MARGIN, sdk_timeout / 2) if sdk_timeout is not None else None,
            patience=sdk_timeout,
            headers={name: headers[name] for name in FORWARDED if name in headers},
            priority=_priority(headers.get(PRIORITY_HEADER)),
        )
        return spec, len(raw)

    async def _read_body(self, receive: Receive, client: str) -> bytes:
        """The whole body, within `BODY_TIMEOUT` in all (a client trickling a byte a minute must not hold a
        connection and its buffer for ever), and within the total of bodies being received at once: its
        bytes stay held against that total until the caller releases them."""
        chunks: list[bytes] = []
        held = 0
        deadline = trio.current_time() + BODY_TIMEOUT
        try:
            while True:
                message = None
                with trio.move_on_at(deadline):
                    message = await receive()
                if message is None:
                    raise _Refusal(
                        408,
                        f"the client took longer than {BODY_TIMEOUT:.0f}s to send the request body",
                        "invalid_request_error",
                        "request_timeout",
                    )
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunk = message.get("body", b"")
                if held + len(chunk) > self.max_body_bytes:
                    raise _Refusal(
                        413,
                        f"the body is larger than the engine's limit of {self.max_body_bytes} bytes (max_frame_bytes)",
                        "invalid_request_error",
                        "request_too_large",
                    )
                if not self.receiving.try_hold(len(chunk), client):
                    raise _Refusal(
                        503,
                        f"the engine is receiving {self.receiving.held} bytes of request bodies at once, its "
                        f"most for all clients ({self.receiving.limit}), or {self.receiving.client_limit} for "
                        "one client; retry in a moment",
                        "server_error",
                        "overloaded",
                        retry_after=1,
                    )
                chunks.append(chunk)
                held += len(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)  # still held: the caller lets go once the core has the request
        except BaseException:
            self.receiving.release(held, client)
            raise

    async def _render(self, send: Send, event: Finished | Failed, budget: Headers, spec: RequestSpec) -> None:
        if isinstance(event, Finished):
            headers = _upstream_headers(event.headers) + budget + _engine_headers(event.timings.queued, event.attempts)
            # Speech is audio: its bytes go out as the upstream sent them, under the upstream's type.
            return await _reply(send, event.status, headers, event.body.content, event.body.content_type)
        if event.kind is ErrorKind.TIMEOUT and spec.patience is not None:
            # The SDK user set a timeout, never a deadline: say where the engine's came from. True of both times
            # the message may name: the deadline (the request waited) and the SDK's timeout (it was in flight).
            last_start = spec.deadline if spec.deadline is not None else spec.patience
            explained = (
                f"{event.message}. The engine took its time from the SDK's timeout ({spec.patience:g}s): it starts "
                f"no upstream attempt later than {last_start:.3g}s after the request arrived, so that its answer "
                "reaches the SDK before the SDK gives up, and lets an attempt already sent run until then"
            )
            event = attrs.evolve(event, message=explained)
        status, headers, body = render_failure(event)
        headers = _upstream_headers(event.headers) + budget + headers
        headers.append((b"x-trio-mapper-attempts", str(event.attempts).encode()))
        headers.append((b"x-trio-mapper-error", event.kind.value.encode()))
        await _reply(send, status, headers, body)


class _Disconnected(Exception):
    pass


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """Request headers by lower-case name (the last of repeated ones)."""
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}


def _no_query_string(path: str) -> tuple[str, str, str]:
    """The message, type and code of the 404 for a query string on a path that takes none."""
    return (
        f"{path} takes no query string (the engine passes no query parameters on); send it without the '?' and "
        "what follows",
        "invalid_request_error",
        "unknown_url",
    )


def _decoded_body(raw: bytes) -> dict[str, Any]:
    """A POST's JSON body; refuses what is not a JSON object."""
    if not raw.strip():
        raise _Refusal(
            400,
            "the body is empty; send the request's parameters as a JSON object (application/json)",
            "invalid_request_error",
            "invalid_json",
        )
    try:
        with collector.paused_for(len(raw)):
            body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise _Refusal(400, f"the body is not valid JSON: {exc}", "invalid_request_error", "invalid_json") from None
    except RecursionError:
        raise _Refusal(
            400,
            "the body nests too deeply to decode; JSON request bodies nest a few levels",
            "invalid_request_error",
            "invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise _Refusal(400, "the body must be a JSON object", "invalid_request_error", "invalid_body")
    return body


def _priority(value: str | None) -> str | None:
    """The class a priority header names, as spelled in the config (a header's value, unlike the msgpack
    protocol's field, is typed by hand: ``Batch`` means ``batch``)."""
    return value.strip().lower() if value is not None else None


def _sdk_timeout(headers: Mapping[str, str]) -> float | None:
    """The SDK's timeout: how long it waits for the reply to begin. The Python SDK sends its read timeout; the
    official SDKs for other languages (openai-node, openai-go) send ``x-stainless-timeout``, their timeout in
    whole seconds, which openai-node applies until the reply's head arrives and openai-go to the whole call."""
    for name in SDK_TIMEOUT_HEADERS:
        try:
            timeout = float(headers[name])
        except (KeyError, ValueError):
            continue
        if timeout > 0 and math.isfinite(timeout):
            return timeout
    return None


def _engine_headers(queued: float, attempts: int) -> Headers:
    """The engine's own reply headers: its queue time and its upstream attempts."""
    return [
        (b"x-trio-mapper-queued-ms", str(round(queued * 1000)).encode()),
        (b"x-trio-mapper-attempts", str(attempts).encode()),
    ]


def _sse(chunk: Chunk) -> bytes:
    """One server-sent event; data spanning lines becomes one ``data:`` line each, as the format requires."""
    name = f"event: {chunk.event}\n" if chunk.event else ""
    lines = "".join(f"data: {line}\n" for line in chunk.data.split("\n"))
    return f"{name}{lines}\n".encode()


def _upstream_headers(headers: Mapping[str, str]) -> Headers:
    return [
        (name.encode(), headers[name].encode("latin-1", "replace"))
        for name in UPSTREAM_REPLY_HEADERS
        if name in headers
    ]


async def _refuse_websocket(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """A WebSocket handshake (the Realtime API's) is answered like any path the engine does not serve: a 404 in
    OpenAI's shape, where the server can send one; a refused handshake (403) where it cannot."""
    await receive()  # websocket.connect
    if "websocket.http.response" not in scope.get("extensions", {}):
        return await send({"type": "websocket.close", "code": 1008})
    message = (
        f"{shorten(escape_control_characters(scope['path']), 200)}: WebSocket (the Realtime API) is not served by "
        "this engine; it serves the HTTP endpoints listed at any unknown path"
    )
    body = error_body(message, "invalid_request_error", "unknown_url")
    headers = [*body_headers(body), *retry_headers(None)]
    await send({"type": "websocket.http.response.start", "status": 404, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


async def _reply(send: Send, status: int, headers: Headers, body: bytes, content_type: str | None = None) -> None:
    """Send a whole reply: JSON unless the upstream's body had another ``content_type``."""
    head = body_headers(body) if content_type is None else body_headers(body, content_type.encode("latin-1", "replace"))
    await send({"type": "http.response.start", "status": status, "headers": [*head, *headers]})
    await send({"type": "http.response.body", "body": body})
