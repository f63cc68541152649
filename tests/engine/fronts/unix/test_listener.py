"""The socket's directory: refused where someone else could swap the socket (a unit test of listener.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from trio_mapper.engine.fronts.unix.listener import ListenerError, open_unix_listener


@pytest.mark.parametrize(
    ("mode", "refused"),
    [
        (0o700, None),
        (0o750, None),
        (0o770, "group-writable"),
        (0o775, "group-writable"),
        (0o777, "world-writable"),
        (0o1777, None),  # sticky, like /tmp: others cannot rename or remove what is ours
        (0o1770, None),
    ],
)
async def test_a_directory_others_may_write_to_is_refused(short_tmp: Path, mode: int, refused: str | None) -> None:
    directory = short_tmp / "d"
    directory.mkdir()
    os.chmod(directory, mode)
    if refused is None:
        listener, socket_file = await open_unix_listener(directory / "e.sock", mode=0o660)
        await listener.aclose()
        socket_file.remove()
        return
    with pytest.raises(ListenerError, match=refused):
        await open_unix_listener(directory / "e.sock", mode=0o660)
    assert not (directory / "e.sock").exists()


@pytest.mark.parametrize("mode", [0o755, 0o1777], ids=["closed", "sticky"])
async def test_a_directory_of_another_user_is_refused(short_tmp: Path, mode: int) -> None:
    """Sticky or not: its owner may rename our socket away and bind their own in its place."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    directory = short_tmp / "theirs"
    directory.mkdir()
    os.chmod(directory, mode)
    os.chown(directory, 12345, 12345)
    with pytest.raises(ListenerError, match="belongs to uid 12345"):
        await open_unix_listener(directory / "e.sock", mode=0o660)


async def test_a_symlink_planted_as_the_lock_file_is_not_followed(short_tmp: Path) -> None:
    directory = short_tmp / "d"
    directory.mkdir(mode=0o700)
    target = short_tmp / "victim"
    (directory / ".e.sock.lock").symlink_to(target)
    with pytest.raises(ListenerError, match="remove it if it is a symlink"):
        await open_unix_listener(directory / "e.sock", mode=0o660)
    assert not target.exists()


async def test_a_directory_the_engine_may_not_search_is_a_clear_error(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's finding: /run/trio-mapper left 0750 root:root by an engine run as root once made the
    service's engine (another user) die with a traceback. Root may search anything, so the denial is staged."""
    directory = short_tmp / "d"
    directory.mkdir(mode=0o750)
    socket_path = directory / "e.sock"
    real_lstat = os.lstat

    def denied(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(path) == os.fspath(socket_path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", denied)
    with pytest.raises(ListenerError, match=r"permission denied in the socket's directory .*d \(owner uid"):
        await open_unix_listener(socket_path, mode=0o660)
