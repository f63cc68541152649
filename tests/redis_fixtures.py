"""A real ``redis-server`` for tests: a subprocess on a Unix socket in a temporary directory, nothing persisted.

    async with redis_server() as redis:      # skips (or fails, under TRIO_MAPPER_REQUIRE_REDIS=1) without it
        SharedBudgetSettings(url=redis.url)  # unix:///tmp/tm-redis-…/redis.sock
        await redis.command("TIME")          # a raw RESP2 call, independent of the client under test
        await redis.restart()                # the same socket path, every key lost
        with redis.frozen():                 # SIGSTOP … SIGCONT: a Redis that answers nothing for a while
            ...

The server is stopped on the way out (SIGTERM, SIGKILL after `STOP_GRACE`), also when the test fails or is
cancelled, so no ``redis-server`` outlives its test. Only the process this module started is ever signalled.

Without ``redis-server`` the test is skipped, or fails under ``TRIO_MAPPER_REQUIRE_REDIS=1`` (CI sets it). Call
`redis_server_path` from a synchronous fixture first (tests/engine/budget/test_shared_budget.py does) so that
the skip or failure happens at setup with its reason: raised inside a trio test, pytest-trio's nursery wraps it
and the skip reason is lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio

#: CI sets it: a missing redis-server then fails the test instead of skipping it.
REQUIRE_ENV: Final = "TRIO_MAPPER_REQUIRE_REDIS"
#: Seconds a SIGTERMed server gets to exit before SIGKILL.
STOP_GRACE: Final = 5.0
#: Seconds a starting server gets to answer PING.
START_TIMEOUT: Final = 10.0
#: Seconds one `RedisServer.command` may take.
COMMAND_TIMEOUT: Final = 5.0


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (``-ERR …``)."""


def redis_server_path() -> str:
    """The ``redis-server`` executable; `pytest.skip` without one, or `pytest.fail` when CI requires it."""
    path = shutil.which("redis-server")
    if path is not None:
        return path
    reason = "redis-server is not installed (Debian: apt-get install redis-server); the shared-budget tests need it"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 forbids skipping them", pytrace=False)
    pytest.skip(reason)


class RedisServer:
    """One ``redis-server`` process on ``<directory>/redis.sock``, which `stop` / `start` / `restart` keep."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.log_path = directory / "redis.log"
        self.url = f"unix://{self.socket}"
        self.process: trio.Process | None = None
        self.starts = 0
        if len(os.fsencode(self.socket)) > 107:
            raise ValueError(f"{self.socket} is longer than an AF_UNIX path may be (107 bytes)")

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<RedisServer {self.url} pid={pid}>"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command_line(self) -> list[str]:
        return [
            self.executable,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip

    async def start(self) -> None:
        """Start the server (empty: nothing is persisted) and wait until it answers PING."""
        if self.running:
            raise RuntimeError(f"{self!r} is running already")
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a SIGKILLed server: PING must not reach a ghost
        with self.log_path.open("ab") as log_file:
            self.process = await trio.lowlevel.open_process(
                self.command_line(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=self.directory
            )
        self.starts += 1
        try:
            with trio.fail_after(START_TIMEOUT):
                while True:
                    if self.process.returncode is not None:
                        raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log}")
                    try:
                        if await self.command("PING") == "PONG":
                            return
                    except (OSError, RedisReplyError):  # not listening yet, or still loading
                        pass
                    await trio.sleep(0.01)  # another process: nothing to wait on but the clock
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop()
            raise

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server: ``sig`` (SIGTERM; SIGKILL for a crash), then SIGKILL after `STOP_GRACE`.

        Every key is lost: the server persists nothing. No-op when it is not running.
        """
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
                process.send_signal(sig)
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        self.process = None

    async def restart(self) -> None:
        """Stop and start again on the same socket path: a server that lost its whole state."""
        await self.stop()
        await self.start()

    def freeze(self) -> None:
        """SIGSTOP: the server accepts nothing and answers nothing until `thaw` (a Redis slower than any timeout)."""
        assert self.process is not None and self.process.returncode is None, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: the frozen server answers again, replaying what it was sent meanwhile."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            if self.running:
                self.thaw()

    async def command(self, *args: str | bytes | int | float) -> Any:
        """One command on a fresh connection, as raw RESP2: simple strings as str, bulk strings as bytes,
        integers, nested lists, None; an error reply raises `RedisReplyError`. Bounded by `COMMAND_TIMEOUT`."""
        with trio.fail_after(COMMAND_TIMEOUT):
            stream = await trio.open_unix_socket(str(self.socket))
            async with stream:
                await stream.send_all(_encode(args))
                return await _Reader(stream).read()


def _encode(args: tuple[str | bytes | int | float, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            raise ConnectionError("redis-server closed the connection")
        self._buffer += data

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[: size + 2]
        return data

    async def read(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else await self._exactly(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [await self.read() for _ in range(count)]
        raise ConnectionError(f"not a RESP2 reply: {line[:80]!r}")


@asynccontextmanager
async def redis_server(directory: Path | None = None) -> AsyncIterator[RedisServer]:
    """A running ``redis-server`` on a Unix socket, stopped on the way out.

    Args:
        directory: where its socket, log and working directory go; a fresh short one under /tmp (removed
            afterwards) when None. Keep it short: AF_UNIX paths are limited to 107 bytes.
    """
    executable = redis_server_path()
    owned = directory is None
    path = Path(tempfile.mkdtemp(prefix="tm-redis-", dir="/tmp")) if directory is None else directory
    server = RedisServer(executable, path)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
        if owned and not os.environ.get("TM_KEEP_TMP"):  # set it to keep redis.log of a failing test
            shutil.rmtree(path, ignore_errors=True)


class CuttableLink:
    """A Unix-socket relay to a `RedisServer` that can be cut, for one client only: a network partition
    between one engine and Redis while the others still reach it. Cut, it closes every relayed connection and
    refuses new ones (each accepted and closed at once) until `mend`.

        async with cuttable_link(redis) as link:
            SharedBudgetSettings(url=link.url)
            link.cut()
    """

    def __init__(self, server: RedisServer, socket: Path) -> None:
        self.server = server
        self.socket = socket
        self.url = f"unix://{socket}"
        self._relays: set[trio.CancelScope] = set()
        self.is_cut = False
        #: Redis's answers are dropped (`deafen`): what the client sends still reaches Redis and runs.
        self.is_deaf = False

    def cut(self) -> None:
        self.is_cut = True
        for relay in self._relays:
            relay.cancel()

    def mend(self) -> None:
        self.is_cut = False
        self.is_deaf = False

    def deafen(self) -> None:
        """A one-way fault (an asymmetric route, a half-dead link): the client's commands reach Redis and
        run, on the connections it has, and every answer is lost. The client sees each call time out."""
        self.is_deaf = True

    async def serve(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                client = await listener.accept()
                if self.is_cut:
                    await trio.aclose_forcefully(client)
                    continue
                nursery.start_soon(self._relay, client)

    async def _relay(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._relays.add(scope)
            try:
                async with (
                    client,
                    await trio.open_unix_socket(str(self.server.socket)) as server,
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(_pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(_pump, server, client, nursery.cancel_scope, lambda: self.is_deaf)
            except OSError:
                pass  # either end went away: the client sees its connection closed
            finally:
                self._relays.discard(scope)


async def _pump(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    both: trio.CancelScope,
    dropping: Callable[[], bool] = lambda: False,
) -> None:
    try:
        while data := await source.receive_some(65536):
            if not dropping():
                await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    both.cancel()


@asynccontextmanager
async def cuttable_link(server: RedisServer) -> AsyncIterator[CuttableLink]:
    socket = server.socket.with_name("link.sock")
    link = CuttableLink(server, socket)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(socket))
    sock.listen(64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.serve, trio.SocketListener(sock))
        try:
            yield link
        finally:
            link.cut()
            nursery.cancel_scope.cancel()
    with contextlib.suppress(OSError):
        socket.unlink()
