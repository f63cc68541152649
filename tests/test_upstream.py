"""Endpoint validation and joining: the key must never travel anywhere but the configured base URL."""

import httpx
import pytest

from trio_mapper.settings import OpenAISettings
from trio_mapper.upstream import InvalidEndpoint, Upstream, join_url, relative_api_path

BASE = httpx.URL("https://api.openai.com/v1")


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("/v1/chat/completions", "https://api.openai.com/v1/chat/completions"),
        ("/chat/completions", "https://api.openai.com/v1/chat/completions"),
        ("chat/completions", "https://api.openai.com/v1/chat/completions"),
        ("v1/embeddings", "https://api.openai.com/v1/embeddings"),
        ("/v1/models/ft:gpt-4o-mini:org:custom", "https://api.openai.com/v1/models/ft:gpt-4o-mini:org:custom"),
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
        "\\\\evil\\share",
        "/v1/chat completions",
        "",
        "   ",
        "/v1//chat",
        "@evil.example/x",
    ],
)
def test_anything_but_a_plain_relative_path_is_refused(endpoint: str) -> None:
    with pytest.raises(InvalidEndpoint) as excinfo:
        join_url(BASE, relative_api_path(endpoint, BASE))
    assert "relative API path" in str(excinfo.value) or "base URL" in str(excinfo.value)


async def test_upstream_sends_the_key_only_to_the_base_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True}, headers={"x-request-id": "req_1", "set-cookie": "a=b"})

    upstream = Upstream(OpenAISettings(api_key="sk-test-secret-key", base_url=str(BASE)), max_connections=4)
    for client in upstream._clients:
        client._transport = httpx.MockTransport(handler)  # unit test of this module only
    async with upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert reply.status == 200
    assert reply.body == {"ok": True}
    assert reply.headers == {"x-request-id": "req_1"}  # cookies and noise stay in the engine
    assert seen[0].url.host == "api.openai.com"
    assert seen[0].headers["authorization"] == "Bearer sk-test-secret-key"
    assert "sk-test-secret-key" not in repr(upstream.__dict__.get("base_url"))


async def test_a_key_echoed_by_the_upstream_is_redacted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "Incorrect API key provided: sk-test-secret-key"}})

    upstream = Upstream(OpenAISettings(api_key="sk-test-secret-key", base_url=str(BASE)), max_connections=4)
    for client in upstream._clients:
        client._transport = httpx.MockTransport(handler)
    async with upstream:
        reply = await upstream.send("POST", upstream.url_for("/v1/chat/completions"), b"{}")
    assert reply.body == {"error": {"message": "Incorrect API key provided: [REDACTED]"}}
