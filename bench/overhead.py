"""What the engine costs: added latency and maximum throughput, through the engine vs a bare httpx client.

Both contenders call the same simulator (no artificial latency, limits far above the load) in the same
run, one after the other, so the ratios compare like with like on a noisy machine.

    python bench/overhead.py                      # defaults: 300 sequential, 4000 at concurrency 64
    python bench/overhead.py --sequential 500 --parallel 8000 --concurrency 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_KEY, chat_body, engine_process, pct, simulator_process

from trio_mapper import AsyncClient

ENDPOINT = "/v1/chat/completions"


async def direct_latencies(url: str, count: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as client:
        for i in range(count):
            started = time.perf_counter()
            response = await client.post("/chat/completions", json=chat_body(i, words=20, max_tokens=16))
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


async def engine_latencies(socket: Path, count: int) -> list[float]:
    latencies = []
    async with AsyncClient(socket) as client:
        for i in range(count):
            started = time.perf_counter()
            await client.request(ENDPOINT, chat_body(i, words=20, max_tokens=16))
            latencies.append(time.perf_counter() - started)
    return latencies


async def direct_throughput(url: str, count: int, concurrency: int, pools: int = 1) -> float:
    """A bare httpx client (``pools`` > 1: the engine's trick of several small pools, for comparison)."""
    per_pool = max(1, concurrency // pools)
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    clients = [httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) for _ in range(pools)]
    next_index = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in next_index:
            response = await client.post("/chat/completions", json=chat_body(i, words=20, max_tokens=16))
            response.raise_for_status()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(worker, clients[n % pools])
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.aclose()
    return count / elapsed


async def engine_throughput(socket: Path, count: int, window: int) -> float:
    bodies = (chat_body(i, words=20, max_tokens=16) for i in range(count))
    failures = 0
    async with AsyncClient(socket) as client:
        started = time.perf_counter()
        async for item in client.map(bodies, endpoint=ENDPOINT, window=window):
            failures += not item.ok
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} requests failed through the engine")
    return count / elapsed


async def main(args: argparse.Namespace) -> None:
    simulator_flags = ["--rpm", "100000000", "--tpm", "10000000000", "--latency-ms", "0",
                       "--per-token-latency-ms", "0", "--seed", "1"]  # fmt: skip
    engine_flags = ["--rpm", "100000000", "--tpm", "10000000000", "--max_concurrent_reqs", str(args.concurrency)]
    async with simulator_process(*simulator_flags) as url, engine_process(url, *engine_flags) as socket:
        # Warm both paths (connections, caches) before measuring.
        await direct_latencies(url, 20)
        await engine_latencies(socket, 20)
        direct = await direct_latencies(url, args.sequential)
        through = await engine_latencies(socket, args.sequential)
        direct_rps = await direct_throughput(url, args.parallel, args.concurrency)
        sharded_rps = await direct_throughput(url, args.parallel, args.concurrency, pools=args.concurrency // 8)
        engine_rps = await engine_throughput(socket, args.parallel, args.concurrency)

    print(f"latency, {args.sequential} sequential requests (ms)")
    print(f"{'':>16} {'p50':>8} {'p99':>8}")
    for name, values in (("direct httpx", direct), ("through engine", through)):
        print(f"{name:>16} {1000 * pct(values, 50):>8.2f} {1000 * pct(values, 99):>8.2f}")
    print(
        f"{'added':>16} {1000 * (pct(through, 50) - pct(direct, 50)):>8.2f} "
        f"{1000 * (pct(through, 99) - pct(direct, 99)):>8.2f}"
    )
    print()
    print(f"throughput, {args.parallel} requests at concurrency {args.concurrency} (requests/s)")
    print(f"{'direct httpx':>24} {direct_rps:>8.0f}   (one httpx.AsyncClient, pool of {args.concurrency})")
    print(f"{'direct httpx, 8/pool':>24} {sharded_rps:>8.0f}   ({args.concurrency // 8} clients of 8 connections)")
    print(f"{'through engine':>24} {engine_rps:>8.0f}")
    print(f"{'engine / direct':>24} {engine_rps / direct_rps:>8.2f}")
    print(f"{'engine / direct, 8/pool':>24} {engine_rps / sharded_rps:>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    trio.run(main, parser.parse_args())
