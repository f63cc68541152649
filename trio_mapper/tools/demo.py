"""``trio-mapper demo``: the whole system on one machine, with no API key and no network.

It starts the simulator and an engine as subprocesses (each on its own core, as in real use), sends a batch of
generated chat requests through the async client helper with a progress bar while a few official ``openai`` SDK
clients use the engine's HTTP front at the same time, and prints what happened: every request answered, the
throughput achieved against the limits, and the 429s and faults the engine absorbed.
The limits are derived from ``--seconds`` so the run takes about that long whatever ``--requests`` is, and the
simulator enforces them per second (``--quantum 1``, like OpenAI's quantized limits), so a burst is punished
at once rather than at the end of a minute.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, Final

import attrs
import httpx
import trio

from trio_mapper.simulator.content import WORDS
from trio_mapper.text import escape_control_characters

#: Any non-empty key works on the simulator; this one says what it is in case it ever shows up somewhere.
DEMO_KEY: Final = "sk-demo-not-a-real-key-000000000000000000"
MODEL: Final = "gpt-4o-mini"
ENDPOINT: Final = "/v1/chat/completions"
#: Fixed so two runs send the same requests (and draw the same faults): the figures are comparable.
SEED: Final = 20240601
#: A little flakiness so the engine's backoff retries show; six attempts make a lost request ~1e-11.
FAIL_RATE: Final = 0.03
#: Per-second enforcement: the simulator's buckets hold one second of budget, like a quantized real limit.
QUANTUM: Final = 1.0
#: How far above the average request rate the RPM limit sits: TPM binds most of the time, RPM in runs of
#: short requests, so both limits do some work.
RPM_HEADROOM: Final = 1.25
#: Prompts from 10 to 300 words (one token each) and replies capped at 16 to 64 tokens: a mix of small and
#: large costs, so the budget cannot be spent by counting requests.
PROMPT_WORDS: Final = (10, 300)
MAX_TOKENS: Final = (16, 64)
#: Chat accounting adds about this much per single-message request (message framing + reply priming).
CHAT_OVERHEAD_TOKENS: Final = 8
#: Another program spending the same key directly (a cron job, a colleague's notebook) takes this share of the
#: TPM budget during the middle third of the batch. The engine cannot know about it until the upstream answers
#: 429, which is the point: the engine's own pacing leaves the upstream almost nothing to refuse, so without a
#: neighbour the demo would show (nearly) no 429s to absorb.
NEIGHBOUR_SHARE: Final = 0.3
NEIGHBOUR_WINDOW: Final = (0.3, 0.65)
#: The neighbour's requests cost about this much (bounded by a quarter of the per-second bucket).
NEIGHBOUR_COST: Final = 250
#: Programs of the user's own, written against the official SDK (a notebook, a web service), sharing the engine
#: with the batch: each sends one small chat request at a time, starting one at most every `SDK_INTERVAL` s.
SDK_CLIENTS: Final = 2
SDK_INTERVAL: Final = 1.0
SDK_PROMPT_WORDS: Final = (10, 60)
SDK_MAX_TOKENS: Final = (16, 32)
#: "SDK client N, request M:" in tokens, for the budget the plan keeps for the SDK clients.
SDK_LABEL_TOKENS: Final = 8
#: Once the batch is done, an SDK request still unanswered after this long is withdrawn, and counted lost: in
#: a healthy run the engine's queue is empty by then, so waiting longer would only hide a hang.
SDK_DRAIN_TIMEOUT: Final = 10.0
SDK_SKIPPED: Final = "sdk clients skipped: the openai package is not installed (pip install openai)"
#: The simulator loads a tokenizer and the engine its encodings before listening: slow on a cold cache.
STARTUP_TIMEOUT: Final = 60.0
#: SIGTERM first (both exit cleanly and the engine removes its socket), SIGKILL if they take longer.
STOP_TIMEOUT: Final = 10.0
#: The engine gets this long to finish in-flight requests on SIGTERM; the demo only stops it when done.
ENGINE_GRACE: Final = 2.0
#: Lines of each log printed when something goes wrong.
LOG_TAIL_LINES: Final = 25
#: How often the progress bar refreshes the engine's 429 and retry counters.
STATS_INTERVAL: Final = 0.5
#: Unix socket paths are limited to 107 bytes; a long $TMPDIR would not fit.
_MAX_SOCKET_PATH: Final = 100
_LISTENING: Final = re.compile(r"simulator listening on (http://\S+)")
# Settings the engine would otherwise take from the user's environment and that would change the demo.
_ENGINE_ENV_PREFIXES: Final = ("TRIO_MAPPER_", "OPENAI_")


class DemoError(Exception):
    """The demo could not run to its end; the message says why (logs are printed separately)."""


@attrs.frozen
class Plan:
    """What the run sends and the limits it runs under."""

    bodies: list[dict[str, Any]]
    rpm: int
    tpm: int
    concurrency: int
    #: The upstream's cost of the whole batch (prompt + max_tokens, as it charges at admission).
    planned_tokens: int
    sdk_clients: int = 0

    @property
    def expected_seconds(self) -> float:
        """How long the limits make the batch take, ignoring the first second's burst.

        The SDK clients' share of the budget is not the batch's; when they would take (nearly) all of it, the
        engine's fairness still leaves the batch some, so a tenth is assumed rather than none.
        """
        sdk_tokens, sdk_requests = _sdk_load(self.sdk_clients)
        tokens_per_second = max(self.tpm / 60 - sdk_tokens, self.tpm / 600)
        requests_per_second = max(self.rpm / 60 - sdk_requests, self.rpm / 600)
        return max(self.planned_tokens / tokens_per_second, len(self.bodies) / requests_per_second)


def _sdk_load(clients: int) -> tuple[float, float]:
    """About how many tokens and requests per second the SDK clients send, as the upstream charges them."""
    words, max_tokens = (sum(bounds) / 2 for bounds in (SDK_PROMPT_WORDS, SDK_MAX_TOKENS))
    cost = words + CHAT_OVERHEAD_TOKENS + SDK_LABEL_TOKENS + max_tokens
    return clients * cost / SDK_INTERVAL, clients / SDK_INTERVAL


@attrs.define
class Outcome:
    """What the batch produced, as counted by the demo itself."""

    succeeded: int = 0
    failed: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    #: The first message seen for each kind of error, to say why requests were lost.
    messages: dict[str, str] = attrs.field(factory=dict)
    wall: float = 0.0
    #: From the batch's start until the last request through the engine (the batch's or an SDK client's) was
    #: answered: the time the engine's throughput is measured over. 0 means `wall`.
    span: float = 0.0


@attrs.define
class SdkClients:
    """What the official-SDK clients sent through the engine's HTTP front."""

    clients: int
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    messages: dict[str, str] = attrs.field(factory=dict)
    #: Seconds each successful request took, as its client saw it (queue, upstream and retries included).
    waits: list[float] = attrs.field(factory=list)

    @property
    def withdrawn(self) -> int:
        """Requests still unanswered `SDK_DRAIN_TIMEOUT` after the batch ended, given up on."""
        return self.sent - self.succeeded - self.failed

    @property
    def lost(self) -> int:
        return self.sent - self.succeeded

    def count_error(self, kind: str, message: str) -> None:
        self.failed += 1
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.messages.setdefault(kind, message)


def lost_count(plan: Plan, outcome: Outcome, sdk: SdkClients | None) -> int:
    """Work that did not get its answer: the batch's requests that did not succeed, and the SDK clients'."""
    return len(plan.bodies) - outcome.succeeded + (sdk.lost if sdk is not None else 0)


@attrs.define
class Neighbour:
    """What the neighbour sent straight to the upstream, bypassing the engine."""

    sent: int = 0
    admitted: int = 0
    rate_limited: int = 0
    failed: int = 0
    #: What the upstream charged it (prompt + max_tokens of each admitted request).
    tokens: int = 0


def _prompt(rng: random.Random, words: tuple[int, int], max_tokens: tuple[int, int]) -> tuple[str, int, int]:
    """A prompt of random words, its length in words, and a random reply cap."""
    count = rng.randint(*words)
    cap = rng.randint(*max_tokens)
    # Each of the simulator's reply words is one token with a leading space, so the cost is easy to predict.
    return " ".join(rng.choice(WORDS) for _ in range(count)), count, cap


def _chat_body(rng: random.Random, index: int) -> tuple[dict[str, Any], int]:
    """One request and its approximate upstream cost in tokens."""
    text, words, max_tokens = _prompt(rng, PROMPT_WORDS, MAX_TOKENS)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Request {index}: {text}"}],
        "max_tokens": max_tokens,
    }
    return body, words + CHAT_OVERHEAD_TOKENS + 3 + max_tokens  # +3: "Request N:"


def make_plan(
    requests: int, seconds: float, rpm: int | None, tpm: int | None, concurrency: int | None, sdk_clients: int = 0
) -> Plan:
    """Generate the requests and choose limits that make them, with the SDK clients', take about ``seconds``."""
    rng = random.Random(SEED)
    bodies: list[dict[str, Any]] = []
    planned = 0
    for index in range(requests):
        body, cost = _chat_body(rng, index)
        bodies.append(body)
        planned += cost
    # The SDK clients share the budget for the whole batch: the limits make room for them, so that the batch
    # still takes about `seconds` and the run stays as long as the user asked.
    sdk_tokens, sdk_requests = _sdk_load(sdk_clients)
    # The bucket starts full (one second of budget) and that second is free, hence the +1.
    if tpm is None:
        tpm = max(1, math.ceil((planned + sdk_tokens * seconds) * 60 / (seconds + 1)))
    if rpm is None:
        rpm = max(1, math.ceil((requests + sdk_requests * seconds) * 60 / (seconds + 1) * RPM_HEADROOM))
    if concurrency is None:
        # Replies take ~0.05-0.2 s on the simulator: a few per second of RPM budget keeps the pipe full.
        concurrency = max(4, min(64, math.ceil(rpm / 60)))
    return Plan(
        bodies=bodies, rpm=rpm, tpm=tpm, concurrency=concurrency, planned_tokens=planned, sdk_clients=sdk_clients
    )


# --- subprocesses -------------------------------------------------------------------------------------------


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENGINE_ENV_PREFIXES)}
    # The children run in the temp dir (so no ./.env there can change the engine's settings); make sure they
    # import this same trio_mapper even when it is not installed: the directory that holds the package.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@attrs.define
class Child:
    """A subprocess and its log file."""

    name: str
    process: trio.Process
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc.strerror})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise DemoError(f"the {self.name} exited with status {self.process.returncode}")


async def _stop(child: Child) -> None:
    """SIGTERM, then SIGKILL after `STOP_TIMEOUT`; always reaps. Shielded: runs on the way out of a cancel."""
    with trio.CancelScope(shield=True):
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await child.process.wait()
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
        child.log.close()


@asynccontextmanager
async def _child(name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> AsyncIterator[Child]:
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_mapper", *argv],
            # The children never read stdin; /dev/null keeps them off the terminal.
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=workdir,
            env=env,
        )
    except BaseException:
        log.close()
        raise
    child = Child(name, process, log_path, log)
    try:
        yield child
    finally:
        await _stop(child)


async def _wait_for_simulator(child: Child) -> str:
    with trio.fail_after(STARTUP_TIMEOUT):
        while True:
            child.check_alive()
            match = _LISTENING.search(child.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            await trio.sleep(0.05)


async def _wait_for_engine(child: Child, *sockets: Path) -> None:
    with trio.fail_after(STARTUP_TIMEOUT):
        for socket in sockets:
            while True:
                child.check_alive()
                try:
                    stream = await trio.open_unix_socket(str(socket))
                except OSError:
                    await trio.sleep(0.05)
                else:
                    await stream.aclose()
                    break


async def _simulator_stats(base_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(base_url.removesuffix("/v1") + "/_simulator/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


async def _neighbour(base_url: str, plan: Plan, tally: Neighbour) -> None:
    """Spend `NEIGHBOUR_SHARE` of the TPM budget for a while, naively: no pacing, no retries."""
    cost = max(16, min(NEIGHBOUR_COST, plan.tpm // 60 // 4))
    words = max(1, cost // 8)
    max_tokens = max(1, cost - words - CHAT_OVERHEAD_TOKENS)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": " ".join(WORDS[i % len(WORDS)] for i in range(words))}],
        "max_tokens": max_tokens,
    }
    interval = cost / (NEIGHBOUR_SHARE * plan.tpm / 60)
    start, end = (fraction * plan.expected_seconds for fraction in NEIGHBOUR_WINDOW)

    async def send_one(http: httpx.AsyncClient) -> None:
        tally.sent += 1
        try:
            response = await http.post(base_url + ENDPOINT.removeprefix("/v1"), json=body)
        except httpx.HTTPError:
            tally.failed += 1
            return
        if response.status_code == 429:
            tally.rate_limited += 1
            return
        # Anything past admission was charged, 500s included, as on the real API.
        tally.admitted += 1
        try:
            usage = response.json().get("usage") if response.status_code == 200 else None
        except ValueError:  # not JSON: count the estimate rather than crash the demo over the neighbour
            usage = None
        prompt = int(usage["prompt_tokens"]) if usage else words + CHAT_OVERHEAD_TOKENS
        tally.tokens += prompt + max_tokens
        if response.status_code != 200:
            tally.failed += 1

    await trio.sleep(start)
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http, trio.open_nursery() as nursery:
        stop_at = trio.current_time() + (end - start)
        while trio.current_time() < stop_at:
            nursery.start_soon(send_one, http)
            await trio.sleep(interval)


async def _sdk_client(http_socket: Path, index: int, tally: SdkClients, batch_done: trio.Event) -> None:
    """Chat through the engine's HTTP front with the official SDK, as the user's own code would, until the batch
    is done: one request at a time, at most one every `SDK_INTERVAL` seconds."""
    import openai

    rng = random.Random(SEED + 1 + index)
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(http_socket))) as http:
        # The openai releases built on httpx2 type `http_client` as theirs but take an httpx client as well (the
        # one the README shows); earlier releases type it as httpx's.
        http_client: Any = http
        # The host is nominal over a Unix socket, and the key unused: who may open the socket may use the engine.
        # No SDK retries, so that anything the engine did not absorb shows as a failure.
        client = openai.AsyncOpenAI(
            base_url="http://engine/v1", api_key="unused", http_client=http_client, max_retries=0
        )
        next_start = trio.current_time()
        number = 0
        while not batch_done.is_set():
            text, _, max_tokens = _prompt(rng, SDK_PROMPT_WORDS, SDK_MAX_TOKENS)
            tally.sent += 1
            started = trio.current_time()
            try:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"SDK client {index + 1}, request {number}: {text}"}],
                    max_tokens=max_tokens,
                )
            except openai.APIError as exc:
                response = getattr(exc, "response", None)
                kind = (response.headers.get("x-trio-mapper-error") if response is not None else None) or (
                    exc.code or type(exc).__name__
                )
                tally.count_error(str(kind), str(exc))
            else:
                tally.succeeded += 1
                tally.waits.append(trio.current_time() - started)
            number += 1
            next_start = max(next_start + SDK_INTERVAL, trio.current_time())
            with trio.move_on_at(next_start):
                await batch_done.wait()


# --- the batch ----------------------------------------------------------------------------------------------


async def _run_batch(
    socket: Path, plan: Plan, console: Any, neighbour: tuple[str, Neighbour] | None, sdk: SdkClients | None
) -> tuple[Outcome, dict[str, Any]]:
    """Send every request through the engine with a progress bar, while the SDK clients (if any) use its HTTP
    front; returns the outcome and the engine's stats."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from trio_mapper.client.aio import AsyncClient

    outcome = Outcome()
    progress = Progress(
        TextColumn("[bold]requests"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[counters]}"),
        console=console,
    )
    async with AsyncClient(socket, client_name="trio-mapper demo") as client:
        task = progress.add_task("requests", total=len(plan.bodies), counters="")

        async def show_counters() -> None:
            # The engine's own counters, so the bar shows 429s being absorbed while they happen.
            while True:
                lane = (await client.stats())["lanes"].get(MODEL, {})
                progress.update(
                    task,
                    counters=f"in flight {lane.get('in_flight', 0):>2}  queued {lane.get('queued', 0):>3}  "
                    f"429s absorbed {lane.get('upstream_429s', 0)}  retries {lane.get('retries', 0)}"
                    + (f"  SDK answered {sdk.succeeded + sdk.failed}" if sdk is not None else ""),
                )
                await trio.sleep(STATS_INTERVAL)

        with progress:
            started = time.monotonic()
            batch_done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(show_counters)
                if neighbour is not None:
                    nursery.start_soon(_neighbour, neighbour[0], plan, neighbour[1])
                async with trio.open_nursery() as sdk_nursery:
                    if sdk is not None:
                        for index in range(sdk.clients):
                            sdk_nursery.start_soon(_sdk_client, _http_socket(socket), index, sdk, batch_done)
                    # A window of twice the concurrency keeps the engine's queue fed without queueing everything.
                    async with client.map(plan.bodies, endpoint=ENDPOINT, window=2 * plan.concurrency) as results:
                        async for item in results:
                            if item.ok:
                                outcome.succeeded += 1
                            else:
                                outcome.failed += 1
                                kind = getattr(item.error, "kind", type(item.error).__name__)
                                outcome.errors[str(kind)] = outcome.errors.get(str(kind), 0) + 1
                                outcome.messages.setdefault(str(kind), str(item.error))
                            progress.advance(task)
                    outcome.wall = time.monotonic() - started
                    # The SDK clients send nothing new; the requests they have in flight get their answers, which
                    # the queue, empty now, gives at once, or are withdrawn after the drain timeout.
                    batch_done.set()
                    sdk_nursery.cancel_scope.deadline = trio.current_time() + SDK_DRAIN_TIMEOUT
                outcome.span = time.monotonic() - started
                nursery.cancel_scope.cancel()
            # One last refresh so the bar's counters match the summary.
            lane = (await client.stats())["lanes"].get(MODEL, {})
            progress.update(
                task,
                counters=f"429s absorbed {lane.get('upstream_429s', 0)}  retries {lane.get('retries', 0)}"
                + (f"  SDK answered {sdk.succeeded + sdk.failed}" if sdk is not None else ""),
            )
        return outcome, await client.stats()


def _http_socket(socket: Path) -> Path:
    """Where the engine serves the OpenAI HTTP API by default: beside its msgpack socket."""
    return socket.with_name(socket.name + ".http")


# --- the report ---------------------------------------------------------------------------------------------


def _percent(value: float, limit: float) -> str:
    return f"{100 * value / limit:.0f}%" if limit > 0 else "-"


def _errors(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(errors.items()))


def render_summary(
    plan: Plan,
    outcome: Outcome,
    engine: dict[str, Any],
    simulator: dict[str, Any],
    neighbour: Neighbour | None,
    sdk: SdkClients | None = None,
) -> list[str]:
    """The summary lines; plain text so they read the same in a terminal, a log or a test."""
    other = neighbour or Neighbour()
    total = len(plan.bodies)
    lost = lost_count(plan, outcome, sdk)
    lane: dict[str, Any] = engine.get("lanes", {}).get(MODEL, {})
    limited = simulator.get("rate_limited", {})
    upstream_429s = int(limited.get("requests", 0)) + int(limited.get("tokens", 0))
    server_errors = sum(int(n) for n in simulator.get("server_errors", {}).values())
    # Over the time anything went through the engine, SDK requests answered after the batch's end included.
    span = max(outcome.span, outcome.wall)
    minutes = span / 60 if span > 0 else math.inf
    # The upstream counts everyone who uses the key, so what went through the engine is everything but what
    # the neighbour was charged itself: the batch's requests and the SDK clients'.
    charged = int(simulator.get("tokens_charged", 0))
    engine_tpm, total_tpm = (charged - other.tokens) / minutes, charged / minutes
    admitted = int(simulator.get("admitted", 0))
    engine_rpm, total_rpm = (admitted - other.admitted) / minutes, admitted / minutes
    to_engine = upstream_429s - other.rate_limited
    absorbed = int(lane.get("upstream_429s", 0))
    lines = [f"requests        {total}", f"succeeded       {outcome.succeeded}"]
    why = [_errors(outcome.errors)] if outcome.errors else []
    via = "via the engine"
    if sdk is not None:
        median = f" (median wait {statistics.median(sdk.waits):.1f} s)" if sdk.waits else ""
        withdrawn = f", {sdk.withdrawn} withdrawn unanswered after the batch" if sdk.withdrawn else ""
        lines.append(
            f"sdk clients     {sdk.clients} official openai SDK clients over the HTTP front: {sdk.sent} requests, "
            f"{sdk.succeeded} succeeded, {sdk.failed} failed{withdrawn}{median}"
        )
        sdk_errors = {**sdk.errors, **({"withdrawn": sdk.withdrawn} if sdk.withdrawn else {})}
        why += [f"SDK clients: {_errors(sdk_errors)}"] if sdk_errors else []
        via = "via the engine (batch and SDK clients)"
    lines += [
        f"lost            {lost}" + (f"  ({'; '.join(why)})" if lost and why else ""),
        # The upstream charges prompt + max_tokens at admission, so that is what the TPM limit is about.
        f"tokens/min      {engine_tpm:,.0f} {via}: {_percent(engine_tpm, plan.tpm)} of the "
        f"{plan.tpm:,} TPM limit (prompt + max_tokens, as the upstream charges)",
        f"requests/min    {engine_rpm:,.0f} {via}: {_percent(engine_rpm, plan.rpm)} of the {plan.rpm:,} RPM limit",
    ]
    if neighbour is not None:
        lines.append(
            f"neighbour       {other.sent} requests around the engine on the same key: {other.admitted} admitted, "
            f"{other.rate_limited} refused with 429 (it does not retry); everyone together: "
            f"{_percent(total_tpm, plan.tpm)} of TPM, {_percent(total_rpm, plan.rpm)} of RPM"
        )
    lines += [
        f"429s            {upstream_429s} sent by the upstream: {to_engine} to the engine, "
        + (f"all {absorbed} absorbed" if absorbed == to_engine and absorbed else f"{absorbed} absorbed by it")
        + (f"; {other.rate_limited} to the neighbour" if neighbour is not None else ""),
        f"server errors   {server_errors} injected by the simulator (--fail-rate {FAIL_RATE})",
        # The client helper never retries, and the SDK clients are told not to (max_retries=0).
        f"retries         {lane.get('retries', 0)} made by the engine, none by the client"
        + ("s" if sdk is not None else ""),
        f"wall time       {outcome.wall:.1f} s for the batch",
    ]
    return lines


# --- the command --------------------------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from trio_mapper.tools.args import positive_float, positive_int

    parser.add_argument("--requests", type=positive_int, default=300, metavar="N", help="requests to send (300)")
    parser.add_argument(
        "--seconds",
        type=positive_float,
        default=20.0,
        metavar="S",
        help="about how long the batch should take; sets the limits unless --rpm/--tpm are given (20)",
    )
    parser.add_argument("--rpm", type=positive_int, metavar="N", help="requests per minute (default: from --seconds)")
    parser.add_argument("--tpm", type=positive_int, metavar="N", help="tokens per minute (default: from --seconds)")
    parser.add_argument(
        "--max-concurrent-reqs",
        "--max_concurrent_reqs",
        dest="max_concurrent_reqs",
        type=positive_int,
        metavar="N",
        help="the engine's upstream concurrency (default: from the limits)",
    )
    parser.add_argument(
        "--no-neighbour",
        action="store_true",
        help="leave out the other program that spends the same key around the engine (then 429s are rare)",
    )
    parser.add_argument(
        "--sdk-clients",
        type=_non_negative_int,
        default=SDK_CLIENTS,
        metavar="N",
        help=f"official openai SDK clients using the engine's HTTP front during the batch; 0 for none ({SDK_CLIENTS})",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the temporary directory with the simulator's and engine's logs"
    )


def _make_workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="trio-mapper-demo-"))
    if len(str(workdir / "engine.sock")) > _MAX_SOCKET_PATH:
        workdir.rmdir()
        workdir = Path(tempfile.mkdtemp(prefix="trio-mapper-demo-", dir="/tmp"))
    return workdir


#: What a run produced: the batch's outcome, the SDK clients' tally (None when there were none), the summary.
Result = tuple[Outcome, SdkClients | None, list[str]]


async def _demo(plan: Plan, workdir: Path, console: Any, children: list[Child], with_neighbour: bool) -> Result:
    socket = workdir / "engine.sock"
    http_socket = _http_socket(socket)
    env = _child_env({})
    simulate = ["simulate", "--port", "0", "--rpm", str(plan.rpm), "--tpm", str(plan.tpm),
                "--quantum", str(QUANTUM), "--fail-rate", str(FAIL_RATE), "--seed", str(SEED)]  # fmt: skip
    async with _child("simulator", simulate, workdir, env) as simulator:
        children.append(simulator)
        started = time.monotonic()
        base_url = await _wait_for_simulator(simulator)
        engine_argv = ["launch-engine", "--socket", str(socket), "--base-url", base_url,
                       "--rpm", str(plan.rpm), "--tpm", str(plan.tpm),
                       "--max-concurrent-reqs", str(plan.concurrency), "--grace-period", str(ENGINE_GRACE)]  # fmt: skip
        if plan.sdk_clients:
            # The default, said explicitly: the SDK clients depend on it.
            engine_argv += ["--http-socket", str(http_socket)]
        async with _child("engine", engine_argv, workdir, _child_env({"OPENAI_API_KEY": DEMO_KEY})) as engine:
            children.append(engine)
            await _wait_for_engine(engine, socket, *([http_socket] if plan.sdk_clients else []))
            console.print(
                f"simulator pid {simulator.process.pid} at {base_url}, engine pid {engine.process.pid} on {socket}"
                + (" (and .http)" if plan.sdk_clients else "")
                + f" (ready in {time.monotonic() - started:.1f} s)"
            )
            # A generous bound so a wedged run fails with logs instead of hanging; Ctrl+C works sooner.
            tally = Neighbour() if with_neighbour else None
            sdk = SdkClients(plan.sdk_clients) if plan.sdk_clients else None
            with trio.fail_after(3 * plan.expected_seconds + SDK_DRAIN_TIMEOUT + 60):
                outcome, engine_stats = await _run_batch(
                    socket, plan, console, (base_url, tally) if tally is not None else None, sdk
                )
            simulator_stats = await _simulator_stats(base_url)
    return outcome, sdk, render_summary(plan, outcome, engine_stats, simulator_stats, tally, sdk)


async def _main(plan: Plan, workdir: Path, console: Any, children: list[Child], with_neighbour: bool) -> Result | None:
    """Run the demo; None when interrupted by SIGINT/SIGTERM (cleanup has run by then)."""
    # Signals cancel the run so every `finally` gets to stop the children, instead of a KeyboardInterrupt
    # landing in the middle of cleanup.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        result: Result | None = None
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch_signals)
            result = await _demo(plan, workdir, console, children, with_neighbour)
            nursery.cancel_scope.cancel()
        return result


def _print_logs(console: Any, children: list[Child]) -> None:
    for child in children:
        console.print(f"--- last lines of the {child.name} log ({child.log_path}) ---", markup=False)
        console.print(child.tail(), markup=False, highlight=False)


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in error.exceptions)
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return str(error) or type(error).__name__


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 only when every request succeeded, 130 when interrupted, 1 on any failure."""
    from rich.console import Console
    from rich.text import Text

    # soft_wrap: long lines stay whole (a terminal wraps them anyway), so they can be grepped from a log.
    console = Console(highlight=False, soft_wrap=True)
    sdk_clients = args.sdk_clients
    if sdk_clients:
        try:
            # Imported once here, not in each client: a missing package is said once, and the import's second
            # or so is spent before anything is started.
            import openai  # noqa: F401
        except ImportError:
            sdk_clients = 0
    plan = make_plan(args.requests, args.seconds, args.rpm, args.tpm, args.max_concurrent_reqs, sdk_clients)
    console.print(
        f"[bold]trio-mapper demo[/]: {len(plan.bodies)} chat requests ({plan.planned_tokens:,} tokens) through an "
        f"engine to the simulator"
        + (f", with {sdk_clients} official openai SDK clients on its HTTP front" if sdk_clients else "")
        + f"; limits {plan.rpm:,} RPM / {plan.tpm:,} TPM enforced per second, "
        f"{FAIL_RATE:.0%} server errors, {plan.concurrency} concurrent upstream requests"
    )
    if sdk_clients != args.sdk_clients:
        console.print(SDK_SKIPPED, markup=False)
    workdir = _make_workdir()
    children: list[Child] = []
    status = 1
    try:
        try:
            result = trio.run(_main, plan, workdir, console, children, not args.no_neighbour)
        except Exception as exc:
            # The description quotes the engine and the upstream: plain text, never markup.
            console.print("[red]demo failed:[/]", Text(escape_control_characters(_describe(exc))))
            _print_logs(console, children)
            return 1
        except KeyboardInterrupt:  # a Ctrl+C before the signal receiver was installed
            result = None
        if result is None:
            console.print("[yellow]interrupted[/]: simulator and engine stopped")
            status = 130
            return status
        outcome, sdk, lines = result
        for line in lines:
            console.print(line, markup=False)
        lost = lost_count(plan, outcome, sdk)
        if lost:
            console.print(f"[red]{lost} request(s) lost[/]")
            for kind, message in sorted(outcome.messages.items()):
                console.print(f"  {kind}: {message}", markup=False)
            for kind, message in sorted((sdk.messages if sdk is not None else {}).items()):
                console.print(f"  {kind} (SDK client): {message}", markup=False)
            if sdk is not None and sdk.withdrawn:
                console.print(
                    f"  withdrawn (SDK client): no answer {SDK_DRAIN_TIMEOUT:.0f} s after the batch ended", markup=False
                )
            _print_logs(console, children)
            return 1
        status = 0
        return status
    finally:
        # By now both children have been reaped (their context managers ran inside trio.run).
        if args.keep_logs:
            console.print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            console.print(f"temporary directory {workdir} removed" + ("" if status == 0 else " (--keep-logs keeps it)"))
