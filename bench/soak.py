"""Soak under chaos: every kind of client at once while the upstream fails, signals arrive, and the upstream
and Redis die; then check that nothing was lost, nothing hung and nothing leaked.

    .venv/bin/python bench/soak.py                 # about 2 minutes: 90 s of load, then the checks
    .venv/bin/python bench/soak.py --seconds 600   # a longer soak

The tests check each of these failures alone, each with its regression test; this puts them together, as a
production day would, and checks the invariants the engine promises across all of them.

**Set-up** (everything in one temporary directory): a redis-server; the simulator on a fixed port (so that it
can be started again), failing 4 % of requests with a 500, 2 % each with an HTML 502, an overloaded 503 and a
connection reset mid-reply, and 2 % slow by 0.8 s; two engines sharing one budget through Redis. Engine A has
failure policy ``local-share``, tenants (an interactive one; a batch one with a ``tpm_cap`` and a daily budget;
prices) and a loopback TCP port with client keys; engine B has policy ``wait`` and no tenants.

**Load**, until ``--seconds`` pass: on each engine, msgpack clients of three tenants sending requests with
mixed deadlines (0.3 s to none) and classes, and streams of which half are left after a few chunks, and a
blocking `Client` shared by three threads; the
official SDK over engine A's HTTP Unix socket (chat, streamed chat read whole and left early, embeddings float
and base64, responses whole and streamed; SDK retries on or off; read timeouts of 2 or 30 s), and over its TCP
port with two client keys; hostile connections (half a frame then gone, a handshake then gone, an HTTP request
whose client leaves before the answer, TLS bytes on the HTTP socket).

**Chaos**: SIGHUP to both engines every 7 s; the simulator SIGKILLed at a quarter of the run and started again
5 s later; redis-server SIGKILLed at half and started again (empty) 15 s later; then one client key replaced
in the keys file before a SIGHUP (its clients switch to the new key); at three quarters, engine B stopped
with SIGTERM (a graceful stop, as ``systemctl restart`` does) and started again on the same socket.

**Checks** (exit status 1 if one fails):
- every call ended, successfully or with an error the client's documentation lists, within its deadline or
  read timeout plus 30 s: nothing hung;
- no request lost with engine B's connections at its graceful restart is in doubt (`ConnectionLost` with
  ``may_have_reached_upstream``): the engine's goodbye says what it never read;
- both engines still run; within 60 s of the end, each has nothing outstanding, in flight, queued or being
  received, and each lane's budget settled every reservation it made (reservations = reconciles + refunds);
- no internal error counted, no traceback logged;
- the replaced key is refused (401) and its successor accepted;
- neither the upstream key nor a client key appears in the engines' logs, their status (JSON), their
  ``/metrics``, or any value in Redis.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import httpx2
import msgspec
import openai
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import BENCH_KEY, free_port, redis_server_executable, rss_mib, serving_process, simulator_stats
from redis_fixtures import RedisServer  # the tests' redis-server: SIGKILL and start again on one socket

from trio_mapper import AsyncClient, Client, ConnectionLost, TrioMapperError

#: Faults the simulator injects (see the module docstring).
SIMULATOR_FAULTS = ("--fail-rate", "0.04", "--bad-gateway-rate", "0.02", "--overloaded-rate", "0.02",
                    "--reset-rate", "0.02", "--slow-rate", "0.02", "--slow-ms", "800", "--latency-ms", "20",
                    "--per-token-latency-ms", "2", "--rpm", "3000", "--tpm", "600000", "--quantum", "1")  # fmt: skip
ENGINE_LIMITS = ("--rpm", "2000", "--tpm", "400000", "--max_concurrent_reqs", "24", "--period_length", "10")
CLIENT_KEYS = {"alice": "tm-soak-alice-0000000000000001", "bob": "tm-soak-bob-00000000000000002"}
BOB_NEXT_KEY = "tm-soak-bob-rotated-0000000003"
TENANTS = """\
[tenants.desk]
priority = "interactive"
names = ["soak-desk"]

[tenants.nightly]
priority = "batch"
weight = 3
tpm_cap = "25%"
daily_tokens = 2000000
names = ["soak-nightly"]

[prices.gpt-4o-mini]
input = 0.15
output = 0.60
"""
SDK_CALLS = ("chat", "stream", "stream left", "embeddings", "base64", "responses", "responses stream")
#: Outcomes that mean the engine is not there (being restarted): the client waits a moment before the next call.
AWAY = frozenset(
    {"ConnectionLost (never ran)", "ConnectionLost (may have run)", "EngineUnavailable", "ShuttingDownError"}
)
#: How long past its own deadline (or read timeout) a call may take before it counts as hung.
HANG_SLACK = 30.0
SETTLE_TIMEOUT = 60.0


class Outcomes:
    """What every call ended with, by client kind; hung calls are the failures."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.hung: list[str] = []

    async def run(self, kind: str, call: Callable[[], Awaitable[str]], limit: float) -> str:
        """Run one call (which returns its outcome's name, or raises a documented error) within ``limit`` s;
        returns the outcome."""
        with trio.move_on_after(limit):
            try:
                outcome = await call()
            except TrioMapperError as error:
                outcome = type(error).__name__
                if isinstance(error, ConnectionLost):
                    outcome += " (may have run)" if error.may_have_reached_upstream else " (never ran)"
            except openai.APIError as error:
                outcome = f"{type(error).__name__} {getattr(error, 'status_code', '') or ''}".strip()
            self.counts[kind, outcome] += 1
            return outcome
        self.hung.append(kind)
        self.counts[kind, "HUNG"] += 1
        return "HUNG"


class Soak:
    def __init__(self, directory: Path, seconds: float, seed: int) -> None:
        self.directory = directory
        self.seconds = seconds
        self.random = random.Random(seed)
        self.outcomes = Outcomes()
        self.client_keys = dict(CLIENT_KEYS)
        self.events: list[tuple[float, str]] = []
        self.stop = trio.Event()
        self.simulator_port = free_port()
        self.tcp_port = free_port()
        self.upstream = f"http://127.0.0.1:{self.simulator_port}/v1"
        self.simulator: trio.Process | None = None
        (directory / "redis").mkdir()
        self.redis = RedisServer(redis_server_executable(), directory / "redis")
        self.started = 0.0
        self.pids: dict[str, int] = {}
        self.rss_at_start: dict[str, float] = {}
        #: Set to stop an engine: `serve` starts it again unless `finished` is set.
        self.restarts: dict[str, trio.Event] = {}
        self.finished = trio.Event()
        #: What the TCP port answered the replaced key and its successor, once the keys file changed.
        self.rotation = (0, 0)

    # --- processes ---------------------------------------------------------------------------------------

    def socket(self, engine: str) -> Path:
        return self.directory / f"engine-{engine}.sock"

    async def start_simulator(self) -> None:
        log_path = self.directory / "simulator.log"
        with log_path.open("ab") as log:
            self.simulator = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trio_mapper", "simulate", "--port", str(self.simulator_port),
                 "--api-key", BENCH_KEY, *SIMULATOR_FAULTS],
                stdout=log, stderr=log,
            )  # fmt: skip
        with trio.fail_after(60):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.simulator_port)
                except OSError:
                    await trio.sleep(0.05)  # another process: nothing to wait on but the clock
                else:
                    await stream.aclose()
                    return

    def kill_simulator(self) -> None:
        assert self.simulator is not None
        self.simulator.kill()

    def engine_commands(self) -> dict[str, list[str]]:
        keys_file = self.directory / "http-keys.toml"
        write_keys(keys_file, self.client_keys)
        config = self.directory / "tenants.toml"
        config.write_text(TENANTS)
        common = [sys.executable, "-m", "trio_mapper", "launch-engine", "--base-url", self.upstream,
                  *ENGINE_LIMITS, "--budget", self.redis.url]  # fmt: skip
        a = [*common, "--socket", str(self.socket("a")), "--budget-failure", "local-share", "--config", str(config),
             "--http", f"127.0.0.1:{self.tcp_port}", "--http-keys-file", str(keys_file)]  # fmt: skip
        b = [*common, "--socket", str(self.socket("b")), "--budget-failure", "wait"]
        return {"a": a, "b": b}

    async def serve(self, name: str, command: list[str], *, task_status: trio.TaskStatus[None]) -> None:
        """Run engine ``name`` until the checks are done, starting it again each time `restart` asks (the
        launcher's SIGTERM: a graceful stop, as ``systemctl restart`` does)."""
        log_path = self.directory / f"engine-{name}.log"
        started: trio.TaskStatus[None] | None = task_status
        while not self.finished.is_set():
            with log_path.open("ab") as log:
                async with serving_process(command, str(self.socket(name)), log=log_path, output=log):
                    self.pids[name] = (await trio.to_thread.run_sync(self.status, name))["engine"]["pid"]
                    self.rss_at_start[name] = rss_mib(self.pids[name])
                    self.restarts[name] = trio.Event()
                    if started is not None:
                        started.started()
                        started = None
                    else:
                        self.note(f"engine {name} started again")
                    await self.restarts[name].wait()

    def restart(self, name: str) -> None:
        self.note(f"engine {name} SIGTERMed (graceful stop)")
        self.restarts[name].set()

    def status(self, engine: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "trio_mapper", "status", "--json", "--socket", str(self.socket(engine))],
            capture_output=True,
            check=True,
            timeout=30,
        )
        status: dict[str, Any] = json.loads(done.stdout)
        return status

    def note(self, what: str) -> None:
        self.events.append((trio.current_time() - self.started, what))

    # --- load --------------------------------------------------------------------------------------------

    def chat(self, *, stream: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.random.choice(["gpt-4o-mini", "gpt-4o"]),
            "messages": [{"role": "user", "content": "hello " * self.random.randint(3, 300)}],
            "max_tokens": self.random.randint(1, 64),
        }
        if stream:
            body["stream"] = True
        return body

    async def msgpack_client(self, engine: str, name: str) -> None:
        async with AsyncClient(self.socket(engine), client_name=name) as client:
            while not self.stop.is_set():
                deadline = self.random.choice([None, None, 0.3, 3.0, 20.0])
                call = partial(
                    self.msgpack_call, client, deadline, self.random.choice([None, None, "batch", "interactive"])
                )
                if self.random.random() < 0.3:
                    call = partial(self.msgpack_stream, client, deadline, leave_after=self.random.choice([None, 2]))
                if await self.outcomes.run(f"msgpack {engine}", call, (deadline or 120) + HANG_SLACK) in AWAY:
                    await trio.sleep(0.2)  # the engine is restarting: a new connection would be refused at once

    async def msgpack_call(self, client: AsyncClient, deadline: float | None, priority: str | None) -> str:
        await client.request("/v1/chat/completions", self.chat(), deadline=deadline, priority=priority)
        return "ok"

    async def msgpack_stream(self, client: AsyncClient, deadline: float | None, *, leave_after: int | None) -> str:
        chunks = client.stream("/v1/chat/completions", self.chat(), deadline=deadline)
        seen = 0
        async for _ in chunks:
            seen += 1
            if seen == leave_after:
                chunks.close()
                return "stream left early"
        return "stream read whole"

    async def blocking_client(self, engine: str) -> None:
        """The blocking `Client`, shared by threads as a threaded program would."""
        client = Client(self.socket(engine), client_name="plain")
        try:
            async with trio.open_nursery() as threads:
                for _ in range(3):
                    threads.start_soon(self.blocking_calls, engine, client)
        finally:
            client.close()

    async def blocking_calls(self, engine: str, client: Client) -> None:
        while not self.stop.is_set():
            call = partial(trio.to_thread.run_sync, self.blocking_call, client, self.chat(), abandon_on_cancel=True)
            if await self.outcomes.run(f"blocking {engine}", call, 20 + HANG_SLACK) in AWAY:
                await trio.sleep(0.2)

    @staticmethod
    def blocking_call(client: Client, body: dict[str, Any]) -> str:
        client.request("/v1/chat/completions", body, deadline=20)
        return "ok"

    def sdk(self, *, tcp_key: str | None = None) -> openai.AsyncOpenAI:
        if tcp_key is not None:
            base_url, api_key, transport = f"http://127.0.0.1:{self.tcp_port}/v1", tcp_key, None
        else:
            base_url, api_key = "http://engine/v1", "unused"
            transport = httpx2.AsyncHTTPTransport(uds=str(self.socket("a")) + ".http")
        return openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=self.random.choice([0, 2]),
            timeout=self.random.choice([2.0, 30.0]),
            http_client=httpx2.AsyncClient(transport=transport) if transport else httpx2.AsyncClient(),
        )

    async def sdk_client(self, over: str) -> None:
        while not self.stop.is_set():
            who = self.random.choice(sorted(self.client_keys)) if over == "tcp" else None
            sdk = self.sdk(tcp_key=self.client_keys[who] if who else None)
            what = self.random.choice(SDK_CALLS)
            try:
                await self.outcomes.run(f"sdk {over} {what}", partial(self.sdk_call, sdk, what), 90 + HANG_SLACK)
            finally:
                await sdk.close()

    async def sdk_call(self, sdk: openai.AsyncOpenAI, what: str) -> str:
        if what == "chat":
            await sdk.chat.completions.create(**self.chat())
        elif what in ("stream", "stream left"):
            chunks = await sdk.chat.completions.create(**self.chat(stream=True))
            seen = 0
            async for _ in chunks:
                seen += 1
                if what == "stream left" and seen == 2:
                    break
            await chunks.close()
        elif what in ("embeddings", "base64"):
            await sdk.embeddings.create(
                model="text-embedding-3-small",
                input=["a b c"] * self.random.randint(1, 5),
                encoding_format="base64" if what == "base64" else "float",
            )
        elif what == "responses":
            await sdk.responses.create(model="gpt-4o-mini", input="hi " * 20, max_output_tokens=20)
        else:
            events = await sdk.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=20, stream=True)
            async for _ in events:
                pass
        return "ok"

    async def hostile_client(self) -> None:
        http_socket = str(self.socket("a")) + ".http"
        while not self.stop.is_set():
            kind = self.random.choice(["half a frame", "handshake then gone", "gone before the answer", "tls bytes"])
            try:
                if kind in ("half a frame", "handshake then gone"):
                    stream = await trio.open_unix_socket(str(self.socket(self.random.choice("ab"))))
                    hello = msgspec.msgpack.encode({"type": "hello", "version": 1})
                    whole = len(hello).to_bytes(4, "big") + hello
                    await stream.send_all(b"\x00\x00\x10\x00partial" if kind == "half a frame" else whole)
                else:
                    stream = await trio.open_unix_socket(http_socket)
                    if kind == "tls bytes":
                        await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64))
                    else:
                        body = json.dumps(self.chat()).encode()
                        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: engine\r\nContent-Length: %d\r\n\r\n"
                        await stream.send_all(head % len(body) + body)
                        await trio.sleep(self.random.random() * 0.2)
                await stream.aclose()
                self.outcomes.counts["hostile", kind] += 1
            except OSError as error:  # the engine may refuse a connection; it must not stop serving
                self.outcomes.counts["hostile", f"refused: {error.strerror}"] += 1
            await trio.sleep(0.05)

    # --- chaos -------------------------------------------------------------------------------------------

    async def chaos(self) -> None:
        await trio.sleep(self.seconds / 4)
        self.kill_simulator()
        self.note("simulator SIGKILLed")
        await trio.sleep(5)
        await self.start_simulator()
        self.note("simulator started again")
        await trio.sleep(max(0.0, self.seconds / 4 - 5))
        await self.redis.stop(signal.SIGKILL)
        self.note("redis-server SIGKILLed")
        await trio.sleep(15)
        await self.redis.start()
        self.note("redis-server started again, empty")
        old_key = self.client_keys["bob"]
        write_keys(self.directory / "http-keys.toml", {**self.client_keys, "bob": BOB_NEXT_KEY})
        self.client_keys["bob"] = BOB_NEXT_KEY
        self.signal_engines(signal.SIGHUP)
        self.note("bob's key replaced, SIGHUP")
        await trio.sleep(2)
        self.rotation = (await self.probe_key(old_key), await self.probe_key(BOB_NEXT_KEY))
        await trio.sleep(max(0.0, self.seconds * 3 / 4 - (trio.current_time() - self.started)))
        self.restart("b")

    async def sighups(self) -> None:
        while not self.stop.is_set():
            await trio.sleep(7)
            self.signal_engines(signal.SIGHUP)
            self.outcomes.counts["chaos", "SIGHUP to both engines"] += 1

    def signal_engines(self, sig: int) -> None:
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):  # an engine being restarted
                os.kill(pid, sig)

    async def probe_key(self, key: str) -> int:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.tcp_port}") as client:
            return (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code

    # --- the run -----------------------------------------------------------------------------------------

    async def run(self) -> list[str]:
        """Load and chaos for ``seconds``, then the checks; returns the failed checks."""
        await self.redis.start()
        await self.start_simulator()
        try:
            async with trio.open_nursery() as engines:
                for name, command in self.engine_commands().items():
                    await engines.start(partial(self.serve, name, command))
                self.started = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for engine in ("a", "b"):
                        for name in ("soak-desk", "soak-nightly", "plain", "plain"):
                            nursery.start_soon(self.msgpack_client, engine, name)
                        nursery.start_soon(self.blocking_client, engine)
                    for _ in range(6):
                        nursery.start_soon(self.sdk_client, "unix")
                    for _ in range(4):
                        nursery.start_soon(self.sdk_client, "tcp")
                    for _ in range(2):
                        nursery.start_soon(self.hostile_client)
                    nursery.start_soon(self.chaos)
                    nursery.start_soon(self.sighups)
                    await trio.sleep(self.seconds)
                    self.stop.set()
                self.note("load stopped; every call has ended")
                failed = await self.checks()
                self.finished.set()
                for restart in self.restarts.values():
                    restart.set()
                return failed
        finally:
            if self.simulator is not None and self.simulator.returncode is None:
                self.simulator.kill()
            await self.redis.stop()

    async def checks(self) -> list[str]:
        failed = [f"{len(self.outcomes.hung)} calls hung: {collections.Counter(self.outcomes.hung)}"] * bool(
            self.outcomes.hung
        )
        # Engine B stops gracefully (SIGTERM): its goodbye says which requests it never read, so none is in doubt.
        in_doubt = sum(count for (_, outcome), count in self.outcomes.counts.items() if "may have run" in outcome)
        if in_doubt:
            failed.append(f"{in_doubt} requests lost with a connection may have run, at a graceful restart")
        secrets = [BENCH_KEY, *CLIENT_KEYS.values(), BOB_NEXT_KEY]
        for name, pid in self.pids.items():
            status = await self.settled(name)
            engine = status["engine"]
            busy = {k: engine[k] for k in ("outstanding", "in_flight", "queued_bytes", "receiving_bytes") if engine[k]}
            if busy:
                failed.append(f"engine {name} still busy {SETTLE_TIMEOUT:g} s after the load: {busy}")
            if engine["internal_errors"]:
                failed.append(f"engine {name} counted {engine['internal_errors']} internal errors")
            for model, lane in status["lanes"].items():
                budget = lane["budget"]
                if budget["reservations"] != budget["reconciles"] + budget["refunds"]:
                    failed.append(f"engine {name} lane {model}: reservations not all settled: {budget}")
            log = (self.directory / f"engine-{name}.log").read_text(errors="replace")
            if "Traceback" in log:
                failed.append(f"engine {name} logged a traceback (see {self.directory}/engine-{name}.log)")
            seen = json.dumps(status) + log + await self.metrics(name)
            failed += [f"engine {name} shows a key ({key[:10]}…)" for key in secrets if key in seen]
            print(
                f"engine {name}: accepted {engine['accepted']} since its start, RSS {self.rss_at_start[name]:.0f} "
                f"MiB then, {rss_mib(pid):.0f} MiB now; "
                f"budget {engine['budget'].get('state')} ({engine['budget'].get('failures')} Redis failures)"
            )
        upstream = await simulator_stats(self.upstream)
        print(
            f"upstream since its restart: {upstream['received']} requests, rate limited (429) "
            f"{sum(upstream['rate_limited'].values())}"
        )
        values = await self.redis_values()
        failed += [f"Redis holds a key ({key[:10]}…)" for key in secrets if key.encode() in values]
        if self.rotation != (401, 200):
            failed.append(f"after the keys file changed: old key {self.rotation[0]}, new key {self.rotation[1]}")
        return failed

    async def settled(self, engine: str) -> dict[str, Any]:
        with trio.move_on_after(SETTLE_TIMEOUT):
            while True:
                status = await trio.to_thread.run_sync(self.status, engine)
                work = status["engine"]
                if not (work["outstanding"] or work["in_flight"] or work["queued_bytes"] or work["receiving_bytes"]):
                    return status
                await trio.sleep(0.5)  # another process: nothing to wait on but the clock
        return await trio.to_thread.run_sync(self.status, engine)

    async def metrics(self, engine: str) -> str:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket(engine)) + ".http")
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            return (await client.get("/metrics")).text

    async def redis_values(self) -> bytes:
        dumped = [await self.redis.command("DUMP", key) for key in await self.redis.command("KEYS", "*")]
        return b"".join(value for value in dumped if value) + b"".join(await self.redis.command("KEYS", "*"))


def write_keys(path: Path, keys: dict[str, str]) -> None:
    path.write_text("[keys]\n" + "".join(f'{name} = "{key}"\n' for name, key in keys.items()))
    path.chmod(0o600)


async def main(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="tmb-soak-", dir="/tmp"))
    soak = Soak(directory, args.seconds, args.seed)
    failed = await soak.run()
    print("\ntimeline")
    for at, what in soak.events:
        print(f"  {at:6.1f} s  {what}")
    print("\noutcomes")
    for (kind, outcome), count in sorted(soak.outcomes.counts.items()):
        print(f"  {kind:28} {outcome:34} {count:6}")
    print()
    for failure in failed:
        print(f"FAILED: {failure}")
    if failed:
        print(f"logs kept in {directory}")
        return 1
    print(f"all checks passed ({args.seconds:g} s of load)")
    shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the load and chaos last (default 90)")
    parser.add_argument("--seed", type=int, default=1, help="the clients' random choices (default 1)")
    sys.exit(trio.run(main, parser.parse_args()))
