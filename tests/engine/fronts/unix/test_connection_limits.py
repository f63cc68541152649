"""The limits that protect the engine from its clients, one connection at a time (`trio_mapper.server`).

A connection must say hello within HANDSHAKE_TIMEOUT and finish each frame within FRAME_STALL_TIMEOUT; a
client that does not read its replies stops being read at OUTBOX_HIGH_WATER unsent replies or
OUTBOX_MAX_BYTES, and past the bytes is disconnected once it reads nothing for OUTBOX_STALL_TIMEOUT. No
setting exposes these, so most tests drive one
`Connection` in-process over in-memory streams with a fake scheduler: the timeouts under autojump_clock, the
backpressure over lockstep streams (whose writes wait for the reader, like a full socket buffer) until every
task is blocked. The last test floods a real engine over its socket.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing
from conftest import running_engine, simulator
from raw_client import PREFIX, RawClient, chat

from trio_mapper.engine.core.outcome import ClientIdentity, Finished, RequestSpec, Timings
from trio_mapper.engine.fronts.receiving import ReceivingBytes, receiving_limit
from trio_mapper.engine.fronts.unix import connection as server
from trio_mapper.engine.fronts.unix.connection import (
    FRAME_STALL_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    OUTBOX_HIGH_WATER,
    OUTBOX_STALL_TIMEOUT,
    READ_CHUNK,
    Connection,
)
from trio_mapper.engine.fronts.unsent import UnsentReplies
from trio_mapper.engine.upstream.client import ReplyBody
from trio_mapper.wire import DEFAULT_MAX_FRAME_BYTES

HELLO = {"type": "hello", "protocol": 1, "client": "limits-test"}


def frame(message: dict[str, Any]) -> bytes:
    body = msgspec.msgpack.encode(message)
    return PREFIX.pack(len(body)) + body


class FakeScheduler:
    """The part of the scheduler a Connection uses: each submit is answered at once with a result whose body
    holds ``reply_bytes`` of padding; it remembers the submits and the owners whose requests were withdrawn."""

    def __init__(self, reply_bytes: int = 0) -> None:
        self.reply_bytes = reply_bytes
        self.submitted: list[Any] = []
        self.forgotten: list[Any] = []

    async def intake(self, owner: Connection, request_id: Any, spec: RequestSpec, **_: Any) -> None:
        self.submitted.append(request_id)
        body = ReplyBody(msgspec.json.encode({"padding": "x" * self.reply_bytes}))
        timings = Timings(queued=0.0, upstream=0.0, total=0.0)
        owner.report(request_id, Finished(status=200, headers={}, body=body, attempts=1, timings=timings))

    def cancel(self, owner: Connection, request_id: Any) -> bool:
        return False

    def is_outstanding(self, owner: Connection, request_id: Any) -> bool:
        return False

    async def forget_owner(self, owner: Connection) -> int:
        self.forgotten.append(owner)
        return 0


@attrs.define
class Served:
    """One Connection serving in the test's nursery, and the client end of its stream."""

    client: RawClient
    connection: Connection
    scheduler: FakeScheduler
    closed: trio.Event
    stats_requests: list[int]


def serve_connection(
    nursery: trio.Nursery,
    *,
    pair: Callable[[], tuple[Any, Any]] = trio.testing.memory_stream_pair,
    reply_bytes: int = 0,
    unsent: UnsentReplies | None = None,
    receiving: ReceivingBytes | None = None,
    client: ClientIdentity | None = None,
    scheduler: FakeScheduler | None = None,
) -> Served:
    client_stream, engine_stream = pair()
    scheduler = scheduler if scheduler is not None else FakeScheduler(reply_bytes)
    stats_requests: list[int] = []

    def stats() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        stats_requests.append(len(stats_requests))
        return {}, {}

    connection = Connection(
        engine_stream,
        scheduler=scheduler,  # duck-typed: the methods a Connection calls
        stats=stats,
        max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
        unsent=unsent,
        receiving=receiving,
        client=client,
    )
    closed = trio.Event()

    async def serve() -> None:
        try:
            await connection.serve()
        finally:
            closed.set()

    nursery.start_soon(serve)
    return Served(RawClient(client_stream), connection, scheduler, closed, stats_requests)


async def say_hello(served: Served) -> None:
    welcome = await served.client.request(HELLO)
    assert welcome["type"] == "welcome", welcome


async def nothing_arrives_within(client: RawClient, seconds: float) -> None:
    with trio.move_on_after(seconds):
        message = await client.receive()
        pytest.fail(f"the engine sent {message} too early")


async def assert_closed_with_protocol_error(served: Served, about: str) -> None:
    error = await served.client.receive()
    assert (error["type"], error["kind"], error["id"]) == ("error", "protocol_error", None), error
    assert about in error["message"]
    with pytest.raises(EOFError):
        await served.client.receive()
    await served.closed.wait()
    assert served.scheduler.forgotten == [served.connection], "the connection's requests are withdrawn"


async def trickle(client: RawClient, data: bytes, every: float, sent: list[int]) -> None:
    """Send ``data`` one byte at a time, ``every`` seconds apart, until done or the engine hangs up."""
    try:
        for index in range(len(data)):
            await client.send_raw(data[index : index + 1])
            sent.append(index)
            await trio.sleep(every)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# --- the handshake -----------------------------------------------------------------------------------------


async def test_a_client_that_never_says_hello_is_told_why_and_closed(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(HANDSHAKE_TIMEOUT + 60):  # hang guard, in the test's virtual time
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery)
            await nothing_arrives_within(served.client, HANDSHAKE_TIMEOUT - 1)
            with trio.fail_after(2):
                await assert_closed_with_protocol_error(served, "say hello")


async def test_the_hello_allowance_is_in_total_not_per_read(autojump_clock: trio.abc.Clock) -> None:
    hello = frame(HELLO)
    sent: list[int] = []
    every = HANDSHAKE_TIMEOUT / 6  # each byte comes well within the allowance; the whole hello never does
    assert len(hello) * every > 2 * HANDSHAKE_TIMEOUT
    with trio.fail_after(HANDSHAKE_TIMEOUT + 60):
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery)
            nursery.start_soon(trickle, served.client, hello, every, sent)
            await nothing_arrives_within(served.client, HANDSHAKE_TIMEOUT - 1)
            with trio.fail_after(2):
                await assert_closed_with_protocol_error(served, "say hello")
    assert 0 < len(sent) < len(hello)


async def test_a_prompt_hello_is_welcomed_and_an_idle_connection_stays_open(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery)
        await trio.sleep(HANDSHAKE_TIMEOUT - 1)
        await say_hello(served)
        # Idle between frames is fine, however long: only the hello and a started frame have a deadline.
        await nothing_arrives_within(served.client, 24 * 60 * 60)
        assert await served.client.request({"type": "ping", "id": 1}) == {"type": "pong", "id": 1}
        assert not served.closed.is_set()
        await served.client.aclose()
        await served.closed.wait()


# --- half frames ---------------------------------------------------------------------------------------------


async def test_a_half_sent_frame_is_closed_after_the_stall_timeout(autojump_clock: trio.abc.Clock) -> None:
    ping = frame({"type": "ping", "id": "half"})
    with trio.fail_after(HANDSHAKE_TIMEOUT + FRAME_STALL_TIMEOUT + 60):
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery)
            await say_hello(served)
            assert await served.client.request({"type": "ping", "id": 1}) == {"type": "pong", "id": 1}
            await served.client.send_raw(ping[: len(ping) // 2])
            await nothing_arrives_within(served.client, FRAME_STALL_TIMEOUT - 1)
            with trio.fail_after(2):
                await assert_closed_with_protocol_error(served, "finish a frame")


async def test_a_frame_trickled_a_byte_at_a_time_is_closed_after_the_stall_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    ping = frame({"type": "ping", "id": "trickled"})
    sent: list[int] = []
    every = FRAME_STALL_TIMEOUT / 6  # each byte in time; the frame, counted from its first byte, not
    assert len(ping) * every > 2 * FRAME_STALL_TIMEOUT
    with trio.fail_after(HANDSHAKE_TIMEOUT + FRAME_STALL_TIMEOUT + 60):
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery)
            await say_hello(served)
            nursery.start_soon(trickle, served.client, ping, every, sent)
            await nothing_arrives_within(served.client, FRAME_STALL_TIMEOUT - 1)
            with trio.fail_after(2):
                await assert_closed_with_protocol_error(served, "finish a frame")
    assert 0 < len(sent) < len(ping)


async def test_large_frames_wait_unread_for_room_in_the_total_across_connections(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Each connection may hold a frame of up to max_frame_bytes while it arrives: without a total, as many
    connections as the engine accepts held that much each. A large frame is read once its length fits in
    the total, and the time it waits for room is not counted against the client's time to finish it."""
    first, second = (frame(chat(index, "x" * 3 * READ_CHUNK)) for index in (1, 2))
    room = len(first) + READ_CHUNK
    receiving = ReceivingBytes(4 * room)
    for other_client in range(3):  # three quarters held by others: room for one such frame at a time
        assert receiving.try_hold(room, other_client)
    with trio.fail_after(HANDSHAKE_TIMEOUT + 3 * FRAME_STALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            holder, waiter = (
                serve_connection(nursery, receiving=receiving, client=ClientIdentity(uid=uid)) for uid in (1000, 2000)
            )
            for served in (holder, waiter):
                await say_hello(served)
            await holder.client.send_raw(first[:-1])
            await trio.sleep(1)
            await waiter.client.send_raw(second[:100])
            await trio.sleep(1)
            assert (receiving.held, receiving.waiting) == (3 * room + len(first) - PREFIX.size, 1)
            await trio.sleep(FRAME_STALL_TIMEOUT - 10)
            await holder.client.send_raw(first[-1:])
            assert (await holder.client.receive())["id"] == 1
            await trio.sleep(FRAME_STALL_TIMEOUT - 10)  # over a minute since its first bytes; not since it was read
            await waiter.client.send_raw(second[100:])
            assert (await waiter.client.receive())["id"] == 2
            assert waiter.scheduler.submitted == [2]
            assert (receiving.held, receiving.waiting) == (3 * room, 0)
            nursery.cancel_scope.cancel()


async def test_a_large_frame_stays_held_until_the_core_has_its_request(autojump_clock: trio.abc.Clock) -> None:
    """Decoded and waiting for the token-counting thread, a body takes many times its size: a reviewer's 60
    frames of 3.6 MiB took the engine to 4 GiB, because their room was let go as soon as they arrived."""
    entered, leave = trio.Event(), trio.Event()

    class SlowIntake(FakeScheduler):
        async def intake(self, owner: Connection, request_id: Any, spec: RequestSpec, **kwargs: Any) -> None:
            entered.set()
            await leave.wait()
            await super().intake(owner, request_id, spec, **kwargs)

    large = frame(chat(1, "x" * 3 * READ_CHUNK))
    receiving = ReceivingBytes(10 * len(large))
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery, receiving=receiving, scheduler=SlowIntake())
        await say_hello(served)
        await served.client.send_raw(large)
        await entered.wait()
        assert receiving.held == len(large) - PREFIX.size
        leave.set()
        assert (await served.client.receive())["id"] == 1
        assert receiving.held == 0
        nursery.cancel_scope.cancel()


async def test_a_connection_closed_mid_frame_gives_its_room_back(autojump_clock: trio.abc.Clock) -> None:
    large = frame(chat(1, "x" * 3 * READ_CHUNK))
    receiving = ReceivingBytes(10 * len(large))
    async with trio.open_nursery() as nursery:
        served = serve_connection(nursery, receiving=receiving)
        await say_hello(served)
        await served.client.send_raw(large[: len(large) // 2])
        await trio.sleep(1)
        assert receiving.held == len(large) - PREFIX.size
        await served.client.aclose()
        await served.closed.wait()
    assert receiving.held == 0


# --- clients that do not read --------------------------------------------------------------------------------


async def test_a_client_that_does_not_read_stops_being_read_until_it_reads() -> None:
    # Stats requests, because the fake stats provider counts the frames the connection handled.
    count = 3 * OUTBOX_HIGH_WATER
    flood = b"".join(frame({"type": "stats", "id": n}) for n in range(count))
    with trio.fail_after(60):  # hang guard
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery, pair=trio.testing.lockstep_stream_pair)
            await say_hello(served)
            flooded = trio.Event()

            async def send_flood() -> None:
                await served.client.send_raw(flood)
                flooded.set()

            nursery.start_soon(send_flood)
            await trio.testing.wait_all_tasks_blocked()
            # Stuck: the engine stopped reading once its unsent replies passed the high-water mark...
            handled = len(served.stats_requests)
            assert not flooded.is_set()
            assert OUTBOX_HIGH_WATER < handled < count
            # ...and reads on once the client reads: every request is answered, each exactly once.
            replies = [await served.client.receive() for _ in range(count)]
            await flooded.wait()
            assert {reply["type"] for reply in replies} == {"stats_reply"}
            assert sorted(reply["id"] for reply in replies) == list(range(count))
            assert len(served.stats_requests) == count
            assert not served.closed.is_set()
            await served.client.aclose()


async def test_a_client_past_the_byte_cap_is_not_read_and_is_disconnected_if_it_reads_nothing(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    reply_bytes = 64 * 1024
    cap = 16 * reply_bytes
    monkeypatch.setattr(server, "OUTBOX_MAX_BYTES", cap)
    with trio.fail_after(3 * OUTBOX_STALL_TIMEOUT):  # hang guard, in the test's virtual time
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery, pair=trio.testing.lockstep_stream_pair, reply_bytes=reply_bytes)
            await say_hello(served)
            # Under the cap, unread replies just wait.
            below = cap // reply_bytes - 2
            for n in range(below):
                await served.client.send(chat(n))
            await trio.testing.wait_all_tasks_blocked()
            assert not served.closed.is_set()
            assert served.scheduler.forgotten == []
            # Past it, the engine reads no more of its frames; reading nothing for OUTBOX_STALL_TIMEOUT, the
            # client is disconnected, its requests withdrawn.
            started = trio.current_time()
            with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                for n in range(below, 4 * below):
                    await served.client.send(chat(n))
            await served.closed.wait()
            assert trio.current_time() - started >= OUTBOX_STALL_TIMEOUT
            assert served.scheduler.forgotten == [served.connection]
            assert below < len(served.scheduler.submitted) <= cap // reply_bytes + 2
            with pytest.raises(EOFError):
                while True:
                    await served.client.receive()


async def test_a_client_reading_large_replies_slowly_is_not_disconnected(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """A reviewer's finding: `trio-mapper map` of embedding batches (130 MB replies, each decoded for a
    second before the next is read) passed the 256 MiB of unsent replies while reading, was disconnected as
    a client that does not read, and lost every request in flight; run again, it failed the same way."""
    reply_bytes = 64 * 1024
    monkeypatch.setattr(server, "OUTBOX_MAX_BYTES", 4 * reply_bytes)
    monkeypatch.setattr(server, "WRITE_PIECE_BYTES", reply_bytes)
    count = 12
    with trio.fail_after(count * OUTBOX_STALL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            served = serve_connection(nursery, pair=trio.testing.lockstep_stream_pair, reply_bytes=reply_bytes)
            await say_hello(served)

            async def send_all_requests() -> None:
                for n in range(count):
                    await served.client.send(chat(n))

            nursery.start_soon(send_all_requests)
            replies = []
            for _ in range(count):
                await trio.sleep(OUTBOX_STALL_TIMEOUT / 2)  # the time to decode a large reply
                replies.append(await served.client.receive())
            assert sorted(reply["id"] for reply in replies) == list(range(count))
            assert not served.closed.is_set() and served.scheduler.forgotten == []
            nursery.cancel_scope.cancel()


async def test_the_engine_wide_backlog_disconnects_the_client_holding_the_most() -> None:
    # Each client stays under the per-connection cap; together they pass the engine-wide one. The one
    # holding the most unread replies goes; the other, and everything it has, stays.
    reply_bytes = 64 * 1024
    unsent = UnsentReplies(max_bytes=24 * reply_bytes)
    with trio.fail_after(60):  # hang guard
        async with trio.open_nursery() as nursery:
            lockstep = trio.testing.lockstep_stream_pair
            light = serve_connection(nursery, pair=lockstep, reply_bytes=reply_bytes, unsent=unsent)
            heavy = serve_connection(nursery, pair=lockstep, reply_bytes=reply_bytes, unsent=unsent)
            await say_hello(light)
            await say_hello(heavy)
            for n in range(8):
                await light.client.send(chat(n))
            with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                for n in range(100):
                    await heavy.client.send(chat(n))
            await heavy.closed.wait()
            assert heavy.scheduler.forgotten == [heavy.connection]
            assert not light.closed.is_set() and light.scheduler.forgotten == []
            # What the disconnected client held is no longer counted; the survivor's replies all arrive.
            assert unsent.total == light.connection.unsent_bytes
            replies = [await light.client.receive() for _ in range(8)]
            assert sorted(reply["id"] for reply in replies) == list(range(8))
            await trio.testing.wait_all_tasks_blocked()
            assert unsent.total == 0
            nursery.cancel_scope.cancel()


async def test_a_uid_announcing_large_frames_and_stalling_cannot_hold_up_another_uids(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A reviewer's attack: 32 connections announcing 4 MiB frames and sending nothing more held the whole
    total of frames being received (64 MiB), renewably, and another user's large request waited ~117 s. One
    uid now holds at most a quarter of it; its own frames wait for its share, not the others'."""
    receiving = ReceivingBytes(receiving_limit(DEFAULT_MAX_FRAME_BYTES))
    declared = PREFIX.pack(DEFAULT_MAX_FRAME_BYTES) + b"\x87"  # a frame's first byte (a map), the rest never sent
    async with trio.open_nursery() as nursery:
        stalling = [serve_connection(nursery, receiving=receiving, client=ClientIdentity(uid=1000)) for _ in range(32)]
        for served in stalling:
            await say_hello(served)
            await served.client.send_raw(declared)
        await trio.testing.wait_all_tasks_blocked()
        assert (receiving.held, receiving.waiting) == (16 << 20, 28)
        other = serve_connection(nursery, receiving=receiving, client=ClientIdentity(uid=2000))
        await say_hello(other)
        with trio.fail_after(1):  # the stalling frames have 60 s each: the other uid does not wait for them
            reply = await other.client.request(chat("large", "x" * (1 << 20)))
        assert reply["type"] == "result"
        nursery.cancel_scope.cancel()


# --- a real engine -------------------------------------------------------------------------------------------


async def test_a_real_engine_answers_every_ping_of_a_flood_sent_without_reading(short_tmp: Path) -> None:
    count = 3 * OUTBOX_HIGH_WATER
    flood = b"".join(frame({"type": "ping", "id": n}) for n in range(count)) + frame(chat("last"))
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        with trio.fail_after(60):
            async with await RawClient.connect(str(engine.socket)) as client, trio.open_nursery() as nursery:
                # More than the socket buffers and the high-water mark hold: the send finishes only as we read.
                nursery.start_soon(client.send_raw, flood)
                replies = [await client.receive() for _ in range(count + 1)]
        assert await engine.stop() == 0
    pongs = [reply["id"] for reply in replies if reply["type"] == "pong"]
    assert sorted(pongs) == list(range(count))
    assert [(reply["type"], reply["id"]) for reply in replies if reply["type"] != "pong"] == [("result", "last")]


async def test_a_real_engine_holds_large_frames_being_received_to_one_share_per_uid(short_tmp: Path) -> None:
    """The total is the daemon's, shared by every connection: with the default 4 MiB frames it holds 16 of them
    (64 MiB) while they arrive, a quarter of that for one uid (this test's): a 5th frame waits for one of its
    uid's 4 to finish or go away."""
    declared = PREFIX.pack(DEFAULT_MAX_FRAME_BYTES) + b"\x87"  # a frame's first byte (a map), the rest to come
    share = (64 << 20) // 4

    async def wait_for(monitor: RawClient, held: int, waiting: int) -> None:
        while True:  # the engine is another process: its stats are polled
            engine = (await monitor.request({"type": "stats", "id": 0}))["engine"]
            if (engine["receiving_bytes"], engine["receiving_waiting"]) == (held, waiting):
                return
            await trio.sleep(0.05)

    async with simulator() as url, running_engine(short_tmp, url) as engine:
        with trio.fail_after(30):
            async with await RawClient.connect(str(engine.socket)) as monitor:
                await monitor.request(HELLO)
                senders = [
                    await RawClient.connect(str(engine.socket)) for _ in range(share // DEFAULT_MAX_FRAME_BYTES + 1)
                ]
                for sender in senders:
                    await sender.request(HELLO)
                    await sender.send_raw(declared)
                await wait_for(monitor, share, 1)
                await senders.pop(0).aclose()
                await wait_for(monitor, share, 0)  # the waiting one got the room given back
                for sender in senders:
                    await sender.aclose()
                await wait_for(monitor, 0, 0)
        assert await engine.stop() == 0
