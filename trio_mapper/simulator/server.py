"""Serving the simulator app over HTTP/1.1 with hypercorn's Trio worker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from .app import SimulatorApp
from .config import SimulatorConfig
from .tokens import TokenCounter

# Hypercorn's "Running on …" banner and its errors go here rather than to a private stderr handler, so the
# host application's logging setup decides what is shown; app crashes still surface as ERROR records.
logger = logging.getLogger("trio_mapper.simulator.http")

# Longer than any client pool's idle expiry (httpx: 5 s), so the client, not the server, closes idle
# connections: otherwise a request sent as the server hangs up fails with a fault nobody configured.
KEEP_ALIVE_TIMEOUT = 75.0
# Benchmarks open hundreds of connections at once; hypercorn's default backlog of 100 would drop SYNs.
LISTEN_BACKLOG = 2048


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [_bind(host, port)]
    # No access log: one line per request would cost more than answering it.
    config.accesslog = None
    config.errorlog = logger
    config.backlog = LISTEN_BACKLOG
    config.include_server_header = False
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    return config


async def serve_app(app: SimulatorApp, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve an already built app until cancelled; ``started`` gets the base URL with the bound port."""
    config = hypercorn_config(app.config.host, app.config.port)
    async with trio.open_nursery() as nursery:
        # Hypercorn reports the addresses it actually bound (port 0 resolved) through task_status.
        # The app speaks plain-dict ASGI messages, not hypercorn's TypedDicts: same wire, looser types.
        framework = cast("ASGIFramework", app)
        binds: list[str] = await nursery.start(partial(serve, framework, config, mode="asgi"))
        task_status.started(binds[0] + "/v1")


async def serve_simulator(
    config: SimulatorConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the simulator until cancelled.

    Calls ``task_status.started(base_url)`` once listening, e.g. ``"http://127.0.0.1:43121/v1"``.
    """
    # Loading the encoding takes a few hundred ms: keep it off the event loop and off the request path.
    counter = await trio.to_thread.run_sync(TokenCounter)
    await serve_app(SimulatorApp(config, counter), task_status=task_status)


@asynccontextmanager
async def open_simulator(config: SimulatorConfig | None = None) -> AsyncIterator[str]:
    """Run a simulator for the duration of the block and yield its base URL (for tests and demos)."""
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(serve_simulator, config or SimulatorConfig())
        try:
            yield url
        finally:
            nursery.cancel_scope.cancel()
