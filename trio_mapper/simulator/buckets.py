"""Per-model RPM/TPM token buckets that decide admission the way the real API does.

Each limit is a continuous bucket refilled at ``limit / 60`` per second holding at most
``limit * quantum / 60``: a quantum of 60 s allows a whole minute of burst, 1 s enforces the limit
per second ("limits can be quantized"). A request is charged in full when admitted; a rejected request costs
nothing. A request bigger than the bucket (but within the per-minute limit) is admitted once the bucket is
full and drives it negative, so quantized limits still admit everything the per-minute limit allows, at the
same long-run rate.

Time is passed in by the caller (read from ``trio.current_time()``), so the logic runs under a fake clock.
"""

from __future__ import annotations

import math
from typing import Literal, final

import attrs

# Float noise such as 1 / (5000 / 60) * 1000 = 12.000000000000002 must not round a 12 ms wait up to 13 ms.
_EPSILON = 1e-9

RejectionKind = Literal["requests", "tokens", "too_large"]


def format_duration(seconds: float) -> str:
    """Format a wait like Go's ``time.Duration.String()`` at millisecond precision, rounding up.

    ``0.012 -> "12ms"``, ``1 -> "1s"``, ``9.816 -> "9.816s"``, ``360 -> "6m0s"``, ``90.5 -> "1m30.5s"``.
    """
    millis = max(0, math.ceil(seconds * 1000 - 1e-6))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


@final
@attrs.define
class TokenBucket:
    """A continuous bucket: ``level`` refills at ``rate``/s up to ``capacity``, and may go negative."""

    limit: int
    capacity: float
    rate: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, limit: int, quantum: float, now: float) -> TokenBucket:
        capacity = limit * quantum / 60.0
        return cls(limit=limit, capacity=capacity, rate=limit / 60.0, level=capacity, updated=now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` can be taken (0 if it can be now); call ``refill`` first."""
        # A request larger than the bucket waits for a full bucket and then goes into debt.
        needed = min(amount, self.capacity)
        if self.level + _EPSILON >= needed:
            return 0.0
        return (needed - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    def fill(self, now: float) -> None:
        self.level = self.capacity
        self.updated = now

    @property
    def remaining(self) -> int:
        """What the ``x-ratelimit-remaining-*`` header shows: the content, floored, never negative."""
        return max(0, math.floor(self.level + _EPSILON))

    @property
    def until_full(self) -> float:
        """What the ``x-ratelimit-reset-*`` header shows: seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)


@final
@attrs.frozen
class Rejection:
    """Why a request was refused, with everything the 429 body and headers need."""

    kind: RejectionKind
    limit: int
    used: int
    requested: int
    # Seconds until the same request would be admitted; None when it never will be (too large).
    wait: float | None


@final
@attrs.define
class ModelBuckets:
    """The RPM and TPM buckets of one model."""

    requests: TokenBucket
    tokens: TokenBucket

    def admit(self, cost: int, now: float) -> Rejection | None:
        """Charge one request of ``cost`` tokens, or say why not (and charge nothing)."""
        self.requests.refill(now)
        self.tokens.refill(now)
        if cost > self.tokens.limit:
            return Rejection("too_large", self.tokens.limit, 0, cost, None)
        # Requests are checked first: a request that fails both is reported as an RPM 429.
        wait = self.requests.wait_for(1)
        if wait > 0.0:
            return Rejection("requests", self.requests.limit, self._used(self.requests), 1, wait)
        wait = self.tokens.wait_for(cost)
        if wait > 0.0:
            return Rejection("tokens", self.tokens.limit, self._used(self.tokens), cost, wait)
        self.requests.take(1)
        self.tokens.take(cost)
        return None

    @staticmethod
    def _used(bucket: TokenBucket) -> int:
        # "Used" in the 429 message is what the headers imply: limit minus remaining.
        return bucket.limit - bucket.remaining

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The six ``x-ratelimit-*`` headers describing the buckets as of their last refill."""
        return [
            (b"x-ratelimit-limit-requests", str(self.requests.limit).encode()),
            (b"x-ratelimit-limit-tokens", str(self.tokens.limit).encode()),
            (b"x-ratelimit-remaining-requests", str(self.requests.remaining).encode()),
            (b"x-ratelimit-remaining-tokens", str(self.tokens.remaining).encode()),
            (b"x-ratelimit-reset-requests", format_duration(self.requests.until_full).encode()),
            (b"x-ratelimit-reset-tokens", format_duration(self.tokens.until_full).encode()),
        ]


@final
class RateLimits:
    """Buckets for every model seen so far, each with its table limits or the defaults."""

    def __init__(self, default: tuple[int, int], table: dict[str, tuple[int, int]], quantum: float) -> None:
        self._default = default
        self._table = table
        self._quantum = quantum
        self._models: dict[str, ModelBuckets] = {}

    def __repr__(self) -> str:
        return f"<RateLimits models={len(self._models)} quantum={self._quantum}>"

    def buckets(self, model: str, now: float) -> ModelBuckets:
        found = self._models.get(model)
        if found is None:
            rpm, tpm = self._table.get(model, self._default)
            found = ModelBuckets(
                requests=TokenBucket.per_minute(rpm, self._quantum, now),
                tokens=TokenBucket.per_minute(tpm, self._quantum, now),
            )
            self._models[model] = found
        return found

    def admit(self, model: str, cost: int, now: float) -> tuple[ModelBuckets, Rejection | None]:
        buckets = self.buckets(model, now)
        return buckets, buckets.admit(cost, now)

    def refill_all(self, now: float) -> None:
        for buckets in self._models.values():
            buckets.requests.fill(now)
            buckets.tokens.fill(now)
