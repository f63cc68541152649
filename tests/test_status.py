"""``trio-mapper status``, run as a user would: a subprocess against a real engine (or none)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio
from conftest import ROOT, running_engine, simulator

from trio_mapper import AsyncClient


def status_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TRIO_MAPPER_"))}
    # Not a TTY, so rich falls back to 80 columns and would squeeze the lane name; give the table room.
    env["COLUMNS"] = "200"
    return env


async def run_status(socket: Path, *extra: str) -> tuple[int, str, str]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_mapper", "status", "--socket", str(socket), *extra],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=status_env(),
            cwd=ROOT,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_status_shows_the_engine_and_its_lanes(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        async with AsyncClient(engine.socket) as client:  # a request, so that a lane exists
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            await client.request("/v1/chat/completions", body)

        status, table, stderr = await run_status(engine.socket)
        assert status == 0, stderr
        assert str(engine.socket) in table
        assert "gpt-4o-mini" in table
        assert "429s" in table

        status, raw, stderr = await run_status(engine.socket, "--json")
        assert status == 0, stderr
        stats = json.loads(raw)
        assert set(stats) == {"engine", "lanes"}
        assert stats["engine"]["socket"] == str(engine.socket)
        assert stats["engine"]["accepted"] >= 1
        assert stats["lanes"]["gpt-4o-mini"]["succeeded"] == 1


async def test_status_of_an_idle_engine_says_so(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        status, table, stderr = await run_status(engine.socket)
    assert status == 0, stderr
    assert "no requests seen yet" in table


async def test_status_without_an_engine_exits_3_with_a_clear_message(short_tmp: Path) -> None:
    socket = short_tmp / "nobody-here.sock"
    status, stdout, stderr = await run_status(socket)
    assert status == 3
    assert stdout == ""
    assert stderr.startswith("trio-mapper status: ")
    assert str(socket) in stderr  # which path was tried…
    assert "launch-engine" in stderr  # …and how to start an engine there
    assert "Traceback" not in stderr

    status, stdout, stderr = await run_status(socket, "--json")
    assert status == 3 and stdout == ""
