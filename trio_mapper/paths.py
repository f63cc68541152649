"""Transitional: moved to `trio_mapper.wire.paths`; the client modules still import it here."""

from trio_mapper.wire.paths import *  # noqa: F403
from trio_mapper.wire.paths import SOCKET_ENV_VAR, default_socket_path, resolve_socket_path

__all__ = ["SOCKET_ENV_VAR", "default_socket_path", "resolve_socket_path"]
