"""The local meter: one lane's budget counted in this process's memory (the default `Meter`).

Each lane has two dimensions, tokens and requests, each metered by a continuous bucket ("bucket" mode) or
by fixed windows ("period" mode), and what replies taught about it: the corrections by usage and headers,
the cold start, the burst learned from rested replies, and the pace learned from 429s (AIMD). docs/ledger.md
explains the modes, why "bucket" is the default, and how replies correct the meter.

All time is `trio.current_time()`, so tests run under `autojump_clock`. Nothing here awaits: each method is
one atomic step of the `Meter` contract.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final, Protocol, final

import trio

from trio_mapper.engine.budget.interface import (
    MODES,
    Cost,
    LaneStatistics,
    Limits,
    Mode,
    RequestTooLarge,
    Reservation,
    check_cost,
)

if TYPE_CHECKING:
    from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot

logger = logging.getLogger("trio_mapper.ledger")

#: A 429 that names no wait still means the upstream's bucket is empty; one second is the quantum the
#: upstream is documented to enforce at, and the bucket restarting empty paces what follows anyway.
DEFAULT_PAUSE: Final = 1.0
#: Bucket mode's burst until replies show more: one second of refill, the quantum the upstream is documented
#: to enforce at. A fresh engine does not know what a previous run or another client just spent, and an
#: upstream with a one-second bucket answers a whole period's burst with a storm of 429s. The first reply
#: to a request sent while our bucket was full shows how big the upstream's burst really is, and the
#: burst grows to that (up to limit x period / 60). Sustained throughput does not depend on it.
INITIAL_BURST_SECONDS: Final = 1.0

#: Weight kept by the per-lane estimate correction at each reply (memory of about 20 replies): long enough
#: to ignore one odd prompt, short enough to follow a change of workload.
CORRECTION_DECAY: Final = 0.95
#: Bounds on the correction factor: a tokenizer mismatch is a few percent to tens of percent; a factor
#: beyond 2x means something else is wrong, and an unbounded factor would let one outlier starve a lane.
CORRECTION_MIN: Final = 0.5
CORRECTION_MAX: Final = 2.0

#: A reply to a request admitted while our bucket was at least this full describes a rested upstream:
#: its remaining budget plus that request's cost is (a lower bound of) the upstream's burst size.
RESTED_FRACTION: Final = 0.9
#: Seconds a limit read from the upstream's headers decides on its own that a request is too large. Only
#: replies renew it, and a lane that refuses everything as too large sends none: one header lower than the
#: configured limit (a dated snapshot sharing its family's lane) refused the lane's requests until a restart.
OBSERVED_LIMIT_TTL: Final = 60.0

# Learning the rate from 429s when the upstream sends no limit header: additive increase, multiplicative
# decrease (AIMD) of the pace of each dimension. docs/ledger.md ("Learning the rate from 429s") has the
# algorithm and the measurements behind each value (the simulations in tests/engine/budget/test_ledger*.py, the bench).
#: A 429 that is new evidence multiplies the pace by AIMD_DECREASE when it comes before the pace grew
#: REPEAT_GROWTH above what the previous decrease set (refused again at once: still far too fast). 0.7, TCP
#: CUBIC's factor: told 2x the real limits, the engine is under them after three decreases
#: (2 -> 1.6 -> 1.12 -> 0.78). 0.5 undershot (91 % of the rate told 1.5x); 0.85 took more steps from 4x.
AIMD_DECREASE: Final = 0.7
#: ... and by this once the pace had grown back: the top of a sawtooth, 10-20 % above the real rate, undone
#: in one step. 0.7 here measured 91-92 % of the rate with exact limits (a stray 429 cost a deep dip) and
#: 84 % told 2x; 0.9 refused 60 % more told 2x (too shallow to get under the overshoot).
AIMD_DECREASE_ISOLATED: Final = 0.8
#: 5 % of growth is at least 10 replies (AIMD_INCREASE_PER_REPLY) and many round trips, so the retries of one
#: overshoot are answered long before. A time limit (5 s, tried first) took a sawtooth that is short at
#: 23 requests per second for a repeat and dropped the pace to 0.74x the real rate.
REPEAT_GROWTH: Final = 0.05
#: While replies come back, the pace grows by this fraction of max(pace before the last decrease, pace) per
#: second of replies at the full pace: back from a 20 % dip in ~10 s, then 2 % per second, so a raised
#: limit is found within a minute. 0.01 measured 86-93 % of the rate told 2x (slow back after each dip);
#: 0.05 gained nothing and was refused more.
AIMD_INCREASE: Final = 0.02
#: ... but by at most this fraction per reply. At a few requests per second a reply stands for a second or
#: more, and time-clocked growth alone had 6.2 % of the attempts refused told 2x; this keeps about 30
#: replies between overshoots (3.3 %).
AIMD_INCREASE_PER_REPLY: Final = 0.005
#: The pace never drops below this fraction of the configured limit: 429s that another client of the key
#: causes could otherwise drive it towards zero, from where the increase (relative to the pace) is slow.
AIMD_FLOOR: Final = 0.01

#: Float slack in budget comparisons: refill is continuous, so a waiter woken at its computed time may see
#: its budget short by rounding error and would otherwise sleep again for a nanosecond.
_EPS: Final = 1e-6

# --------------------------------------------------------------------------------------------------------
# Dimension meters: one per dimension (requests, tokens) of a lane's `LocalMeter`. `charge` returns a mark
# that `credit` takes back, so a credit never returns budget that has since expired anyway (window reset,
# refill lost at a full bucket).


class _DimensionMeter(Protocol):
    capacity: float

    def configure(self, limit: float, capacity: float, now: float) -> None: ...
    def available(self, now: float) -> float: ...
    def used(self, now: float) -> float: ...
    def charge(self, amount: float, now: float) -> float: ...
    def credit(self, amount: float, mark: float, now: float) -> None: ...
    def ready_at(self, amount: float, now: float) -> float: ...
    def drain_until(self, resume_at: float, now: float) -> None: ...
    def expired_since(self, mark: float, now: float) -> float: ...


@final
class TokenBucket:
    """Continuous token bucket: refills ``limit/60`` per second up to ``capacity``; may go negative (debt)."""

    def __init__(self, limit: float, capacity: float, now: float, level: float) -> None:
        self.rate = limit / 60.0
        self.capacity = capacity
        self.level = min(level, capacity)
        self.updated = now
        # Refill thrown away because the bucket was full. A charge made before some refill was thrown away
        # cannot be fully credited back later: had it not been made, that refill would have been lost too.
        self.lost = 0.0

    def _sync(self, now: float) -> None:
        if now > self.updated:
            level = self.level + self.rate * (now - self.updated)
            if level > self.capacity:
                self.lost += level - max(self.level, self.capacity)
                level = self.capacity
            self.level = level
            self.updated = now

    def configure(self, limit: float, capacity: float, now: float) -> None:
        self._sync(now)
        self.rate = limit / 60.0
        self.capacity = capacity
        if self.level > capacity:
            self.lost += self.level - capacity
            self.level = capacity

    def available(self, now: float) -> float:
        self._sync(now)
        return self.level

    def used(self, now: float) -> float:
        return self.capacity - self.available(now)

    def charge(self, amount: float, now: float) -> float:
        self._sync(now)
        self.level -= amount
        return self.lost

    def credit(self, amount: float, mark: float, now: float) -> None:
        self._sync(now)
        amount -= self.lost - mark
        if amount > 0:
            level = self.level + amount
            if level > self.capacity:
                self.lost += level - max(self.level, self.capacity)
                level = self.capacity
            self.level = level

    def ready_at(self, amount: float, now: float) -> float:
        self._sync(now)
        # A request bigger than the bucket runs once the bucket is full, going into debt: it must not hang.
        need = min(amount, self.capacity)
        if self.level >= need - _EPS:
            return now
        return now + (need - self.level) / self.rate

    def drain_until(self, resume_at: float, now: float) -> None:
        self._sync(now)
        # Empty exactly at resume_at, so admission restarts at the refill pace instead of with a burst.
        self.level = min(self.level, -self.rate * max(0.0, resume_at - now))

    def expired_since(self, mark: float, now: float) -> float:
        """Budget given back without our doing since ``mark``: refill thrown away at a full bucket."""
        self._sync(now)
        return self.lost - mark


@final
class _WindowMeter:
    """Fixed windows of ``period`` seconds aligned on ``origin``, each with budget ``capacity``.

    Debt (a request bigger than a window, or a correction) carries over into the next windows; unused
    budget does not. After a pause, a temporary bucket holding one second of refill paces admission at
    ``limit/60`` per second for one period, so the windows right after a 429 are not spent in one burst.
    """

    def __init__(self, limit: float, capacity: float, now: float, origin: float, period: float) -> None:
        self.limit = limit
        self.capacity = capacity
        self.origin = origin
        self.period = period
        self.window = self._index(now)
        self.charged = 0.0
        self.ramp: TokenBucket | None = None
        self.ramp_until = -math.inf

    def _index(self, now: float) -> int:
        # The slack keeps a waiter woken exactly at a boundary from seeing the old window by rounding.
        return math.floor((now - self.origin) / self.period + 1e-9)

    def _sync(self, now: float) -> None:
        index = self._index(now)
        if index > self.window:
            self.charged = max(0.0, self.charged - self.capacity * (index - self.window))
            self.window = index
        if self.ramp is not None and now >= self.ramp_until:
            self.ramp = None

    def configure(self, limit: float, capacity: float, now: float) -> None:
        self._sync(now)
        self.limit = limit
        self.capacity = capacity
        if self.ramp is not None:
            self.ramp.configure(limit, self._ramp_capacity(), now)

    def _ramp_capacity(self) -> float:
        return min(self.capacity, self.limit / 60.0)

    def available(self, now: float) -> float:
        self._sync(now)
        left = self.capacity - self.charged
        if self.ramp is not None:
            left = min(left, self.ramp.available(now))
        return left

    def used(self, now: float) -> float:
        self._sync(now)
        return self.charged

    def charge(self, amount: float, now: float) -> float:
        self._sync(now)
        self.charged += amount
        if self.ramp is not None:
            self.ramp.charge(amount, now)
        return float(self.window)

    def credit(self, amount: float, mark: float, now: float) -> None:
        self._sync(now)
        # Each reset since the charge may have paid it off already; assume it did (the smaller credit).
        # The ramp is not credited: it is short-lived and erring slow there is what it is for.
        amount -= self.capacity * (self.window - mark)
        if amount > 0:
            self.charged = max(0.0, self.charged - amount)

    def ready_at(self, amount: float, now: float) -> float:
        self._sync(now)
        # A request bigger than a window runs in an untouched window (charged == 0), going into debt.
        target = self.capacity - min(amount, self.capacity)
        if self.charged <= target + _EPS:
            at = now
        else:
            windows = math.ceil((self.charged - target - _EPS) / self.capacity)
            at = self.origin + (self.window + windows) * self.period
        if self.ramp is not None:
            at = max(at, self.ramp.ready_at(amount, now))
        return at

    def drain_until(self, resume_at: float, now: float) -> None:
        self._sync(now)
        if self.ramp is None:
            self.ramp = TokenBucket(self.limit, self._ramp_capacity(), now, 0.0)
        self.ramp.drain_until(resume_at, now)
        self.ramp_until = max(self.ramp_until, resume_at + self.period)

    def expired_since(self, mark: float, now: float) -> float:
        """Everything charged before ``mark``'s window is forgiven once the window resets."""
        self._sync(now)
        return math.inf if self.window > mark else 0.0


# --------------------------------------------------------------------------------------------------------


@final
class _Dimension:
    """One metered dimension of a lane ("requests" or "tokens") and what replies taught us about it."""

    __slots__ = (
        "adjusted",
        "cold",
        "decreased_at",
        "held_back",
        "learned",
        "lowered_to",
        "meter",
        "name",
        "observed",
        "observed_at",
        "paced",
        "peak",
        "warned",
    )

    def __init__(self, name: str, meter: _DimensionMeter, learned: float) -> None:
        self.name = name
        self.meter = meter
        # Budget taken away after the fact (usage and header corrections), cumulative: a reply compares
        # the upstream's view with ours at its reservation, minus what later corrections already removed.
        self.adjusted = 0.0
        # Until the first reply to a request admitted from a full bucket: our level is the cold-start guess
        # (one second of refill), which that reply may raise once to what the upstream really holds.
        self.cold = True
        # What the cold start withheld from a full bucket: the most that first raise may give back.
        self.held_back = 0.0
        # Bucket mode: the largest burst a rested upstream has shown (see RESTED_FRACTION).
        self.learned = learned
        self.observed: int | None = None  # the latest limit header
        self.observed_at = -math.inf  # when a reply last said so
        self.warned: int | None = None
        # Learned from 429s while no limit header is seen (AIMD): the pace per minute, None until the first
        # 429 that names this dimension; the pace just before the latest decrease; and how many requests
        # had been admitted at that decrease (a 429 to one of those is the same overshoot, not new evidence).
        self.paced: float | None = None
        self.peak = 0.0
        self.decreased_at = 0
        self.lowered_to = -math.inf  # and the pace it set


@final
class _Book:
    """A reservation's `Reservation.mark` in a `LocalMeter`, one value per dimension: (tokens, requests)."""

    __slots__ = ("adjusted", "available", "charged_prompt", "marks", "rested", "seq")

    def __init__(
        self,
        charged_prompt: int | None,
        marks: tuple[float, float],
        available: tuple[float, float],
        adjusted: tuple[float, float],
        rested: tuple[bool, bool],
        seq: int,
    ) -> None:
        self.seq = seq  # admitted as the lane's seq-th reservation
        self.charged_prompt = charged_prompt
        self.marks = marks  # what a later credit may still give back (see _DimensionMeter)
        self.available = available  # our view just after charging it
        self.adjusted = adjusted  # _Dimension.adjusted at that moment
        self.rested = rested  # was the meter nearly full before charging it?


def _header_value(value: int | None) -> int | None:
    # Azure sends -1 as "unknown"; a parser may pass it through. Treat any negative like a missing header.
    if value is None or value < 0:
        return None
    return value


@final
class LocalMeter:
    """The in-process `Meter` of one lane; see docs/ledger.md. Not thread-safe: one trio run.

    The class is a `MeterFactory`, the ledger's default: ``Ledger(..., meter_factory=LocalMeter)``.
    """

    def __init__(self, lane: str, limits: Limits, *, period: float, mode: Mode, origin: float) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ledger mode {mode!r}; expected one of {', '.join(MODES)}")
        now = trio.current_time()
        self.name = lane
        self._mode: Mode = mode
        self._period = period
        self._configured = limits
        self._effective = limits
        meters: list[_DimensionMeter] = []
        for limit in (limits.tpm, limits.rpm):
            initial = limit / 60.0 * INITIAL_BURST_SECONDS
            if mode == "bucket":
                meters.append(TokenBucket(limit, self._capacity(limit, initial), now, initial))
            else:
                meters.append(_WindowMeter(limit, self._full(limit), now, origin, period))
        self._tokens = _Dimension("tokens", meters[0], limits.tpm / 60.0 * INITIAL_BURST_SECONDS)
        self._requests = _Dimension("requests", meters[1], limits.rpm / 60.0 * INITIAL_BURST_SECONDS)
        for dim, limit in ((self._tokens, limits.tpm), (self._requests, limits.rpm)):
            dim.held_back = max(0.0, self._full(limit) - limit / 60.0 * INITIAL_BURST_SECONDS)
        self._in_flight = 0
        self._paused_until = -math.inf
        self._pauses = 0
        self._est_decayed = 0.0
        self._act_decayed = 0.0
        self._correction = 1.0
        self._estimated_total = 0
        self._actual_total = 0
        self._reservations = 0
        self._refunds = 0
        self._reconciles = 0
        # The seq of the reservation `settle` settled last: the request a `pause` right after it answers;
        # and the paces before the growth that reply gave, which that pause takes back (a 429 is no clean
        # reply).
        self._last_reply: int | None = None
        self._last_paces: tuple[float | None, float | None] | None = None
        self._decreases = 0

    def __repr__(self) -> str:
        return (
            f"<LocalMeter {self.name!r} mode={self._mode} rpm={self._effective.rpm} "
            f"tpm={self._effective.tpm} in_flight={self._in_flight}>"
        )

    # -- limits ------------------------------------------------------------------------------------------

    def _full(self, limit: float) -> float:
        return limit * self._period / 60.0

    def _capacity(self, limit: float, learned: float) -> float:
        full = self._full(limit)
        if self._mode != "bucket":
            return full
        return min(full, max(learned, limit / 60.0 * INITIAL_BURST_SECONDS))

    def _effective_limit(self, dim: _Dimension, configured: int) -> int:
        observed = dim.observed
        if observed is None or observed >= configured:
            return configured
        if dim.warned != observed:
            dim.warned = observed
            logger.warning(
                "lane %s: upstream reports a %s limit of %d per minute, below the configured %d; using %d",
                self.name,
                dim.name,
                observed,
                configured,
                observed,
            )
        return observed

    def _apply_limits(self, now: float) -> None:
        tpm = self._effective_limit(self._tokens, self._configured.tpm)
        rpm = self._effective_limit(self._requests, self._configured.rpm)
        self._effective = Limits(rpm=rpm, tpm=tpm)
        for dim, limit in ((self._tokens, tpm), (self._requests, rpm)):
            self._configure(dim, limit, now)

    def _pace(self, dim: _Dimension, limit: int) -> float:
        """The rate a dimension is metered at: the effective limit, or lower when learned from 429s."""
        if dim.paced is None or dim.observed is not None:
            return float(limit)
        return min(float(limit), dim.paced)

    def _configure(self, dim: _Dimension, limit: int, now: float) -> None:
        pace = self._pace(dim, limit)
        dim.meter.configure(pace, self._capacity(pace, dim.learned), now)

    def _limit_of(self, dim: _Dimension) -> int:
        return self._effective.tpm if dim is self._tokens else self._effective.rpm

    def _configured_of(self, dim: _Dimension) -> int:
        return self._configured.tpm if dim is self._tokens else self._configured.rpm

    def update_limits(self, limits: Limits) -> None:
        if limits != self._configured:
            # The operator's new limits hold until a reply's headers say otherwise.
            for dim in (self._tokens, self._requests):
                dim.observed = None
        self._configured = limits
        self._apply_limits(trio.current_time())

    # -- admission ---------------------------------------------------------------------------------------

    def check_admissible(self, cost: Cost) -> None:
        try:
            check_cost(self.name, self._effective, cost)
        except RequestTooLarge:
            # Too large for a limit the upstream reported: final while the report is recent; past that, the
            # request goes by the configured limit, and its reply says what the limit is now.
            now = trio.current_time()
            stale = [
                dim
                for dim in (self._tokens, self._requests)
                if dim.observed is not None and now - dim.observed_at > OBSERVED_LIMIT_TTL
            ]
            if not stale:
                raise
            for dim in stale:
                dim.observed = None
            self._apply_limits(now)
            check_cost(self.name, self._effective, cost)

    def _charge_for(self, cost: Cost) -> tuple[int, int | None]:
        """Tokens to charge, and the prompt part of them, with the lane's estimate correction applied."""
        if cost.prompt_tokens is None:
            return cost.tokens, None
        prompt = math.ceil(cost.prompt_tokens * self._correction)
        return cost.tokens - cost.prompt_tokens + prompt, prompt

    def try_charge(self, cost: Cost) -> Reservation | float:
        self.check_admissible(cost)
        now = trio.current_time()
        tokens, prompt = self._charge_for(cost)
        t, r = self._tokens.meter, self._requests.meter
        ready_at = max(self._paused_until, r.ready_at(cost.requests, now), t.ready_at(tokens, now))
        if ready_at > now:
            return ready_at
        rested = (
            t.available(now) >= RESTED_FRACTION * t.capacity,
            r.available(now) >= RESTED_FRACTION * r.capacity,
        )
        marks = (t.charge(tokens, now), r.charge(cost.requests, now))
        book = _Book(
            charged_prompt=prompt,
            marks=marks,
            available=(t.available(now), r.available(now)),
            adjusted=(self._tokens.adjusted, self._requests.adjusted),
            rested=rested,
            seq=self._reservations + 1,
        )
        self._reservations += 1
        self._in_flight += 1
        return Reservation(self.name, cost, now, tokens, book)

    # -- after the request -------------------------------------------------------------------------------

    def _settle(self, reservation: Reservation) -> _Book | None:
        """The reservation's book, now settled; None when it was settled already."""
        if reservation.lane != self.name or not isinstance(reservation.mark, _Book):
            raise ValueError(f"reservation of lane {reservation.lane!r} given to lane {self.name!r}")
        if reservation.settled:
            logger.debug("lane %s: %r settled twice; ignored", self.name, reservation)
            return None
        reservation.settled = True
        self._in_flight -= 1
        return reservation.mark

    def refund(self, reservation: Reservation) -> bool:
        book = self._settle(reservation)
        if book is None:
            return False
        now = trio.current_time()
        self._tokens.meter.credit(reservation.charged_tokens, book.marks[0], now)
        self._requests.meter.credit(reservation.cost.requests, book.marks[1], now)
        self._refunds += 1
        return True

    def settle(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int | None,
        snapshot: RateLimitSnapshot | None,
    ) -> bool:
        book = self._settle(reservation)
        if book is None:
            return False
        now = trio.current_time()
        self._reconciles += 1
        self._last_reply = book.seq
        self._last_paces = None
        estimate = reservation.cost.prompt_tokens
        if prompt_tokens is not None and prompt_tokens >= 0 and estimate is not None:
            assert book.charged_prompt is not None
            error = prompt_tokens - book.charged_prompt
            if error > 0:
                self._tokens.meter.charge(error, now)
            elif error < 0:
                self._tokens.meter.credit(-error, book.marks[0], now)
            self._tokens.adjusted += error
            reservation.charged_tokens += error
            self._learn_correction(estimate, prompt_tokens)
        if snapshot is not None:
            self._apply_snapshot(reservation, book, snapshot, now)
        if snapshot is not None or prompt_tokens is not None:
            # An answer came back (a 429 among them: `pause` follows, takes the growth back and decreases).
            self._last_paces = (self._tokens.paced, self._requests.paced)
            self._grow(self._tokens, reservation.charged_tokens, now)
            self._grow(self._requests, reservation.cost.requests, now)
        return True

    def _grow(self, dim: _Dimension, amount: float, now: float) -> None:
        """Additive increase of a pace learned from 429s, clocked by replies: ``amount`` is what the reply's
        request was charged, so at full pace the growth is AIMD_INCREASE x max(peak, pace) per second."""
        if dim.paced is None or dim.observed is not None or amount <= 0:
            return
        limit = self._limit_of(dim)
        pace = self._pace(dim, limit)
        if pace >= limit:
            return
        seconds = amount / (pace / 60.0)
        step = min(AIMD_INCREASE * seconds, AIMD_INCREASE_PER_REPLY)
        dim.paced = min(float(limit), pace + step * max(dim.peak, pace))
        self._configure(dim, limit, now)

    def _learn_correction(self, estimate: int, actual: int) -> None:
        self._estimated_total += estimate
        self._actual_total += actual
        self._est_decayed = self._est_decayed * CORRECTION_DECAY + estimate
        self._act_decayed = self._act_decayed * CORRECTION_DECAY + actual
        if self._est_decayed > 0:
            ratio = self._act_decayed / self._est_decayed
            self._correction = min(CORRECTION_MAX, max(CORRECTION_MIN, ratio))

    def _apply_snapshot(self, reservation: Reservation, book: _Book, snapshot: RateLimitSnapshot, now: float) -> None:
        limits_changed = False
        for dim, limit in (
            (self._tokens, _header_value(snapshot.limit_tokens)),
            (self._requests, _header_value(snapshot.limit_requests)),
        ):
            # 0 is no usable limit either (it would forbid everything); treat it as absent.
            if limit:
                dim.observed_at = now
            if limit and limit != dim.observed:
                dim.observed = limit
                limits_changed = True
        if limits_changed:
            self._apply_limits(now)
        gains: list[tuple[_Dimension, float]] = []
        for i, dim, remaining, own in (
            (0, self._tokens, _header_value(snapshot.remaining_tokens), reservation.charged_tokens),
            (1, self._requests, _header_value(snapshot.remaining_requests), reservation.cost.requests),
        ):
            if remaining is None:
                continue
            # Compare like with like: the upstream's remaining just after it admitted this request against
            # ours just after we charged it. Everything charged since (in flight or done) and the refill
            # since apply to both sides alike, so the difference is how much we overestimate now, less
            # what later corrections and resets already took away. Only ever lower our view.
            excess = (
                (book.available[i] - remaining)
                - (dim.adjusted - book.adjusted[i])
                - dim.meter.expired_since(book.marks[i], now)
            )
            if excess > 0:
                dim.meter.charge(excess, now)
                dim.adjusted += excess
            elif excess < 0 and self._mode == "bucket":
                # From a rested bucket, trust the upstream fully (below). Otherwise undo at most the
                # corrections made since this request was admitted: a request that overtook an earlier one
                # on another connection made that earlier reply's shortfall look bigger than it was, and
                # without the undo that double count stalls the lane (bench/ratelimit.py, minute bucket).
                since = dim.adjusted - book.adjusted[i]
                undo = min(-excess, dim.held_back if book.rested[i] and dim.cold else max(0.0, since))
                if undo > 0:
                    gains.append((dim, undo))
            if book.rested[i]:
                # Once only: after the cold start our own refill, at the configured rate, fills the bucket;
                # trusting every rested reply would let an upstream with more budget than configured pull
                # the engine above the limits it was given.
                dim.cold = False
            if book.rested[i] and self._mode == "bucket" and remaining + own > dim.learned:
                dim.learned = float(remaining + own)
                limits_changed = True
        if limits_changed:
            self._apply_limits(now)
        for dim, gain in gains:
            # The upstream had more than we believed. At a cold start (a fresh lane allows itself one second
            # of burst), without this it would spend its first minute refilling towards a burst the upstream
            # had all along (measured: 2.6x the minimum wall time on a minute bucket).
            dim.meter.credit(gain, dim.meter.expired_since(0.0, now), now)
            dim.adjusted -= gain

    def pause(self, wait: float | None, scope: str | None) -> None:
        now = trio.current_time()
        if wait is None or not math.isfinite(wait) or wait < 0:
            wait = DEFAULT_PAUSE
        self._paused_until = max(self._paused_until, now + wait)
        self._pauses += 1
        scope = (scope or "").lower()
        named = [dim for dim in (self._tokens, self._requests) if dim.name.rstrip("s") in scope]
        self._learn_from_429(named, now)
        for dim in named or (self._tokens, self._requests):
            dim.meter.drain_until(self._paused_until, now)

    def _learn_from_429(self, named: list[_Dimension], now: float) -> None:
        # The 429 answered the request settled just before; called on its own, take the latest admission.
        seq = self._last_reply if self._last_reply is not None else self._reservations
        if self._last_paces is not None:
            for dim, paced in zip((self._tokens, self._requests), self._last_paces, strict=True):
                if dim.paced != paced:
                    dim.paced = paced
                    self._configure(dim, self._limit_of(dim), now)
        self._last_reply = self._last_paces = None
        for dim in named or self._unnamed_culprits(now):
            self._decrease(dim, seq, now)

    def _unnamed_culprits(self, now: float) -> list[_Dimension]:
        """The dimensions a 429 that names none is taken to be about: those whose meter was not nearly full
        (a dimension with room to spare did not run out), or both when each had room (someone else spent)."""
        dims = (self._tokens, self._requests)
        busy = [dim for dim in dims if dim.meter.available(now) < RESTED_FRACTION * dim.meter.capacity]
        return busy or list(dims)

    def _decrease(self, dim: _Dimension, seq: int, now: float) -> None:
        """Multiplicative decrease of the pace, unless limit headers tell the real limit or the 429 answers
        a request admitted before the previous decrease (the same overshoot, already acted on)."""
        if dim.observed is not None or seq <= dim.decreased_at:
            return
        limit = self._limit_of(dim)
        pace = self._pace(dim, limit)
        repeated = pace < dim.lowered_to * (1.0 + REPEAT_GROWTH)
        factor = AIMD_DECREASE if repeated else AIMD_DECREASE_ISOLATED
        dim.peak = pace
        dim.paced = max(AIMD_FLOOR * self._configured_of(dim), pace * factor)
        dim.decreased_at = self._reservations
        dim.lowered_to = dim.paced
        self._decreases += 1
        logger.info(
            "lane %s: 429 on %s with no limit header; pace lowered from %.0f to %.0f per minute",
            self.name,
            dim.name,
            pace,
            dim.paced,
        )
        self._configure(dim, limit, now)

    def at_rest(self) -> bool:
        now = trio.current_time()
        if self._in_flight or self._paused_until > now:
            return False
        for meter in (self._tokens.meter, self._requests.meter):
            if meter.available(now) < meter.capacity * (1.0 - 1e-9) - _EPS:
                return False
        return True

    # -- introspection -----------------------------------------------------------------------------------

    def statistics(self) -> LaneStatistics:
        now = trio.current_time()
        t, r = self._tokens.meter, self._requests.meter
        return LaneStatistics(
            name=self.name,
            mode=self._mode,
            period=self._period,
            configured=self._configured,
            effective=self._effective,
            token_capacity=t.capacity,
            request_capacity=r.capacity,
            tokens_used=t.used(now),
            requests_used=r.used(now),
            tokens_available=t.available(now),
            requests_available=r.available(now),
            waiters=0,
            in_flight=self._in_flight,
            paused_until=self._paused_until if self._paused_until > now else None,
            pause_remaining=max(0.0, self._paused_until - now),
            pauses=self._pauses,
            estimated_prompt_tokens=self._estimated_total,
            actual_prompt_tokens=self._actual_total,
            correction=self._correction,
            reservations=self._reservations,
            refunds=self._refunds,
            reconciles=self._reconciles,
            learned_rpm=self._learned(self._requests),
            learned_tpm=self._learned(self._tokens),
            rate_decreases=self._decreases,
            at_rest=self.at_rest(),
        )

    def _learned(self, dim: _Dimension) -> float | None:
        if dim.paced is None or dim.observed is not None:
            return None
        return self._pace(dim, self._limit_of(dim))
