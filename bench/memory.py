"""Engine memory with many queued requests: RSS idle vs with N requests waiting for budget.

The engine is given a budget of one request per minute, so everything after the first request waits in
its queue; RSS is read from /proc before and after submitting, in the same run.

    python bench/memory.py                 # 100,000 queued requests
    python bench/memory.py --requests 20000
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import msgspec
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_body, engine_process, simulator_process

from trio_mapper import AsyncClient


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def main(args: argparse.Namespace) -> None:
    async with (
        simulator_process("--latency-ms", "0") as url,
        engine_process(
            url,
            "--rpm",
            "1",
            "--tpm",
            "100000000",
            "--max_concurrent_reqs",
            "64",
            "--max-queued",
            str(args.requests + 10),
        ) as socket,  # fmt: skip
        AsyncClient(socket) as client,
    ):
        pid = (await client.stats())["engine"]["pid"]
        idle = rss_mib(pid)
        # Raw frames on one connection: the point is the engine's memory, not the client's.
        stream = await trio.open_unix_socket(str(socket))
        prefix = struct.Struct(">I")

        def frame(message: dict[str, object]) -> bytes:
            body = msgspec.msgpack.encode(message)
            return prefix.pack(len(body)) + body

        await stream.send_all(frame({"type": "hello", "protocol": 1}))
        batch = []
        for i in range(args.requests):
            batch.append(frame({"type": "submit", "id": i, "endpoint": "/v1/chat/completions",
                                "body": chat_body(i, words=40, max_tokens=64)}))  # fmt: skip
            if len(batch) == 1000:
                await stream.send_all(b"".join(batch))
                batch.clear()
        await stream.send_all(b"".join(batch))
        with trio.fail_after(300):
            # Polling another process: there is no event to wait on.
            while (stats := await client.stats())["engine"]["accepted"] < args.requests:  # noqa: ASYNC110
                await trio.sleep(0.2)
        loaded = rss_mib(pid)
        await stream.aclose()
    body_bytes = len(msgspec.json.encode(chat_body(1, words=40, max_tokens=64)))
    print(f"engine RSS idle:                     {idle:8.1f} MiB")
    print(f"engine RSS, {args.requests:,} queued:       {loaded:8.1f} MiB")
    print(f"per queued request:                  {1024 * 1024 * (loaded - idle) / args.requests:8.0f} bytes "
          f"(request body {body_bytes} bytes of JSON)")  # fmt: skip
    print(f"outstanding reported by the engine:  {stats['engine']['outstanding']:8,}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    trio.run(main, parser.parse_args())
