"""``trio-mapper status``, run as a user would: a subprocess against a real engine (or none)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import ROOT, running_engine, simulator

from trio_mapper import AsyncClient
from trio_mapper.tools.status import render
from trio_mapper.wire import PROTOCOL_VERSION, Welcome, engine_codec

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


def status_env() -> dict[str, str]:
    # COLUMNS too: the output is a pipe, as it is for a script, which must see every name whole.
    return {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TRIO_MAPPER_", "COLUMNS"))}


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
        assert f"http on unix:{engine.socket}.http" in table.replace("\n", "")
        assert "bodies 0.0 of 1,024.0 MiB" in table.replace("\n", "")

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
        status, table, stderr = await run_status(engine.socket)
    assert status == 0, stderr
    assert control_characters(table) == []
    assert SHOWN in table


def test_the_shared_budget_state_is_shown(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    budget = {"backend": "redis", "state": "unreachable: holding requests", "engines": 3, "failure_policy": "wait"}
    render({"engine": {"budget": budget}, "lanes": {}})
    plain = SGR.sub("", capsys.readouterr().out)
    assert "budget shared through Redis: unreachable: holding requests  engines on the key 3" in plain
    assert "cut off" not in plain
    render({"engine": {"budget": budget | {"state": "ok", "kept_for_cut_off_engines": 1 / 3}}, "lanes": {}})
    plain = SGR.sub("", capsys.readouterr().out)
    assert "keeping 33% of the limits for engines cut off from Redis" in plain
    render({"engine": {"budget": {"backend": "local"}}, "lanes": {}})
    assert "Redis" not in capsys.readouterr().out


def tenant_stats(**overrides: Any) -> dict[str, Any]:
    tenant = {"priority": "default", "weight": 1.0, "rpm_cap": None, "tpm_cap": None, "daily_tokens": None,
              "daily_cost": None, "tokens_24h": 0, "cost_24h": 0.0, "queued": 0}  # fmt: skip
    return tenant | overrides


def test_tenants_are_shown_with_their_settings_and_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    tenants = {
        "nightly": tenant_stats(priority="batch", weight=3.0, tpm_cap="25% of the limit", daily_tokens=2_000_000,
                                tokens_24h=1_234_567, queued=412),
        "alice": tenant_stats(priority="interactive", rpm_cap="60/min", tokens_24h=9_876),
        "default": tenant_stats(tokens_24h=5),
    }  # fmt: skip
    render({"engine": {"tenants": tenants}, "lanes": {}})
    lines = SGR.sub("", capsys.readouterr().out).splitlines()
    header = next(line for line in lines if "tenant" in line)
    for column in ("class", "weight", "rpm cap", "tpm cap", "daily budget", "tokens 24h", "queued"):
        assert column in header
    assert "cost" not in header, "no price table, no cost budget: no column of zeros"
    nightly = next(line for line in lines if line.lstrip().startswith("nightly"))
    for cell in ("batch", "3", "25% of the limit", "2,000,000 tokens", "1,234,567", "412"):
        assert cell in nightly, cell
    alice = next(line for line in lines if line.lstrip().startswith("alice"))
    assert "interactive" in alice and "60/min" in alice and "9,876" in alice
    # In the engine's order: the configuration's, the default tenant last (the order rules are tried in).
    names = [line.split()[0] for line in lines if line.split() and line.split()[0] in tenants]
    assert names == ["nightly", "alice", "default"]

    tenants["alice"] |= {"daily_cost": 5.0, "cost_24h": 1.25}
    render({"engine": {"tenants": tenants}, "lanes": {}})
    lines = SGR.sub("", capsys.readouterr().out).splitlines()
    assert "cost 24h" in next(line for line in lines if "tenant" in line)
    alice = next(line for line in lines if line.lstrip().startswith("alice"))
    assert "cost 5.00" in alice and "1.2500" in alice


def test_an_engine_without_tenants_shows_no_tenants_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    # Every engine reports its default tenant; unconfigured, it is every client and says nothing new.
    render({"engine": {"tenants": {"default": tenant_stats(tokens_24h=100)}}, "lanes": {}})
    assert "tenant" not in capsys.readouterr().out
    # A default tenant with settings of its own is worth showing.
    render({"engine": {"tenants": {"default": tenant_stats(daily_tokens=1000)}}, "lanes": {}})
    assert "1,000 tokens" in capsys.readouterr().out
    render({"engine": {}, "lanes": {}})  # an older engine, without tenant statistics
    assert "tenant" not in capsys.readouterr().out


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_tenant_strings_are_shown_as_text_never_acted_on(
    terminal: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tenant names come from the operator's config, caps from the engine: escaped all the same.
    monkeypatch.setenv("COLUMNS", "600")
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")
    else:
        monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    hostile = tenant_stats(priority=f"p:{HOSTILE}", rpm_cap=f"r:{HOSTILE}", tpm_cap=f"t:{HOSTILE}", queued=1)
    render({"engine": {"tenants": {HOSTILE: hostile, "default": tenant_stats()}}, "lanes": {}})
    output = capsys.readouterr().out
    assert bool(SGR.search(output)) is terminal
    plain = SGR.sub("", output)
    assert control_characters(plain) == []
    assert plain.count(SHOWN) == 4, "the name, the class and both caps, each as it is"
    for prefix in ("p:", "r:", "t:"):
        assert f"{prefix}{SHOWN}" in plain
    assert not any(line.startswith("forged") for line in plain.splitlines())


async def test_an_engine_that_takes_the_connection_but_never_answers_is_reported(short_tmp: Path) -> None:
    """A wedged engine still completes the handshake (or something else on its socket does): status must say
    so in bounded time rather than hang."""
    socket = short_tmp / "wedged.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(socket))
    listener.listen()
    welcome = engine_codec().encode(
        Welcome(protocol=PROTOCOL_VERSION, server="wedged", max_frame_bytes=1 << 20, body_format="msgpack", minor=1)
    )

    async def serve_welcome_only() -> None:
        connection, _ = await listener.accept()
        with connection:
            await connection.recv(65536)  # the hello
            await connection.send(welcome)
            await trio.sleep_forever()  # the stats request is never answered

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_welcome_only)
        status, stdout, stderr = await run_status(socket, "--timeout", "1")
        nursery.cancel_scope.cancel()
    listener.close()
    assert status == 3 and stdout == ""
    assert "did not answer within 1 s" in stderr and "Traceback" not in stderr


def test_piped_output_cuts_no_name(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`trio-mapper status | grep MODEL` finds the model: not a terminal, so no width to fit the table into."""
    monkeypatch.delenv("COLUMNS", raising=False)
    model = "ft:gpt-4o-mini-2024-07-18:acme-research:nightly-classifier-v12:9ZxYwVuT"
    lane = {"queued": 12345, "retry_wait": 0, "in_flight": 64, "succeeded": 1_234_567, "failed": 89,
            "budget": {"tokens_used": 1_999_999, "token_capacity": 2_000_000}}  # fmt: skip
    render({"engine": {"version": "1", "pid": 1, "socket": "/run/trio-mapper/engine.sock"}, "lanes": {model: lane}})
    row = next(line for line in SGR.sub("", capsys.readouterr().out).splitlines() if "nightly" in line)
    assert model in row and "1,234,567" in row


def test_the_http_front_line_shows_every_counter(capsys: pytest.CaptureFixture[str]) -> None:
    http = {"requests": 120, "unauthorized": 3, "not_found": 2, "disconnected": 5, "sdk_retries": 7}
    render({"engine": {"http": ["unix:/run/e.sock.http"], "http_requests": http}, "lanes": {}})
    assert (
        "http on unix:/run/e.sock.http  requests 120  unauthorized 3  not found 2  disconnected 5  SDK retries 7"
        in SGR.sub("", capsys.readouterr().out)
    )


def test_the_last_reload_is_shown_when_it_left_something_undone(capsys: pytest.CaptureFixture[str]) -> None:
    at = time.mktime((2026, 1, 2, 10, 42, 3, 0, 0, -1))
    failure = {"at": at, "reason": f"server.rpm: expected an integer, got {HOSTILE!r}"}
    reloads = {"applied": 0, "failed": 1, "succeeded_at": at - 60, "failure": failure, "not_applied": []}
    render({"engine": {"reloads": reloads}, "lanes": {}})
    plain = SGR.sub("", capsys.readouterr().out)
    assert "last reload failed at 10:42:03: server.rpm: expected an integer" in plain
    assert control_characters(plain) == [], "a value from the config file is shown as text"
    reloads |= {"failure": None, "succeeded_at": at, "not_applied": ["server.rpm (the command line sets it)"]}
    render({"engine": {"reloads": reloads}, "lanes": {}})
    assert "not applied since the reload at 10:42:03: server.rpm (the command line sets it)" in capsys.readouterr().out
    reloads |= {"not_applied": []}
    render({"engine": {"reloads": reloads}, "lanes": {}})
    assert "reload" not in capsys.readouterr().out
