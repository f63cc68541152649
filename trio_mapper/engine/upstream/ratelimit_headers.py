"""What the upstream says about its rate limits: the ``x-ratelimit-*`` headers and the retry-after hints.

Every parser here is lenient on purpose: headers may be missing (seen on real responses), Azure sends ``-1``
as a "not known" sentinel, and a proxy may mangle values. A value that cannot be understood becomes None,
never an exception, so the caller falls back to its own bookkeeping.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import Final

import attrs
import httpx

__all__ = ["RateLimitSnapshot", "parse_duration", "retry_after_seconds"]

# Go's time.ParseDuration units as (multiplier, divisor): dividing keeps "12ms" exactly 0.012 (12 * 1e-3 is
# not). Both the micro sign (U+00B5) and the Greek mu (U+03BC) spell "µs" in Go.
_UNITS: Final[Mapping[str, tuple[float, float]]] = {
    "ns": (1.0, 1e9),
    "us": (1.0, 1e6),
    "\u00b5s": (1.0, 1e6),
    "\u03bcs": (1.0, 1e6),
    "ms": (1.0, 1e3),
    "s": (1.0, 1.0),
    "m": (60.0, 1.0),
    "h": (3600.0, 1.0),
}
# Longer units first so "ms" is not read as "m" followed by garbage.
_UNIT_PATTERN: Final = "|".join(sorted(map(re.escape, _UNITS), key=len, reverse=True))
_NUMBER: Final = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART: Final = re.compile(rf"({_NUMBER})({_UNIT_PATTERN})")
_DURATION: Final = re.compile(rf"[+-]?(?:{_NUMBER}(?:{_UNIT_PATTERN}))+")

# Waits named in error messages. OpenAI: "Please try again in 644ms." / "in 1.5s" / "in 6m0s" / "in 20s";
# Azure: "Please retry after 3 seconds." Either phrase may be followed by a Go duration or "N <unit word>".
_MESSAGE_WAIT: Final = re.compile(
    rf"(?:try again in|retry after)\s+(?:(?P<duration>(?:{_NUMBER}(?:{_UNIT_PATTERN}))+)(?![a-z])"
    rf"|(?P<amount>{_NUMBER})\s*(?P<unit>[a-z]*))",
    re.IGNORECASE,
)
_UNIT_WORDS: Final[Mapping[str, float]] = {
    "": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "millisecond": 1e-3,
    "milliseconds": 1e-3,
    "minute": 60.0,
    "minutes": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "hour": 3600.0,
    "hours": 3600.0,
    **{unit: multiplier / divisor for unit, (multiplier, divisor) in _UNITS.items()},
}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration such as ``12ms``, ``9.816s``, ``6m0s`` or ``1m30.5s``; None for garbage.

    As in Go, a bare ``0`` is allowed and any other number needs a unit. A leading sign is accepted, so the
    result may be negative; callers that need a wait check for ``> 0``.
    """
    text = text.strip()
    if text in {"0", "+0", "-0"}:
        return 0.0
    if not _DURATION.fullmatch(text):
        return None
    seconds = 0.0
    for number, unit in _DURATION_PART.findall(text):
        multiplier, divisor = _UNITS[unit]
        seconds += float(number) * multiplier / divisor
    return -seconds if text.startswith("-") else seconds


def format_duration(seconds: float) -> str:
    """A Go-style duration as OpenAI writes its reset headers: ``12ms``, ``9.816s``, ``6m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def budget_headers(
    *,
    limit_requests: int,
    limit_tokens: int,
    remaining_requests: float,
    remaining_tokens: float,
    reset_requests: float | None,
    reset_tokens: float | None,
) -> dict[str, str]:
    """``x-ratelimit-*`` headers in OpenAI's format, for a budget the engine describes itself."""
    headers = {
        "x-ratelimit-limit-requests": str(limit_requests),
        "x-ratelimit-limit-tokens": str(limit_tokens),
        "x-ratelimit-remaining-requests": str(max(0, math.floor(remaining_requests))),
        "x-ratelimit-remaining-tokens": str(max(0, math.floor(remaining_tokens))),
    }
    if reset_requests is not None:
        headers["x-ratelimit-reset-requests"] = format_duration(reset_requests)
    if reset_tokens is not None:
        headers["x-ratelimit-reset-tokens"] = format_duration(reset_tokens)
    return headers


def _lookup(headers: Mapping[str, str]) -> Mapping[str, str]:
    """A mapping that answers lower-case header names whatever case the sender used."""
    if isinstance(headers, httpx.Headers):
        return headers
    return {str(name).lower(): value for name, value in headers.items()}


def _count(value: str | None) -> int | None:
    """A non-negative header count, or None when missing, garbage or a negative sentinel (Azure's ``-1``)."""
    if value is None:
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def _reset(value: str | None) -> float | None:
    """A reset delay in seconds: a Go duration, or a plain number of seconds as some proxies send it."""
    if value is None:
        return None
    text = str(value).strip()
    seconds = parse_duration(text)
    if seconds is None:
        seconds = _finite_float(text)
    return seconds if seconds is not None and seconds >= 0 else None


def _finite_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@attrs.frozen
class RateLimitSnapshot:
    """The upstream's view of one model's budget, from one response's ``x-ratelimit-*`` headers.

    Every field is None when its header is missing, unreadable or the ``-1`` sentinel.
    """

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    #: Seconds until the request budget is whole again (not until the next request fits).
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimitSnapshot:
        """Read the snapshot from response headers; names are matched case-insensitively."""
        h = _lookup(headers)
        return cls(
            limit_requests=_count(h.get("x-ratelimit-limit-requests")),
            limit_tokens=_count(h.get("x-ratelimit-limit-tokens")),
            remaining_requests=_count(h.get("x-ratelimit-remaining-requests")),
            remaining_tokens=_count(h.get("x-ratelimit-remaining-tokens")),
            reset_requests=_reset(h.get("x-ratelimit-reset-requests")),
            reset_tokens=_reset(h.get("x-ratelimit-reset-tokens")),
        )

    @property
    def is_empty(self) -> bool:
        """True when the response carried no usable rate-limit header at all."""
        return all(value is None for value in attrs.astuple(self))


def _positive(seconds: float | None) -> float | None:
    return seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else None


def _from_http_date(text: str, now: float) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        # RFC 9110 dates are GMT; parsedate_to_datetime returns a naive datetime for "-0000".
        return None
    return moment.timestamp() - now


def _from_message(message: str) -> float | None:
    for match in _MESSAGE_WAIT.finditer(message):
        if match["duration"] is not None:
            seconds = parse_duration(match["duration"].lower())
        else:
            factor = _UNIT_WORDS.get(match["unit"].lower())
            seconds = None if factor is None else float(match["amount"]) * factor
        if _positive(seconds) is not None:
            return seconds
    return None


def retry_after_seconds(
    headers: Mapping[str, str], message: str | None = None, *, now: float | None = None
) -> float | None:
    """How long the upstream asked us to wait before retrying, in seconds; None when it did not say.

    Sources in order, the first usable one wins: ``retry-after-ms`` (milliseconds), ``retry-after`` (seconds
    or an HTTP date), then the error message ("Please try again in 644ms", Azure's "Please retry after 3
    seconds"). A value that is zero, negative or unreadable is skipped, as the official SDK does.

    Args:
        now: the current Unix time, for HTTP dates; defaults to ``time.time()``.
    """
    h = _lookup(headers)
    raw_ms = h.get("retry-after-ms")
    if raw_ms is not None:
        ms = _finite_float(str(raw_ms).strip())
        if (wait := _positive(None if ms is None else ms / 1000.0)) is not None:
            return wait
    raw = h.get("retry-after")
    if raw is not None:
        text = str(raw).strip()
        seconds = _finite_float(text)
        if seconds is None:
            seconds = _from_http_date(text, time.time() if now is None else now)
        if (wait := _positive(seconds)) is not None:
            return wait
    if message:
        return _positive(_from_message(message))
    return None
