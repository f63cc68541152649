"""The OpenAI HTTP front end to end: the engine as a real subprocess, the official SDK and curl as clients, the
simulator (or a recording upstream) as a real HTTP upstream."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pydantic
import pytest
import trio
from conftest import TEST_API_KEY, EngineProcess, engine_command, engine_env, running_engine, simulator
from raw_client import RawClient, chat

CLIENT_KEY = "tm-client-key-alice-0123456789abcdef"
MODEL = "gpt-4o-mini"
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def write_keys(directory: Path, mode: int = 0o600, **keys: str) -> Path:
    path = directory / "keys.toml"
    path.write_text("[keys]\n" + "".join(f'{name} = "{key}"\n' for name, key in keys.items()))
    path.chmod(mode)
    return path


@asynccontextmanager
async def http_engine(
    directory: Path, base_url: str, *extra: str, open_files: int | None = None
) -> AsyncIterator[tuple[EngineProcess, str]]:
    """An engine serving HTTP on its Unix socket and on a loopback port with one client key (alice)."""
    keys = write_keys(directory, alice=CLIENT_KEY)
    port = free_port()
    args = ("--http", f"127.0.0.1:{port}", "--http-keys-file", str(keys), *extra)
    async with running_engine(directory, base_url, *args, open_files=open_files) as engine:
        yield engine, f"http://127.0.0.1:{port}/v1"


def http_socket(engine: EngineProcess) -> str:
    return str(engine.socket) + ".http"


def unix_sdk(engine: EngineProcess, **options: Any) -> openai.OpenAI:
    transport = httpx.HTTPTransport(uds=http_socket(engine))
    return openai.OpenAI(
        api_key="unused", base_url="http://engine/v1", http_client=httpx.Client(transport=transport), **options
    )


def async_unix_sdk(engine: EngineProcess, **options: Any) -> openai.AsyncOpenAI:
    transport = httpx.AsyncHTTPTransport(uds=http_socket(engine))
    return openai.AsyncOpenAI(
        api_key="unused", base_url="http://engine/v1", http_client=httpx.AsyncClient(transport=transport), **options
    )


async def in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    # The simulator runs on this test's event loop: blocking SDK calls must not stall it.
    return await trio.to_thread.run_sync(partial(function, *args, **kwargs))


@attrs.frozen
class Ran:
    returncode: int
    stderr: str


async def run(command: list[str]) -> Ran:
    with trio.fail_after(60):
        done = await trio.run_process(command, env=engine_env(), capture_stdout=True, capture_stderr=True, check=False)
    return Ran(done.returncode, done.stderr.decode())


def floats_from_base64(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def engine_stats(engine: EngineProcess) -> dict[str, Any]:
    async with await RawClient.connect(str(engine.socket)) as client:
        return await client.request({"type": "stats", "id": "s"})


class Answer(pydantic.BaseModel):
    city: str
    population: int
    landmarks: list[str]


def exercise_sync(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-request-id"].startswith("req_")
    assert "openai-processing-ms" in raw.headers
    assert raw.headers["x-trio-mapper-attempts"] == "1"
    assert int(raw.headers["x-trio-mapper-queued-ms"]) >= 0
    # The engine's budget for the model (its --rpm/--tpm), in OpenAI's format; not the upstream's headers.
    assert raw.headers["x-ratelimit-limit-requests"] == "100000"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000000"
    assert 0 <= int(raw.headers["x-ratelimit-remaining-requests"]) <= 100000  # refills 1,666/s
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=8).choices[0].text
    response = client.responses.create(model=MODEL, input="Say hello", max_output_tokens=20)
    assert response.output_text
    floats = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], encoding_format="float")
    assert len(floats.data) == 2 and isinstance(floats.data[0].embedding[0], float)
    # The SDK asks for base64 by default and decodes it itself; ask raw to see the bytes travel intact.
    encoded = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="a", encoding_format="base64"
    )
    vector = floats_from_base64(json.loads(encoded.text)["data"][0]["embedding"])
    assert vector == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert client.embeddings.create(model="text-embedding-3-small", input="a").data[0].embedding == pytest.approx(
        vector
    )
    # Structured outputs: `response_format`/`text.format` travel to the upstream intact, and the SDK's
    # helpers parse what comes back (streamed too).
    parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Answer)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES, response_format=Answer) as stream:
        assert isinstance(stream.get_final_completion().choices[0].message.parsed, Answer)
    assert isinstance(client.responses.parse(model=MODEL, input="hi", text_format=Answer).output_parsed, Answer)
    # An agent's loop: the model calls a tool (streamed, its arguments in pieces), the tool's result goes back,
    # the model answers. Tools and calls travel both ways intact.
    tools = [openai.pydantic_function_tool(Answer)]
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES, tools=tools) as stream:
        called = stream.get_final_completion().choices[0].message
    assert called.tool_calls is not None
    assert isinstance(called.tool_calls[0].function.parsed_arguments, Answer)
    result = {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": "done"}
    messages = [*MESSAGES, called.model_dump(exclude_none=True), result]
    answered = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=20)
    assert answered.choices[0].message.content and answered.choices[0].message.tool_calls is None
    models = client.models.list()
    assert any(model.id == MODEL for model in models.data)
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("ft:gpt-4o-mini:acme:nightly:9ZxY").id == "ft:gpt-4o-mini:acme:nightly:9ZxY"


async def test_sdk_sync_and_async_over_the_unix_socket(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        with unix_sdk(engine) as client:
            await in_thread(exercise_sync, client)
        async with async_unix_sdk(engine) as aclient:
            completion = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
            assert completion.choices[0].message.content
            embeddings = await aclient.embeddings.create(model="text-embedding-3-small", input="a")
            assert len(embeddings.data[0].embedding) > 10
            response = await aclient.responses.create(model=MODEL, input="hi")
            assert response.output_text
            parsed = await aclient.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Answer)
            assert isinstance(parsed.choices[0].message.parsed, Answer)
            assert [m async for m in aclient.models.list()]
        assert os.stat(http_socket(engine)).st_mode & 0o777 == 0o660
        assert await engine.stop() == 0
        assert not await trio.Path(http_socket(engine)).exists()
        assert TEST_API_KEY not in engine.log


async def test_models_retrieve_takes_the_ids_of_openai_compatible_servers(short_tmp: Path) -> None:
    """vLLM, TGI and most OpenAI-compatible servers name models after their repositories
    (``meta-llama/Llama-3.1-8B-Instruct``); the SDK's models.retrieve sends the slash as %2F. The engine answered
    404 (and 400 for a space or an accent) where the upstream itself answers, whichever way the id is spelled."""
    ids = ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5 7B", "modèle"]
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        with unix_sdk(engine, max_retries=0) as client:
            for model in ids:
                assert (await in_thread(client.models.retrieve, model)).id == model
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=http_socket(engine))) as http:
            # An older client that leaves the slash as it is: the rest of the path is still the id.
            literal = await http.get("http://engine/v1/models/meta-llama/Llama-3.1-8B-Instruct")
            # An id must still not climb out of models/ once the upstream decodes it.
            climbing = [
                await http.get("http://engine/v1/models/" + target)
                for target in ("..%2F..%2Ffiles", "x%2F..%2F..%2Ffiles", "%2E%2E", "a%5C..%5Cfiles")
            ]
    assert literal.status_code == 200 and literal.json()["id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert [reply.status_code for reply in climbing] == [400] * len(climbing)


async def test_sdk_over_tcp_needs_a_client_key(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        with openai.OpenAI(api_key=CLIENT_KEY, base_url=tcp_url) as client:
            await in_thread(exercise_sync, client)
        async with openai.AsyncOpenAI(api_key=CLIENT_KEY, base_url=tcp_url) as aclient:
            assert (await aclient.chat.completions.create(model=MODEL, messages=MESSAGES)).choices
            with pytest.raises(openai.AuthenticationError) as wrong:
                await aclient.with_options(api_key="tm-wrong-key-0123456789abcdef").models.list()
        assert wrong.value.code == "invalid_api_key"
        async with httpx.AsyncClient() as http:
            missing = await http.post(tcp_url + "/chat/completions", json={"model": MODEL, "messages": MESSAGES})
            basic = await http.get(tcp_url + "/models", headers={"authorization": f"Basic {CLIENT_KEY}"})
        assert missing.status_code == 401 and basic.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        stats = (await engine_stats(engine))["engine"]
        assert stats["http_requests"]["unauthorized"] == 3
        assert CLIENT_KEY not in engine.log and TEST_API_KEY not in engine.log


async def test_the_sdk_given_the_msgpack_socket_is_told_where_the_http_api_is(short_tmp: Path) -> None:
    """`engine.sock` for `engine.sock.http` is an easy slip: it gave the SDK "Connection error." (its HTTP
    parser read a msgpack frame) and the log "sent a frame of 1347375956 bytes"."""
    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        transport = httpx.AsyncHTTPTransport(uds=str(engine.socket))
        async with openai.AsyncOpenAI(
            api_key="unused", base_url="http://engine/v1", http_client=httpx.AsyncClient(transport=transport)
        ) as client:
            with pytest.raises(openai.BadRequestError) as wrong:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert wrong.value.code == "wrong_socket"
        assert f"point HTTP clients at {http_socket(engine)} or {tcp_url} " in wrong.value.message
        assert wrong.value.response.headers["x-should-retry"] == "false"
        assert "spoke HTTP on the msgpack socket" in engine.log
        # The msgpack socket still serves msgpack clients.
        async with await RawClient.connect(str(engine.socket)) as raw:
            assert (await raw.request(chat(1)))["type"] == "result"


async def test_each_error_kind_raises_the_matching_sdk_exception(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url, "--max-attempts", "1") as (engine, _):
        with unix_sdk(engine, max_retries=0) as client:

            def errors() -> dict[str, openai.APIStatusError]:
                found: dict[str, openai.APIStatusError] = {}
                calls: dict[str, Any] = {
                    "invalid_request": lambda: client.chat.completions.create(model=MODEL, messages="not a list"),  # type: ignore[arg-type]
                    "too_large": lambda: client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, max_tokens=50_000_000
                    ),
                    "not_found": lambda: client.get("/files", cast_to=object),
                    "wrong_method": lambda: client.get("/chat/completions", cast_to=object),
                }
                for name, call in calls.items():
                    try:
                        call()
                    except openai.APIStatusError as exc:
                        found[name] = exc
                return found

            found = await in_thread(errors)
        assert isinstance(found["invalid_request"], openai.BadRequestError)
        assert found["invalid_request"].code == "invalid_request"
        assert found["invalid_request"].param == "messages"
        assert isinstance(found["too_large"], openai.BadRequestError)
        assert found["too_large"].code == "request_too_large"
        assert isinstance(found["not_found"], openai.NotFoundError)
        assert "POST /v1/chat/completions" in found["not_found"].message
        assert found["wrong_method"].status_code == 405
        for exc in found.values():
            assert exc.response.headers["x-should-retry"] == "false"
            assert set(exc.body) >= {"message", "type", "param", "code"}  # type: ignore[arg-type]


async def test_the_priority_header_names_a_class_in_any_case(short_tmp: Path) -> None:
    async with (
        simulator() as url,
        http_engine(short_tmp, url) as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
    ):
        reply = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"X-Trio-Mapper-Priority": "Batch"}
        )
        assert reply.choices
        with pytest.raises(openai.BadRequestError, match="'urgent' is not a class; use one of"):
            await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_headers={"x-trio-mapper-priority": "Urgent"}
            )


async def test_upstream_failures_pass_through_and_are_not_retried_by_the_sdk(short_tmp: Path) -> None:
    async with (
        simulator(insufficient_quota=True) as quota_url,
        http_engine(short_tmp, quota_url, "--max-attempts", "1") as (engine, _),
        async_unix_sdk(engine, max_retries=2) as client,
    ):
        with pytest.raises(openai.RateLimitError) as quota:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert quota.value.code == "insufficient_quota"
        assert quota.value.response.headers["x-should-retry"] == "false"
        assert quota.value.response.headers["x-trio-mapper-attempts"] == "1"
        stats = (await engine_stats(engine))["engine"]
        assert stats["http_requests"]["requests"] == 1  # x-should-retry: false kept the SDK from retrying


async def test_server_errors_timeouts_and_an_unreachable_upstream(short_tmp: Path) -> None:
    async with (
        simulator(fail_rate=1.0) as failing_url,
        http_engine(short_tmp, failing_url, "--max-attempts", "2") as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
    ):
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert failed.value.status_code == 500 and failed.value.type == "server_error"  # the upstream's own body
        assert failed.value.response.headers["x-trio-mapper-attempts"] == "2"
        assert failed.value.response.headers["x-should-retry"] == "false"
    (short_tmp / "slow").mkdir()
    async with (
        simulator(latency_ms=1500.0) as slow_url,
        http_engine(short_tmp / "slow", slow_url, "--rpm", "1") as (engine, _),
        async_unix_sdk(engine, max_retries=0, timeout=2.0) as client,
    ):
        # x-stainless-read-timeout (2 s) less a margin is the deadline, but an attempt already sent runs on
        # until the SDK gives up: this answer, 1.5 s away, still reaches it.
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        # One request a minute: this one waits for the budget, and is answered before the SDK gives up.
        started = trio.current_time()
        with pytest.raises(openai.InternalServerError) as timed_out:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert trio.current_time() - started < 2.0
        assert timed_out.value.status_code == 504
        assert timed_out.value.code == "timeout"
        assert "rpm/tpm budget" in timed_out.value.message
        assert "from the SDK's timeout (2s): it starts no upstream attempt later than 1s" in timed_out.value.message
        assert timed_out.value.response.headers["retry-after"] == "1"  # it may work later: the SDK may retry
    (short_tmp / "slower").mkdir()
    async with (
        simulator(latency_ms=4000.0) as slower_url,
        http_engine(short_tmp / "slower", slower_url) as (engine, _),
        async_unix_sdk(engine, max_retries=0, timeout=1.0) as client,
    ):
        # Sent at once, slower than the SDK's timeout: the SDK gives up first, as it would on the upstream.
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        with trio.fail_after(2):  # withdrawn when the SDK went away, not left running for 3 s more
            while (await engine_stats(engine))["engine"]["outstanding"]:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
    (short_tmp / "gone").mkdir()
    async with (
        http_engine(short_tmp / "gone", f"http://127.0.0.1:{free_port()}/v1", "--max-attempts", "1") as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
    ):
        with pytest.raises(openai.InternalServerError) as unreachable:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert unreachable.value.status_code == 502
        assert unreachable.value.code == "upstream_unreachable"


def recorder(client: openai.AsyncOpenAI, messages: Any, outcomes: dict[str, Any]) -> Callable[[str], Awaitable[None]]:
    """A chat that records its reply, or its status error, in ``outcomes`` under the name it is given."""

    async def call(name: str) -> None:
        try:
            outcomes[name] = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
        except openai.APIStatusError as exc:
            outcomes[name] = exc

    return call


async def first_and_second(client: openai.AsyncOpenAI, messages: Any) -> tuple[Any, Any]:
    """Two chats, the second sent while the first is still being answered: each one's reply or error."""
    outcomes: dict[str, Any] = {}
    call = recorder(client, messages, outcomes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "first")
        await trio.sleep(0.5)
        nursery.start_soon(call, "second")
    return outcomes["first"], outcomes["second"]


async def test_bodies_past_max_queued_bytes_answer_503_and_say_which_limit(short_tmp: Path) -> None:
    big: list[Any] = [{"role": "user", "content": "word " * 20_000}]  # 100 kB of JSON
    async with (
        simulator(latency_ms=1500.0) as url,
        http_engine(short_tmp, url, "--max-queued-bytes", "150000", "--max-frame-bytes", "150000") as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
    ):
        first, overloaded = await first_and_second(client, big)
        assert first.choices
        assert isinstance(overloaded, openai.InternalServerError) and overloaded.code == "overloaded"
        assert "max_queued_bytes" in overloaded.message
        stats = (await engine_stats(engine))["engine"]
        assert stats["max_queued_bytes"] == 150_000 and stats["queued_bytes"] == 0


async def test_overloaded_and_shutdown_answer_503(short_tmp: Path) -> None:
    async with (
        simulator(latency_ms=1500.0) as url,
        http_engine(short_tmp, url, "--max-queued", "1") as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
    ):
        first, overloaded = await first_and_second(client, MESSAGES)
        assert first.choices
        assert isinstance(overloaded, openai.InternalServerError) and overloaded.status_code == 503
        assert overloaded.code == "overloaded"
        assert overloaded.response.headers["retry-after"] == "1"
        assert overloaded.response.headers["retry-after-ms"] == "1000"  # what the SDK reads first
    (short_tmp / "stop").mkdir()
    async with (
        simulator(latency_ms=1500.0) as url,
        # One request at a time: the second waits in the queue when SIGTERM comes.
        http_engine(short_tmp / "stop", url, "--max_concurrent_reqs", "1") as (engine, _),
        async_unix_sdk(engine, max_retries=0) as client,
    ):
        outcomes: dict[str, Any] = {}
        call = recorder(client, MESSAGES, outcomes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "in_flight")
            await trio.sleep(0.3)
            nursery.start_soon(call, "queued")
            await trio.sleep(0.3)
            engine.process.send_signal(signal.SIGTERM)
            await trio.sleep(0.3)
            # Stopped accepting (the socket file is gone) while the request in flight is still running.
            assert not await trio.Path(http_socket(engine)).exists()
            assert "in_flight" not in outcomes
        assert outcomes["in_flight"].choices  # finished within the grace period
        queued = outcomes["queued"]
        assert isinstance(queued, openai.InternalServerError) and queued.status_code == 503
        assert queued.code == "shutting_down"
        with trio.fail_after(30):
            assert await engine.process.wait() == 0


async def test_msgpack_and_http_clients_share_one_lane(short_tmp: Path) -> None:
    # 60 rpm: a bucket of 60 that refills one request a second, so what both fronts spent shows in the headers.
    async with simulator() as url, http_engine(short_tmp, url, "--rpm", "60") as (engine, tcp_url):
        async with await RawClient.connect(str(engine.socket)) as raw:
            for i in range(3):
                assert (await raw.request(chat(i)))["type"] == "result"
        async with async_unix_sdk(engine) as client:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            # Over 64 KiB: counted in the engine's worker thread, like a large msgpack frame.
            large = [{"role": "user", "content": "word " * 20_000}]
            await client.chat.completions.create(model=MODEL, messages=large, max_tokens=5)
        async with openai.AsyncOpenAI(api_key=CLIENT_KEY, base_url=tcp_url) as tcp_client:
            await tcp_client.chat.completions.create(model=MODEL, messages=MESSAGES)
            last = await tcp_client.with_options(max_retries=0).chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, extra_headers={"x-stainless-retry-count": "1"}
            )
        # Seven requests through both fronts came out of the one bucket of 60 (less what refilled meanwhile).
        assert last.headers["x-ratelimit-limit-requests"] == "60"
        assert int(last.headers["x-ratelimit-remaining-requests"]) <= 57
        stats = await engine_stats(engine)
        lane = stats["lanes"][MODEL]
        assert lane["succeeded"] == 7
        assert stats["engine"]["http_requests"]["requests"] == 4
        assert stats["engine"]["http_requests"]["sdk_retries"] == 1


async def test_the_budget_headers_count_the_request_they_answer(short_tmp: Path) -> None:
    """As OpenAI's do: at 60 rpm (a bucket of 60 refilling one a second), the replies to the second and third
    requests say 58 and 57 are left, not the 59 and 58 there were before each was charged."""
    async with (
        simulator() as url,
        http_engine(short_tmp, url, "--rpm", "60") as (engine, _),
        async_unix_sdk(engine) as client,
    ):
        # The first reply shows the engine the upstream's burst: its bucket grows from a second's worth to 60.
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        whole = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        async with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, stream=True
        ) as streamed:
            await streamed.read()
    assert whole.headers["x-ratelimit-limit-requests"] == "60"
    assert (whole.headers["x-ratelimit-remaining-requests"], streamed.headers["x-ratelimit-remaining-requests"]) == (
        "58",
        "57",
    )


@asynccontextmanager
async def recording_upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An upstream that answers every request with one chat completion and records what arrived."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    seen: list[dict[str, Any]] = []
    reply = json.dumps(
        {"id": "c", "object": "chat.completion", "created": 0, "model": MODEL, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
    ).encode()  # fmt: skip

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(
            {
                "path": scope["path"],
                "headers": [(k.decode().lower(), v.decode()) for k, v in scope["headers"]],
                "body": body,
            }
        )
        headers = [(b"content-type", b"application/json"), (b"x-request-id", b"req_recorded")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, mode="asgi"))  # type: ignore[arg-type]
        try:
            yield binds[0] + "/v1", seen
        finally:
            nursery.cancel_scope.cancel()


async def raw_http(path: str, request: bytes) -> bytes:
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_clients_cannot_choose_the_host_nor_smuggle_headers(short_tmp: Path) -> None:
    body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
    async with recording_upstream() as (url, seen), http_engine(short_tmp, url) as (engine, tcp_url):
        async with httpx.AsyncClient() as http:
            response = await http.post(
                tcp_url + "/chat/completions",
                content=body,
                headers={
                    "authorization": f"Bearer {CLIENT_KEY}",
                    "host": "evil.example",
                    "x-forwarded-host": "evil.example",
                    "openai-beta": "assistants=v2",
                    "openai-organization": "org-evil",
                    "proxy-authorization": "Basic c2VjcmV0",
                    "connection": "keep-alive, x-smuggled",
                    "x-smuggled": "1",
                    "keep-alive": "timeout=5",
                    "te": "trailers",
                    "cookie": "a=b",
                },
            )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "req_recorded"
        sock = http_socket(engine)
        absolute = await raw_http(
            sock,
            b"POST http://evil.example/v1/chat/completions HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
        )
        dotted = await raw_http(sock, b"GET /v1/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        query = await raw_http(sock, b"GET /v1/models?url=http://evil HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 404 " in dotted.split(b"\r\n")[0] and b" 404 " in query.split(b"\r\n")[0]
        assert b"/v1/models takes no query string" in query
        for target in (b"/v1/models/..", b"/v1/models/%2E%2E", b"/v1/models/a/../../files"):
            climbing = await raw_http(sock, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert climbing.split(b"\r\n")[0].split()[1] in (b"400", b"404"), (target, climbing)
        log = engine.log
    # An absolute-form target is not one of the served paths: refused, nothing sent anywhere.
    assert absolute.startswith(b"HTTP/1.1 404 ") and b"POST /v1/chat/completions" in absolute
    assert len(seen) == 1
    # Whatever the client said, every request that arrived went to the recording upstream's own path and host.
    assert seen and all(request["path"] == "/v1/chat/completions" for request in seen)
    upstream_host = url.removeprefix("http://").removesuffix("/v1")
    for request in seen:
        headers = dict(request["headers"])
        names = {name for name, _ in request["headers"]}
        assert headers["authorization"] == f"Bearer {TEST_API_KEY}"
        assert headers["host"] == upstream_host
        assert not names & {"proxy-authorization", "x-smuggled", "keep-alive", "te", "cookie", "x-forwarded-host"}
        assert "org-evil" not in str(request["headers"])
        assert [v for n, v in request["headers"] if n == "authorization"] == [f"Bearer {TEST_API_KEY}"]
    assert dict(seen[0]["headers"])["openai-beta"] == "assistants=v2"
    for text in (response.text, str(response.headers), absolute.decode(), dotted.decode(), log):
        assert TEST_API_KEY not in text and CLIENT_KEY not in text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_over_the_unix_socket(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        result = await trio.run_process(
            ["curl", "-sS", "-i", "--unix-socket", http_socket(engine), "http://engine/v1/chat/completions",
             "-H", "content-type: application/json",
             "-d", json.dumps({"model": MODEL, "messages": MESSAGES})],
            capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
        head, _, body = result.stdout.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200"), result.stdout
        assert json.loads(body)["object"] == "chat.completion"
        assert "x-trio-mapper-attempts: 1" in head.lower()


async def test_a_port_or_an_http_socket_in_use_is_a_clear_start_up_error(short_tmp: Path) -> None:
    """An operator's finding: --http on a port something else holds failed with a bare "Address already in
    use", saying neither what might hold it nor what to change; and the HTTP socket's errors named --socket."""
    keys = write_keys(short_tmp, alice=CLIENT_KEY)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        taken = await run(
            engine_command(
                short_tmp / "e.sock", "http://127.0.0.1:1/v1", "--http", address, "--http-keys-file", str(keys)
            )
        )
    # Exit 1, as for a socket another engine listens on (2 is for settings): systemd restarts it, which helps
    # when the holder is an engine on its way out.
    assert taken.returncode == 1, taken.stderr
    assert f"cannot listen on {address}: the port is in use, probably by another engine" in taken.stderr
    assert f"curl -s http://{address}/healthz" in taken.stderr
    assert 'choose another port: --http HOST:PORT, or http = "HOST:PORT" under [server]' in taken.stderr
    assert "Traceback" not in taken.stderr
    assert not (short_tmp / "e.sock").exists() and not (short_tmp / "e.sock.http").exists(), "nothing left behind"

    async with simulator() as url, running_engine(short_tmp, url) as engine:
        second = await run(engine_command(short_tmp / "other.sock", url, "--http-socket", http_socket(engine)))
        assert second.returncode == 1, second.stderr
        assert (
            f"another engine is starting or running on {http_socket(engine)}; stop it first or choose another "
            "--http-socket" in second.stderr
        )
        assert not (short_tmp / "other.sock").exists()


async def test_keys_file_checks_and_sighup_reload(short_tmp: Path) -> None:
    keys = write_keys(short_tmp, 0o644, alice=CLIENT_KEY)
    port = free_port()
    command = engine_command(
        short_tmp / "e.sock", "http://127.0.0.1:1/v1", "--http", f"127.0.0.1:{port}", "--http-keys-file", str(keys)
    )
    refused = await run(command)
    # A settings error, found when the engine reads the file: exit status 2, which systemd does not restart.
    assert refused.returncode == 2 and "readable or writable by everyone" in refused.stderr
    assert CLIENT_KEY not in refused.stderr
    outside = await run([*command[:-4], "--http", "0.0.0.0:8765"])
    assert outside.returncode == 2 and "loopback" in outside.stderr
    no_keys = await run([*command[:-4], "--http", f"127.0.0.1:{port}"])
    assert no_keys.returncode == 2 and "http_keys_file" in no_keys.stderr
    # An engine whose upstream is its own front would call itself for every request (a tool's
    # OPENAI_BASE_URL left in the engine's environment): refused at start, saying so.
    write_keys(short_tmp, alice=CLIENT_KEY)
    for own in (f"http://127.0.0.1:{port}/v1", f"http://localhost:{port}/v1"):
        loop = await run([*command[:6], "--base-url", own, *command[8:]])
        assert loop.returncode == 2 and "this engine's own HTTP front" in loop.stderr, loop.stderr

    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        bob = "tm-client-key-bob-0123456789abcdef"
        async with openai.AsyncOpenAI(api_key=bob, base_url=tcp_url, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
            write_keys(short_tmp, bob=bob)
            engine.process.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                while "reloaded" not in engine.log:  # noqa: ASYNC110 - another process's log: only the clock
                    await trio.sleep(0.05)
            assert "reloaded: http client keys (added bob; removed alice)" in engine.log  # names, never keys
            assert (await client.models.list()).data
        async with openai.AsyncOpenAI(api_key=CLIENT_KEY, base_url=tcp_url, max_retries=0) as alice:
            with pytest.raises(openai.AuthenticationError):
                await alice.models.list()
        # An empty [keys] table closes the port to everyone: allowed (a way to lock it for a while), but
        # rarely meant, so said loudly.
        write_keys(short_tmp)
        engine.process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while "holds no keys" not in engine.log:  # noqa: ASYNC110 - another process's log: only the clock
                await trio.sleep(0.05)
        assert "every request to the TCP port is refused 401 until keys are added" in engine.log
