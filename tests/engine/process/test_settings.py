"""Reading the settings: what an operator writes in the config file means what it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_mapper.engine.process.settings import SettingsError, load_settings


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
