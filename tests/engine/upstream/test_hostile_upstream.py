"""A real engine against a hostile upstream: a raw HTTP/1.1 server that answers each request as a test says.

Each case was found by pointing an engine at such a server: what it sends is what a flaky proxy, a broken
gateway or a misbehaving OpenAI-compatible server can send.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from conftest import read_http_request, running_engine
from raw_client import RawClient, chat

#: A small reply bound, so that going past it costs a test megabytes, not the engine's half a gigabyte.
SMALL_LIMITS = {
    "trio_mapper.engine.upstream.client.MAX_REPLY_BYTES": 1024 * 1024,
    "trio_mapper.engine.upstream.client.MAX_EVENT_CHARS": 1024 * 1024,
}
OK_BODY = (
    b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", '
    b'"content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}'
)
CHUNK = b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n'

Answer = Callable[[trio.SocketStream], Any]


def whole(body: bytes, *, status: int = 200, headers: bytes = b"") -> Answer:
    async def answer(stream: trio.SocketStream) -> None:
        head = b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
        await stream.send_all(head % (status, len(body), headers) + body)

    return answer


def events(*pieces: bytes) -> Answer:
    """A stream of events, ended by closing the connection."""

    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for piece in pieces:
            await stream.send_all(piece)

    return answer


class HostileUpstream:
    """Answers each request with the next of `answers` (the last one again once they run out)."""

    def __init__(self) -> None:
        self.answers: list[Answer] = [whole(OK_BODY)]
        self.requests = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        if await read_http_request(stream, b"") is None:
            return
        answer = self.answers[min(self.requests, len(self.answers) - 1)]
        self.requests += 1
        with contextlib.suppress(trio.BrokenResourceError):  # the engine hung up on it, as it should on some
            await answer(stream)
        await stream.aclose()


@pytest.fixture
async def hostile(nursery: trio.Nursery) -> AsyncIterator[tuple[HostileUpstream, str]]:
    upstream = HostileUpstream()
    listeners = await nursery.start(partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1"))
    yield upstream, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1"


async def still_serves(client: RawClient, upstream: HostileUpstream) -> None:
    upstream.answers = [whole(OK_BODY)]
    upstream.requests = 0
    reply = await client.request(chat("after", deadline=30.0))
    assert (reply["type"], reply["status"]) == ("result", 200), reply


def stream_chat(request_id: str) -> dict[str, Any]:
    request = chat(request_id, deadline=30.0)
    request["body"]["stream"] = True
    return request


@pytest.mark.parametrize(
    "answer",
    [
        whole(gzip.compress(b" " * (8 * 1024 * 1024)), headers=b"content-encoding: gzip\r\n"),
        whole(b" " * (2 * 1024 * 1024)),
    ],
    ids=["gzip-bomb", "plain"],
)
async def test_a_reply_too_large_is_refused_not_held(
    short_tmp: Path, hostile: tuple[HostileUpstream, str], answer: Answer
) -> None:
    """Found by a hostile review: a body of any size was read whole, so 600 KB of gzip took 2.6 GB."""
    upstream, url = hostile
    upstream.answers = [answer]
    async with (
        running_engine(short_tmp, url, constants=SMALL_LIMITS) as engine,
        await RawClient.connect(str(engine.socket)) as client,
    ):
        with trio.fail_after(30):
            reply = await client.request(chat(1, deadline=30.0))
            assert (reply["type"], reply["kind"], reply["attempts"]) == ("error", "upstream_error", 1), reply
            assert "too large" in reply["message"]
            await still_serves(client, upstream)


async def test_an_event_without_end_is_refused_not_held(short_tmp: Path, hostile: tuple[HostileUpstream, str]) -> None:
    """Found by a hostile review: a ``data:`` line without end was held whole (1.3 GB for 300 MB)."""
    upstream, url = hostile
    upstream.answers = [events(CHUNK, b"data: " + b"x" * (2 * 1024 * 1024))]
    async with (
        running_engine(short_tmp, url, constants=SMALL_LIMITS) as engine,
        await RawClient.connect(str(engine.socket), minor=1) as client,
    ):
        with trio.fail_after(30):
            await client.send(stream_chat("s"))
            assert (await client.receive())["type"] == "chunk"
            reply = await client.receive()
            assert (reply["type"], reply["kind"]) == ("error", "upstream_error"), reply
            assert "longer than the engine's limit" in reply["message"]
            await still_serves(client, upstream)


async def test_a_stream_of_keep_alive_comments_ends_at_the_read_timeout(
    short_tmp: Path, hostile: tuple[HostileUpstream, str]
) -> None:
    """Found by a hostile review: comments (``: ping``) every few seconds and no event held the stream, and its
    concurrency slot, for ever: each one reset the read timeout."""
    upstream, url = hostile

    async def pinging(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        await stream.send_all(CHUNK)
        while True:
            await trio.sleep(0.2)
            await stream.send_all(b": ping\n\n")

    upstream.answers = [pinging]
    config = short_tmp / "engine.toml"
    config.write_text("[openai]\nread_timeout = 1\n")
    async with (
        running_engine(short_tmp, url, "--config", str(config)) as engine,
        await RawClient.connect(str(engine.socket), minor=1) as client,
    ):
        with trio.fail_after(30):
            await client.send(stream_chat("pinged"))
            assert (await client.receive())["type"] == "chunk"
            reply = await client.receive()
            assert reply["type"] == "error", reply
            assert "no event for 1s" in reply["message"], reply
            await still_serves(client, upstream)


async def test_a_stream_cut_short_is_an_error_not_a_whole_answer(
    short_tmp: Path, hostile: tuple[HostileUpstream, str]
) -> None:
    """Found by a hostile review: a stream that stopped before ``[DONE]`` was answered as a success, so the
    client took a cut reply for a whole one. Cut before its first event, it is retried; after, it is an error."""
    upstream, url = hostile
    usage = b'data: {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 5}}\n\n'
    # Cut before any event, then after one; then whole: ended by [DONE], and by its usage chunk alone (some
    # OpenAI-compatible servers send no [DONE]).
    upstream.answers = [events(), events(CHUNK), events(CHUNK, b"data: [DONE]\n\n"), events(CHUNK, usage)]
    async with (
        running_engine(short_tmp, url) as engine,
        await RawClient.connect(str(engine.socket), minor=1) as client,
    ):
        with trio.fail_after(30):
            await client.send(stream_chat("cut"))
            assert (await client.receive())["type"] == "chunk"
            reply = await client.receive()
            assert (reply["type"], reply["kind"], reply["attempts"]) == ("error", "upstream_error", 2), reply
            assert "ended before its last event" in reply["message"]
            for request_id in ("whole", "without [DONE]"):
                await client.send(stream_chat(request_id))
                assert (await client.receive())["type"] == "chunk"
                reply = await client.receive()
                assert (reply["id"], reply["type"], reply["streamed"]) == (request_id, "result", True), reply


async def test_usage_beyond_the_whole_minute_is_counted_as_the_minute(
    short_tmp: Path, hostile: tuple[HostileUpstream, str]
) -> None:
    """Found by a hostile review: a reply saying it used 10^15 prompt tokens put the lane that far in debt, so
    every later request for the model waited until its deadline; a negative count would have credited it."""
    upstream, url = hostile

    def usage(prompt: int) -> bytes:
        return OK_BODY.replace(b'"prompt_tokens": 5', b'"prompt_tokens": %d' % prompt)

    upstream.answers = [whole(usage(-(10**15))), whole(usage(10**15))]
    async with (
        running_engine(short_tmp, url, "--tpm", "600000", "--rpm", "10000") as engine,
        await RawClient.connect(str(engine.socket)) as client,
    ):
        with trio.fail_after(30):
            for request_id in ("negative", "huge"):
                reply = await client.request(chat(request_id, deadline=30.0))
                assert (reply["type"], reply["status"]) == ("result", 200), reply
            lane = (await client.request({"type": "stats", "id": "s"}))["lanes"]["gpt-4o-mini"]
    # The negative usage is no usage at all (the estimate stands); the huge one counts as the whole minute.
    assert lane["actual_prompt_tokens"] == 600_000
    assert lane["implausible_usage"] == 1
    assert lane["budget"]["tokens_available"] > -700_000
    assert "more than the lane's whole per-minute limit (600000)" in engine.log


UPSTREAM_ERROR = (
    b'{"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}'
)


def responses(request_id: str) -> dict[str, Any]:
    return {
        "type": "submit",
        "id": request_id,
        "endpoint": "/v1/responses",
        "body": {"model": "gpt-4o-mini", "input": "Say hello", "max_output_tokens": 16, "stream": True},
        "deadline": 30.0,
    }


async def test_an_error_mid_stream_fails_the_request_once_not_retried(
    short_tmp: Path, hostile: tuple[HostileUpstream, str]
) -> None:
    """Found by a hostile review: a stream whose upstream sent an error event, then ``[DONE]`` (or nothing), was
    settled as a success: the client had the error, the engine's statistics and metrics a success."""
    upstream, url = hostile
    # vLLM's continuous usage: counted even though the stream fails after it.
    counted = b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": {"prompt_tokens": 7}}\n\n'
    failed = json.dumps({"type": "response.failed", "response": {"status": "failed", "error": {"message": "boom"}}})
    upstream.answers = [
        events(counted, b"data: " + UPSTREAM_ERROR + b"\n\n", b"data: [DONE]\n\n"),
        events(CHUNK, b"event: error\ndata: " + UPSTREAM_ERROR + b"\n\n"),  # and the connection closes
        events(b"event: response.failed\ndata: " + failed.encode() + b"\n\n"),
        # Over HTTP: an error, then a stall the engine does not wait for.
        events(CHUNK, b"data: " + UPSTREAM_ERROR + b"\n\n", b": ping\n\n" * 1000),
    ]
    async with (
        running_engine(short_tmp, url) as engine,
        await RawClient.connect(str(engine.socket), minor=1) as client,
    ):
        with trio.fail_after(30):
            for request in (stream_chat("then [DONE]"), stream_chat("then the end"), responses("response.failed")):
                await client.send(request)
                chunks = []
                while (reply := await client.receive())["type"] == "chunk":
                    chunks.append(reply["data"])
                assert (reply["type"], reply["kind"], reply["attempts"]) == ("error", "upstream_error", 1), reply
                assert "ended the stream with an error after it had started" in reply["message"], reply
                assert "The server had an error" in reply["message"] or '"boom"' in reply["message"], reply
                assert "error" in str(chunks[-1]), chunks  # the upstream's own, relayed as it came
            assert upstream.requests == 3

            transport = httpx.AsyncHTTPTransport(uds=str(engine.socket) + ".http")
            async with httpx.AsyncClient(transport=transport, base_url="http://engine") as http:
                body = stream_chat("http")["body"]
                streamed = await http.post("/v1/chat/completions", json=body)
                metrics = (await http.get("/metrics")).text
            lane = (await client.request({"type": "stats", "id": "s"}))["lanes"]["gpt-4o-mini"]
    assert streamed.status_code == 200
    # The upstream's error once, and nothing of the engine's after it: neither its own error event nor [DONE].
    assert streamed.text.endswith("data: " + UPSTREAM_ERROR.decode() + "\n\n"), streamed.text
    assert streamed.text.count('"error"') == 1 and "[DONE]" not in streamed.text
    assert (lane["succeeded"], lane["failed"], lane["retries"]) == (0, 4, 0)
    assert lane["actual_prompt_tokens"] == 7
    assert 'outcome="upstream_error"} 4.0' in metrics and 'outcome="succeeded"' not in metrics


async def test_a_101_switching_protocols_is_a_final_upstream_error(
    short_tmp: Path, hostile: tuple[HostileUpstream, str]
) -> None:
    """Found by a hostile review: h11 refuses a 101 to a request that proposed no upgrade as a protocol error
    (httpcore never delivers it as a response), which was retried as a passing fault, six times over."""
    upstream, url = hostile

    async def switching(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
        await trio.sleep(0.1)  # what a WebSocket server does next is no concern: the engine hangs up

    upstream.answers = [switching]
    async with (
        running_engine(short_tmp, url) as engine,
        await RawClient.connect(str(engine.socket), minor=1) as client,
    ):
        with trio.fail_after(30):
            for request in (chat("whole", deadline=30.0), stream_chat("streamed")):
                reply = await client.request(request)
                assert (reply["type"], reply["kind"], reply["attempts"]) == ("error", "upstream_error", 1), reply
                assert "answered HTTP 101" in reply["message"] and "not retried" in reply["message"], reply
            assert upstream.requests == 2
            await still_serves(client, upstream)


async def test_an_error_event_the_sdk_does_not_raise_at_is_followed_by_the_engines_own(
    short_tmp: Path, hostile: tuple[HostileUpstream, str]
) -> None:
    """Found by a hostile review: a chat stream's ``event: error`` whose data has no ``"error"`` (a gateway's bare
    ``{"message": ...}``) failed the request, and the HTTP front added no error event of its own, as if the SDK
    had raised at the upstream's: it does so only at a truthy ``"error"``, so the stream simply ended, and the
    SDK returned a cut reply as whole."""
    upstream, url = hostile
    upstream.answers = [events(CHUNK, b'event: error\ndata: {"message": "boom", "code": "server_error"}\n\n')]
    async with running_engine(short_tmp, url) as engine:
        transport = httpx.AsyncHTTPTransport(uds=str(engine.socket) + ".http")
        async with (
            httpx.AsyncClient(transport=transport) as http,
            openai.AsyncOpenAI(api_key="unused", base_url="http://engine/v1", http_client=http, max_retries=0) as sdk,
        ):
            with trio.fail_after(30):
                stream = await sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                received = []
                with pytest.raises(openai.APIError) as raised:
                    async for chunk in stream:
                        received.append(chunk)
    assert received[0].choices[0].delta.content == "Hel"  # and the upstream's own event, as it came
    assert "ended the stream with an error after it had started" in raised.value.message
    assert "boom" in raised.value.message
    assert upstream.requests == 1
