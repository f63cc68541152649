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
