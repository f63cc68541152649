"""The upstream's connections write each request in one send, over a real TCP socket to a real (tiny) server."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
import trustme
from conftest import read_http_request

from trio_mapper.engine.process.settings import OpenAISettings
from trio_mapper.engine.upstream.client import BODY_PIECE_BYTES, Upstream
from trio_mapper.engine.upstream.connections import upstream_transport

REPLY = b'{"ok": true}'


class TinyServer:
    """HTTP/1.1 with Content-Length, keep-alive: each request it read whole, answered with `REPLY`."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        buffer = b""
        while (request := await read_http_request(stream, buffer)) is not None:
            head, body, buffer = request
            self.requests.append((head, body))
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(REPLY), REPLY)
            )


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[TinyServer, str]]:
    tiny = TinyServer()
    listeners = await nursery.start(partial(trio.serve_tcp, tiny.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    yield tiny, f"http://127.0.0.1:{port}"


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every `send_all` of the client's side (the server's replies start with its status line)."""
    seen: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async def recording(self: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
        if not bytes(data).startswith(b"HTTP/1.1 "):
            seen.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording)
    return seen


def client(base_url: str, ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(base_url=base_url, transport=upstream_transport(limits, ssl_context))


async def test_a_request_leaves_in_one_send_head_and_body(server: tuple[TinyServer, str], sends: list[bytes]) -> None:
    tiny, url = server
    async with client(url) as http:
        response = await http.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert response.json() == {"ok": True}
    assert len(sends) == 1
    head, body = tiny.requests[0]
    assert sends[0] == head + b"\r\n\r\n" + body
    assert json.loads(body) == {"model": "m", "messages": []}


async def test_requests_without_a_body_and_on_a_kept_connection_each_leave_in_one_send(
    server: tuple[TinyServer, str], sends: list[bytes]
) -> None:
    tiny, url = server
    async with client(url) as http:
        for _ in range(3):
            assert (await http.get("/v1/models")).json() == {"ok": True}
        assert (await http.post("/v1/embeddings", content=b"{}")).json() == {"ok": True}
    assert tiny.connections == 1
    assert len(sends) == 4
    assert [send.split(b" ")[0] for send in sends] == [b"GET", b"GET", b"GET", b"POST"]


async def test_a_body_sent_in_pieces_arrives_whole(server: tuple[TinyServer, str], sends: list[bytes]) -> None:
    """The engine sends large bodies in pieces: the head goes with the first, the others go on their own."""
    tiny, url = server
    settings = OpenAISettings(api_key="sk-test-secret-key", base_url=f"{url}/v1")
    body = json.dumps({"input": "x" * (3 * BODY_PIECE_BYTES)}).encode()
    async with Upstream(settings, max_connections=1) as upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/embeddings"), body)
    assert reply.status == 200
    assert tiny.requests[0][1] == body
    assert sends[0].startswith(b"POST /v1/embeddings HTTP/1.1\r\n")
    assert sends[0].endswith(body[:BODY_PIECE_BYTES])
    assert b"".join(sends[1:]) == body[BODY_PIECE_BYTES:]


async def test_over_tls_a_request_leaves_in_one_record(nursery: trio.Nursery) -> None:
    """The real API is reached over TLS: the head and body go in one TLS record, which arrives whole."""
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    tiny = TinyServer()
    records: list[bytes] = []

    async def handle_tls(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await tls.do_handshake()
        # What each read of the decrypted stream returned: a record at most per read, as sent.
        receive_some = tls.receive_some

        async def noting(max_bytes: int | None = None) -> bytes:
            data = await receive_some(max_bytes)
            records.append(data)
            return data

        tls.receive_some = noting  # type: ignore[method-assign]
        await tiny.handle(tls)

    listeners = await nursery.start(partial(trio.serve_tcp, handle_tls, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with client(f"https://localhost:{port}", client_context) as http:
        response = await http.post("/v1/chat/completions", json={"model": "m"})
    assert response.json() == {"ok": True}
    head, body = tiny.requests[0]
    assert records[0] == head + b"\r\n\r\n" + body
