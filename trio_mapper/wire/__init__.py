"""The wire protocol between local clients and the engine: messages and framing, no I/O.

msgspec and the standard library only (plus `trio_mapper.kinds`), because client programs import it. Its
specification is docs/protocol.md. Where the engine's socket is: `trio_mapper.paths`.
"""

from trio_mapper.bodies import decode_body
from trio_mapper.kinds import PRIORITY_CLASSES, ErrorKind
from trio_mapper.wire.framing import (
    CLIENT_MESSAGE_TYPES,
    LENGTH_PREFIX,
    TOO_DEEP,
    Codec,
    FrameBuffer,
    FrameTooLarge,
    client_codec,
    describe_decode_error,
    engine_codec,
    salvage_request_id,
)
from trio_mapper.wire.messages import (
    BODY_FORMATS,
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    ClientMessage,
    EngineMessage,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    RequestId,
    Result,
    Stats,
    StatsRequest,
    Submit,
    Timings,
    Welcome,
)

__all__ = [
    "BODY_FORMATS",
    "CLIENT_MESSAGE_TYPES",
    "DEFAULT_MAX_FRAME_BYTES",
    "LENGTH_PREFIX",
    "PRIORITY_CLASSES",
    "PROTOCOL_MINOR",
    "PROTOCOL_VERSION",
    "TOO_DEEP",
    "Cancel",
    "Chunk",
    "ClientMessage",
    "Codec",
    "EngineMessage",
    "Error",
    "ErrorKind",
    "FrameBuffer",
    "FrameTooLarge",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "RequestId",
    "Result",
    "Stats",
    "StatsRequest",
    "Submit",
    "Timings",
    "Welcome",
    "client_codec",
    "decode_body",
    "describe_decode_error",
    "engine_codec",
    "salvage_request_id",
]
