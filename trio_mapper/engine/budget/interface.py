"""The budget's vocabulary and its two seams: `LaneBudget`, what the scheduler sees, and `Meter`, what counts.

The ledger builds each lane (one per model family) as this process's waiting queue (`budget/queue.py`) in
front of a `Meter`. The queue decides who is next and sleeps until the meter's "ready at"; the meter decides
whether a cost fits now and keeps the counts. The local meter (`budget/local.py`) keeps them in memory; a
meter over a shared store (Redis) keeps them there, so that engines sharing a key share one budget, and
neither the queue nor the scheduler changes. docs/ledger.md ("Queue, meter, factory") has the overview.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Literal, Protocol, final

import attrs

if TYPE_CHECKING:
    from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot

Mode = Literal["period", "bucket"]
MODES: Final[tuple[Mode, ...]] = ("period", "bucket")


@attrs.frozen
class Limits:
    """Per-minute limits of one model, as the upstream states them."""

    rpm: int = attrs.field(validator=attrs.validators.gt(0))
    tpm: int = attrs.field(validator=attrs.validators.gt(0))


@attrs.frozen
class Cost:
    """What one upstream request costs at admission.

    Attributes:
        tokens: the estimated prompt tokens plus max_tokens x n (embeddings: input tokens only).
        requests: requests counted against RPM.
        prompt_tokens: the estimated prompt part of ``tokens``. It is what ``usage.prompt_tokens`` is
            compared with at reconciliation and what the lane's correction factor scales; None when unknown,
            which disables correction by usage for this request (never guess: charging max_tokens as if it
            were prompt would teach the lane a huge bogus correction).
    """

    tokens: int = attrs.field(validator=attrs.validators.ge(0))
    requests: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    prompt_tokens: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))

    def __attrs_post_init__(self) -> None:
        if self.prompt_tokens is not None and self.prompt_tokens > self.tokens:
            raise ValueError(f"prompt_tokens {self.prompt_tokens} exceeds tokens {self.tokens}")


class RequestTooLarge(Exception):
    """The request alone costs more than the whole per-minute budget: it can never be admitted."""

    def __init__(self, lane: str, requested: int, budget: int, unit: str = "tokens") -> None:
        self.lane = lane
        self.requested = requested
        self.budget = budget
        self.unit = unit
        hint = "reduce input or max_tokens" if unit == "tokens" else "split the request"
        super().__init__(f"{lane}: requested {requested} {unit}, the whole per-minute budget is {budget}; {hint}")


def check_cost(lane: str, limits: Limits, cost: Cost) -> None:
    """Raise `RequestTooLarge` if ``cost`` exceeds ``limits`` in either dimension."""
    if cost.tokens > limits.tpm:
        raise RequestTooLarge(lane, cost.tokens, limits.tpm)
    if cost.requests > limits.rpm:
        raise RequestTooLarge(lane, cost.requests, limits.rpm, "requests")


@final
class Reservation:
    """Handle for budget a `Meter` charged; give it back to `refund` or `reconcile`. Settling twice is ignored."""

    __slots__ = ("charged_tokens", "cost", "lane", "mark", "reserved_at", "settled")

    def __init__(self, lane: str, cost: Cost, reserved_at: float, charged_tokens: int, mark: object = None) -> None:
        #: The lane (model) that charged it.
        self.lane = lane
        #: What the caller asked for.
        self.cost = cost
        #: `trio.current_time()` at admission.
        self.reserved_at = reserved_at
        #: Tokens charged: ``cost.tokens`` with the lane's estimate correction applied to the prompt part.
        self.charged_tokens = charged_tokens
        #: What the meter that issued it needs to settle it later, read by that meter only: the local meter's
        #: record of the moment of admission; a shared meter's reservation id in its store.
        self.mark = mark
        #: Set by the issuing meter when the reservation is refunded or reconciled.
        self.settled = False

    def __repr__(self) -> str:
        state = "settled" if self.settled else "in flight"
        return (
            f"<Reservation lane={self.lane!r} tokens={self.charged_tokens} requests={self.cost.requests} "
            f"at={self.reserved_at:.3f} {state}>"
        )


@attrs.frozen
class LaneStatistics:
    """A snapshot of one lane, for `status` and for tests."""

    name: str
    mode: str
    period: float
    configured: Limits
    #: The limits in force: configured, lowered by what the upstream's headers report.
    effective: Limits
    #: Burst the ledger allows itself (bucket capacity, or the window budget), possibly shrunk to the
    #: upstream's observed burst in bucket mode.
    token_capacity: float
    request_capacity: float
    #: Period mode: charged in the current window. Bucket mode: capacity minus what is available.
    tokens_used: float
    requests_used: float
    #: Budget available now; negative is debt (a request bigger than the burst, or a correction).
    tokens_available: float
    requests_available: float
    #: Tasks of this process waiting in the lane's queue (a `Meter` reports 0; the lane adds its queue).
    waiters: int
    in_flight: int
    paused_until: float | None
    pause_remaining: float
    #: Retryable 429s reported through `pause`.
    pauses: int
    #: Totals over replies that reported usage for a request with a known prompt estimate.
    estimated_prompt_tokens: int
    actual_prompt_tokens: int
    #: Factor applied to prompt estimates at admission (actual / estimated, decayed average).
    correction: float
    reservations: int
    refunds: int
    reconciles: int
    #: Pace learned from 429s (per minute), when the upstream sends no limit header for that dimension and
    #: has refused at least once; None otherwise. The lane admits at min(effective, learned).
    learned_rpm: float | None = None
    learned_tpm: float | None = None
    #: Multiplicative decreases of the learned pace (both dimensions): at most one per overshoot.
    rate_decreases: int = 0
    #: Every meter full, no debt, no pause, nothing in flight, no waiters: see `LaneBudget.at_rest`.
    at_rest: bool = False


class LaneBudget(Protocol):
    """The rate budget of one model, as the scheduler uses it.

    The ledger builds every lane as a `queue.QueuedLaneBudget`: the in-process waiting queue in front of a
    `Meter`. A shared budget is another `Meter`, not another `LaneBudget`.
    """

    name: str

    def check_admissible(self, cost: Cost) -> None:
        """Raise `RequestTooLarge` at once if ``cost`` exceeds the whole per-minute limit; never waits."""
        ...

    async def reserve(self, cost: Cost) -> Reservation:
        """Wait (FIFO) until the lane is not paused and the budget allows, then charge ``cost``.

        Cancel-safe: cancelled while waiting, nothing stays reserved and the next waiter proceeds.

        Raises:
            RequestTooLarge: at once, or while waiting if the effective limit drops below the cost.
        """
        ...

    def refund(self, reservation: Reservation) -> None:
        """The request never reached the upstream: give its budget back."""
        ...

    def reconcile(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int | None,
        snapshot: RateLimitSnapshot | None,
    ) -> None:
        """Correct the ledger from an upstream reply (any status): usage and x-ratelimit-* headers."""
        ...

    def pause(self, wait: float | None, scope: str | None) -> None:
        """A retryable 429: admit nothing for ``wait`` seconds, then resume at the refill pace.

        Call it right after `reconcile` with the reply that was the 429: that tells the lane which request
        overshot, so that the replies to one overshoot lower a pace learned from 429s only once.
        """
        ...

    def at_rest(self) -> bool:
        """True when forgetting the lane loses nothing the upstream still counts: every meter is full, no
        debt, no pause in force, nothing in flight and no waiters."""
        ...

    def update_limits(self, limits: Limits) -> None:
        """New configured limits (config reload); reservations and waiters are kept."""
        ...

    def statistics(self) -> LaneStatistics: ...


class Meter(Protocol):
    """Counts one lane's budget: whether a cost fits now, and what the upstream's replies and 429s teach.

    The contract, for the local meter (`budget/local.py`) and for a meter over a shared store (Redis):

    - **Each method is one atomic step.** It neither awaits nor lets another task run, and it returns its
      answer: the queue acts on it (hands the reservation to a waiter, or sleeps) in the same step, and it
      asks from synchronous code (a refund that frees budget admits the next waiter there and then; the
      scheduler's refund, reconcile and pause are synchronous). A shared meter makes each method one script
      in the store that reads, decides and writes (a Redis Lua script): no lock, and never a read in one
      call and a write based on it in another, so that two engines cannot both spend the same budget.
    - **Time.** Values that name a moment (the ready-at `try_charge` returns, `Reservation.reserved_at`,
      `LaneStatistics.paused_until`) are on trio's clock, `trio.current_time()`, which the queue sleeps on;
      `pause` takes a duration. The local meter computes on trio's clock. A shared meter computes on the
      store's clock (Redis ``TIME`` read inside the script, since hosts' clocks disagree) and carries times
      across only as durations: its script returns ``ready_at - store_now`` and the meter answers
      ``trio.current_time() + that``. An absolute time of one clock is never compared with the other's.
    - **Ready at.** What `try_charge` answers when the cost does not fit: the earliest time it would, if
      nothing else changed. Paused (a 429), that is at least the end of the pause, so an expiring pause wakes
      the queue with no other event. It is a time to ask again, not a promise: other engines may spend first
      (the queue then asks again and sleeps again), and budget freed elsewhere is seen at the latest then.
      It is finite: a cost bigger than the burst is charged, into debt, once the meter is full.
    - **Reservations.** A granted cost is charged at once (as the upstream charges at admission) and is in
      flight until settled by `refund` or `settle`. Settling is idempotent: settling a reservation again
      changes nothing and returns False. A shared meter records settlement in the store under the
      reservation's id (`Reservation.mark`), so a script retried after a lost reply does not credit twice.
      A reservation never settled (the process died) counts as spent and is healed by the refill.
    """

    name: str

    def check_admissible(self, cost: Cost) -> None:
        """Raise `RequestTooLarge` if ``cost`` exceeds the whole per-minute limit in force; never waits.

        It may read the limits as this meter last saw them (no round trip): `try_charge` checks again.
        """
        ...

    def try_charge(self, cost: Cost) -> Reservation | float:
        """Charge ``cost`` now if the budget and any pause allow, in one atomic step.

        Returns:
            The `Reservation` when the cost was charged; otherwise the ready-at time (class docstring),
            later than now.

        Raises:
            RequestTooLarge: ``cost`` exceeds the limits in force (they may have dropped since it queued).
        """
        ...

    def refund(self, reservation: Reservation) -> bool:
        """The request never reached the upstream: credit back what it was charged, but not what has expired
        since (refill lost at a full bucket, a window reset), so a refund never mints budget.

        Returns:
            False when the reservation was settled already: nothing changed.

        Raises:
            ValueError: the reservation was issued by another meter.
        """
        ...

    def settle(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int | None,
        snapshot: RateLimitSnapshot | None,
    ) -> bool:
        """True up a reservation from the upstream's reply (any status), in one atomic step.

        Charges or credits the error of the prompt estimate (``prompt_tokens``: the reply's usage, None when
        unknown), observes the upstream's ``x-ratelimit-*`` snapshot (lower limits, what remains; compared
        with the meter's view at the reservation's admission, hence one step with the settlement), and lets
        a reply grow a pace learned from 429s. docs/ledger.md ("Reconciliation").

        Returns:
            False when the reservation was settled already: nothing changed.

        Raises:
            ValueError: the reservation was issued by another meter.
        """
        ...

    def pause(self, wait: float | None, scope: str | None) -> None:
        """A retryable 429: charge nothing for ``wait`` seconds (None: a default), then at the refill pace.

        A longer pause in force wins. The dimension ``scope`` names ("tokens", "requests", else both) is
        drained to be empty when the pause ends. Without limit headers for a dimension, the 429 also lowers
        its learned pace, once per overshoot: it answers the reservation `settle`d just before. A shared
        meter's pause is shared: a 429 seen by one engine pauses every engine on the key.
        """
        ...

    def update_limits(self, limits: Limits) -> None:
        """New configured limits (config reload); charges, debt and reservations in flight are kept."""
        ...

    def at_rest(self) -> bool:
        """True when a meter made afresh would hand out nothing the upstream still counts as spent: every
        dimension full, no debt, no pause in force, nothing in flight. (The lane adds: no waiters.) A shared
        meter whose state outlives the lane in the store may say True whenever nothing of this process is
        in flight: a lane made again reads the same state."""
        ...

    def statistics(self) -> LaneStatistics:
        """The lane's statistics as this meter sees them, with ``waiters`` 0: the lane adds its queue."""
        ...


class RemoteMeter(Protocol):
    """A `Meter` whose charge is a round trip to a shared store (`budget/shared.py`): `charge` is awaited.

    Everything else keeps `Meter`'s contract, synchronous for the scheduler: `refund`, `settle` and `pause`
    take effect in this process at once (a reservation settles once) and reach the store in the
    background, idempotently; `on_change` tells the queue when that may have freed budget.
    """

    name: str

    @property
    def remote(self) -> Literal[True]:
        """Tells the ledger's queue to await `charge` instead of calling `try_charge`."""
        ...

    def check_admissible(self, cost: Cost) -> None: ...

    async def charge(self, costs: Sequence[Cost]) -> tuple[list[Reservation], float]:
        """`Meter.try_charge` as a round trip, for the costs of the first waiters in queue order: the
        reservations of those that fit (a prefix, possibly empty), and when to ask again for the next one
        (trio's clock). Raises `RequestTooLarge` when the first cost can never fit."""
        ...

    def on_change(self, listener: Callable[[], None]) -> None: ...

    def refund(self, reservation: Reservation) -> bool: ...

    def settle(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int | None,
        snapshot: RateLimitSnapshot | None,
    ) -> bool: ...

    def pause(self, wait: float | None, scope: str | None) -> None: ...

    def update_limits(self, limits: Limits) -> None: ...

    def at_rest(self) -> bool: ...

    def statistics(self) -> LaneStatistics: ...


class MeterFactory(Protocol):
    """Makes the meter of a lane when the ledger first needs it: `Ledger(..., meter_factory=...)`.

    Args:
        lane: the lane's name (`Ledger.lane_name`); a shared meter keys its state by it.
        limits: the configured limits.
        period: the ledger's ``period`` (window length, or the largest burst in seconds of refill).
        mode: "bucket" or "period"; a meter may refuse a mode it does not offer (ValueError).
        origin: the ledger's start on trio's clock, where fixed windows align (a shared meter has its own).
    """

    def __call__(
        self, lane: str, limits: Limits, *, period: float, mode: Mode, origin: float
    ) -> Meter | RemoteMeter: ...
