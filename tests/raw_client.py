"""A deliberately minimal protocol client written from docs/protocol.md alone (no trio_mapper imports).

The end-to-end tests speak to the engine through it, so they check the document as much as the engine.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import trio

PREFIX = struct.Struct(">I")


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self.welcome: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: str, *, hello: bool = True, **hello_fields: Any) -> RawClient:
        """Connected, and (unless ``hello=False``) handshaken with a hello holding ``hello_fields`` too
        (``minor=1`` for streams, ``body_format="json"``); ``welcome`` is the engine's answer."""
        client = cls(await trio.open_unix_socket(path))
        if hello:
            welcome = await client.request({"type": "hello", "protocol": 1, "client": "wire-test", **hello_fields})
            assert welcome["type"] == "welcome", welcome
            client.welcome = welcome
        return client

    async def send(self, message: dict[str, Any]) -> None:
        body = msgspec.msgpack.encode(message)
        await self.stream.send_all(PREFIX.pack(len(body)) + body)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> dict[str, Any]:
        """The next frame, decoded; raises EOFError when the engine closed the connection."""
        while True:
            if len(self._buffer) >= 4:
                (length,) = PREFIX.unpack_from(self._buffer)
                if len(self._buffer) >= 4 + length:
                    body = bytes(self._buffer[4 : 4 + length])
                    del self._buffer[: 4 + length]
                    decoded: dict[str, Any] = msgspec.msgpack.decode(body)
                    return decoded
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the engine closed the connection")
            self._buffer += data

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        return await self.receive()

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def chat(
    request_id: int | str, content: str = "Say hello", *, model: str = "gpt-4o-mini", **extra: Any
) -> dict[str, Any]:
    return {
        "type": "submit",
        "id": request_id,
        "endpoint": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 16},
        **extra,
    }
