"""The HTTP front's client keys file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trio_mapper.engine.fronts.http.keys import ClientKeys, KeysError, describe_key_changes, load_keys

ALICE = "tm-alice-0123456789abcdef"


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_key_names_its_client(tmp_path: Path) -> None:
    keys = load_keys(write(tmp_path, f'[keys]\nalice = "{ALICE}"\nbob = "tm-bob-0123456789abcdef0"\n', 0o640))
    assert keys.identify(ALICE) == "alice"
    assert keys.identify("tm-bob-0123456789abcdef0") == "bob"
    assert keys.identify(ALICE[:-1]) is None
    assert keys.identify("") is None
    assert ALICE not in repr(keys)


@pytest.mark.parametrize(
    ("text", "mode", "complaint"),
    [
        (f'[keys]\nalice = "{ALICE}"\n', 0o644, "readable or writable by everyone"),
        (f'[keys]\nalice = "{ALICE}"\n', 0o602, "readable or writable by everyone"),
        (f'[keys]\nalice = "{ALICE}"\n', 0o660, "writable by its group"),
        (f'[keys]\nalice = "{ALICE}"\n', 0o620, "writable by its group"),
        ("alice:key\n", 0o600, "not valid TOML"),
        (f'alice = "{ALICE}"\n', 0o600, "one [keys] table"),
        ('[keys]\nalice = "short"\n', 0o600, "at least 16 characters"),
        (f'[keys]\nalice = "{ALICE}"\nbob = "{ALICE}"\n', 0o600, "the same key"),
    ],
)
def test_unusable_files_are_refused_without_quoting_a_key(tmp_path: Path, text: str, mode: int, complaint: str) -> None:
    with pytest.raises(KeysError, match=re.escape(complaint)) as refused:
        load_keys(write(tmp_path, text, mode))
    assert ALICE not in str(refused.value)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="cannot be read"):
        load_keys(tmp_path / "absent.toml")


def test_a_file_the_engines_user_cannot_read_says_how_to_share_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd the engine runs as a dynamic user, and the keys file must not be readable by others."""
    path = write(tmp_path, f'[keys]\nalice = "{ALICE}"\n', 0o600)

    def refused(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", refused)  # this test may run as root, which reads anything
    with pytest.raises(KeysError, match="readable by a group the engine has, chmod 0640") as error:
        load_keys(path)
    assert "SupplementaryGroups=" in str(error.value)


def test_a_reload_names_the_clients_whose_keys_changed_never_the_keys() -> None:
    old = ClientKeys({"k-alice-000000000000": "alice", "k-bob-00000000000000": "bob", "k-carol-000000000000": "carol"})
    new = ClientKeys({"k-alice-000000000000": "alice", "k-bob-11111111111111": "bob", "k-dave-000000000000": "dave"})
    assert describe_key_changes(old, new) == "added dave; removed carol; new key for bob"
    assert describe_key_changes(new, new) == ""
