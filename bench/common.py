"""Shared pieces of the benchmarks: real subprocesses for the simulator and the engine, and job builders.

Every benchmark runs its contenders side by side in one run and prints ratios, because the machines are
noisy: absolute figures from different runs are not comparable.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

BENCH_KEY = "sk-bench-not-a-real-key-000000000000"
_LISTENING = re.compile(rb"simulator listening on (http://\S+)")


@asynccontextmanager
async def simulator_process(*flags: str) -> AsyncIterator[str]:
    """``trio-mapper simulate`` in its own process (its own core); yields its base URL."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_mapper", "simulate", "--port", "0", *flags],
        stdout=-1,
        stderr=-1,
    )
    try:
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(60):
            while not (match := _LISTENING.search(seen)):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"simulator exited: {seen.decode(errors='replace')}")
                seen += chunk
        yield match.group(1).decode()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()


@asynccontextmanager
async def engine_process(base_url: str, *flags: str) -> AsyncIterator[Path]:
    """``trio-mapper launch-engine`` in its own process; yields its socket path once it accepts."""
    directory = Path(tempfile.mkdtemp(prefix="tmb-", dir="/tmp"))
    socket = directory / "engine.sock"
    command = [sys.executable, "-m", "trio_mapper", "launch-engine", "--socket", str(socket), "--base-url", base_url,
               "--log-level", "WARNING", *flags]  # fmt: skip
    with (directory / "engine.log").open("wb") as log:
        async with serving_process(command, str(socket), log=directory / "engine.log", output=log):
            yield socket


@asynccontextmanager
async def serving_process(
    command: list[str], socket: str, *, log: Path | None = None, output: Any = None, stop_timeout: float = 30
) -> AsyncIterator[None]:
    """``command`` in its own process (holding `BENCH_KEY`), until it accepts connections on the Unix ``socket``;
    SIGTERM on the way out. ``log``: a file to quote if it exits early."""
    env = {**os.environ, "OPENAI_API_KEY": BENCH_KEY}
    process = await trio.lowlevel.open_process(command, env=env, stdout=output, stderr=output)
    try:
        with trio.fail_after(60):
            while True:
                if process.returncode is not None:
                    said = await trio.Path(log).read_text() if log is not None else "see its output above"
                    raise RuntimeError(f"{command[1]} exited: {said}")
                try:
                    stream = await trio.open_unix_socket(socket)
                except OSError:
                    await trio.sleep(0.05)
                else:
                    await stream.aclose()
                    break
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(stop_timeout):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def simulator_stats(base_url: str, *, reset: bool = False) -> dict[str, Any]:
    root = base_url.removesuffix("/v1")
    async with httpx.AsyncClient() as client:
        if reset:
            (await client.post(root + "/_simulator/reset")).raise_for_status()
        response = await client.get(root + "/_simulator/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


#: The engine socket's frame prefix: the msgpack body's length, big-endian.
FRAME_PREFIX = struct.Struct(">I")


def frame(message: dict[str, Any]) -> bytes:
    """One raw frame of the engine socket's protocol, for benches that measure the engine, not a client."""
    body = msgspec.msgpack.encode(message)
    return FRAME_PREFIX.pack(len(body)) + body


def chat_body(index: int, *, words: int, max_tokens: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    text = " ".join(f"word{(index * 7 + i) % 997}" for i in range(words))
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {index}: {text}"}],
        "max_tokens": max_tokens,
    }


def python_speed() -> float:
    """Seconds this machine takes for a fixed pure-Python loop (best of 3). Absolute figures (milliseconds,
    requests/s) from two machines compare only through something like it; ratios measured in one run do not
    need it."""

    def loop() -> int:
        total = 0
        for index in range(10_000_000):
            total += index
        return total

    timings = []
    for _ in range(3):
        started = time.perf_counter()
        loop()
        timings.append(time.perf_counter() - started)
    return min(timings)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def child_pid(*words: str) -> int:
    """The pid of this process's child whose argv holds every one of ``words`` (to read its CPU time)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == me and all(word.encode() in argv for word in words):
            return int(entry.name)
    raise LookupError(f"no child process of {me} with {words} in its argv")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time used so far by a process (Linux ``/proc``); this process when ``pid`` is None."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """A process's resident memory (Linux ``/proc``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    """A loopback TCP port free right now (another process may take it before it is bound again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def redis_server_executable() -> str:
    """The ``redis-server`` executable, for the benches of the shared budget; exits saying how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    return path
