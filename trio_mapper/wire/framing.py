"""Frames on the byte stream: a 4-byte big-endian length, then one msgpack body; no I/O.

`FrameBuffer` cuts what a transport returned into frame bodies (refusing a length over the limit before
buffering it) and `Codec` turns messages into complete frames and bodies back into messages.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgspec

from trio_mapper import collector
from trio_mapper.wire.messages import (
    Cancel,
    ClientMessage,
    EngineMessage,
    Hello,
    Message,
    Ping,
    RequestId,
    StatsRequest,
    Submit,
)

LENGTH_PREFIX: Final = struct.Struct(">I")
#: Why a frame nested deeper than the decoder's recursion limit (about 1000 levels) was refused.
TOO_DEEP: Final = "the message is nested too deeply (maps and arrays nest at most a few hundred levels)"


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

    def decode(self, payload: bytes | memoryview) -> Any:
        """Decode one frame body.

        Raises:
            msgspec.MsgspecError: malformed, or not a valid message (the text names the field).
            ValueError: invalid UTF-8 in a string, nesting deeper than the decoder allows, and similar
                low-level problems.
        """
        try:
            with collector.paused_for(len(payload)):
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

    def head(self, size: int) -> bytes:
        """The first ``size`` bytes buffered (fewer if fewer are): what a refused prefix was, for a message."""
        return bytes(self._data[:size])

    @property
    def declared_length(self) -> int | None:
        """The length the next frame's prefix declares, once the prefix is in."""
        if len(self._data) < LENGTH_PREFIX.size:
            return None
        (length,) = LENGTH_PREFIX.unpack_from(self._data)
        return int(length)

    def next_frame(self) -> bytes | memoryview | None:
        """The next complete frame body, or None if more bytes are needed. Raises `FrameTooLarge`."""
        if len(self._data) < LENGTH_PREFIX.size:
            return None
        (length,) = LENGTH_PREFIX.unpack_from(self._data)
        if length > self.max_frame_bytes:
            raise FrameTooLarge(length, self.max_frame_bytes)
        end = LENGTH_PREFIX.size + length
        if len(self._data) < end:
            return None
        if end == len(self._data):
            # The frame is all that is buffered (always so for a large one, which arrives alone): hand over
            # the buffer itself. Copying a frame of megabytes holds the event loop for as long as it takes.
            whole, self._data = self._data, bytearray()
            return memoryview(whole)[LENGTH_PREFIX.size :]
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


class _IdOnly(msgspec.Struct):
    id: Any = None


#: Reads a frame's ``id`` and skims the rest without building it: a hostile frame is not decoded twice.
_ID_ONLY: Final = msgspec.msgpack.Decoder(_IdOnly)


def salvage_request_id(payload: bytes | memoryview) -> RequestId | None:
    """The ``id`` of a frame that failed validation, when it has a usable one, so the error can name it."""
    try:
        candidate = _ID_ONLY.decode(payload).id
    except (msgspec.MsgspecError, ValueError, RecursionError):  # ValueError: invalid UTF-8 in a string…
        return None
    if isinstance(candidate, int | str) and not isinstance(candidate, bool):
        return candidate
    return None
