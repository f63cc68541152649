"""Several engines on one API key: the shared budget in Redis against local budgets, its cost per admission,
and Redis killed mid-job.

Three scenarios, each with its contenders side by side in one run (the machine is noisy: compare ratios):

- **A, one key, three engines** (``shared`` vs ``local``): a simulator subprocess enforcing the key's limits
  (per second by default, so nothing absorbs an excess), three ``launch-engine`` processes told the key's
  limits, each fed by its own ``trio-mapper map`` subprocess (its own JSONL file), all started at once.
  ``shared``: every engine has ``--budget unix://…`` on one redis-server; ``local``: no ``--budget``, so each
  engine believes it has the whole key. Each contender gets its own fresh simulator (and Redis). Printed:
  requests, lost (input lines without a successful output line), the 429s the upstream sent and their
  share of what it received, the job's wall time (the slowest ``map``, spawn to exit), the theoretical
  minimum for the shared limit (``bench/ratelimit.py``'s: what the upstream charged beyond its initial
  burst, divided by its refill rate, tokens or requests whichever binds) and their ratio.
- **B, cost of an admission**: one engine with the Redis budget and one with a local budget, limits far above
  the load, against one simulator with no latency: sequential requests through `AsyncClient` (p50/p99,
  and the difference: what Redis adds per request) and throughput at concurrency 64. Then admissions
  alone, without an engine: ``Ledger.lane().reserve()`` + ``reconcile`` in this process against the same
  Redis, with several concurrent reservers (and several lanes), until every settlement reached Redis.
- **C, Redis killed mid-job**: scenario A's shared run, redis-server SIGKILLed once a third of the results are
  written, started again (same socket, empty) ``--down`` seconds later; the engines' ``budget.state`` is
  polled meanwhile. Default failure policy ``wait``.
- **D, one engine cut off from Redis** (a partition), ``--budget-failure local-share``: scenario A's shared run
  with engine 0 reaching Redis through a relay (the tests' `cuttable_link`) that is cut once a tenth of the
  results are written, for the rest of the job, while the other engines keep Redis. The cut-off engine spends
  its share locally; whatever the engines spend together beyond the key's limits comes back as 429s.
  Run it with ``PYTHONPATH`` at an older tree to compare (the engines run the code the bench imports).

    python bench/shared_budget.py                  # all four, about 4 minutes
    python bench/shared_budget.py --quick          # a short trial of all four, about 1 minute
    python bench/shared_budget.py --only A --requests 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import chat_body, engine_process, pct, redis_server_executable, simulator_process, simulator_stats
from redis_fixtures import RedisServer, cuttable_link  # the tests' redis-server; SIGKILL, restart, partition

from trio_mapper import AsyncClient
from trio_mapper.engine.budget.interface import Cost, Limits
from trio_mapper.engine.budget.ledger import Ledger
from trio_mapper.engine.budget.shared import SharedBudget, SharedBudgetSettings, key_identity

MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
HUGE = ("--rpm", "100000000", "--tpm", "10000000000")


# --- helpers ---------------------------------------------------------------------------------------------


class Redis:
    """A redis-server on a Unix socket in its own temporary directory, nothing persisted."""

    def __init__(self) -> None:
        executable = redis_server_executable()
        self.directory = Path(tempfile.mkdtemp(prefix="tmb-redis-", dir="/tmp"))
        self.server = RedisServer(executable, self.directory)

    async def __aenter__(self) -> RedisServer:
        await self.server.start()
        return self.server

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def write_inputs(directory: Path, engines: int, per_engine: int) -> list[Path]:
    """One JSONL file of plain chat bodies per engine (distinct prompts across files)."""
    paths = []
    for engine in range(engines):
        path = directory / f"in{engine}.jsonl"
        with path.open("w") as file:
            for i in range(per_engine):
                body = chat_body(engine * per_engine + i, words=30, max_tokens=100)
                file.write(json.dumps(body) + "\n")
        paths.append(path)
    return paths


def succeeded_ids(output: Path) -> set[str]:
    ids: set[str] = set()
    if not output.exists():
        return ids
    for line in output.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        response = record.get("response") or {}
        if record.get("error") is None and response.get("status_code") == 200:
            ids.add(record["custom_id"])
    return ids


def pid_of_child_with(argument: str) -> int:
    """The pid of this process's child with ``argument`` in its argv (an engine, by its unique socket path)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == me and argument.encode() in argv:
            return int(entry.name)
    raise LookupError(f"no child process with {argument} in its argv")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc): unlike wall time, barely moved by other load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as file:
            return sum(1 for _ in file)
    except FileNotFoundError:
        return 0


def theoretical_minimum(stats: dict[str, Any], rpm: int, tpm: int, quantum: float) -> float:
    """`bench/ratelimit.py`'s minimum: what the upstream charged beyond its initial burst, ÷ its refill."""
    return max(
        max(0.0, stats["tokens_charged"] - tpm * quantum / 60) / (tpm / 60),
        max(0.0, stats["admitted"] - rpm * quantum / 60) / (rpm / 60),
    )


async def map_job(socket: Path, source: Path, output: Path, log: Path) -> dict[str, Any]:
    """``trio-mapper map`` as a subprocess; its wall time from spawn to exit."""
    started = time.perf_counter()
    with log.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_mapper", "map", str(source), "-o", str(output),
             "--socket", str(socket), "--no-progress"],
            stdout=log_file, stderr=log_file,
        )  # fmt: skip
        try:
            await process.wait()
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await process.wait()
    wall = time.perf_counter() - started
    if process.returncode not in (0, 1):
        text = await trio.Path(log).read_text(errors="replace")
        print(f"  map exited {process.returncode}:\n{text}", file=sys.stderr)
    return {"wall_s": wall, "status": process.returncode}


async def run_jobs(
    args: argparse.Namespace,
    url: str,
    engine_flags: list[str],
    work: Path,
    during: Callable[[list[Path], list[Path], trio.Event], Awaitable[dict[str, Any]]] | None = None,
    flags_of: Callable[[int], list[str]] | None = None,
) -> dict[str, Any]:
    """``args.engines`` engines on one key, each fed by its own ``map`` job, all started at once; ``flags_of``
    gives engine n's flags after ``engine_flags``."""
    inputs = write_inputs(work, args.engines, args.requests)
    outputs = [work / f"out{n}.jsonl" for n in range(args.engines)]
    jobs: list[dict[str, Any]] = [{} for _ in range(args.engines)]
    extra: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(engine_process(url, *engine_flags, *(flags_of(n) if flags_of else [])))
            for n in range(args.engines)
        ]
        before = await simulator_stats(url)
        done = trio.Event()

        async def job(n: int) -> None:
            jobs[n] = await map_job(sockets[n], inputs[n], outputs[n], work / f"map{n}.log")

        async def watcher() -> None:
            extra.update(await during(sockets, outputs, done))  # type: ignore[misc]

        async with trio.open_nursery() as nursery:
            if during is not None:
                nursery.start_soon(watcher)
            async with trio.open_nursery() as jobs_nursery:
                for n in range(args.engines):
                    jobs_nursery.start_soon(job, n)
            done.set()
        after = await simulator_stats(url)
        engine_stats = []
        for socket in sockets:
            async with AsyncClient(socket, client_name="bench stats") as client:
                engine_stats.append(await client.stats())
    assert before["received"] == 0, before
    lost = sum(args.requests - len(succeeded_ids(output)) for output in outputs)
    return {"jobs": jobs, "stats": after, "engines": engine_stats, "lost": lost, **extra}


def job_row(variant: str, args: argparse.Namespace, outcome: dict[str, Any]) -> dict[str, Any]:
    stats = outcome["stats"]
    limited = stats["rate_limited"]["requests"] + stats["rate_limited"]["tokens"]
    walls = [job["wall_s"] for job in outcome["jobs"]]
    minimum = theoretical_minimum(stats, args.rpm, args.tpm, args.quantum)
    absorbed = sum(
        lane.get("upstream_429s", 0) for engine in outcome["engines"] for lane in engine.get("lanes", {}).values()
    )
    return {
        "variant": variant,
        "requests": args.engines * args.requests,
        "lost": outcome["lost"],
        "sent": stats["received"],
        "429s": limited,
        "429_share": limited / max(1, stats["received"]),
        "absorbed": absorbed,
        "tokens": stats["tokens_charged"],
        "wall_s": max(walls),
        "fastest_s": min(walls),
        "minimum_s": minimum,
        "ratio": max(walls) / minimum if minimum > 0 else math.nan,
    }


def print_job_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    header = (
        f"{'variant':<14} {'requests':>8} {'lost':>5} {'sent':>6} {'429s':>6} {'429 %':>7} {'tokens':>8} "
        f"{'fastest s':>9} {'wall s':>7} {'min s':>6} {'ratio':>6} {'tput':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['variant']:<14} {row['requests']:>8} {row['lost']:>5} {row['sent']:>6} {row['429s']:>6} "
            f"{100 * row['429_share']:>6.2f}% {row['tokens']:>8} {row['fastest_s']:>9.1f} {row['wall_s']:>7.1f} "
            f"{row['minimum_s']:>6.1f} {row['ratio']:>6.3f} {100 / row['ratio']:>4.0f}%"
        )


def simulator_flags(args: argparse.Namespace) -> list[str]:
    return ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--quantum", str(args.quantum),
            "--latency-ms", "50", "--per-token-latency-ms", "0.5", "--seed", "1"]  # fmt: skip


def key_engine_flags(args: argparse.Namespace) -> list[str]:
    return ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--max_concurrent_reqs", str(args.engine_concurrency)]


# --- A: one key, three engines, shared vs local ---------------------------------------------------------


async def scenario_a(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for variant in ("shared", "local"):
        print(f"  A {variant} …", file=sys.stderr, flush=True)
        work = Path(tempfile.mkdtemp(prefix="tmb-a-", dir="/tmp"))
        async with simulator_process(*simulator_flags(args)) as url:
            if variant == "shared":
                async with Redis() as redis:
                    outcome = await run_jobs(args, url, [*key_engine_flags(args), "--budget", redis.url], work)
            else:
                outcome = await run_jobs(args, url, key_engine_flags(args), work)
        rows.append(job_row(variant, args, outcome))
        shutil.rmtree(work, ignore_errors=True)
    return rows


# --- C: Redis killed and restarted mid-job ---------------------------------------------------------------


async def scenario_c(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    print("  C shared, Redis killed mid-job …", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="tmb-c-", dir="/tmp"))
    total = args.engines * args.requests
    async with simulator_process(*simulator_flags(args)) as url, Redis() as redis:

        async def outage(sockets: list[Path], outputs: list[Path], done: trio.Event) -> dict[str, Any]:
            started = time.perf_counter()
            timeline: list[tuple[float, str]] = []
            states: list[set[str]] = [set() for _ in sockets]
            status_text = ""
            async with AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(AsyncClient(socket, client_name="bench watch"))
                    for socket in sockets
                ]

                counted: list[Any] = [None] * len(clients)

                async def poll() -> list[str]:
                    seen = []
                    for n, client in enumerate(clients):
                        budget = (await client.stats())["engine"].get("budget", {})
                        states[n].add(budget.get("state", "?"))
                        seen.append(budget.get("state", "?"))
                        counted[n] = budget.get("engines")
                    return seen

                while sum(count_lines(output) for output in outputs) < total * args.kill_at:
                    if done.is_set():
                        return {"note": "the jobs ended before the kill"}
                    await trio.sleep(0.05)
                lines_at_kill = sum(count_lines(output) for output in outputs)
                await redis.stop(signal.SIGKILL)
                killed = time.perf_counter()
                timeline.append((killed - started, f"SIGKILL redis-server ({lines_at_kill}/{total} results written)"))
                first_down = None
                while time.perf_counter() - killed < args.down:
                    seen = await poll()
                    if first_down is None and any(state != "ok" for state in seen):
                        first_down = time.perf_counter()
                        timeline.append((first_down - started, f"engines' budget.state: {', '.join(seen)}"))
                        timeline.append(
                            (first_down - started, f"engines on the key, as each engine counts them: {counted}")
                        )
                        status = await trio.run_process(
                            [sys.executable, "-m", "trio_mapper", "status", "--socket", str(sockets[0])],
                            capture_stdout=True, check=False,
                        )  # fmt: skip
                        status_text = status.stdout.decode(errors="replace")
                    await trio.sleep(0.2)
                lines_at_restart = sum(count_lines(output) for output in outputs)
                await redis.start()
                restarted = time.perf_counter()
                written = lines_at_restart - lines_at_kill
                timeline.append(
                    (restarted - started, f"redis-server started again, empty ({written} results written while down)")
                )
                while not done.is_set():
                    seen = await poll()
                    if all(state == "ok" for state in seen):
                        timeline.append((time.perf_counter() - started, "every engine's budget.state: ok"))
                        break
                    await trio.sleep(0.1)
            return {
                "timeline": timeline,
                "states": states,
                "status": status_text,
                "down_s": restarted - killed,
                "during_outage": lines_at_restart - lines_at_kill,
            }

        outcome = await run_jobs(args, url, [*key_engine_flags(args), "--budget", redis.url], work, outage)
    shutil.rmtree(work, ignore_errors=True)
    return job_row("shared, killed", args, outcome), outcome


# --- D: one engine cut off from Redis, local-share ------------------------------------------------------


async def scenario_d(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    print("  D local-share, one engine cut off from Redis …", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="tmb-d-", dir="/tmp"))
    total = args.engines * args.requests
    async with simulator_process(*simulator_flags(args)) as url, Redis() as redis, cuttable_link(redis) as link:

        async def partition(sockets: list[Path], outputs: list[Path], done: trio.Event) -> dict[str, Any]:
            started = time.perf_counter()
            timeline: list[tuple[float, str]] = []
            async with AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(AsyncClient(socket, client_name="bench watch"))
                    for socket in sockets
                ]
                while sum(count_lines(output) for output in outputs) < total * args.cut_at:
                    if done.is_set():
                        return {"note": "the jobs ended before the cut"}
                    await trio.sleep(0.05)
                link.cut()
                cut = time.perf_counter()
                written = sum(count_lines(output) for output in outputs)
                timeline.append((cut - started, f"engine 0 cut off from Redis ({written}/{total} results written)"))
                seen: dict[str, float] = {}
                while not done.is_set():
                    budgets = [(await client.stats())["engine"].get("budget", {}) for client in clients]
                    kept = budgets[1].get("kept_for_cut_off_engines", 0.0)
                    for what, now_true in (
                        ("engine 0: " + str(budgets[0].get("state")), True),
                        (f"engine 1 keeps {100 * kept:.0f}% of the limits for the cut-off engine", kept > 0),
                    ):
                        if now_true and what not in seen:
                            seen[what] = time.perf_counter() - started
                            timeline.append((seen[what], what))
                    await trio.sleep(0.25)
            return {"timeline": timeline, "cut_s": cut - started}

        def flags_of(n: int) -> list[str]:
            return ["--budget", link.url if n == 0 else redis.url, "--budget-failure", "local-share"]

        outcome = await run_jobs(args, url, key_engine_flags(args), work, partition, flags_of)
    shutil.rmtree(work, ignore_errors=True)
    return job_row("shared, cut", args, outcome), outcome


# --- B: what an admission costs --------------------------------------------------------------------------


async def engine_latencies(socket: Path, count: int) -> list[float]:
    latencies = []
    async with AsyncClient(socket) as client:
        for i in range(count):
            started = time.perf_counter()
            await client.request(ENDPOINT, chat_body(i, words=20, max_tokens=16))
            latencies.append(time.perf_counter() - started)
    return latencies


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


async def admissions(url: str | None, total: int, reservers: int, lanes: int) -> dict[str, float]:
    """``reserve`` + ``reconcile`` in a loop, ``reservers`` tasks spread over ``lanes`` lanes, until ``total``
    admissions are made and (with Redis) every settlement has reached it."""
    async with trio.open_nursery() as nursery:
        budget = None
        if url is None:
            ledger = Ledger(Limits(rpm=10**9, tpm=10**12), 60.0)
        else:
            settings = SharedBudgetSettings(url=url, namespace=f"bench-{time.monotonic_ns()}")
            budget = SharedBudget(settings, key_id=key_identity("sk-bench", "http://x/v1"))
            await nursery.start(budget.run)
            ledger = Ledger(Limits(rpm=10**9, tpm=10**12), 60.0, meter_factory=budget)
        cost = Cost(tokens=66, requests=1, prompt_tokens=50)
        lane_budgets = [ledger.lane(f"model-{n}") for n in range(lanes)]
        latencies: list[float] = []
        pending_max = 0

        async def loop(lane_index: int, count: int) -> None:
            nonlocal pending_max
            lane = lane_budgets[lane_index]
            for _ in range(count):
                started = time.perf_counter()
                reservation = await lane.reserve(cost)
                latencies.append(time.perf_counter() - started)
                lane.reconcile(reservation, prompt_tokens=52, snapshot=None)
                if budget is not None:
                    pending_max = max(pending_max, budget.pending)

        # Warm-up: connections, script load, lane state.
        async with trio.open_nursery() as warm:
            for n in range(lanes):
                warm.start_soon(loop, n, 50)
        if budget is not None:
            await budget.flush()
        latencies.clear()
        pending_max = 0
        started = time.perf_counter()
        cpu_started = time.process_time()
        async with trio.open_nursery() as run:
            for n in range(reservers):
                run.start_soon(loop, n % lanes, total // reservers)
        admitted = time.perf_counter()
        if budget is not None:
            await budget.flush()
        flushed = time.perf_counter()
        cpu_used = time.process_time() - cpu_started
        nursery.cancel_scope.cancel()
    done = (total // reservers) * reservers
    return {
        "admitted_per_s": done / (admitted - started),
        "settled_per_s": done / (flushed - started),
        "p50_ms": 1000 * pct(latencies, 50),
        "p99_ms": 1000 * pct(latencies, 99),
        "pending_max": pending_max,
        "cpu_us": 1e6 * cpu_used / done,
    }


async def scenario_b(args: argparse.Namespace) -> dict[str, Any]:
    print("  B admission cost …", file=sys.stderr, flush=True)
    sim_flags = [*HUGE, "--latency-ms", "0", "--per-token-latency-ms", "0", "--seed", "1"]
    engine_flags = [*HUGE, "--max_concurrent_reqs", str(args.concurrency)]
    result: dict[str, Any] = {}
    async with simulator_process(*sim_flags) as url, Redis() as redis:
        async with engine_process(url, *engine_flags) as local, \
                engine_process(url, *engine_flags, "--budget", redis.url) as shared:  # fmt: skip
            for socket in (local, shared):  # warm both paths
                await engine_latencies(socket, 20)
                await engine_throughput(socket, 200, args.concurrency)
            # Interleaved, so a noisy stretch of the machine does not fall on one contender only.
            lat: dict[str, list[float]] = {"local": [], "redis": []}
            rps: dict[str, list[float]] = {"local": [], "redis": []}
            pids = {"local": pid_of_child_with(str(local)), "redis": pid_of_child_with(str(shared))}
            cpu = {"local": 0.0, "redis": 0.0}
            for _ in range(args.rounds):
                for name, socket in (("local", local), ("redis", shared)):
                    lat[name] += await engine_latencies(socket, args.sequential // args.rounds)
                for name, socket in (("local", local), ("redis", shared)):
                    before = cpu_of(pids[name])
                    rps[name].append(await engine_throughput(socket, args.parallel // args.rounds, args.concurrency))
                    cpu[name] += cpu_of(pids[name]) - before
            result["cpu_per_request"] = {name: value / (args.parallel // args.rounds * args.rounds)
                                         for name, value in cpu.items()}  # fmt: skip
            async with AsyncClient(shared) as client:
                result["engine_budget"] = (await client.stats())["engine"].get("budget", {})
        result["latency"] = lat
        result["throughput"] = rps
        loops = []
        for lanes in args.lanes:
            for reservers in args.reservers:
                if reservers < lanes:
                    continue
                for name, target in (("local", None), ("redis", redis.url)):
                    figures = await admissions(target, args.admissions, reservers, lanes)
                    loops.append({"budget": name, "reservers": reservers, "lanes": lanes, **figures})
        result["admissions"] = loops
    return result


def print_b(args: argparse.Namespace, b: dict[str, Any]) -> None:
    lat, rps = b["latency"], b["throughput"]
    n = len(lat["local"])
    print("B. cost of an admission: one engine, limits far above the load, simulator with no latency")
    print(f"latency, {n} sequential requests through AsyncClient (ms)")
    print(f"{'':>22} {'p50':>7} {'p99':>7}")
    for name, label in (("local", "local budget"), ("redis", "Redis budget")):
        print(f"{label:>22} {1000 * pct(lat[name], 50):>7.2f} {1000 * pct(lat[name], 99):>7.2f}")
    print(
        f"{'added by Redis':>22} {1000 * (pct(lat['redis'], 50) - pct(lat['local'], 50)):>7.2f} "
        f"{1000 * (pct(lat['redis'], 99) - pct(lat['local'], 99)):>7.2f}"
    )
    print()
    total = args.parallel // args.rounds * args.rounds
    print(f"throughput, {total} requests at concurrency {args.concurrency} in {args.rounds} rounds (requests/s)")
    local_rps = sum(rps["local"]) / len(rps["local"])
    redis_rps = sum(rps["redis"]) / len(rps["redis"])
    for name, label, mean in (("local", "local budget", local_rps), ("redis", "Redis budget", redis_rps)):
        rounds = " ".join(f"{value:.0f}" for value in rps[name])
        print(f"{label:>22} {mean:>7.0f}   (rounds: {rounds})")
    print(f"{'Redis / local':>22} {redis_rps / local_rps:>7.2f}")
    cpu = b["cpu_per_request"]
    print(f"engine CPU per request (ms): local {1000 * cpu['local']:.3f}, Redis {1000 * cpu['redis']:.3f}, "
          f"added {1000 * (cpu['redis'] - cpu['local']):.3f}; one core's worth: {1 / cpu['redis']:.0f} requests/s "
          f"with Redis, {1 / cpu['local']:.0f} local")  # fmt: skip
    budget = b.get("engine_budget", {})
    print(f"{'':>22} engine's budget: state {budget.get('state')}, {budget.get('calls')} Redis calls, "
          f"{budget.get('failures')} failures")  # fmt: skip
    print()
    print(f"admissions alone: Ledger.lane().reserve() + reconcile() in this process, {args.admissions} per row,")
    print("until every settlement reached Redis (admit/s: until the last grant; settled/s: until the flush)")
    print("(backlog: most settlements waiting to be sent; CPU: this process's CPU per admission, charge and settle)")
    header = (
        f"{'budget':<7} {'lanes':>5} {'reservers':>9} {'admit/s':>8} {'settled/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'backlog':>7} {'CPU µs':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in b["admissions"]:
        print(
            f"{row['budget']:<7} {row['lanes']:>5} {row['reservers']:>9} {row['admitted_per_s']:>8.0f} "
            f"{row['settled_per_s']:>9.0f} {row['p50_ms']:>7.3f} {row['p99_ms']:>7.3f} {row['pending_max']:>7} "
            f"{row['cpu_us']:>7.0f}"
        )


# --- main ------------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    minimum = args.engines * args.requests * 171 / (args.tpm / 60)
    print(
        f"key limits {args.rpm} RPM / {args.tpm} TPM (simulator bucket {args.quantum:g} s), {args.engines} engines "
        f"x {args.requests} requests (~171 tokens each: ~{minimum:.0f} s at the shared limit)",
        file=sys.stderr,
    )
    a_rows: list[dict[str, Any]] = []
    b: dict[str, Any] | None = None
    c: tuple[dict[str, Any], dict[str, Any]] | None = None
    d: tuple[dict[str, Any], dict[str, Any]] | None = None
    if "A" in args.only:
        a_rows = await scenario_a(args)
    if "B" in args.only:
        b = await scenario_b(args)
    if "C" in args.only:
        c = await scenario_c(args)
    if "D" in args.only:
        d = await scenario_d(args)

    print(f"{args.engines} engines on one key, each fed by its own `trio-mapper map` of {args.requests} requests; "
          f"key limits {args.rpm} RPM / {args.tpm} TPM, simulator bucket {args.quantum:g} s")  # fmt: skip
    print()
    if a_rows:
        print_job_table("A. shared budget in Redis vs local budgets", a_rows)
        print()
    if b is not None:
        print_b(args, b)
        print()
    if c is not None:
        row, outcome = c
        print_job_table(
            f"C. Redis SIGKILLed at {100 * args.kill_at:.0f} % of the results, started again (empty) "
            f"{args.down:g} s later; --budget-failure wait",
            [row],
        )
        if "timeline" in outcome:
            print(f"Redis down {outcome['down_s']:.1f} s; wall time - minimum - outage = "
                  f"{row['wall_s'] - row['minimum_s'] - outcome['down_s']:.1f} s")  # fmt: skip
            for at, what in outcome["timeline"]:
                print(f"  {at:6.1f} s  {what}")
            for n, states in enumerate(outcome["states"]):
                print(f"  engine {n}: budget.state seen: {' | '.join(sorted(states))}")
            budget_lines = [line for line in outcome["status"].splitlines() if "budget" in line or "engines" in line]
            if budget_lines:
                print("  `trio-mapper status` of engine 0 while Redis was down:")
                for line in budget_lines:
                    print(f"    {line.strip()}")
        else:
            print(f"  {outcome.get('note')}")
        for n, engine in enumerate(outcome["engines"]):
            budget = engine["engine"].get("budget", {})
            print(f"  engine {n} at the end: state {budget.get('state')}, {budget.get('calls')} Redis calls, "
                  f"{budget.get('failures')} failures")  # fmt: skip
    if d is not None:
        print()
        row, outcome = d
        print_job_table(
            f"D. engine 0 of {args.engines} cut off from Redis at {100 * args.cut_at:.0f} % of the results, for the "
            "rest of the job; --budget-failure local-share",
            [row],
        )
        for at, what in outcome.get("timeline", []):
            print(f"  {at:6.1f} s  {what}")
        if "note" in outcome:
            print(f"  {outcome['note']}")
        for n, engine in enumerate(outcome["engines"]):
            budget = engine["engine"].get("budget", {})
            print(f"  engine {n} at the end: state {budget.get('state')}, {budget.get('calls')} Redis calls")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("A", "B", "C", "D"), default=["A", "B", "C", "D"])
    parser.add_argument("--quick", action="store_true", help="a short trial: small jobs and few samples")
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--requests", type=int, help="requests per engine's job (default 200; --quick 60)")
    parser.add_argument("--rpm", type=int, default=12_000, help="the key's limit, simulator and engines")
    parser.add_argument("--tpm", type=int, default=240_000, help="the key's limit, simulator and engines")
    parser.add_argument("--quantum", type=float, default=1.0, help="seconds of burst the simulator's bucket holds")
    parser.add_argument("--engine-concurrency", type=int, default=64, help="--max_concurrent_reqs of A/C engines")
    parser.add_argument("--kill-at", type=float, default=1 / 3, help="C: share of results written at the kill")
    parser.add_argument("--down", type=float, default=3.0, help="C: seconds Redis stays down")
    parser.add_argument("--cut-at", type=float, default=0.1, help="D: share of results written at the cut")
    parser.add_argument("--sequential", type=int, help="B: sequential requests per budget (default 300)")
    parser.add_argument("--parallel", type=int, help="B: requests per budget for throughput (default 4000)")
    parser.add_argument("--concurrency", type=int, default=64, help="B: throughput window")
    parser.add_argument("--rounds", type=int, default=2, help="B: interleaved rounds of each measurement")
    parser.add_argument("--admissions", type=int, help="B: admissions per loop row (default 20000)")
    parser.add_argument("--reservers", type=int, nargs="+", default=[1, 8, 64], help="B: concurrent reservers")
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 4], help="B: lanes the reservers spread over")
    arguments = parser.parse_args()
    for name, full, quick in (("requests", 200, 60), ("sequential", 300, 100), ("parallel", 4000, 1000),
                              ("admissions", 20_000, 4000)):  # fmt: skip
        if getattr(arguments, name) is None:
            setattr(arguments, name, quick if arguments.quick else full)
    trio.run(main, arguments)
