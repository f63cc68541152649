"""One lane's waiting line: by priority class, then by each tenant's weighted share of tokens, then by client.

`FairQueue.pop` picks the next request to dispatch:

1. **Class.** The highest class with a request that may go now. A lower class is never starved: while it
   has requests waiting, it is served at least once every `GUARD_EVERY` + 1 dispatches, whatever waits above.
2. **Tenant.** Within a class, weighted fair queueing in tokens (start-time fair queueing): each tenant's
   virtual finish advances by a request's tokens divided by its weight, and the tenant with the smallest
   start goes next. A tenant sending few huge prompts gets its share in tokens, not in requests, and a
   tenant coming back from idle starts at the class's clock, with no credit saved up.
3. **Cap.** A tenant over its per-minute caps (`TenantLimits`) is skipped until its caps allow; its
   requests wait (within their deadlines), they do not fail.
4. **Client.** Within a tenant, its clients take turns, one request each; a client's requests go in order.

No I/O and no waiting: `pop` answers a request, or the time something capped may go (the lane's dispatcher
sleeps until then, or until a push wakes it). Costs are O(classes + tenants) per pop.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable
from typing import Final, Generic, Protocol, TypeVar

from trio_mapper.engine.core.tenants import CLASSES, Tenant, TenantLimits, Tenants

__all__ = ["GUARD_EVERY", "FairQueue", "Queued"]

#: A lower class waits behind higher ones for at most this many dispatches in a row while it has requests:
#: 20 keeps an interactive tenant's wait short behind a saturating batch (one request in 21 goes to the
#: batch), and guarantees the batch about 5 % of the lane when interactive work saturates it.
GUARD_EVERY: Final = 20


class Queued(Protocol):
    """What the queue reads of a request."""

    @property
    def client_key(self) -> Hashable: ...

    @property
    def tenant_name(self) -> str: ...

    @property
    def rank(self) -> int:
        """Its class: 0 is the highest."""

    @property
    def tokens(self) -> int:
        """What it costs at admission: the unit of fair shares and of token caps."""


J = TypeVar("J", bound=Queued)


class _TenantQueue(Generic[J]):
    __slots__ = ("finish", "limits", "per_client", "rotation", "size", "tenant")

    def __init__(self, tenant: Tenant, limits: TenantLimits) -> None:
        self.tenant = tenant
        #: Shared by the tenant's queues in every class: a cap is the tenant's, whichever class it asks in.
        self.limits = limits
        self.per_client: dict[Hashable, collections.OrderedDict[J, None]] = {}
        self.rotation: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        #: Virtual finish of its last dispatched request, in tokens / weight.
        self.finish = 0.0
        self.size = 0

    def push(self, job: J) -> None:
        queue = self.per_client.get(job.client_key)
        if queue is None:
            self.per_client[job.client_key] = queue = collections.OrderedDict()
            self.rotation[job.client_key] = None
        queue[job] = None
        self.size += 1

    def remove(self, job: J) -> bool:
        queue = self.per_client.get(job.client_key)
        if queue is None or job not in queue:
            return False
        del queue[job]
        self.size -= 1
        if not queue:
            del self.per_client[job.client_key]
            del self.rotation[job.client_key]
        return True

    def peek(self) -> J:
        return next(iter(self.per_client[next(iter(self.rotation))]))

    def pop(self) -> J:
        key = next(iter(self.rotation))
        queue = self.per_client[key]
        job = queue.popitem(last=False)[0]
        self.size -= 1
        if queue:
            self.rotation.move_to_end(key)
        else:
            del self.per_client[key]
            del self.rotation[key]
        return job


class _ClassQueue(Generic[J]):
    __slots__ = ("clock", "passed_over", "size", "tenants")

    def __init__(self) -> None:
        #: Tenant queues by name, kept while the tenant's caps or share matter (they outlive empty spells).
        self.tenants: dict[str, _TenantQueue[J]] = {}
        #: The virtual start of the last request dispatched from this class.
        self.clock = 0.0
        #: Dispatches of higher classes in a row while this one had requests.
        self.passed_over = 0
        self.size = 0


class FairQueue(Generic[J]):
    """The waiting requests of one lane, ordered by class, tenant share, caps and client turns."""

    def __init__(self, tenants: Tenants, lane_limits: tuple[int, int]) -> None:
        self._tenants = tenants
        self._lane_limits = lane_limits
        self._classes: list[_ClassQueue[J]] = [_ClassQueue() for _ in CLASSES]
        self._where: dict[J, _TenantQueue[J]] = {}
        self._limits: dict[str, TenantLimits] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, job: J) -> bool:
        return job in self._where

    def push(self, job: J) -> None:
        klass = self._classes[job.rank]
        queue = klass.tenants.get(job.tenant_name)
        if queue is None:
            tenant = self._tenants.by_name(job.tenant_name) or self._tenants.default
            limits = self._limits.get(job.tenant_name)
            if limits is None:
                limits = self._limits[job.tenant_name] = TenantLimits(tenant, self._lane_limits)
            queue = klass.tenants[job.tenant_name] = _TenantQueue(tenant, limits)
        if not queue.size:
            # Back from idle: no credit saved up while away.
            queue.finish = max(queue.finish, klass.clock)
        queue.push(job)
        klass.size += 1
        self._where[job] = queue

    def remove(self, job: J) -> None:
        """Forget a request that left early (cancel, deadline, disconnect); a no-op if it is not queued."""
        queue = self._where.pop(job, None)
        if queue is not None and queue.remove(job):
            self._classes[job.rank].size -= 1

    def pop(self, now: float, *, above: int | None = None) -> J | float:
        """The next request to dispatch, or when a capped tenant may go next (inf: nothing waits).

        Args:
            above: only a request of a class higher than this rank (one that overtakes a request of that
                class, see `Lane.hold`).
        """
        ready_at = math.inf
        waiting = [
            index for index, klass in enumerate(self._classes) if klass.size and (above is None or index < above)
        ]
        # The guard first: a class passed over too often goes now, if any of its tenants may.
        order = sorted(waiting, key=lambda index: (self._classes[index].passed_over < GUARD_EVERY, index))
        for index in order:
            klass = self._classes[index]
            best: _TenantQueue[J] | None = None
            best_start = math.inf
            for queue in klass.tenants.values():
                if not queue.size:
                    continue
                job = queue.peek()
                may_go = queue.limits.ready_at(job.tokens, now)
                if may_go > now:
                    ready_at = min(ready_at, may_go)
                    continue
                start = max(queue.finish, klass.clock)
                if start < best_start:
                    best, best_start = queue, start
            if best is None:
                continue
            job = best.pop()
            best.limits.take(job.tokens, now)
            klass.clock = best_start
            best.finish = best_start + job.tokens / best.tenant.weight
            klass.size -= 1
            klass.passed_over = 0
            # Every lower class with requests was passed over, those below ``above`` included: a dispatch
            # that overtakes a held request is one more their guard must count.
            for lower in self._classes[index + 1 :]:
                if lower.size:
                    lower.passed_over += 1
            del self._where[job]
            return job
        return ready_at

    def reconfigure(self, tenants: Tenants, lane_limits: tuple[int, int]) -> None:
        """New tenants (a reload) or lane limits: queued requests keep their place; caps follow the new values.
        A tenant no longer configured keeps serving what it has queued with its old settings."""
        self._tenants = tenants
        self._lane_limits = lane_limits
        for klass in self._classes:
            for name, queue in klass.tenants.items():
                tenant = tenants.by_name(name)
                if tenant is not None:
                    queue.tenant = tenant
        for name, limits in self._limits.items():
            tenant = tenants.by_name(name)
            if tenant is not None:
                limits.configure(tenant, lane_limits)

    def statistics(self) -> dict[str, int]:
        """Requests waiting per tenant."""
        counts: dict[str, int] = {}
        for klass in self._classes:
            for name, queue in klass.tenants.items():
                if queue.size:
                    counts[name] = counts.get(name, 0) + queue.size
        return counts
