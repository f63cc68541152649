"""``trio-mapper map``: JSONL in, Batch API output out, resumable, against a real engine and the simulator.

The end-to-end tests run the command as a subprocess (as a user would, signals included) against a real
engine subprocess whose upstream is the simulator. The unit tests at the end cover `trio_mapper.jsonl`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import termios
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import ROOT, running_engine, simulator

from trio_mapper.tools import mapper
from trio_mapper.tools.jsonl import (
    BadLine,
    InputRequest,
    LineSplitter,
    OutputFileError,
    OutputWriter,
    OverlongLine,
    count_lines,
    encode_record,
    failure_record,
    parse_line,
    prepare_output,
    success_record,
)
from trio_mapper.tools.mapper import ProgressMode

CHAT = "/v1/chat/completions"


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def batch_line(custom_id: str, body: dict[str, Any], url: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def write_jsonl(path: Path, items: list[Any]) -> Path:
    with path.open("w") as file:
        for item in items:
            file.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    """Every output line, parsed; fails the test on a torn or non-JSON line."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the output ends with a torn line"
    return [json.loads(line) for line in data.splitlines()]


def map_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TRIO_MAPPER_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def map_command(socket: Path, source: Path | str, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trio_mapper", "map", str(source), "-o", str(output), "--socket", str(socket), *extra]


async def run_map(socket: Path, source: Path | str, output: Path, *extra: str) -> tuple[int, str]:
    """Run ``trio-mapper map`` to completion; returns (exit status, stderr)."""
    with trio.fail_after(60):
        done = await trio.run_process(
            map_command(socket, source, output, *extra), capture_stderr=True, check=False, env=map_env(), cwd=ROOT
        )
    return done.returncode, done.stderr.decode()


async def interrupt_map(socket: Path, source: Path, output: Path, sig: int, *, after_lines: int) -> tuple[int, str]:
    """Start ``trio-mapper map``, send ``sig`` once the output has ``after_lines`` lines, wait for it to exit."""
    log_path = output.with_suffix(f".{sig}.log")
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            map_command(socket, source, output, "--window", "8"), stderr=log, env=map_env(), cwd=ROOT
        )
    try:
        with trio.fail_after(60):
            await wait_until(lambda: process.returncode is not None or _line_count(output) >= after_lines)
            assert process.returncode is None, "the job finished before it could be interrupted"
            process.send_signal(sig)
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return returncode, log_path.read_text()


async def wait_until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await trio.sleep(0.02)  # another process writes the file: nothing to wait on but the clock


def _line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def jsonl_bytes(items: list[Any]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def assert_each_id_once(records: list[dict[str, Any]], expected: set[str]) -> None:
    counts = Counter(record["custom_id"] for record in records)
    assert set(counts) == expected
    assert max(counts.values()) == 1, [cid for cid, n in counts.items() if n > 1]


async def engine_outstanding(socket: Path) -> int:
    from trio_mapper import AsyncClient

    async with AsyncClient(socket) as client:
        stats = await client.stats()
    return int(stats["engine"]["outstanding"])


# --- end to end ----------------------------------------------------------------------------------------------


async def test_batch_api_file_in_batch_api_output_out(short_tmp: Path) -> None:
    lines = [batch_line(f"req-{i}", chat_body(f"question {i}")) for i in range(12)]
    lines.append(batch_line("emb-1", {"model": "text-embedding-3-small", "input": "hello"}, url="/v1/embeddings"))
    lines.append(batch_line("meta-1", chat_body("with metadata"), metadata={"row": 7, "tags": ["a"]}))
    source = write_jsonl(short_tmp / "in.jsonl", lines)
    output = short_tmp / "out.jsonl"
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        status, stderr = await run_map(engine.socket, source, output, "--no-progress")
    assert status == 0, stderr
    records = read_output(output)
    assert_each_id_once(records, {line["custom_id"] for line in lines})
    for record in records:
        assert set(record) <= {"id", "custom_id", "response", "error", "metadata"}
        assert record["id"].startswith("batch_req_")
        assert record["error"] is None
        assert record["response"]["status_code"] == 200
        assert record["response"]["request_id"].startswith("req_")
    by_id = {record["custom_id"]: record for record in records}
    assert by_id["req-3"]["response"]["body"]["object"] == "chat.completion"
    assert by_id["emb-1"]["response"]["body"]["object"] == "list"
    assert by_id["meta-1"]["metadata"] == {"row": 7, "tags": ["a"]}
    assert "metadata" not in by_id["req-3"]
    assert "14 succeeded" in stderr and "0 failed" in stderr
    assert " tokens" in stderr


async def test_cookbook_format_with_metadata_and_stdin(short_tmp: Path) -> None:
    lines = [{**chat_body(f"q{i}"), "metadata": {"row_id": i}} for i in range(5)]
    lines.append(chat_body("no metadata here"))
    source = write_jsonl(short_tmp / "in.jsonl", lines)
    output = short_tmp / "out.jsonl"
    embeddings = write_jsonl(short_tmp / "emb.jsonl", [{"model": "text-embedding-3-small", "input": "x"}])
    emb_output = short_tmp / "emb-out.jsonl"
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        status, stderr = await run_map(engine.socket, source, output)  # stderr is a pipe: plain progress
        assert status == 0, stderr
        with trio.fail_after(60):
            piped = await trio.run_process(
                map_command(engine.socket, "-", emb_output, "--endpoint", "/v1/embeddings", "--no-progress"),
                stdin=embeddings.read_bytes(),
                capture_stderr=True,
                check=False,
                env=map_env(),
                cwd=ROOT,
            )
        assert piped.returncode == 0, piped.stderr.decode()
    records = {record["custom_id"]: record for record in read_output(output)}
    assert set(records) == {f"line-{n}" for n in range(1, 7)}
    for i in range(5):
        assert records[f"line-{i + 1}"]["metadata"] == {"row_id": i}
        assert records[f"line-{i + 1}"]["response"]["body"]["object"] == "chat.completion"
    assert "metadata" not in records["line-6"]
    (emb,) = read_output(emb_output)
    assert emb["custom_id"] == "line-1" and emb["response"]["body"]["object"] == "list"


async def test_bad_lines_are_reported_written_as_failures_and_do_not_stop_the_run(short_tmp: Path) -> None:
    source = write_jsonl(
        short_tmp / "in.jsonl",
        [
            batch_line("ok-1", chat_body("fine")),  # line 1
            "this is not json",  # line 2
            "[1, 2, 3]",  # line 3
            {"custom_id": "no-body", "method": "POST", "url": CHAT},  # line 4
            batch_line("abs-url", chat_body("x"), url="https://api.openai.com/v1/chat/completions"),  # line 5
            "",  # line 6: blank, ignored
            batch_line("ok-1", chat_body("duplicate id")),  # line 7
            batch_line("upstream-400", chat_body("too many choices", n=500)),  # line 8: the simulator says 400
            batch_line("ok-2", chat_body("fine too")),  # line 9
        ],
    )
    output = short_tmp / "out.jsonl"
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        status, stderr = await run_map(engine.socket, source, output, "--no-progress")
    assert status == 1, stderr
    for needle in ("line 2", "line 3", "line 4 (no-body)", "line 5 (abs-url)", "line 7", "line 8 (upstream-400)"):
        assert needle in stderr, (needle, stderr)
    records = read_output(output)
    assert_each_id_once(records, {"ok-1", "line-2", "line-3", "no-body", "abs-url", "upstream-400", "ok-2"})
    by_id = {record["custom_id"]: record for record in records}
    assert by_id["ok-1"]["error"] is None and by_id["ok-2"]["error"] is None
    for bad in ("line-2", "line-3", "no-body", "abs-url"):
        assert by_id[bad]["error"]["code"] == "invalid_request", by_id[bad]
        assert by_id[bad]["response"] is None
    # The upstream answered: its 400 is kept, like the Batch API keeps the upstream's response.
    rejected = by_id["upstream-400"]
    assert rejected["error"]["code"] == "upstream_error"
    assert rejected["response"]["status_code"] == 400
    assert rejected["response"]["body"]["error"]["param"] == "n"
    assert "2 succeeded" in stderr and "6 failed (4 bad lines, 1 duplicate id)" in stderr


async def test_failures_worth_running_again_are_told_apart_from_those_that_fail_again(short_tmp: Path) -> None:
    """An operator's finding: a run whose lines failed with a 400 or "request too large" ended with "run the
    same command again to retry them", which can only fail them again. Each failure now says which it is and
    what to do, and so does the summary."""
    source = write_jsonl(
        short_tmp / "in.jsonl",
        [
            batch_line("ok", chat_body("fine")),  # line 1
            batch_line("slow", chat_body("slow", max_tokens=200)),  # line 2: 10 s upstream, past --deadline
            batch_line("bad-400", chat_body("too many choices", n=500)),  # line 3: the simulator says 400
            batch_line("huge", chat_body("huge", max_tokens=20_000_000)),  # line 4: over the whole TPM
            "this is not json",  # line 5
        ],
    )
    output = short_tmp / "out.jsonl"
    async with (
        simulator(per_token_latency_ms=50.0, output_tokens_min=200, output_tokens_max=200) as url,
        running_engine(short_tmp, url) as engine,
    ):
        status, stderr = await run_map(engine.socket, source, output, "--deadline", "2", "--no-progress")
    assert status == 1, stderr
    by_id = {record["custom_id"]: record for record in read_output(output)}
    assert {cid: (r["error"] or {}).get("code") for cid, r in by_id.items()} == {
        "ok": None,
        "slow": "timeout",
        "bad-400": "upstream_error",
        "huge": "request_too_large",
        "line-5": "invalid_request",
    }
    lines = stderr.splitlines()

    def reported(prefix: str) -> str:
        [line] = [line for line in lines if line.startswith(f"trio-mapper map: {prefix}")]
        return line

    assert "(may succeed if run again: its deadline passed: run the same command again" in reported("line 2 (slow)")
    assert "(fails again as it is: the upstream refused the request itself: fix this line" in reported(
        "line 3 (bad-400)"
    )
    assert "(fails again as it is: it needs more tokens than the model's whole per-minute budget" in reported(
        "line 4 (huge)"
    )
    assert "(fails again as it is: fix this line)" in reported("line 5")
    rerun = reported("1 failed line may succeed")
    assert "(timeout 1): run the same command again to retry it" in rerun
    fix = reported("3 failed lines will fail again as they are")
    for cause in ("upstream_error 1", "request_too_large 1", "bad line 1"):
        assert cause in fix, fix
    assert "fix them in the input first" in fix
    assert "failed lines have an error" not in stderr  # the old advice, which suggested retrying them all


async def test_interrupted_twice_then_resumed_answers_every_id_exactly_once(short_tmp: Path) -> None:
    ids = {f"job-{i}" for i in range(300)}
    source = write_jsonl(short_tmp / "in.jsonl", [batch_line(cid, chat_body(cid)) for cid in sorted(ids)])
    output = short_tmp / "out.jsonl"
    async with simulator(latency_ms=100.0) as url, running_engine(short_tmp, url) as engine:
        status, stderr = await interrupt_map(engine.socket, source, output, signal.SIGINT, after_lines=20)
        assert status == 130, stderr
        assert "interrupted by SIGINT" in stderr
        first = read_output(output)
        assert 20 <= len(first) < 300
        assert all(record["error"] is None for record in first)  # nothing was written as "cancelled"
        # The interrupted run's requests were withdrawn from the engine, not left to cost tokens.
        with trio.fail_after(10):
            while True:
                if not await engine_outstanding(engine.socket):
                    break
                await trio.sleep(0.05)  # the engine's counters: polling its stats is the only way to watch them

        status, stderr = await interrupt_map(engine.socket, source, output, signal.SIGTERM, after_lines=len(first) + 20)
        assert status == 143, stderr
        assert f"{len(first):,} skipped" in stderr
        second = read_output(output)
        assert len(first) + 20 <= len(second) < 300
        assert_each_id_once(second, {record["custom_id"] for record in second})

        status, stderr = await run_map(engine.socket, source, output, "--window", "32", "--no-progress")
    assert status == 0, stderr
    assert f"{len(second):,} skipped" in stderr
    final = read_output(output)
    assert_each_id_once(final, ids)
    assert all(record["error"] is None for record in final)
    assert final[: len(second)] == second  # resuming appends: lines already written stay as they were


async def test_failed_requests_are_retried_by_the_next_run(short_tmp: Path) -> None:
    ids = {f"q-{i}" for i in range(10)}
    source = write_jsonl(short_tmp / "in.jsonl", [batch_line(cid, chat_body(cid)) for cid in sorted(ids)])
    output = short_tmp / "out.jsonl"
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    async with simulator(insufficient_quota=True) as url, running_engine(short_tmp / "a", url) as engine:
        status, stderr = await run_map(engine.socket, source, output, "--no-progress")
    assert status == 1, stderr
    # A quota refusal passes once the account is in order: worth running again, later.
    assert "10 failed lines may succeed if run again (rate_limited 10): run the same command again later" in stderr
    first = read_output(output)
    assert_each_id_once(first, ids)
    for record in first:
        assert record["error"]["code"] == "rate_limited"
        assert record["response"]["status_code"] == 429
        assert record["response"]["body"]["error"]["code"] == "insufficient_quota"

    async with simulator() as url, running_engine(short_tmp / "b", url) as engine:
        status, stderr = await run_map(engine.socket, source, output, "--no-progress")
    assert status == 0, stderr
    assert "10 failed lines of a previous run retried" in stderr
    final = read_output(output)
    assert_each_id_once(final, ids)
    assert all(record["error"] is None for record in final)


async def test_kill_9_mid_job_and_a_torn_last_line_are_resumed(short_tmp: Path) -> None:
    ids = {f"k-{i}" for i in range(120)}
    source = write_jsonl(short_tmp / "in.jsonl", [batch_line(cid, chat_body(cid)) for cid in sorted(ids)])
    output = short_tmp / "out.jsonl"
    async with simulator(latency_ms=100.0) as url, running_engine(short_tmp, url) as engine:
        status, _ = await interrupt_map(engine.socket, source, output, signal.SIGKILL, after_lines=10)
        assert status == -signal.SIGKILL
        survivors = read_output(output)
        # What a kill -9 in the middle of a write leaves behind: the start of a line, no newline.
        torn = encode_record(success_record("k-999", status=200, request_id="req_x", body={"a": 1}))[:40]
        with output.open("ab") as file:
            file.write(torn)
        status, stderr = await run_map(engine.socket, source, output, "--no-progress")
    assert status == 0, stderr
    assert f"a torn last line ({len(torn)} bytes) cut off" in stderr
    assert f"{len(survivors):,} skipped" in stderr
    final = read_output(output)
    assert_each_id_once(final, ids)
    assert all(record["error"] is None for record in final)


@asynccontextmanager
async def started_map(
    socket: Path, source: Path, output: Path, log_path: Path, *extra: str
) -> AsyncIterator[trio.Process]:
    """``trio-mapper map`` as a subprocess (window 8, no progress), its stderr into ``log_path``; killed on the
    way out if it is still running (a failed test)."""
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            map_command(socket, source, output, "--window", "8", "--no-progress", *extra),
            stderr=log,
            env=map_env(),
            cwd=ROOT,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("engine_wait", ["0", "0.5"])
async def test_an_engine_that_dies_mid_job_exits_3_and_the_next_engine_finishes_it(
    short_tmp: Path, engine_wait: str
) -> None:
    ids = {f"e-{i}" for i in range(150)}
    source = write_jsonl(short_tmp / "in.jsonl", [batch_line(cid, chat_body(cid)) for cid in sorted(ids)])
    output = short_tmp / "out.jsonl"
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    async with simulator(latency_ms=100.0) as url:
        async with running_engine(short_tmp / "a", url) as engine:
            wait = ("--engine-wait", engine_wait)
            async with started_map(engine.socket, source, output, short_tmp / "map.log", *wait) as process:
                with trio.fail_after(60):
                    await wait_until(lambda: _line_count(output) >= 10)
                    engine.process.kill()  # and no engine comes back on the socket
                    status = await process.wait()
        stderr = (short_tmp / "map.log").read_text()
        assert status == 3, stderr
        assert "[connection_lost]" in stderr  # why it stopped: the engine's connection, however it ended
        assert "run the same command again to resume" in stderr
        partial = read_output(output)
        if engine_wait == "0":  # stops at once, as before --engine-wait: what was in flight has no line yet
            assert "waiting" not in stderr
            assert all(record["error"] is None for record in partial)
        else:
            assert "waiting up to 0.5 s (--engine-wait) for the engine to come back" in stderr
            assert "no engine came back within 0.5 s (--engine-wait)" in stderr
            # What was in flight may have run: it failed, never sent again in this run, retried by the next.
            assert {r["error"]["code"] for r in partial if r["error"] is not None} <= {"connection_lost"}
        assert_each_id_once(partial, {record["custom_id"] for record in partial})
        async with running_engine(short_tmp / "b", url) as engine:
            status, stderr = await run_map(engine.socket, source, output, "--no-progress")
    assert status == 0, stderr
    final = read_output(output)
    assert_each_id_once(final, ids)
    assert all(record["error"] is None for record in final)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_the_job_rides_out_an_engine_restart_on_the_same_socket(short_tmp: Path, sig: int) -> None:
    # `systemctl restart trio-mapper` mid-job (SIGTERM: a graceful stop), or a crash and Restart=on-failure
    # (SIGKILL). Two upstream calls at a time and a window of 8: the engine holds queued requests when it stops.
    ids = {f"r-{i}" for i in range(40)}
    source = write_jsonl(short_tmp / "in.jsonl", [batch_line(cid, chat_body(cid)) for cid in sorted(ids)])
    output = short_tmp / "out.jsonl"
    slow = ("--max_concurrent_reqs", "2")
    async with (
        simulator(latency_ms=100.0) as url,
        running_engine(short_tmp, url, *slow) as engine,
        started_map(engine.socket, source, output, short_tmp / "map.log", "--engine-wait", "60") as process,
    ):
        with trio.fail_after(60):
            await wait_until(lambda: process.returncode is not None or _line_count(output) >= 5)
            assert process.returncode is None, "the job finished before the engine stopped"
            await engine.stop(sig)
            async with running_engine(short_tmp, url, *slow) as again:
                assert again.socket == engine.socket
                status = await process.wait()
    stderr = (short_tmp / "map.log").read_text()
    assert "waiting up to 60 s (--engine-wait) for the engine to come back" in stderr, stderr
    assert "the engine is back after" in stderr
    final = read_output(output)
    assert_each_id_once(final, ids)  # one line for every id: none lost, none twice
    failed = [record for record in final if record["error"] is not None]
    # Only what may have reached the upstream fails, and it says a re-run may mend it; what never reached it
    # (the requests it refused while stopping, those not sent yet) was sent to the next engine.
    assert {record["error"]["code"] for record in failed} <= {"connection_lost"}
    assert status == (1 if failed else 0), stderr
    if failed:
        assert f"{len(failed)} failed line{'' if len(failed) == 1 else 's'} may succeed if run again" in stderr
    else:
        assert "0 failed" in stderr
    assert f"{len(final) - len(failed)} succeeded, {len(failed)} failed" in stderr
    if sig == signal.SIGTERM:
        # The engine refused its queued requests `shutting_down` before any upstream attempt: held, sent again.
        assert "the engine is shutting down; holding the input" in stderr
        assert "that never reached it sent again" in stderr
    else:
        assert failed  # a crash with requests in flight: their answers are lost, and they may have run


async def test_stdin_from_a_slow_producer_is_answered_as_it_comes_and_ctrl_c_works_while_it_is_idle(
    short_tmp: Path,
) -> None:
    # `slow_generator | trio-mapper map -`: the producer writes a few lines, then goes quiet without closing the
    # pipe. A read of stdin in the event loop would hold up every reply and the SIGINT handler until it wrote
    # again; the timeouts below only guard against that hang, nothing is timed.
    lines = [batch_line(f"s-{i}", chat_body(f"slow {i}")) for i in range(10)]
    output = short_tmp / "out.jsonl"
    log_path = short_tmp / "map.log"
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        with log_path.open("wb") as log:
            process = await trio.lowlevel.open_process(
                map_command(engine.socket, "-", output, "--no-progress"),
                stdin=subprocess.PIPE,
                stderr=log,
                env=map_env(),
                cwd=ROOT,
            )
        assert process.stdin is not None
        try:
            for written in (3, 6):  # some lines, later some more; then the producer idles, stdin still open
                await process.stdin.send_all(jsonl_bytes(lines[written - 3 : written]))
                with trio.move_on_after(60):  # hang guard
                    await wait_until(lambda n=written: process.returncode is not None or _line_count(output) >= n)
                assert _line_count(output) >= written, "answers wait for more input"
                assert process.returncode is None, log_path.read_text()
            process.send_signal(signal.SIGINT)
            with trio.move_on_after(60):  # hang guard
                await process.wait()
            assert process.returncode is not None, "SIGINT did not end a run whose stdin is idle"
            status = process.returncode
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdin.aclose()
        stderr = log_path.read_text()
        assert status == 130, stderr
        assert "interrupted by SIGINT" in stderr and "Fatal Python error" not in stderr
        first = read_output(output)
        assert_each_id_once(first, {f"s-{i}" for i in range(6)})
        assert all(record["error"] is None for record in first)

        # The output is resumable: the whole input, piped at once, skips what was answered.
        with trio.fail_after(60):
            done = await trio.run_process(
                map_command(engine.socket, "-", output, "--no-progress"),
                stdin=jsonl_bytes(lines),
                capture_stderr=True,
                check=False,
                env=map_env(),
                cwd=ROOT,
            )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "4 succeeded" in stderr and "6 skipped" in stderr
    final = read_output(output)
    assert final[:6] == first
    assert_each_id_once(final, {line["custom_id"] for line in lines})


@pytest.mark.parametrize("kind", ["file", "terminal"])
async def test_stdin_may_be_a_file_or_a_terminal(short_tmp: Path, kind: str) -> None:
    # `map - < requests.jsonl` (a regular file: epoll cannot wait on it) and typing into a terminal (Ctrl+D ends).
    lines = [batch_line(f"t-{i}", chat_body(f"typed {i}")) for i in range(5)]
    output = short_tmp / "out.jsonl"
    if kind == "file":
        source = short_tmp / "in.jsonl"
        source.write_bytes(jsonl_bytes(lines))
        stdin = os.open(source, os.O_RDONLY)
        to_close = [stdin]
    else:
        master, stdin = os.openpty()
        to_close = [master, stdin]
        settings = termios.tcgetattr(stdin)
        settings[3] &= ~termios.ECHO  # nobody reads the echo
        termios.tcsetattr(stdin, termios.TCSANOW, settings)
        os.write(master, jsonl_bytes(lines) + b"\x04")  # Ctrl+D at the start of a line: end of input
    try:
        async with simulator() as url, running_engine(short_tmp, url) as engine:
            with trio.fail_after(60):
                done = await trio.run_process(
                    map_command(engine.socket, "-", output, "--no-progress"),
                    stdin=stdin,
                    capture_stderr=True,
                    check=False,
                    env=map_env(),
                    cwd=ROOT,
                )
    finally:
        for fd in to_close:
            os.close(fd)
    assert done.returncode == 0, done.stderr.decode()
    records = read_output(output)
    assert_each_id_once(records, {line["custom_id"] for line in lines})
    assert all(record["error"] is None for record in records)


async def test_input_reader_returns_lines_as_they_are_written(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    try:
        reader = mapper.InputReader(read_fd, abandon_on_cancel=True)
        with trio.fail_after(10):  # hang guard: each read below has data waiting
            os.write(write_fd, b'{"a": 1}\n{"b": 2}\n{"c"')
            assert await reader.read_lines() == [b'{"a": 1}\n', b'{"b": 2}\n']  # the pipe is still open
            os.write(write_fd, b': 3}\n\n{"last": true}')
            assert await reader.read_lines() == [b'{"c": 3}\n', b"\n"]
            os.close(write_fd)
            write_fd = -1
            assert await reader.read_lines() == [b'{"last": true}']  # no newline at the end
            assert await reader.read_lines() == []
            assert await reader.read_lines() == []
    finally:
        os.close(read_fd)
        if write_fd != -1:
            os.close(write_fd)


@pytest.mark.parametrize("mode", ["bar", "plain"])
async def test_progress_displays(
    short_tmp: Path, mode: ProgressMode, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process, so the display code runs with its intervals shortened (the command's are 0.25 s and 10 s).
    monkeypatch.setattr(mapper, "BAR_INTERVAL", 0.01)
    monkeypatch.setattr(mapper, "PLAIN_INTERVAL", 0.05)
    monkeypatch.setattr(mapper, "STATS_INTERVAL", 0.05)
    source = write_jsonl(short_tmp / "in.jsonl", [chat_body(f"q{i}") for i in range(40)])
    output = short_tmp / "out.jsonl"
    async with simulator(latency_ms=50.0) as url, running_engine(short_tmp, url) as engine:
        writer = OutputWriter(output)
        with source.open("rb") as lines:
            job = mapper.MapJob(
                lines=mapper.InputReader(lines.fileno(), abandon_on_cancel=False),
                writer=writer,
                done=set(),
                counters=mapper.MapCounters(total=count_lines(source)),
                socket=engine.socket,
                endpoint=CHAT,
                window=4,
                deadline=None,
                max_attempts=None,
                progress=mode,
            )
            await job.run()
        writer.close()
    assert job.counters.succeeded == 40 and job.counters.tokens > 0
    assert job.interrupted_by is None and job.engine_problem is None
    stderr = capsys.readouterr().err
    assert "req/min" in stderr and "tok/min" in stderr and "429s absorbed" in stderr
    assert ("40/40" if mode == "bar" else "/40 lines") in stderr


async def test_an_output_file_that_is_not_ours_is_left_alone(short_tmp: Path) -> None:
    source = write_jsonl(short_tmp / "in.jsonl", [chat_body("hi")])
    output = short_tmp / "notes.txt"
    output.write_text("my precious notes\n")
    status, stderr = await run_map(short_tmp / "no-engine.sock", source, output)
    assert status == 2
    assert "notes.txt:1 is not a Batch API output line" in stderr
    assert output.read_text() == "my precious notes\n"


async def test_no_engine_exits_3_and_says_where_it_looked(short_tmp: Path) -> None:
    source = write_jsonl(short_tmp / "in.jsonl", [chat_body("hi")])
    output = short_tmp / "out.jsonl"
    status, stderr = await run_map(short_tmp / "no-engine.sock", source, output, "--no-progress")
    assert status == 3
    assert "no-engine.sock" in stderr
    assert "run the same command again to resume" in stderr
    assert read_output(output) == []


async def test_priority_and_client_name_put_the_job_in_its_tenant_at_the_class_it_asks(short_tmp: Path) -> None:
    from trio_mapper import AsyncClient

    config = short_tmp / "tenants.toml"
    config.write_text('[tenants.nightly]\npriority = "interactive"\nnames = ["nightly"]\n')
    lines = [batch_line(f"req-{i}", chat_body(f"question {i}")) for i in range(6)]
    source = write_jsonl(short_tmp / "in.jsonl", lines)
    output = short_tmp / "out.jsonl"
    async with simulator() as url, running_engine(short_tmp, url, "--config", str(config)) as engine:
        options = ("--priority", "batch", "--client-name", "nightly", "--no-progress")
        status, stderr = await run_map(engine.socket, source, output, *options)
        async with AsyncClient(engine.socket) as client:
            tenants = (await client.stats())["engine"]["tenants"]
    assert status == 0, stderr
    records = read_output(output)
    assert_each_id_once(records, {line["custom_id"] for line in lines})
    assert all(record["error"] is None for record in records)
    assert "6 succeeded" in stderr
    # The hello name matched the tenant: the job's tokens are the nightly tenant's.
    assert tenants["nightly"]["priority"] == "interactive"
    assert tenants["nightly"]["tokens_24h"] > 0


def test_priority_and_client_name_reach_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_mapper.tools.cli import build_parser

    made: list[dict[str, Any]] = []

    class RecordingClient(mapper.AsyncClient):
        def __init__(self, *args: Any, **options: Any) -> None:
            made.append(options)
            super().__init__(*args, **options)

    monkeypatch.setattr(mapper, "AsyncClient", RecordingClient)
    source = write_jsonl(tmp_path / "in.jsonl", [chat_body("hi")])
    common = ["map", str(source), "-o", str(tmp_path / "out.jsonl"), "--socket", str(tmp_path / "none.sock")]
    parser = build_parser("map")
    # No engine there (exit 3): what matters is how the client was made.
    assert mapper.run_map(parser.parse_args([*common, "--no-progress"])) == 3
    chosen = [*common, "--priority", "batch", "--client-name", "nightly", "--no-progress"]
    assert mapper.run_map(parser.parse_args(chosen)) == 3
    default, asked = made
    assert default["priority"] is None and default["client_name"] == f"trio-mapper map[{os.getpid()}]"
    assert asked["priority"] == "batch" and asked["client_name"] == "nightly"


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--priority", "urgent", "invalid choice: 'urgent' (choose from"),
        ("--priority", "Batch", "invalid choice: 'Batch'"),
        ("--client-name", "", "must not be empty"),
        ("--client-name", "night\nly", "printable"),
    ],
)
def test_bad_priority_or_client_name_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, needle: str
) -> None:
    from trio_mapper.tools.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser("map").parse_args(["map", "in.jsonl", "-o", str(tmp_path / "out.jsonl"), option, value])
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err


# --- trio_mapper.jsonl ---------------------------------------------------------------------------------------


def test_a_line_nested_too_deeply_is_a_bad_line_and_a_byte_order_mark_is_skipped() -> None:
    deep = parse_line(b"[" * 5000 + b"]" * 5000, 2, CHAT)
    assert isinstance(deep, BadLine) and "nested too deeply" in deep.message
    marked = parse_line(b"\xef\xbb\xbf" + json.dumps(chat_body("x")).encode(), 1, CHAT)
    assert not isinstance(marked, BadLine) and marked is not None and marked.body == chat_body("x")


def test_parse_line_formats() -> None:
    batch = parse_line(json.dumps(batch_line("a", chat_body("x"), metadata=None)).encode(), 3, CHAT)
    assert isinstance(batch, InputRequest)
    assert (batch.custom_id, batch.endpoint, batch.method, batch.has_metadata) == ("a", CHAT, "POST", True)
    plain = parse_line(json.dumps({**chat_body("x"), "metadata": {"k": 1}}).encode() + b"\r\n", 17, "/v1/x")
    assert isinstance(plain, InputRequest)
    assert plain.custom_id == "line-17" and plain.endpoint == "/v1/x"
    assert "metadata" not in plain.body and plain.metadata == {"k": 1}  # never sent upstream
    assert parse_line(b"  \n", 4, CHAT) is None


@pytest.mark.parametrize(
    ("line", "custom_id", "needle"),
    [
        (b"{nope", "line-5", "not valid JSON"),
        (b'"text"', "line-5", "expected a JSON object, got string"),
        (b'{"metadata": {"a": 1}}', "line-5", "body is empty"),
        (b'{"url": "/v1/chat/completions", "body": {}}', "line-5", "custom_id is missing"),
        (b'{"custom_id": 7, "url": "/v1/x", "body": {}}', "line-5", "custom_id is not a non-empty string"),
        (b'{"custom_id": "c", "url": "/v1/x", "body": [1]}', "c", "body is a JSON array"),
        (b'{"custom_id": "c", "body": {}}', "c", "url is missing"),
        (b'{"custom_id": "c", "method": "PUT", "url": "/v1/x", "body": {}}', "c", "method must be POST"),
    ],
)
def test_parse_line_bad_lines(line: bytes, custom_id: str, needle: str) -> None:
    parsed = parse_line(line, 5, CHAT)
    assert isinstance(parsed, BadLine)
    assert parsed.custom_id == custom_id
    assert parsed.message.startswith("line 5") and needle in parsed.message, parsed.message


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_line_splitter_any_chunking(size: int) -> None:
    data = b'{"a": 1}\n\n{"long": "' + b"x" * 5000 + b'"}\r\n{"b": 2}\n{"no": "newline"}'
    splitter = LineSplitter()
    lines: list[bytes | OverlongLine] = []
    for start in range(0, len(data), size):
        lines.extend(splitter.feed(data[start : start + size]))
    assert splitter.finish() == b'{"no": "newline"}'
    assert splitter.finish() is None
    assert lines == data.splitlines(keepends=True)[:-1]


@pytest.mark.parametrize("size", [1, 7, 100, 10_000])
def test_a_line_over_the_limit_is_counted_not_kept(size: int) -> None:
    data = b'{"a": 1}\n' + b"x" * 5000 + b'\n{"b": 2}\n' + b"y" * 300
    splitter = LineSplitter(max_line_bytes=1000)
    lines: list[bytes | OverlongLine] = []
    for start in range(0, len(data), size):
        lines.extend(splitter.feed(data[start : start + size]))
    assert lines == [b'{"a": 1}\n', OverlongLine(5001), b'{"b": 2}\n']
    assert splitter.finish() == b"y" * 300
    bad = parse_line(OverlongLine(5001), 2, CHAT)
    assert isinstance(bad, BadLine) and "5001 bytes long" in bad.message


def test_line_splitter_empty_input_and_final_newline() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"") == []
    assert splitter.finish() is None
    assert splitter.feed(b"a\nb\n") == [b"a\n", b"b\n"]
    assert splitter.finish() is None


def test_count_lines(tmp_path: Path) -> None:
    path = tmp_path / "f"
    for content, expected in [(b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\n\nb\n", 3), (b"x" * 3_000_000 + b"\n", 1)]:
        path.write_bytes(content)
        assert count_lines(path) == expected


def test_prepare_output_keeps_successes_drops_failures_duplicates_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    ok_a = encode_record(success_record("a", status=200, request_id="r", body={"x": 1}))
    failed_b = encode_record(failure_record("b", code="timeout", message="late"))
    ok_c = encode_record(success_record("c", status=200, request_id="r", body="text", metadata=[1], has_metadata=True))
    duplicate_a = encode_record(success_record("a", status=200, request_id="r2", body={}))
    path.write_bytes(ok_a + failed_b + ok_c + duplicate_a + ok_c[:25])
    path.chmod(0o640)
    scan = prepare_output(path)
    assert scan.done == {"a", "c"}
    assert (scan.dropped_failures, scan.dropped_duplicates, scan.torn_bytes) == (1, 1, 25)
    assert path.read_bytes() == ok_a + ok_c
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind

    path.write_bytes(ok_a + ok_c[:10])  # only a torn tail: cut in place
    scan = prepare_output(path)
    assert scan.done == {"a"} and scan.torn_bytes == 10
    assert path.read_bytes() == ok_a

    assert prepare_output(tmp_path / "missing.jsonl").done == set()


def test_prepare_output_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    content = encode_record(success_record("a", status=200, request_id="r", body={})) + b'{"custom_id": "x"}\n'
    path.write_bytes(content)
    with pytest.raises(OutputFileError, match=r"out\.jsonl:2"):
        prepare_output(path)
    assert path.read_bytes() == content

    for foreign in (b"my precious notes", b'{"a": 1}\nno final newline'):  # not torn lines of ours: kept as is
        path.write_bytes(foreign)
        with pytest.raises(OutputFileError):
            prepare_output(path)
        assert path.read_bytes() == foreign


def test_prepare_output_keeps_a_complete_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    ok_a = encode_record(success_record("a", status=200, request_id="r", body={}))
    ok_b = encode_record(success_record("b", status=200, request_id="r", body={}))
    path.write_bytes(ok_a + ok_b[:-1])
    assert prepare_output(path).done == {"a", "b"}
    assert path.read_bytes() == ok_a + ok_b  # the newline is added, so the next line cannot run into it

    failed = encode_record(failure_record("c", code="timeout", message="late"))
    path.write_bytes(failed + ok_a[:-1])
    assert prepare_output(path).done == {"a"}
    assert path.read_bytes() == ok_a
