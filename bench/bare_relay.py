"""The ceiling of an HTTP front built on the engine's HTTP libraries: hypercorn's Trio worker in, httpx out,
nothing else.

An ASGI app that forwards each request's bytes to the upstream and relays the reply's bytes back as they
arrive (streams included), with the same pool layout as the engine's upstream client and no parsing, budget,
queue or retry. Whatever the engine's HTTP front costs beyond this relay is the engine's own work; this
relay's cost is what one HTTP server pass plus one HTTP client pass cost with these libraries in one event
loop. `bench/http_front.py` runs it as a contender beside the front:

    python bench/bare_relay.py --socket /tmp/relay.sock --upstream http://127.0.0.1:8000/v1 --connections 64
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trio_mapper.engine.upstream.client import CONNECTIONS_PER_POOL

#: Reply headers worth relaying; hop-by-hop ones are hypercorn's business.
RELAYED = (b"content-type", b"content-length", b"x-request-id", b"openai-processing-ms")


class BareRelay:
    def __init__(self, upstream: str, api_key: str, connections: int) -> None:
        pools = max(1, math.ceil(connections / CONNECTIONS_PER_POOL))
        per_pool = max(1, math.ceil(connections / pools))
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        headers = {"Authorization": f"Bearer {api_key}"}
        self._clients = [
            httpx.AsyncClient(base_url=upstream, headers=headers, limits=limits, timeout=60, trust_env=False)
            for _ in range(pools)
        ]
        self._busy = [0] * pools

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        pool = min(range(len(self._clients)), key=self._busy.__getitem__)
        self._busy[pool] += 1
        try:
            client = self._clients[pool]
            path = scope["path"].removeprefix("/v1")
            request = client.build_request(
                scope["method"], path, content=b"".join(chunks), headers={"Content-Type": "application/json"}
            )
            response = await client.send(request, stream=True)
            try:
                headers = [(name, value) for name, value in response.headers.raw if name.lower() in RELAYED]
                await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
                async for data in response.aiter_raw():
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()
        finally:
            self._busy[pool] -= 1


async def main(args: argparse.Namespace) -> None:
    config = Config()
    config.bind = [f"unix:{args.socket}"]
    config.accesslog = None
    config.errorlog = None  # its "Running on ..." line would land in the middle of the bench's table
    config.include_server_header = False
    config.keep_alive_timeout = 75.0
    relay = BareRelay(args.upstream, os.environ.get("OPENAI_API_KEY", "unused"), args.connections)
    await serve(relay, config)  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--connections", type=int, default=64)
    trio.run(main, parser.parse_args())
