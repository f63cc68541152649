"""``trio-mapper status``, run as a user would: a subprocess against a real engine (or none)."""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import ROOT, running_engine, simulator

from trio_mapper import AsyncClient
from trio_mapper.tools.status import render

#: A model name as a hostile client might send it: set the terminal's title, clear the screen, a C1 CSI,
#: DEL, a forged line, and rich markup that would recolour (or hide) the rest of the table.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J[red]evil[/red][link=http://x]\x9b31m\x7f\nforged"
#: How it must look: every control character escaped, the markup as it is.
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J[red]evil[/red][link=http://x]\\x9b31m\\x7f\\nforged"
#: The colours rich adds itself when it writes to a terminal.
SGR = re.compile(r"\x1b\[[0-9;]*m")


def control_characters(text: str) -> list[str]:
    """What a terminal would act on rather than show, but for the line breaks between lines."""
    return [char for char in text if unicodedata.category(char) == "Cc" and char != "\n"]


def status_env(columns: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TRIO_MAPPER_"))}
    # Not a TTY, so rich falls back to 80 columns and would squeeze the lane name; give the table room.
    env["COLUMNS"] = str(columns)
    return env


async def run_status(socket: Path, *extra: str, columns: int = 200) -> tuple[int, str, str]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "trio_mapper", "status", "--socket", str(socket), *extra],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=status_env(columns),
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
        assert f"http on unix:{engine.socket}.http" in table.replace("\n", "")

        status, raw, stderr = await run_status(engine.socket, "--json")
        assert status == 0, stderr
        stats = json.loads(raw)
        assert set(stats) == {"engine", "lanes"}
        assert stats["engine"]["socket"] == str(engine.socket)
        assert stats["engine"]["accepted"] == 1
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


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_engine_strings_are_shown_as_text_never_acted_on(
    terminal: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    if terminal:  # as on a real terminal: rich writes its own colours, and would interpret markup in colour
        monkeypatch.setenv("FORCE_COLOR", "1")
    else:
        monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    shown = "version pid socket base_url connections outstanding in_flight max_concurrent_reqs period_length"
    engine: dict[str, Any] = {key: f"{key}:{HOSTILE}" for key in [*shown.split(), "ledger_mode"]}
    lane = {"queued": 1, "succeeded": 2, "budget": {"pause_remaining": 1.5}}
    render({"engine": {**engine, "closing": True, "uptime": 3}, "lanes": {HOSTILE: lane}})
    output = capsys.readouterr().out
    assert bool(SGR.search(output)) is terminal
    plain = SGR.sub("", output)
    assert control_characters(plain) == [], [char for char in control_characters(plain)][:10]
    for key in engine:
        assert f"{key}:{SHOWN}" in plain, key
    assert plain.count(SHOWN) == len(engine) + 1, "the lane's row names the model as it is"
    assert "shutting down" in plain
    assert not any(line.startswith("forged") for line in plain.splitlines())


async def test_status_escapes_a_hostile_model_name_from_a_real_engine(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        async with AsyncClient(engine.socket) as client:  # the lane is named by whatever model a client sends
            body = {"model": HOSTILE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            with trio.move_on_after(30):  # answered or refused upstream, the lane exists either way
                await client.request_result("/v1/chat/completions", body)
            assert HOSTILE in (await client.stats())["lanes"]
        status, table, stderr = await run_status(engine.socket, columns=400)
    assert status == 0, stderr
    assert control_characters(table) == []
    assert SHOWN in table


def test_the_shared_budget_state_is_shown(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    budget = {"backend": "redis", "state": "unreachable: holding requests", "engines": 3, "failure_policy": "wait"}
    render({"engine": {"budget": budget}, "lanes": {}})
    plain = SGR.sub("", capsys.readouterr().out)
    assert "budget shared through Redis: unreachable: holding requests  engines on the key 3" in plain
    render({"engine": {"budget": {"backend": "local"}}, "lanes": {}})
    assert "Redis" not in capsys.readouterr().out
