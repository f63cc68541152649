"""Reading the settings: what an operator writes in the config file means what it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_mapper.engine.process.settings import SettingsError, load_settings, read_settings


@pytest.mark.parametrize("written", ['"0660"', "0o660", '"660"'])
def test_a_socket_mode_in_the_config_file_is_octal_however_written(tmp_path: Path, written: str) -> None:
    """An operator's finding: socket_mode = "0660" was read as decimal 660, refused as 0o1224."""
    config = tmp_path / "engine.toml"
    config.write_text(f"[server]\nsocket_mode = {written}\n")
    settings = load_settings(
        cli={"rpm": 100, "tpm": 10_000, "max_concurrent_reqs": 1},
        config_file=config,
        environ={"OPENAI_API_KEY": "sk-test"},
        dotenv_dir=None,
    )
    assert settings.server.socket_mode == 0o660


def test_a_config_file_everyone_may_write_is_refused(tmp_path: Path) -> None:
    """A reviewer's finding: the keys file and the socket's directory were checked, not the config file,
    whose writer decides at the next reload who may connect and, at the next restart, where the key goes."""
    config = tmp_path / "engine.toml"
    config.write_text("[server]\nrpm = 100\n")
    config.chmod(0o666)
    with pytest.raises(SettingsError, match="is writable by everyone; chmod o-w"):
        load_settings(cli={}, config_file=config, environ={"OPENAI_API_KEY": "sk-test"}, dotenv_dir=None)


def test_the_base_url_in_a_dotenv_file_goes_with_the_key_found_there(tmp_path: Path) -> None:
    """An operator's finding: a .env with a third-party key and its OPENAI_BASE_URL gave the engine the key
    but not the URL, so the key was sent to api.openai.com. The file is read as the environment, below it."""
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-or-third-party\nOPENAI_BASE_URL=http://127.0.0.1:8000/v1\n")
    limits = {"rpm": 100, "tpm": 10_000, "max_concurrent_reqs": 1}
    settings = load_settings(cli=limits, config_file=None, environ={}, dotenv_dir=tmp_path)
    assert (settings.openai.api_key, settings.openai.base_url) == ("sk-or-third-party", "http://127.0.0.1:8000/v1")
    environ = {"OPENAI_BASE_URL": "http://127.0.0.1:9000/v1"}  # the environment still wins
    settings = load_settings(cli=limits, config_file=None, environ=environ, dotenv_dir=tmp_path)
    assert settings.openai.base_url == "http://127.0.0.1:9000/v1"


def test_problems_name_the_key_as_the_config_file_writes_it(tmp_path: Path) -> None:
    """An operator's finding: a mistake under [models."gpt-4o"] was reported at server.models.gpt-4o, a path the
    file does not have (the tables are kept under server in the settings), and a model name with dots came out
    as more keys than it is."""
    config = tmp_path / "engine.toml"
    limits = {"rpm": 100, "tpm": 10_000, "max_concurrent_reqs": 1}
    config.write_text(
        '[server]\nrpm = "lots"\n\n'
        '[models."gpt-3.5-turbo"]\nrpm = 100\ntpm = "many"\nrmp = 5\n\n'
        '[tenants.batch]\nweight = "heavy"\nnames = ["nightly"]\n'
    )
    with pytest.raises(SettingsError) as caught:
        load_settings(cli={"tpm": 10, "max_concurrent_reqs": 1}, config_file=config, environ={}, dotenv_dir=None)
    assert set(caught.value.problems) >= {
        "server.rpm: expected an integer, got 'lots'",
        "models.\"gpt-3.5-turbo\".tpm: expected an integer, got 'many'",
        'models."gpt-3.5-turbo": unknown key(s): rmp (did you mean rpm?)',
        "tenants.batch.weight: expected a number, got 'heavy'",
        "openai.api_key: required but not set (export OPENAI_API_KEY=…, put it in ./.env or, under systemd, in "
        "the credential openai-api-key; it is never taken from the command line)",
    }
    # Values that have the right type but break a rule are checked afterwards, and named the same way.
    config.write_text('[models.small]\nrpm = 0\ntpm = 10\n\n[prices."gpt-4o-mini"]\ninput = -1\noutput = 0.6\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(cli=limits, config_file=config, environ={"OPENAI_API_KEY": "sk-test"}, dotenv_dir=None)
    problems = caught.value.problems
    assert "models.small.rpm: must be a finite number > 0, got 0" in problems
    assert any(problem.startswith("prices.gpt-4o-mini.input: ") for problem in problems), problems  # a bare key
    assert not any("server.models" in problem or "server.prices" in problem for problem in problems), problems


def test_a_variable_no_setting_reads_is_named_with_the_closest_that_does(tmp_path: Path) -> None:
    """An operator's finding: TRIO_MAPPER_RMP=6000 (a typo) was ignored without a word, and the engine ran at
    the rate the operator thought they had changed."""
    (tmp_path / ".env").write_text("TRIO_MAPPER_BUDGET_PASWORD=hunter2-is-a-secret\n")
    environ = {
        "OPENAI_API_KEY": "sk-test",
        "TRIO_MAPPER_RMP": "6000",
        "TRIO_MAPPER_MODELS": "gpt-4o",
        "TRIO_MAPPER_TPM": "10000",
        "TRIO_MAPPER_MAX_CONCURRENT_REQS": "1",
        # Ours, without being settings the engine reads here (or settings that are): the clients' socket, the
        # Redis password, the test suite's switches that CI exports.
        "TRIO_MAPPER_SOCKET": str(tmp_path / "engine.sock"),
        "TRIO_MAPPER_BUDGET_PASSWORD": "another-secret",
        "TRIO_MAPPER_REQUIRE_REDIS": "1",
        "TRIO_MAPPER_REQUIRE_BROWSER": "1",
    }
    with pytest.raises(SettingsError) as caught:
        read_settings(cli={}, config_file=None, environ=environ, dotenv_dir=tmp_path)
    typo = (
        "TRIO_MAPPER_RMP in the environment is not a setting of the engine and is ignored; did you mean "
        "TRIO_MAPPER_RPM?"
    )
    # The missing setting, then why it is missing.
    assert caught.value.problems[0].startswith("server.rpm: required but not set")
    assert typo in caught.value.problems

    loaded = read_settings(cli={"rpm": 100}, config_file=None, environ=environ, dotenv_dir=tmp_path)
    assert loaded.unknown_variables == (
        "TRIO_MAPPER_MODELS in the environment is ignored: [models.NAME] tables are read from the config file only",
        typo,
        f"TRIO_MAPPER_BUDGET_PASWORD in {tmp_path / '.env'} is not a setting of the engine and is ignored; did you "
        "mean TRIO_MAPPER_BUDGET_PASSWORD?",
    )
    assert "secret" not in str(loaded.unknown_variables), "names only: a value may be a password"


def test_a_trio_mapper_variable_for_an_openai_setting_names_the_variable_the_engine_reads(tmp_path: Path) -> None:
    """--base-url is an option, yet its variable is the SDK's OPENAI_BASE_URL: TRIO_MAPPER_BASE_URL, which the
    README's "TRIO_MAPPER_<OPTION>" suggested, was ignored with a hint to TRIO_MAPPER_RPM, and the engine sent
    the key to api.openai.com instead of the URL its operator gave."""
    environ = {
        "OPENAI_API_KEY": "sk-test",
        "TRIO_MAPPER_BASE_URL": "http://127.0.0.1:8000/v1",
        "TRIO_MAPPER_PROJECT": "proj_x",
    }
    loaded = read_settings(
        cli={"rpm": 1, "tpm": 1, "max_concurrent_reqs": 1}, config_file=None, environ=environ, dotenv_dir=tmp_path
    )
    assert loaded.unknown_variables == (
        "TRIO_MAPPER_BASE_URL in the environment is ignored: the engine reads OPENAI_BASE_URL for base_url, "
        "as the openai SDK does",
        "TRIO_MAPPER_PROJECT in the environment is ignored: the engine reads OPENAI_PROJECT_ID for project, "
        "as the openai SDK does",
    )


def test_config_file_values_a_later_layer_overrides_are_named(tmp_path: Path) -> None:
    """The command line wins over the file (so does the environment): a change made in the file to a value
    set there has no effect, which the engine now says rather than reporting 'no changes'."""
    config = tmp_path / "engine.toml"
    config.write_text(
        '[server]\nrpm = 6000\ntpm = 100\nmax_concurrent_reqs = 4\nlog_level = "info"\nsocket_mode = "0600"\n\n'
        '[openai]\nbase_url = "http://127.0.0.1:8000/v1"\n'
    )
    (tmp_path / ".env").write_text("TRIO_MAPPER_TPM=200\n")
    environ = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": "http://127.0.0.1:9000/v1",
        "TRIO_MAPPER_MAX_CONCURRENT_REQS": "4",  # the file's value: nothing is overridden
    }
    loaded = read_settings(
        cli={"rpm": 5000, "log_level": "INFO", "socket_mode": 0o660},
        config_file=config,
        environ=environ,
        dotenv_dir=tmp_path,
    )
    assert [str(override) for override in loaded.overridden] == [
        "server.rpm in the config file has no effect: the command line sets it to 5000",
        f"server.tpm in the config file has no effect: TRIO_MAPPER_TPM in {tmp_path / '.env'} sets it to 200",
        "server.socket_mode in the config file has no effect: the command line sets it to 0660",
        "openai.base_url in the config file has no effect: OPENAI_BASE_URL in the environment sets it to "
        "'http://127.0.0.1:9000/v1'",
    ]
    assert (loaded.settings.server.rpm, loaded.settings.server.tpm) == (5000, 200)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2-SECRET@localhost:6379/0",
        "unix:///run/redis/redis.sock?password=hunter2-SECRET",
        "redis://localhost:6379/0?db=1&Password=hunter2-SECRET",
        "redis//:hunter2-SECRET@localhost",  # malformed: refused without being quoted
    ],
)
def test_a_budget_url_holding_a_password_is_refused_without_repeating_it(url: str) -> None:
    """A reviewer's finding: coredis takes ?password= too, which the check missed; the engine then logged the
    URL, password and all, when Redis refused it."""
    with pytest.raises(SettingsError) as caught:
        load_settings(
            cli={"rpm": 100, "tpm": 10_000, "max_concurrent_reqs": 1, "budget": url},
            config_file=None,
            environ={"OPENAI_API_KEY": "sk-test"},
            dotenv_dir=None,
        )
    assert "hunter2" not in str(caught.value.problems)
    assert any(problem.startswith("server.budget: ") for problem in caught.value.problems), caught.value.problems


def test_a_budget_url_may_name_a_database_and_tls_files() -> None:
    url = "rediss://redis.internal:6380/0?ssl_ca_certs=/etc/ssl/redis-ca.pem&ssl_keyfile=/etc/trio-mapper/client.key"
    settings = load_settings(
        cli={"rpm": 100, "tpm": 10_000, "max_concurrent_reqs": 1, "budget": url},
        config_file=None,
        environ={"OPENAI_API_KEY": "sk-test"},
        dotenv_dir=None,
    )
    assert settings.server.budget == url
