"""Engines from several source trees side by side: the engine's CPU and latency per request through the HTTP front.

To tell whether a change costs anything, on a machine whose speed varies from minute to minute: one simulator,
one engine per tree (`git worktree add /tmp/before <rev>`), each serving sequential chat requests over its HTTP
Unix socket, in alternating rounds (the order flips every round), so a slow moment of the machine hits them
all. Printed: the engine's CPU per request (from /proc), the median latency, and each CPU figure over the
first tree's. Listing a tree twice shows how far two engines of the same code differ (a few %).

    python bench/engine_ab.py /tmp/before . /tmp/before .          # 12 rounds of 150 requests per engine
    python bench/engine_ab.py --rounds 6 --per-round 100 --sdk /tmp/before .
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_body, child_pid, cpu_seconds, serving_process, simulator_process

LIMITS = ["--rpm", "100000000", "--tpm", "10000000000"]


def caller(http_socket: str, *, sdk: bool) -> Callable[[int], Awaitable[Any]]:
    if sdk:
        import httpx2
        import openai

        client = openai.AsyncOpenAI(
            api_key="unused",
            base_url="http://engine/v1",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=http_socket)),
        )
        return lambda i: client.chat.completions.create(**chat_body(i, words=20, max_tokens=16))
    plain = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=http_socket), base_url="http://engine/v1")

    async def call(i: int) -> None:
        (await plain.post("/chat/completions", json=chat_body(i, words=20, max_tokens=16))).raise_for_status()

    return call


async def main(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="tmb-ab-", dir="/tmp"))
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(
            simulator_process(*LIMITS, "--latency-ms", "0", "--per-token-latency-ms", "0", "--seed", "1")
        )
        engines = []
        for index, tree in enumerate(args.trees):
            socket = directory / f"e{index}.sock"
            # `python -m` puts the working directory first on the path: each engine runs its own tree's code.
            command = [sys.executable, "-m", "trio_mapper", "launch-engine", "--socket", str(socket), "--base-url", url,
                       "--log-level", "WARNING", "--max_concurrent_reqs", "64", *LIMITS]  # fmt: skip
            log = directory / f"e{index}.log"
            output = stack.enter_context(log.open("wb"))
            env_command = ["env", f"--chdir={tree}", *command]
            await stack.enter_async_context(serving_process(env_command, f"{socket}.http", log=log, output=output))
            call = caller(f"{socket}.http", sdk=args.sdk)
            engines.append({"tree": tree, "pid": child_pid(str(socket)), "call": call, "cpu": 0.0, "count": 0})
            engines[-1]["latency"] = []
        for engine in engines:
            for i in range(50):  # warm-up, not counted
                await engine["call"](i)
        for round_ in range(args.rounds):
            for engine in engines if round_ % 2 == 0 else engines[::-1]:
                before = cpu_seconds(engine["pid"])
                for i in range(args.per_round):
                    started = time.perf_counter()
                    await engine["call"](i)
                    engine["latency"].append(time.perf_counter() - started)
                await trio.sleep(0.02)  # what the last request still costs the engine after its reply
                engine["cpu"] += cpu_seconds(engine["pid"]) - before
                engine["count"] += args.per_round
    first = engines[0]["cpu"] / engines[0]["count"]
    client = "SDK" if args.sdk else "httpx"
    print(f"{args.rounds} rounds of {args.per_round} sequential chat requests per engine, {client}")
    print(f"{'tree':>28} {'CPU ms/request':>15} {'p50 ms':>8} {'CPU / first':>12}")
    for engine in engines:
        cpu = engine["cpu"] / engine["count"]
        p50 = statistics.median(engine["latency"]) * 1000
        print(f"{engine['tree']:>28} {cpu * 1000:>15.3f} {p50:>8.3f} {cpu / first:>12.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees (checkouts) to run the engine from")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=150)
    parser.add_argument("--sdk", action="store_true", help="the official SDK as client, rather than plain httpx")
    arguments = parser.parse_args()
    arguments.trees = [os.path.abspath(tree) for tree in arguments.trees]
    trio.run(main, arguments)
