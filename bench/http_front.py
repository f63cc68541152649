"""What the engine's OpenAI HTTP front costs: latency, time to first chunk and throughput, side by side.

Every contender calls the same simulator (no artificial latency, limits far above the load) through the same
engine, in one run, so the differences compare like with like on a noisy machine:

- latency: N sequential chat requests per contender, interleaved (one request to each contender per round,
  so a slow moment of the machine hits them all alike), after a warm-up that is not counted. Each round
  takes the contenders in a new random order (`turns`): in a fixed order each contender is biased by what
  the one before it leaves the machine doing (two httpx contenders streaming from the same engine, differing
  only in the SDK's headers, were 0.6 ms apart in first-chunk medians in a fixed order, and within 0.1 ms
  of each other in shuffled turns). The official
  ``openai.AsyncOpenAI`` SDK (on its own HTTP stack, ``httpx2``; one client object per contender,
  ``max_retries=0``) to the simulator directly,
  to the engine's HTTP front over its Unix socket and over its loopback TCP port with a client key; the
  msgpack ``AsyncClient``; and a raw ``httpx.AsyncClient`` to the simulator and to the front, which shows
  what the SDK's own work (pydantic models) adds on either side.
- time to first chunk: streamed chat (``stream=True``) against a second simulator that paces its tokens
  (``--per-token-latency-ms``, so the first content chunk leaves well before the last; with no pacing the
  simulator writes a whole stream at once and "first chunk" would mean "whole reply"), with its own engine.
  Measured from the call to the first chunk carrying content. The msgpack ``AsyncClient.stream`` too, when
  the client has it.
- throughput: M requests at concurrency C through the SDK and through raw httpx, to the simulator directly
  (the ceiling of an HTTP server, hypercorn + h11, serving the simulator on this machine) and to the front
  over Unix; and the msgpack ``AsyncClient.map``. The contenders take turns in R rounds of M/R requests
  (the median round is printed). HTTP clients are C/8 clients of 8 connections each (one pool of 64 is slow
  in httpcore itself: bench/httpx_pools.py). The CPU each process spent per request is printed beside each
  figure, and the rate it allows: the three processes share the machine's cores.

    python bench/http_front.py                       # 300 sequential, 300 streams, 4000 at concurrency 64
    python bench/http_front.py --sequential 100 --streams 30 --parallel 1000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import httpx2
import openai
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BENCH_KEY,
    chat_body,
    child_pid,
    cpu_seconds,
    engine_process,
    free_port,
    pct,
    python_speed,
    serving_process,
    simulator_process,
)

from trio_mapper import AsyncClient

ENDPOINT = "/v1/chat/completions"
CLIENT_KEY = "tm-bench-client-key-0123456789abcdef"
#: Connections per HTTP client in the throughput part (see the docstring).
PER_CLIENT = 8
WARM_UP = 30
#: The streaming simulator's pace: the first content chunk leaves one token's pause after the role chunk.
STREAM_PER_TOKEN_MS = 2
STREAM_TOKENS = 16
BARE_RELAY = Path(__file__).resolve().parent / "bare_relay.py"

Call = Callable[[int], Awaitable[Any]]


def body(index: int) -> dict[str, Any]:
    return chat_body(index, words=20, max_tokens=16)


def sdk(base_url: str, *, uds: str | None = None, api_key: str = "unused", connections: int = 1) -> openai.AsyncOpenAI:
    """The SDK on its own HTTP stack (``httpx2``, what this ``openai`` is built on), given a Unix socket or not."""
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = httpx2.AsyncHTTPTransport(uds=uds, limits=limits)
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, http_client=httpx2.AsyncClient(transport=transport)
    )


def raw(base_url: str, *, uds: str | None = None, api_key: str = "unused", connections: int = 1) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = httpx.AsyncHTTPTransport(uds=uds, limits=limits)
    headers = {"Authorization": f"Bearer {api_key}"}
    return httpx.AsyncClient(base_url=base_url, headers=headers, transport=transport, timeout=60)


def sdk_call(client: openai.AsyncOpenAI) -> Call:
    async def call(index: int) -> None:
        completion = await client.chat.completions.create(**body(index))
        assert completion.choices

    return call


def raw_call(client: httpx.AsyncClient) -> Call:
    async def call(index: int) -> None:
        response = await client.post("/chat/completions", json=body(index))
        response.raise_for_status()
        assert response.json()["choices"]

    return call


def msgpack_call(client: AsyncClient) -> Call:
    async def call(index: int) -> None:
        reply = await client.request(ENDPOINT, body(index))
        assert reply["choices"]

    return call


def turns(names: list[str], count: int) -> Iterator[tuple[int, str]]:
    """``count`` rounds of one turn per contender, each round in a new order (the same in every run)."""
    shuffler = random.Random(1)
    order = list(names)
    for index in range(count):
        shuffler.shuffle(order)
        for name in order:
            yield index, name


async def interleaved_latencies(calls: dict[str, Call], count: int) -> dict[str, list[float]]:
    """``count`` rounds of one call to each contender (`turns`); each call's wall time in seconds."""
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for index, name in turns(list(calls), count):
        started = time.perf_counter()
        await calls[name](index)
        latencies[name].append(time.perf_counter() - started)
    return latencies


# -- time to first chunk -----------------------------------------------------------------------------------


def stream_body(index: int) -> dict[str, Any]:
    return {**chat_body(index, words=20, max_tokens=STREAM_TOKENS), "stream": True}


def sdk_stream(client: openai.AsyncOpenAI) -> Callable[[int], Awaitable[tuple[float, float]]]:
    async def call(index: int) -> tuple[float, float]:
        started = time.perf_counter()
        first = None
        chunks = await client.chat.completions.create(**stream_body(index))
        async for chunk in chunks:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("a stream without content")
        return first, time.perf_counter() - started

    return call


def raw_stream(client: httpx.AsyncClient) -> Callable[[int], Awaitable[tuple[float, float]]]:
    """The same stream read by plain httpx: lines, and JSON only until the first content chunk."""

    async def call(index: int) -> tuple[float, float]:
        started = time.perf_counter()
        first = None
        async with client.stream("POST", "/chat/completions", json=stream_body(index)) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("a stream without content")
        return first, time.perf_counter() - started

    return call


def msgpack_stream(client: AsyncClient) -> Callable[[int], Awaitable[tuple[float, float]]]:
    async def call(index: int) -> tuple[float, float]:
        started = time.perf_counter()
        first = None
        request = {key: value for key, value in stream_body(index).items() if key != "stream"}  # stream() sets it
        async with cast(Any, client).stream(ENDPOINT, request) as chunks:  # absent from older clients
            async for chunk in chunks:
                choices = chunk.data.get("choices") if isinstance(chunk.data, dict) else None
                if first is None and choices and choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("a msgpack stream without content")
        return first, time.perf_counter() - started

    return call


async def interleaved_streams(
    calls: dict[str, Callable[[int], Awaitable[tuple[float, float]]]], count: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Per contender (`turns`): times to the first content chunk and to the stream's end, in seconds."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in calls}
    for index, name in turns(list(calls), count):
        first, last = await calls[name](index)
        times[name][0].append(first)
        times[name][1].append(last)
    return times


# -- throughput --------------------------------------------------------------------------------------------


async def drive(calls: list[Call], count: int, concurrency: int) -> float:
    """``count`` calls from ``concurrency`` workers, worker n using ``calls[n % len(calls)]``; requests/s."""
    indices = iter(range(count))

    async def worker(call: Call) -> None:
        for index in indices:
            await call(index)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(worker, calls[n % len(calls)])
    return count / (time.perf_counter() - started)


async def msgpack_map(client: AsyncClient, count: int, window: int) -> float:
    failures = 0
    started = time.perf_counter()
    async for item in client.map((body(i) for i in range(count)), endpoint=ENDPOINT, window=window):
        failures += not item.ok
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} requests failed through the msgpack front")
    return count / elapsed


class Meter:
    """CPU seconds per request of the bench client, the process in the middle (the engine or the bare relay;
    none for direct calls) and the simulator over one measurement."""

    def __init__(self, simulator: int) -> None:
        self.simulator = simulator

    async def measure(
        self, run: Callable[[], Awaitable[float]], count: int, middle: int | None
    ) -> tuple[float, list[float]]:
        def used() -> list[float]:  # this process's own CPU, then the others' (0 for no process in the middle)
            return [cpu_seconds(), cpu_seconds(middle) if middle is not None else 0.0, cpu_seconds(self.simulator)]

        before = used()
        rate = await run()
        return rate, [(b - a) / count for a, b in zip(before, used(), strict=True)]


@asynccontextmanager
async def bare_relay_process(upstream: str, connections: int) -> AsyncIterator[str]:
    """`bench/bare_relay.py` in its own process; yields its Unix socket's path once it accepts."""
    socket = os.path.join(tempfile.mkdtemp(prefix="tmb-relay-", dir="/tmp"), "relay.sock")
    command = [sys.executable, str(BARE_RELAY), "--socket", socket, "--upstream", upstream,
               "--connections", str(connections)]  # fmt: skip
    async with serving_process(command, socket, stop_timeout=10):
        yield socket


# -- the run -----------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    limits = ["--rpm", "100000000", "--tpm", "10000000000"]
    simulator_flags = [*limits, "--latency-ms", "0", "--per-token-latency-ms", "0", "--seed", "1"]
    stream_flags = [*limits, "--latency-ms", "0", "--per-token-latency-ms", str(STREAM_PER_TOKEN_MS), "--seed", "2"]
    engine_flags = [*limits, "--max_concurrent_reqs", str(args.concurrency)]
    directory = Path(tempfile.mkdtemp(prefix="tmb-http-", dir="/tmp"))
    keys = directory / "keys.toml"
    keys.write_text(f'[keys]\nbench = "{CLIENT_KEY}"\n')
    keys.chmod(0o600)
    port = free_port()
    tcp_flags = ["--http", f"127.0.0.1:{port}", "--http-keys-file", str(keys)]
    front = "http://engine/v1"  # over the Unix socket the host is nominal
    tcp_front = f"http://127.0.0.1:{port}/v1"
    has_stream = hasattr(AsyncClient, "stream")

    async with (
        simulator_process(*simulator_flags) as url,
        engine_process(url, *engine_flags, *tcp_flags) as socket,
        bare_relay_process(url, args.concurrency) as relay_socket,
    ):
        http_socket = str(socket) + ".http"
        engine, relay = child_pid(str(socket)), child_pid(relay_socket)
        meter = Meter(simulator=child_pid("simulate"))

        # -- latency --
        sdk_direct = sdk(url, api_key=BENCH_KEY)
        sdk_unix = sdk(front, uds=http_socket)
        sdk_tcp = sdk(tcp_front, api_key=CLIENT_KEY)
        raw_direct = raw(url, api_key=BENCH_KEY)
        raw_unix = raw(front, uds=http_socket)
        sdk_relay = sdk(front, uds=relay_socket)
        raw_relay = raw(front, uds=relay_socket)
        async with AsyncClient(socket) as msgpack:
            calls = {
                "(a) SDK -> simulator": sdk_call(sdk_direct),
                "(b) SDK -> front, unix": sdk_call(sdk_unix),
                "(c) SDK -> front, tcp+key": sdk_call(sdk_tcp),
                "(d) msgpack AsyncClient": msgpack_call(msgpack),
                "(e) httpx -> simulator": raw_call(raw_direct),
                "(f) httpx -> front, unix": raw_call(raw_unix),
                "(g) SDK -> bare relay": sdk_call(sdk_relay),
                "(h) httpx -> bare relay": raw_call(raw_relay),
            }
            await interleaved_latencies(calls, WARM_UP)
            latency = await interleaved_latencies(calls, args.sequential)
        for client in (sdk_direct, sdk_unix, sdk_tcp, sdk_relay):
            await client.close()
        for raw_client in (raw_direct, raw_unix, raw_relay):
            await raw_client.aclose()

        # -- throughput --
        clients = max(1, args.concurrency // PER_CLIENT)
        sdks_direct = [sdk(url, api_key=BENCH_KEY, connections=PER_CLIENT) for _ in range(clients)]
        sdks_unix = [sdk(front, uds=http_socket, connections=PER_CLIENT) for _ in range(clients)]
        raws_direct = [raw(url, api_key=BENCH_KEY, connections=PER_CLIENT) for _ in range(clients)]
        raws_unix = [raw(front, uds=http_socket, connections=PER_CLIENT) for _ in range(clients)]
        sdks_relay = [sdk(front, uds=relay_socket, connections=PER_CLIENT) for _ in range(clients)]
        raws_relay = [raw(front, uds=relay_socket, connections=PER_CLIENT) for _ in range(clients)]
        async with AsyncClient(socket) as msgpack:
            # Each contender, and the process between it and the simulator (none for direct calls).
            def driving(calls: list[Call]) -> Callable[[int], Awaitable[float]]:
                return lambda n: drive(calls, n, args.concurrency)

            contenders: dict[str, tuple[Callable[[int], Awaitable[float]], int | None]] = {
                "SDK -> simulator": (driving([sdk_call(c) for c in sdks_direct]), None),
                "SDK -> front, unix": (driving([sdk_call(c) for c in sdks_unix]), engine),
                "SDK -> bare relay": (driving([sdk_call(c) for c in sdks_relay]), relay),
                "httpx -> simulator": (driving([raw_call(c) for c in raws_direct]), None),
                "httpx -> front, unix": (driving([raw_call(c) for c in raws_unix]), engine),
                "httpx -> bare relay": (driving([raw_call(c) for c in raws_relay]), relay),
                "msgpack AsyncClient.map": (lambda n: msgpack_map(msgpack, n, args.concurrency), engine),
            }
            for run, _ in contenders.values():
                await run(args.concurrency * 4)  # opens every connection; not counted
            # In rounds, each contender in turn: a burst of other work on the machine hits them all alike.
            per_round = max(1, args.parallel // args.rounds)
            rates: dict[str, list[float]] = {name: [] for name in contenders}
            cpu: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in contenders}
            for _ in range(args.rounds):
                for name, (run, middle) in contenders.items():
                    rate, used = await meter.measure(partial(run, per_round), per_round, middle)
                    rates[name].append(rate)
                    cpu[name] = [total + value / args.rounds for total, value in zip(cpu[name], used, strict=True)]
            throughput = {name: (statistics.median(rates[name]), cpu[name]) for name in contenders}
        for client in (*sdks_direct, *sdks_unix, *sdks_relay):
            await client.close()
        for raw_client in (*raws_direct, *raws_unix, *raws_relay):
            await raw_client.aclose()

        # -- time to first chunk: a simulator that paces its tokens, and an engine in front of it --
        async with (
            simulator_process(*stream_flags) as paced,
            engine_process(paced, *engine_flags) as paced_socket,
            bare_relay_process(paced, args.concurrency) as paced_relay,
        ):
            stream_direct = sdk(paced, api_key=BENCH_KEY)
            stream_unix = sdk(front, uds=str(paced_socket) + ".http")
            stream_relay = sdk(front, uds=paced_relay)
            raw_stream_direct = raw(paced, api_key=BENCH_KEY)
            raw_stream_unix = raw(front, uds=str(paced_socket) + ".http")
            raw_stream_relay = raw(front, uds=paced_relay)
            async with AsyncClient(paced_socket) as msgpack:
                streams = {
                    "SDK -> simulator": sdk_stream(stream_direct),
                    "SDK -> front, unix": sdk_stream(stream_unix),
                    "SDK -> bare relay": sdk_stream(stream_relay),
                    "httpx -> simulator": raw_stream(raw_stream_direct),
                    "httpx -> front, unix": raw_stream(raw_stream_unix),
                    "httpx -> bare relay": raw_stream(raw_stream_relay),
                }
                if has_stream:
                    streams["msgpack AsyncClient.stream"] = msgpack_stream(msgpack)
                await interleaved_streams(streams, WARM_UP // 3)
                first_chunk = await interleaved_streams(streams, args.streams)
            for client in (stream_direct, stream_unix, stream_relay):
                await client.close()
            for raw_client in (raw_stream_direct, raw_stream_unix, raw_stream_relay):
                await raw_client.aclose()

    report(args, latency, first_chunk, throughput, has_stream)


def bound(cpu: list[float]) -> float:
    """The most requests/s this machine's CPUs allow for a path: each process runs one event loop (one core at
    most), and the three share ``os.cpu_count()`` cores."""
    return min(1 / max(cpu), (os.cpu_count() or 1) / sum(cpu))


def ms(seconds: float) -> str:
    return f"{1000 * seconds:>8.2f}"


def report(
    args: argparse.Namespace,
    latency: dict[str, list[float]],
    first_chunk: dict[str, tuple[list[float], list[float]]],
    throughput: dict[str, tuple[float, list[float]]],
    has_stream: bool,
) -> None:
    names = list(latency)
    print(f"this machine: {python_speed():.2f} s for 10 million turns of a Python loop (bench/common.py)\n")
    print(f"latency, {args.sequential} sequential chat requests per contender, interleaved in shuffled turns (ms)")
    print(f"{'':>28} {'p50':>8} {'p99':>8}")
    for name, values in latency.items():
        print(f"{name:>28} {ms(pct(values, 50))} {ms(pct(values, 99))}")
    print(f"{'added':>28} {'p50':>8} {'p99':>8}   (goal for the front vs (a): p50 <= 2, p99 <= 6)")
    for this, base in ((1, 0), (2, 0), (1, 3), (2, 3), (5, 4), (1, 5), (6, 0), (1, 6), (5, 7)):
        a, b = latency[names[this]], latency[names[base]]
        label = f"{names[this][:3]} vs {names[base][:3]}"
        print(f"{label:>28} {ms(pct(a, 50) - pct(b, 50))} {ms(pct(a, 99) - pct(b, 99))}")
    print()

    print(
        f"time to first content chunk, {args.streams} streamed chats per contender, in shuffled turns (ms; simulator "
        f"paced at {STREAM_PER_TOKEN_MS} ms/token, {STREAM_TOKENS} tokens)"
    )
    print(f"{'':>28} {'first p50':>9} {'first p99':>9} {'end p50':>8}")
    for name, (first, last) in first_chunk.items():
        print(f"{name:>28} {ms(pct(first, 50)):>9} {ms(pct(first, 99)):>9} {ms(pct(last, 50))}")
    if not has_stream:
        print(f"{'msgpack AsyncClient.stream':>28}   (not in this trio_mapper: AsyncClient has no stream)")
    print(f"{'added to the first chunk':>28} {'p50':>9} {'p99':>9}   (goal for the front vs direct: <= 2 ms)")
    pairs = [("SDK -> front, unix", "SDK -> simulator", "SDK: front vs direct"),
             ("httpx -> front, unix", "httpx -> simulator", "httpx: front vs direct"),
             ("SDK -> bare relay", "SDK -> simulator", "SDK: bare relay vs direct"),
             ("SDK -> front, unix", "SDK -> bare relay", "SDK: front vs bare relay"),
             ("httpx -> front, unix", "httpx -> bare relay", "httpx: front vs bare relay")]  # fmt: skip
    if has_stream:
        pairs.append(("msgpack AsyncClient.stream", "httpx -> simulator", "msgpack vs httpx direct"))
    for contender, baseline, label in pairs:
        a, b = first_chunk[contender][0], first_chunk[baseline][0]
        print(f"{label:>28} {ms(pct(a, 50) - pct(b, 50)):>9} {ms(pct(a, 99) - pct(b, 99)):>9}")
    print()

    clients = max(1, args.concurrency // PER_CLIENT)
    print(
        f"throughput, {args.parallel} chat requests at concurrency {args.concurrency} per contender, in {args.rounds} "
        f"interleaved rounds (requests/s: median round; HTTP clients: {clients} x {PER_CLIENT} connections)"
    )
    header = f"{'CPU ms/request: client':>22} {'middle':>6} {'simulator':>9}   {'bound':>5} {'of it':>5}"
    print(f"{'':>28} {'req/s':>8}   {header}")
    for name, (rate, cpu) in throughput.items():
        client, engine, simulator = (f"{1000 * value:.2f}" for value in cpu)
        limit = bound(cpu)
        print(f"{name:>28} {rate:>8.0f}   {client:>22} {engine:>6} {simulator:>9}   {limit:>5.0f} {rate / limit:>5.0%}")
    print(f"{'':>28} (middle: the engine, or the bare relay; bound: requests/s the CPU allows, "
          f"min(1 / busiest process, {os.cpu_count()} cores / all three))")  # fmt: skip
    rates = {name: value for name, (value, _) in throughput.items()}
    print(f"{'front / bare relay, SDK':>28} {rates['SDK -> front, unix'] / rates['SDK -> bare relay']:>8.2f}"
          "   (goal: >= 0.80, or >= 600 req/s)")  # fmt: skip
    print(f"{'front / bare relay, httpx':>28} {rates['httpx -> front, unix'] / rates['httpx -> bare relay']:>8.2f}")
    print(f"{'front / direct, SDK':>28} {rates['SDK -> front, unix'] / rates['SDK -> simulator']:>8.2f}")
    print(f"{'front / direct, httpx':>28} {rates['httpx -> front, unix'] / rates['httpx -> simulator']:>8.2f}")
    print(f"{'front SDK / msgpack':>28} {rates['SDK -> front, unix'] / rates['msgpack AsyncClient.map']:>8.2f}")
    print(f"{'front httpx / msgpack':>28} {rates['httpx -> front, unix'] / rates['msgpack AsyncClient.map']:>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=300, help="requests per contender, latency part")
    parser.add_argument("--streams", type=int, default=300, help="streams per contender, first-chunk part")
    parser.add_argument("--parallel", type=int, default=4000, help="requests per contender, throughput part")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="throughput: contenders take turns, --parallel split")
    trio.run(main, parser.parse_args())
