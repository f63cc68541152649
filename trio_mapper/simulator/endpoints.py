"""The API's request and reply shapes: what a request costs, and the JSON or SSE that answers it.

Parsing (``plan_request``) happens before admission and only counts; rendering happens after, from the
reply lengths the dice drew. Nothing here touches HTTP, buckets or time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final, Literal, final

import attrs
import msgspec

from .content import (
    DEFAULT_DIMENSIONS,
    EMBEDDING_DIMENSIONS,
    embedding_base64,
    embedding_vector,
    reply_tokens,
)
from .media import (
    DEFAULT_IMAGE_MODEL,
    DEFAULT_MODERATION_MODEL,
    MediaError,
    image_cost,
    image_reply,
    moderation_cost,
    moderation_reply,
    speech_audio,
    speech_cost,
)
from .structured import SchemaError, instance, requested_schema
from .tokens import InputError, TokenCounter
from .tools import ToolCall, requested_tool_call

Kind = Literal["chat", "completions", "embeddings", "responses", "moderations", "images", "speech"]
#: Endpoints that generate no text (nothing drawn from the dice): their replies are functions of the request.
MEDIA_KINDS: Final = frozenset({"moderations", "images", "speech"})
#: The model these endpoints use when the request names none, as the API documents.
_DEFAULT_MODELS: Final = {"moderations": DEFAULT_MODERATION_MODEL, "images": DEFAULT_IMAGE_MODEL}

# The legacy completions endpoint defaults max_tokens to 16 (documented API behaviour).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 128
# The API's own cap on inputs per embeddings request; with MAX_CHOICES it also bounds the work one
# request can ask for.
MAX_INPUTS = 2048
SYSTEM_FINGERPRINT = "fp_simulator"

_encoder = msgspec.json.Encoder()


class RequestError(Exception):
    """A 400 the API would answer; carries the ``param`` and ``code`` fields of the error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@final
@attrs.frozen
class Plan:
    """A parsed request: what it costs at admission and what to generate once admitted."""

    kind: Kind
    model: str
    prompt_tokens: int
    cost: int
    # Number of texts to generate (choices x prompts); 0 for embeddings.
    replies: int
    # Per-reply cap; None means "no cap given" (the natural length is used).
    max_tokens: int | None
    stream: bool
    include_usage: bool
    body: dict[str, Any]
    # Embeddings: tokens per input, in order.
    input_counts: tuple[int, ...] = ()
    # Structured outputs: the JSON schema every reply follows (`structured.requested_schema`).
    schema: dict[str, Any] | None = None
    # The function every reply calls instead of answering in words (`tools.requested_tool_call`).
    tool_call: ToolCall | None = None

    @property
    def reply_schema(self) -> dict[str, Any] | None:
        """The schema of the JSON each reply is (a tool call's arguments, else the response format's); None
        for replies in words. A model offered tools calls them before it answers in the format."""
        return self.tool_call.parameters if self.tool_call is not None else self.schema


@final
@attrs.frozen
class Reply:
    """One generated text as drawn by the dice."""

    start: int
    tokens: int
    truncated: bool
    #: A structured reply's JSON text, token by token; None for a reply of words.
    json_pieces: tuple[str, ...] | None = None
    #: The function the reply calls, ``json_pieces`` being its arguments; None for an answer.
    tool: str | None = None

    def pieces(self) -> Iterator[str]:
        """The reply's text, one token at a time."""
        return iter(self.json_pieces) if self.json_pieces is not None else reply_tokens(self.start, self.tokens)

    def text(self) -> str:
        return "".join(self.pieces())


def _missing(name: str) -> RequestError:
    return RequestError(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")


def _positive_int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python but not in JSON Schema.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(
            f"Invalid '{name}': expected an integer greater than or equal to 1, got {value!r}.",
            name,
            "invalid_value",
        )
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"Invalid type for '{name}': expected a boolean.", name, "invalid_type")
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def plan_request(kind: Kind, body: dict[str, Any], counter: TokenCounter, default_max_tokens: int) -> Plan:
    """Validate a request body and work out its admission cost.

    Cost = prompt tokens + per-reply cap x replies, where the cap is the request's own
    ``max_tokens``/``max_completion_tokens``/``max_output_tokens`` or ``default_max_tokens``;
    embeddings cost their input only.

    Raises:
        RequestError: the body would get a 400 from the real API.
    """
    model = body.get("model")
    if model is None and kind in _DEFAULT_MODELS:
        model = _DEFAULT_MODELS[kind]
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter")
    if kind in MEDIA_KINDS:
        return _media_plan(kind, model, body, counter)
    try:
        if kind == "chat":
            if "messages" not in body:
                raise _missing("messages")
            prompt = counter.messages(body["messages"])
            n = _positive_int(body, "n", 1) or 1
            cap = _positive_int(body, "max_completion_tokens", None) or _positive_int(body, "max_tokens", None)
            stream = _flag(body, "stream")
            replies = n
        elif kind == "completions":
            if "prompt" not in body:
                raise _missing("prompt")
            counts = counter.prompts(body["prompt"])
            prompt = sum(counts)
            n = _positive_int(body, "n", 1) or 1
            cap = _positive_int(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
            stream = _flag(body, "stream")
            replies = n * len(counts)
        elif kind == "responses":
            if "input" not in body:
                raise _missing("input")
            prompt = counter.responses_input(body["input"], body.get("instructions"))
            n = 1
            cap = _positive_int(body, "max_output_tokens", None)
            stream = _flag(body, "stream")
            replies = 1
        else:
            if "input" not in body:
                raise _missing("input")
            counts = counter.embedding_inputs(body["input"])
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise RequestError(
                    f"Invalid value for 'encoding_format': {encoding!r}. Supported values are: 'float' and 'base64'.",
                    "encoding_format",
                    "invalid_value",
                )
            if len(counts) > MAX_INPUTS:
                raise RequestError(f"'$.input' must have at most {MAX_INPUTS} items.", "input", "invalid_value")
            native = EMBEDDING_DIMENSIONS.get(model, DEFAULT_DIMENSIONS)
            dimensions = _positive_int(body, "dimensions", native) or native
            if dimensions > native:
                raise RequestError(
                    f"Invalid 'dimensions': {model} returns at most {native}.", "dimensions", "invalid_value"
                )
            return Plan(kind, model, sum(counts), sum(counts), 0, None, False, False, body, tuple(counts))
        schema = requested_schema(kind, body)
        tool_call = requested_tool_call(kind, body)
        if body.get("tools"):
            prompt += counter.json(body["tools"])  # tool definitions are rendered into the prompt
    except (InputError, SchemaError) as error:
        raise RequestError(str(error), error.param, "invalid_value") from None
    if n > MAX_CHOICES:
        raise RequestError(f"Invalid 'n': must be at most {MAX_CHOICES}.", "n", "invalid_value")
    if replies > MAX_INPUTS:
        raise RequestError(f"'prompt' must have at most {MAX_INPUTS} items.", "prompt", "invalid_value")
    cost = prompt + (cap if cap is not None else default_max_tokens) * replies
    # Responses streams always end with the usage; `stream_options.include_usage` is a chat/completions knob.
    include_usage = stream and kind != "responses" and _include_usage(body)
    return Plan(
        kind, model, prompt, cost, replies, cap, stream, include_usage, body, schema=schema, tool_call=tool_call
    )


def _media_plan(kind: Kind, model: str, body: dict[str, Any], counter: TokenCounter) -> Plan:
    """A moderation, image or speech request: its cost is all it is charged (nothing is drawn at admission)."""
    try:
        if kind == "moderations":
            cost = moderation_cost(body, counter)
        elif kind == "images":
            cost = image_cost(body, model, counter)
        else:
            cost = speech_cost(body, counter)
    except MediaError as error:
        raise RequestError(str(error), error.param, error.code) from None
    return Plan(kind, model, cost, cost, 0, None, False, False, body)


def render_media(plan: Plan, ident: str, created: int, counter: TokenCounter) -> tuple[bytes, bytes]:
    """The body and content type of a moderation, image or speech reply."""
    if plan.kind == "speech":
        return speech_audio(plan.body, plan.model, counter)
    if plan.kind == "moderations":
        return _encoder.encode(moderation_reply(plan.body, plan.model, ident)), b"application/json"
    return _encoder.encode(image_reply(plan.body, plan.model, ident, created, counter)), b"application/json"


def structured_reply(plan: Plan, drawn: Reply, counter: TokenCounter) -> Reply:
    """``drawn`` (the dice's reply) made an instance of the plan's `Plan.reply_schema` (a tool call's
    arguments or the response format), cut at ``max_tokens`` like any reply."""
    schema = plan.reply_schema
    assert schema is not None
    pieces = counter.pieces(_encoder.encode(instance(schema, drawn.start)).decode())
    truncated = plan.max_tokens is not None and len(pieces) > plan.max_tokens
    if truncated:
        pieces = pieces[: plan.max_tokens]
    tool = plan.tool_call.name if plan.tool_call is not None else None
    return Reply(drawn.start, len(pieces), truncated, tuple(pieces), tool)


def _chat_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _finish(reply: Reply) -> str:
    return "length" if reply.truncated else "tool_calls" if reply.tool is not None else "stop"


def _call_id(ident: str, index: int) -> str:
    return f"call_{ident}_{index}"


def _chat_message(reply: Reply, ident: str, index: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    if reply.tool is None:
        message["content"] = reply.text()
    else:
        function = {"name": reply.tool, "arguments": reply.text()}
        message["tool_calls"] = [{"id": _call_id(ident, index), "type": "function", "function": function}]
    return message


def render(plan: Plan, replies: Sequence[Reply], ident: str, created: int) -> bytes:
    """The JSON body of a successful non-streaming reply."""
    completion = sum(reply.tokens for reply in replies)
    body: dict[str, Any]
    if plan.kind == "chat":
        body = {
            "id": f"chatcmpl-{ident}",
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "choices": [
                {
                    "index": index,
                    "message": _chat_message(reply, ident, index),
                    "logprobs": None,
                    "finish_reason": _finish(reply),
                }
                for index, reply in enumerate(replies)
            ],
            "usage": _chat_usage(plan.prompt_tokens, completion),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    elif plan.kind == "completions":
        body = {
            "id": f"cmpl-{ident}",
            "object": "text_completion",
            "created": created,
            "model": plan.model,
            "choices": [
                {"text": reply.text(), "index": index, "logprobs": None, "finish_reason": _finish(reply)}
                for index, reply in enumerate(replies)
            ],
            "usage": _chat_usage(plan.prompt_tokens, completion),
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    elif plan.kind == "responses":
        body = _response_object(plan, replies[0], ident, created)
    else:
        body = _embeddings(plan)
    return _encoder.encode(body)


def _response_status(reply: Reply) -> str:
    return "incomplete" if reply.truncated else "completed"


def _response_message(reply: Reply, ident: str) -> dict[str, Any]:
    return {
        "id": f"msg_{ident}",
        "type": "message",
        "status": _response_status(reply),
        "role": "assistant",
        "content": [_output_text(reply.text())],
    }


def _response_output(reply: Reply, ident: str) -> dict[str, Any]:
    if reply.tool is None:
        return _response_message(reply, ident)
    return {
        "id": f"fc_{ident}",
        "type": "function_call",
        "status": _response_status(reply),
        "call_id": _call_id(ident, 0),
        "name": reply.tool,
        "arguments": reply.text(),
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response_object(plan: Plan, reply: Reply, ident: str, created: int) -> dict[str, Any]:
    return {
        "id": f"resp_{ident}",
        "object": "response",
        "created_at": created,
        "status": _response_status(reply),
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if reply.truncated else None,
        "instructions": plan.body.get("instructions"),
        "max_output_tokens": plan.max_tokens,
        "model": plan.model,
        "output": [_response_output(reply, ident)],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": _text_format(plan.body)},
        "tool_choice": plan.body.get("tool_choice") or "auto",
        "tools": plan.body.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": plan.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": reply.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": plan.prompt_tokens + reply.tokens,
        },
        "user": None,
        "metadata": {},
    }


def _text_format(body: dict[str, Any]) -> Any:
    text = body.get("text")
    requested = text.get("format") if isinstance(text, dict) else None
    return requested if isinstance(requested, dict) else {"type": "text"}


def _embedding_keys(plan: Plan) -> list[bytes]:
    value = plan.body["input"]
    items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
    prefix = plan.model.encode() + b"\0"
    return [prefix + (item.encode() if isinstance(item, str) else _encoder.encode(item)) for item in items]


def _embeddings(plan: Plan) -> dict[str, Any]:
    dimensions = plan.body.get("dimensions") or EMBEDDING_DIMENSIONS.get(plan.model, DEFAULT_DIMENSIONS)
    as_base64 = plan.body.get("encoding_format", "float") == "base64"
    data = []
    for index, key in enumerate(_embedding_keys(plan)):
        vector = embedding_vector(key, dimensions)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": embedding_base64(vector) if as_base64 else vector.tolist(),
            }
        )
    total = plan.prompt_tokens
    return {
        "object": "list",
        "data": data,
        "model": plan.model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def render_stream(plan: Plan, replies: Sequence[Reply], ident: str, created: int) -> Iterator[tuple[bytes, int]]:
    """The SSE events of a streamed reply, each with the number of completion tokens it carries.

    Chat sends a role chunk, one chunk per token, a finish chunk per choice, then (with
    ``stream_options.include_usage``) a usage chunk with empty ``choices``; every other chunk then carries
    ``"usage": null``. Completions stream ``text_completion`` chunks the same way. Responses stream typed
    events instead (see ``_response_stream``).
    """
    if plan.kind == "responses":
        yield from _response_stream(plan, replies[0], ident, created)
        return
    chat = plan.kind == "chat"
    base: dict[str, Any] = {
        "id": f"chatcmpl-{ident}" if chat else f"cmpl-{ident}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": plan.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if plan.include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if chat:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": delta.get("content", ""), "index": index, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    for index, reply in enumerate(replies):
        if chat:
            yield _sse(chunk(index, _opening_delta(reply, ident, index))), 0
        for piece in reply.pieces():
            yield _sse(chunk(index, _piece_delta(reply, piece))), 1
        yield _sse(chunk(index, {}, _finish(reply))), 0
    if plan.include_usage:
        completion = sum(reply.tokens for reply in replies)
        yield _sse({**base, "choices": [], "usage": _chat_usage(plan.prompt_tokens, completion)}), 0
    yield SSE_DONE, 0


def _opening_delta(reply: Reply, ident: str, index: int) -> dict[str, Any]:
    """A chat stream's first chunk: the role, and for a tool call the call's id and function name (its
    arguments follow piece by piece, as on the API)."""
    if reply.tool is None:
        return {"role": "assistant", "content": "", "refusal": None}
    call = {
        "index": 0,
        "id": _call_id(ident, index),
        "type": "function",
        "function": {"name": reply.tool, "arguments": ""},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}


def _piece_delta(reply: Reply, piece: str) -> dict[str, Any]:
    if reply.tool is None:
        return {"content": piece}
    return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


def _typed_sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"


def _response_stream(plan: Plan, reply: Reply, ident: str, created: int) -> Iterator[tuple[bytes, int]]:
    """The Responses API's typed events for one message, ending with the whole response and its usage.

    A reply cut by ``max_output_tokens`` ends with ``response.incomplete``, as on the real API, not
    ``response.completed``: a client that reads usage only from the latter misses it there too.
    """
    final = _response_object(plan, reply, ident, created)
    # The opening snapshot has no output and no usage yet; everything else already has its final value.
    opening = {**final, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
    item = _response_output(reply, ident)
    text = reply.text()
    sequence = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return _typed_sse(payload)

    # The item opens empty: a call without its arguments, a message without its content.
    emptied: dict[str, Any] = {"content": []} if reply.tool is None else {"arguments": ""}
    opened = {**item, "status": "in_progress", **emptied}
    yield event("response.created", response=opening), 0
    yield event("response.in_progress", response=opening), 0
    yield event("response.output_item.added", output_index=0, item=opened), 0
    if reply.tool is not None:
        where = {"item_id": item["id"], "output_index": 0}
        for piece in reply.pieces():
            yield event("response.function_call_arguments.delta", **where, delta=piece), 1
        yield event("response.function_call_arguments.done", **where, name=reply.tool, arguments=text), 0
    else:
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        yield event("response.content_part.added", **where, part=_output_text("")), 0
        for piece in reply.pieces():
            yield event("response.output_text.delta", **where, delta=piece, logprobs=[]), 1
        yield event("response.output_text.done", **where, text=text, logprobs=[]), 0
        yield event("response.content_part.done", **where, part=_output_text(text)), 0
    yield event("response.output_item.done", output_index=0, item=item), 0
    last = "response.incomplete" if reply.truncated else "response.completed"
    yield event(last, response=final), 0
