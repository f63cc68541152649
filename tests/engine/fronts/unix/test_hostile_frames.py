"""End to end: frames a hostile or broken client sends get a clear error, and the connection lives on."""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec
import pytest
from conftest import running_engine, simulator
from raw_client import RawClient, chat

PREFIX = struct.Struct(">I")


def _frame(body: bytes) -> bytes:
    return PREFIX.pack(len(body)) + body


def _submit_with_raw_body(raw_body: bytes, request_id: int = 1) -> bytes:
    """A submit frame whose body map is given as raw msgpack (for values Python cannot build or encode)."""
    head = msgspec.msgpack.encode({"type": "submit", "id": request_id, "endpoint": "/v1/chat/completions"})
    fields = head[1:]  # a fixmap of 3: drop its header, write one of 4
    return _frame(b"\x84" + fields + msgspec.msgpack.encode("body") + raw_body)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + msgspec.msgpack.encode("x")  # [[[…"x"…]]]


def _body_with(extra_key: str, raw_value: bytes) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    encoded = msgspec.msgpack.encode(body)
    return bytes([encoded[0] + 1]) + encoded[1:] + msgspec.msgpack.encode(extra_key) + raw_value


@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_deep_nesting_is_a_protocol_error_and_the_connection_lives_on(short_tmp: Path, depth: int) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        client = await RawClient.connect(str(engine.socket))
        await client.send_raw(_submit_with_raw_body(_body_with("deep", _nested(depth))))
        error = await client.receive()
        assert error["type"] == "error" and error["kind"] == "protocol_error"
        assert "nested too deeply" in error["message"]
        # Nested in the id, where the engine tries to salvage it for the error.
        ping = msgspec.msgpack.encode({"type": "ping"})
        await client.send_raw(_frame(bytes([ping[0] + 1]) + ping[1:] + msgspec.msgpack.encode("id") + _nested(depth)))
        error = await client.receive()
        assert error["kind"] == "protocol_error" and error["id"] is None
        reply = await client.request(chat(2))
        assert reply["type"] == "result" and reply["id"] == 2
        await client.aclose()


async def test_values_json_cannot_carry_and_oversized_names_are_invalid_requests(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        async with await RawClient.connect(str(engine.socket)) as client:
            ext = msgspec.msgpack.encode(msgspec.msgpack.Ext(5, b"abc"))
            await client.send_raw(_submit_with_raw_body(_body_with("extra", ext), request_id=1))
            error = await client.receive()
            assert (error["id"], error["kind"]) == (1, "invalid_request")
            assert "JSON cannot represent" in error["message"]

            long_endpoint = {**chat(2), "endpoint": "/v1/" + "a" * 100_000}
            error = await client.request(long_endpoint)
            assert (error["id"], error["kind"]) == (2, "invalid_request")

            for i in range(35):
                huge_model = chat(100 + i, model="m" * 4_000_000)
                error = await client.request(huge_model)
                assert (error["id"], error["kind"]) == (100 + i, "invalid_request")
                assert len(error["message"]) < 1000
            error = await client.request({"type": "x" * 1_000_000, "id": 7})
            assert (error["id"], error["kind"]) == (7, "protocol_error")
            assert len(error["message"]) < 1000 and "must be one of" in error["message"]
            await client.send({"type": "stats", "id": "s"})
            stats = await client.receive()
            assert stats["type"] == "stats_reply" and stats["lanes"] == {}
            reply = await client.request(chat(3))
            assert reply["type"] == "result"
        assert max(len(line) for line in engine.log.splitlines()) < 10_000


async def test_a_large_body_keeps_its_place_in_the_connections_order(short_tmp: Path) -> None:
    # The body's tokens are counted in a worker thread; a cancel sent right after it must still find it.
    async with simulator(latency_ms=2000.0) as url, running_engine(short_tmp, url) as engine:
        client = await RawClient.connect(str(engine.socket))
        await client.send(chat(1, "word " * 400_000))
        await client.send({"type": "cancel", "id": 1})
        reply = await client.receive()
        assert (reply["id"], reply["type"], reply["kind"]) == (1, "error", "cancelled")
        reply = await client.request(chat(2))
        assert reply["type"] == "result"
        await client.aclose()


async def test_an_undecodable_first_frame_closes_the_connection(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        client = await RawClient.connect(str(engine.socket), hello=False)
        await client.send_raw(_frame(b"\xc1 not msgpack"))
        error = await client.receive()
        assert (error["type"], error["kind"], error["id"]) == ("error", "protocol_error", None)
        assert "first frame must be a hello" in error["message"]
        with pytest.raises(EOFError):
            await client.receive()
        await client.aclose()


async def test_a_get_needs_no_body(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        client = await RawClient.connect(str(engine.socket))
        reply = await client.request({"type": "submit", "id": 1, "endpoint": "/v1/models", "method": "get"})
        assert reply["type"] == "result" and reply["body"]["object"] == "list"
        await client.aclose()


async def test_a_first_frame_that_is_not_a_hello_is_answered_without_its_id(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        client = await RawClient.connect(str(engine.socket), hello=False)
        error = await client.request(chat(5))
        assert (error["type"], error["kind"], error["id"]) == ("error", "protocol_error", None)
        with pytest.raises(EOFError):
            await client.receive()
        await client.aclose()
