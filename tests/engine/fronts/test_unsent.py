"""`UnsentReplies`, the engine-wide bound on reply bytes the clients of both fronts have not read: holders count
their bytes, and past the bound the largest are cut by their front's own means (here, noting who was cut).
The last test holds replies unread on both fronts of a real engine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import EngineProcess, running_engine, simulator
from raw_client import RawClient, chat

from trio_mapper.engine.fronts.unsent import MAX_UNSENT_REPLY_BYTES, UnsentReplies


def test_the_bound_is_1_gib_unless_told() -> None:
    assert UnsentReplies().max_bytes == MAX_UNSENT_REPLY_BYTES == 1 << 30
    assert UnsentReplies(100).max_bytes == 100


def test_holders_count_their_bytes_in_the_total() -> None:
    unsent = UnsentReplies(max_bytes=100)
    first = unsent.holder(lambda why: None)
    second = unsent.holder(lambda why: None, 30)
    first.grow(20)
    first.grow(5)
    first.shrink(10)
    assert (first.size, second.size, unsent.total) == (15, 30, 45)
    first.release()
    first.release()  # twice is harmless
    assert unsent.total == 30


def test_past_the_bound_the_largest_holder_is_cut_once_and_told_why() -> None:
    """A reviewer's 60 connections that never read 20 MB replies held 2.7 GiB for the 60 s each write may wait."""
    unsent = UnsentReplies(max_bytes=100)
    cut: dict[str, str] = {}
    small = unsent.holder(lambda why: cut.setdefault("small", why), 30)
    large = unsent.holder(lambda why: cut.setdefault("large", why), 60)
    assert not cut
    third = unsent.holder(lambda why: cut.setdefault("third", why), 20)  # 110 in all: the largest goes
    assert list(cut) == ["large"] and large.cut_called and not (small.cut_called or third.cut_called)
    assert cut["large"].endswith("and this one holds the most")
    third.grow(5)  # still over until the cut one's bytes are freed, but what the others hold fits
    assert list(cut) == ["large"]
    large.release()
    assert unsent.total == 55


def test_as_many_are_cut_as_it_takes_for_the_rest_to_fit() -> None:
    unsent = UnsentReplies(max_bytes=100)
    cut: list[int] = []
    holders = [unsent.holder(lambda why, n=n: cut.append(n), 40) for n in range(2)]
    holders[1].grow(1)
    assert cut == []  # 81
    unsent.holder(lambda why: cut.append(2), 90)  # 171: cutting the 90 leaves 81
    assert cut == [2]
    holders[0].grow(30)  # 81 + 30 besides the one cut: the 70 goes, the 41 stays
    assert cut == [2, 0]


def test_a_holder_with_nothing_is_never_cut() -> None:
    unsent = UnsentReplies(max_bytes=10)
    cut: list[str] = []
    unsent.holder(lambda why: cut.append("idle"))
    busy = unsent.holder(lambda why: cut.append("busy"))
    busy.grow(11)
    busy.grow(5)  # cut already: nobody else holds anything to cut
    assert cut == ["busy"]


# --- both fronts of a real engine ------------------------------------------------------------------------------

BOUND = 8 << 20
EMBEDDINGS = "text-embedding-3-small"


def embeddings(inputs: int, offset: int = 0) -> dict[str, Any]:
    """An embeddings body whose reply is about 8.3 KB per input (1536 floats in base64)."""
    return {"model": EMBEDDINGS, "input": [f"text {offset + i}" for i in range(inputs)], "encoding_format": "base64"}


def http_post(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: engine\r\nConnection: close\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(data) + data


async def read_to_the_end(stream: trio.SocketStream) -> bytes:
    """What the engine sent before it closed the connection (a reset if it closed with bytes unread)."""
    received = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await stream.receive_some(1 << 20):
            received += data
    return bytes(received)


async def until_succeeded(engine: EngineProcess, count: int) -> None:
    """Until ``count`` embeddings requests have their replies (a msgpack reply is queued as it is reported)."""
    async with await RawClient.connect(str(engine.socket)) as client:
        while True:
            stats = await client.request({"type": "stats", "id": "s"})
            if stats["lanes"].get(EMBEDDINGS, {}).get("succeeded", 0) >= count:
                return
            await trio.sleep(0.05)


async def until_logged(engine: EngineProcess, text: str) -> None:
    with trio.fail_after(30):
        while True:
            if text in engine.log:
                return
            await trio.sleep(0.05)  # another process: nothing to wait on but the clock


@pytest.mark.parametrize("largest", ["http", "msgpack"])
async def test_unread_replies_on_both_fronts_share_one_bound_and_the_largest_is_cut(
    short_tmp: Path, largest: str
) -> None:
    """Each front bounded its unsent replies on its own, at 1 GiB each: clients that read nothing on both
    fronts held twice what the docs said the engine holds. Here each front's clients stay under the bound
    (8 MiB) and together pass it: the largest holder is cut, on whichever front, by that front's means; the
    other holder gets all its replies, and the engine serves a newcomer."""
    # 6.6 MB on the holder that is cut, 4.1 MB on the other: each alone fits, together they do not.
    msgpack_requests = 8 if largest == "msgpack" else 5
    http_inputs = 500 if largest == "msgpack" else 800
    constants = {"trio_mapper.engine.fronts.unsent.MAX_UNSENT_REPLY_BYTES": BOUND}
    async with simulator() as url, running_engine(short_tmp, url, constants=constants) as engine:
        reader = await RawClient.connect(str(engine.socket))  # reads nothing until the cut
        http = await trio.open_unix_socket(str(engine.socket) + ".http")
        async with reader, http:
            with trio.fail_after(60):
                for n in range(msgpack_requests):
                    await reader.send(
                        {"type": "submit", "id": n, "endpoint": "/v1/embeddings", "body": embeddings(100, 100 * n)}
                    )
                await until_succeeded(engine, msgpack_requests)  # all of them held before the HTTP reply comes
                async with await RawClient.connect(str(engine.socket)) as monitor:
                    stats = (await monitor.request({"type": "stats", "id": "s"}))["engine"]
                # What the socket's buffers did not take is counted, and the bound is shown with it.
                assert 0 < stats["unsent_reply_bytes"] <= BOUND and stats["max_unsent_reply_bytes"] == BOUND
                await http.send_all(http_post(embeddings(http_inputs)))
                if largest == "msgpack":
                    await until_logged(engine, "disconnecting it")
                    replies = []
                    with pytest.raises(EOFError):
                        while True:
                            replies.append(await reader.receive())
                    assert len(replies) < msgpack_requests
                    reply = await read_to_the_end(http)  # the HTTP client's reply is all there
                    head, _, body = reply.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200 ")
                    assert len(json.loads(body)["data"]) == http_inputs
                else:
                    await until_logged(engine, "being written is cut")
                    reply = await read_to_the_end(http)
                    assert len(reply) < http_inputs * 8192, "the reply was cut, its connection closed"
                    replies = [await reader.receive() for _ in range(msgpack_requests)]  # the other's all arrive
                    assert sorted(reply["id"] for reply in replies) == list(range(msgpack_requests))
                    assert all(reply["type"] == "result" and len(reply["body"]["data"]) == 100 for reply in replies)
                assert "clients on both fronts together have" in engine.log
                async with await RawClient.connect(str(engine.socket)) as newcomer:
                    result = await newcomer.request(chat("new"))
                assert result["type"] == "result" and result["status"] == 200
        assert engine.process.returncode is None
