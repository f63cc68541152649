"""SIGTERM/SIGINT at any moment of the engine's life: exit status 0 and no socket file left behind.

systemd stopping a unit that has just started sends SIGTERM at an arbitrary point of start-up; so does a user's
Ctrl+C. The engine runs as a real subprocess here and gets the signal at chosen moments: the instant its
socket file appears, while it builds its upstream clients, at random points of start-up, and a second time
during the grace period.
"""

from __future__ import annotations

import os
import random
import signal
import stat
from pathlib import Path

import attrs
import pytest
import trio
from conftest import engine_command, engine_env, running_engine, simulator
from raw_client import RawClient, chat

#: Nothing is sent upstream in the start-up tests: the engine needs a base URL to start, not an upstream.
UNUSED_UPSTREAM = "http://127.0.0.1:9/v1"
LOCK_NAME = ".engine.sock.lock"
#: The HTTP front's socket beside it has its own lock, kept for the same reason.
HTTP_LOCK_NAME = ".engine.sock.http.lock"


@attrs.define
class Trial:
    """One engine started for one signal; its socket is in a directory the engine creates itself."""

    process: trio.Process
    socket: Path
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def left_on_disk(self) -> list[str] | None:
        """What the engine left in its socket directory; None when it never created the directory."""
        directory = self.socket.parent
        return sorted(path.name for path in directory.iterdir()) if directory.exists() else None

    async def wait(self) -> int:
        with trio.fail_after(60):  # hang guard only
            return await self.process.wait()


def trial_paths(directory: Path) -> tuple[Path, Path]:
    """The socket and log paths of a trial in ``directory``, which is created; the socket's is not."""
    directory.mkdir()
    # The engine creates run/ itself, so "nothing on disk" covers the directory, the lock and the socket.
    return directory / "run" / "engine.sock", directory / "engine.log"


def exists(path: Path) -> bool:
    # A plain stat, called in a tight loop on purpose: no thread hop between two looks.
    return os.path.lexists(path)


async def start_trial(directory: Path, *extra: str) -> Trial:
    socket, log_path = trial_paths(directory)
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            engine_command(socket, UNUSED_UPSTREAM, *extra),
            env=engine_env(),
            stdout=log_file,
            stderr=log_file,
            cwd=directory,
        )
    return Trial(process, socket, log_path)


async def signal_when_socket_appears(trial: Trial, signum: int) -> None:
    """Send ``signum`` as soon as the socket file exists: polled in a tight loop, with no sleep in between."""
    with trio.fail_after(60):
        while not exists(trial.socket):
            assert trial.process.returncode is None, f"engine exited with {trial.process.returncode}:\n{trial.log}"
            await trio.lowlevel.checkpoint()
    trial.process.send_signal(signum)


def assert_ended_cleanly(trial: Trial, returncode: int, signum: int) -> None:
    left = trial.left_on_disk()
    if returncode == -signum or (signum == signal.SIGINT and returncode == 130):
        # Killed by the default action (or a KeyboardInterrupt): only before the engine created anything.
        assert left is None, f"ended by {signal.Signals(signum).name} after creating {left}:\n{trial.log}"
        return
    assert returncode == 0, f"exit status {returncode}, left {left}:\n{trial.log}"
    # The lock file stays on purpose (docs/systemd.md): empty, 0600, reused by the next engine.
    assert left in (None, [], [LOCK_NAME], [HTTP_LOCK_NAME, LOCK_NAME]), f"left {left} behind:\n{trial.log}"
    for name in left or []:
        lock = os.lstat(trial.socket.parent / name)
        assert (lock.st_size, stat.S_IMODE(lock.st_mode)) == (0, 0o600)
    assert "Traceback" not in trial.log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_the_moment_the_socket_appears_ends_cleanly(short_tmp: Path, signum: int) -> None:
    for attempt in range(5):
        trial = await start_trial(short_tmp / f"trial-{attempt}")
        await signal_when_socket_appears(trial, signum)
        returncode = await trial.wait()
        assert returncode == 0, f"exit status {returncode}, left {trial.left_on_disk()}:\n{trial.log}"
        assert_ended_cleanly(trial, returncode, signum)


async def test_sigterm_while_the_upstream_clients_are_built_ends_cleanly(short_tmp: Path) -> None:
    # 1024 concurrent requests means 128 pooled httpx clients, each with its own SSL context: building them
    # takes a while after the socket exists, so the signal lands in the middle of it.
    options = ("--max_concurrent_reqs", "1024", "--max_nb_sockets", "1024")
    for attempt in range(3):
        trial = await start_trial(short_tmp / f"trial-{attempt}", *options)
        await signal_when_socket_appears(trial, signal.SIGTERM)
        returncode = await trial.wait()
        assert returncode == 0, f"exit status {returncode}, left {trial.left_on_disk()}:\n{trial.log}"
        assert_ended_cleanly(trial, returncode, signal.SIGTERM)


async def test_sigterm_at_random_moments_of_start_up_ends_cleanly(short_tmp: Path) -> None:
    # The engine takes a few hundred milliseconds to serve: these delays land before the signal receiver
    # exists, while settings and encodings load, around the socket's creation and while it starts serving.
    rng = random.Random(20261201)
    for attempt in range(20):
        delay = rng.uniform(0, 0.6)
        trial = await start_trial(short_tmp / f"trial-{attempt}")
        await trio.sleep(delay)
        trial.process.send_signal(signal.SIGTERM)
        returncode = await trial.wait()
        assert_ended_cleanly(trial, returncode, signal.SIGTERM)


async def test_a_second_sigterm_cuts_the_grace_period_short(short_tmp: Path) -> None:
    # The upstream takes ten minutes to answer and the grace period is ten minutes too: only the second
    # signal can end the wait within the hang guard's minute.
    async with (
        simulator(latency_ms=600_000.0) as url,
        running_engine(short_tmp, url, "--grace-period", "600") as engine,
    ):
        async with await RawClient.connect(str(engine.socket)) as client:
            await client.send(chat("slow"))
            with trio.fail_after(30):
                while (  # noqa: ASYNC110 - polling another process's state: no event to wait on
                    await client.request({"type": "stats", "id": "s"})
                )["engine"]["in_flight"] < 1:
                    await trio.sleep(0.05)
            engine.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                while "shutting down: answered" not in engine.log:  # noqa: ASYNC110 - the engine's log file
                    await trio.sleep(0.05)
            assert not engine.socket.exists(), "the first signal stops accepting and removes the socket"
            engine.process.send_signal(signal.SIGTERM)
            with trio.fail_after(60):  # hang guard, far below the grace period
                reply = await client.receive()
                assert await engine.process.wait() == 0
        assert (reply["id"], reply["type"], reply["kind"]) == ("slow", "error", "shutting_down"), reply
        assert not engine.socket.exists()
        assert "cancelling in-flight requests now" in engine.log
