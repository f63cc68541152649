"""How httpx's connection pool scales: one big pool vs several small ones, against the simulator.

This is the measurement behind `trio_mapper.upstream.CONNECTIONS_PER_POOL`. All configurations run in
one process, one after the other, against the same simulator, so their ratios compare.

    python bench/httpx_pools.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_KEY, simulator_process

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi there"}],"max_tokens":16}'
CONFIGURATIONS = [(1, 1, 1), (8, 1, 8), (32, 1, 32), (64, 1, 64), (64, 1, 1024), (64, 4, 16), (64, 8, 8),
                  (256, 1, 256), (256, 16, 16)]  # fmt: skip


async def requests_per_second(url: str, count: int, concurrency: int, pools: int, per_pool: int) -> float:
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    clients = [httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) for _ in range(pools)]
    indices = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in indices:
            (await client.post("/chat/completions", content=BODY)).raise_for_status()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(worker, clients[n % pools])
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.aclose()
    return count / elapsed


async def main() -> None:
    flags = ["--rpm", "100000000", "--tpm", "10000000000", "--latency-ms", "0", "--per-token-latency-ms", "0"]
    async with simulator_process(*flags) as url:
        await requests_per_second(url, 200, 8, 1, 8)  # warm-up
        print(f"{'concurrency':>11} {'pools x connections':>20} {'req/s':>7}")
        for concurrency, pools, per_pool in CONFIGURATIONS:
            rate = await requests_per_second(url, 2000, concurrency, pools, per_pool)
            print(f"{concurrency:>11} {f'{pools} x {per_pool}':>20} {rate:>7.0f}", flush=True)


if __name__ == "__main__":
    trio.run(main)
