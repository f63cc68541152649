"""The wire protocol between local clients and the engine (docs/protocol.md is its specification).

Every frame is a 4-byte big-endian unsigned length followed by that many bytes holding one msgpack map.
The map's ``"type"`` field names the message; the message classes below are the single source of truth for
field names, types and defaults. New fields are only ever added with a default, so an older peer can still
decode newer messages (msgspec ignores unknown fields); incompatible changes bump ``PROTOCOL_VERSION``.

This module is deliberately light (msgspec and the standard library only) because the client helper imports
it: client programs must not need trio or httpx.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgspec

from .kinds import ErrorKind as ErrorKind  # re-exported: the wire carries these values

PROTOCOL_VERSION: Final = 1
#: Frames larger than this are refused unless the engine was configured otherwise; `Welcome` says the value.
DEFAULT_MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
LENGTH_PREFIX: Final = struct.Struct(">I")
#: Why a frame nested deeper than the decoder's recursion limit (about 1000 levels) was refused.
TOO_DEEP: Final = "the message is nested too deeply (maps and arrays nest at most a few hundred levels)"

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


class Stats(Message, tag="stats_reply"):
    id: RequestId
    engine: dict[str, Any] = {}
    lanes: dict[str, dict[str, Any]] = {}


class Pong(Message, tag="pong"):
    id: RequestId


ClientMessage = Hello | Submit | Cancel | StatsRequest | Ping
EngineMessage = Welcome | Result | Error | Stats | Pong


class FrameTooLarge(Exception):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class Codec:
    """Encodes and decodes frames; one instance per direction, reused (msgspec caches per decoder)."""

    def __init__(self, inbound: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(inbound)
        self._buffer = bytearray()

    def encode(self, message: Message) -> bytes:
        """One complete frame: length prefix and body."""
        buffer = bytearray(LENGTH_PREFIX.size)
        self._encoder.encode_into(message, buffer, LENGTH_PREFIX.size)
        LENGTH_PREFIX.pack_into(buffer, 0, len(buffer) - LENGTH_PREFIX.size)
        return bytes(buffer)

    def decode(self, payload: bytes) -> Any:
        """Decode one frame body.

        Raises:
            msgspec.MsgspecError: malformed, or not a valid message (the text names the field).
            ValueError: invalid UTF-8 in a string, nesting deeper than the decoder allows, and similar
                low-level problems.
        """
        try:
            return self._decoder.decode(payload)
        except RecursionError:
            raise ValueError(TOO_DEEP) from None


def engine_codec() -> Codec:
    """The engine's side: decodes client messages, encodes engine messages."""
    return Codec(ClientMessage)


def client_codec() -> Codec:
    """A client's side: decodes engine messages, encodes client messages."""
    return Codec(EngineMessage)


class FrameBuffer:
    """Splits a byte stream into frame bodies; a length above ``max_frame_bytes`` is refused before buffering.

    Feed whatever the transport returned, then call ``next_frame()`` until it returns None.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._data = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._data += data

    @property
    def pending_bytes(self) -> int:
        return len(self._data)

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or None if more bytes are needed. Raises `FrameTooLarge`."""
        if len(self._data) < LENGTH_PREFIX.size:
            return None
        (length,) = LENGTH_PREFIX.unpack_from(self._data)
        if length > self.max_frame_bytes:
            raise FrameTooLarge(length, self.max_frame_bytes)
        end = LENGTH_PREFIX.size + length
        if len(self._data) < end:
            return None
        # One copy through a memoryview (slicing the bytearray first would copy a large frame twice).
        with memoryview(self._data) as view:
            body = bytes(view[LENGTH_PREFIX.size : end])
        del self._data[:end]
        return body


CLIENT_MESSAGE_TYPES: Final = tuple(
    sorted(str(cls.__struct_config__.tag) for cls in (Hello, Submit, Cancel, StatsRequest, Ping))
)


#: Longest decoder message quoted back to a client: msgspec quotes the offending value (a 1 MB bogus
#: ``type`` string would come back whole).
_MAX_DECODE_ERROR_CHARS: Final = 300


def describe_decode_error(exc: Exception) -> str:
    """A one-line, client-facing explanation of why a frame body was rejected."""
    text = str(exc)
    about_type = text.endswith("at `$.type`") or "missing required field `type`" in text
    if len(text) > _MAX_DECODE_ERROR_CHARS:
        text = f"{text[: _MAX_DECODE_ERROR_CHARS - 1]}… ({len(text)} characters)"
    if about_type:
        return f"{text}; the 'type' field must be one of: {', '.join(CLIENT_MESSAGE_TYPES)}"
    return text


def decode_body(content: bytes, encoding: str | None = None) -> Any:
    """An upstream body's value: its JSON decoded, else its text (a proxy's HTML error page, say); None if empty."""
    if not content:
        return None
    try:
        return msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError):
        return content.decode(encoding or "utf-8", errors="replace")


def salvage_request_id(payload: bytes) -> RequestId | None:
    """The ``id`` of a frame that failed validation, when it has a usable one, so the error can name it."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.MsgspecError, ValueError, RecursionError):  # ValueError: invalid UTF-8 in a string…
        return None
    if isinstance(raw, dict):
        candidate = raw.get("id")
        if isinstance(candidate, int | str) and not isinstance(candidate, bool):
            return candidate
    return None
