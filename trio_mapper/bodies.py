"""How an upstream body is read: its JSON value, or its text when it is not JSON. A leaf any layer may import.

The engine reads upstream replies with it, and a client decodes the bodies it asked to receive as bytes
(`Hello.body_format` "json") with it, so both sides agree on what a body's value is.
"""

from __future__ import annotations

from typing import Any

import msgspec

from trio_mapper import collector

__all__ = ["decode_body", "is_binary_type"]


def decode_body(content: bytes, encoding: str | None = None) -> Any:
    """An upstream body's value: its JSON decoded, else its text (a proxy's HTML error page, say); None if empty."""
    if not content:
        return None
    try:
        with collector.paused_for(len(content)):
            return msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError):
        return content.decode(encoding or "utf-8", errors="replace")


def is_binary_type(content_type: str | None) -> bool:
    """Whether a body of this Content-Type is bytes to keep as they are (speech's audio), not JSON or text.
    None (no type named) is not: OpenAI's bodies are JSON."""
    if content_type is None:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    return not kind.startswith("text/") and not kind.endswith("json") and bool(kind)
