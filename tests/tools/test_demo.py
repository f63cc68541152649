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

from trio_mapper.tools.demo import (
    MODEL,
    SDK_SKIPPED,
    Outcome,
    SdkClients,
    lost_count,
    make_plan,
    render_summary,
)

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
    # The official SDK clients (2 by default) shared the engine with the batch over its HTTP front, and every
    # request they sent was answered: with the SDK's retries off, anything the engine had not absorbed would show.
    clients, sent, succeeded, failed = _count(
        r"^sdk clients\s+(\d+) official openai SDK clients over the HTTP front: (\d+) requests, (\d+) succeeded, "
        r"(\d+) failed \(median wait [\d.]+ s\)$",
        output,
    )
    assert (clients, failed) == (2, 0)
    assert sent >= clients and succeeded == sent
    assert SDK_SKIPPED not in output
    for label in ("tokens/min", "requests/min", "429s", "retries", "wall time"):
        assert re.search(rf"^{label}\s", output, re.MULTILINE), (label, output)
    # Every 429 the upstream sent the engine was absorbed by it, each with a retry (nothing was lost).
    to_engine, absorbed = _count(r"^429s\s+\d+ sent by the upstream: (\d+) to the engine, \D*(\d+) absorbed", output)
    assert absorbed == to_engine
    (retries,) = _count(r"^retries\s+(\d+) made by the engine", output)
    assert retries >= absorbed
    _assert_cleaned_up(output)


def test_lost_requests_exit_non_zero_with_logs() -> None:
    # Every request, the batch's and the SDK clients', costs more than a 30 TPM limit allows: the engine refuses
    # each one (request_too_large).
    done = subprocess.run(
        [*DEMO, "--requests", "5", "--tpm", "30"], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    # Each SDK client sends its first request with the batch's, before anything can be answered.
    sent, succeeded = _count(r"^sdk clients\s+2 official .*: (\d+) requests, (\d+) succeeded", output)
    assert sent >= 2 and succeeded == 0
    # A failed SDK request is lost work, as a failed batch request is.
    (lost,) = _count(r"^lost\s+(\d+)\b", output)
    assert lost == 5 + sent
    assert "request_too_large" in output and "request_too_large (SDK client)" in output
    assert "last lines of the engine log" in output and "listening on" in output
    _assert_cleaned_up(output)


@pytest.mark.parametrize("without", ["--sdk-clients 0", "no openai package"])
def test_runs_without_sdk_clients(without: str, tmp_path: Path) -> None:
    argv = [*DEMO, "--requests", "20", "--seconds", "2", "--no-neighbour"]
    env = dict(os.environ)
    if without == "--sdk-clients 0":
        argv += ["--sdk-clients", "0"]
    else:
        # An `openai` that cannot be imported, ahead of the installed one, as if it were not installed.
        (tmp_path / "openai").mkdir()
        (tmp_path / "openai" / "__init__.py").write_text("raise ImportError('no openai here')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"^lost\s+0$", output, re.MULTILINE), output
    assert not re.search(r"^sdk clients\s+\d", output, re.MULTILINE), output
    assert "SDK clients" not in output and re.search(r"^retries .* none by the client$", output, re.MULTILINE)
    # Said once when the package is missing; nothing to say when none were asked for.
    assert output.count(SDK_SKIPPED) == (1 if without == "no openai package" else 0), output
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


def test_limits_make_room_for_the_sdk_clients() -> None:
    alone, shared = make_plan(300, 20, None, None, None), make_plan(300, 20, None, None, None, sdk_clients=2)
    assert shared.bodies == alone.bodies
    assert shared.tpm > alone.tpm and shared.rpm > alone.rpm
    # The batch gets what the SDK clients leave: it still takes about as long as asked.
    assert 20 <= shared.expected_seconds <= 21.5
    # Limits the user set are theirs, even when the SDK clients would take all of them.
    tight = make_plan(5, 20, 60, 50, None, sdk_clients=2)
    assert (tight.rpm, tight.tpm) == (60, 50)
    assert 0 < tight.expected_seconds < float("inf")


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


def test_summary_counts_sdk_failures_as_lost() -> None:
    plan = make_plan(10, 6, 600, 60_000, 8, sdk_clients=2)
    engine = {"lanes": {MODEL: {"upstream_429s": 0, "retries": 1}}}
    simulator = {"admitted": 21, "tokens_charged": 6_000, "rate_limited": {}, "server_errors": {}}
    # 12 sent: 9 answered, 2 failed, 1 still in flight when the drain timeout ran out.
    sdk = SdkClients(2, sent=12, succeeded=9, waits=[0.1, 0.3, 0.2])
    sdk.count_error("upstream_error", "Error code: 500")
    sdk.count_error("timeout", "Error code: 504")
    outcome = Outcome(succeeded=9, failed=1, errors={"upstream_error": 1}, wall=6.0, span=6.5)
    assert lost_count(plan, outcome, sdk) == 1 + 3
    lines = render_summary(plan, outcome, engine, simulator, None, sdk)
    assert (
        "sdk clients     2 official openai SDK clients over the HTTP front: 12 requests, 9 succeeded, 2 failed, "
        "1 withdrawn unanswered after the batch (median wait 0.2 s)"
    ) in lines
    assert "lost            4  (1 upstream_error; SDK clients: 1 timeout, 1 upstream_error, 1 withdrawn)" in lines
    text = "\n".join(lines)
    # Through the engine: everything the upstream charged (no neighbour here), over the 6.5 s anything flowed.
    assert "55,385 via the engine (batch and SDK clients): 92% of the 60,000 TPM limit" in text
    assert "none by the clients" in text
    assert lost_count(plan, Outcome(succeeded=10), None) == 0
