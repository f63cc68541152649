"""Arguments shared by the command-line tools: one definition, one error message for each."""

from __future__ import annotations

import argparse
from pathlib import Path

from trio_mapper.paths import SYSTEM_SOCKET_PATH

__all__ = [
    "add_socket_argument",
    "client_name",
    "non_negative_float",
    "octal_mode",
    "positive_float",
    "positive_int",
]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value + 0.0  # -0.0 is 0


def octal_mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 0660, got {text!r}") from None


def client_name(text: str) -> str:
    """The name a client gives in its hello, kept exactly as typed: the engine matches it against a tenant's
    ``names`` character for character."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty: a tenant's names match it exactly")
    if any(not character.isprintable() for character in text):
        raise argparse.ArgumentTypeError(f"must be printable text (no control characters), got {text!r}")
    return text


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    """``--socket``, the engine's socket, for a client tool."""
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="engine socket (default: $TRIO_MAPPER_SOCKET; else your own engine's, "
        "$XDG_RUNTIME_DIR/trio-mapper/engine.sock or without XDG_RUNTIME_DIR /tmp/trio-mapper-UID/engine.sock, "
        f"if it exists; else the system service's, {SYSTEM_SOCKET_PATH})",
    )
