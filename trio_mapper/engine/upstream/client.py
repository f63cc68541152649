"""The one place that talks HTTP to the upstream API, and the only holder of the key's header.

Endpoints arrive from clients as relative API paths. They are validated here and joined to the configured
base URL the way the official SDK joins paths, and the joined URL is checked to still point at the base
URL's host: whatever a client sends, the key goes nowhere else.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from functools import partial
from typing import Annotated, Any, Final, final
from urllib.parse import unquote

import attrs
import httpx
import msgspec
import trio
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from trio_mapper._version import __version__
from trio_mapper.bodies import decode_body, is_binary_type
from trio_mapper.engine.process.logs import MIN_REDACTED_KEY_CHARS
from trio_mapper.engine.process.settings import OpenAISettings
from trio_mapper.engine.upstream.connections import upstream_transport
from trio_mapper.text import escape_control_characters, shorten

#: An API version segment (``v1``).
_VERSION: Final = re.compile(r"v[0-9]+")
#: A path of plain segments: no scheme, host, query, fragment or backslashes. Percent-escapes pass this pattern
#: but are then allowed in a model id only (`relative_api_path`).
_SEGMENT: Final = r"(?:[A-Za-z0-9._~:\-]|%[0-9A-Fa-f]{2})+"
_SAFE_PATH: Final = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
#: Characters a decoded model id may not hold: a backslash some servers read as a slash, a control character,
#: or a percent sign (no model is named with one; ``%252F..`` would climb at a server that decodes twice).
#: Segments that climb are `_dots_only_segment`'s.
_UNSAFE_MODEL_ID_CHARACTERS: Final = re.compile(r"[\\\x00-\x1f\x7f%]")
#: Headers worth returning to clients. Everything else (cookies, CDN noise) stays in the engine.
USEFUL_HEADERS: Final = frozenset(
    {
        "x-request-id",
        "openai-processing-ms",
        "openai-model",
        "openai-version",
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
    }
)
#: Client request headers passed on to the upstream (lower-case). Everything else a client sends — its own
#: Authorization, Host, hop-by-hop headers, cookies — stays out: the engine sends its own key and host.
FORWARDED_REQUEST_HEADERS: Final = frozenset({"openai-beta"})
ALLOWED_METHODS: Final = frozenset({"POST", "GET"})
#: What a client may POST, as paths after the version: the API's inference endpoints, whose cost is the
#: key's requests and tokens. Nothing else is passed on. It was a list of what to refuse, and reviewers kept
#: finding what it missed: with the engine's key, the rest reads the organisation's files, starts jobs no
#: budget counts, mints credentials that bypass the engine (admin keys, Realtime's and ChatKit's client
#: secrets), or changes and deletes other clients' stored completions and responses (``…/{id}``).
POST_ENDPOINTS: Final = frozenset(
    {
        "chat/completions",
        "completions",
        "embeddings",
        "responses",
        "moderations",
        "images/generations",
        "audio/speech",
    }
)
#: What a client may GET: the model list and one model (``models/{id}``). Elsewhere a GET reads what the key's
#: whole project stored (`store: true` chat completions, responses and their input items): other clients'
#: prompts and answers.
GET_ENDPOINTS: Final = frozenset({"models"})
#: Longest endpoint accepted. API paths are a few dozen characters; httpx refuses URLs beyond 64 KiB.
MAX_ENDPOINT_CHARS: Final = 1024


class InvalidEndpoint(ValueError):
    """The endpoint is not a relative API path; the message says what a valid one looks like."""


class ReplyTooLarge(httpx.DecodingError):
    """The upstream's reply (a whole body, or one event of a stream) is larger, decoded, than the engine holds."""


class SwitchedProtocols(httpx.RemoteProtocolError):
    """The upstream answered 101 Switching Protocols. The engine proposes no upgrade, so h11 (under httpcore)
    refuses it as a protocol error rather than deliver it as a response; raised in that error's place, since
    it is no passing fault of the connection but an upstream that is not an OpenAI-compatible API there."""


#: How h11 refuses a 101 to a request that proposed no upgrade ("Received server _SWITCH_UPGRADE event
#: without a pending proposal"): the name of its state, which its message is built from.
_SWITCH_UPGRADE: Final = "_SWITCH_UPGRADE"


class InvalidHeader(ValueError):
    """A header the engine would pass upstream has a value HTTP cannot carry as it is."""


#: A header value that HTTP/1.1 carries as it is (RFC 9110 field-value: visible ASCII, spaces and tabs).
_HEADER_VALUE: Final = re.compile(r"[\x20-\x7e\t]*")


#: A token count: a negative one (from a broken upstream) would credit the budget, so it is not a usage at all.
TokenCount = Annotated[int, msgspec.Meta(ge=0)]


class UsageFields(msgspec.Struct):
    """A reply's ``usage`` object, as decoded: only the fields the engine reads."""

    prompt_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None
    # The Responses API's names.
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None


@attrs.frozen
class Usage:
    """What the upstream says a reply used; None where it does not say."""

    prompt: int | None
    completion: int | None

    @classmethod
    def of(cls, usage: UsageFields) -> Usage:
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens
        completion = usage.completion_tokens if usage.completion_tokens is not None else usage.output_tokens
        return cls(prompt, completion)


class _UsageOnly(msgspec.Struct):
    usage: UsageFields | None = None


@final
class ReplyBody:
    """An upstream body as received. Decoded only for whoever needs its values: the engine itself reads just
    ``usage`` (a partial decode that skips the rest), and a client that asked for JSON bodies gets the bytes."""

    __slots__ = ("_decoded", "content", "content_type", "encoding")

    def __init__(self, content: bytes, encoding: str | None = None, content_type: str | None = None) -> None:
        self.content = content
        self.encoding = encoding
        #: The upstream's Content-Type when it is not JSON (speech's ``audio/mpeg``, a proxy's ``text/html``);
        #: None for JSON, as nearly every reply is, or when the upstream named none.
        self.content_type = content_type
        self._decoded: Any = _NOT_DECODED

    @property
    def binary(self) -> bool:
        """The body is neither JSON nor text (audio, an image): its bytes are its value."""
        return is_binary_type(self.content_type)

    def __repr__(self) -> str:
        return f"<ReplyBody {len(self.content)} bytes>"

    def decoded(self) -> Any:
        """Decoded JSON when the upstream sent JSON, the bytes of a binary body, else the text; None when empty."""
        if self._decoded is _NOT_DECODED:
            self._decoded = self.content if self.binary else decode_body(self.content, self.encoding)
        return self._decoded

    def usage(self) -> Usage | None:
        """``usage`` (prompt and completion tokens, under either API's names) when the body reports it."""
        if self.binary:
            return None  # audio has no usage, and its bytes may hold anything
        found = _usage_from_the_tail(self.content)
        if found is None:
            try:
                found = msgspec.json.decode(self.content, type=_UsageOnly)
            except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
                return None
        return Usage.of(found.usage) if found.usage is not None else None


def _usage_from_the_tail(content: bytes) -> _UsageOnly | None:
    """The body's ``usage``, read from where its key last appears to the end; None when that is not the
    top-level object's last key(s).

    OpenAI's replies put ``usage`` at the end, after the data: skipping everything before it, even without
    building anything, held the event loop 0.18 s for a 124 MB embeddings batch. ``{`` and the text from the
    key on is valid JSON only if the key is the top-level one (a nested key leaves closing brackets over),
    and ``"usage":`` cannot occur inside a string (its quote would be escaped), unless the quote before it is.
    """
    start = content.rfind(b'"usage":')
    if start <= 0 or content[start - 1 : start] == b"\\":
        return None
    try:
        return msgspec.json.decode(b"{" + content[start:], type=_UsageOnly)
    except (msgspec.DecodeError, RecursionError):
        return None


_NOT_DECODED: Final = object()


@attrs.frozen
class UpstreamReply:
    status: int
    headers: dict[str, str]
    body: ReplyBody
    elapsed: float
    #: The reply was a stream whose events were relayed as they came: the body is empty.
    streamed: bool = False
    #: A relayed stream's usage, from its usage event (the body cannot be asked for it).
    streamed_usage: Usage | None = None
    #: A relayed stream that the upstream ended with an error event (which reached the client): the error, as
    #: `StreamRelay.error` holds it. None for any other reply.
    streamed_error: Any = None
    #: That error event is one the client raises at itself (`StreamRelay.error_shown`).
    streamed_error_shown: bool = False

    def usage(self) -> Usage | None:
        return self.streamed_usage if self.streamed else self.body.usage()


@attrs.frozen
class UpstreamStream:
    """A 2xx reply whose body is a stream of server-sent events, still arriving."""

    status: int
    headers: dict[str, str]
    started: float
    #: Close it (`contextlib.aclosing`) when done, even when not read to the end.
    events: AsyncGenerator[ServerSentEvent]


def relative_api_path(endpoint: str, base_url: httpx.URL) -> str:
    """The endpoint as a path relative to ``base_url``, e.g. ``chat/completions``.

    Both ``/v1/chat/completions`` (the Batch API's spelling) and ``/chat/completions`` (the SDK's) are
    accepted when the base URL ends in ``/v1``.

    Raises:
        InvalidEndpoint: absolute URLs, hosts, schemes, ``..``, queries and other non-path input, and any path
            that is neither in `POST_ENDPOINTS` nor a model (`GET_ENDPOINTS`; the caller checks the method).
    """
    hint = "use a relative API path such as /v1/chat/completions"
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise InvalidEndpoint(f"endpoint is empty; {hint}")
    if "://" in endpoint or endpoint.startswith("//"):
        raise InvalidEndpoint(f"endpoint {endpoint!r} names a host; the engine only calls its own base URL; {hint}")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise InvalidEndpoint(f"endpoint is {len(endpoint)} characters long, over {MAX_ENDPOINT_CHARS}; {hint}")
    path = endpoint.strip().lstrip("/")
    if not _SAFE_PATH.fullmatch(path):
        raise InvalidEndpoint(f"endpoint {endpoint!r} is not a plain path (no query, escapes or spaces); {hint}")
    segments = path.split("/")
    if any(segment in {".", ".."} for segment in segments):
        raise InvalidEndpoint(f"endpoint {endpoint!r} contains '.' or '..' segments; {hint}")
    base_last_segment = base_url.path.rstrip("/").rsplit("/", 1)[-1]
    if base_last_segment and segments[0] == base_last_segment:
        if len(segments) == 1:
            raise InvalidEndpoint(f"endpoint {endpoint!r} names no API resource, only the version; {hint}")
        segments = segments[1:]
    relative = "/".join(segments)
    # Checked without a version segment left in it: a base URL with no version (a server's root) takes
    # /v1/chat/completions whole.
    api = segments[1:] if len(segments) > 1 and _VERSION.fullmatch(segments[0]) else segments
    is_model = api[0] in GET_ENDPOINTS and len(api) <= 2
    one_model = is_model and len(api) == 2
    # Only a model id needs escapes: the names of OpenAI-compatible servers' models hold slashes
    # (meta-llama/Llama-3.1-8B-Instruct), which the SDK's models.retrieve sends as %2F.
    if "%" in path and not (one_model and "%" not in "/".join(segments[:-1])):
        raise InvalidEndpoint(f"endpoint {endpoint!r} is not a plain path (percent-escapes only in a model id); {hint}")
    if one_model:
        _check_model_id(endpoint, api[1], hint)
    if "/".join(api) not in POST_ENDPOINTS and not is_model:
        served = ", ".join(f"/v1/{name}" for name in sorted(POST_ENDPOINTS))
        raise InvalidEndpoint(
            f"endpoint {endpoint!r} is not passed on: the engine serves {served} and GET /v1/models[/{{model}}]. "
            "With its key, other endpoints would reach the organisation's files, jobs, keys or other clients' "
            "stored data outside any budget; call them with a key of your own"
        )
    return relative


def _check_model_id(endpoint: str, model_id: str, hint: str) -> None:
    """Refuse a model id that, decoded, could climb out of ``models/`` at some server.

    Raises:
        InvalidEndpoint: escapes that are not UTF-8, `_UNSAFE_MODEL_ID_CHARACTERS`, a `_dots_only_segment`.
    """
    try:
        decoded = unquote(model_id, errors="strict")
    except UnicodeDecodeError:
        raise InvalidEndpoint(f"endpoint {endpoint!r}: the model id's escapes are not UTF-8; {hint}") from None
    if _UNSAFE_MODEL_ID_CHARACTERS.search(decoded) or _dots_only_segment(decoded):
        raise InvalidEndpoint(
            f"endpoint {endpoint!r}: the model id, decoded, holds empty, '.' or '..' segments (or ones servers read "
            f"as such: '..;', '...', '.. '), backslashes, percent signs or control characters; {hint}"
        )


def _dots_only_segment(model_id: str) -> bool:
    """Whether a segment of the decoded id is one that some server still reads as ``.`` or ``..``: Tomcat and
    Spring drop a segment's ``;`` parameters (``..;``), Windows and IIS trailing dots and spaces (``...``,
    ``.. ``), NFKC-normalising servers fullwidth dots (U+FF0E). Behind a proxy that decodes ``%2F``,
    ``x%2F..%3B%2Ffiles`` would reach ``files``. No model is named with such a segment."""
    normalised = unicodedata.normalize("NFKC", model_id)
    return any(not segment.partition(";")[0].strip().strip(".") for segment in re.split(r"[/\\]", normalised))


def join_url(base_url: httpx.URL, relative_path: str) -> httpx.URL:
    """Join like the SDK (base path + "/" + relative path), then insist the result stays on the base host."""
    joined = base_url.copy_with(path=base_url.path.rstrip("/") + "/" + relative_path)
    if (joined.scheme, joined.host, joined.port) != (base_url.scheme, base_url.host, base_url.port):
        raise InvalidEndpoint(f"endpoint {relative_path!r} would leave the configured base URL")
    return joined


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client headers the upstream may see: the allow-list only, by lower-case name.

    Raises:
        InvalidHeader: an allow-listed header's value is not visible ASCII (and spaces), which HTTP cannot
            carry as it is.
    """
    forwarded = {}
    for name, value in headers.items():
        if name.lower() not in FORWARDED_REQUEST_HEADERS:
            continue
        if not _HEADER_VALUE.fullmatch(value):
            raise InvalidHeader(
                f"header {name} must be visible ASCII characters and spaces (it is passed to the upstream as it "
                f"is); got {shorten(escape_control_characters(repr(value)), 80)}"
            )
        forwarded[name.lower()] = value
    return forwarded


def useful_headers(headers: httpx.Headers, secret: str | None, *, content_type: str | None = None) -> dict[str, str]:
    """The headers worth passing to clients, with the key redacted should the upstream echo it in one.

    ``content_type``: a body's Content-Type when it is not JSON (`_body_type`), passed on as ``content-type`` so
    that clients know the bytes of speech's audio for what they are.
    """
    # One pass: `headers[name]` scans every header again, for each of the dozen names.
    useful = {name: value for name, value in headers.items() if name in USEFUL_HEADERS}
    if content_type is not None:
        useful["content-type"] = content_type
    if secret is not None:
        useful = {name: value.replace(secret, "[REDACTED]") for name, value in useful.items()}
    return useful


#: Keys are not redacted from successful answers below this length, nor from any answer below
#: `MIN_REDACTED_KEY_CHARS`: a real credential is longer (OpenAI's are 50 and more).
MIN_REDACTED_IN_ANSWERS_CHARS: Final = 16

#: Request bodies larger than this go upstream in pieces of this size. Written whole, a body of megabytes
#: is one `send` that copies all of it into the kernel at once (a loopback socket takes it all), holding the
#: event loop, and every other client, for a millisecond or more.
BODY_PIECE_BYTES: Final = 64 * 1024

#: The largest reply body the engine reads, decoded (compressed, a megabyte can be a gigabyte), in bytes: the
#: most a client accepts in one frame (`MAX_REPLY_FRAME_BYTES`), and well above the largest real answers (a
#: batch of embeddings, 124 MB). Without it an upstream sending a body without end, or a gzip bomb, held all
#: of it in memory (600 MB from a 600 KB reply) and the event loop while it was inflated.
MAX_REPLY_BYTES: Final = 512 * 1024 * 1024
#: The largest event of a stream, in characters: a `data:` line without end, or data lines without the blank
#: line that ends their event, would otherwise be held without bound. The largest real events (the Responses
#: API's ``response.completed`` carries the whole response) are far below it.
MAX_EVENT_CHARS: Final = 64 * 1024 * 1024

#: Endpoints `Upstream.resolve` remembers (each at most MAX_ENDPOINT_CHARS long).
RESOLVED_ENDPOINTS: Final = 256
#: The longest a client's patience stretches the read timeout to (the SDK's is 600 s by default): a client
#: saying 1e300 must not let a stalled upstream hold a concurrency slot for ever.
MAX_STRETCHED_READ_TIMEOUT: Final = 3600.0


#: Connections per pool. httpcore scans its whole pool on every request, so one big pool becomes
#: the bottleneck: measured against the simulator (docs/performance.md), one pool of 64 connections served
#: about 200 requests/s where 8 pools of 8 served about 500 (bench/httpx_pools.py).
CONNECTIONS_PER_POOL: Final = 8


TransportFactory = Callable[[], httpx.AsyncBaseTransport]


@attrs.frozen
class Contact:
    """How the upstream last answered, or failed to: the engine's readiness (``/readyz``) is judged from it."""

    #: `trio.current_time()` when the answer (or the failure) came.
    at: float
    #: It answered with an HTTP status, whichever: the network path and a server are there.
    reachable: bool
    #: When it was not: the error's class name (never its message, which names the host).
    detail: str = ""
    #: When it was: the status it answered with (401: it refused the engine's credentials).
    status: int | None = None


@attrs.define
class _Answer:
    """The status of an exchange in progress, once its head is in (`Upstream._noting_contact`)."""

    status: int | None = None


class Upstream:
    """httpx connection pools to the upstream, and the headers every request carries: the key, the agent.

    The engine uses httpx's transport layer directly, not its `httpx.AsyncClient`: what the client layer adds
    is what a proxy for many clients must not do (follow redirects, which could carry the key to another
    host; keep cookies, which would replay one reply's `Set-Cookie` on everyone's requests; read proxies
    from the environment), and skipping it saves about a tenth of a millisecond per request.

    The ``max_connections`` sockets are spread over several small pools; each request goes to the pool with
    the fewest requests in progress, so a pool holding slow completions does not queue requests while
    others sit idle. Use as an async context manager; `send` may be called from many tasks at once.

    Args:
        transport: builds each pool's transport; None is `upstream_transport` (a connection pool each). Tests pass
            an `httpx.MockTransport` factory here.
    """

    def __init__(
        self,
        settings: OpenAISettings,
        *,
        max_connections: int,
        concurrency: int | None = None,
        transport: TransportFactory | None = None,
    ) -> None:
        self.base_url = httpx.URL(settings.base_url)
        headers = {
            "Accept": "*/*",
            "Accept-Encoding": "gzip, deflate",
            "Authorization": f"Bearer {settings.api_key}",
            "User-Agent": f"trio-mapper/{__version__}",
        }
        if settings.organization:
            headers["OpenAI-Organization"] = settings.organization
        if settings.project:
            headers["OpenAI-Project"] = settings.project
        self._headers: Final = headers
        #: The key, to redact should an upstream echo it: as text (headers, events) and as bytes (bodies).
        #: Keys this short are placeholders for servers without auth (vLLM's "EMPTY", "ollama", "x"), and
        #: such text occurs in ordinary answers: rewriting it corrupted replies (base64 embeddings, JSON keys,
        #: words). Short keys are redacted from error answers and headers only, where echoes happen (as in
        #: the logs, `RedactSecrets`); a key too short even for that is not redacted at all.
        key = settings.api_key
        self._secret_text = key if len(key) >= MIN_REDACTED_KEY_CHARS else None
        self._secret = self._secret_text.encode() if self._secret_text is not None else None
        self._redact_answers = len(key) >= MIN_REDACTED_IN_ANSWERS_CHARS
        self._read_timeout: Final = settings.read_timeout
        self._timeouts: Final = httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.write_timeout,
            # Waiting for a pooled connection is bounded by the scheduler's limiter, not by httpx.
            pool=None,
        ).as_dict()
        busy_connections = min(max_connections, concurrency or max_connections)
        pools = max(1, math.ceil(busy_connections / CONNECTIONS_PER_POOL))
        per_pool = max(1, math.ceil(max_connections / pools))
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        if transport is None:
            ssl_context = httpx.create_ssl_context(trust_env=False)
            transport = partial(upstream_transport, limits, ssl_context)
        self._pools: list[httpx.AsyncBaseTransport] = [transport() for _ in range(pools)]
        #: Requests in progress per pool.
        self._in_progress = [0] * pools
        self._resolved: dict[str, tuple[str, httpx.URL]] = {}
        #: The most recent exchange's verdict (None before the first).
        self.last_contact: Contact | None = None

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for pool in self._pools:
                await pool.aclose()

    def url_for(self, endpoint: str) -> httpx.URL:
        return self.resolve(endpoint)[1]

    def resolve(self, endpoint: str) -> tuple[str, httpx.URL]:
        """The endpoint's path relative to the base URL, and the URL it is sent to.

        Remembered per endpoint (a few distinct ones carry nearly all traffic, and building an `httpx.URL`
        costs more than the rest of a request's checks); only endpoints that passed are remembered, and at
        most `RESOLVED_ENDPOINTS` of them.

        Raises:
            InvalidEndpoint: as `relative_api_path` and `join_url`.
        """
        resolved = self._resolved.get(endpoint)
        if resolved is None:
            path = relative_api_path(endpoint, self.base_url)
            resolved = (path, join_url(self.base_url, path))
            if len(self._resolved) >= RESOLVED_ENDPOINTS:
                self._resolved.clear()
            self._resolved[endpoint] = resolved
        return resolved

    async def send(
        self,
        method: str,
        url: httpx.URL,
        body: bytes | None,
        headers: Mapping[str, str] | None = None,
        patience: float | None = None,
    ) -> UpstreamReply:
        """One attempt. Raises httpx's transport and timeout errors for the retry policy to classify.

        Args:
            headers: client headers to pass on; filtered again here, so only the allow-list ever leaves.
            patience: seconds the client waits for this answer. The read timeout stretches to it when longer
                (to `MAX_STRETCHED_READ_TIMEOUT` at most): cut at the read timeout, a slow model's answer would
                be retried from scratch, and paid again.
        """
        started = trio.current_time()
        with self._least_busy_pool() as pool, self._noting_contact() as answer:
            response = await self._exchange(pool, method, url, body, headers, patience)
            answer.status = response.status_code
            try:
                content = await _read_bounded(response)
            finally:
                await response.aclose()
        return self._whole_reply(response, content, started)

    @asynccontextmanager
    async def open_stream(
        self,
        method: str,
        url: httpx.URL,
        body: bytes | None,
        headers: Mapping[str, str] | None = None,
        patience: float | None = None,
    ) -> AsyncIterator[UpstreamReply | UpstreamStream]:
        """One attempt whose reply may stream: an `UpstreamStream` for a 2xx event stream, read event by event
        while the context is open; anything else (an error, a 2xx that does not stream) read whole, as `send`
        does. Leaving the context closes the upstream connection, so a client that goes away mid-stream stops
        the upstream's generation at once.
        """
        started = trio.current_time()
        with self._least_busy_pool() as pool:
            with self._noting_contact() as answer:
                response = await self._exchange(pool, method, url, body, headers, patience)
                answer.status = response.status_code
            try:
                content_type = response.headers.get("content-type", "").partition(";")[0].strip()
                if not (200 <= response.status_code < 300 and content_type == "text/event-stream"):
                    content = await _read_bounded(response)
                    yield self._whole_reply(response, content, started)
                    return
                events = _bounded_events(response)
                yield UpstreamStream(
                    status=response.status_code,
                    headers=useful_headers(response.headers, self._secret_text),
                    started=started,
                    events=self._redacted(events) if self._redact_answers else events,
                )
            finally:
                await response.aclose()

    async def _exchange(
        self,
        pool: httpx.AsyncBaseTransport,
        method: str,
        url: httpx.URL,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        patience: float | None,
    ) -> httpx.Response:
        """Send the request; the reply's head is in, its body still to read (or close)."""
        timeouts = self._timeouts
        if patience is not None and patience > self._read_timeout:
            timeouts = {**timeouts, "read": max(self._read_timeout, min(patience, MAX_STRETCHED_READ_TIMEOUT))}
        request = httpx.Request(
            method,
            url,
            headers={**self._headers, **_request_headers(headers, body)},
            content=_content(body),
            extensions={"timeout": timeouts},
        )
        try:
            response = await pool.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request  # as httpx's client does: its message and its handlers may ask
            if isinstance(exc, httpx.RemoteProtocolError) and _SWITCH_UPGRADE in str(exc):
                raise SwitchedProtocols("the upstream answered 101 Switching Protocols", request=request) from exc
            raise
        response.request = request
        return response

    async def _redacted(self, events: AsyncGenerator[ServerSentEvent]) -> AsyncGenerator[ServerSentEvent]:
        secret = self._secret_text
        assert secret is not None  # `_redact_answers` implies it
        async with aclosing(events):
            async for event in events:
                if secret in event.data or secret in event.event:
                    event = ServerSentEvent(
                        event.event.replace(secret, "[REDACTED]"), event.data.replace(secret, "[REDACTED]"), event.id
                    )
                elif _JSON_ESCAPE in event.data:
                    redacted = _redacted_text(event.data.encode(), None, secret)
                    if redacted is not None:
                        event = ServerSentEvent(event.event, redacted.decode(), event.id)
                yield event

    @contextmanager
    def _noting_contact(self) -> Iterator[_Answer]:
        """Record whether the upstream answered, and with which status (the caller notes it in the `_Answer`).
        Only a failure to connect or a timeout says it is unreachable: a reset or a malformed reply came from
        a server that is there, and the retry policy deals with it."""
        answer = _Answer()
        try:
            yield answer
        except (httpx.ConnectError, httpx.TimeoutException) as exc:
            self.last_contact = Contact(trio.current_time(), reachable=False, detail=type(exc).__name__)
            raise
        self.last_contact = Contact(trio.current_time(), reachable=True, status=answer.status)

    @contextmanager
    def _least_busy_pool(self) -> Iterator[httpx.AsyncBaseTransport]:
        """The pool with the fewest requests in progress, counted as busy for as long as it is used."""
        pool = min(range(len(self._pools)), key=self._in_progress.__getitem__)
        self._in_progress[pool] += 1
        try:
            yield self._pools[pool]
        finally:
            self._in_progress[pool] -= 1

    def _whole_reply(self, response: httpx.Response, content: bytes, started: float) -> UpstreamReply:
        content_type, encoding = _body_type(response)
        secret = self._secret
        if secret is not None and (response.status_code >= 400 or self._redact_answers) and secret in content:
            # Some OpenAI-compatible servers echo the key in a 401 body; it must not reach clients.
            content = content.replace(secret, b"[REDACTED]")
        elif secret is not None and (
            response.status_code >= 400 or (self._redact_answers and _has_json_escapes(content))
        ):
            # Echoed otherwise than byte for byte (JSON escapes such as \u0073k-…, another charset), the key
            # would reach the client once its body is decoded: look in the decoded text, and send that. In a
            # success, only JSON's \u escapes can disguise it, and only they cost decoding the body.
            redacted = _redacted_text(content, encoding, secret.decode())
            if redacted is not None:
                content, encoding = redacted, None
        headers = useful_headers(response.headers, self._secret_text, content_type=content_type)
        return UpstreamReply(
            status=response.status_code,
            headers=headers,
            body=ReplyBody(content, encoding, headers.get("content-type")),
            elapsed=trio.current_time() - started,
        )


async def _read_bounded(response: httpx.Response) -> bytes:
    """The reply's body, decoded, as `httpx.Response.aread` reads it, but never more than `MAX_REPLY_BYTES`.

    Raises:
        ReplyTooLarge: the body (its length as announced, or as read) is larger.
    """
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_REPLY_BYTES and "content-encoding" not in response.headers:
        raise ReplyTooLarge(_too_large(f"announced {announced} bytes"), request=response.request)
    pieces = []
    size = 0
    async for piece in response.aiter_bytes():
        size += len(piece)
        if size > MAX_REPLY_BYTES:
            raise ReplyTooLarge(_too_large(f"over {MAX_REPLY_BYTES} bytes once decoded"), request=response.request)
        pieces.append(piece)
    return b"".join(pieces)


def _too_large(what: str) -> str:
    return f"the upstream's reply is too large: {what}, beyond the engine's limit of {MAX_REPLY_BYTES} bytes"


async def _bounded_events(response: httpx.Response) -> AsyncGenerator[ServerSentEvent]:
    """The reply's server-sent events as httpx-sse reads them, each at most `MAX_EVENT_CHARS` long, with at
    most the request's read timeout between two of them.

    The read timeout alone bounds the wait for bytes, and keep-alive comments (``: ping``) are bytes: an
    upstream sending one every few seconds and no event would hold the stream, and its concurrency slot, for
    ever. Time the consumer takes over an event does not count: that is the client's pace, not the upstream's.

    Raises:
        ReplyTooLarge: an event (its lines so far, and the line still being read) is longer.
        httpx.ReadTimeout: no event came for the read timeout, only comments or partial lines.
    """
    lines, events = SSELineDecoder(), SSEDecoder()
    pending = 0  # characters of the event being read, in whole lines
    partial = 0  # characters of the line being read
    read_timeout = response.request.extensions.get("timeout", {}).get("read")
    waiting_since = trio.current_time()
    async for text in response.aiter_text():
        for line in lines.decode(text):
            pending += len(line) + 1
            if (event := events.decode(line)) is not None:
                pending = 0
                yield event
                waiting_since = trio.current_time()
        end = max(text.rfind("\n"), text.rfind("\r"))
        partial = partial + len(text) if end < 0 else len(text) - end - 1
        if pending + partial > MAX_EVENT_CHARS:
            raise ReplyTooLarge(
                f"an event of the upstream's stream is longer than the engine's limit of {MAX_EVENT_CHARS} characters",
                request=response.request,
            )
        if read_timeout is not None and trio.current_time() - waiting_since > read_timeout:
            raise httpx.ReadTimeout(
                f"the upstream's stream sent no event for {read_timeout:.0f}s (the read timeout), only keep-alive "
                "comments or part of one",
                request=response.request,
            )
    for line in lines.flush():
        if (event := events.decode(line)) is not None:
            yield event


#: How JSON can spell a key's characters other than as themselves (``\u0073k-…``).
_JSON_ESCAPE: Final = "\\u"


def _has_json_escapes(content: bytes) -> bool:
    # A backslash first: one byte is looked for at memory speed (7 ms in a 124 MB embeddings reply, which has
    # none), two bytes 20 times slower.
    return b"\\" in content and _JSON_ESCAPE.encode() in content


def _redacted_text(content: bytes, encoding: str | None, secret: str) -> bytes | None:
    """A body whose decoded text holds the key, with it redacted, as UTF-8 (JSON re-encoded); None when the
    decoded text does not hold it."""
    try:
        decoded = msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError):
        text = content.decode(encoding or "utf-8", errors="replace")
        return text.replace(secret, "[REDACTED]").encode() if secret in text else None
    reencoded = msgspec.json.encode(decoded)  # UTF-8, escaping only what JSON must
    return reencoded.replace(secret.encode(), b"[REDACTED]") if secret.encode() in reencoded else None


def _body_type(response: httpx.Response) -> tuple[str | None, str | None]:
    """The reply's Content-Type when it is not JSON (audio, an HTML error page), for the fronts to pass on, and
    how to read the body as text should it not be JSON. Both None for JSON, nearly every reply: a JSON body is
    UTF-8 (RFC 8259) whatever its charset says, so the charset is parsed (by httpx, through `email.message`:
    costly for every reply) only for the other kinds."""
    content_type = response.headers.get("content-type")
    if content_type is not None and content_type.startswith("application/json"):
        return None, None
    return content_type, response.encoding


def _request_headers(headers: Mapping[str, str] | None, body: bytes | None) -> dict[str, str]:
    request_headers = forwarded_headers(headers or {})
    if body is not None:
        request_headers["Content-Type"] = "application/json"
        # Stated, so that a body sent in pieces (`_content`) still goes with a length rather than chunked.
        request_headers["Content-Length"] = str(len(body))
    return request_headers


def _content(body: bytes | None) -> bytes | AsyncIterator[bytes] | None:
    """The request body as httpx should send it: whole, or in pieces when it is large."""
    if body is None or len(body) <= BODY_PIECE_BYTES:
        return body
    return _pieces(body)


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    with memoryview(body) as view:
        for start in range(0, len(view), BODY_PIECE_BYTES):
            yield bytes(view[start : start + BODY_PIECE_BYTES])
