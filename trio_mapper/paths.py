"""Where the engine listens by default; shared by the engine and the (light) client helper."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

SOCKET_ENV_VAR = "TRIO_MAPPER_SOCKET"
#: The system service's socket: ``ListenStream=`` of systemd/trio-mapper.socket, which owns it (the service
#: has no ``RuntimeDirectory=``; the engine serves the socket systemd passes it, whatever its own default).
SYSTEM_SOCKET_PATH: Final = Path("/run/trio-mapper/engine.sock")


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/trio-mapper/engine.sock``, else ``/tmp/trio-mapper-<uid>/engine.sock``.

    The per-user runtime directory is private to its user, which is what a key-owning socket wants; the
    /tmp fallback is per uid and created 0700 by the engine for the same reason.
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "trio-mapper" / "engine.sock"
    return Path("/tmp") / f"trio-mapper-{os.getuid()}" / "engine.sock"


def default_socket_paths() -> tuple[Path, ...]:
    """Where a client told nothing looks, in order: the user's own engine (`default_socket_path`), then the
    system service's (`SYSTEM_SOCKET_PATH`).

    The user's own comes first: someone who starts an engine of their own means to use it, and a machine with
    only the service then needs no setting at all.
    """
    own = default_socket_path()
    return (own,) if own == SYSTEM_SOCKET_PATH else (own, SYSTEM_SOCKET_PATH)


def resolve_socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The socket a client should use: the argument, else ``$TRIO_MAPPER_SOCKET``, else the first of
    `default_socket_paths` that exists (the first of them when none does, so that errors name a path)."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(SOCKET_ENV_VAR)
    if from_env:
        return Path(from_env)
    candidates = default_socket_paths()
    # lexists: a socket file is there whatever answers on it; a stale one is reported as refused, not skipped.
    return next((path for path in candidates if os.path.lexists(path)), candidates[0])
