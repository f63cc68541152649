"""The HTTP front against clients that misbehave: the engine as a real subprocess, raw sockets as clients.

Each case was found by a hostile client (a review of the front): the engine must answer in OpenAI's shape,
admit nothing it cannot send, and hold no resource for a client that has gone.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import simulator
from raw_client import RawClient, chat
from test_http_front import CLIENT_KEY, engine_stats, http_engine, http_socket, raw_http

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def tcp_port(tcp_url: str) -> int:
    """The engine's TCP port, from its base URL (``http://127.0.0.1:PORT/v1``)."""
    return int(tcp_url.rsplit(":", 1)[1].split("/")[0])


def h2_client(**config: Any) -> Any:
    """An HTTP/2 client connection (h2's, sans-IO), its preface ready to send."""
    import h2.config
    import h2.connection

    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, **config))
    connection.initiate_connection()
    return connection


def connections_on(port: int) -> int:
    """Sockets the server holds on ``port`` besides its listener: CLOSE-WAIT ones included, not TIME-WAIT
    (which hold no descriptor)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if int(local.split(":")[1], 16) == port and state not in {"0A", "06"}:  # LISTEN, TIME-WAIT
            count += 1
    return count


def post(body: bytes, *headers: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n"
        + b"".join(header + b"\r\n" for header in headers)
        + b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def status_and_error(reply: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)["error"]


async def test_connections_the_clients_closed_are_released_at_once(short_tmp: Path) -> None:
    """hypercorn kept a closed connection's socket for its whole keep-alive timeout (75 s): a client opening
    and closing connections in a loop used up the engine's file descriptors."""
    async with simulator() as url, http_engine(short_tmp, url) as (_, tcp_url):
        port = int(tcp_url.split(":")[2].split("/")[0])
        for index in range(150):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            if index % 3 == 0:  # some close after a whole exchange, kept alive by the server until then
                request = post(CHAT, b"Authorization: Bearer " + CLIENT_KEY.encode())
                await stream.send_all(request.replace(b"Connection: close", b"Connection: keep-alive"))
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
            await stream.aclose()
        with trio.fail_after(10):
            while True:
                if connections_on(port) == 0:
                    break
                await trio.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_connection_closed_in_the_middle_of_its_reply_is_released_at_once(
    short_tmp: Path, stream: bool
) -> None:
    """Closed once the reply's first bytes came: the reply's end restarted hypercorn's keep-alive timer, and
    the connection stayed for 75 s more."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    async with simulator(per_token_latency_ms=5.0) as url, http_engine(short_tmp, url) as (engine, _):
        for _ in range(10):
            client = await trio.open_unix_socket(http_socket(engine))
            await client.send_all(post(body.encode()).replace(b"Connection: close", b"Connection: keep-alive"))
            assert (await client.receive_some(100)).startswith(b"HTTP/1.1 200 ")
            await client.aclose()
        with trio.fail_after(10):
            while (await engine_stats(engine))["engine"]["http_connections"]:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_closing_the_writing_half_after_a_request_withdraws_it(short_tmp: Path, transport: str) -> None:
    """As docs/http.md says (and protocol.md for the msgpack socket): the engine cannot tell a half-close from a
    close on TCP, and a client that left must not keep its request spending the budget."""
    request = post(CHAT, b"Authorization: Bearer " + CLIENT_KEY.encode())
    async with simulator(latency_ms=2000.0) as url, http_engine(short_tmp, url) as (engine, tcp_url):
        if transport == "unix":
            stream: trio.SocketStream = await trio.open_unix_socket(http_socket(engine))
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", tcp_port(tcp_url))
        async with stream:
            await stream.send_all(request)
            await stream.send_eof()
            with trio.fail_after(10):
                assert await stream.receive_some(65536) == b""  # closed without a reply
        stats = (await engine_stats(engine))["engine"]
    assert stats["http_requests"]["disconnected"] == 1 and stats["outstanding"] == 0


async def test_a_header_the_upstream_cannot_carry_is_refused_before_admission(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        reply = await raw_http(http_socket(engine), post(CHAT, "OpenAI-Beta: café".encode()))
        stats = await engine_stats(engine)
    status, headers, error = status_and_error(reply)
    assert status == 400 and headers["x-should-retry"] == "false"
    assert error["code"] == "invalid_request" and "openai-beta" in str(error["message"]).lower()
    assert stats["engine"]["internal_errors"] == 0
    assert stats["engine"]["accepted"] == 0  # refused before admission: nothing charged to the budget


async def test_two_authorization_headers_are_refused_whichever_holds_the_key(short_tmp: Path) -> None:
    """Only the last counted: a wrong key before a right one got in, a right key before a wrong one was refused
    as missing."""
    right, wrong = b"Authorization: Bearer " + CLIENT_KEY.encode(), b"Authorization: Bearer tm-wrong-0123456789abcdef"
    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        port = tcp_port(tcp_url)
        replies = []
        for pair in ((right, wrong), (wrong, right)):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(post(CHAT, *pair))
                reply = b""
                while chunk := await stream.receive_some(65536):
                    reply += chunk
            replies.append(status_and_error(reply))
        stats = await engine_stats(engine)
    for status, headers, error in replies:
        assert status == 401 and headers["x-should-retry"] == "false" and "www-authenticate" in headers
        assert error["code"] == "invalid_api_key"
        assert str(error["message"]).startswith("more than one Authorization header: send one Authorization: Bearer")
    assert stats["engine"]["accepted"] == 0 and stats["engine"]["http_requests"]["unauthorized"] == 2


async def test_a_body_nested_too_deeply_is_a_400(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        reply = await raw_http(http_socket(engine), post(b"[" * 100_000))
        assert engine.process.returncode is None
    status, headers, error = status_and_error(reply)
    assert status == 400 and headers["x-should-retry"] == "false"
    assert error["code"] == "invalid_json"


async def test_a_websocket_handshake_gets_an_openai_shaped_404(short_tmp: Path) -> None:
    """What the Realtime API's clients send first."""
    handshake = (
        b"GET /v1/realtime?model=gpt-4o-realtime HTTP/1.1\r\nHost: engine\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        reply = await raw_http(http_socket(engine), handshake)
    status, _, error = status_and_error(reply)
    assert status == 404 and error["code"] == "unknown_url"
    assert "WebSocket" in str(error["message"])


async def test_the_engine_takes_all_the_open_files_its_hard_limit_allows(short_tmp: Path) -> None:
    """Every connection costs a descriptor, and services often start with a soft limit of 1024: a few hundred
    idle keep-alive clients would stop the engine from accepting anyone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    wanted = min(wanted, 1 << 20)
    if wanted <= 256:
        pytest.skip("the hard limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the engine started below
    try:
        async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
            limits = await trio.Path(f"/proc/{engine.process.pid}/limits").read_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert int(line.split()[3]) == wanted, line


async def test_http2_in_cleartext_follows_the_same_rules(short_tmp: Path) -> None:
    """hypercorn also speaks HTTP/2 without TLS (prior knowledge): the key is required just the same."""
    async with (
        simulator() as url,
        http_engine(short_tmp, url) as (_, tcp_url),
        httpx.AsyncClient(http1=False, http2=True) as http,
    ):
        refused = await http.post(tcp_url + "/chat/completions", content=CHAT)
        served = await http.post(
            tcp_url + "/chat/completions", content=CHAT, headers={"authorization": f"Bearer {CLIENT_KEY}"}
        )
    assert refused.http_version == served.http_version == "HTTP/2"
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert served.status_code == 200 and served.json()["choices"]


async def h2_exchange(stream: trio.SocketStream, connection: Any, stream_id: int) -> tuple[int, bytes]:
    """Read HTTP/2 frames until ``stream_id``'s reply is whole: its status and body."""
    import h2.events

    status, body = 0, b""
    while True:
        data = await stream.receive_some(65536)
        assert data, "the engine closed the connection"
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                body += event.data
                connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                await stream.send_all(connection.data_to_send())
                return status, body
        await stream.send_all(connection.data_to_send())


async def test_http2_a_body_arriving_after_its_reply_does_not_end_the_connection(short_tmp: Path) -> None:
    """The engine answers a keyless request (401) before reading its body. hypercorn 0.18 then failed on the
    body's DATA frame (KeyError) and closed the connection, cutting every other request on it."""

    def head(key: str | None) -> list[tuple[str, str]]:
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "engine")]
        headers += [(":path", "/v1/chat/completions"), ("content-type", "application/json")]
        return headers + ([("authorization", f"Bearer {key}")] if key else [])

    async with simulator() as url, http_engine(short_tmp, url) as (_, tcp_url):
        port = tcp_port(tcp_url)
        connection = h2_client()
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                connection.send_headers(1, head(None))  # the body follows later
                await stream.send_all(connection.data_to_send())
                status, _ = await h2_exchange(stream, connection, 1)
                assert status == 401
                connection.send_data(1, CHAT, end_stream=True)  # the body, after its reply
                connection.send_headers(3, head(CLIENT_KEY))
                connection.send_data(3, CHAT, end_stream=True)
                await stream.send_all(connection.data_to_send())
                status, body = await h2_exchange(stream, connection, 3)
        assert status == 200 and json.loads(body)["choices"]


async def test_http2_requests_hypercorn_cannot_read_are_reset_alone(short_tmp: Path) -> None:
    """A plain CONNECT (no :path), or a :path or :method that is not ASCII: hypercorn failed on each, and any
    client, keyless on the port too, ended its connection with every other request on it and had a traceback
    logged at ERROR, as often as it liked."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    base = [(b":scheme", b"http"), (b":authority", b"engine")]
    malformed = {
        1: [(b":method", b"CONNECT"), (b":authority", b"other.host:443")],
        3: [(b":method", b"GET"), *base, (b":path", "/v1/models/café".encode())],
        5: [(b":method", "GÉT".encode()), *base, (b":path", b"/healthz")],
    }
    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        port = tcp_port(tcp_url)
        connection = h2_client(validate_outbound_headers=False)
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                for stream_id, headers in malformed.items():
                    connection.send_headers(stream_id, headers, end_stream=True)
                connection.send_headers(7, [(b":method", b"GET"), *base, (b":path", b"/healthz")], end_stream=True)
                await stream.send_all(connection.data_to_send())
                reset: dict[int, int] = {}
                headers: dict[bytes, bytes] = {}
                body, ended = b"", False
                while len(reset) < len(malformed) or not ended:
                    data = await stream.receive_some(65536)
                    assert data, "the engine closed the connection"
                    for event in connection.receive_data(data):
                        if isinstance(event, h2.events.StreamReset):
                            reset[event.stream_id] = event.error_code
                        elif isinstance(event, h2.events.ResponseReceived):
                            headers = dict(event.headers)
                        elif isinstance(event, h2.events.DataReceived):
                            body += event.data
                        ended = ended or isinstance(event, h2.events.StreamEnded)
        log = engine.log
    assert reset == dict.fromkeys(malformed, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    # The same connection serves its well-formed request.
    assert headers[b":status"] == b"200" and json.loads(body) == {"status": "ok"}
    assert "unexpected error" not in log and "Traceback" not in log


async def test_http2_priority_frames_naming_many_streams_are_ignored(short_tmp: Path) -> None:
    """hypercorn kept every stream a PRIORITY frame named, opened or not, in a tree that raised at its 1,001st:
    any client, keyless on the port too, ended its connection and had a traceback logged at ERROR."""

    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        port = tcp_port(tcp_url)
        connection = h2_client()
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                for stream_id in range(3, 3 + 2 * 1001, 2):  # streams never opened
                    connection.prioritize(stream_id, weight=16, depends_on=0)
                headers = [(":method", "GET"), (":scheme", "http"), (":authority", "engine"), (":path", "/healthz")]
                connection.send_headers(1, headers, end_stream=True)
                await stream.send_all(connection.data_to_send())
                status, body = await h2_exchange(stream, connection, 1)
        log = engine.log
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert "unexpected error" not in log and "Traceback" not in log


async def test_http2_a_header_block_is_held_no_larger_than_the_header_list_allowed(short_tmp: Path) -> None:
    """h2 gathered up to 64 frames (1 MiB) of one header block before refusing it: keyless connections, each
    alive 10 s, held gigabytes between them, where HTTP/1.1's hold 16 KiB. Past the 64 KiB hypercorn announces
    as the largest header list, the connection is now refused (GOAWAY) as soon as the block outgrows it."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import hyperframe.frame

    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        port = tcp_port(tcp_url)
        # A header block spread over CONTINUATION frames, within the header list allowed: served.
        connection = h2_client()
        padding = ("x-padding", "".join(f"{n:08x}" for n in range(5000)))  # 40 KB, HPACK cannot shrink it much
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                headers = [(":method", "GET"), (":scheme", "http"), (":authority", "engine"), (":path", "/healthz")]
                connection.send_headers(1, [*headers, padding], end_stream=True)
                await stream.send_all(connection.data_to_send())
                status, _ = await h2_exchange(stream, connection, 1)
        assert status == 200
        # A header block that never ends.
        connection = h2_client()
        opening = hyperframe.frame.HeadersFrame(1, data=b"\x82")  # :method GET, and no END_HEADERS
        continuation = hyperframe.frame.ContinuationFrame(1, data=bytes(16384))
        terminated: list[h2.events.ConnectionTerminated] = []
        with trio.fail_after(30):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                with contextlib.suppress(trio.BrokenResourceError):  # refused before it has all been sent
                    await stream.send_all(
                        connection.data_to_send() + opening.serialize() + continuation.serialize() * 63
                    )
                with contextlib.suppress(trio.BrokenResourceError):
                    while data := await stream.receive_some(65536):
                        events = connection.receive_data(data)
                        terminated += [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [event.error_code for event in terminated] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
        assert engine.process.returncode is None and "Traceback" not in engine.log


async def test_a_client_that_never_reads_its_reply_does_not_keep_the_engine_from_stopping(short_tmp: Path) -> None:
    """hypercorn's writes wait for ever, shielded from cancellation: an unread reply of megabytes held its
    connection and buffers, and SIGTERM (twice) left the engine running until the client went away."""
    inputs = [f"text number {i}" for i in range(300)]
    body = json.dumps({"model": "text-embedding-3-small", "input": inputs, "encoding_format": "float"}).encode()
    request = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    async with simulator() as url, http_engine(short_tmp, url, "--grace-period", "2") as (engine, _):
        stream = await trio.open_unix_socket(http_socket(engine))
        async with stream:
            await stream.send_all(request)  # and never read: the reply (megabytes) fills the socket's buffers
            with trio.fail_after(30):
                lanes: dict[str, Any] = {}
                while lanes.get("text-embedding-3-small", {}).get("succeeded") != 1:
                    await trio.sleep(0.05)
                    lanes = (await engine_stats(engine))["lanes"]
            engine.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):  # the grace period, the flush time (5 s), then the write is cut
                assert await engine.process.wait() == 0
        assert "flush time (5s) is up: cut 1 replies still being written" in engine.log


async def closed_by_engine(stream: trio.SocketStream) -> bool:
    """Whether the engine closed the connection (a reset if it closed it with the client's bytes unread)."""
    try:
        return await stream.receive_some(1) == b""
    except trio.BrokenResourceError:
        return True


async def test_keyless_tcp_connections_cannot_lock_out_key_holders_or_the_unix_clients(short_tmp: Path) -> None:
    """Any local user may connect to the port, without a key until a request. Thousands of idle connections
    took every descriptor, and the msgpack and Unix HTTP clients could not connect any more; then, with the
    port capped, they took every TCP slot (kept by sending a header line now and then), and key holders were
    refused. Now keyless connections give way, oldest first, to newcomers; a keyed one never does."""
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux) to give the engine a small open-file limit")
    keyed_request = post(CHAT, b"Authorization: Bearer " + CLIENT_KEY.encode()).replace(
        b"Connection: close", b"Connection: keep-alive"
    )
    # 400 open files: the engine allows 100 TCP connections.
    async with simulator() as url, http_engine(short_tmp, url, open_files=400) as (engine, tcp_url):
        port = tcp_port(tcp_url)
        keyed = await trio.open_tcp_stream("127.0.0.1", port)
        await keyed.send_all(keyed_request)
        assert (await keyed.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        flood = []
        for _ in range(450):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\n")  # never ended
            flood.append(stream)
        try:
            with trio.fail_after(30):
                async with await RawClient.connect(str(engine.socket)) as raw:
                    assert (await raw.request(chat(1)))["type"] == "result"
                async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=http_socket(engine))) as unix:
                    reply = await unix.post("http://engine/v1/chat/completions", content=CHAT)
                    assert reply.status_code == 200
                async with httpx.AsyncClient(headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as tcp:
                    reply = await tcp.post(f"{tcp_url}/chat/completions", content=CHAT)
                    assert reply.status_code == 200  # a newcomer with a key is served on a full port
                await keyed.send_all(keyed_request)  # the keyed connection from before the flood is still there
                assert (await keyed.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
                closed = [await closed_by_engine(stream) for stream in flood[:350]]  # gave way, oldest first
            assert all(closed)
            assert "connection(s) that had sent no request with a client key closed to make room" in engine.log
        finally:
            await keyed.aclose()
            for stream in flood:
                await stream.aclose()


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything the engine sends until it closes the connection."""
    reply = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return reply


#: Requests hypercorn refuses before the app sees them (h11 cannot read them): the status, the code and what
#: the message must say.
UNREADABLE = {
    "request line": (b"GET /healthz HTTP/1.1 again\r\nHost: engine\r\n\r\n", 400, "malformed_request", "request line"),
    "header line": (b"GET /healthz HTTP/1.1\r\nHost: engine\r\nNo colon\r\n\r\n", 400, "malformed_request", "header"),
    "no Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "malformed_request", "send a Host header"),
    "chunk": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "malformed_request",
        "chunked body",
    ),
    # Never ended, past h11's limit on an incomplete event (16 KiB).
    "head too large": (
        b"GET /healthz HTTP/1.1\r\nHost: engine\r\nX-Padding: " + b"a" * 20_000,
        431,
        "request_head_too_large",
        "larger than the engine accepts (16384 bytes); send fewer or shorter headers",
    ),
    "transfer-encoding": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "unsupported_transfer_encoding",
        "Content-Length, or with one Transfer-Encoding: chunked header",
    ),
}


async def test_requests_the_server_cannot_read_are_refused_in_openais_shape(short_tmp: Path) -> None:
    """hypercorn refuses them itself, before the app runs: the client had a bare 400, 431 or 501 with an empty
    body, which the SDK shows as "Error code: 400" and nothing more."""
    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        port = tcp_port(tcp_url)
        replies = {}
        for name, (request, *_) in UNREADABLE.items():
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:  # no key: refused all the same
                await stream.send_all(request)
                replies[name] = await read_to_end(stream)  # and the connection closed
        # The engine serves on.
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as http:
            served = await http.post(f"{tcp_url}/chat/completions", content=CHAT)
        log = engine.log
    for name, (_, expected_status, code, says) in UNREADABLE.items():
        status, headers, error = status_and_error(replies[name])
        assert (status, error["code"]) == (expected_status, code), name
        assert says in str(error["message"]), (name, error["message"])
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert int(headers["content-length"]) == len(replies[name].partition(b"\r\n\r\n")[2])
        assert headers["x-should-retry"] == "false"  # nor does the SDK retry the 501, as it would a 5xx
    assert served.status_code == 200 and served.json()["choices"]
    assert "Traceback" not in log


async def test_a_keyless_client_expecting_100_continue_is_refused_without_being_invited_to_send_its_body(
    short_tmp: Path,
) -> None:
    """hypercorn answered ``100 Continue`` before the app had checked the key: a client without one was invited
    to send its body, which the app then refused unread. A client with a key is invited once the app reads."""
    head = post(CHAT).replace(b"Connection: close\r\n", b"Connection: close\r\nExpect: 100-continue\r\n")
    head = head.removesuffix(CHAT)
    async with simulator() as url, http_engine(short_tmp, url) as (_, tcp_url):
        port = tcp_port(tcp_url)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(head)  # and never the body
            refused = await read_to_end(stream)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            authorized = head.replace(
                b"Host: engine\r\n", b"Host: engine\r\nAuthorization: Bearer %s\r\n" % CLIENT_KEY.encode()
            )
            await stream.send_all(authorized)
            with trio.fail_after(10):
                invited = await stream.receive_some(65536)
            await stream.send_all(CHAT)
            served = await read_to_end(stream)
    assert refused.startswith(b"HTTP/1.1 401 ") and b"HTTP/1.1 100" not in refused
    assert status_and_error(refused)[2]["code"] == "invalid_api_key"
    assert invited.startswith(b"HTTP/1.1 100 ") and invited.endswith(b"\r\n\r\n")
    assert served.startswith(b"HTTP/1.1 200 ") and json.loads(served.partition(b"\r\n\r\n")[2])["choices"]
