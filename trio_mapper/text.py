"""Text from clients and upstreams made safe to show: one line, no terminal control, bounded length.

Engine logs, `status`, `map` and `demo` all print strings chosen by someone else (a model name, an upstream
error message); this is the one place that decides how they are shown.
"""

from __future__ import annotations

from typing import Final

__all__ = ["escape_control_characters", "shorten"]

#: C0 controls, DEL, C1 controls, the Unicode line and paragraph separators and the bidirectional
#: overrides and isolates (which can make a terminal show text in another order than it is), each as a
#: visible escape.
_ESCAPES: Final[dict[int, str]] = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})
_ESCAPES.update({code: f"\\u{code:04x}" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def escape_control_characters(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1, U+2028/9, bidi controls) as a visible escape."""
    return text.translate(_ESCAPES)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters followed by how long it was, or ``text`` itself if it fits."""
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"
