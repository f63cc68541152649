"""The wire protocol's messages (docs/protocol.md is their specification); no I/O.

Every frame body is one msgpack map whose ``"type"`` field names the message; the classes below are the
single source of truth for field names, types and defaults. New fields are only ever added with a default,
so an older peer can still decode newer messages (msgspec ignores unknown fields); incompatible changes
bump ``PROTOCOL_VERSION``. What a peer may use on top of its version is its minor version, agreed in the
handshake (`PROTOCOL_MINOR`). msgspec and the standard library only: client programs import this.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

PROTOCOL_VERSION: Final = 1
#: Additions within `PROTOCOL_VERSION` that an older peer cannot take unasked (1: streamed replies as `Chunk`
#: frames). The client offers its minor in `Hello`, the engine answers the lower of the two in `Welcome`, and
#: neither side sends what the agreed minor lacks: a minor-0 client never receives a frame it cannot route.
PROTOCOL_MINOR: Final = 1
#: Frames larger than this are refused unless the engine was configured otherwise; `Welcome` says the value.
DEFAULT_MAX_FRAME_BYTES: Final = 4 * 1024 * 1024

RequestId = int | str


class Message(msgspec.Struct, tag_field="type"):
    """Base of every protocol message; the subclass's ``tag`` is the value of the ``"type"`` field."""


# --- client → engine -------------------------------------------------------------------------------------


#: How upstream bodies travel in `Result.body` and `Error.body`. "msgpack": decoded, as msgpack values (the
#: default, what every client understands). "json": the upstream's bytes as they came, in a msgpack bin — the
#: engine then spends no CPU re-encoding a large reply (embeddings), and the client decodes it (`decode_body`).
BODY_FORMATS: Final = ("msgpack", "json")


class Hello(Message, tag="hello"):
    """First frame of every connection: the protocol version the client speaks."""

    protocol: int
    client: str = ""
    #: One of `BODY_FORMATS`; `Welcome.body_format` says what the engine will send.
    body_format: str = "msgpack"
    #: The highest `PROTOCOL_MINOR` the client understands; a client that predates the field offers 0.
    minor: int = 0


class Submit(Message, tag="submit"):
    """Send one API request through the engine."""

    id: RequestId
    #: A relative API path such as ``/v1/chat/completions`` or ``chat/completions``; joined to the engine's
    #: base URL. Absolute URLs, hosts, schemes, ``..`` and query strings are refused.
    endpoint: str
    #: The JSON request body; a GET may leave it out (it sends none).
    body: dict[str, Any] = msgspec.field(default_factory=dict)
    #: ``POST`` or ``GET``, in any case.
    method: str = "POST"
    #: Seconds from the moment the engine reads this frame; past it the request is answered with ``timeout``.
    deadline: float | None = None
    #: Upstream attempts at most, retries included; ``None`` uses the engine's default.
    max_attempts: int | None = None
    #: The priority class to queue it in, one of `PRIORITY_CLASSES`; ``None``: the class of the client's tenant.
    #: A client may ask for a lower class than its tenant's, never a higher one (the engine takes the lower).
    priority: str | None = None


class Cancel(Message, tag="cancel"):
    """Withdraw a submitted request; it is answered with ``cancelled`` unless it already finished."""

    id: RequestId


class StatsRequest(Message, tag="stats"):
    """Ask for the engine's counters."""

    id: RequestId


class Ping(Message, tag="ping"):
    id: RequestId


# --- engine → client -------------------------------------------------------------------------------------


class Welcome(Message, tag="welcome"):
    protocol: int
    server: str
    max_frame_bytes: int
    #: The body format the engine uses on this connection (an engine that predates the field sends none:
    #: the default, "msgpack").
    body_format: str = "msgpack"
    #: The minor version this connection uses: the lower of the client's and the engine's (an engine that
    #: predates the field sends none: 0, no streaming).
    minor: int = 0


class Timings(msgspec.Struct):
    """Seconds spent in each phase of a request, measured by the engine."""

    queued: float = 0.0
    upstream: float = 0.0
    total: float = 0.0


class Result(Message, tag="result"):
    """The upstream's final successful (2xx) reply to a submitted request."""

    id: RequestId
    status: int
    #: The upstream's JSON body, decoded (a string when the upstream did not send JSON).
    body: Any
    #: Useful upstream headers: ``x-request-id``, ``openai-processing-ms``, ``x-ratelimit-*``.
    headers: dict[str, str] = {}
    attempts: int = 1
    timings: Timings = msgspec.field(default_factory=Timings)
    #: The body went out as `Chunk` frames before this one; ``body`` is then None.
    streamed: bool = False


class Chunk(Message, tag="chunk"):
    """One event of a streamed reply (minor 1). A streamed request's chunks come in order, then its one
    `Result` (``streamed`` true) or `Error`."""

    id: RequestId
    #: The event's data, as `Result.body` travels: its JSON decoded (body format "msgpack"), or its bytes
    #: in a bin (body format "json").
    data: Any
    #: The server-sent event's name: the Responses API names its events, chat and completions do not.
    event: str | None = None


class Error(Message, tag="error"):
    """The final failure of a request, or (with ``id`` null) a problem with the connection's input."""

    id: RequestId | None
    #: An `ErrorKind` value. Typed as str on the wire so that a client decoding a kind added later (within
    #: the same protocol version) still gets the frame instead of a validation error.
    kind: str
    message: str
    status: int | None = None
    body: Any = None
    headers: dict[str, str] = {}
    attempts: int = 0
    #: The request body's field at fault when the engine refused the request itself (``messages[0].content``,
    #: named as OpenAI's error bodies do), else nil.
    param: str | None = None


class Stats(Message, tag="stats_reply"):
    id: RequestId
    engine: dict[str, Any] = {}
    lanes: dict[str, dict[str, Any]] = {}


class Pong(Message, tag="pong"):
    id: RequestId


ClientMessage = Hello | Submit | Cancel | StatsRequest | Ping
EngineMessage = Welcome | Result | Chunk | Error | Stats | Pong
