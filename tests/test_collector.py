"""Large documents are decoded with the cyclic garbage collector paused; small ones and errors leave it as it was."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import msgspec
import pytest

from trio_mapper import collector
from trio_mapper.bodies import decode_body
from trio_mapper.wire.framing import engine_codec, salvage_request_id
from trio_mapper.wire.messages import Submit

#: A million tiny arrays: the shape that made the collector run hundreds of times during one decode.
TINY_ARRAYS = b'{"model":"m","input":[' + b",".join([b"[1]"] * 300_000) + b"]}"


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the collections that start while the test runs."""
    started: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.collect()  # nothing owed from before the test
    gc.callbacks.append(note)
    try:
        yield started
    finally:
        gc.callbacks.remove(note)


def test_a_large_json_body_decodes_without_a_collection(collections: list[int]) -> None:
    body = decode_body(TINY_ARRAYS)
    assert len(body["input"]) == 300_000
    assert len(collections) <= 1, "at most the one pass the collector owes once it is back on"
    assert gc.isenabled()
    # Without the pause, the same decode runs the collector hundreds of times.
    collections.clear()
    msgspec.json.decode(TINY_ARRAYS)
    assert len(collections) > 100


def test_a_large_frame_decodes_without_a_collection(collections: list[int]) -> None:
    codec = engine_codec()
    body = msgspec.json.decode(TINY_ARRAYS)
    frame = msgspec.msgpack.encode({"type": "submit", "id": 1, "endpoint": "/v1/embeddings", "body": body})
    collections.clear()
    message = codec.decode(frame)
    assert isinstance(message, Submit) and len(message.body["input"]) == 300_000
    assert len(collections) <= 1
    assert gc.isenabled()


def test_small_documents_and_failures_leave_the_collector_as_it_was() -> None:
    with collector.paused_for(collector.LARGE_DOCUMENT_BYTES - 1):
        assert gc.isenabled()
    with pytest.raises(msgspec.DecodeError), collector.paused_for(len(TINY_ARRAYS)):
        assert not gc.isenabled()
        msgspec.json.decode(TINY_ARRAYS[:-1])
    assert gc.isenabled()
    gc.disable()  # paused by someone else (another thread's decode): not turned back on by this one
    try:
        with collector.paused_for(len(TINY_ARRAYS)):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_invalid_large_frame_is_not_built_again_to_find_its_id(collections: list[int]) -> None:
    """The error names the frame's id; finding it skims the frame instead of building it a second time."""
    body = msgspec.json.decode(TINY_ARRAYS)
    frame = msgspec.msgpack.encode({"type": "submit", "id": 7, "endpoint": 12, "body": body})  # endpoint: no str
    gc.collect()  # what the set-up allocated is collected now, not during the call
    collections.clear()
    assert salvage_request_id(frame) == 7
    assert collections == []
    assert salvage_request_id(msgspec.msgpack.encode({"type": "submit", "id": True})) is None
    assert salvage_request_id(msgspec.msgpack.encode([1, 2])) is None
