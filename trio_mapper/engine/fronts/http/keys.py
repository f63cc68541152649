"""Client keys of the HTTP front over TCP: a TOML file of ``[keys] name = "key"``, never world-readable.

A key names a client: the name is the identity fairness is keyed by and what logs and stats show. The keys
themselves are only compared (in constant time), never logged.
"""

from __future__ import annotations

import hmac
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

#: Shortest key accepted: a guessable key would open the budget to any local process that can reach the port.
MIN_KEY_CHARS: Final = 16


class KeysError(Exception):
    """The keys file cannot be used; the message says why and what to do."""


@attrs.frozen
class ClientKeys:
    """Client name by key."""

    names_by_key: Mapping[str, str] = attrs.field(factory=dict, repr=lambda keys: f"<{len(keys)} keys>")

    def identify(self, presented: str) -> str | None:
        """The name of the client whose key this is, or None. Compares against every key in constant time."""
        found: str | None = None
        for key, name in self.names_by_key.items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                found = name
        return found


def describe_key_changes(old: ClientKeys, new: ClientKeys) -> str:
    """Which clients a new keys file adds, removes or gives a new key, by name; "" when it changes nothing."""
    old_keys: dict[str, set[str]] = {}
    new_keys: dict[str, set[str]] = {}
    for keys, by_name in ((old, old_keys), (new, new_keys)):
        for key, name in keys.names_by_key.items():
            by_name.setdefault(name, set()).add(key)
    parts = []
    for verb, names in (
        ("added", new_keys.keys() - old_keys.keys()),
        ("removed", old_keys.keys() - new_keys.keys()),
        ("new key for", {name for name in old_keys.keys() & new_keys.keys() if old_keys[name] != new_keys[name]}),
    ):
        if names:
            parts.append(f"{verb} {', '.join(sorted(names))}")
    return "; ".join(parts)


def load_keys(path: Path) -> ClientKeys:
    """Read and check the keys file.

    Raises:
        KeysError: missing, unreadable, world-readable, group-writable, not TOML, no ``[keys]`` table, a key
            too short or used twice. The message never quotes a key.
    """
    try:
        info = os.stat(path)
        text = path.read_text()
    except PermissionError as exc:
        raise KeysError(
            f"keys file {path} cannot be read: {exc.strerror or exc}. The engine reads it as its own user (under "
            "systemd a dynamic one): make it readable by a group the engine has, chmod 0640, e.g. "
            "SupplementaryGroups= in the unit (docs/systemd.md)"
        ) from None
    except OSError as exc:
        raise KeysError(f"keys file {path} cannot be read: {exc.strerror or exc}") from None
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise KeysError(f"keys file {path} is readable or writable by everyone; chmod o-rwx {path} (e.g. 0600 or 0640)")
    if info.st_mode & stat.S_IWGRP:
        # Its group may read it (an admin group, 0640), not write it: a member could add a key of their own.
        raise KeysError(f"keys file {path} is writable by its group; chmod g-w {path} (e.g. 0600 or 0640)")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysError(f"keys file {path} is not valid TOML: {exc}") from None
    table = raw.get("keys")
    extra = sorted(set(raw) - {"keys"})
    if not isinstance(table, dict) or extra:
        raise KeysError(f'keys file {path} must hold one [keys] table of name = "key" lines only')
    names_by_key: dict[str, str] = {}
    for name, key in table.items():
        if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
            raise KeysError(
                f"keys file {path}: the key of {name!r} must be a string of at least {MIN_KEY_CHARS} characters"
            )
        if key in names_by_key:
            raise KeysError(f"keys file {path}: {name!r} and {names_by_key[key]!r} have the same key")
        names_by_key[key] = name
    return ClientKeys(names_by_key)
