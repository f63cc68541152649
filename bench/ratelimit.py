"""Rate-limit scenarios: a job through the engine against an upstream that enforces RPM/TPM.

For each scenario it prints requests lost, 429s the upstream sent, wall time, and wall time divided by the
theoretical minimum: the tokens (or requests) the upstream charged beyond its initial burst capacity,
divided by its refill rate. 1.00 means the job ran as fast as the limits permit.

    python bench/ratelimit.py                 # all scenarios
    python bench/ratelimit.py --only exact-minute --requests 300
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_body, engine_process, simulator_process, simulator_stats

from trio_mapper import AsyncClient


@attrs.frozen
class Scenario:
    name: str
    description: str
    rpm: int
    tpm: int
    quantum: float
    requests: int
    engine_factor: float = 1.0
    simulator_flags: tuple[str, ...] = ()
    engine_flags: tuple[str, ...] = ()


SCENARIOS = [
    Scenario("exact-minute", "limits exact, upstream bucket holds a minute of burst", 3000, 60_000, 60, 560),
    Scenario("exact-second", "limits exact, upstream enforces per second", 12_000, 240_000, 1, 560),
    Scenario("engine-2x", "engine told limits 2x the upstream's", 3000, 60_000, 60, 560, engine_factor=2.0),
    Scenario(
        "faults",
        "5% of replies are 500s, 1% connections reset",
        3000,
        60_000,
        60,
        560,
        simulator_flags=("--fail-rate", "0.05", "--reset-rate", "0.01"),
    ),
]


async def run_scenario(scenario: Scenario, requests: int | None) -> dict[str, Any]:
    count = requests or scenario.requests
    bodies = [chat_body(i, words=30, max_tokens=100) for i in range(count)]
    simulator_flags = ["--rpm", str(scenario.rpm), "--tpm", str(scenario.tpm), "--quantum", str(scenario.quantum),
                       "--latency-ms", "50", "--per-token-latency-ms", "0.5", "--seed", "1",
                       *scenario.simulator_flags]  # fmt: skip
    engine_flags = ["--rpm", str(int(scenario.rpm * scenario.engine_factor)),
                    "--tpm", str(int(scenario.tpm * scenario.engine_factor)),
                    "--max_concurrent_reqs", "64", *scenario.engine_flags]  # fmt: skip
    async with simulator_process(*simulator_flags) as url, engine_process(url, *engine_flags) as socket:
        lost = 0
        attempts = 0
        started = time.perf_counter()
        async with AsyncClient(socket, client_name=f"bench {scenario.name}") as client:
            async for item in client.map(bodies, endpoint="/v1/chat/completions", window=count):
                if item.ok:
                    assert item.result is not None
                    attempts += item.result.attempts
                else:
                    lost += 1
                    print(f"  lost: {item.error}", file=sys.stderr)
        wall = time.perf_counter() - started
        stats = await simulator_stats(url)
    token_rate = scenario.tpm / 60
    request_rate = scenario.rpm / 60
    token_burst = scenario.tpm * scenario.quantum / 60
    request_burst = scenario.rpm * scenario.quantum / 60
    minimum = max(
        max(0.0, stats["tokens_charged"] - token_burst) / token_rate,
        max(0.0, stats["admitted"] - request_burst) / request_rate,
    )
    rate_limited = stats["rate_limited"]
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "requests": count,
        "lost": lost,
        "429s": rate_limited["requests"] + rate_limited["tokens"],
        "429_share": (rate_limited["requests"] + rate_limited["tokens"]) / max(1, stats["received"]),
        "5xx+resets": sum(stats["server_errors"].values()) + stats["resets"],
        "retries": attempts - (count - lost),
        "tokens_charged": stats["tokens_charged"],
        "wall_s": wall,
        "minimum_s": minimum,
        "ratio": wall / minimum if minimum > 0 else math.nan,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'scenario':<14} {'requests':>8} {'lost':>5} {'429s':>6} {'429 %':>6} {'5xx/rst':>7} " \
             f"{'retries':>7} {'wall s':>7} {'min s':>7} {'ratio':>6}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['scenario']:<14} {row['requests']:>8} {row['lost']:>5} {row['429s']:>6} "
            f"{100 * row['429_share']:>5.2f}% {row['5xx+resets']:>7} {row['retries']:>7} {row['wall_s']:>7.1f} "
            f"{row['minimum_s']:>7.1f} {row['ratio']:>6.3f}"
        )


async def main(args: argparse.Namespace) -> None:
    rows = []
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        print(f"running {scenario.name}: {scenario.description} …", file=sys.stderr, flush=True)
        rows.append(await run_scenario(scenario, args.requests))
    print_table(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--requests", type=int, help="override the job size")
    trio.run(main, parser.parse_args())
