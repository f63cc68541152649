"""Logging setup (`trio_mapper.logs`): the key never appears, and what clients choose stays one short line.

The unit tests log real records through the handler `configure_logging` installs, into a buffer standing for
stderr. The last test sends the engine (a real subprocess) megabytes of client-chosen text over its socket.
"""

from __future__ import annotations

import io
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import trio
from conftest import TEST_API_KEY, running_engine, simulator
from raw_client import RawClient, chat

from trio_mapper.engine.process.logs import MAX_ARG_CHARS, MAX_EXCEPTION_CHARS, MAX_MESSAGE_CHARS, configure_logging

#: What a text line adds around the message: time, level and logger name.
PREFIX_ALLOWANCE = 100

LogOutput = Callable[[str], io.StringIO]


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogOutput]:
    """``configure(fmt)`` runs `configure_logging` with stderr captured; the root logger is restored after."""
    root = logging.getLogger()
    package = logging.getLogger("trio_mapper")
    saved = (root.handlers[:], root.level, package.level)

    def setup(fmt: str) -> io.StringIO:
        output = io.StringIO()
        monkeypatch.setattr("sys.stderr", output)
        configure_logging("DEBUG", fmt, secrets=[TEST_API_KEY])
        return output

    yield setup
    root.handlers[:], root.level = saved[0], saved[1]
    package.setLevel(saved[2])


log = logging.getLogger("trio_mapper.test_logs")


def control_characters(text: str) -> list[str]:
    """The characters of ``text`` a terminal or a log reader would act on rather than show (newline included)."""
    return [char for char in text if unicodedata.category(char) in {"Cc", "Zl", "Zp"}]


def the_line(output: io.StringIO) -> str:
    text = output.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, f"expected exactly one line, got {text[:500]!r}"
    return text[:-1]


def test_short_messages_are_unchanged(configure: LogOutput) -> None:
    output = configure("text")
    log.info("conn#%d: hello from %r, %s", 7, "my-script", "gpt-4o-mini")
    assert the_line(output).endswith("INFO    trio_mapper.test_logs: conn#7: hello from 'my-script', gpt-4o-mini")


def test_a_long_string_argument_is_cut_and_says_how_long_it_was(configure: LogOutput) -> None:
    output = configure("text")
    model = "m" * 1_000_000
    log.warning("lane %s paused; request id=%r", model, "x" * 5000)
    line = the_line(output)
    assert len(line) < 2 * MAX_ARG_CHARS + PREFIX_ALLOWANCE + 100
    assert f"lane {'m' * MAX_ARG_CHARS}…(1000000 chars) paused" in line
    assert f"id='{'x' * MAX_ARG_CHARS}…(5000 chars)'" in line


def test_mapping_arguments_are_cut_too(configure: LogOutput) -> None:
    output = configure("text")
    log.info("model %(model)s from %(client)s", {"model": "m" * 10_000, "client": "tests"})
    line = the_line(output)
    assert f"model {'m' * MAX_ARG_CHARS}…(10000 chars) from tests" in line


def test_a_newline_in_an_argument_cannot_forge_a_second_line(configure: LogOutput) -> None:
    output = configure("text")
    forged = "gpt-4o\n2030-01-01 00:00:00,000 INFO    trio_mapper.engine: stopped"
    log.warning("request failed for model %s", forged)
    line = the_line(output)
    assert "model gpt-4o\\n2030-01-01 00:00:00,000 INFO    trio_mapper.engine: stopped" in line


@pytest.mark.parametrize(
    "char", ["\x1b", "\r", "\x00", "\x07", "\t", "\x7f", "\x85", "\x9b", "\u2028", "\u2029"], ids=ascii
)
def test_control_characters_are_escaped_visibly(configure: LogOutput, char: str) -> None:
    output = configure("text")
    log.info("model %s", f"a{char}[31mb")
    line = the_line(output)
    assert control_characters(line) == []
    assert re.search(r"model a\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[trn])\[31mb$", line), line


def test_an_object_argument_is_cut_in_str_and_in_repr(configure: LogOutput) -> None:
    output = configure("text")
    # An exception's str, as msgspec words a bad frame: the client's text inside an object, not a string.
    error = ValueError(f"Invalid value '\x1b[2J\nforged line{'t' * 1_000_000}' - at `$.type`")
    log.info("conn#1 sent an invalid frame: %s", error)
    log.info("conn#1 failed: %r", error)
    lines = output.getvalue().splitlines()
    assert len(lines) == 2
    assert all(len(line) <= 2 * MAX_ARG_CHARS + PREFIX_ALLOWANCE for line in lines)
    assert "frame: Invalid value '\\x1b[2J\\nforged linettt" in lines[0]
    assert "failed: ValueError(\"Invalid value '\\x1b[2J\\nforged linettt" in lines[1]
    assert re.search(r"t…\(10000\d\d chars\)$", lines[0]), lines[0][-50:]
    assert re.search(r"t…\(10000\d\d chars\)$", lines[1]), lines[1][-50:]
    assert all(control_characters(line) == [] for line in lines)


def test_the_message_itself_is_the_backstop(configure: LogOutput) -> None:
    output = configure("text")
    escapes, junk = "\x1b" * 10, "m" * 1_000_000
    log.info(f"model {escapes} {junk}")  # text that is no argument: the case the backstop is for
    log.info("%s " * 10, *(["w" * MAX_ARG_CHARS] * 10))
    lines = output.getvalue().splitlines()
    assert len(lines) == 2
    assert all(len(line) <= MAX_MESSAGE_CHARS + PREFIX_ALLOWANCE for line in lines)
    assert lines[0].endswith("m…(1000047 chars)")
    assert "\\x1b" * 10 in lines[0] and control_characters(lines[0]) == []
    assert lines[1].endswith(f"w…({10 * (MAX_ARG_CHARS + 1)} chars)")


def test_numbers_stay_numbers_and_odd_arguments_still_format(configure: LogOutput) -> None:
    output = configure("text")
    log.info("lane %s paused %.3fs, %d waiting, %s", "gpt-4o", 1.5, 3, None)
    log.info("%d requests", Decimal(7))  # %d of an object that is no int: formatted as logging would
    lines = output.getvalue().splitlines()
    assert lines[0].endswith("lane gpt-4o paused 1.500s, 3 waiting, None")
    assert lines[1].endswith("7 requests")


def test_the_key_is_redacted_before_anything_is_cut(configure: LogOutput) -> None:
    output = configure("text")
    # Cut first, the argument would keep the key's first characters; redacted first, the key goes whole.
    log.warning("upstream said %s", "x" * (MAX_ARG_CHARS - 5) + TEST_API_KEY)
    line = the_line(output)
    assert "[REDACTED]" in line
    assert TEST_API_KEY[:5] not in line


def test_a_traceback_keeps_its_lines_and_loses_the_key_and_the_junk(configure: LogOutput) -> None:
    output = configure("text")
    try:
        raise RuntimeError(f"bad model {TEST_API_KEY} {'m' * 1_000_000} \x1b[2J")
    except RuntimeError:
        log.exception("internal error while accepting id=%r", 3)
    text = output.getvalue()
    lines = text.splitlines()
    assert lines[0].endswith("internal error while accepting id=3")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1].startswith("RuntimeError: bad model [REDACTED] mmm")
    assert TEST_API_KEY not in text
    assert len(text) < MAX_EXCEPTION_CHARS + 1000
    assert all(len(line) <= MAX_MESSAGE_CHARS + 30 for line in lines[1:])
    assert all(control_characters(line) == [] for line in lines)


def test_a_traceback_of_many_lines_is_cut_in_the_middle(configure: LogOutput) -> None:
    output = configure("text")
    try:
        raise RuntimeError("\n".join(f"line {n}" for n in range(100_000)))
    except RuntimeError:
        log.exception("failed")
    text = output.getvalue()
    assert len(text) < MAX_EXCEPTION_CHARS + 1000
    lines = text.splitlines()
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "line 99999"
    assert any(re.fullmatch(r"…\(\d+ chars of the traceback left out\)…", line) for line in lines)


def test_a_key_deep_in_a_traceback_is_redacted(configure: LogOutput) -> None:
    output = configure("text")
    try:
        raise RuntimeError(f"GET https://api.example/v1?key={TEST_API_KEY} failed")
    except RuntimeError:
        log.exception("upstream call failed")
    text = output.getvalue()
    assert "key=[REDACTED] failed" in text
    assert TEST_API_KEY not in text


def test_json_lines_are_bounded_escaped_and_keep_the_traceback_apart(configure: LogOutput) -> None:
    output = configure("json")
    log.warning("model %s", "\x9b31m" + "m" * 1_000_000)
    try:
        raise KeyError(TEST_API_KEY)
    except KeyError:
        log.exception("lane %s", "gpt\n4o")
    lines = output.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    # json.dumps(ensure_ascii=False) would pass a C1 control through as it is.
    assert first["message"] == f"model \\x9b31m{'m' * (MAX_ARG_CHARS - 4)}…(1000004 chars)"
    assert second["message"] == "lane gpt\\n4o"
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert "KeyError: '[REDACTED]'" in second["exception"]
    assert TEST_API_KEY not in output.getvalue()


def test_a_call_with_the_wrong_arguments_does_not_raise_into_the_caller(configure: LogOutput) -> None:
    output = configure("text")
    log.info("%s and %s", "only one")  # logging reports it on stderr, as it would without the filters
    log.info("still logging")
    assert output.getvalue().splitlines()[-1].endswith("still logging")


# --- the engine, end to end --------------------------------------------------------------------------------


async def test_the_engine_logs_bounded_lines_for_megabytes_of_client_text(short_tmp: Path) -> None:
    forged = "\n2030-01-01 00:00:00,000 INFO    trio_mapper.engine: forged\x1b[2J"
    junk = forged + "j" * 1_000_000
    async with simulator() as url, running_engine(short_tmp, url, "--log-level", "debug") as engine:
        with trio.fail_after(60):
            async with await RawClient.connect(str(engine.socket), hello=False) as client:
                welcome = await client.request({"type": "hello", "protocol": 1, "client": junk})
                assert welcome["type"] == "welcome"
                refused = await client.request({"type": junk, "id": 1})
                assert (refused["type"], refused["kind"]) == ("error", "protocol_error")
                reply = await client.request(chat(2, model=junk))
                assert reply["type"] in {"result", "error"} and reply["id"] == 2
                # A request the upstream refuses (the simulator knows no such audio format: 400): the engine
                # logs its failure, naming the id.
                body = {"model": forged, "input": "hi", "response_format": "bogus"}
                bad = {"type": "submit", "id": junk, "endpoint": "/v1/audio/speech", "body": body}
                failed = await client.request(bad)
                assert (failed["type"], failed["kind"], failed["id"]) == ("error", "upstream_error", junk)
                # Still serving, on this connection and on a new one.
                assert await client.request({"type": "ping", "id": "p"}) == {"type": "pong", "id": "p"}
            async with await RawClient.connect(str(engine.socket)) as client:
                assert (await client.request(chat(3)))["type"] == "result"
        assert await engine.stop() == 0
    lines = engine.log.splitlines()
    for needle in ("hello from", "sent an invalid frame", "failed: upstream_error"):
        assert any(needle in line and "jjjj" in line for line in lines), (needle, engine.log[:5000])
    assert max(len(line) for line in lines) <= 5000
    assert not any(line.startswith("2030-01-01") for line in lines), "a client's newline forged a log line"
    assert all(control_characters(line) == [] for line in lines)


def test_bidirectional_controls_are_escaped() -> None:
    from trio_mapper.text import escape_control_characters

    # U+202E would show "gpt-4o-mini" as something else on a terminal.
    assert escape_control_characters("model\u202einim-o4-tpg\u2066x\u2069") == "model\\u202einim-o4-tpg\\u2066x\\u2069"
