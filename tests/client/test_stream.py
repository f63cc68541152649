"""`Client.stream` and `AsyncClient.stream`: against the real engine and simulator (started as in the other
end-to-end tests), and against the fake engine for an engine too old to stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio
from client_fixtures import FakeEngine, remove_dir, short_socket_dir, socket_path_in
from conftest import EngineProcess, running_engine, simulator

from trio_mapper.client import AsyncClient, Client, StreamChunk
from trio_mapper.client.errors import (
    ConnectionLost,
    InvalidRequestError,
    ProtocolError,
    RequestCancelledError,
    TrioMapperError,
    UpstreamError,
)
from trio_mapper.wire import Result

CHAT = "/v1/chat/completions"
#: Hang guard of a whole test: a stream here takes milliseconds.
GUARD = 60


async def until(predicate: Any) -> None:
    """Poll from async code (Trio or asyncio): the fake engine's state lives in its threads."""
    with anyio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.005)


def chat(content: str = "Say hello", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 12, **extra}


@asynccontextmanager
async def engine_and_simulator(directory: Path, per_token_ms: float = 1.0) -> AsyncIterator[tuple[EngineProcess, str]]:
    """A real engine in front of a simulator that paces its streams, so that each comes in several reads."""
    async with simulator(per_token_latency_ms=per_token_ms) as url, running_engine(directory, url) as engine:
        yield engine, url


async def closed_streams(url: str) -> int:
    """Streams the simulator saw its client (the engine) close before their end."""
    async with httpx.AsyncClient() as http:
        stats = (await http.get(url.removesuffix("/v1") + "/_simulator/stats")).json()
    closed: int = stats["streams_closed_by_client"]
    return closed


async def until_a_stream_is_closed_early(url: str) -> None:
    with trio.fail_after(10):
        while await closed_streams(url) < 1:  # noqa: ASYNC110 - another process: nothing to wait on but the clock
            await trio.sleep(0.05)


def assert_chat_stream(chunks: list[StreamChunk], result: Result | None, *, usage: bool = False) -> None:
    """Role chunk, content chunks, the finish chunk (then the usage chunk, if asked for); then the result."""
    assert all(isinstance(c, StreamChunk) and c.event is None for c in chunks)
    data = [c.data for c in chunks]
    assert all(d["object"] == "chat.completion.chunk" for d in data)
    if usage:
        *data, last = data
        assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
        assert all(d["usage"] is None for d in data)
    else:
        assert all("usage" not in d for d in data)  # what the engine asked for on the client's behalf
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [d["choices"][0]["delta"].get("content") for d in data[1:-1]]
    assert len(content) >= 3 and all(content)
    assert data[-1]["choices"][0]["finish_reason"] is not None
    assert isinstance(result, Result) and result.streamed and result.body is None
    assert result.status == 200 and result.headers["x-request-id"] and result.attempts == 1


# --- blocking ---------------------------------------------------------------------------------------------


async def test_blocking_streams_of_every_kind(short_tmp: Path) -> None:
    async with engine_and_simulator(short_tmp) as (engine, _):

        def blocking() -> None:
            with Client(str(engine.socket)) as client:
                assert client.welcome.minor == 1
                stream = client.stream(CHAT, chat())
                chunks = list(stream)
                assert_chat_stream(chunks, stream.result)
                assert list(stream) == []  # over

                with client.stream(CHAT, chat(stream_options={"include_usage": True})) as stream:
                    assert_chat_stream(list(stream), stream.result, usage=True)

                completions = list(
                    client.stream("/v1/completions", {"model": "gpt-4o-mini", "prompt": "Hi", "max_tokens": 8})
                )
                assert all(c.data["object"] == "text_completion" for c in completions)
                assert "".join(c.data["choices"][0]["text"] for c in completions)
                assert completions[-1].data["choices"][0]["finish_reason"] is not None

                events = list(
                    client.stream("/v1/responses", {"model": "gpt-4o-mini", "input": "Hi", "max_output_tokens": 8})
                )
                assert all(c.event == c.data["type"] for c in events)
                names = [c.event for c in events]
                assert names[0] == "response.created" and names.count("response.output_text.delta") >= 3
                assert names[-1] in {"response.completed", "response.incomplete"}
                assert events[-1].data["response"]["usage"]["input_tokens"] > 0

                # Whole requests are as they were.
                result = client.request_result(CHAT, chat())
                assert not result.streamed and result.body["object"] == "chat.completion"

        with trio.fail_after(GUARD):
            await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)


async def test_blocking_streams_share_the_connection_with_other_requests(short_tmp: Path) -> None:
    async with engine_and_simulator(short_tmp) as (engine, _):

        def blocking() -> None:
            with Client(str(engine.socket)) as client:
                answers: list[Any] = []
                stream = client.stream(CHAT, chat("first"))
                other = client.stream(CHAT, chat("second"))
                for n, _ in enumerate(stream):
                    if n == 1:  # between two chunks, a whole request and a whole second stream
                        answers.append(client.request(CHAT, chat("meanwhile")))
                        answers.append(list(other))
                assert stream.result is not None and other.result is not None
                whole, others = answers
                assert whole["object"] == "chat.completion" and len(others) > 3

                # Threads share it too: each gets its own stream's chunks.
                results: list[int] = []

                def one(n: int) -> None:
                    results.append(len(list(client.stream(CHAT, chat(f"thread {n}")))))

                threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert len(results) == 4 and min(results) > 3

        with trio.fail_after(GUARD):
            await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)


async def test_leaving_a_blocking_stream_early_closes_the_upstream_stream(short_tmp: Path) -> None:
    async with engine_and_simulator(short_tmp, per_token_ms=20.0) as (engine, url):

        def blocking() -> None:
            with Client(str(engine.socket)) as client:
                for n, _ in enumerate(client.stream(CHAT, chat("Tell me a long story", max_tokens=500))):
                    if n == 1:
                        break  # the dropped stream cancels its request
                assert client._core.outstanding == {}

        with trio.fail_after(GUARD):
            await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
            await until_a_stream_is_closed_early(url)

        def afterwards() -> None:
            with Client(str(engine.socket)) as client:
                assert len(list(client.stream(CHAT, chat()))) > 3
                with client.stream(CHAT, chat("Tell me a long story", max_tokens=500)) as stream:
                    next(stream)
                    next(stream)
                assert client._core.outstanding == {}  # the with block cancelled it
                assert client.request(CHAT, chat())["object"] == "chat.completion"

        with trio.fail_after(GUARD):
            await trio.to_thread.run_sync(afterwards, abandon_on_cancel=True)


async def test_a_failed_stream_raises_what_a_whole_request_raises(short_tmp: Path) -> None:
    async with engine_and_simulator(short_tmp) as (engine, _):
        refused = {"model": "gpt-4o-mini"}  # no messages: the engine refuses it
        upstream_refused = chat(n=1000)  # the simulator answers 400: more choices than it allows

        def blocking() -> None:
            with Client(str(engine.socket)) as client:
                for body, kind in [(refused, InvalidRequestError), (upstream_refused, UpstreamError)]:
                    with pytest.raises(kind) as whole:
                        client.request(CHAT, body)
                    stream = client.stream(CHAT, body)
                    with pytest.raises(kind) as streamed:
                        list(stream)
                    assert (streamed.value.kind, streamed.value.status) == (whole.value.kind, whole.value.status)
                    assert stream.result is None
                # A body that asks for a stream is stream()'s to send.
                with pytest.raises(InvalidRequestError, match="use stream"):
                    client.request(CHAT, chat(stream=True))
                assert client.request(CHAT, chat())["object"] == "chat.completion"

        with trio.fail_after(GUARD):
            await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)


# --- async ------------------------------------------------------------------------------------------------


async def test_async_streams_on_trio(short_tmp: Path) -> None:
    async with engine_and_simulator(short_tmp) as (engine, _), AsyncClient(str(engine.socket)) as client:
        with trio.fail_after(GUARD):
            stream = client.stream(CHAT, chat())
            assert_chat_stream([chunk async for chunk in stream], stream.result)

            async with client.stream(CHAT, chat(stream_options={"include_usage": True})) as stream:
                assert_chat_stream([chunk async for chunk in stream], stream.result, usage=True)

            body = {"model": "gpt-4o-mini", "input": "Hi", "max_output_tokens": 8}
            events = [chunk async for chunk in client.stream("/v1/responses", body)]
            assert events[0].event == "response.created" and all(c.event == c.data["type"] for c in events)

            completions = [c async for c in client.stream("/v1/completions", {"model": "gpt-4o-mini", "prompt": "Hi"})]
            assert completions and all(c.data["object"] == "text_completion" for c in completions)

            # Many streams at once on the one connection, each with its own chunks.
            counts: dict[int, int] = {}

            async def one(n: int) -> None:
                counts[n] = len([c async for c in client.stream(CHAT, chat(f"task {n}"))])

            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(one, n)
            assert len(counts) == 5 and min(counts.values()) > 3

            with pytest.raises(InvalidRequestError) as caught:
                async for _ in client.stream(CHAT, {"model": "gpt-4o-mini"}):
                    pass
            assert caught.value.kind == "invalid_request"
            assert (await client.request_result(CHAT, chat())).streamed is False


async def test_leaving_an_async_stream_early_closes_the_upstream_stream(short_tmp: Path) -> None:
    async with (
        engine_and_simulator(short_tmp, per_token_ms=20.0) as (engine, url),
        AsyncClient(str(engine.socket)) as client,
    ):
        with trio.fail_after(GUARD):
            n = 0
            async for _ in client.stream(CHAT, chat("Tell me a long story", max_tokens=500)):
                n += 1
                if n == 2:
                    break  # the dropped stream cancels its request
            assert client._core.outstanding == {}
            await until_a_stream_is_closed_early(url)

            # A cancelled wait for the next chunk cancels the request too.
            stream = client.stream(CHAT, chat("Tell me a long story", max_tokens=500))
            await stream.__anext__()
            with trio.move_on_after(0.01):
                while True:
                    await stream.__anext__()
            assert client._core.outstanding == {}
            # The engine is fine and so is the connection.
            assert len([c async for c in client.stream(CHAT, chat())]) > 3


async def test_async_streams_on_asyncio(short_tmp: Path) -> None:
    async def on_asyncio(path: str) -> None:
        async with AsyncClient(path) as client:
            stream = client.stream(CHAT, chat())
            assert_chat_stream([chunk async for chunk in stream], stream.result)

            async def collect(n: int) -> list[StreamChunk]:
                return [chunk async for chunk in client.stream(CHAT, chat(f"task {n}"))]

            both = await asyncio.gather(collect(1), collect(2))
            assert all(len(chunks) > 3 for chunks in both)

    async with engine_and_simulator(short_tmp) as (engine, _):
        with trio.fail_after(GUARD):
            await trio.to_thread.run_sync(lambda: asyncio.run(on_asyncio(str(engine.socket))), abandon_on_cancel=True)


# --- the drivers, against the fake engine -----------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    """A fake engine that welcomes streams; ``{"chunks": n, "hold": True}`` sends n chunks, then waits."""
    directory = short_socket_dir()
    engine = FakeEngine(socket_path_in(directory), minor=1).start()
    yield engine
    engine.stop()
    remove_dir(directory)


HELD = {"chunks": 3, "hold": True}


def test_break_close_and_with_cancel_a_blocking_stream(fake: FakeEngine) -> None:
    with Client(fake.path) as client:
        for chunk in client.stream(CHAT, HELD):
            assert chunk == StreamChunk({"n": 0})
            break
        fake.wait_for(lambda: fake.cancels == [1])
        stream = client.stream(CHAT, HELD)
        assert [next(stream), next(stream)] == [StreamChunk({"n": 0}), StreamChunk({"n": 1})]
        stream.close()
        # Closed before its end: reading on says so, rather than ending as if the answer were whole.
        with pytest.raises(RequestCancelledError, match="closed before its end"):
            list(stream)
        with client.stream(CHAT, HELD) as stream:
            next(stream)
        fake.wait_for(lambda: fake.cancels == [1, 2, 3])
        assert [s.body["stream"] for s in fake.submits] == [True] * 3
        assert next(client.stream(CHAT, HELD)) == StreamChunk({"n": 0})  # the stream is dropped at once
        fake.wait_for(lambda: len(fake.cancels) == 4)
        stream = client.stream(CHAT, {"chunks": 1})
        assert list(stream)
        stream.close()  # after its end: nothing was cut
        assert list(stream) == []


def test_a_stream_dropped_while_its_client_is_busy_is_cancelled_by_the_next_io(fake: FakeEngine) -> None:
    with Client(fake.path) as client:
        stream = client.stream(CHAT, HELD)
        with client._lock:  # as if the collector ran the finaliser in a thread inside the client
            del stream  # must not block (the lock is not reentrant), so the cancel waits for the next I/O
        assert client.ping() > 0
        fake.wait_for(lambda: fake.cancels == [1])


def test_a_stream_ending_in_an_error_or_a_lost_connection(fake: FakeEngine) -> None:
    with Client(fake.path) as client:
        stream = client.stream(CHAT, {"chunks": 2, "error": "upstream_error", "status": 502})
        with pytest.raises(UpstreamError) as caught:
            for _ in stream:
                pass
        assert caught.value.status == 502 and stream.result is None
        stream = client.stream(CHAT, HELD)
        assert next(stream) == StreamChunk({"n": 0})
        fake.drop_connections()
        with pytest.raises(ConnectionLost, match="may have sent it upstream") as lost:
            list(stream)
        assert lost.value.may_have_reached_upstream is True and lost.value.request_id == 2
        with pytest.raises(RequestCancelledError, match="closed before its end"):  # never passed off as whole
            next(stream)
        assert len(list(client.stream(CHAT, {"chunks": 1}))) == 2  # the next call connected again
    assert len(fake.connections) == 2


async def test_break_aclose_and_cancel_an_async_stream_trio(fake: FakeEngine) -> None:
    async with AsyncClient(fake.path) as client:
        async for chunk in client.stream(CHAT, HELD):
            assert chunk == StreamChunk({"n": 0})
            break
        await until(lambda: fake.cancels == [1])
        async with client.stream(CHAT, HELD) as stream:
            assert await stream.__anext__() == StreamChunk({"n": 0})
        await until(lambda: fake.cancels == [1, 2])
        stream = client.stream(CHAT, HELD)
        with trio.move_on_after(0.1):  # waiting for a fourth chunk that never comes
            async for _ in stream:
                pass
        await until(lambda: fake.cancels == [1, 2, 3])
        # A reviewer's finding: reading on after a cancelled wait ended the iteration quietly, passing a cut
        # answer off as a whole one.
        with pytest.raises(RequestCancelledError, match="closed before its end"):
            await stream.__anext__()
        with pytest.raises(UpstreamError):
            async for _ in client.stream(CHAT, {"chunks": 1, "error": "upstream_error"}):
                pass
        stream = client.stream(CHAT, HELD)
        assert await stream.__anext__() == StreamChunk({"n": 0})
        fake.drop_connections()
        with pytest.raises(ConnectionLost, match="may have sent it upstream") as lost:
            async for _ in stream:
                pass
        assert lost.value.may_have_reached_upstream is True
        with pytest.raises(RequestCancelledError, match="closed before its end"):
            await stream.__anext__()


async def test_an_async_stream_made_while_the_connection_is_down_connects_when_iterated_trio(
    fake: FakeEngine,
) -> None:
    async with AsyncClient(fake.path) as client:
        fake.drop_connections()
        await until(lambda: client._core.closed)
        stream = client.stream(CHAT, {"chunks": 2})  # not a coroutine: it cannot connect here
        assert stream.request_id is None and len(fake.submits) == 0
        chunks = [chunk async for chunk in stream]
        assert chunks[:2] == [StreamChunk({"n": 0}), StreamChunk({"n": 1})] and stream.result is not None
        assert stream.request_id == 1 and len(fake.connections) == 2
        fake.drop_connections()
        await until(lambda: client._core.closed)
        unsent = client.stream(CHAT, {"chunks": 2})
        await unsent.aclose()  # closed before it was sent: nothing to cancel, nothing sent
        with pytest.raises(RequestCancelledError, match="closed before its end"):
            await unsent.__anext__()
    assert len(fake.submits) == 1 and len(fake.connections) == 2


def test_break_cancels_an_async_stream_on_asyncio(fake: FakeEngine) -> None:
    async def main() -> None:
        async with AsyncClient(fake.path) as client:
            async for _ in client.stream(CHAT, HELD):
                break
            await until(lambda: fake.cancels == [1])
            chunks = [chunk async for chunk in client.stream(CHAT, {"chunks": 2})]
            assert chunks[:2] == [StreamChunk({"n": 0}), StreamChunk({"n": 1})]
            assert chunks[2].data["echo"]["stream"] is True  # the fake answers whole: the whole body is a chunk

    asyncio.run(main())


# --- an engine too old to stream --------------------------------------------------------------------------


@pytest.fixture
def old_engine() -> Iterator[FakeEngine]:
    """The fake engine's welcome has no minor: what an engine from before streams sends."""
    directory = short_socket_dir()
    fake = FakeEngine(socket_path_in(directory)).start()
    yield fake
    fake.stop()
    remove_dir(directory)


def test_an_engine_too_old_to_stream_is_named_and_whole_requests_still_work(old_engine: FakeEngine) -> None:
    with Client(old_engine.path) as client:
        assert client.welcome.minor == 0
        with pytest.raises(ProtocolError, match="upgrade the engine"):
            client.stream(CHAT, chat())
        assert old_engine.submits == []  # nothing was sent
        assert client.request(CHAT, chat())["echo"]["model"] == "gpt-4o-mini"
    assert [hello.minor for hello in old_engine.hellos] == [1]


async def test_an_engine_too_old_to_stream_async(old_engine: FakeEngine) -> None:
    async with AsyncClient(old_engine.path) as client:
        with pytest.raises(ProtocolError, match="upgrade the engine") as caught:
            client.stream(CHAT, chat())
        assert isinstance(caught.value, TrioMapperError) and "minor 1" in caught.value.message
        assert (await client.request(CHAT, chat()))["echo"]["model"] == "gpt-4o-mini"
