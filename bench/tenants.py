"""Tenants: priority classes, weighted shares and caps (docs/tenants.md), measured on one engine.

Every scenario runs a simulator subprocess that enforces the key's limits per second (``--quantum 1``, so
no minute of burst hides the contention) and a ``launch-engine`` subprocess told the same limits, with the
tenants written to a TOML file given as ``--config``. Clients are `AsyncClient` connections that name
themselves in their hello (``client_name``), which is what ``names = [...]`` matches. Each scenario starts a
fresh simulator and engine per contender (or row), one after the other, in one run.

- **classes**: a batch of ``--batch-requests`` small chat requests (~67 tokens each; ``--batch-words`` and
  ``--batch-max-tokens`` size them) saturates the key's TPM, spread over ``--batch-connections``
  connections named "batch" (a batch job with a pool of workers; each count given is a run of its own),
  each a ``map(window=--window)``. Meanwhile a connection named "ui" sends ``--ui-rate`` requests per second
  (open loop: each on its own, whatever the previous one is doing) from ``--ui-start`` s after the batch
  starts until the batch's last request is answered (the key is saturated throughout). Measured: the ui
  requests' queue wait, ``Result.timings.queued`` (the engine's acceptance to first dispatch, budget wait
  included). Three contenders:

  - ``tenants``: ``[tenants.ui] priority = "interactive"``, ``[tenants.batch] priority = "batch"``;
  - ``round-robin``: the same clients, an engine without tenants: the lane serves connections in turn,
    so the ui's one connection gets one turn in (batch connections + 1) — what the engine did before tenants;
  - ``fifo``: an engine without tenants and the ui's requests on the batch's one connection (window: the
    first connection count x ``--window``), so they queue behind the batch's: one first-come-first-served
    queue. Run once.

  Round-robin gives a connection one dispatch in (connections + 1) while the others are backlogged: at
  ``--batch-connections 64`` that is below the ui's 3 requests/s, so its own requests queue behind each
  other and its wait grows for as long as the batch lasts.

- **weights**: tenants "a" (weight 3) and "b" (weight 1), both ``priority = "batch"``, each on
  ``--weight-connections`` connections sending without end, "a" small requests (~67 tokens), "b" large ones
  (~275 tokens), so that a share in tokens and a share in requests differ. After ``--warmup`` s, the
  engine's ``tokens_24h`` of each tenant is read every second for ``--duration`` s; shares are the deltas
  over that interval (the tokens charged at dispatch: the estimate, corrected by the reply's prompt tokens).
- **cap**: tenant "capped" with ``tpm_cap = "20%"`` (of the lane's configured TPM), backlogged: once
  beside tenant "other" (no cap, same class, saturating), once alone (the key far above the cap). Its
  ``tokens_24h`` delta over ``--duration`` s after ``--warmup`` s (its one second of burst is spent in the
  warm-up, so the interval holds only its pace) against the cap.

All figures are for one engine; what holds across engines sharing a Redis budget is in docs/tenants.md.

    python bench/tenants.py                      # all three scenarios, about 8 minutes
    python bench/tenants.py --quick              # a short trial, about 2 minutes
    python bench/tenants.py --only classes --batch-connections 32 --contenders round-robin
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_body, engine_process, pct, simulator_process, simulator_stats

from trio_mapper import AsyncClient

ENDPOINT = "/v1/chat/completions"
SCENARIOS = ("classes", "weights", "cap")
CLASS_CONTENDERS = ("tenants", "round-robin", "fifo")

CLASSES_CONFIG = """
[tenants.ui]
priority = "interactive"
names = ["ui"]

[tenants.batch]
priority = "batch"
names = ["batch"]
"""

WEIGHTS_CONFIG = """
[tenants.a]
priority = "batch"
weight = 3
names = ["a"]

[tenants.b]
priority = "batch"
weight = 1
names = ["b"]
"""

CAP_CONFIG = """
[tenants.capped]
tpm_cap = "{cap}"
names = ["capped"]

[tenants.other]
names = ["other"]
"""


def small_body(index: int) -> dict[str, Any]:
    """~67 tokens charged: a 20-word prompt, max_tokens 16."""
    return chat_body(index, words=20, max_tokens=16)


def large_body(index: int) -> dict[str, Any]:
    """~275 tokens charged: a 100-word prompt, max_tokens 64."""
    return chat_body(index, words=100, max_tokens=64)


def ui_body(index: int) -> dict[str, Any]:
    """~47 tokens charged."""
    return chat_body(1_000_000 + index, words=10, max_tokens=16)


@asynccontextmanager
async def simulator_and_engine(args: argparse.Namespace, config: str | None) -> AsyncIterator[tuple[str, Path]]:
    simulator_flags = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--quantum", "1", "--latency-ms", "50",
                       "--per-token-latency-ms", "0.5", "--seed", "1"]  # fmt: skip
    engine_flags = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--max_concurrent_reqs", "64"]
    if config is not None:
        path = Path(tempfile.mkdtemp(prefix="tmb-tenants-", dir="/tmp")) / "engine.toml"
        path.write_text(config)
        engine_flags += ["--config", str(path)]
    async with simulator_process(*simulator_flags) as url, engine_process(url, *engine_flags) as socket:
        yield url, socket


async def drain_map(client: AsyncClient, bodies: Iterator[dict[str, Any]], window: int, sink: list[Any]) -> None:
    """Send ``bodies`` through ``client.map``; append each success's `Result` to ``sink``."""
    async with client.map(bodies, endpoint=ENDPOINT, window=window) as results:
        async for item in results:
            if item.ok:
                sink.append(item.result)
            else:
                print(f"  failed: {item.error}", file=sys.stderr)


# --- classes --------------------------------------------------------------------------------------------------


async def classes_run(args: argparse.Namespace, contender: str, batch_connections: int) -> dict[str, Any]:
    config = CLASSES_CONFIG if contender == "tenants" else None
    connections = 1 if contender == "fifo" else batch_connections
    window = args.window * batch_connections if contender == "fifo" else args.window
    ui_waits: list[float] = []
    ui_latencies: list[float] = []
    ui_upstream: list[float] = []
    ui_retried = 0
    batch_results: list[Any] = []
    batch_done = trio.Event()

    def batch_bodies(part: int) -> Iterator[dict[str, Any]]:
        return (
            chat_body(index, words=args.batch_words, max_tokens=args.batch_max_tokens)
            for index in range(part, args.batch_requests, connections)
        )

    async def one_ui(client: AsyncClient, index: int) -> None:
        nonlocal ui_retried
        started = time.perf_counter()
        result = await client.request_result(ENDPOINT, ui_body(index))
        ui_latencies.append(time.perf_counter() - started)
        ui_waits.append(result.timings.queued)
        ui_upstream.append(result.timings.upstream)
        ui_retried += result.attempts > 1

    async def ui_loop(client: AsyncClient) -> None:
        await trio.sleep(args.ui_start)
        async with trio.open_nursery() as nursery:
            due = trio.current_time()
            for index in itertools.count():
                if batch_done.is_set():
                    break
                nursery.start_soon(one_ui, client, index)
                due += 1 / args.ui_rate
                with trio.move_on_at(due):
                    await batch_done.wait()

    async with simulator_and_engine(args, config) as (url, socket), AsyncExitStack() as stack:
        batch_clients = [
            await stack.enter_async_context(AsyncClient(socket, client_name="batch")) for _ in range(connections)
        ]
        if contender == "fifo":
            ui_client = batch_clients[0]  # one connection: its requests are served first come, first served
        else:
            ui_client = await stack.enter_async_context(AsyncClient(socket, client_name="ui"))
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ui_loop, ui_client)
            async with trio.open_nursery() as batch:
                for part, client in enumerate(batch_clients):
                    batch.start_soon(drain_map, client, batch_bodies(part), window, batch_results)
            batch_wall = time.perf_counter() - started
            batch_done.set()
        stats = await simulator_stats(url)
    rate = args.tpm / 60
    return {
        "contender": contender,
        "connections": connections,
        "window": window,
        "ui": len(ui_waits),
        "wait_p50": pct(ui_waits, 50),
        "wait_p99": pct(ui_waits, 99),
        "wait_max": max(ui_waits, default=math.nan),
        "e2e_p99": pct(ui_latencies, 99),
        "upstream_p99": pct(ui_upstream, 99),
        "retried": ui_retried,
        "batch_done": len(batch_results),
        # What the engine charges a batch request: its prompt (as the upstream counted it) and max_tokens.
        "batch_cost": sum(r.body["usage"]["prompt_tokens"] for r in batch_results) / max(1, len(batch_results))
        + args.batch_max_tokens,
        "batch_wall": batch_wall,
        # The theoretical minimum (what the upstream charged beyond its one second of burst, at its rate)
        # over the batch's wall time: 100 % is the key saturated throughout.
        "key_use": max(0.0, stats["tokens_charged"] - rate) / rate / batch_wall,
        "429s": stats["rate_limited"]["requests"] + stats["rate_limited"]["tokens"],
    }


def print_classes(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    cost = rows[0]["batch_cost"] if rows else math.nan
    print(
        f"classes: {args.batch_requests} batch requests of {cost:.0f} tokens against {args.tpm:,} TPM "
        f"({args.tpm / 60 / cost:.0f} requests/s, {cost / (args.tpm / 60) * 1000:.0f} ms of the key each), "
        f"ui {args.ui_rate:g} requests/s of ~47 tokens"
    )
    header = (f"{'contender':<12} {'batch conns x window':>20} {'ui reqs':>7} {'wait p50':>9} {'wait p99':>9} "
              f"{'wait max':>9} {'upstr p99':>9} {'e2e p99':>9} {'retried':>7} {'batch ok':>8} {'batch s':>8} "
              f"{'key use':>7} {'429s':>5}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = f"{row['connections']} x {row['window']}"
        print(
            f"{row['contender']:<12} {shape:>20} {row['ui']:>7} {ms(row['wait_p50']):>9} {ms(row['wait_p99']):>9} "
            f"{ms(row['wait_max']):>9} {ms(row['upstream_p99']):>9} {ms(row['e2e_p99']):>9} {row['retried']:>7} "
            f"{row['batch_done']:>8} {row['batch_wall']:>8.1f} {100 * row['key_use']:>6.0f}% {row['429s']:>5}"
        )
    measured = [row for row in rows if row["contender"] == "tenants"]
    if measured:
        verdict = "met" if all(row["wait_p99"] <= 1.0 for row in measured) else "NOT met"
        figures = ", ".join(f"{ms(row['wait_p99'])} ({row['connections']} batch connections)" for row in measured)
        print(f"goal: interactive queue wait p99 <= 1 s; with tenants: {figures} -> {verdict}")
    print()


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --- weights and cap: backlogged tenants, usage read from the engine's stats ------------------------------------


async def backlogged(
    args: argparse.Namespace,
    config: str,
    senders: list[tuple[str, int, Any]],
    watched: list[str],
) -> dict[str, Any]:
    """Tenants sending without end (name, connections, body builder); ``tokens_24h`` of ``watched`` read every
    second over ``--duration`` s after ``--warmup`` s; then everything is cancelled."""
    completed: dict[str, list[float]] = {name: [] for name, _, _ in senders}
    samples: list[tuple[float, dict[str, int], int]] = []

    async def sender(socket: Path, name: str, part: int, parts: int, build: Any) -> None:
        times = completed[name]
        async with AsyncClient(socket, client_name=name) as client:
            bodies = (build(index) for index in itertools.count(part, parts))
            async with client.map(bodies, endpoint=ENDPOINT, window=args.window) as results:
                async for item in results:
                    if item.ok:
                        times.append(time.perf_counter())

    async with simulator_and_engine(args, config) as (url, socket), trio.open_nursery() as nursery:
        for name, connections, build in senders:
            for part in range(connections):
                nursery.start_soon(sender, socket, name, part, connections, build)
        async with AsyncClient(socket, client_name="bench-stats") as observer:
            await trio.sleep(args.warmup)
            due = trio.current_time()
            for _ in range(int(args.duration) + 1):
                await trio.sleep_until(due)
                stats = await observer.stats()
                simulator = await simulator_stats(url)
                tenants = stats["engine"]["tenants"]
                samples.append(
                    (time.perf_counter(), {n: tenants[n]["tokens_24h"] for n in watched}, simulator["tokens_charged"])
                )
                due += 1.0
        nursery.cancel_scope.cancel()
    t0, first, sim0 = samples[0]
    t1, last, sim1 = samples[-1]
    span = t1 - t0
    return {
        "span": span,
        "tokens": {n: last[n] - first[n] for n in watched},
        "requests": {n: sum(1 for t in times if t0 <= t <= t1) for n, times in completed.items()},
        "key_use": (sim1 - sim0) / (args.tpm / 60 * span),
        "samples": samples,
    }


def windowed_rates(samples: list[tuple[float, dict[str, int], int]], name: str, width: int = 10) -> list[float]:
    """Tokens per minute of ``name`` over consecutive windows of ``width`` samples (seconds)."""
    rates = []
    for start in range(0, len(samples) - width, width):
        (ta, a, _), (tb, b, _) = samples[start], samples[start + width]
        rates.append((b[name] - a[name]) / (tb - ta) * 60)
    return rates


async def weights_run(args: argparse.Namespace) -> dict[str, Any]:
    senders = [("a", args.weight_connections, small_body), ("b", args.weight_connections, large_body)]
    return await backlogged(args, WEIGHTS_CONFIG, senders, ["a", "b"])


def print_weights(args: argparse.Namespace, outcome: dict[str, Any]) -> None:
    tokens, requests = outcome["tokens"], outcome["requests"]
    total_tokens = sum(tokens.values())
    total_requests = sum(requests.values()) or 1
    print(
        f"weights: tenants a (weight 3, ~67-token requests) and b (weight 1, ~275-token requests), both batch, "
        f"{args.weight_connections} connections x window {args.window} each; {outcome['span']:.1f} s after "
        f"{args.warmup:g} s warm-up; key use {100 * outcome['key_use']:.0f}%"
    )
    header = f"{'tenant':<7} {'weight':>6} {'tokens':>9} {'token share':>11} {'requests':>9} {'request share':>13}"
    print(header)
    print("-" * len(header))
    for name, weight in (("a", 3), ("b", 1)):
        print(
            f"{name:<7} {weight:>6} {tokens[name]:>9,} {100 * tokens[name] / total_tokens:>10.1f}% "
            f"{requests[name]:>9,} {100 * requests[name] / total_requests:>12.1f}%"
        )
    ratio = tokens["a"] / max(1, tokens["b"])
    share = tokens["a"] / max(1, total_tokens)
    shares = []
    samples = outcome["samples"]
    for start in range(0, len(samples) - 10, 10):
        a = samples[start + 10][1]["a"] - samples[start][1]["a"]
        b = samples[start + 10][1]["b"] - samples[start][1]["b"]
        shares.append(a / max(1, a + b))
    spread = f"{100 * min(shares):.1f}-{100 * max(shares):.1f}%" if shares else "-"
    verdict = "met" if abs(ratio / 3 - 1) <= 0.05 else "NOT met"
    print(
        f"goal: token shares within 5% of 3:1: a/b = {ratio:.3f} ({100 * (ratio / 3 - 1):+.1f}% from 3), "
        f"a's share {100 * share:.2f}% ({100 * (share - 0.75):+.2f} points from 75%; 10-s windows {spread}) "
        f"-> {verdict}"
    )
    print()


async def cap_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    config = CAP_CONFIG.format(cap=args.cap)
    rows = []
    for variant, senders in (
        ("beside other", [("capped", 2, small_body), ("other", 4, small_body)]),
        ("alone", [("capped", 2, small_body)]),
    ):
        print(f"  cap, {variant} …", file=sys.stderr, flush=True)
        outcome = await backlogged(args, config, senders, ["capped", "other"])
        outcome["variant"] = variant
        rows.append(outcome)
    return rows


def print_cap(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    share = float(args.cap.rstrip("%")) / 100
    cap = share * args.tpm
    print(
        f"cap: tenant 'capped' tpm_cap = \"{args.cap}\" of {args.tpm:,} TPM = {cap:,.0f} tokens/min, ~67-token "
        f"requests on 2 connections x window {args.window}; {args.warmup:g} s warm-up"
    )
    header = (f"{'variant':<13} {'interval s':>10} {'capped/min':>10} {'ratio':>7} {'10-s windows /min':>19} "
              f"{'other/min':>9} {'key use':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        per_minute = row["tokens"]["capped"] / row["span"] * 60
        other = row["tokens"]["other"] / row["span"] * 60
        windows = windowed_rates(row["samples"], "capped")
        spread = f"{min(windows):,.0f}-{max(windows):,.0f}" if windows else "-"
        row["ratio"] = per_minute / cap
        print(
            f"{row['variant']:<13} {row['span']:>10.1f} {per_minute:>10,.0f} {row['ratio']:>7.4f} {spread:>19} "
            f"{other:>9,.0f} {100 * row['key_use']:>6.1f}%"
        )
    worst = max(abs(row["ratio"] - 1) for row in rows)
    verdict = "met" if worst <= 0.02 else "NOT met"
    print(f"goal: usage within 2% of the cap: worst {100 * worst:.2f}% -> {verdict}")
    print()


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


async def main(args: argparse.Namespace) -> None:
    print(f"load average (1, 5, 15 min) at the start: {load()}")
    await scenarios(args)
    print(f"load average (1, 5, 15 min) at the end: {load()}")


async def scenarios(args: argparse.Namespace) -> None:
    if "classes" in args.only:
        rows = []
        for connections in args.batch_connections:
            for contender in args.contenders:
                if contender == "fifo" and connections != args.batch_connections[0]:
                    continue  # one connection whatever the pool: once is enough
                print(f"classes, {contender}, {connections} batch connections …", file=sys.stderr, flush=True)
                rows.append(await classes_run(args, contender, connections))
        print_classes(args, rows)
    if "weights" in args.only:
        print("weights …", file=sys.stderr, flush=True)
        print_weights(args, await weights_run(args))
    if "cap" in args.only:
        print("cap …", file=sys.stderr, flush=True)
        print_cap(args, await cap_runs(args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="a short trial: small batch, short intervals")
    parser.add_argument("--rpm", type=int, default=60_000, help="the key's limit, simulator and engine")
    parser.add_argument("--tpm", type=int, default=240_000, help="the key's limit, simulator and engine")
    parser.add_argument("--contenders", nargs="+", choices=CLASS_CONTENDERS, default=list(CLASS_CONTENDERS))
    parser.add_argument("--batch-requests", type=int, help="classes: batch size (default 2400; --quick 600)")
    parser.add_argument(
        "--batch-connections", type=int, nargs="+", default=[16, 64], help="classes: the batch's connections, each"
    )
    parser.add_argument("--batch-words", type=int, default=20, help="classes: words in a batch prompt")
    parser.add_argument("--batch-max-tokens", type=int, default=16, help="classes: max_tokens of a batch request")
    parser.add_argument("--window", type=int, default=64, help="map window of each sending connection")
    parser.add_argument("--ui-rate", type=float, default=3.0, help="classes: interactive requests per second")
    parser.add_argument(
        "--ui-start", type=float, default=2.0, help="classes: seconds from the batch's start to the ui's"
    )
    parser.add_argument("--weight-connections", type=int, default=4, help="weights: connections per tenant")
    parser.add_argument("--cap", default="20%", help="cap: the capped tenant's tpm_cap")
    parser.add_argument("--warmup", type=float, help="seconds before measuring (default 5; --quick 3)")
    parser.add_argument("--duration", type=float, help="weights, cap: seconds measured (default 60; --quick 15)")
    parsed = parser.parse_args()
    if parsed.batch_requests is None:
        parsed.batch_requests = 600 if parsed.quick else 2400
    if parsed.warmup is None:
        parsed.warmup = 3.0 if parsed.quick else 5.0
    if parsed.duration is None:
        parsed.duration = 15.0 if parsed.quick else 60.0
    trio.run(main, parsed)
