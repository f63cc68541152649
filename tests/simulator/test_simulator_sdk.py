"""Fidelity: the official openai SDK talks to the simulator and strictly validates every reply.

The SDK builds its response objects without validation, so each raw body is also checked with the
SDK's pydantic models (`model_validate`), which fails on a missing or mistyped required field.
The sync client runs in a worker thread while the simulator serves in the test's Trio loop.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import openai
import pytest
import trio
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from simulator_fixtures import API_KEY, MODEL, fast_config, with_sdk

from trio_mapper.simulator import SimulatorConfig, open_simulator

MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]
STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


async def test_every_endpoint_parses_into_sdk_types() -> None:
    def work(client: openai.OpenAI) -> dict[str, Any]:
        out: dict[str, Any] = {}
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        out["chat"] = (raw.parse(), raw.http_response.json())
        raw_c = client.completions.with_raw_response.create(model="gpt-3.5-turbo-instruct", prompt="Once")
        out["completion"] = (raw_c.parse(), raw_c.http_response.json())
        raw_e = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
        out["embedding_b64"] = (raw_e.parse(), raw_e.http_response.json())
        out["embedding_float"] = client.embeddings.create(
            model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
        )
        raw_r = client.responses.with_raw_response.create(model=MODEL, input="Hi", max_output_tokens=16)
        out["response"] = (raw_r.parse(), raw_r.http_response.json())
        out["models"] = list(client.models.list())
        out["model"] = client.models.retrieve("gpt-4o")
        return out

    out = await with_sdk(fast_config(), work)

    chat, chat_raw = out["chat"]
    ChatCompletion.model_validate(chat_raw)
    assert isinstance(chat, ChatCompletion)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    assert isinstance(chat.choices[0].message.content, str)

    completion, completion_raw = out["completion"]
    Completion.model_validate(completion_raw)
    assert completion.choices[0].text

    embedding_b64, embedding_raw = out["embedding_b64"]
    # The SDK asks for base64 by default and decodes it to floats itself.
    assert isinstance(embedding_raw["data"][0]["embedding"], str)
    floats = out["embedding_float"]
    CreateEmbeddingResponse.model_validate(floats.model_dump())
    assert embedding_b64.data[0].embedding == floats.data[0].embedding
    raw = base64.b64decode(embedding_raw["data"][1]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == floats.data[1].embedding

    response, response_raw = out["response"]
    Response.model_validate(response_raw)
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens <= 16

    for model in out["models"]:
        Model.model_validate(model.model_dump())
    assert MODEL in {m.id for m in out["models"]}
    assert out["model"].id == "gpt-4o"


async def test_chat_streaming_with_include_usage() -> None:
    def work(client: openai.OpenAI) -> list[ChatCompletionChunk]:
        stream = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        return list(stream)

    chunks = await with_sdk(fast_config(per_token_latency_ms=1.0), work)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def _check_response_stream(events: list[Any], final: Response) -> None:
    """Every event validates strictly, and the final response agrees with the deltas it followed."""
    for event in events:
        STREAM_EVENT.validate_python(event.model_dump())
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.usage is not None
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert last.response.usage.output_tokens == len(deltas)
    assert final.id == last.response.id
    assert final.output_text == "".join(deltas)
    assert final.usage is not None
    assert final.usage.total_tokens == final.usage.input_tokens + len(deltas)


async def test_responses_streaming_sync_sdk() -> None:
    def work(client: openai.OpenAI) -> tuple[list[Any], Response, Response]:
        events = list(client.responses.create(model=MODEL, input="Hello", stream=True))
        with client.responses.stream(model=MODEL, input="Hello") as stream:
            final = stream.get_final_response()
        return events, events[-1].response, final

    events, created_final, streamed_final = await with_sdk(fast_config(per_token_latency_ms=1.0), work)
    _check_response_stream(events, created_final)
    assert streamed_final.status == "completed"
    assert streamed_final.output_text


async def test_responses_streaming_async_sdk() -> None:
    async with (
        open_simulator(fast_config(per_token_latency_ms=1.0)) as url,
        openai.AsyncOpenAI(api_key=API_KEY, base_url=url, max_retries=0, timeout=10.0) as client,
    ):
        stream = await client.responses.create(model=MODEL, input="Hello", stream=True)
        events = [event async for event in stream]
        async with client.responses.stream(model=MODEL, input="Hello") as manager:
            final = await manager.get_final_response()
    _check_response_stream(events, events[-1].response)
    assert final.status == "completed"
    assert final.output_text


@pytest.mark.parametrize(
    ("config", "code", "type_"),
    [
        (fast_config(rpm=1), "rate_limit_exceeded", "requests"),
        (fast_config(tpm=40), "rate_limit_exceeded", "tokens"),
        (fast_config(insufficient_quota=True), "insufficient_quota", "insufficient_quota"),
    ],
)
async def test_sdk_sees_429s_as_rate_limit_errors(config: SimulatorConfig, code: str, type_: str) -> None:
    def work(client: openai.OpenAI) -> openai.RateLimitError:
        for _ in range(3):
            try:
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
            except openai.RateLimitError as error:
                return error
        raise AssertionError("no 429 within 3 requests")

    error = await with_sdk(config, work)
    assert error.status_code == 429
    assert error.code == code
    assert error.type == type_


async def test_sdk_sees_missing_key_as_authentication_error() -> None:
    async with open_simulator(fast_config(api_key="sk-right")) as url:
        client = openai.OpenAI(api_key="sk-wrong-key-123", base_url=url, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            await trio.to_thread.run_sync(client.models.list)
        await trio.to_thread.run_sync(client.close)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


async def test_sdk_sees_reset_as_connection_error() -> None:
    def work(client: openai.OpenAI) -> BaseException | None:
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        except openai.APIError as error:
            return error
        return None

    error = await with_sdk(fast_config(reset_rate=1.0), work)
    assert isinstance(error, openai.APIConnectionError)


async def test_sdk_sees_server_faults_as_status_errors() -> None:
    def work(client: openai.OpenAI) -> list[type[BaseException]]:
        seen: list[type[BaseException]] = []
        for _ in range(3):
            try:
                client.chat.completions.create(model=MODEL, messages=MESSAGES)
            except openai.APIStatusError as error:
                seen.append(type(error))
        return seen

    seen = await with_sdk(fast_config(fail_rate=1.0), work)
    assert seen == [openai.InternalServerError] * 3
