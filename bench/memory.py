"""Engine memory and clean-up cost, each measured side by side in one run.

1. Queued requests: RSS idle vs with N requests waiting for budget (one request per minute upstream).
2. Submit/cancel churn ("time out, cancel, resubmit") with --max-queued 100: RSS before and after.
3. Disconnects: connections that each submit one request and go away, timed on an empty engine and on one
   holding 200,000 queued requests of another client: a disconnect must cost its own jobs, not everyone's.

    python bench/memory.py                       # about two minutes
    python bench/memory.py --requests 20000 --churn 50000 --disconnects 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_body, engine_process, frame, rss_mib, simulator_process

from trio_mapper import AsyncClient


def submit(request_id: int, **extra: Any) -> bytes:
    return frame({"type": "submit", "id": request_id, "endpoint": "/v1/chat/completions",
                  "body": chat_body(request_id, words=40, max_tokens=64), **extra})  # fmt: skip


async def raw_connection(socket: Path) -> trio.SocketStream:
    """A connection speaking raw frames: the point is the engine's cost, not a client helper's."""
    stream = await trio.open_unix_socket(str(socket))
    await stream.send_all(frame({"type": "hello", "protocol": 1}))
    return stream


async def drain(stream: trio.SocketStream) -> None:
    """Read and drop everything the engine sends (its replies must not pile up unread)."""
    while await stream.receive_some(1 << 20):
        pass


async def wait_for(client: AsyncClient, key: str, value: int) -> dict[str, Any]:
    with trio.fail_after(600):
        # Polling another process: there is no event to wait on.
        while (stats := await client.stats())["engine"][key] < value:  # noqa: ASYNC110
            await trio.sleep(0.2)
    return stats


async def fill(socket: Path, count: int) -> trio.SocketStream:
    stream = await raw_connection(socket)
    batch = []
    for i in range(count):
        batch.append(submit(i))
        if len(batch) == 1000:
            await stream.send_all(b"".join(batch))
            batch.clear()
    await stream.send_all(b"".join(batch))
    return stream


def room_for(count: int) -> str:
    """A --max-queued under which one client may queue ``count`` requests: a client may hold only half."""
    return str(2 * count + 10)


async def queued(url: str, count: int) -> list[str]:
    flags = ["--rpm", "1", "--tpm", "100000000", "--max_concurrent_reqs", "64", "--max-queued", room_for(count)]
    async with engine_process(url, *flags) as socket, AsyncClient(socket) as client:
        pid = (await client.stats())["engine"]["pid"]
        idle = rss_mib(pid)
        stream = await fill(socket, count)
        stats = await wait_for(client, "accepted", count)
        loaded = rss_mib(pid)
        await stream.aclose()
    body_bytes = len(msgspec.json.encode(chat_body(1, words=40, max_tokens=64)))
    return [
        f"engine RSS idle:                     {idle:8.1f} MiB",
        f"engine RSS, {count:,} queued:       {loaded:8.1f} MiB",
        f"per queued request:                  {1024 * 1024 * (loaded - idle) / count:8.0f} bytes "
        f"(request body {body_bytes} bytes of JSON)",
        f"outstanding reported by the engine:  {stats['engine']['outstanding']:8,}",
    ]


async def churn(url: str, pairs: int) -> list[str]:
    flags = ["--rpm", "1", "--tpm", "100000000", "--max_concurrent_reqs", "64", "--max-queued", "100"]
    async with engine_process(url, *flags) as socket, AsyncClient(socket) as client:
        pid = (await client.stats())["engine"]["pid"]
        await client.request("/v1/chat/completions", chat_body(0, words=5, max_tokens=5))  # spend the minute
        before = rss_mib(pid)
        stream = await raw_connection(socket)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, stream)
            batch = []
            for i in range(1, pairs + 1):
                batch += [submit(i, deadline=3000.0), frame({"type": "cancel", "id": i})]
                if len(batch) >= 2000:
                    await stream.send_all(b"".join(batch))
                    batch.clear()
            await stream.send_all(b"".join(batch))
            stats = await wait_for(client, "accepted", pairs + 1)
            after = rss_mib(pid)
            nursery.cancel_scope.cancel()
        await stream.aclose()
    return [
        f"{pairs:,} submit/cancel pairs, --max-queued 100:",
        f"  engine RSS before / after:         {before:8.1f} / {after:.1f} MiB",
        f"  outstanding after:                 {stats['engine']['outstanding']:8,}",
    ]


async def disconnects(url: str, count: int, background: int) -> list[str]:
    flags = ["--rpm", "1", "--tpm", "100000000", "--max_concurrent_reqs", "64", "--max-queued",
             room_for(background + count)]  # fmt: skip
    rows = []
    async with engine_process(url, *flags) as socket, AsyncClient(socket) as client:
        await client.request("/v1/chat/completions", chat_body(0, words=5, max_tokens=5))  # spend the minute
        held: trio.SocketStream | None = None
        for holding in (0, background):
            if holding:
                held = await fill(socket, holding)
                await wait_for(client, "outstanding", holding)
            started = time.perf_counter()
            for i in range(count):
                stream = await raw_connection(socket)
                await stream.send_all(submit(i))
                await stream.aclose()
            # Each disconnect is handled once the engine has read the close; wait until all were.
            with trio.fail_after(600):
                while (await client.stats())["engine"]["connections"] > 1 + (held is not None):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            rows.append((holding, (time.perf_counter() - started) / count))
        if held is not None:
            await held.aclose()
    (_, empty), (_, loaded) = rows
    return [
        f"{count:,} connections that submit one request and disconnect:",
        f"  per connection, engine otherwise empty:          {1000 * empty:7.3f} ms",
        f"  per connection, {background:,} others' jobs queued:  {1000 * loaded:7.3f} ms",
        f"  ratio:                                           {loaded / empty:7.2f}",
    ]


async def main(args: argparse.Namespace) -> None:
    async with simulator_process("--latency-ms", "0") as url:
        lines = await queued(url, args.requests)
        lines += [""] + await churn(url, args.churn)
        lines += [""] + await disconnects(url, args.disconnects, args.background)
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--churn", type=int, default=200_000)
    parser.add_argument("--disconnects", type=int, default=1000)
    parser.add_argument("--background", type=int, default=200_000)
    trio.run(main, parser.parse_args())
