"""Helpers for simulator tests; imported explicitly (``from simulator_fixtures import …``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import httpx
import trio

from trio_mapper.simulator import SimulatorApp, SimulatorConfig, open_simulator
from trio_mapper.simulator.tokens import TokenCounter

if TYPE_CHECKING:
    import openai

API_KEY = "sk-test-0123456789"
MODEL = "gpt-4o-mini"

T = TypeVar("T")

# Built once: loading the encoding is the slow part of building an app.
_counter: TokenCounter | None = None


def counter() -> TokenCounter:
    global _counter
    if _counter is None:
        _counter = TokenCounter()
    return _counter


def fast_config(**overrides: Any) -> SimulatorConfig:
    """A config with no latency and a fixed seed, so tests spend no time waiting."""
    base = SimulatorConfig(latency_ms=0.0, per_token_latency_ms=0.0, seed=1234)
    return attrs.evolve(base, **overrides)


@asynccontextmanager
async def simulator_client(config: SimulatorConfig | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A real simulator on 127.0.0.1:0 and an httpx client pointed at its /v1 with a valid key."""
    async with (
        open_simulator(config or fast_config()) as url,
        httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {API_KEY}"}) as client,
    ):
        yield client


def root(client: httpx.AsyncClient) -> str:
    return str(client.base_url).rstrip("/").removesuffix("/v1")


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get(root(client) + "/_simulator/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def chat_body(content: str = "Say hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def parse_sse(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body; ``[DONE]`` stays a string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


class AsgiCall:
    """Drives a SimulatorApp directly, without sockets, so it can run under autojump_clock."""

    def __init__(self, app: SimulatorApp) -> None:
        self.app = app

    async def request(
        self, method: str, path: str, body: Any = None, *, key: str | None = API_KEY
    ) -> tuple[int, dict[str, str], bytes]:
        raw = b"" if body is None else json.dumps(body).encode()
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                await trio.sleep_forever()
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = sent[0]
        assert start["type"] == "http.response.start"
        response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
        payload = b"".join(m.get("body", b"") for m in sent[1:])
        return start["status"], response_headers, payload


def make_app(config: SimulatorConfig | None = None) -> AsgiCall:
    return AsgiCall(SimulatorApp(config or fast_config(), counter()))


def parse_typed_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``(event, data)`` pairs of a Responses-API SSE body, in order; every block must name its event."""
    events: list[tuple[str, dict[str, Any]]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


async def with_sdk(config: SimulatorConfig, work: Callable[[openai.OpenAI], T]) -> T:
    """Runs ``work`` in a thread with the official SDK's sync client pointed at a simulator, no retries."""
    import openai  # only the SDK tests need it

    async with open_simulator(config) as url:
        client = openai.OpenAI(api_key=API_KEY, base_url=url, max_retries=0, timeout=10.0)
        try:
            return await trio.to_thread.run_sync(work, client)
        finally:
            await trio.to_thread.run_sync(client.close)
