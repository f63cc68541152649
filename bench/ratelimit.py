"""Rate-limit scenarios: a job through the engine, and through the cookbook's script, against an upstream
that enforces RPM/TPM.

Two contenders run each scenario, one after the other, each against its own fresh simulator subprocess
started with the same flags (so neither spends the other's budget): the engine, and a re-implementation of
OpenAI's cookbook ``api_request_parallel_processor.py`` (``cookbook_baseline.py``), told the same limits as the
engine (in ``engine-2x`` both are told 2x the upstream's). For each (scenario, contender) it prints requests
lost, 429s the upstream sent, wall time, and wall time divided by the theoretical minimum: the tokens (or
requests) that contender's upstream charged beyond its initial burst capacity, divided by its refill rate.
1.00 means the job ran as fast as the limits permit; "tput" is its inverse, the share of the real limit used.

The ``nohdr-*`` scenarios run an upstream that sends no ``x-ratelimit-*`` header (``--no-ratelimit-headers``),
so an engine told more than the real limits learns them from 429s alone. The cookbook reads no header
anyway, so it runs only the one whose shape differs from the rest (a job long enough to outlast a minute's
burst at 2x); its rows elsewhere would repeat exact-second and engine-2x.

A cookbook run is stopped after ``--cookbook-cap`` seconds: "timeout" (merely slow) or "hung" (a request
larger than its budget); what was not done is lost, and its minimum (so its ratio) covers only what its
upstream charged before the stop.

    python bench/ratelimit.py                 # all scenarios, both contenders
    python bench/ratelimit.py --only exact-minute --requests 300 --contenders engine
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
from common import BENCH_KEY, chat_body, engine_process, simulator_process, simulator_stats
from cookbook_baseline import run_cookbook

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
    contenders: tuple[str, ...] = ("engine", "cookbook")


NO_HEADERS = ("--no-ratelimit-headers",)


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
    # Told 2x, the engine spends the minute's burst in 60 s at 2x the refill, then must find the real rate:
    # 1200 requests (~205k tokens) leave ~85 s of the job after the burst.
    Scenario(
        "nohdr-minute-2x",
        "no x-ratelimit-* headers, engine told 2x, upstream bucket holds a minute",
        3000,
        60_000,
        60,
        1200,
        engine_factor=2.0,
        simulator_flags=NO_HEADERS,
    ),
    Scenario(
        "nohdr-second-2x",
        "no x-ratelimit-* headers, engine told 2x, upstream enforces per second",
        12_000,
        240_000,
        1,
        560,
        engine_factor=2.0,
        simulator_flags=NO_HEADERS,
        contenders=("engine",),
    ),
    Scenario(
        "nohdr-second-1.5x",
        "no x-ratelimit-* headers, engine told 1.5x, upstream enforces per second",
        12_000,
        240_000,
        1,
        560,
        engine_factor=1.5,
        simulator_flags=NO_HEADERS,
        contenders=("engine",),
    ),
    Scenario(
        "nohdr-nowait-2x",
        "as nohdr-second-2x, and 429s name no wait (--no-retry-after)",
        12_000,
        240_000,
        1,
        560,
        engine_factor=2.0,
        simulator_flags=(*NO_HEADERS, "--no-retry-after"),
        contenders=("engine",),
    ),
]


CONTENDERS = ("engine", "cookbook")


async def run_engine(url: str, scenario: Scenario, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    count = len(bodies)
    engine_flags = ["--rpm", str(int(scenario.rpm * scenario.engine_factor)),
                    "--tpm", str(int(scenario.tpm * scenario.engine_factor)),
                    "--max_concurrent_reqs", "64", *scenario.engine_flags]  # fmt: skip
    async with engine_process(url, *engine_flags) as socket:
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
    return {"lost": lost, "retries": attempts - (count - lost), "wall_s": wall, "status": "done"}


async def run_cookbook_contender(
    url: str, scenario: Scenario, bodies: list[dict[str, Any]], cap_s: float
) -> dict[str, Any]:
    result = await run_cookbook(
        url,
        BENCH_KEY,
        bodies,
        endpoint="/v1/chat/completions",
        max_requests_per_minute=int(scenario.rpm * scenario.engine_factor),
        max_tokens_per_minute=int(scenario.tpm * scenario.engine_factor),
        timeout_s=cap_s,
    )
    status = result.status
    if status != "done":
        status += f" at {cap_s:.0f} s: {result.unfinished} unfinished"
    if result.failed_after_attempts:
        status += f"{',' if status != 'done' else ':'} {result.failed_after_attempts} failed after all attempts"
    return {
        "lost": result.failed,
        "retries": result.sends - result.started,
        "wall_s": result.wall_s,
        "status": status,
    }


async def run_scenario(
    scenario: Scenario, requests: int | None, contenders: list[str], cookbook_cap_s: float
) -> list[dict[str, Any]]:
    count = requests or scenario.requests
    bodies = [chat_body(i, words=30, max_tokens=100) for i in range(count)]
    simulator_flags = ["--rpm", str(scenario.rpm), "--tpm", str(scenario.tpm), "--quantum", str(scenario.quantum),
                       "--latency-ms", "50", "--per-token-latency-ms", "0.5", "--seed", "1",
                       *scenario.simulator_flags]  # fmt: skip
    rows = []
    for contender in CONTENDERS:
        if contender not in contenders or contender not in scenario.contenders:
            continue
        print(f"  {contender} …", file=sys.stderr, flush=True)
        async with simulator_process(*simulator_flags) as url:
            if contender == "engine":
                outcome = await run_engine(url, scenario, bodies)
            else:
                outcome = await run_cookbook_contender(url, scenario, bodies, cookbook_cap_s)
            stats = await simulator_stats(url)
        rows.append(row_from(scenario, contender, count, outcome, stats))
    return rows


def row_from(
    scenario: Scenario, contender: str, count: int, outcome: dict[str, Any], stats: dict[str, Any]
) -> dict[str, Any]:
    token_rate = scenario.tpm / 60
    request_rate = scenario.rpm / 60
    token_burst = scenario.tpm * scenario.quantum / 60
    request_burst = scenario.rpm * scenario.quantum / 60
    minimum = max(
        max(0.0, stats["tokens_charged"] - token_burst) / token_rate,
        max(0.0, stats["admitted"] - request_burst) / request_rate,
    )
    rate_limited = stats["rate_limited"]
    wall = outcome["wall_s"]
    return {
        "scenario": scenario.name,
        "contender": contender,
        "description": scenario.description,
        "requests": count,
        "lost": outcome["lost"],
        "429s": rate_limited["requests"] + rate_limited["tokens"],
        "429_share": (rate_limited["requests"] + rate_limited["tokens"]) / max(1, stats["received"]),
        "5xx+resets": sum(stats["server_errors"].values()) + stats["resets"],
        "retries": outcome["retries"],
        "tokens_charged": stats["tokens_charged"],
        "wall_s": wall,
        "minimum_s": minimum,
        "ratio": wall / minimum if minimum > 0 else math.nan,
        "status": outcome["status"],
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'scenario':<17} {'contender':<9} {'requests':>8} {'lost':>5} {'429s':>6} {'429 %':>6} " \
             f"{'5xx/rst':>7} {'retries':>7} {'wall s':>7} {'min s':>7} {'ratio':>6} {'tput':>5}  status"  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['scenario']:<17} {row['contender']:<9} {row['requests']:>8} {row['lost']:>5} {row['429s']:>6} "
            f"{100 * row['429_share']:>5.2f}% {row['5xx+resets']:>7} {row['retries']:>7} {row['wall_s']:>7.1f} "
            f"{row['minimum_s']:>7.1f} {row['ratio']:>6.3f} {100 / row['ratio']:>4.0f}%  {row['status']}"
        )


async def main(args: argparse.Namespace) -> None:
    rows = []
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        print(f"running {scenario.name}: {scenario.description} …", file=sys.stderr, flush=True)
        rows.extend(await run_scenario(scenario, args.requests, args.contenders, args.cookbook_cap))
    print_table(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--requests", type=int, help="override the job size")
    parser.add_argument(
        "--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), help="what runs each scenario"
    )
    parser.add_argument(
        "--cookbook-cap", type=float, default=180, metavar="S", help="stop a cookbook run after S seconds"
    )
    trio.run(main, parser.parse_args())
