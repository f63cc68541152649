"""One HTTP connection (hypercorn's, as `fronts/http/server.py` changes it) over a real socket pair, with a tiny
ASGI app and Trio's virtual clock: its keep-alive timer, and how its replies are written."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from trio_mapper.engine.fronts.http.server import (
    KEEP_ALIVE_TIMEOUT,
    MAX_JOINED_BODY_BYTES,
    SEND_STALL_TIMEOUT,
    ReplyWrites,
    _hypercorn_config,
    _replies_being_written,
    _TCPServer,
)
from trio_mapper.engine.fronts.unsent import UnsentReplies

REPLY = b'{"ok":true}'


class RecordingStream:
    """The server's end of the pair, noting each write."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.socket = stream.socket
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        await self._stream.send_all(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class App:
    """Reads the whole body, waits ``think`` seconds, answers `REPLY`."""

    def __init__(self, think: float = 0.0) -> None:
        self.think = think
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await trio.sleep(self.think)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(REPLY)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": REPLY})


@asynccontextmanager
async def connection(
    app: Any, unsent: UnsentReplies | None = None
) -> AsyncIterator[tuple[trio.SocketStream, RecordingStream, trio.Event]]:
    """A served connection: the client's end, the server's recorded end, and an event set when the server is
    done with the connection."""
    client_socket, server_socket = trio.socket.socketpair()
    client, server_end = trio.SocketStream(client_socket), RecordingStream(trio.SocketStream(server_socket))
    config = _hypercorn_config()
    done = trio.Event()
    sending = ReplyWrites(unsent or UnsentReplies())

    async def serve() -> None:
        _replies_being_written.set(sending)  # as `HttpServer` does for each connection
        server = _TCPServer(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),
            config,
            WorkerContext(None),
            {},
            server_end,
            sending=sending,
        )
        await server.run()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield client, server_end, done
        nursery.cancel_scope.cancel()


def request(body: bytes = b"{}", *headers: bytes) -> bytes:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(header + b"\r\n" for header in headers) + b"\r\n" + body


async def read_reply(client: trio.SocketStream) -> bytes:
    received = b""
    while not received.endswith(REPLY):
        chunk = await client.receive_some()
        assert chunk, f"closed before the reply was whole: {received!r}"
        received += chunk
    return received


async def test_a_replys_head_goes_out_in_one_write_with_its_body(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(App()) as (client, server_end, _):
        await client.send_all(request())
        reply = await read_reply(client)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert server_end.writes == [reply]


async def test_100_continue_goes_out_at_once_for_the_client_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = App()
    async with connection(app) as (client, _, _):
        await client.send_all(request(b"", b"Expect: 100-continue").replace(b"Length: 0", b"Length: 2"))
        with trio.fail_after(5):
            interim = await client.receive_some()
        assert interim.startswith(b"HTTP/1.1 100 ")
        await client.send_all(b"{}")
        assert (await read_reply(client)).startswith(b"HTTP/1.1 200 ")
        assert app.bodies == [b"{}"]


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(App()) as (client, _, done):
        for _ in range(3):  # the timer restarts after each reply
            await client.send_all(request())
            await read_reply(client)
            idle_since = trio.current_time()
            with trio.move_on_after(KEEP_ALIVE_TIMEOUT - 1):
                await done.wait()
            assert not done.is_set()
        await done.wait()
        assert KEEP_ALIVE_TIMEOUT <= trio.current_time() - idle_since < KEEP_ALIVE_TIMEOUT + 1
        assert await client.receive_some() == b""


async def test_a_request_longer_than_the_keep_alive_timeout_is_not_cut(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(App(think=3 * KEEP_ALIVE_TIMEOUT)) as (client, _, done):
        await client.send_all(request())
        assert (await read_reply(client)).startswith(b"HTTP/1.1 200 ")
        replied = trio.current_time()
        await done.wait()
        assert trio.current_time() - replied >= KEEP_ALIVE_TIMEOUT


async def test_a_connection_the_client_closed_is_done_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(App()) as (client, _, done):
        await client.send_all(request())
        await read_reply(client)
        closed = trio.current_time()
        await client.aclose()
        await done.wait()
        assert trio.current_time() - closed < 1


async def test_the_replies_being_written_are_bounded_by_cutting_the_largest() -> None:
    """A reviewer's 60 connections that never read 20 MB replies held 2.7 GiB for the 60 s each write may wait."""
    unsent = UnsentReplies(max_bytes=100)
    writes = ReplyWrites(unsent)
    small, large, third = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
    writes.add(small, 30)
    writes.add(large, 60)
    assert not (small.cancel_called or large.cancel_called)
    writes.add(third, 20)  # 110 in all: the largest write goes
    assert large.cancel_called and not small.cancel_called and not third.cancel_called
    writes.remove(large)
    assert unsent.total == 50
    writes.cut_all()  # shutdown's flush time is up
    assert small.cancel_called and third.cancel_called


class LargeReplyApp:
    """Answers every request with ``size`` bytes in one send; notes when each send returned."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(self.size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"x" * self.size})
        self.sent += 1


async def h2_requests_with_a_closed_window(client: trio.SocketStream, streams: int) -> Any:
    """Open an HTTP/2 connection whose streams' windows are zero (the client reads nothing), send ``streams``
    requests on it, and return the client's h2 connection."""
    import h2.config
    import h2.connection
    import h2.settings

    h2_client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2_client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    h2_client.initiate_connection()
    head = [(":method", "GET"), (":scheme", "http"), (":authority", "engine"), (":path", "/v1/models")]
    for stream_id in range(1, 2 * streams, 2):
        h2_client.send_headers(stream_id, head, end_stream=True)
    await client.send_all(h2_client.data_to_send())
    return h2_client


async def streams_reset(client: trio.SocketStream, h2_client: Any, count: int) -> set[int]:
    import h2.events

    reset: set[int] = set()
    while len(reset) < count:
        with trio.fail_after(2 * SEND_STALL_TIMEOUT):
            data = await client.receive_some()
        assert data, "the server closed the connection"
        reset |= {e.stream_id for e in h2_client.receive_data(data) if isinstance(e, h2.events.StreamReset)}
        await client.send_all(h2_client.data_to_send())
    return reset


async def test_an_http2_reply_the_client_lets_nothing_of_is_reset_after_the_stall_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """hypercorn held an HTTP/2 reply in its stream buffer for as long as the client kept its window shut
    (a reviewer's zero-window client held 880 MiB); now as long as an HTTP/1.1 write may wait, then reset."""
    app, unsent = LargeReplyApp(1 << 20), UnsentReplies()
    async with connection(app, unsent) as (client, _, _):
        h2_client = await h2_requests_with_a_closed_window(client, streams=1)
        started = trio.current_time()
        assert await streams_reset(client, h2_client, 1) == {1}
        assert SEND_STALL_TIMEOUT <= trio.current_time() - started < SEND_STALL_TIMEOUT + 1
        await trio.testing.wait_all_tasks_blocked()
        assert app.sent == 1  # the app's send returned: it is not left waiting
        assert unsent.total == 0


async def test_http2_replies_waiting_for_the_window_count_against_the_replies_being_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app, unsent = LargeReplyApp(600_000), UnsentReplies(1_000_000)
    async with connection(app, unsent) as (client, _, _):
        h2_client = await h2_requests_with_a_closed_window(client, streams=2)
        started = trio.current_time()
        assert len(await streams_reset(client, h2_client, 1)) == 1  # 1.2 MB held: one is cut at once
        assert trio.current_time() - started < 1
        assert unsent.total <= 600_000


async def test_a_large_replys_body_is_written_apart_from_its_head(autojump_clock: trio.testing.MockClock) -> None:
    """Joined to its head, a 100 MB body was copied whole on the event loop."""
    size = 4 * MAX_JOINED_BODY_BYTES
    async with connection(LargeReplyApp(size)) as (client, server_end, _):
        await client.send_all(request())
        received = b""
        while not received.endswith(b"x" * size):
            received += await client.receive_some()
        head, body = server_end.writes
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n") and body == b"x" * size
