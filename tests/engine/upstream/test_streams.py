"""The stream relay on its own: what the engine asks the upstream for, and what each event becomes."""

from __future__ import annotations

import json

import pytest

from trio_mapper.engine.upstream.client import Usage
from trio_mapper.engine.upstream.streams import Chunk, StreamPlan, StreamRelay, plan_stream

CHAT = {"model": "gpt-4o-mini", "messages": [], "stream": True}


def test_the_engine_asks_for_usage_and_remembers_to_remove_it() -> None:
    body, plan = plan_stream("chat/completions", CHAT)
    assert body["stream_options"] == {"include_usage": True}
    assert plan == StreamPlan("chat", strip_usage=True)
    assert "stream_options" not in CHAT  # the client's body is left alone

    asked = {**CHAT, "stream_options": {"include_usage": True}}
    assert plan_stream("chat/completions", asked) == (asked, StreamPlan("chat", strip_usage=False))
    # Other options the client set are kept.
    body, _ = plan_stream("completions", {**CHAT, "stream_options": {"include_obfuscation": False}})
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}


def test_only_streaming_endpoints_with_stream_true_are_streams() -> None:
    assert plan_stream("chat/completions", {**CHAT, "stream": False})[1] is None
    assert plan_stream("embeddings", CHAT)[1] is None
    assert plan_stream("responses", CHAT) == (CHAT, StreamPlan("responses", strip_usage=False))
    # A malformed stream_options is the upstream's to refuse, untouched.
    malformed = {**CHAT, "stream_options": "yes"}
    assert plan_stream("chat/completions", malformed) == (malformed, StreamPlan("chat", strip_usage=False))


def test_added_usage_is_read_then_removed() -> None:
    relay = StreamRelay(StreamPlan("chat", strip_usage=True))
    content = relay.feed('{"choices": [{"delta": {"content": "hi"}}], "usage": null}', "message")
    assert content is not None and json.loads(content.data) == {"choices": [{"delta": {"content": "hi"}}]}
    assert content.event is None
    assert not relay.ended
    usage = '{"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}'
    assert relay.feed(usage) is None
    assert relay.usage == Usage(prompt=12, completion=3)
    assert relay.ended  # the usage chunk comes last: a server that sends no [DONE] has finished here
    assert relay.feed("[DONE]") is None


@pytest.mark.parametrize("strip_usage", [True, False])
def test_a_chat_stream_ends_at_done_or_at_its_usage_chunk_only(strip_usage: bool) -> None:
    relay = StreamRelay(StreamPlan("chat", strip_usage=strip_usage))
    relay.feed('{"choices": [{"delta": {"content": "hi"}, "finish_reason": null}], "usage": null}')
    # vLLM's continuous usage: usage on a chunk that still has choices is not the end.
    relay.feed('{"choices": [{"delta": {"content": "!"}}], "usage": {"prompt_tokens": 3}}')
    assert not relay.ended
    relay.feed("[DONE]")
    assert relay.ended


def test_usage_the_client_asked_for_passes_untouched() -> None:
    relay = StreamRelay(StreamPlan("chat", strip_usage=False))
    usage = '{"choices": [], "usage": {"prompt_tokens": 7}}'
    assert relay.feed(usage) == Chunk(usage)
    assert relay.usage == Usage(prompt=7, completion=None)
    # Not even re-encoded when there is nothing to remove.
    odd = '{ "choices" : [ ] }'
    assert relay.feed(odd) == Chunk(odd)


def test_responses_events_keep_their_names_and_report_usage_at_the_end() -> None:
    relay = StreamRelay(StreamPlan("responses", strip_usage=False))
    delta = '{"type": "response.output_text.delta", "delta": "hi"}'
    assert relay.feed(delta, "response.output_text.delta") == Chunk(delta, "response.output_text.delta")
    completed = '{"type": "response.completed", "response": {"usage": {"input_tokens": 9, "output_tokens": 2}}}'
    assert relay.feed(completed, "response.completed") == Chunk(completed, "response.completed")
    assert relay.usage == Usage(prompt=9, completion=2)


def test_events_that_are_not_json_pass_as_they_came() -> None:
    relay = StreamRelay(StreamPlan("chat", strip_usage=True))
    assert relay.feed("not json") == Chunk("not json")
    assert relay.usage is None


@pytest.mark.parametrize("strip_usage", [True, False])
@pytest.mark.parametrize("event", [None, "error"])
def test_an_error_chunk_ends_a_chat_stream_as_a_failure_and_passes_as_it_came(
    strip_usage: bool, event: str | None
) -> None:
    """Found by a hostile review: an error mid-stream, then ``[DONE]``, was settled as a success."""
    relay = StreamRelay(StreamPlan("chat", strip_usage=strip_usage))
    relay.feed('{"choices": [{"delta": {"content": "hi"}}], "usage": null}')
    assert relay.error is None
    error = '{"error": {"message": "The server had an error", "type": "server_error", "code": null}}'
    assert relay.feed(error, event) == Chunk(error, event)
    assert relay.error == json.loads(error)
    assert relay.ended and relay.error_shown  # the SDK raises at it: the front adds no error of its own


def test_a_named_error_event_without_an_error_field_is_not_shown() -> None:
    """The SDK yields it as a chunk: the front must still end the stream with its own error event."""
    relay = StreamRelay(StreamPlan("chat", strip_usage=False))
    data = '{"message": "boom", "code": "server_error"}'
    assert relay.feed(data, "error") == Chunk(data, "error")
    assert (relay.error, relay.ended, relay.error_shown) == (json.loads(data), True, False)


def test_what_is_not_an_error_chunk() -> None:
    relay = StreamRelay(StreamPlan("chat", strip_usage=False))
    for data in (
        '{"choices": [{"delta": {"content": "an \\"error\\" in the text"}}]}',
        '{"choices": [{"delta": {"content": "hi"}}], "error": null}',  # the SDK raises only at one that is there
        '{"choices": [{"delta": {}, "finish_reason": "error"}]}',
    ):
        assert relay.feed(data) == Chunk(data)
    assert (relay.error, relay.ended) == (None, False)
    # Named error, its data not JSON: still the upstream's error, quoted as text.
    assert relay.feed("overloaded", "error") == Chunk("overloaded", "error")
    assert (relay.error, relay.ended, relay.error_shown) == ("overloaded", True, False)


def test_usage_on_an_error_chunk_still_counts() -> None:
    relay = StreamRelay(StreamPlan("chat", strip_usage=True))
    error = '{"choices": [], "error": {"message": "cut"}, "usage": {"prompt_tokens": 4, "completion_tokens": 1}}'
    assert relay.feed(error) == Chunk(error)  # not removed as the engine's usage chunk: it is the error
    assert relay.usage == Usage(prompt=4, completion=1)
    assert relay.error == json.loads(error)


def test_responses_error_and_failed_events_end_the_stream_as_a_failure() -> None:
    relay = StreamRelay(StreamPlan("responses", strip_usage=False))
    error = '{"type": "error", "code": "server_error", "message": "boom", "param": null, "sequence_number": 3}'
    assert relay.feed(error, "error") == Chunk(error, "error")
    assert (relay.error, relay.ended, relay.error_shown) == (json.loads(error), True, True)

    relay = StreamRelay(StreamPlan("responses", strip_usage=False))
    response = {"status": "failed", "error": {"code": "server_error", "message": "boom"}, "usage": {"input_tokens": 9}}
    failed = json.dumps({"type": "response.failed", "response": response})
    assert relay.feed(failed, "response.failed") == Chunk(failed, "response.failed")
    assert (relay.error, relay.ended, relay.usage) == (response, True, Usage(prompt=9, completion=None))

    relay = StreamRelay(StreamPlan("responses", strip_usage=False))
    incomplete = '{"type": "response.incomplete", "response": {"status": "incomplete"}}'
    relay.feed(incomplete, "response.incomplete")
    assert (relay.error, relay.ended) == (None, True)  # max_output_tokens reached: a whole answer
