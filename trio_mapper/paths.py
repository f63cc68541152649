"""Where the engine listens by default; shared by the engine and the (light) client helper."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV_VAR = "TRIO_MAPPER_SOCKET"


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/trio-mapper/engine.sock``, else ``/tmp/trio-mapper-<uid>/engine.sock``.

    The per-user runtime directory is private to its user, which is what a key-owning socket wants; the
    /tmp fallback is per uid and created 0700 by the engine for the same reason.
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "trio-mapper" / "engine.sock"
    return Path("/tmp") / f"trio-mapper-{os.getuid()}" / "engine.sock"


def resolve_socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The socket a client should use: the argument, else ``$TRIO_MAPPER_SOCKET``, else the default."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(SOCKET_ENV_VAR)
    if from_env:
        return Path(from_env)
    return default_socket_path()
