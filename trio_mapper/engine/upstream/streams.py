"""Streamed replies: what the engine asks the upstream for, and what it does to each event on the way through.

Every streamed reply must end with its usage, or the budget cannot be settled. Chat and completions streams
carry usage only when asked (``stream_options.include_usage``), so the engine asks, and when the client did
not, removes what asking added before the client sees it: the last chunk (``"choices": []`` plus usage) and
the ``"usage": null`` field on every other chunk — clients break on fields they did not ask for. The
Responses API's ``response.completed`` event carries usage in any case. Events pass one by one as they
arrive; nothing waits for the end of the stream. No I/O here: `StreamRelay` is fed parsed events.

An upstream that fails after its stream started can only say so in the stream: chat and completions with a
chunk ``{"error": {...}}`` (on which the SDK raises `APIError`), the Responses API with an ``error`` event or
its final ``response.failed``. Such an event is relayed like any other, and ends the stream as a failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
import msgspec

from trio_mapper.engine.upstream.client import Usage, UsageFields

__all__ = ["STREAM_END", "Chunk", "StreamKind", "StreamPlan", "StreamRelay", "plan_stream"]

StreamKind = Literal["chat", "completions", "responses"]
#: API paths (relative to the base URL) whose replies stream when the body says ``"stream": true``.
STREAMING_PATHS: Final[Mapping[str, StreamKind]] = {
    "chat/completions": "chat",
    "completions": "completions",
    "responses": "responses",
}
#: The Responses API's last events, each carrying the whole response with its usage.
_FINAL_RESPONSE_EVENTS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
#: The Responses API's events that say the response failed: ``error`` (its fields: code, message, param) and
#: ``response.failed`` (the response, whose ``error`` says why). Either ends the stream.
_FAILED_RESPONSE_EVENTS: Final = frozenset({"error", "response.failed"})
#: The data of the event that ends chat and completions streams.
STREAM_END: Final = "[DONE]"


@attrs.frozen
class StreamPlan:
    """How one request's stream is relayed."""

    kind: StreamKind
    #: The engine asked for the usage chunk on the client's behalf, so it removes it again.
    strip_usage: bool


@attrs.frozen
class Chunk:
    """One server-sent event of a streamed reply, as the client is to see it."""

    #: The event's data: JSON text for every OpenAI stream.
    data: str
    #: The event's name: the Responses API names its events, chat and completions do not.
    event: str | None = None


def plan_stream(path: str, body: Mapping[str, Any]) -> tuple[Mapping[str, Any], StreamPlan | None]:
    """The body to send upstream and how to relay its stream; None when the request does not stream.

    Args:
        path: the API path relative to the base URL (``chat/completions``).
    """
    if body.get("stream") is not True:
        return body, None
    kind = STREAMING_PATHS.get(path)
    if kind is None:
        return body, None  # not a streaming endpoint: the upstream answers as it sees fit
    if kind == "responses":
        return body, StreamPlan(kind, strip_usage=False)
    options = body.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, Mapping):
        return body, StreamPlan(kind, strip_usage=False)  # malformed: the upstream's 400 says so
    if options.get("include_usage") is True:
        return body, StreamPlan(kind, strip_usage=False)
    return {**body, "stream_options": {**options, "include_usage": True}}, StreamPlan(kind, strip_usage=True)


class _Response(msgspec.Struct):
    usage: UsageFields | None = None


class _Completed(msgspec.Struct):
    response: _Response | None = None


class StreamRelay:
    """Turns the upstream's events into the client's, reading usage as it passes."""

    def __init__(self, plan: StreamPlan) -> None:
        self.plan = plan
        #: The stream's usage, once its usage event went by.
        self.usage: Usage | None = None
        #: Its last event went by: ``[DONE]``, the Responses API's final event, or the usage chunk the engine
        #: always asks chat and completions streams for, which comes after every choice has finished (some
        #: OpenAI-compatible servers send no ``[DONE]``, and the SDK does not need one). A stream that stops
        #: short of all of them was cut (a proxy's timeout, a crashed server), however cleanly it closed.
        self.ended = False
        #: The upstream's error, once an event said the reply failed (it also ends the stream, `ended`): the
        #: event's data decoded, as `parse_error_body` reads it (an ``{"error": {...}}`` envelope, or the error's
        #: own fields, or the text of data that is not JSON). None while there is none.
        self.error: Any = None
        #: The event that said so is one clients raise at themselves: a chat or completions chunk with a
        #: truthy ``"error"`` (all the SDK raises `APIError` at; an ``event: error`` whose data has none, it
        #: yields as a chunk), or the Responses API's typed ``error`` and ``response.failed``. When it is not, a
        #: front must still end the stream with an error of its own, or the client takes a cut reply as whole.
        self.error_shown = False

    def feed(self, data: str, event: str | None = None) -> Chunk | None:
        """The chunk to relay for one upstream event, or None when the client must not see it."""
        if event == "message":
            event = None  # the SSE default, which parsers report for unnamed events: relayed unnamed, as sent
        if data == STREAM_END:
            self.ended = True
            return None  # each front ends the stream in its own way
        if self.plan.kind == "responses":
            if event in _FINAL_RESPONSE_EVENTS:
                self.ended = True
                self._read_responses_usage(data)
            if event in _FAILED_RESPONSE_EVENTS:
                self._read_responses_error(data, event)
            return Chunk(data, event)
        # Decoded only when it may hold what the engine reads. Text inside a string has its quotes escaped, so
        # only keys and whole string values match: a reply that writes the word "error" is not decoded.
        if self.plan.strip_usage or '"usage"' in data or '"error"' in data or event == "error":
            return self._chat_chunk(data, event)
        return Chunk(data, event)

    def _chat_chunk(self, data: str, event: str | None) -> Chunk | None:
        try:
            decoded = msgspec.json.decode(data)
        except msgspec.DecodeError:
            decoded = None  # not ours to judge: the client sees what the upstream sent
        if not isinstance(decoded, dict):
            if event == "error":
                self._failed(data)
            return Chunk(data, event)
        # What the SDK raises `APIError` at: an "error" that is there and not null. Relayed as it came.
        shown = bool(decoded.get("error"))
        failed = shown or event == "error"
        if failed:
            self._failed(decoded, shown=shown)
        if "usage" not in decoded:
            return Chunk(data, event)
        usage = decoded["usage"]
        final = isinstance(usage, dict) and decoded.get("choices") == []
        if isinstance(usage, dict):
            with contextlib.suppress(msgspec.ValidationError):
                self.usage = Usage.of(msgspec.convert(usage, UsageFields))
        self.ended = self.ended or final
        if failed or not self.plan.strip_usage:
            return Chunk(data, event)
        if final:
            return None  # the usage chunk the engine asked for
        del decoded["usage"]
        return Chunk(msgspec.json.encode(decoded).decode(), event)

    def _failed(self, error: Any, *, shown: bool = False) -> None:
        self.ended = True
        if self.error is None:
            self.error = error
            self.error_shown = shown

    def _read_responses_error(self, data: str, event: str | None) -> None:
        try:
            decoded = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return self._failed(data, shown=True)
        if event == "response.failed" and isinstance(decoded, dict) and isinstance(decoded.get("response"), dict):
            decoded = decoded["response"]  # its "error" says why
        self._failed(decoded if isinstance(decoded, dict) else data, shown=True)

    def _read_responses_usage(self, data: str) -> None:
        try:
            completed = msgspec.json.decode(data, type=_Completed)
        except msgspec.DecodeError:
            return
        if completed.response is not None and completed.response.usage is not None:
            self.usage = Usage.of(completed.response.usage)
