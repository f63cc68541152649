"""Streaming through the HTTP front end to end: the engine as a real subprocess, the simulator streaming over
real HTTP, the official SDK, curl and a raw httpx client reading server-sent events."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from conftest import simulator, simulator_stats
from test_http_front import MESSAGES, MODEL, async_unix_sdk, engine_stats, http_engine, http_socket, in_thread, unix_sdk

#: Enough output tokens, paced by the simulator, for a stream to span many events and some time.
LONG_REPLY = 200


def settled(lane: dict[str, Any]) -> bool:
    """Every reservation the lane made was given back or reconciled, and nothing is in flight."""
    budget = lane["budget"]
    return lane["in_flight"] == 0 and budget["reservations"] == budget["refunds"] + budget["reconciles"]


def stream_chat_sync(client: openai.OpenAI, **options: Any) -> list[Any]:
    options = {"max_tokens": 30, **options}
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **options)
    with chunks:
        return list(chunks)


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Polls a condition that lives in another process (no event to wait on), within a bound."""
    with trio.fail_after(seconds):
        while True:
            if await condition():
                return
            await trio.sleep(0.05)  # another process changes: nothing to wait on but the clock


async def test_the_sdk_streams_chat_completions_and_responses(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        with unix_sdk(engine, max_retries=0) as client:
            chunks = await in_thread(stream_chat_sync, client)
            # The engine asked the upstream for the usage chunk; the client did not, so it never sees it.
            assert all(chunk.usage is None and chunk.choices for chunk in chunks)
            assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            assert chunks[-1].choices[0].finish_reason in {"stop", "length"}

            asked = await in_thread(stream_chat_sync, client, stream_options={"include_usage": True})
            assert asked[-1].choices == [] and asked[-1].usage.prompt_tokens > 0

            def completions() -> list[Any]:
                return list(client.completions.create(model=MODEL, prompt="Once", max_tokens=10, stream=True))

            pieces = await in_thread(completions)
            assert "".join(piece.choices[0].text for piece in pieces if piece.choices)
            assert all(piece.usage is None for piece in pieces)

            def responses() -> list[Any]:
                return list(client.responses.create(model=MODEL, input="Say hello", max_output_tokens=30, stream=True))

            events = await in_thread(responses)
            assert events[0].type == "response.created"
            assert events[-1].type in {"response.completed", "response.incomplete"}
            assert events[-1].response.usage.input_tokens > 0

        stats = await engine_stats(engine)
        assert stats["engine"]["http_requests"]["disconnected"] == 0  # every reply was read to its end
        lane = stats["lanes"][MODEL]
        assert lane["succeeded"] == 4 and lane["retries"] == 0
        # Every stream's usage reached the budget: actual prompt tokens come from the usage events only.
        assert lane["budget"]["reconciles"] == 4 and lane["actual_prompt_tokens"] > 0
        assert settled(lane)


async def test_the_async_sdk_streams_with_the_engine_headers(short_tmp: Path) -> None:
    async with (
        simulator() as url,
        http_engine(short_tmp, url) as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
    ):
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=20, stream=True
        )
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-request-id"].startswith("req_")
        assert raw.headers["x-trio-mapper-attempts"] == "1"
        assert raw.headers["x-ratelimit-limit-requests"] == "100000"
        texts = [chunk.choices[0].delta.content or "" async for chunk in raw.parse() if chunk.choices]
        assert "".join(texts)

        stream = await client.responses.create(model=MODEL, input="Say hello", max_output_tokens=20, stream=True)
        types = [event.type async for event in stream]
        assert types[0] == "response.created" and "response.output_text.delta" in types


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_reads_a_stream_that_ends_with_done(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": true}'
        command = [
            "curl", "-sS", "-N", "--unix-socket", http_socket(engine), "http://engine/v1/chat/completions",
            "-H", "content-type: application/json", "-d", body % MODEL,
        ]  # fmt: skip
        with trio.fail_after(60):
            done = await trio.run_process(command, capture_stdout=True, check=True)
    events = [block for block in done.stdout.decode().split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-1])
    assert not any('"usage"' in event for event in events)


async def test_a_client_that_leaves_mid_stream_closes_the_upstream_stream(short_tmp: Path) -> None:
    async with simulator(per_token_latency_ms=20.0) as url, http_engine(short_tmp, url) as (engine, _):
        transport = httpx.AsyncHTTPTransport(uds=http_socket(engine))
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": LONG_REPLY, "stream": True}
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://engine") as client,
            client.stream("POST", "/v1/chat/completions", json=body) as reply,
        ):
            assert reply.status_code == 200
            seen = 0
            async for line in reply.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break  # leaving the block closes the connection mid-stream

        async def upstream_closed() -> bool:
            return bool((await simulator_stats(url))["streams_closed_by_client"] == 1)

        async def budget_settled() -> bool:
            return settled((await engine_stats(engine))["lanes"][MODEL])

        await until(upstream_closed)
        await until(budget_settled)
        stats = await engine_stats(engine)
        assert stats["engine"]["outstanding"] == 0
        assert stats["engine"]["http_requests"]["disconnected"] == 1
        assert (await simulator_stats(url))["ok"] == 0
        # The engine carries on.
        with unix_sdk(engine, max_retries=0) as sdk:
            assert (await in_thread(stream_chat_sync, sdk))[-1].choices[0].finish_reason


async def test_the_sdk_read_timeout_bounds_the_wait_for_a_stream_not_its_length(short_tmp: Path) -> None:
    """The SDK's timeout is httpx's read timeout: the longest gap between two reads. A stream that outlasts it
    while its chunks keep coming is fine talking to the upstream directly, so it must be through the engine."""
    tokens = 40
    long_replies = {"output_tokens_min": 1000, "output_tokens_max": 1000}  # every reply runs to max_tokens
    async with simulator(per_token_latency_ms=50.0, **long_replies) as url, http_engine(short_tmp, url) as (engine, _):
        with unix_sdk(engine, max_retries=0, timeout=1.5) as sdk:  # 40 tokens at 50 ms: about 2 s in all
            chunks = await in_thread(stream_chat_sync, sdk, max_tokens=tokens)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(content.split()) == tokens


async def test_a_stream_that_breaks_after_it_started_ends_with_an_error_event(short_tmp: Path) -> None:
    # Every reply is cut halfway through its body: the first events reach the client, then the stream breaks.
    async with simulator(reset_rate=1.0, per_token_latency_ms=0.0) as url, http_engine(short_tmp, url) as (engine, _):
        with unix_sdk(engine, max_retries=0) as client:

            def read() -> tuple[list[Any], openai.APIError | None]:
                received: list[Any] = []
                try:
                    for chunk in client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, max_tokens=LONG_REPLY, stream=True
                    ):
                        received.append(chunk)
                except openai.APIError as exc:
                    return received, exc
                return received, None

            received, error = await in_thread(read)
        assert received, "the events before the break reach the client as they came"
        assert error is not None and "stream broke after it had started" in error.message
        lane = (await engine_stats(engine))["lanes"][MODEL]
        # Not retried: part of the reply had reached the client.
        assert lane["failed"] == 1 and lane["retries"] == 0
        assert settled(lane)


async def test_failures_before_the_first_event_are_retried(short_tmp: Path) -> None:
    async with simulator(fail_rate=0.5, seed=7) as url, http_engine(short_tmp, url) as (engine, _):
        with unix_sdk(engine, max_retries=0) as client:
            for _ in range(6):
                chunks = await in_thread(stream_chat_sync, client)
                assert chunks[-1].choices[0].finish_reason
        lane = (await engine_stats(engine))["lanes"][MODEL]
        assert lane["succeeded"] == 6 and lane["retries"] > 0
