"""The simulator as a plain ASGI callable: routing, auth, admission, faults, latency and replies.

Order of decisions for a model request, as on the real API: auth -> parse (400) -> quota -> rate limits
(429, nothing charged) -> charge -> draw a fault (so failures stay charged) -> wait -> answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import msgspec
import trio

from . import errors
from .buckets import RateLimits, Rejection
from .config import SimulatorConfig
from .endpoints import (
    MEDIA_KINDS,
    Kind,
    Plan,
    Reply,
    RequestError,
    plan_request,
    render,
    render_media,
    render_stream,
    structured_reply,
)
from .faults import Dice, Fault
from .stats import Stats
from .tokens import TokenCounter

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

# The API rejects bodies far below this; the cap only bounds the memory one request can take.
MAX_BODY_BYTES = 32 * 1024 * 1024

ROUTES: dict[tuple[str, str], Kind] = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/embeddings"): "embeddings",
    ("POST", "/v1/responses"): "responses",
    ("POST", "/v1/moderations"): "moderations",
    ("POST", "/v1/images/generations"): "images",
    ("POST", "/v1/audio/speech"): "speech",
}
MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-4.1",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
)
# A fixed timestamp keeps /v1/models byte-identical across runs.
_MODELS_CREATED = 1_700_000_000

_JSON = b"application/json"
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class _BodyTooLarge(Exception):
    pass


#: Bodies above this size are counted in a worker thread (tiktoken releases the GIL while it encodes).
LARGE_BODY_BYTES: Final = 64 * 1024


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _pause(seconds: float) -> None:
    # With latency off, skipping the sleep saves a trip through the scheduler on every request; the
    # response sends that follow are checkpoints anyway.
    if seconds > 0.0:
        await trio.sleep(seconds)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            key = key.strip()
            return key if scheme.lower() == "bearer" and key else None
    return None


@final
class SimulatorApp:
    """An OpenAI-compatible ASGI application with simulated rate limits and faults."""

    def __init__(self, config: SimulatorConfig, counter: TokenCounter | None = None) -> None:
        self.config = config
        self.counter = counter if counter is not None else TokenCounter()
        self._counting = trio.CapacityLimiter(1)
        self.limits = RateLimits((config.rpm, config.tpm), config.model_limits, config.quantum)
        self.dice = Dice(config)
        self.stats = Stats()
        models = list(MODELS) + [name for name in config.model_limits if name not in MODELS]
        self._models_body = _encoder.encode({"object": "list", "data": [self._model(name) for name in models]})

    def __repr__(self) -> str:
        return f"<SimulatorApp {self.limits!r} {self.stats!r}>"

    @staticmethod
    def _model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "system"}

    def reset(self) -> None:
        """Zero the stats, refill every bucket and restart the random sequence."""
        self.stats = Stats()
        self.limits.refill_all(trio.current_time())
        self.dice.reseed()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = _Exchange(send, self.dice.hex_id())
        method: str = scope["method"]
        path: str = scope["path"]
        if path.startswith("/_simulator/"):
            # Control traffic is not API traffic: it stays out of the stats it reads.
            await self._control(method, path, exchange)
            return
        self.stats.received()
        kind = ROUTES.get((method, path))
        is_models = method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/"))
        if kind is None and not is_models:
            self.stats.client_error(None)
            await exchange.json(404, errors.not_found(method, path))
            return
        refusal = self._unauthorized(scope)
        if refusal is not None:
            self.stats.client_error(None)
            await exchange.json(401, refusal)
            return
        if kind is None:
            await self._models(path, exchange)
            return
        try:
            raw = await _read_body(receive)
        except _BodyTooLarge:
            self.stats.client_error(None)
            message = f"Request body too large: the limit is {MAX_BODY_BYTES} bytes."
            await exchange.json(413, errors.error_body(message, "invalid_request_error"))
            return
        if raw is None:
            return
        body: Any
        try:
            body = _decoder.decode(raw)
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            self.stats.client_error(None)
            await exchange.json(400, errors.error_body(errors.INVALID_JSON, "invalid_request_error"))
            return
        try:
            if len(raw) < LARGE_BODY_BYTES:
                plan = plan_request(kind, body, self.counter, self.config.default_max_tokens)
            else:
                # A real upstream does not stall its other requests while it counts a large prompt.
                plan = await trio.to_thread.run_sync(
                    plan_request, kind, body, self.counter, self.config.default_max_tokens, limiter=self._counting
                )
        except RequestError as error:
            model = body.get("model")
            self.stats.client_error(model if isinstance(model, str) and model else None)
            await exchange.json(400, errors.error_body(error.message, "invalid_request_error", error.code, error.param))
            return
        await self._model_request(plan, receive, exchange)

    def _unauthorized(self, scope: Scope) -> dict[str, Any] | None:
        """The 401 body for a missing or (when ``api_key`` is set) wrong key; None when the key is fine."""
        key = _bearer(scope)
        if key is None:
            return errors.error_body(errors.NO_API_KEY, "invalid_request_error", "invalid_api_key")
        if self.config.api_key is not None and key != self.config.api_key:
            return errors.invalid_api_key(key)
        return None

    async def _control(self, method: str, path: str, exchange: _Exchange) -> None:
        if method == "GET" and path == "/_simulator/stats":
            await exchange.json(200, self.stats.as_json())
        elif method == "POST" and path == "/_simulator/reset":
            self.reset()
            await exchange.json(200, {"ok": True})
        else:
            await exchange.json(404, errors.not_found(method, path))

    async def _models(self, path: str, exchange: _Exchange) -> None:
        if path == "/v1/models":
            await exchange.send(200, self._models_body, _JSON)
        else:
            # Every model name is served, so every model "exists".
            await exchange.json(200, self._model(path.removeprefix("/v1/models/")))

    async def _model_request(self, plan: Plan, receive: Receive, exchange: _Exchange) -> None:
        model = plan.model
        self.stats.model_seen(model)
        now = trio.current_time()
        if self.config.insufficient_quota:
            self.stats.rate_limited(model, "insufficient_quota")
            exchange.headers = self._ratelimit_headers(self.limits.buckets(model, now).headers())
            await exchange.json(429, errors.insufficient_quota())
            return
        buckets, rejection = self.limits.admit(model, plan.cost, now)
        exchange.headers = self._ratelimit_headers(buckets.headers())
        if rejection is not None:
            await self._reject(model, rejection, exchange)
            return
        self.stats.admitted(model, plan.cost)
        fault = self.dice.fault()
        slow = self.dice.slow()
        replies = [Reply(*self.dice.reply(plan.max_tokens)) for _ in range(plan.replies)]
        if plan.reply_schema is not None:
            replies = [structured_reply(plan, reply, self.counter) for reply in replies]
        ident = self.dice.hex_id()
        if fault is not Fault.NONE and fault is not Fault.RESET:
            await _pause(self.dice.latency(0, slow))
            await self._fail(model, fault, exchange)
            return
        created = int(time.time())
        if plan.stream:
            await self._stream(plan, replies, ident, created, slow, fault, receive, exchange)
            return
        output = sum(reply.tokens for reply in replies)
        if plan.kind in MEDIA_KINDS:
            payload, content_type = render_media(plan, ident, created, self.counter)
        else:
            payload, content_type = render(plan, replies, ident, created), _JSON
        await _pause(self.dice.latency(output, slow))
        if fault is Fault.RESET:
            self.stats.reset(model)
            await exchange.abort(payload, content_type)
            return
        self.stats.ok(model)
        await exchange.send(200, payload, content_type)

    async def _reject(self, model: str, rejection: Rejection, exchange: _Exchange) -> None:
        self.stats.rate_limited(model, rejection.kind)
        if rejection.wait is not None and self.config.retry_after:
            # Rounded up so a client that waits exactly this long finds room.
            millis = max(1, math.ceil(rejection.wait * 1000 - 1e-6))
            exchange.headers += [
                (b"retry-after", str(math.ceil(millis / 1000)).encode()),
                (b"retry-after-ms", str(millis).encode()),
            ]
        await exchange.json(429, errors.rate_limited(model, rejection, name_wait=self.config.retry_after))

    def _ratelimit_headers(self, headers: Headers) -> Headers:
        return headers if self.config.ratelimit_headers else []

    async def _fail(self, model: str, fault: Fault, exchange: _Exchange) -> None:
        if fault is Fault.SERVER_ERROR:
            self.stats.server_error(model, 500)
            await exchange.json(500, errors.server_error())
        elif fault is Fault.OVERLOADED:
            self.stats.server_error(model, 503)
            await exchange.json(503, errors.overloaded())
        else:
            self.stats.server_error(model, 502)
            # The CDN answers, not the API: none of the API's headers.
            exchange.headers = []
            exchange.api_headers = False
            await exchange.send(502, errors.BAD_GATEWAY_HTML, b"text/html")

    async def _stream(
        self,
        plan: Plan,
        replies: list[Reply],
        ident: str,
        created: int,
        slow: bool,
        fault: Fault,
        receive: Receive,
        exchange: _Exchange,
    ) -> None:
        events = list(render_stream(plan, replies, ident, created))
        latency = self.dice.latency(0, slow)
        if fault is Fault.RESET:
            await _pause(latency)
            self.stats.reset(plan.model)
            await exchange.abort(b"".join(event for event, _ in events), b"text/event-stream; charset=utf-8")
            return
        delivered = False
        async with trio.open_nursery() as nursery:
            # Hypercorn accepts (and drops) writes to a connection the client has closed, so the only sign
            # of a client that stopped reading is the disconnect message; without watching for it the
            # pacing would run to the end and the stream would count as delivered.
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await _pause(latency)
            await self._write_stream(events, exchange)
            delivered = True
            nursery.cancel_scope.cancel()
        if delivered:
            self.stats.ok(plan.model)
        else:
            self.stats.closed_by_client(plan.model)

    async def _write_stream(self, events: list[tuple[bytes, int]], exchange: _Exchange) -> None:
        per_token = self.config.per_token_latency_ms / 1000.0
        await exchange.start(200, b"text/event-stream; charset=utf-8", extra=[(b"cache-control", b"no-cache")])
        if per_token <= 0.0:
            # Nothing to pace: one write is much cheaper than one per token.
            await _last_body(exchange, b"".join(event for event, _ in events))
        else:
            for event, tokens in events:
                if tokens:
                    await _pause(per_token * tokens)
                await exchange.body(event, more=True)
            await _last_body(exchange, b"")


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _last_body(exchange: _Exchange, data: bytes) -> None:
    # Finishing the response makes hypercorn post a disconnect of its own before this send returns; the
    # shield keeps the watcher's reaction to it from cancelling the send half-way through hypercorn's
    # connection recycling.
    with trio.CancelScope(shield=True):
        await exchange.body(data, more=False)


@final
class _Exchange:
    """One HTTP response in the making, with the headers every API reply carries."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self._started = trio.current_time()
        self.request_id = request_id
        self.headers: Headers = []
        self.api_headers = True

    def _all_headers(self, content_type: bytes, extra: Headers) -> Headers:
        headers: Headers = [(b"content-type", content_type), *extra]
        if self.api_headers:
            millis = int((trio.current_time() - self._started) * 1000)
            headers += [
                (b"x-request-id", f"req_{self.request_id}".encode()),
                (b"openai-processing-ms", str(millis).encode()),
                (b"openai-organization", errors.ORGANIZATION.encode()),
                (b"openai-version", b"2020-10-01"),
            ]
        return headers + self.headers

    async def start(self, status: int, content_type: bytes, extra: Headers | None = None) -> None:
        headers = self._all_headers(content_type, extra or [])
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def send(self, status: int, payload: bytes, content_type: bytes) -> None:
        await self.start(status, content_type, [(b"content-length", str(len(payload)).encode())])
        await self.body(payload, more=False)

    async def json(self, status: int, payload: Any) -> None:
        await self.send(status, _encoder.encode(payload), _JSON)

    async def abort(self, payload: bytes, content_type: bytes) -> None:
        """Start a 200, send part of the body, then stop.

        Returning from the ASGI app mid-body makes hypercorn close the connection (h11 is still in
        SEND_BODY, so it cannot recycle it): the client sees a truncated body, i.e. a transport error,
        never a clean reply. The length is announced so the truncation is unambiguous.
        """
        await self.start(200, content_type, [(b"content-length", str(len(payload)).encode())])
        await self.body(payload[: len(payload) // 2], more=True)
