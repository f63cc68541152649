"""``trio-mapper demo`` end to end, as a user runs it: a real subprocess starting real subprocesses.

Each test checks the demo's promise to clean up: the simulator and engine it reports are gone and the
temporary directory it reports is removed, whether it succeeds, fails or is interrupted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trio_mapper.tools.demo import MODEL, Outcome, make_plan, render_summary

# Generous: the children load tokenizers on start, and CI machines are slow and shared.
RUN_TIMEOUT = 90
DEMO = [sys.executable, "-m", "trio_mapper", "demo"]


def _pids(output: str) -> list[int]:
    match = re.search(r"simulator pid (\d+) .* engine pid (\d+) ", output)
    assert match, output
    return [int(match.group(1)), int(match.group(2))]


def _temp_dir(output: str) -> Path:
    match = re.search(r"temporary directory (\S+) removed", output)
    assert match, output
    return Path(match.group(1))


def _assert_cleaned_up(output: str) -> None:
    for pid in _pids(output):
        # The demo reaped its children, so their pids no longer exist (not even as zombies).
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not _temp_dir(output).exists()


def _count(pattern: str, output: str) -> tuple[int, ...]:
    match = re.search(pattern, output, re.MULTILINE)
    assert match, (pattern, output)
    return tuple(int(group) for group in match.groups())


def test_small_run_loses_nothing_and_cleans_up() -> None:
    # RUN_TIMEOUT is a hang guard only: how long the run takes depends on the machine, what it does does not.
    done = subprocess.run(
        [*DEMO, "--requests", "60", "--seconds", "5"], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"^succeeded\s+60$", output, re.MULTILINE), output
    assert re.search(r"^lost\s+0$", output, re.MULTILINE), output
    for label in ("tokens/min", "requests/min", "429s", "retries", "wall time"):
        assert re.search(rf"^{label}\s", output, re.MULTILINE), (label, output)
    # Every 429 the upstream sent the engine was absorbed by it, each with a retry (nothing was lost).
    to_engine, absorbed = _count(r"^429s\s+\d+ sent by the upstream: (\d+) to the engine, \D*(\d+) absorbed", output)
    assert absorbed == to_engine
    (retries,) = _count(r"^retries\s+(\d+) made by the engine", output)
    assert retries >= absorbed
    _assert_cleaned_up(output)


def test_lost_requests_exit_non_zero_with_logs() -> None:
    # Every request costs more than a 50 TPM limit allows: the engine refuses each one (request_too_large).
    done = subprocess.run(
        [*DEMO, "--requests", "5", "--tpm", "50"], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert re.search(r"^lost\s+5\b", output, re.MULTILINE), output
    assert "request_too_large" in output
    assert "last lines of the engine log" in output and "listening on" in output
    _assert_cleaned_up(output)


def test_interrupt_stops_everything() -> None:
    process = subprocess.Popen(
        [*DEMO, "--requests", "200", "--seconds", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        seen = ""
        deadline = time.monotonic() + RUN_TIMEOUT
        while "simulator pid" not in seen and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            seen += line
        assert "simulator pid" in seen, seen
        time.sleep(1)  # mid-batch
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = seen + rest
    assert process.returncode == 130, output
    assert "interrupted" in output
    _assert_cleaned_up(output)


def test_limits_follow_the_target_duration() -> None:
    plan = make_plan(300, 20, None, None, None)
    assert len(plan.bodies) == 300
    # The first second's burst is free, so the limits aim at seconds + 1 of budget.
    assert 20 <= plan.expected_seconds <= 21.5
    # Varied lengths: the costs are not all alike.
    lengths = {len(body["messages"][0]["content"]) for body in plan.bodies}
    assert len(lengths) > 100
    fixed = make_plan(10, 20, 600, 90_000, 8)
    assert (fixed.rpm, fixed.tpm, fixed.concurrency) == (600, 90_000, 8)


def test_summary_without_neighbour() -> None:
    plan = make_plan(10, 6, 600, 60_000, 8)
    engine = {"lanes": {MODEL: {"upstream_429s": 2, "retries": 3}}}
    simulator = {"admitted": 12, "tokens_charged": 5_000, "rate_limited": {"requests": 0, "tokens": 2},
                 "server_errors": {"500": 1, "502": 0, "503": 0}}  # fmt: skip
    lines = render_summary(plan, Outcome(succeeded=10, wall=6.0), engine, simulator, None)
    text = "\n".join(lines)
    assert "lost            0" in lines
    assert "50,000 via the engine: 83% of the 60,000 TPM limit" in text
    assert "2 sent by the upstream: 2 to the engine, all 2 absorbed" in text
    assert "neighbour" not in text
