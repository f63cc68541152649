"""systemd integration with real fds and a real notify socket: the engine is started the way systemd starts it.

systemd itself is not PID 1 here, so the tests play its part: they create and bind the listening socket, pass
it as fd 3 with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, and bind the NOTIFY_SOCKET datagram socket the engine
reports to. Where systemd's own tools are installed (systemd-analyze, systemd-socket-activate) they are used
too, and skipped with the reason otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import socket as stdlib_socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from conftest import ROOT, TEST_API_KEY, engine_env, running_engine, simulator, stop_process
from prometheus_client.parser import text_string_to_metric_families
from raw_client import RawClient, chat

from trio_mapper.engine.fronts.unix.peers import PeerCredentials, is_allowed
from trio_mapper.engine.process import systemd
from trio_mapper.engine.process.reload import plan_reload
from trio_mapper.engine.process.settings import SettingsError, find_api_key, load_settings
from trio_mapper.tools.status import render

UNITS = ROOT / "systemd"

#: Runs in the child between fork and the engine: puts the passed sockets (comma-separated fds) at fds 3, 4, …
#: (SD_LISTEN_FDS_START) in order and sets LISTEN_PID (and WATCHDOG_PID) to its own pid, which the engine
#: keeps because it is exec'd in place — what systemd does. TM_MDWE=1 also turns on the kernel's
#: memory-deny-write-execute (PR_SET_MDWE, Linux >= 6.3), which survives exec: the engine must run under
#: MemoryDenyWriteExecute=yes.
WRAPPER = textwrap.dedent(
    """
    import ctypes, fcntl, os, sys
    fds = [int(fd) for fd in sys.argv[1].split(",")]
    # First out of the way (a source fd could be 3 or 4 itself), then into place.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(moved):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    if "WATCHDOG_USEC" in os.environ:
        os.environ["WATCHDOG_PID"] = str(os.getpid())
    if os.environ.pop("TM_MDWE", None) == "1":
        if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
            sys.exit("PR_SET_MDWE failed")
    os.execv(sys.argv[2], sys.argv[2:])
    """
)

PR_SET_MDWE = 65
PR_GET_MDWE = 66


def kernel_has_mdwe() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


class NotifyReceiver:
    """The NOTIFY_SOCKET end systemd would hold: a datagram socket the engine's messages arrive on, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM)
        self.messages: list[dict[str, str]] = []

    async def bind(self) -> None:
        await self.socket.bind(str(self.path))

    async def next(self) -> dict[str, str]:
        data = await self.socket.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append(fields)
        return fields

    async def wait_for(self, predicate: Callable[[dict[str, str]], bool]) -> dict[str, str]:
        """The next message that satisfies ``predicate``; the engine is slow to start at worst, never silent."""
        with trio.fail_after(60):
            while not predicate(message := await self.next()):
                pass
            return message

    def close(self) -> None:
        self.socket.close()


def listening_socket(path: Path) -> stdlib_socket.socket:
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(128)
    return sock


@attrs.define
class ActivatedEngine:
    process: trio.Process
    socket: Path
    log_path: Path
    notify: NotifyReceiver

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait(self) -> int:
        with trio.fail_after(60):
            return await self.process.wait()


def write_config(
    path: Path, *, rpm: int, tpm: int, concurrent: int, mini_rpm: int, mini_tpm: int, extra: str = ""
) -> None:
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            max_concurrent_reqs = {concurrent}
            rpm = {rpm}
            tpm = {tpm}
            {extra}

            [models."gpt-4o-mini"]
            rpm = {mini_rpm}
            tpm = {mini_tpm}
            """
        )
    )


@asynccontextmanager
async def activated_engine(
    directory: Path,
    base_url: str,
    *args: str,
    passed: stdlib_socket.socket | None = None,
    http: stdlib_socket.socket | None = None,
    env: dict[str, str] | None = None,
    fdnames: str | None = None,
) -> AsyncIterator[ActivatedEngine]:
    """The engine started as systemd starts it, with ``passed`` (default: a fresh listening socket) at fd 3.

    With ``http``, that socket is passed too, at fd 4, and ``LISTEN_FDNAMES`` defaults to ``engine:http``.
    """
    socket_path = directory / "engine.sock"
    own = passed is None
    sock = listening_socket(socket_path) if passed is None else passed
    sockets = [sock] if http is None else [sock, http]
    notify = NotifyReceiver(directory / "notify.sock")
    await notify.bind()
    environment = env if env is not None else engine_env()
    names = fdnames if fdnames is not None else ("engine" if http is None else "engine:http")
    environment.update(LISTEN_FDS=str(len(sockets)), LISTEN_FDNAMES=names, NOTIFY_SOCKET=str(notify.path))
    command = [
        sys.executable, "-c", WRAPPER, ",".join(str(s.fileno()) for s in sockets),
        sys.executable, "-m", "trio_mapper", "launch-engine",
        # What systemd passes wins; --socket names a path that must never be created.
        "--socket", str(directory / "not-used.sock"), "--base-url", base_url, *args,
    ]  # fmt: skip
    log_path = directory / "engine.log"
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            command,
            env=environment,
            stdout=log_file,
            stderr=log_file,
            cwd=directory,
            pass_fds=tuple(s.fileno() for s in sockets),
        )
    engine = ActivatedEngine(process, socket_path, log_path, notify)
    try:
        yield engine
    finally:
        await stop_process(process, failed=sys.exc_info()[0] is not None)
        notify.close()
        if own:
            sock.close()


def is_ready(message: dict[str, str]) -> bool:
    return message.get("READY") == "1"


async def stats(path: Path) -> dict[str, Any]:
    async with await RawClient.connect(str(path)) as client:
        reply = await client.request({"type": "stats", "id": "s"})
    assert reply["type"] == "stats_reply", reply
    return reply


LIMITS = ("--max_concurrent_reqs", "32", "--rpm", "100000", "--tpm", "10000000")


# --- the engine under (simulated) systemd -------------------------------------------------------------------


async def test_socket_activation_notify_watchdog_and_stop(short_tmp: Path) -> None:
    env = engine_env(WATCHDOG_USEC="400000")
    mdwe = kernel_has_mdwe()
    if mdwe:
        env["TM_MDWE"] = "1"  # as MemoryDenyWriteExecute=yes: the engine must serve without W+X memory
    async with simulator() as url, activated_engine(short_tmp, url, *LIMITS, env=env) as engine:
        ready = await engine.notify.wait_for(is_ready)
        # READY=1 comes once the engine serves: the socket answers at once.
        assert ready["STATUS"] == "serving: 0 connections, 0 outstanding, 0 in flight, 429s: 0"
        async with await RawClient.connect(str(engine.socket)) as client:
            assert (await client.request({"type": "ping", "id": "p"}))["type"] == "pong"
            for i in range(20):
                await client.send(chat(i))
            replies = [await client.receive() for _ in range(20)]
            assert all(reply["type"] == "result" for reply in replies)
            # STATUS= is kept current while serving.
            await engine.notify.wait_for(lambda m: m.get("STATUS", "").startswith("serving: 1 connections"))
            stats_reply = await client.request({"type": "stats", "id": "s"})
        assert stats_reply["engine"]["socket"] == str(engine.socket)

        # WATCHDOG=1 keeps coming while the engine idles (the interval itself: test_watchdog_interval), each
        # datagram that and nothing else. fail_after is the hang guard: at 0.2 s apart, three take 0.6 s.
        watchdogs: list[dict[str, str]] = []
        with trio.fail_after(30):
            while len(watchdogs) < 3:
                message = await engine.notify.next()
                if "WATCHDOG" in message:
                    watchdogs.append(message)
        assert watchdogs == [{"WATCHDOG": "1"}] * 3

        engine.process.send_signal(signal.SIGTERM)
        stopping = await engine.notify.wait_for(lambda m: m.get("STOPPING") == "1")
        assert stopping["STATUS"].startswith("stopping: ")
        assert await engine.wait() == 0

    log = engine.log
    assert "using the socket passed by systemd" in log
    assert stat.S_ISSOCK(os.lstat(engine.socket).st_mode), "the socket systemd created must stay"
    assert not (short_tmp / "not-used.sock").exists(), "--socket is informational under socket activation"
    assert TEST_API_KEY not in log
    assert all(TEST_API_KEY not in str(message) for message in engine.notify.messages)
    if not mdwe:
        pytest.skip("ran without PR_SET_MDWE (kernel < 6.3); everything else passed")


async def test_the_socket_survives_a_restart_and_queued_clients_are_served(short_tmp: Path) -> None:
    """Like systemd: the socket outlives the engine; a client that connects in between waits, not fails."""
    passed = listening_socket(short_tmp / "engine.sock")
    try:
        async with simulator() as url:
            async with activated_engine(short_tmp, url, *LIMITS, passed=passed) as first:
                await first.notify.wait_for(is_ready)
                first.process.send_signal(signal.SIGTERM)
                assert await first.wait() == 0
            # No engine now, but the socket still listens: the connection waits in the backlog.
            waiting = await trio.open_unix_socket(str(short_tmp / "engine.sock"))
            (short_tmp / "notify.sock").unlink()
            async with activated_engine(short_tmp, url, *LIMITS, passed=passed) as second:
                client = RawClient(waiting)
                welcome = await client.request({"type": "hello", "protocol": 1})
                assert welcome["type"] == "welcome"
                assert (await client.request(chat("queued")))["type"] == "result"
                await client.aclose()
                await second.notify.wait_for(is_ready)
    finally:
        passed.close()


async def test_sighup_reloads_limits_under_load_without_losing_a_request(short_tmp: Path) -> None:
    config = short_tmp / "engine.toml"
    write_config(config, rpm=100_000, tpm=10_000_000, concurrent=16, mini_rpm=90_000, mini_tpm=9_000_000)
    total = 300
    async with (
        simulator(latency_ms=100.0) as url,
        activated_engine(short_tmp, url, "--config", str(config)) as engine,
    ):
        await engine.notify.wait_for(is_ready)
        replies: list[dict[str, Any]] = []
        async with await RawClient.connect(str(engine.socket)) as client, trio.open_nursery() as nursery:

            async def collect() -> None:
                while len(replies) < total:
                    replies.append(await client.receive())

            for i in range(total):
                await client.send(chat(i))
            nursery.start_soon(collect)
            before = await stats(engine.socket)
            assert before["engine"]["outstanding"] > 0, "the reload must happen while requests are outstanding"
            assert before["engine"]["max_concurrent_reqs"] == 16

            write_config(
                config,
                rpm=60_000,
                tpm=6_000_000,
                concurrent=8,
                mini_rpm=50_000,
                mini_tpm=5_000_000,
                # The queue's channel is sized at start: max_queued needs a restart; max_queued_bytes does not.
                extra="max_queued = 1000\nmax_queued_bytes = 50000000",
            )
            signalled_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            engine.process.send_signal(signal.SIGHUP)
            reloading = await engine.notify.wait_for(lambda m: m.get("RELOADING") == "1")
            received_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            # systemd wants the reload's own CLOCK_MONOTONIC time (one clock for every process on the machine).
            assert signalled_usec <= int(reloading["MONOTONIC_USEC"]) <= received_usec
            await engine.notify.wait_for(is_ready)
            after = await stats(engine.socket)
        # Every request answered exactly once, every one a result.
        assert sorted(reply["id"] for reply in replies) == list(range(total))
        assert {reply["type"] for reply in replies} == {"result"}

        assert after["engine"]["default_limits"] == {"rpm": 60_000, "tpm": 6_000_000}
        assert after["engine"]["max_concurrent_reqs"] == 8
        assert after["lanes"]["gpt-4o-mini"]["budget"]["configured"] == {"rpm": 50_000, "tpm": 5_000_000}
        assert after["engine"]["max_queued"] == 200_000, "a max_queued change needs a restart"
        assert after["engine"]["max_queued_bytes"] == 50_000_000
        log = engine.log
        reloaded = next(line for line in log.splitlines() if "reloaded: " in line)
        assert "server.rpm: 100000 -> 60000" in reloaded and "server.max_concurrent_reqs: 16 -> 8" in reloaded
        assert "reload: server.max_queued: 200000 -> 1000 needs a restart" in log

        # A bad config: logged, the running settings kept, serving goes on.
        config.write_text('[server]\nrpm = "lots"\ntpm = 5\nmax_concurrent_reqs = 1\nbogus = 1\n')
        engine.process.send_signal(signal.SIGHUP)
        await engine.notify.wait_for(lambda m: m.get("RELOADING") == "1")
        await engine.notify.wait_for(is_ready)
        kept = await stats(engine.socket)
        assert kept["engine"]["default_limits"] == {"rpm": 60_000, "tpm": 6_000_000}
        assert kept["engine"]["max_concurrent_reqs"] == 8
        async with await RawClient.connect(str(engine.socket)) as client:
            assert (await client.request(chat("after")))["type"] == "result"
        log = engine.log
        assert "reload: server.rpm: expected an integer, got 'lots'" in log
        assert "unknown key(s): bogus" in log
        assert "reload failed; keeping the current settings" in log
        assert "Traceback" not in log
        assert TEST_API_KEY not in log


async def metrics_of(http_socket: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    transport = httpx.AsyncHTTPTransport(uds=str(http_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        text = (await client.get("/metrics")).text
    assert TEST_API_KEY not in text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def reload_and_wait(engine: ActivatedEngine) -> dict[str, str]:
    """SIGHUP, then the READY=1 that ends the reload (its STATUS= says how it went)."""
    engine.process.send_signal(signal.SIGHUP)
    await engine.notify.wait_for(lambda m: m.get("RELOADING") == "1")
    return await engine.notify.wait_for(is_ready)


async def test_a_failed_or_partly_ineffective_reload_shows_in_status_metrics_and_stats(
    short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's finding: a reload that failed (a bad file: the settings in force are kept) or whose change
    the command line overrides was told only in the journal, and `systemctl status` said all was well."""
    config = short_tmp / "engine.toml"
    write_config(config, rpm=100_000, tpm=10_000_000, concurrent=4, mini_rpm=6000, mini_tpm=600_000)
    http_socket = short_tmp / "engine.http"
    env = engine_env(TRIO_MAPPER_RMP="6000")  # a typo: never read
    args = ("--config", str(config), "--rpm", "100000", "--http-socket", str(http_socket))
    async with simulator() as url, activated_engine(short_tmp, url, *args, env=env) as engine:
        ready = await engine.notify.wait_for(is_ready)
        assert ready["STATUS"] == "serving: 0 connections, 0 outstanding, 0 in flight, 429s: 0"
        typo = "TRIO_MAPPER_RMP in the environment is not a setting of the engine and is ignored; did you mean "
        assert f"{typo}TRIO_MAPPER_RPM?" in engine.log
        samples = await metrics_of(http_socket)
        assert samples[("trio_mapper_config_last_reload_successful", frozenset())] == 1
        assert samples[("trio_mapper_config_reloads_total", frozenset({("result", "failed")}))] == 0

        # A bad tpm (a bad rpm would be hidden by --rpm), an unknown key, and the typo's line: three problems.
        config.write_text('[server]\ntpm = "lots"\nmax_concurrent_reqs = 1\nbogus = 1\n')
        failed = await reload_and_wait(engine)
        status = failed["STATUS"]
        assert status.startswith("serving: 0 connections, 0 outstanding, 0 in flight, 429s: 0; reload failed at ")
        # Counted, never quoted (a problem may quote a secret of the file): the log names each.
        assert status.endswith(": 3 problems in the settings (the log names each); running with the previous settings")
        assert "reload: server.tpm: expected an integer, got 'lots'" in engine.log
        samples = await metrics_of(http_socket)
        assert samples[("trio_mapper_config_reloads_total", frozenset({("result", "failed")}))] == 1
        assert samples[("trio_mapper_config_last_reload_successful", frozenset())] == 0
        reloads = (await stats(engine.socket))["engine"]["reloads"]
        assert reloads["failed"] == 1 and reloads["applied"] == 0
        assert reloads["failure"]["reason"].startswith("3 problems in the settings")

        # A good file again, whose rpm the command line overrides and whose max_queued needs a restart.
        write_config(config, rpm=60_000, tpm=10_000_000, concurrent=4, mini_rpm=6000, mini_tpm=600_000,
                     extra="max_queued = 1000")  # fmt: skip
        before = time.time()
        applied = await reload_and_wait(engine)
        assert applied["STATUS"].endswith(
            "; not applied: server.max_queued (needs a restart), server.rpm (the command line sets it)"
        )
        assert "; reloaded at " in applied["STATUS"] and "failed" not in applied["STATUS"]
        samples = await metrics_of(http_socket)
        assert samples[("trio_mapper_config_reloads_total", frozenset({("result", "applied")}))] == 1
        assert samples[("trio_mapper_config_last_reload_successful", frozenset())] == 1
        assert samples[("trio_mapper_config_last_reload_success_timestamp_seconds", frozenset())] >= before - 1
        assert samples[("trio_mapper_config_settings_not_applied", frozenset())] == 2
        engine_stats = await stats(engine.socket)
        assert engine_stats["engine"]["default_limits"]["rpm"] == 100_000, "the command line still wins"
        monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: no line is wrapped
        render(engine_stats)  # trio-mapper status, from the same stats
        shown = capsys.readouterr().out.replace("\n", "")
        assert "not applied since the reload at" in shown and "server.rpm (the command line sets it)" in shown
    log = engine.log
    assert "reload: server.rpm in the config file has no effect: the command line sets it to 100000" in log
    assert log.count(typo) == 3, "at start and at each reload"
    assert TEST_API_KEY not in log
    assert all(TEST_API_KEY not in str(message) for message in engine.notify.messages)


async def test_the_key_from_a_systemd_credential(short_tmp: Path) -> None:
    credentials = short_tmp / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "openai-api-key").write_text(TEST_API_KEY + "\n")
    (credentials / "openai-api-key").chmod(0o400)
    env = engine_env(CREDENTIALS_DIRECTORY=str(credentials))
    del env["OPENAI_API_KEY"]
    # The simulator accepts only this exact key: a result proves the credential was read (and stripped).
    async with (
        simulator(api_key=TEST_API_KEY) as url,
        activated_engine(short_tmp, url, *LIMITS, "--log-level", "debug", env=env) as engine,
    ):
        await engine.notify.wait_for(is_ready)
        async with await RawClient.connect(str(engine.socket)) as client:
            reply = await client.request(chat(1))
            assert reply["type"] == "result", reply
            stats_reply = await client.request({"type": "stats", "id": "s"})
        engine.process.send_signal(signal.SIGTERM)
        assert await engine.wait() == 0
    assert TEST_API_KEY not in str(stats_reply)
    assert TEST_API_KEY not in engine.log
    assert all(TEST_API_KEY not in str(message) for message in engine.notify.messages)


async def test_an_unreadable_credential_is_a_clear_start_up_error(short_tmp: Path) -> None:
    credentials = short_tmp / "credentials"
    (credentials / "openai-api-key").mkdir(parents=True)  # a directory where the key file should be
    env = engine_env(CREDENTIALS_DIRECTORY=str(credentials))
    del env["OPENAI_API_KEY"]
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_mapper", "launch-engine", *LIMITS, "--socket", str(short_tmp / "s")],
            env=env,
            capture_stderr=True,
            check=False,
            cwd=short_tmp,
        )
    assert result.returncode == 2
    assert b"openai.api_key: credential" in result.stderr
    assert b"cannot be read" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM), "SOCK_DGRAM"),
        (lambda: stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM), "not listening"),
    ],
    ids=["datagram", "not-listening"],
)
async def test_a_wrong_inherited_socket_is_refused(
    short_tmp: Path, make: Callable[[], stdlib_socket.socket], needle: str
) -> None:
    with make() as wrong:
        async with simulator() as url, activated_engine(short_tmp, url, *LIMITS, passed=wrong) as engine:
            assert await engine.wait() == 1
    assert needle in engine.log
    assert "Traceback" not in engine.log


async def test_socket_activation_passes_the_http_socket_too(short_tmp: Path) -> None:
    """Both sockets from systemd (LISTEN_FDNAMES=engine:http): each is served, neither is ours to create or remove."""
    http_path = short_tmp / "engine.sock.http"
    http = listening_socket(http_path)
    ours = short_tmp / "ours.http"  # an explicit http_socket: informational, as --socket is
    try:
        async with (
            simulator() as url,
            activated_engine(short_tmp, url, *LIMITS, "--http-socket", str(ours), http=http) as engine,
        ):
            await engine.notify.wait_for(is_ready)
            inodes = {path: os.lstat(path).st_ino for path in (engine.socket, http_path)}
            # The official SDK over the passed socket: no key, the socket's permissions decide.
            transport = httpx.AsyncHTTPTransport(uds=str(http_path))
            async with openai.AsyncOpenAI(
                api_key="unused",
                base_url="http://engine/v1",
                max_retries=0,
                timeout=30,
                http_client=httpx.AsyncClient(transport=transport),
            ) as client:
                completion = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], max_tokens=16
                )
                assert completion.choices[0].message.content
                assert [model async for model in client.models.list()]
            async with await RawClient.connect(str(engine.socket)) as msgpack:
                assert (await msgpack.request(chat(1)))["type"] == "result"
                stats_reply = await msgpack.request({"type": "stats", "id": "s"})
            assert stats_reply["engine"]["socket"] == str(engine.socket)
            assert stats_reply["engine"]["http"] == [f"unix:{http_path}"]
            assert stats_reply["engine"]["http_requests"]["requests"] >= 2
            engine.process.send_signal(signal.SIGTERM)
            assert await engine.wait() == 0

        # systemd owns both files: the engine neither removed them nor put new ones in their place.
        for path, inode in inodes.items():
            assert stat.S_ISSOCK(os.lstat(path).st_mode), f"{path.name}: the socket systemd created must stay"
            assert os.lstat(path).st_ino == inode, f"{path.name} was replaced"
        for path in (ours, short_tmp / "not-used.sock", short_tmp / "not-used.sock.http"):
            assert not path.exists(), f"{path.name}: no socket file of the engine's own under socket activation"
        log = engine.log
        assert "using the socket passed by systemd" in log
        assert f"using the HTTP socket passed by systemd ({http_path})" in log
        assert f"http_socket = {ours} is informational only" in log
        assert "Traceback" not in log
        assert TEST_API_KEY not in log
    finally:
        http.close()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM), "SOCK_DGRAM"),
        (lambda: stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM), "not listening"),
    ],
    ids=["datagram", "not-listening"],
)
async def test_a_wrong_inherited_http_socket_is_refused(
    short_tmp: Path, make: Callable[[], stdlib_socket.socket], needle: str
) -> None:
    with make() as wrong:
        async with simulator() as url, activated_engine(short_tmp, url, *LIMITS, http=wrong) as engine:
            assert await engine.wait() == 1
    assert "the HTTP socket" in engine.log
    assert needle in engine.log
    assert "Traceback" not in engine.log
    assert not (short_tmp / "not-used.sock.http").exists()


async def test_listen_fds_for_another_pid_are_ignored(short_tmp: Path) -> None:
    """LISTEN_PID names a parent: the fds are not ours; the engine makes its own socket at --socket."""
    socket_path = short_tmp / "engine.sock"
    env = engine_env(LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="engine")
    async with simulator() as url, running_engine(short_tmp, url, env=env) as engine:
        async with await RawClient.connect(str(socket_path)) as client:
            assert (await client.request({"type": "ping", "id": 1}))["type"] == "pong"
        assert await engine.stop() == 0
    assert "passed by systemd" not in engine.log
    assert not socket_path.exists(), "a socket the engine created itself is removed on exit"


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
async def test_with_systemds_own_socket_activate_tool(short_tmp: Path) -> None:
    """systemd-socket-activate binds, sets LISTEN_* and execs the engine exactly as PID 1 would."""
    socket_path = short_tmp / "engine.sock"
    notify = NotifyReceiver(short_tmp / "notify.sock")
    await notify.bind()
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    env = engine_env(NOTIFY_SOCKET=str(notify.path))
    async with simulator() as url:
        command = [
            tool, "--listen", str(socket_path), "--fdname", "engine", "-E", "OPENAI_API_KEY", "-E", "NOTIFY_SOCKET",
            "-E", "PYTHONUNBUFFERED", "-E", "PATH",
            sys.executable, "-m", "trio_mapper", "launch-engine", *LIMITS, "--base-url", url,
            "--socket", str(short_tmp / "not-used.sock"),
        ]  # fmt: skip
        log_path = short_tmp / "engine.log"
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(command, env=env, stdout=log_file, stderr=log_file)
        try:
            # The tool binds, then starts the engine on the first connection, which waits in the backlog.
            with trio.fail_after(30):
                while not socket_path.exists():  # noqa: ASYNC110 - another process's doing: nothing to wait on
                    await trio.sleep(0.02)
            async with await RawClient.connect(str(socket_path)) as client:
                await notify.wait_for(is_ready)
                assert (await client.request(chat(1)))["type"] == "result"
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            notify.close()
    assert "using the socket passed by systemd" in log_path.read_text()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
async def test_with_systemds_own_socket_activate_tool_and_the_http_socket(short_tmp: Path) -> None:
    """Two sockets from systemd's tool, the HTTP one first: the names, not the order, say which is which."""
    socket_path, http_path = short_tmp / "engine.sock", short_tmp / "engine.sock.http"
    notify = NotifyReceiver(short_tmp / "notify.sock")
    await notify.bind()
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    env = engine_env(NOTIFY_SOCKET=str(notify.path))
    async with simulator() as url:
        command = [
            tool, "--listen", str(http_path), "--listen", str(socket_path), "--fdname", "http:engine",
            "-E", "OPENAI_API_KEY", "-E", "NOTIFY_SOCKET", "-E", "PYTHONUNBUFFERED", "-E", "PATH",
            sys.executable, "-m", "trio_mapper", "launch-engine", *LIMITS, "--base-url", url,
            "--socket", str(short_tmp / "not-used.sock"),
        ]  # fmt: skip
        log_path = short_tmp / "engine.log"
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(command, env=env, stdout=log_file, stderr=log_file)
        try:
            with trio.fail_after(30):
                while not (socket_path.exists() and http_path.exists()):  # noqa: ASYNC110 - another process's doing
                    await trio.sleep(0.02)
            # The first connection, on the HTTP socket, starts the engine; the request waits in the backlog.
            transport = httpx.AsyncHTTPTransport(uds=str(http_path))
            async with httpx.AsyncClient(transport=transport, timeout=60) as client:
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
                response = await client.post("http://engine/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
            await notify.wait_for(is_ready)
            async with await RawClient.connect(str(socket_path)) as msgpack:
                assert (await msgpack.request(chat(1)))["type"] == "result"
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            notify.close()
    log = log_path.read_text()
    assert f"using the socket passed by systemd ({socket_path})" in log
    assert f"using the HTTP socket passed by systemd ({http_path})" in log


# --- peer credentials ---------------------------------------------------------------------------------------


async def test_clients_outside_the_allow_list_are_refused(short_tmp: Path) -> None:
    other_uid = os.getuid() + 4242
    env = engine_env(TRIO_MAPPER_ALLOWED_UIDS=str(other_uid))
    async with simulator() as url, running_engine(short_tmp, url, env=env) as engine:
        async with await RawClient.connect(str(engine.socket), hello=False) as client:
            reply = await client.request({"type": "hello", "protocol": 1})
            assert reply["type"] == "error"
            assert reply["kind"] == "forbidden"
            assert reply["id"] is None
            assert f"uid {os.getuid()}" in reply["message"]
            assert "allowed_uids" in reply["message"]
            with pytest.raises(EOFError):
                await client.receive()
        assert await engine.stop() == 0
    assert f"refused a client (pid {os.getpid()} uid {os.getuid()} gid {os.getgid()})" in engine.log


@pytest.mark.parametrize("variable", ["TRIO_MAPPER_ALLOWED_UIDS", "TRIO_MAPPER_ALLOWED_GIDS"], ids=["by-uid", "by-gid"])
async def test_clients_on_the_allow_list_are_served(short_tmp: Path, variable: str) -> None:
    mine = os.getuid() if variable.endswith("UIDS") else os.getgid()
    env = engine_env(**{variable: f"{mine + 4242}, {mine}"})
    async with simulator() as url, running_engine(short_tmp, url, "--log-level", "debug", env=env) as engine:
        async with await RawClient.connect(str(engine.socket)) as client:
            assert (await client.request(chat(1)))["type"] == "result"
        assert await engine.stop() == 0
    # The connection's label names the peer in every log line about it.
    assert f"(pid {os.getpid()} uid {os.getuid()})" in engine.log


async def test_a_reload_that_removes_a_uid_cuts_its_open_connections(short_tmp: Path) -> None:
    """The msgpack socket checks a client when it connects: without this, a revoked user kept a connection
    open and went on spending the key (the HTTP front refuses their next request)."""
    config = short_tmp / "engine.toml"
    allowing = f"allowed_uids = [{os.getuid()}]"
    write_config(config, rpm=6000, tpm=600_000, concurrent=4, mini_rpm=6000, mini_tpm=600_000, extra=allowing)
    async with simulator() as url, running_engine(short_tmp, url, "--config", str(config)) as engine:
        async with await RawClient.connect(str(engine.socket)) as client:
            assert (await client.request(chat(1)))["type"] == "result"
            extra = f"allowed_uids = [{os.getuid() + 4242}]"
            write_config(config, rpm=6000, tpm=600_000, concurrent=4, mini_rpm=6000, mini_tpm=600_000, extra=extra)
            engine.process.send_signal(signal.SIGHUP)
            with trio.fail_after(10), pytest.raises(EOFError):
                await client.receive()
        assert await engine.stop() == 0
    assert "disconnected: its uid/gid is no longer in allowed_uids/allowed_gids" in engine.log


async def test_a_reload_stuck_reading_its_files_does_not_stall_the_engine(short_tmp: Path) -> None:
    """SIGHUP read the config and keys files on the event loop: a config path that became a FIFO (or a hung
    network filesystem) stopped every client and SIGTERM itself. Now the files are read in a thread, a read
    that takes too long is given up and logged, and the engine serves on."""
    config = short_tmp / "engine.toml"
    write_config(config, rpm=6000, tpm=600_000, concurrent=4, mini_rpm=6000, mini_tpm=600_000)
    async with simulator() as url, running_engine(short_tmp, url, "--config", str(config)) as engine:
        config.unlink()
        os.mkfifo(config)  # opening it for reading waits for a writer that never comes
        engine.process.send_signal(signal.SIGHUP)
        await trio.sleep(0.5)
        async with await RawClient.connect(str(engine.socket)) as client:
            with trio.fail_after(10):
                assert (await client.request(chat(1)))["type"] == "result"
        with trio.fail_after(20):
            while "reload: gave up reading" not in engine.log:  # noqa: ASYNC110 - the engine's log, another process
                await trio.sleep(0.1)
        config.unlink()
        write_config(config, rpm=6000, tpm=600_000, concurrent=4, mini_rpm=7000, mini_tpm=600_000)
        engine.process.send_signal(signal.SIGHUP)  # a readable file again: this one is applied
        with trio.fail_after(20):
            while "reloaded: models.gpt-4o-mini: rpm 6000 -> 7000" not in engine.log:  # noqa: ASYNC110 - as above
                await trio.sleep(0.1)
        with trio.fail_after(20):
            assert await engine.stop() == 0


def test_allow_list_semantics() -> None:
    peer = PeerCredentials(pid=1, uid=1000, gid=1000, groups=frozenset({1000, 27, 1500}))
    assert is_allowed(peer, [], [])
    assert is_allowed(None, [], []), "no allow-list: the socket's permissions decide"
    assert is_allowed(peer, [1000], [])
    assert is_allowed(peer, [], [1500]), "a supplementary group counts (SO_PEERGROUPS)"
    assert not is_allowed(peer, [1001], [1501])
    assert not is_allowed(None, [1000], [])


# --- the pieces, in-process ---------------------------------------------------------------------------------


async def test_notify_to_an_abstract_socket() -> None:
    name = f"tm-test-{os.getpid()}-{id(object())}"
    receiver = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM)
    with receiver:
        await receiver.bind("\0" + name)
        environ = {"NOTIFY_SOCKET": "@" + name}
        notifier = systemd.Notifier.from_environment(environ)
        assert "NOTIFY_SOCKET" not in environ, "children must not inherit it"
        assert notifier.ready("serving:\n0 connections")
        with trio.fail_after(5):
            assert await receiver.recv(4096) == b"READY=1\nSTATUS=serving: 0 connections"
        notifier.close()


def test_notify_is_off_without_systemd_and_never_raises(tmp_path: Path) -> None:
    assert not systemd.Notifier.from_environment({}).ready("x")
    gone = systemd.Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled
    assert not gone.watchdog()  # ENOENT: logged, not raised
    assert not systemd.Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    environ = {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": pid}
    assert systemd.watchdog_interval(environ) == 0.2
    assert environ == {}
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "400000"}) == 0.2
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert systemd.watchdog_interval({}) is None


def test_listen_fds_are_trusted_only_for_our_pid_and_always_unset() -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "engine", "OTHER": "x"}
    assert systemd.listen_fds(environ) == {}
    assert environ == {"OTHER": "x"}
    assert systemd.take_listening_sockets({}) == systemd.ListeningSockets(engine=None, http=None)
    with pytest.raises(systemd.SystemdError, match="not a number"):
        systemd.listen_fds({"LISTEN_FDS": "many", "LISTEN_PID": str(os.getpid())})


def passed_socket(kind: str, path: Path) -> int:
    """A real fd of ``kind`` as a misconfigured (or correct) socket unit would pass it, detached from Python."""
    if kind == "file":
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if kind == "tcp":
        sock = stdlib_socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    elif kind == "datagram":
        sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_DGRAM)
        sock.bind(str(path))
    elif kind == "unlistened":
        sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        sock.bind(str(path))
    else:
        assert kind == "unix"
        sock = listening_socket(path)
    return sock.detach()


def hand_over(directory: Path, *specs: str) -> tuple[dict[int, str], dict[str, Path]]:
    """What ``listen_fds`` returns for sockets ``name`` or ``name=kind`` (default: listening Unix stream).

    Also where each name's socket is bound, to tell which fd came back in which role.
    """
    fds: dict[int, str] = {}
    paths: dict[str, Path] = {}
    for index, spec in enumerate(specs):
        name, _, kind = spec.partition("=")
        path = directory / f"{index}-{name}.sock"
        fds[passed_socket(kind or "unix", path)] = name
        paths.setdefault(name, path)
    return fds, paths


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def bound_to(sock: stdlib_socket.socket | None) -> str | None:
    return None if sock is None else systemd.socket_path(sock)


@pytest.mark.parametrize(
    "names", [("engine", "http"), ("http", "engine"), ("metrics", "http", "engine")], ids=lambda n: ":".join(n)
)
def test_passed_sockets_by_role(short_tmp: Path, names: tuple[str, ...], caplog: pytest.LogCaptureFixture) -> None:
    fds, paths = hand_over(short_tmp, *names)
    with caplog.at_level(logging.WARNING, logger="trio_mapper.systemd"):
        found = systemd.listening_sockets(fds)
    try:
        assert bound_to(found.engine) == str(paths["engine"])
        assert bound_to(found.http) == str(paths["http"])
        used = {found.engine.fileno(), found.http.fileno()}  # type: ignore[union-attr]
        assert used == {fd for fd, name in fds.items() if name in ("engine", "http")}, "the fds passed, not copies"
        unused = [fd for fd, name in fds.items() if name not in ("engine", "http")]
        assert all(is_closed(fd) for fd in unused)
        assert [record.getMessage() for record in caplog.records] == [
            f"closing fd {fd} (named 'metrics') passed by systemd: not used" for fd in unused
        ]
    finally:
        for sock in (found.engine, found.http):
            if sock is not None:
                sock.close()


@pytest.mark.parametrize(
    ("names", "http"),
    [(("unknown",), False), (("trio-mapper.socket",), False), (("unknown", "http"), True)],
    ids=["unnamed", "named-otherwise", "unnamed-and-http"],
)
def test_the_only_socket_not_named_http_is_the_msgpack_one(short_tmp: Path, names: tuple[str, ...], http: bool) -> None:
    fds, paths = hand_over(short_tmp, *names)
    found = systemd.listening_sockets(fds)
    try:
        assert bound_to(found.engine) == str(paths[names[0]])
        assert bound_to(found.http) == (str(paths["http"]) if http else None)
    finally:
        for sock in (found.engine, found.http):
            if sock is not None:
                sock.close()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("engine", "http", "http"), r"2 sockets named 'http' .*FileDescriptorName=http on one socket unit only"),
        (("unknown", "unknown"), r"2 sockets .* not exactly one is named 'engine'; set FileDescriptorName=engine"),
        (("engine", "engine", "http"), r"not exactly one is named 'engine'"),
        (("unknown", "other", "http"), r"not exactly one is named 'engine'"),
        (("http",), r"only the HTTP socket .*not the engine's msgpack socket"),
        (("engine", "http=datagram"), r"named 'http', the HTTP socket\) passed by systemd is a AF_UNIX SOCK_DGRAM"),
        (("engine", "http=unlistened"), r"named 'http', the HTTP socket\) passed by systemd is not listening"),
        (("engine", "http=tcp"), r"HTTP socket\) .* AF_INET SOCK_STREAM socket; .*http = \"127\.0\.0\.1:PORT\""),
        (("engine", "http=file"), r"named 'http', the HTTP socket\) passed by systemd is not a socket"),
        (
            ("engine=datagram", "http"),
            r"named 'engine', the msgpack socket\) passed by systemd is a AF_UNIX SOCK_DGRAM",
        ),
    ],
    ids=[
        "two-http",
        "two-unnamed",
        "two-engine",
        "two-unnamed-and-http",
        "http-only",
        "http-datagram",
        "http-not-listening",
        "http-tcp",
        "http-not-a-socket",
        "engine-datagram",
    ],
)
def test_misconfigured_hand_overs_are_refused_and_every_fd_closed(
    short_tmp: Path, names: tuple[str, ...], message: str
) -> None:
    fds, _ = hand_over(short_tmp, *names)
    with pytest.raises(systemd.SystemdError, match=message):
        systemd.listening_sockets(fds)
    assert all(is_closed(fd) for fd in fds), "an engine that refuses to start leaves no passed fd open"


def test_credentials(tmp_path: Path) -> None:
    (tmp_path / "openai-api-key").write_text(f"  {TEST_API_KEY}\n")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert systemd.read_credential("openai-api-key", environ) == TEST_API_KEY
    assert systemd.read_credential("absent", environ) is None
    assert systemd.read_credential("openai-api-key", {}) is None
    # Precedence: environment > credential > .env.
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-from-dotenv-0000\n")
    assert find_api_key(environ, tmp_path) == TEST_API_KEY
    assert find_api_key({**environ, "OPENAI_API_KEY": "sk-env-1111"}, tmp_path) == "sk-env-1111"
    assert find_api_key({}, tmp_path) == "sk-from-dotenv-0000"
    (tmp_path / "openai-api-key").write_bytes(b"\xff\xfe" + TEST_API_KEY.encode())
    with pytest.raises(SettingsError) as caught:
        find_api_key(environ, None)
    assert "not UTF-8" in str(caught.value)
    assert TEST_API_KEY not in str(caught.value)


def test_allow_lists_from_environment_and_file(tmp_path: Path) -> None:
    base = {"OPENAI_API_KEY": TEST_API_KEY, "TRIO_MAPPER_RPM": "1", "TRIO_MAPPER_TPM": "1"}
    environ = {**base, "TRIO_MAPPER_MAX_CONCURRENT_REQS": "1", "TRIO_MAPPER_ALLOWED_UIDS": "1000, 1001,"}
    settings = load_settings(cli={}, config_file=None, environ=environ, dotenv_dir=None)
    assert settings.server.allowed_uids == [1000, 1001]
    assert settings.server.allowed_gids == []
    config = tmp_path / "engine.toml"
    config.write_text("[server]\nmax_concurrent_reqs = 1\nallowed_gids = [27, -1]\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(cli={}, config_file=config, environ=base, dotenv_dir=None)
    assert any(problem.startswith("server.allowed_gids:") for problem in caught.value.problems)
    with pytest.raises(SettingsError, match="allowed_uids"):
        load_settings(
            cli={}, config_file=None, environ={**environ, "TRIO_MAPPER_ALLOWED_UIDS": "alice"}, dotenv_dir=None
        )


def test_reload_plan_applies_limits_and_refuses_the_rest() -> None:
    environ = {"OPENAI_API_KEY": TEST_API_KEY, "TRIO_MAPPER_MAX_CONCURRENT_REQS": "4"}
    current = load_settings(cli={"rpm": 10, "tpm": 100}, config_file=None, environ=environ, dotenv_dir=None)
    new = load_settings(
        cli={"rpm": 20, "tpm": 100, "socket": "/tmp/x.sock", "base_url": "http://127.0.0.1:1/v1"},
        config_file=None,
        environ={**environ, "OPENAI_API_KEY": "sk-another-key-9876543210"},
        dotenv_dir=None,
    )
    plan = plan_reload(current, new)
    assert plan.applied == ["server.rpm: 10 -> 20"]
    assert plan.settings.server.rpm == 20
    assert plan.settings.server.socket == current.server.socket
    assert plan.settings.openai == current.openai
    refused = "\n".join(plan.refused)
    assert "server.socket" in refused and "openai.base_url" in refused and "openai.api_key" in refused
    assert TEST_API_KEY not in refused and "sk-another" not in refused


# --- the unit files -----------------------------------------------------------------------------------------


def units_for_verification(directory: Path) -> list[Path]:
    """Copies of the units whose ExecStart names this venv's trio-mapper, which verify checks is executable."""
    binary = Path(sys.executable).parent / "trio-mapper"
    if not binary.exists():
        pytest.skip(f"{binary} is not installed (pip install -e .)")
    copies = []
    for name in ("trio-mapper.socket", "trio-mapper-http.socket", "trio-mapper.service"):
        text = (UNITS / name).read_text().replace("/opt/trio-mapper/bin/trio-mapper", str(binary))
        (directory / name).write_text(text)
        copies.append(directory / name)
    return copies


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    result = systemd_analyze_verify(units_for_verification(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def systemd_analyze_verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True, timeout=120
    )


def documented_reload_check() -> str:
    """The drop-in docs/systemd.md gives to run ``trio-mapper check-config`` before the SIGHUP."""
    text = (ROOT / "docs" / "systemd.md").read_text()
    found = re.search(r"```ini\n(\[Service\]\nExecReload=\n.*?)```", text, re.DOTALL)
    assert found is not None, "docs/systemd.md lost its ExecReload= drop-in"
    return found.group(1)


def test_the_documented_reload_check_runs_check_config_then_the_sighup() -> None:
    service = unit_settings("trio-mapper.service")
    # The check takes launch-engine's options: the drop-in must give it those of ExecStart=.
    options = service["ExecStart"][0].split(" launch-engine ", 1)[1]
    assert documented_reload_check().splitlines() == [
        "[Service]",
        "ExecReload=",
        f"ExecReload=/opt/trio-mapper/bin/trio-mapper check-config {options}",
        *(f"ExecReload={line}" for line in service["ExecReload"]),
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)")
def test_systemd_analyze_verify_accepts_the_reload_check_drop_in(tmp_path: Path) -> None:
    units = units_for_verification(tmp_path)
    binary = Path(sys.executable).parent / "trio-mapper"
    (tmp_path / "trio-mapper.service.d").mkdir()
    drop_in = documented_reload_check().replace("/opt/trio-mapper/bin/trio-mapper", str(binary))
    (tmp_path / "trio-mapper.service.d" / "check-config.conf").write_text(drop_in)
    result = systemd_analyze_verify(units)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # verify reads the drop-in: one naming a command that does not exist is refused.
    (tmp_path / "trio-mapper.service.d" / "check-config.conf").write_text(drop_in.replace(str(binary), "/nonexistent"))
    broken = systemd_analyze_verify(units)
    assert broken.returncode != 0 and "/nonexistent" in broken.stderr


def test_check_config_finds_the_key_in_the_credential_as_the_engine_does(short_tmp: Path) -> None:
    """Under the unit, ExecReload= runs the check with the service's $CREDENTIALS_DIRECTORY."""
    credentials = short_tmp / "credentials"
    credentials.mkdir()
    (credentials / systemd.API_KEY_CREDENTIAL).write_text(TEST_API_KEY + "\n")
    env = engine_env(CREDENTIALS_DIRECTORY=str(credentials))
    del env["OPENAI_API_KEY"]
    command = [sys.executable, "-m", "trio_mapper", "check-config", "--rpm", "1", "--tpm", "1"]
    result = subprocess.run(
        [*command, "--max-concurrent-reqs", "1"], env=env, cwd=short_tmp, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert TEST_API_KEY not in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)")
def test_systemd_analyze_security_rates_the_service_ok(tmp_path: Path) -> None:
    service = next(unit for unit in units_for_verification(tmp_path) if unit.suffix == ".service")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r"Overall exposure level for trio-mapper\.service: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_http_socket_unit_matches_the_engine_socket_unit() -> None:
    """The HTTP socket reaches the same clients as the msgpack one, beside it, under the name the engine looks for."""
    engine, http = unit_settings("trio-mapper.socket"), unit_settings("trio-mapper-http.socket")
    service = unit_settings("trio-mapper.service")
    assert engine["FileDescriptorName"] == [systemd.ENGINE_FD_NAME]
    assert http["FileDescriptorName"] == [systemd.HTTP_FD_NAME]
    # Where the engine would put it itself (http_socket's default): the msgpack socket's path + ".http".
    assert http["ListenStream"] == [engine["ListenStream"][0] + ".http"]
    for key in ("SocketUser", "SocketGroup", "SocketMode", "DirectoryMode", "Accept", "Backlog", "RemoveOnStop"):
        assert http[key] == engine[key], key
    assert http["Service"] == ["trio-mapper.service"]
    assert service["Sockets"] == ["trio-mapper.socket trio-mapper-http.socket"]


def test_example_config_is_valid() -> None:
    settings = load_settings(
        cli={}, config_file=UNITS / "trio-mapper.toml", environ={"OPENAI_API_KEY": TEST_API_KEY}, dotenv_dir=None
    )
    assert str(settings.server.socket) == "/run/trio-mapper/engine.sock"
    unit = (UNITS / "trio-mapper.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.MULTILINE)
    assert stop is not None
    assert settings.server.grace_period + 5 < int(stop.group(1)), "TimeoutStopSec must exceed grace + flush"
