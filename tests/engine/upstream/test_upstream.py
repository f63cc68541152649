"""Endpoint validation and joining: the key must never travel anywhere but the configured base URL."""

import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import trio
import trio.testing

from trio_mapper.engine.process.settings import OpenAISettings
from trio_mapper.engine.upstream.client import (
    InvalidEndpoint,
    ReplyBody,
    Upstream,
    UpstreamStream,
    join_url,
    relative_api_path,
)

BASE = httpx.URL("https://api.openai.com/v1")


def mock_upstream(
    handler: Callable[[httpx.Request], httpx.Response], *, max_connections: int = 1, key: str = "sk-test-secret-key"
) -> Upstream:
    """An `Upstream` on `BASE` whose every pool answers with ``handler``."""
    return Upstream(
        OpenAISettings(api_key=key, base_url=str(BASE)),
        max_connections=max_connections,
        transport=lambda: httpx.MockTransport(handler),
    )


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("/v1/chat/completions", "https://api.openai.com/v1/chat/completions"),
        ("/chat/completions", "https://api.openai.com/v1/chat/completions"),
        ("chat/completions", "https://api.openai.com/v1/chat/completions"),
        ("v1/embeddings", "https://api.openai.com/v1/embeddings"),
        ("/v1/models/ft:gpt-4o-mini:org:custom", "https://api.openai.com/v1/models/ft:gpt-4o-mini:org:custom"),
        # A model id may hold escapes (the SDK's models.retrieve encodes a repository-style id's slash): one
        # segment, passed on as it is.
        ("/v1/models/meta-llama%2FLlama-3.1-8B", "https://api.openai.com/v1/models/meta-llama%2FLlama-3.1-8B"),
        ("/v1/models/mod%C3%A8le%20x", "https://api.openai.com/v1/models/mod%C3%A8le%20x"),
        # Dots are fine in a segment that holds something else (only dot-only segments climb).
        ("/v1/models/Qwen%2FQwen2.5-7B..v2", "https://api.openai.com/v1/models/Qwen%2FQwen2.5-7B..v2"),
    ],
)
def test_relative_paths_join_like_the_sdk(endpoint: str, expected: str) -> None:
    assert str(join_url(BASE, relative_api_path(endpoint, BASE))) == expected


def test_base_without_version_keeps_the_endpoint_whole() -> None:
    base = httpx.URL("http://127.0.0.1:8080")
    assert str(join_url(base, relative_api_path("/v1/chat/completions", base))) == (
        "http://127.0.0.1:8080/v1/chat/completions"
    )


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://evil.example/v1/chat/completions",
        "http://127.0.0.1:9/steal",
        "//evil.example/v1/chat/completions",
        "/v1/../../evil",
        "/v1/./chat/completions",
        "/v1/chat/completions?api-version=1",
        "/v1/chat/completions#frag",
        "/v1/%2e%2e/x",
        "/v1/chat%2Fcompletions",
        "/v1/models/%2E%2E",
        "/v1/models/..%2Ffiles",
        "/v1/models/x%2F..%2F..%2Ffiles",
        "/v1/models/%2Fetc",
        "/v1/models/a%5C..%5Cfiles",
        "/v1/models/a%00b",
        "/v1/models/a%252F..%252Ffiles",  # climbs at a server that decodes twice
        "/v1/models/%FF",
        # Segments some servers still read as '..' once a proxy has decoded %2F: Tomcat drops ';' parameters,
        # Windows trailing dots and spaces, an NFKC-normalising server maps fullwidth dots.
        "/v1/models/x%2F..%3B%2Ffiles",
        "/v1/models/..%3Bjsessionid=1%2Ffiles",
        "/v1/models/x%2F...%2Ffiles",
        "/v1/models/x%2F..%20%2Ffiles",
        "/v1/models/%EF%BC%8E%EF%BC%8E%2Ffiles",
        "/v1/models/...",
        "\\\\evil\\share",
        "/v1/chat completions",
        "",
        "   ",
        "/v1//chat",
        "@evil.example/x",
        "/v1",
        "v1/",
    ],
)
def test_anything_but_a_plain_relative_path_is_refused(endpoint: str) -> None:
    with pytest.raises(InvalidEndpoint) as excinfo:
        join_url(BASE, relative_api_path(endpoint, BASE))
    assert "relative API path" in str(excinfo.value) or "base URL" in str(excinfo.value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "/v1/files/file-abc123/content",
        "files",
        "/v1/organization/admin_api_keys",
        "/v1/fine_tuning/jobs",
        "batches",
        "/v1/realtime/sessions",
        "/v1/vector_stores",
        # Found by a reviewer after the list of refused endpoints was thought complete:
        "/v1/chatkit/sessions",  # mints client secrets usable without the engine
        "/v1/responses/resp_123/cancel",  # another client's background response
        "/v1/chat/completions/chatcmpl-123",  # POST changes another client's stored completion
        "/v1/videos",  # billed per second, outside any token budget
        "/v1/filesystem",
        "/v1/models/gpt-4o/extra",
    ],
)
def test_only_the_inference_endpoints_are_passed_on(endpoint: str) -> None:
    """With the engine's key the others read the organisation's files, start jobs no budget counts, mint
    credentials, or change other clients' stored data."""
    with pytest.raises(InvalidEndpoint, match="is not passed on: the engine serves /v1/audio/speech"):
        relative_api_path(endpoint, BASE)


@pytest.mark.parametrize(
    "endpoint",
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/models",
        "/v1/models/gpt-4o",
    ],
)
def test_the_inference_endpoints_pass(endpoint: str) -> None:
    assert relative_api_path(endpoint, BASE) == endpoint.removeprefix("/v1/")


async def test_upstream_sends_the_key_only_to_the_base_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True}, headers={"x-request-id": "req_1", "set-cookie": "a=b"})

    upstream = mock_upstream(handler, max_connections=4)
    async with upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert reply.status == 200
    assert reply.body.decoded() == {"ok": True}
    assert reply.headers == {"x-request-id": "req_1"}  # cookies and noise stay in the engine
    assert seen[0].url.host == "api.openai.com"
    assert seen[0].headers["authorization"] == "Bearer sk-test-secret-key"
    assert "sk-test-secret-key" not in repr(upstream.__dict__.get("base_url"))


async def test_a_key_echoed_by_the_upstream_is_redacted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            401,
            json={"error": {"message": "Incorrect API key provided: sk-test-secret-key"}},
            headers={"x-request-id": "req_sk-test-secret-key"},
        )

    upstream = mock_upstream(handler, max_connections=4)
    async with upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert reply.body.decoded() == {"error": {"message": "Incorrect API key provided: [REDACTED]"}}
    assert reply.headers["x-request-id"] == "req_[REDACTED]"


@pytest.mark.parametrize("content_type", ["audio/mpeg; x=sk-test-secret-key", "text/html; charset=sk-test-secret-key"])
async def test_a_key_echoed_in_the_content_type_is_redacted(content_type: str) -> None:
    """Found by review: a non-JSON reply's content type goes to clients (the HTTP front's head, the Result's
    headers) without passing through `useful_headers`, which redacts every other header."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"ID3", headers={"content-type": content_type})

    async with mock_upstream(handler) as upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/audio/speech"), b"{}")
    assert "sk-test-secret-key" not in reply.headers["content-type"]
    assert reply.body.content_type is not None and "sk-test-secret-key" not in reply.body.content_type
    assert reply.headers["content-type"].endswith("[REDACTED]")


@pytest.mark.parametrize(
    ("status", "content", "content_type"),
    [
        (401, b'{"error": {"message": "Incorrect API key provided: \\u0073k-test-secret-key"}}', "application/json"),
        (400, b'{"error": {"message": "bad key sk-test-secre\\u0074-key"}}', "application/json"),
        (502, "upstream said key=sk-test-secret-key".encode("utf-16"), "text/html; charset=utf-16"),
        (200, b'{"choices": [{"text": "\\u0073k-test-secret-key"}]}', "application/json"),
    ],
    ids=["json-escaped-401", "json-escaped-400", "utf-16", "json-escaped-200"],
)
async def test_a_key_echoed_in_another_encoding_is_redacted(status: int, content: bytes, content_type: str) -> None:
    """Found by a hostile review: an echo that is not the key's exact bytes reached clients once decoded."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers={"content-type": content_type})

    async with mock_upstream(handler) as upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert reply.status == status
    text = str(reply.body.decoded())
    assert "sk-test-secret-key" not in text and "[REDACTED]" in text


async def test_a_key_echoed_json_escaped_in_a_stream_is_redacted() -> None:
    events = [
        b'data: {"choices": [{"delta": {"content": "caf\\u00e9"}}]}',
        b'data: {"choices": [{"delta": {"content": "\\u0073k-test-secret-key"}}]}',
        b"data: [DONE]",
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        body = b"".join(event + b"\n\n" for event in events)
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with (
        mock_upstream(handler) as upstream,
        upstream.open_stream("POST", upstream.url_for("/v1/chat/completions"), b"{}") as reply,
    ):
        assert isinstance(reply, UpstreamStream)
        received = [json.loads(event.data) if event.data != "[DONE]" else None async for event in reply.events]
    assert received == [
        {"choices": [{"delta": {"content": "caf\u00e9"}}]},
        {"choices": [{"delta": {"content": "[REDACTED]"}}]},
        None,
    ]


async def test_keep_alive_comments_do_not_hold_a_stream_past_the_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Found by a hostile review: a comment every few seconds reset the read timeout, so an upstream that sent
    nothing else held the stream, and its concurrency slot, for ever."""

    async def body() -> AsyncIterator[bytes]:
        yield b'data: {"choices": []}\n\n'
        while True:
            await trio.sleep(10)
            yield b": ping\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    upstream = Upstream(
        OpenAISettings(api_key="sk-test-secret-key", base_url=str(BASE), read_timeout=60),
        max_connections=1,
        transport=lambda: httpx.MockTransport(handler),
    )
    async with upstream, upstream.open_stream("POST", upstream.url_for("/v1/chat/completions"), b"{}") as reply:
        assert isinstance(reply, UpstreamStream)
        started = trio.current_time()
        with trio.fail_after(1000), pytest.raises(httpx.ReadTimeout, match="no event for 60s"):
            async for _event in reply.events:
                await trio.sleep(100)  # a slow client on the first event: its pace, not the upstream's
        # The first event came at once; then the client's 100s, and the comments' 60s after them.
        assert 160 < trio.current_time() - started <= 180


@pytest.mark.parametrize("key", ["x", "EMPTY", "anything", "sk-local-12345"])
async def test_a_placeholder_key_never_corrupts_an_answer(key: str) -> None:
    """Keys like vLLM's "EMPTY" occur in ordinary text; rewriting them broke replies (base64, JSON, words)."""
    answer = {"choices": [{"index": 0, "text": "say EMPTY or anything, x"}], "data": "AAAxAAEMPTYsk-local-12345"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/moderations"):
            return httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {key}"}})
        return httpx.Response(200, json=answer)

    async with mock_upstream(handler, key=key) as upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
        refused = await upstream.send("POST", upstream.url_for("/v1/moderations"), b"{}")
    assert reply.body.decoded() == answer
    message = refused.body.decoded()["error"]["message"]
    # An echo in an error is still redacted, but for keys too short to be anything but a placeholder.
    assert message == (
        "Incorrect API key provided: [REDACTED]" if len(key) >= 8 else f"Incorrect API key provided: {key}"
    )


def test_endpoints_beyond_the_length_limit_are_refused() -> None:
    with pytest.raises(InvalidEndpoint, match="characters long"):
        relative_api_path("/v1/" + "a" * 100_000, BASE)


async def test_requests_go_to_the_least_busy_pool() -> None:
    # Two pools; one holds a slow request. Every request after it must go to the other pool, where a
    # round-robin choice would queue every second one behind the slow pool's connections.
    release = trio.Event()
    served_by: list[int] = []
    transports: list[httpx.MockTransport] = []

    def make_transport() -> httpx.MockTransport:
        number = len(transports)

        async def handler(request: httpx.Request) -> httpx.Response:
            served_by.append(number)
            if request.url.path.endswith("/completions"):
                await release.wait()
            return httpx.Response(200, json={})

        transports.append(httpx.MockTransport(handler))
        return transports[-1]

    upstream = Upstream(
        OpenAISettings(api_key="sk-test-secret-key", base_url=str(BASE)),
        max_connections=16,
        concurrency=16,
        transport=make_transport,
    )
    assert len(transports) == 2
    async with upstream, trio.open_nursery() as nursery:
        nursery.start_soon(upstream.send, "POST", upstream.url_for("/v1/completions"), b"{}")
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(6):
            await upstream.send("POST", upstream.url_for("/v1/embeddings"), b"{}")
        release.set()
    slow_pool = served_by[0]
    assert served_by[1:] == [1 - slow_pool] * 6


async def test_cookies_the_upstream_sets_are_not_sent_back() -> None:
    """The engine speaks for many clients: a cookie set in one reply must not ride along with later requests."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={}, headers={"set-cookie": "__cf_bm=one-clients-cookie; Path=/"})

    upstream = mock_upstream(handler)
    async with upstream:
        for _ in range(2):
            await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert len(seen) == 2
    assert "cookie" not in seen[1].headers


def test_resolving_an_endpoint_is_remembered_but_refusals_are_not() -> None:
    upstream = Upstream(OpenAISettings(api_key="sk-test", base_url=str(BASE)), max_connections=1)
    path, url = upstream.resolve("/v1/chat/completions")
    assert (path, str(url)) == ("chat/completions", "https://api.openai.com/v1/chat/completions")
    assert upstream.resolve("/v1/chat/completions")[1] is url
    for _ in range(2):
        with pytest.raises(InvalidEndpoint):
            upstream.resolve("https://evil.example/v1/chat/completions")
    for index in range(1000):  # client-chosen endpoints cannot grow the memo without bound
        upstream.resolve(f"/v1/models/x{index}")
    assert upstream.resolve("/v1/chat/completions")[0] == "chat/completions"


async def test_a_large_body_goes_upstream_in_pieces_with_its_length() -> None:
    """One write of megabytes would hold the event loop while the kernel copies it; pieces let others run."""
    received: list[tuple[list[int], bytes, httpx.Headers]] = []

    class Recording(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            pieces = [piece async for piece in request.stream]  # type: ignore[union-attr]
            received.append(([len(piece) for piece in pieces], b"".join(pieces), request.headers))
            return httpx.Response(200, json={})

    upstream = Upstream(OpenAISettings(api_key="sk-test", base_url=str(BASE)), max_connections=1, transport=Recording)
    body = b'{"input": "' + b"x" * (1 << 20) + b'"}'
    async with upstream:
        await upstream.send("POST", upstream.url_for("/v1/embeddings"), body)
        await upstream.send("POST", upstream.url_for("/v1/embeddings"), b"{}")
    (sizes, content, headers), (small_sizes, small, _) = received
    assert content == body and headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in headers
    assert len(sizes) > 1 and max(sizes) <= 64 * 1024
    assert small == b"{}" and small_sizes == [2]


async def test_a_redirect_is_an_answer_never_followed() -> None:
    """Following it would send the key to whatever host the Location names."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(307, headers={"location": "https://evil.example/v1/chat/completions"})

    upstream = mock_upstream(handler)
    async with upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert reply.status == 307
    assert [request.url.host for request in seen] == ["api.openai.com"]


async def test_a_failure_to_connect_carries_its_request_for_the_retry_policy() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    upstream = mock_upstream(handler)
    async with upstream:
        with pytest.raises(httpx.ConnectError) as excinfo:
            await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert excinfo.value.request.url.host == "api.openai.com"
    assert upstream.last_contact is not None and not upstream.last_contact.reachable


@pytest.mark.parametrize(
    ("content_type", "content", "expected"),
    [
        ("application/json; charset=utf-8", '{"text": "café"}'.encode(), {"text": "café"}),
        ("text/html; charset=iso-8859-1", "<p>Réessayez</p>".encode("latin-1"), "<p>Réessayez</p>"),
        ("text/plain", "bad gateway: é".encode(), "bad gateway: é"),
    ],
)
async def test_a_reply_body_is_read_as_json_or_as_text_in_its_charset(
    content_type: str, content: bytes, expected: object
) -> None:
    """A proxy's error page in its own charset reaches the client legible; JSON is UTF-8 whatever it says."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, headers={"content-type": content_type}, content=content)

    upstream = mock_upstream(handler)
    async with upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert reply.body.decoded() == expected


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (b'{"data": [1, 2], "usage": {"prompt_tokens": 5, "total_tokens": 5}}', (5, None)),
        (b'{"output": [], "usage": {"input_tokens": 7, "output_tokens": 3}, "user": null, "metadata": {}}', (7, 3)),
        # A nested "usage" after the top-level one: the tail is not the top level's, the whole body is read.
        (b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2}, "data": [{"usage": {"prompt_tokens": 9}}]}', (5, 2)),
        (b'{"choices": [{"message": {"usage": {"prompt_tokens": 99}}}]}', None),
        (b'{"usage" : {"prompt_tokens": 4}}', (4, None)),
        (b'{"a\\"usage": {"prompt_tokens": 9}}', None),  # a key ending in an escaped quote and usage
        (b'{"choices": [{"text": "say \\"usage\\": {}"}], "usage": {"prompt_tokens": 3}}', (3, None)),
        (b"not json", None),
    ],
)
def test_usage_is_read_from_the_top_level_object_only(body: bytes, usage: tuple[int, int | None] | None) -> None:
    """Read from the end when it is there (a 124 MB embeddings reply held the loop 0.18 s to find it)."""
    found = ReplyBody(body).usage()
    assert (None if found is None else (found.prompt, found.completion)) == usage
