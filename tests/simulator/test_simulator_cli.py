"""The simulate flags, the limits file, config validation, and the command run as a real process."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from simulator_fixtures import chat_body

from trio_mapper.simulator import SimulatorConfig, add_simulate_arguments, config_from_args, run_simulate
from trio_mapper.simulator.config import load_model_limits

ROOT = Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_come_from_the_config_record() -> None:
    assert config_from_args(_parse()) == SimulatorConfig()


def test_flags_map_onto_config_fields() -> None:
    config = config_from_args(
        _parse(
            "--host", "127.0.0.1", "--port", "8123", "--rpm", "10", "--tpm", "1000", "--quantum", "1",
            "--latency-ms", "5", "--per-token-latency-ms", "0.5", "--fail-rate", "0.1",
            "--bad-gateway-rate", "0.05", "--overloaded-rate", "0.05", "--reset-rate", "0.01",
            "--slow-rate", "0.2", "--slow-ms", "100", "--seed", "7", "--insufficient-quota",
            "--model", "gpt-4o=5:500", "--model", "ft:gpt-4o-mini:acme=6:600",
            "--no-ratelimit-headers", "--no-retry-after",
        )
    )  # fmt: skip
    assert (config.port, config.rpm, config.tpm, config.quantum) == (8123, 10, 1000, 1.0)
    assert (config.latency_ms, config.per_token_latency_ms) == (5.0, 0.5)
    assert (config.fail_rate, config.bad_gateway_rate, config.overloaded_rate) == (0.1, 0.05, 0.05)
    assert (config.reset_rate, config.slow_rate, config.slow_ms, config.seed) == (0.01, 0.2, 100.0, 7)
    assert config.insufficient_quota
    assert not config.ratelimit_headers
    assert not config.retry_after
    assert config.model_limits == {"gpt-4o": (5, 500), "ft:gpt-4o-mini:acme": (6, 600)}
    assert config.limits_for("gpt-4o") == (5, 500)
    assert config.limits_for("other") == (10, 1000)


def test_model_limits_file_toml_and_json_with_flag_override(tmp_path: Path) -> None:
    toml = tmp_path / "limits.toml"
    toml.write_text('[models."gpt-4o"]\nrpm = 500\ntpm = 30000\n\n[models."gpt-4o-mini"]\nrpm = 1\ntpm = 2\n')
    assert load_model_limits(toml) == {"gpt-4o": (500, 30000), "gpt-4o-mini": (1, 2)}
    as_json = tmp_path / "limits.json"
    as_json.write_text('{"gpt-4o": {"rpm": 7, "tpm": 70}}')
    config = config_from_args(_parse("--model-limits", str(as_json), "--model", "gpt-4o=8:80"))
    assert config.model_limits == {"gpt-4o": (8, 80)}


def test_limits_file_typo_is_a_readable_error(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text('["gpt-4o"]\nrpm = 5\ntmp = 10\n')
    with pytest.raises(ValueError, match="tmp"):
        load_model_limits(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["--fail-rate", "0.6", "--reset-rate", "0.6"],
        ["--fail-rate", "1.5"],
        ["--quantum", "0"],
        ["--quantum", "61"],
        ["--rpm", "0"],
        ["--model", "gpt-4o"],
        ["--model", "gpt-4o=1:x"],
        ["--model-limits", "/nonexistent/limits.toml"],
    ],
)
def test_invalid_settings_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        config_from_args(_parse(*argv))
    assert run_simulate(_parse(*argv)) == 2
    assert "trio-mapper simulate:" in capsys.readouterr().err


async def test_runs_as_a_process_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "trio_mapper.simulator", "--port", "0", "--latency-ms", "0"]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                if not chunk:
                    break
                line += chunk
        text = line.decode()
        assert text.startswith("simulator listening on http://127.0.0.1:")
        url = text.rsplit(" ", 1)[1].strip()
        async with httpx.AsyncClient(headers={"authorization": "Bearer k"}) as client:
            response = await client.post(url + "/chat/completions", json=chat_body(max_tokens=3))
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
