"""Logging: one line per notable event, human-readable by default, JSON on request, never the key.

Clients choose some of what the engine logs (model names, frame types, ids, client names). Two filters on the
handler keep that from harming the log: `RedactSecrets` removes the key, then `BoundClientText` shortens
over-long text and escapes control characters, so one 4 MiB model name cannot write a 4 MiB line and a name
holding a newline cannot forge a second line (nor an ESC sequence repaint the terminal of whoever tails it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from trio_mapper.text import escape_control_characters, shorten

TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: Longest text an argument of a log call contributes to the line; longer text keeps this many characters and
#: says how long it was. Model names, ids and error messages are far shorter, and so are the engine's own
#: longest arguments (paths, the token estimators' description); only a client's junk is cut.
MAX_ARG_CHARS: Final = 1000
#: Longest message, after formatting: the backstop for text that is not an argument (an f-string, a format
#: string with many arguments).
MAX_MESSAGE_CHARS: Final = 4000
#: Secrets shorter than this are not redacted, here or from what the upstream sends: such a key is a placeholder
#: for a server without auth ("x", "EMPTY"), and its text occurs everywhere.
MIN_REDACTED_KEY_CHARS: Final = 8
#: Longest traceback; the cut is in the middle, as its first and last lines say the most.
MAX_EXCEPTION_CHARS: Final = 20_000


def _message_of(record: logging.LogRecord) -> str | None:
    """The formatted message, or None when the call's arguments do not fit its format: a filter must not
    raise into the code that logs; the handler reports that record as a logging error."""
    try:
        return record.getMessage()
    except Exception:
        return None


class RedactSecrets(logging.Filter):
    """Replaces the key wherever it might appear (an exception text, a URL) with a marker.

    The engine never logs the key on purpose; this is the belt to those braces. It sees the whole text: the
    shortening happens after it, so a cut can never leave part of a key behind.
    """

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [secret for secret in secrets if len(secret) >= MIN_REDACTED_KEY_CHARS]

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[REDACTED]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = _message_of(record)
        cleaned = message if message is None else self.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            # Formatters print exc_text as it is and format exc_info only when exc_text is empty.
            record.exc_text = self.redact(text)
        return True


class BoundClientText(logging.Filter):
    """Shortens over-long text in a record and escapes its control characters, so every record is one line.

    Each argument's text (a string, or the str or repr of an object such as an exception) is cut to
    MAX_ARG_CHARS; then the formatted message has its control characters escaped and is cut to
    MAX_MESSAGE_CHARS. A traceback keeps its lines, each escaped and cut the same way, and is cut to
    MAX_EXCEPTION_CHARS.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        original = record.args
        if isinstance(original, Mapping):
            record.args = {key: _bound_arg(value) for key, value in original.items()}
        elif isinstance(original, tuple):
            record.args = tuple(_bound_arg(value) for value in original)
        message = _message_of(record)
        if message is None:  # an object where %d wants a number, say: the message backstop alone then
            record.args = original
            message = _message_of(record)
        if message is not None:
            # Formatted once, here: the formatter prints the bounded text as it is.
            record.msg, record.args = shorten(escape_control_characters(message), MAX_MESSAGE_CHARS), None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _bound_traceback(record.exc_text)
        return True


def _bound_arg(value: Any) -> Any:
    if isinstance(value, str):
        return shorten(value, MAX_ARG_CHARS)
    if value is None or isinstance(value, int | float):
        return value  # numbers stay numbers, for %d and %.3f
    return _Bounded(value)


class _Bounded:
    """Stands for an argument that is not a string (an exception, say) in %s and %r alike, cut to size."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __str__(self) -> str:
        return shorten(str(self._value), MAX_ARG_CHARS)

    def __repr__(self) -> str:
        return shorten(repr(self._value), MAX_ARG_CHARS)


def _bound_traceback(text: str) -> str:
    lines = [shorten(escape_control_characters(line), MAX_MESSAGE_CHARS) for line in text.split("\n")]
    bounded = "\n".join(lines)
    if len(bounded) <= MAX_EXCEPTION_CHARS:
        return bounded
    half = MAX_EXCEPTION_CHARS // 2
    return f"{bounded[:half]}\n…({len(bounded) - 2 * half} chars of the traceback left out)…\n{bounded[-half:]}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str | logging.Formatter, *, secrets: list[str]) -> None:
    """Everything to stderr (the journal, under systemd), in ``fmt`` (``text``, ``json`` or a formatter of the
    caller's), with the secrets redacted. Called again, it replaces what it installed before."""
    handler = logging.StreamHandler(sys.stderr)
    if isinstance(fmt, str):
        fmt = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(fmt)
    # In this order: the key is redacted from the whole text before anything is cut.
    handler.addFilter(RedactSecrets(secrets))
    handler.addFilter(BoundClientText())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("trio_mapper").setLevel(level)
