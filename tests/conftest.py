"""Shared fixtures: a real simulator over HTTP and the engine as a real subprocess on a real Unix socket."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from trio_mapper.simulator import SimulatorConfig, open_simulator

sys.path.insert(0, str(Path(__file__).parent))

TEST_API_KEY = "sk-test-this-key-must-never-leak-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tm-", dir="/tmp"))
    yield path
    if not os.environ.get("TM_KEEP_TMP"):  # set it to keep engine logs of a failing test
        shutil.rmtree(path, ignore_errors=True)


def fast_simulator(**overrides: Any) -> SimulatorConfig:
    base = SimulatorConfig(rpm=100_000, tpm=10_000_000, latency_ms=0.0, per_token_latency_ms=0.0, seed=7)
    return attrs.evolve(base, **overrides)


@attrs.define
class EngineProcess:
    process: trio.Process
    socket: Path
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.fail_after(60):
            return await self.process.wait()


def engine_command(socket: Path, base_url: str, *extra: str, constants: Mapping[str, int] | None = None) -> list[str]:
    """The engine's command line; ``constants``: module constants no setting exposes, by their dotted name,
    set before the engine starts (a bound made small enough to reach in a test)."""
    python = ["-m", "trio_mapper"]
    if constants:
        lines = ["import importlib, runpy"]
        for name, value in constants.items():
            module, _, attribute = name.rpartition(".")
            lines.append(f"setattr(importlib.import_module({module!r}), {attribute!r}, {value!r})")
        lines.append("runpy.run_module('trio_mapper', run_name='__main__', alter_sys=True)")
        python = ["-c", "; ".join(lines)]
    return [
        sys.executable, *python, "launch-engine",
        "--socket", str(socket), "--base-url", base_url,
        "--max_concurrent_reqs", "32", "--rpm", "100000", "--tpm", "10000000",
        *extra,
    ]  # fmt: skip


def engine_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TRIO_MAPPER_"))}
    env.update(OPENAI_API_KEY=TEST_API_KEY, PYTHONUNBUFFERED="1", **extra)
    return env


async def wait_for_socket(path: Path | tuple[str, int], process: trio.Process, log_path: Path) -> None:
    """Until the engine accepts on a Unix socket, or a TCP (host, port)."""
    with trio.fail_after(60):
        while True:
            if process.returncode is not None:
                log = await trio.Path(log_path).read_text()
                raise AssertionError(f"engine exited with {process.returncode}:\n{log}")
            try:
                if isinstance(path, tuple):
                    stream: trio.abc.Stream = await trio.open_tcp_stream(*path)
                else:
                    stream = await trio.open_unix_socket(path)
            except OSError:
                await trio.sleep(0.05)  # another process: nothing to wait on but the clock
            else:
                await stream.aclose()
                return


#: Flags after which the engine's HTTP socket is not at its default path (or not there at all).
_HTTP_SOCKET_FLAGS = frozenset({"no-http-socket", "http-socket"})


@asynccontextmanager
async def running_engine(
    directory: Path,
    base_url: str,
    *extra: str,
    env: dict[str, str] | None = None,
    open_files: int | None = None,
    constants: Mapping[str, int] | None = None,
) -> AsyncIterator[EngineProcess]:
    """The engine as a subprocess; ``open_files``: its open-file limit, soft and hard (through ``prlimit``);
    ``constants``: as `engine_command` sets them."""
    socket = directory / "engine.sock"
    log_path = directory / "engine.log"
    command = engine_command(socket, base_url, *extra, constants=constants)
    if open_files is not None:
        command = ["prlimit", f"--nofile={open_files}:{open_files}", "--", *command]
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            command,
            env=env or engine_env(),
            stdout=log_file,
            stderr=log_file,
            cwd=directory,
        )
    engine = EngineProcess(process, socket, log_path)
    try:
        await wait_for_socket(socket, process, log_path)
        if not any(flag.lstrip("-").partition("=")[0].replace("_", "-") in _HTTP_SOCKET_FLAGS for flag in extra):
            # The HTTP socket is made just after the msgpack one, which accepts (into its backlog) as soon as
            # it listens: a test that goes straight to the HTTP socket must wait for it too.
            await wait_for_socket(Path(str(socket) + ".http"), process, log_path)
        if (tcp := _http_port(extra)) is not None:
            # The TCP port listens after the Unix sockets: a test that connects to it first was refused.
            await wait_for_socket(tcp, process, log_path)
        yield engine
    finally:
        await stop_process(process, failed=sys.exc_info()[0] is not None)


def _http_port(extra: tuple[str, ...]) -> tuple[str, int] | None:
    """The loopback address an ``--http HOST:PORT`` (or ``--http=HOST:PORT``) among the engine's options names."""
    for index, flag in enumerate(extra):
        name, equals, value = flag.partition("=")
        if name == "--http" and (equals or index + 1 < len(extra)):
            host, _, port = (value if equals else extra[index + 1]).rpartition(":")
            return host.strip("[]"), int(port)
    return None


async def stop_process(process: trio.Process, *, failed: bool) -> None:
    """SIGTERM (SIGKILL after a test failure, to leave the log as it was), then SIGKILL after 30 s."""
    if process.returncode is None:
        process.send_signal(signal.SIGKILL if failed else signal.SIGTERM)
    with trio.move_on_after(30):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


@asynccontextmanager
async def simulator(**overrides: Any) -> AsyncIterator[str]:
    async with open_simulator(fast_simulator(**overrides)) as url:
        yield url


async def simulator_stats(url: str) -> dict[str, Any]:
    """What the simulator at ``url`` (its API root, ``…/v1``) counted: ``GET /_simulator/stats``."""
    async with httpx.AsyncClient() as client:
        reply = await client.get(url.removesuffix("/v1") + "/_simulator/stats")
        result: dict[str, Any] = reply.json()
        return result


async def read_http_request(stream: trio.abc.ReceiveStream, buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """One HTTP/1.1 request read by hand, for fake upstreams that answer in ways no server library would:
    its head, its body (by Content-Length) and what followed it; None if the peer closed first."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some()
        if not data:
            return None
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
    while len(buffer) < length:
        buffer += await stream.receive_some()
    return head, buffer[:length], buffer[length:]
