"""Streams on the msgpack socket: the minor version agreed in the handshake, chunk frames, and the relay's
backpressure.

Most tests drive one `Connection` in-process over in-memory streams, with a scheduler that only records
what it was given: the test itself plays the core, reporting events and relaying chunks to the connection
(its `ReplySink`). The last tests speak raw frames to a real engine and simulator, as a client written from
docs/protocol.md would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import msgspec
import pytest
import trio
import trio.testing
from conftest import running_engine, simulator
from raw_client import PREFIX, RawClient, chat

from trio_mapper.engine.core.outcome import Chunk, Failed, Finished, RequestSpec, Started, Timings
from trio_mapper.engine.fronts.unix.connection import STREAM_HIGH_WATER_BYTES, Connection
from trio_mapper.engine.upstream.client import ReplyBody
from trio_mapper.kinds import ErrorKind
from trio_mapper.wire import DEFAULT_MAX_FRAME_BYTES, PROTOCOL_MINOR

HELLO = {"type": "hello", "protocol": 1, "client": "stream-test"}
TIMINGS = Timings(queued=0.0, upstream=0.0, total=0.0)


def frame(message: dict[str, Any]) -> bytes:
    body = msgspec.msgpack.encode(message)
    return PREFIX.pack(len(body)) + body


class RecordingScheduler:
    """The part of the scheduler a Connection uses; it answers nothing: the test reports and relays."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Any, RequestSpec]] = []
        self.cancelled: list[Any] = []
        self.outstanding: set[Any] = set()
        self.forgotten: list[Any] = []

    async def intake(self, owner: Connection, request_id: Any, spec: RequestSpec, **_: Any) -> None:
        self.submitted.append((request_id, spec))
        self.outstanding.add(request_id)

    def cancel(self, owner: Connection, request_id: Any) -> bool:
        self.cancelled.append(request_id)
        return True

    def is_outstanding(self, owner: Connection, request_id: Any) -> bool:
        return request_id in self.outstanding

    async def forget_owner(self, owner: Connection) -> int:
        self.forgotten.append(owner)
        return 0


@attrs.define
class Served:
    client: RawClient
    connection: Connection
    scheduler: RecordingScheduler
    closed: trio.Event


def serve_connection(
    nursery: trio.Nursery, *, pair: Callable[[], tuple[Any, Any]] = trio.testing.memory_stream_pair
) -> Served:
    client_stream, engine_stream = pair()
    scheduler = RecordingScheduler()
    connection = Connection(
        engine_stream,
        scheduler=scheduler,  # duck-typed: the methods a Connection calls
        stats=lambda: ({}, {}),
        max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
    )
    closed = trio.Event()

    async def serve() -> None:
        try:
            await connection.serve()
        finally:
            closed.set()

    nursery.start_soon(serve)
    return Served(RawClient(client_stream), connection, scheduler, closed)


async def handshake(served: Served, **fields: Any) -> dict[str, Any]:
    welcome = await served.client.request({**HELLO, **fields})
    assert welcome["type"] == "welcome", welcome
    return welcome


def stream_chat(request_id: Any, **extra: Any) -> dict[str, Any]:
    message = chat(request_id, **extra)
    message["body"]["stream"] = True
    return message


# --- the handshake -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "agreed"), [(None, 0), (0, 0), (1, 1), (PROTOCOL_MINOR + 5, PROTOCOL_MINOR), (-3, 0)]
)
async def test_the_welcome_names_the_lower_of_the_two_minors(offered: int | None, agreed: int) -> None:
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery)
        welcome = await handshake(served, **({} if offered is None else {"minor": offered}))
        assert welcome["minor"] == agreed and welcome["protocol"] == 1
        assert served.connection.minor == agreed
        nursery.cancel_scope.cancel()


# --- clients that cannot stream ------------------------------------------------------------------------------


async def test_a_minor_0_client_asking_for_a_stream_is_refused_and_told_how_to_get_one() -> None:
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery)
        await handshake(served)  # a hello from before the minor version
        error = await served.client.request(stream_chat(1))
        assert (error["type"], error["id"], error["kind"]) == ("error", 1, "invalid_request"), error
        for advice in ("minor 1", "Upgrade the client", "HTTP front"):
            assert advice in error["message"]
        assert served.scheduler.submitted == []
        # Whole requests are unaffected.
        await served.client.send(chat(2))
        await trio.testing.wait_all_tasks_blocked()
        assert [request_id for request_id, _ in served.scheduler.submitted] == [2]
        nursery.cancel_scope.cancel()


async def test_a_minor_0_stream_reusing_an_outstanding_id_is_left_to_intake() -> None:
    # Intake refuses a duplicate without naming the id: the outstanding request keeps its one final reply.
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery)
        await handshake(served)
        await served.client.send(chat(7))
        await trio.testing.wait_all_tasks_blocked()
        await served.client.send(stream_chat(7))
        await trio.testing.wait_all_tasks_blocked()
        assert [request_id for request_id, _ in served.scheduler.submitted] == [7, 7]
        nursery.cancel_scope.cancel()


# --- chunk frames ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body_format", ["msgpack", "json"])
async def test_chunks_go_out_in_order_then_one_result(body_format: str) -> None:
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery)
        welcome = await handshake(served, minor=1, body_format=body_format)
        assert welcome["body_format"] == body_format
        await served.client.send(stream_chat("s"))
        await trio.testing.wait_all_tasks_blocked()
        [(request_id, spec)] = served.scheduler.submitted
        assert request_id == "s" and spec.body["stream"] is True
        connection = served.connection
        connection.report("s", Started(status=200, headers={}, streaming=True))
        await connection.relay("s", Chunk('{"n": 0}'))
        await connection.relay("s", Chunk('{"type": "response.created"}', "response.created"))
        await connection.relay("s", Chunk("not json"))
        connection.report(
            "s",
            Finished(
                status=200,
                headers={"x-request-id": "r"},
                body=ReplyBody(b""),
                attempts=2,
                timings=TIMINGS,
                streamed=True,
            ),
        )
        frames = [await served.client.receive() for _ in range(4)]
        assert [(f["type"], f["id"]) for f in frames] == [("chunk", "s")] * 3 + [("result", "s")]
        if body_format == "json":  # the event's bytes, as a bin
            assert [f["data"] for f in frames[:3]] == [b'{"n": 0}', b'{"type": "response.created"}', b"not json"]
        else:  # decoded; what is not JSON stays text, as bodies do
            assert [f["data"] for f in frames[:3]] == [{"n": 0}, {"type": "response.created"}, "not json"]
        assert [f["event"] for f in frames[:3]] == [None, "response.created", None]
        result = frames[3]
        assert result["streamed"] is True and result["body"] is None
        assert (result["status"], result["headers"], result["attempts"]) == (200, {"x-request-id": "r"}, 2)
        nursery.cancel_scope.cancel()


async def test_a_stream_that_fails_after_its_chunks_ends_with_an_error_frame() -> None:
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery)
        await handshake(served, minor=1)
        await served.client.send(stream_chat(1))
        await trio.testing.wait_all_tasks_blocked()
        served.connection.report(1, Started(status=200, headers={}, streaming=True))
        await served.connection.relay(1, Chunk('{"n": 0}'))
        served.connection.report(1, Failed(kind=ErrorKind.UPSTREAM_ERROR, message="the stream broke", attempts=1))
        chunk = await served.client.receive()
        error = await served.client.receive()
        assert (chunk["type"], chunk["data"]) == ("chunk", {"n": 0})
        assert (error["type"], error["id"], error["kind"]) == ("error", 1, "upstream_error")
        nursery.cancel_scope.cancel()


async def test_a_chunk_msgpack_cannot_carry_raises_to_the_core_and_sends_nothing() -> None:
    # The core then ends the request with internal_error: its one final reply, after the chunks it did get.
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery)
        await handshake(served, minor=1)
        with pytest.raises(OverflowError):
            await served.connection.relay(1, Chunk('{"n": 123456789012345678901234567890}'))
        assert await served.client.request({"type": "ping", "id": "p"}) == {"type": "pong", "id": "p"}
        nursery.cancel_scope.cancel()


# --- backpressure ------------------------------------------------------------------------------------------

#: A chunk frame of about 64 KiB, so that a few dozen pass the high-water mark.
BIG_CHUNK = Chunk(msgspec.json.encode({"pad": "x" * 64 * 1024}).decode())
BIG_CHUNKS = 4 * STREAM_HIGH_WATER_BYTES // len(BIG_CHUNK.data)


async def relay_many(connection: Connection, relayed: list[int], done: trio.Event) -> None:
    try:
        for n in range(BIG_CHUNKS):
            await connection.relay(1, BIG_CHUNK)
            relayed.append(n)
    finally:
        done.set()


async def test_a_client_that_does_not_read_a_stream_holds_back_its_relay_until_it_reads() -> None:
    with trio.fail_after(60):  # hang guard
        async with trio.open_nursery() as nursery:
            # Lockstep: a write waits for the reader, like a socket whose buffers are full.
            served = serve_connection(nursery, pair=trio.testing.lockstep_stream_pair)
            await handshake(served, minor=1)
            relayed: list[int] = []
            done = trio.Event()
            nursery.start_soon(relay_many, served.connection, relayed, done)
            await trio.testing.wait_all_tasks_blocked()
            # Stuck: the relay waits once the unsent chunks pass the mark, instead of queueing the whole stream.
            assert not done.is_set()
            assert 0 < len(relayed) * len(BIG_CHUNK.data) <= STREAM_HIGH_WATER_BYTES + len(BIG_CHUNK.data)
            # Reading lets it go on, to the end, in order.
            frames = [await served.client.receive() for _ in range(BIG_CHUNKS)]
            await done.wait()
            assert len(relayed) == BIG_CHUNKS
            assert all(f["type"] == "chunk" and f["id"] == 1 for f in frames)
            assert not served.closed.is_set()
            nursery.cancel_scope.cancel()


async def test_a_relay_waiting_for_a_client_that_goes_away_returns() -> None:
    with trio.fail_after(60):  # hang guard
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery, pair=trio.testing.lockstep_stream_pair)
            await handshake(served, minor=1)
            relayed: list[int] = []
            done = trio.Event()
            nursery.start_soon(relay_many, served.connection, relayed, done)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            await served.client.aclose()
            await served.closed.wait()
            await done.wait()  # what it relays now goes nowhere, and never waits
            assert served.scheduler.forgotten == [served.connection]


# --- a real engine -----------------------------------------------------------------------------------------


async def streams_closed_by_client(url: str) -> int:
    """Streams the simulator saw its client (the engine) close before their end."""
    async with httpx.AsyncClient() as http:
        closed: int = (await http.get(url.removesuffix("/v1") + "/_simulator/stats")).json()["streams_closed_by_client"]
    return closed


async def test_a_real_engine_refuses_streams_to_a_client_from_before_the_minor(short_tmp: Path) -> None:
    async with (
        simulator() as url,
        running_engine(short_tmp, url) as engine,
        await RawClient.connect(str(engine.socket)) as client,  # docs/protocol.md's first hello
    ):
        assert client.welcome["minor"] == 0
        error = await client.request(stream_chat(1))
        assert (error["type"], error["id"], error["kind"]) == ("error", 1, "invalid_request"), error
        assert "Upgrade the client" in error["message"] and "minor 1" in error["message"]
        result = await client.request(chat(2))  # a whole request, as before
        assert (result["type"], result["id"], result["streamed"]) == ("result", 2, False)
        assert result["body"]["object"] == "chat.completion"


async def test_a_real_engine_streams_chunk_frames_to_a_minor_1_client(short_tmp: Path) -> None:
    async with (
        simulator(per_token_latency_ms=1.0) as url,
        running_engine(short_tmp, url) as engine,
        await RawClient.connect(str(engine.socket), minor=1) as client,
    ):
        assert client.welcome["minor"] == 1
        await client.send(stream_chat(1))
        frames = [await client.receive()]
        while frames[-1]["type"] == "chunk":
            frames.append(await client.receive())
        *chunks, result = frames
        assert len(chunks) > 3 and {c["id"] for c in chunks} == {1}
        assert all(c["data"]["object"] == "chat.completion.chunk" and c["event"] is None for c in chunks)
        assert chunks[-1]["data"]["choices"][0]["finish_reason"] is not None
        # The usage chunk the engine asked for on its behalf is not the client's to see.
        assert all("usage" not in c["data"] for c in chunks)
        assert (result["type"], result["id"], result["status"]) == ("result", 1, 200)
        assert result["streamed"] is True and result["body"] is None and result["headers"]["x-request-id"]


async def test_a_real_engine_closes_the_upstream_stream_when_a_client_cancels_it(short_tmp: Path) -> None:
    async with (
        simulator(per_token_latency_ms=50.0) as url,
        running_engine(short_tmp, url) as engine,
        await RawClient.connect(str(engine.socket), minor=1, body_format="json") as client,
    ):
        await client.send(stream_chat(1, content="Tell me a long story"))
        first = await client.receive()
        assert first["type"] == "chunk" and isinstance(first["data"], bytes)
        await client.send({"type": "cancel", "id": 1})
        while (reply := await client.receive())["type"] == "chunk":
            pass
        assert (reply["type"], reply["id"], reply["kind"]) == ("error", 1, "cancelled")
        with trio.fail_after(10):  # the simulator sees the disconnect as soon as the engine closes it
            while await streams_closed_by_client(url) < 1:  # noqa: ASYNC110 - another process: only the clock
                await trio.sleep(0.05)
        result = await client.request(chat(2))
        assert (result["type"], result["id"]) == ("result", 2)
