"""``trio-mapper check-config``: the real command, as a subprocess, on good and bad settings in a temporary
directory. It must say what launch-engine would say, exit 0 or 2 as launch-engine would start or refuse, and never
show a secret, wherever the secret was put."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import TEST_API_KEY, engine_env

CHECK = [sys.executable, "-m", "trio_mapper", "check-config"]
LAUNCH = [sys.executable, "-m", "trio_mapper", "launch-engine"]
ALICE_KEY = "tm-check-alice-0123456789abcdef"
REDIS_PASSWORD = "redis-password-never-shown-4242"
FILE_PASSWORD = "redis-password-from-a-file-7373"
LEAD = "trio-mapper check-config: "


def run(command: list[str], *options: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *options], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def write_keys(directory: Path, mode: int = 0o600) -> Path:
    keys = directory / "keys.toml"
    keys.write_text(f'[keys]\nalice = "{ALICE_KEY}"\n')
    keys.chmod(mode)
    return keys


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    for secret in (TEST_API_KEY, ALICE_KEY, REDIS_PASSWORD, FILE_PASSWORD, "hunter2hunter2"):
        assert secret not in result.stdout and secret not in result.stderr


def test_good_settings_exit_0_with_what_would_run_and_the_warnings_of_a_start(short_tmp: Path) -> None:
    keys = write_keys(short_tmp)
    (short_tmp / "password").write_text(FILE_PASSWORD + "\n")
    config = short_tmp / "engine.toml"
    config.write_text(
        "[server]\nrpm = 5000\ntpm = 800000\nmax_concurrent_reqs = 64\n"
        f'http = "127.0.0.1:1"\nhttp_keys_file = "{keys}"\n'
        f'budget = "redis://127.0.0.1:1/0"\nbudget_password_file = "{short_tmp / "password"}"\n'
        '[models."gpt-4o"]\nrpm = 100\ntpm = 10000\n'
        '[tenants.research]\nkeys = ["alice", "carol"]\n'
    )
    socket = short_tmp / "engine.sock"
    env = engine_env(TRIO_MAPPER_RMP="5", TRIO_MAPPER_BUDGET_PASSWORD=REDIS_PASSWORD)
    result = run(CHECK, "--config", str(config), "--rpm", "6000", "--socket", str(socket), env=env, cwd=short_tmp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(LEAD + "ok: the engine would start with 6000 rpm, 800000 tpm, 64 concurrent")
    assert len(result.stdout.splitlines()) == 1
    assert f"unix:{socket}" in result.stdout and "HTTP http://127.0.0.1:1" in result.stdout
    assert "budget in redis://127.0.0.1:1/0" in result.stdout  # and Redis, on a port nobody listens on, not asked
    # What a start would log: the misspelt variable, the value the command line overrides, the tenant's unknown key.
    assert f"{LEAD}warning: TRIO_MAPPER_RMP in the environment is not a setting" in result.stderr
    assert "did you mean TRIO_MAPPER_RPM?" in result.stderr
    assert f"{LEAD}note: server.rpm in the config file has no effect: the command line sets it to 6000" in result.stderr
    assert "tenants.research names client key(s) carol that the keys file does not hold" in result.stderr
    assert_no_secret(result)
    # Nothing was created: no socket, no lock file, beside the files the test wrote.
    assert sorted(path.name for path in short_tmp.iterdir()) == ["engine.toml", "keys.toml", "password"]


def test_a_tenant_key_without_a_keys_file_says_there_is_none(short_tmp: Path) -> None:
    config = short_tmp / "engine.toml"
    config.write_text(
        '[server]\nrpm = 500\ntpm = 90000\nmax_concurrent_reqs = 4\n[tenants.research]\nkeys = ["alice"]\n'
    )
    result = run(CHECK, "--config", str(config), env=engine_env(), cwd=short_tmp)
    assert result.returncode == 0, result.stderr
    assert "tenants.research names client key(s) alice that no keys file (http_keys_file) names" in result.stderr


def test_bad_settings_exit_2_with_the_problems_launch_engine_prints(short_tmp: Path) -> None:
    config = short_tmp / "engine.toml"
    config.write_text('[server]\nrmp = 5000\ntpm = "lots"\nmax_concurrent_reqs = 0\n')
    env = engine_env(TRIO_MAPPER_RMP="5")
    checked = run(CHECK, "--config", str(config), "--socket", str(short_tmp / "s"), env=env, cwd=short_tmp)
    launched = run(LAUNCH, "--config", str(config), "--socket", str(short_tmp / "s"), env=env, cwd=short_tmp)
    assert (checked.returncode, launched.returncode) == (2, 2)
    problems = [line.removeprefix(LEAD) for line in checked.stderr.splitlines()]
    # Line for line what the engine says when it refuses to start.
    assert problems[:-1] == [line.removeprefix("trio-mapper launch-engine: ") for line in launched.stderr.splitlines()]
    assert problems[-1] == "the engine would not start: 4 problems (exit status 2)"
    assert "server: unknown key(s): rmp (did you mean rpm?)" in problems
    assert "server.tpm: expected an integer, got 'lots'" in problems
    assert any(line.startswith("TRIO_MAPPER_RMP in the environment is not a setting") for line in problems)
    assert checked.stdout == ""


def test_no_key_is_a_problem_but_a_key_is_never_tried(short_tmp: Path) -> None:
    env = engine_env()
    del env["OPENAI_API_KEY"]
    limits = ("--rpm", "1", "--tpm", "1", "--max-concurrent-reqs", "1", "--socket", str(short_tmp / "s"))
    missing = run(CHECK, *limits, env=env, cwd=short_tmp)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"{LEAD}openai.api_key: required but not set (export OPENAI_API_KEY=")
    # Any key will do, found where the engine looks (here ./.env): it is not sent anywhere.
    (short_tmp / ".env").write_text(f"OPENAI_API_KEY={TEST_API_KEY}\n")
    found = run(CHECK, *limits, env=env, cwd=short_tmp)
    assert found.returncode == 0, found.stderr
    assert_no_secret(found)


def test_secrets_placed_in_the_config_or_the_environment_are_never_shown(short_tmp: Path) -> None:
    config = short_tmp / "engine.toml"
    # The key pasted where a number goes: the problem quotes the value, redacted as in the engine's log.
    config.write_text(f'[server]\nrpm = 1\ntpm = "{TEST_API_KEY}"\nmax_concurrent_reqs = 1\n')
    result = run(CHECK, "--config", str(config), env=engine_env(), cwd=short_tmp)
    assert result.returncode == 2
    assert "server.tpm: expected an integer, got '[REDACTED]'" in result.stderr
    assert_no_secret(result)
    # launch-engine's refusal goes to stderr, the journal under systemd: redacted alike.
    launched = run(LAUNCH, "--config", str(config), "--socket", str(short_tmp / "s"), env=engine_env(), cwd=short_tmp)
    assert launched.returncode == 2
    assert "server.tpm: expected an integer, got '[REDACTED]'" in launched.stderr
    assert_no_secret(launched)
    # The Redis password where a name goes: the validator's message quotes the value.
    config.write_text("[server]\nrpm = 1\ntpm = 1\nmax_concurrent_reqs = 1\n")
    env = engine_env(TRIO_MAPPER_BUDGET_PASSWORD=REDIS_PASSWORD, TRIO_MAPPER_BUDGET_NAMESPACE=REDIS_PASSWORD + "!")
    in_namespace = run(CHECK, "--config", str(config), env=env, cwd=short_tmp)
    assert in_namespace.returncode == 2
    assert "server.budget_namespace: " in in_namespace.stderr and "[REDACTED]" in in_namespace.stderr
    assert_no_secret(in_namespace)
    # The password itself given as its file's path (TRIO_MAPPER_BUDGET_PASSWORD_FILE=the password): the file is
    # not there, and the message that says so must not quote the path.
    config.write_text('[server]\nrpm = 1\ntpm = 1\nmax_concurrent_reqs = 1\nbudget = "redis://h/0"\n')
    env = engine_env(TRIO_MAPPER_BUDGET_PASSWORD_FILE=FILE_PASSWORD)
    for command in (CHECK, LAUNCH):
        as_path = run(command, "--config", str(config), "--socket", str(short_tmp / "s"), env=env, cwd=short_tmp)
        assert as_path.returncode == 2
        assert "server.budget_password_file: cannot be read: No such file or directory" in as_path.stderr
        assert_no_secret(as_path)
    # A password in the budget URL is refused without being quoted.
    config.write_text('[server]\nrpm = 1\ntpm = 1\nmax_concurrent_reqs = 1\nbudget = "redis://:hunter2hunter2@h/0"\n')
    in_url = run(CHECK, "--config", str(config), env=engine_env(), cwd=short_tmp)
    assert in_url.returncode == 2
    assert "server.budget: must not contain a password" in in_url.stderr
    assert_no_secret(in_url)


def test_a_keys_file_others_may_read_is_refused_as_at_start(short_tmp: Path) -> None:
    keys = write_keys(short_tmp, mode=0o644)
    options = ("--rpm", "1", "--tpm", "1", "--max-concurrent-reqs", "1", "--socket", str(short_tmp / "s"))
    http = ("--http", "127.0.0.1:1", "--http-keys-file", str(keys))
    result = run(CHECK, *options, *http, env=engine_env(), cwd=short_tmp)
    assert result.returncode == 2
    assert f"{LEAD}keys file {keys} is readable or writable by everyone; chmod o-rwx" in result.stderr
    assert_no_secret(result)
    keys.chmod(0o600)
    assert run(CHECK, *options, *http, env=engine_env(), cwd=short_tmp).returncode == 0


def test_help_takes_launch_engines_options_and_says_what_the_exit_status_means() -> None:
    result = subprocess.run([*CHECK, "--help"], capture_output=True, text=True, timeout=60, check=True)
    for option in ("--config", "--rpm", "--http-keys-file", "--budget", "--socket-mode"):
        assert option in result.stdout
    text = " ".join(result.stdout.split())
    assert "Exit status: 0 the engine would start" in text and "2 it would refuse" in text
    assert "opens no socket" in text
