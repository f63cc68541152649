"""This process's waiting line for a lane's budget, and the `LaneBudget` it makes with a `Meter`.

The queue does not know how budget is counted. It asks its meter to `try_charge` the cost of the waiter at
its head and gets a reservation, or a time to ask again. Nothing here starts a task: the head sleeps until
its own ready-at, and every change that may free budget wakes only that head. docs/ledger.md ("Waiting,
fairness, cancellation").
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import TYPE_CHECKING, final

import attrs
import trio

from trio_mapper.engine.budget.interface import (
    Cost,
    LaneStatistics,
    Limits,
    Meter,
    RemoteMeter,
    RequestTooLarge,
    Reservation,
)

if TYPE_CHECKING:
    from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot


@final
class _Waiter:
    __slots__ = ("cost", "error", "event", "ready_at", "reservation")

    def __init__(self, cost: Cost) -> None:
        self.cost = cost
        self.event = trio.Event()
        self.reservation: Reservation | None = None
        self.error: RequestTooLarge | None = None
        # The meter's answer the last time this waiter was at the head and did not fit.
        self.ready_at = math.inf


@final
class WaitQueue:
    """A strict FIFO of tasks waiting for a `Meter` to charge their cost; the meter is asked for the head only.

    So a big request is never overtaken by small ones. Cost is O(1) per change plus O(1) per admission.
    """

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self._waiters: collections.OrderedDict[_Waiter, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._waiters)

    def __repr__(self) -> str:
        return f"<WaitQueue waiters={len(self._waiters)} meter={self._meter!r}>"

    def _pump(self) -> None:
        """Admit waiters from the head of the FIFO while the meter grants them; wake the next head."""
        if not self._waiters:
            return
        head = next(iter(self._waiters))
        first = head
        while True:
            try:
                answer = self._meter.try_charge(head.cost)
            except RequestTooLarge as exc:
                head.error = exc
            else:
                if not isinstance(answer, Reservation):
                    head.ready_at = answer
                    break
                head.reservation = answer
            del self._waiters[head]
            head.event.set()
            if not self._waiters:
                return
            head = next(iter(self._waiters))
        if head is not first:
            # A new head must learn its own admission time and sleep until then.
            head.event.set()

    def changed(self) -> None:
        """Budget, limits or the pause changed: admit what now fits and let the head ask for its time again."""
        self._pump()
        if self._waiters:
            next(iter(self._waiters)).event.set()

    async def reserve(self, cost: Cost) -> Reservation:
        """`LaneBudget.reserve`: always a checkpoint, FIFO, cancel-safe."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._meter.check_admissible(cost)
        if not self._waiters:
            answer = self._meter.try_charge(cost)
            if isinstance(answer, Reservation):
                # Still a scheduling point, but one that cannot raise Cancelled after we charged.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return answer
        waiter = _Waiter(cost)
        self._waiters[waiter] = None
        try:
            while True:
                # Grants happen synchronously (in `_pump`) and set the event; anything that changes after
                # this line sets the fresh event, so no wake-up is lost between the check and the wait.
                waiter.event = trio.Event()
                deadline = math.inf
                if next(iter(self._waiters)) is waiter:
                    self._pump()
                    if waiter in self._waiters:
                        deadline = waiter.ready_at  # the pump just asked the meter for this head
                if waiter.reservation is not None:
                    return waiter.reservation
                if waiter.error is not None:
                    raise waiter.error
                with trio.move_on_at(deadline):
                    await waiter.event.wait()
                if waiter.reservation is not None:
                    return waiter.reservation
                if waiter.error is not None:
                    raise waiter.error
        except BaseException:
            if waiter in self._waiters:
                was_head = next(iter(self._waiters)) is waiter
                del self._waiters[waiter]
                if was_head:
                    self.changed()
            elif waiter.reservation is not None and self._meter.refund(waiter.reservation):
                # Granted while the cancellation was already on its way: given straight back.
                self.changed()
            raise


@final
class RemoteWaitQueue:
    """`WaitQueue`'s FIFO for a meter whose charge is a round trip (the shared budget).

    Only the head asks, for itself and the waiters right behind it (up to `max_batch`), so an engine has one
    admission call in flight per lane however many wait, and under load one round trip admits several.
    Refused, the head sleeps until the ready-at the store answered (jitter included) or until something
    here may have freed budget, then asks again. No polling beyond that.
    """

    def __init__(self, meter: RemoteMeter, max_batch: int = 16) -> None:
        self._meter = meter
        self._max_batch = max_batch
        self._waiters: collections.OrderedDict[_Waiter, None] = collections.OrderedDict()
        meter.on_change(self.changed)

    def __len__(self) -> int:
        return len(self._waiters)

    def __repr__(self) -> str:
        return f"<RemoteWaitQueue waiters={len(self._waiters)} meter={self._meter!r}>"

    def changed(self) -> None:
        if self._waiters:
            next(iter(self._waiters)).event.set()

    async def _ask(self, head: _Waiter) -> float:
        """Charge the head and those behind it; hand out the grants; when to ask again (inf: not the head)."""
        batch = list(itertools.islice(self._waiters, self._max_batch))
        # Shielded: cancelled mid-call, granted reservations would be lost (never settled); the meter's own
        # timeout bounds the wait. A cancel is acted on right after, and a granted waiter that was cancelled
        # meanwhile gives its reservation straight back (`reserve`'s cleanup).
        with trio.CancelScope(shield=True):
            reservations, ready_at = await self._meter.charge([waiter.cost for waiter in batch])
        for waiter, reservation in zip(batch, reservations, strict=False):
            if waiter is not head and waiter not in self._waiters:
                # It left (cancelled, its deadline) while the call was out: its grant goes straight back.
                self._meter.refund(reservation)
                continue
            waiter.reservation = reservation
            self._waiters.pop(waiter, None)
            if waiter is not head:
                waiter.event.set()
        if head.reservation is None:
            # Refused: the head sleeps until ``ready_at`` or until something frees budget (`changed`). Woken
            # here, it asked again at once, without end: a thousand scripts a second per waiting lane.
            return ready_at
        self.changed()  # the next waiter is the head now, and asks
        return math.inf

    async def reserve(self, cost: Cost) -> Reservation:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._meter.check_admissible(cost)
        waiter = _Waiter(cost)
        self._waiters[waiter] = None
        try:
            while True:
                waiter.event = trio.Event()
                ready_at = math.inf
                if waiter.reservation is None and next(iter(self._waiters)) is waiter:
                    ready_at = await self._ask(waiter)
                if waiter.reservation is not None:
                    return waiter.reservation  # the caller refunds it if it was cancelled meanwhile
                with trio.move_on_at(ready_at):
                    await waiter.event.wait()
        except BaseException:
            if waiter in self._waiters:
                was_head = next(iter(self._waiters)) is waiter
                del self._waiters[waiter]
                if was_head:
                    self.changed()
            elif waiter.reservation is not None and self._meter.refund(waiter.reservation):
                # Granted by the head's call while this one was being cancelled: given straight back.
                self.changed()
            raise


@final
class QueuedLaneBudget:
    """A `LaneBudget`: this process's waiting queue in front of a `Meter` (the local one) or a `RemoteMeter`
    (the shared one).

    Each call that may free budget or change the limits goes to the meter first, then wakes the queue's
    head; a settlement the meter ignores (settled already) wakes nobody.
    """

    def __init__(self, meter: Meter | RemoteMeter) -> None:
        self.name = meter.name
        self.meter = meter
        self._queue: WaitQueue | RemoteWaitQueue = (
            RemoteWaitQueue(meter) if getattr(meter, "remote", False) else WaitQueue(meter)  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:
        return f"<QueuedLaneBudget {self.name!r} waiters={len(self._queue)} meter={self.meter!r}>"

    def check_admissible(self, cost: Cost) -> None:
        self.meter.check_admissible(cost)

    async def reserve(self, cost: Cost) -> Reservation:
        return await self._queue.reserve(cost)

    def refund(self, reservation: Reservation) -> None:
        if self.meter.refund(reservation):
            self._queue.changed()

    def reconcile(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int | None,
        snapshot: RateLimitSnapshot | None,
    ) -> None:
        if self.meter.settle(reservation, prompt_tokens=prompt_tokens, snapshot=snapshot):
            self._queue.changed()

    def pause(self, wait: float | None, scope: str | None) -> None:
        self.meter.pause(wait, scope)
        self._queue.changed()

    def update_limits(self, limits: Limits) -> None:
        self.meter.update_limits(limits)
        self._queue.changed()

    def at_rest(self) -> bool:
        return not self._queue and self.meter.at_rest()

    def statistics(self) -> LaneStatistics:
        stats = self.meter.statistics()
        waiters = len(self._queue)
        return attrs.evolve(stats, waiters=waiters, at_rest=stats.at_rest and not waiters)
