"""The request scheduler: admission by budget, bounded concurrency, retries, deadlines, fairness, shutdown.

A request's path through the engine, in order:

1. `Scheduler.submit` validates it, estimates its tokens and puts a `Job` in its model's `Lane` queue
   (or answers at once: ``invalid_request``, ``request_too_large``, ``overloaded``, ``shutting_down``).
2. The lane's dispatcher takes jobs round-robin across clients (one flooding client cannot starve
   another) and waits for the lane's budget to admit each (`LaneBudget.reserve`).
3. It then waits for one of the ``max_concurrent_reqs`` slots of a `trio.CapacityLimiter` — it bounds
   concurrency, the ledger bounds rate — and hands the job to an attempt task that calls the upstream.
4. The reply reconciles the ledger, then the retry policy decides: answer, or send the job down the retry
   channel, whose timer puts it back at the front of its lane when its wait is over.

Every accepted job is answered exactly once (`Job.finish`), whatever happens: success, final failure,
client cancel, deadline, disconnect or engine shutdown.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Hashable
from typing import Any, Final, Protocol

import attrs
import httpx
import msgspec
import trio

from .ledger import Cost, LaneBudget, Ledger, RequestTooLarge, Reservation
from .protocol import Error, ErrorKind, RequestId, Result, Submit, Timings
from .ratelimit_headers import RateLimitSnapshot
from .retry import (
    MAX_HONOURED_WAIT,
    BackoffRetry,
    FinalFailure,
    RateLimitRetry,
    Success,
    Verdict,
    backoff_delay,
    classify_exception,
    classify_response,
    exhausted,
)
from .tokens import InvalidBody, TokenEstimate, TokenEstimator
from .upstream import InvalidEndpoint, Upstream, UpstreamReply

log = logging.getLogger("trio_mapper.scheduler")

#: Distinct models (lanes) the engine tracks; beyond this a new model name is refused, so that a client
#: inventing model names cannot make the engine grow without bound.
MAX_LANES: Final = 256


class ReplySink(Protocol):
    """Where a job's final reply goes: the connection that submitted it."""

    @property
    def fairness_key(self) -> Hashable: ...

    @property
    def label(self) -> str: ...

    def deliver(self, message: Result | Error) -> None:
        """Queue the reply for sending; never blocks (replies are bounded by accepted jobs)."""


class JobState(enum.Enum):
    QUEUED = "queued"
    RESERVING = "reserving"
    IN_FLIGHT = "in_flight"
    RETRY_WAIT = "retry_wait"
    DONE = "done"


@attrs.define(eq=False)
class Job:
    request_id: RequestId
    owner: ReplySink
    lane: Lane
    method: str
    url: httpx.URL
    body: bytes | None
    estimate: TokenEstimate
    received_at: float
    deadline: float
    max_attempts: int
    state: JobState = JobState.QUEUED
    attempts: int = 0
    #: The cancel scope of whatever currently works on the job (reserving or in flight), so that a client
    #: cancel, a deadline or shutdown reaches it.
    scope: trio.CancelScope | None = None
    upstream_seconds: float = 0.0
    first_dispatched_at: float | None = None
    last_failure: str = ""

    @property
    def finished(self) -> bool:
        return self.state is JobState.DONE

    @property
    def cost(self) -> Cost:
        return Cost(tokens=self.estimate.total, prompt_tokens=self.estimate.prompt_tokens)

    @property
    def log_label(self) -> str:
        return f"{self.owner.label} id={self.request_id!r}"


@attrs.define(eq=False)
class Lane:
    """One model's queue and counters; its budget lives in the ledger."""

    name: str
    budget: LaneBudget
    retries: deque[Job] = attrs.field(factory=deque)
    per_owner: dict[Hashable, deque[Job]] = attrs.field(factory=dict)
    rotation: deque[Hashable] = attrs.field(factory=deque)
    wakeup: trio.Event = attrs.field(factory=trio.Event)
    #: The dispatcher task's scope, so an idle lane can be dropped.
    dispatcher: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    counts: dict[JobState, int] = attrs.field(factory=lambda: dict.fromkeys(JobState, 0))
    upstream_429s: int = 0
    retries_made: int = 0
    succeeded: int = 0
    failed: int = 0
    estimated_prompt_tokens: int = 0
    actual_prompt_tokens: int = 0

    def push(self, job: Job) -> None:
        key = job.owner.fairness_key
        queue = self.per_owner.get(key)
        if queue is None:
            self.per_owner[key] = queue = deque()
            self.rotation.append(key)
        queue.append(job)
        self.wakeup.set()

    def push_front(self, job: Job) -> None:
        self.retries.append(job)
        self.wakeup.set()

    def pop_next(self) -> Job | None:
        """The next live job: due retries first, then one job per client in turn."""
        while self.retries:
            job = self.retries.popleft()
            if not job.finished:
                return job
        while self.rotation:
            key = self.rotation.popleft()
            queue = self.per_owner[key]
            job = queue.popleft()
            if queue:
                self.rotation.append(key)
            else:
                del self.per_owner[key]
            if not job.finished:
                return job
        return None

    async def take(self) -> Job:
        while True:
            job = self.pop_next()
            if job is not None:
                return job
            self.wakeup = trio.Event()
            await self.wakeup.wait()


def _prompt_tokens_used(body: Any) -> int | None:
    if not isinstance(body, dict):
        return None
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    for key in ("prompt_tokens", "input_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class Scheduler:
    """Admits, runs and answers jobs. Run `run` in a nursery; call the sync methods from the event loop."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        upstream: Upstream,
        estimator: TokenEstimator,
        max_concurrent_reqs: int,
        max_queued: int,
        default_max_attempts: int,
        rng: random.Random | None = None,
    ) -> None:
        self._ledger = ledger
        self._upstream = upstream
        self._estimator = estimator
        self.limiter = trio.CapacityLimiter(max_concurrent_reqs)
        self._max_queued = max_queued
        self._default_max_attempts = default_max_attempts
        self._rng = rng or random.Random()
        self._lanes: dict[str, Lane] = {}
        self._jobs: dict[tuple[Hashable, RequestId], Job] = {}
        # Retry channel: every job in it is an accepted job, so max_queued bounds it.
        self._retry_send, self._retry_receive = trio.open_memory_channel[tuple[float, Job]](max_queued)
        self._deadlines: list[tuple[float, int, Job]] = []
        self._deadline_changed = trio.Event()
        self._sequence = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._all_done = trio.Event()
        self._all_done.set()
        self._grace = trio.CancelScope()
        self.accepted = 0
        self.rejected = 0

    # --- submission, from connection tasks -----------------------------------------------------------------

    def submit(self, owner: ReplySink, message: Submit) -> None:
        """Accept a request or answer it at once; never blocks."""
        key = (owner.fairness_key, message.id)

        def refuse(kind: ErrorKind, text: str) -> None:
            self.rejected += 1
            owner.deliver(Error(id=message.id, kind=kind, message=text))

        if self._closing:
            return refuse(ErrorKind.SHUTTING_DOWN, "the engine is shutting down; resubmit to the next engine")
        if key in self._jobs:
            # Answered with a null id: a reply carrying this id would read as the final answer to the
            # request that is still outstanding under it.
            self.rejected += 1
            owner.deliver(
                Error(
                    id=None,
                    kind=ErrorKind.INVALID_REQUEST,
                    message=f"a submit reused id {message.id!r}, which is still outstanding on this connection; "
                    "it was ignored. Use a unique id per outstanding request",
                )
            )
            return
        if len(self._jobs) >= self._max_queued:
            return refuse(
                ErrorKind.OVERLOADED,
                f"the engine already holds {len(self._jobs)} requests (max_queued); "
                "wait for replies before submitting more, or raise max_queued",
            )
        method = message.method.upper()
        if method not in {"POST", "GET"}:
            return refuse(ErrorKind.INVALID_REQUEST, f"method {message.method!r} is not supported; use POST")
        try:
            url = self._upstream.url_for(message.endpoint)
            estimate = self._estimator.estimate(message.endpoint, message.body)
        except (InvalidEndpoint, InvalidBody) as exc:
            return refuse(ErrorKind.INVALID_REQUEST, str(exc))
        if message.max_attempts is not None and message.max_attempts < 1:
            return refuse(ErrorKind.INVALID_REQUEST, "max_attempts must be at least 1")
        if message.deadline is not None and not (message.deadline > 0 and math.isfinite(message.deadline)):
            return refuse(ErrorKind.INVALID_REQUEST, "deadline must be a positive number of seconds")
        model = message.body.get("model")
        lane_name = model if isinstance(model, str) and model else "default"
        lane = self._lanes.get(lane_name)
        if lane is None:
            if len(self._lanes) >= MAX_LANES and not self._evict_idle_lane():
                return refuse(
                    ErrorKind.OVERLOADED,
                    f"the engine is busy with {MAX_LANES} distinct models; retry when some are idle",
                )
            lane = self._open_lane(lane_name)
        try:
            lane.budget.check_admissible(Cost(tokens=estimate.total, prompt_tokens=estimate.prompt_tokens))
        except RequestTooLarge as exc:
            return refuse(ErrorKind.REQUEST_TOO_LARGE, str(exc))

        now = trio.current_time()
        job = Job(
            request_id=message.id,
            owner=owner,
            lane=lane,
            method=method,
            url=url,
            body=msgspec.json.encode(message.body) if method == "POST" else None,
            estimate=estimate,
            received_at=now,
            deadline=now + message.deadline if message.deadline is not None else math.inf,
            max_attempts=message.max_attempts or self._default_max_attempts,
        )
        self._jobs[key] = job
        if self._all_done.is_set():
            self._all_done = trio.Event()
        self.accepted += 1
        lane.counts[JobState.QUEUED] += 1
        lane.push(job)
        if job.deadline < math.inf:
            heapq.heappush(self._deadlines, (job.deadline, next(self._sequence), job))
            if self._deadlines[0][2] is job:
                self._deadline_changed.set()

    def is_outstanding(self, owner: ReplySink, request_id: RequestId) -> bool:
        return (owner.fairness_key, request_id) in self._jobs

    def cancel(self, owner: ReplySink, request_id: RequestId) -> bool:
        """Withdraw a request at the client's wish; False when it is unknown or already answered."""
        job = self._jobs.get((owner.fairness_key, request_id))
        if job is None:
            return False
        self._finish_error(job, ErrorKind.CANCELLED, "cancelled by the client")
        return True

    def forget_owner(self, owner: ReplySink) -> int:
        """The client went away: cancel its requests (their replies have nowhere to go)."""
        jobs = [job for (key, _), job in self._jobs.items() if key == owner.fairness_key]
        for job in jobs:
            self._finish_error(job, ErrorKind.CANCELLED, "the client disconnected")
        if jobs:
            log.info("%s disconnected; cancelled %d outstanding requests", owner.label, len(jobs))
        return len(jobs)

    # --- finishing: exactly one reply per job ----------------------------------------------------------------

    def _set_state(self, job: Job, state: JobState) -> None:
        job.lane.counts[job.state] -= 1
        job.lane.counts[state] += 1
        job.state = state

    def _timings(self, job: Job) -> Timings:
        now = trio.current_time()
        dispatched = job.first_dispatched_at if job.first_dispatched_at is not None else now
        return Timings(queued=dispatched - job.received_at, upstream=job.upstream_seconds, total=now - job.received_at)

    def _close(self, job: Job) -> bool:
        if job.finished:
            return False
        self._set_state(job, JobState.DONE)
        del self._jobs[(job.owner.fairness_key, job.request_id)]
        # Finished jobs may linger in heaps and queues until popped: do not let them keep the body.
        job.body = None
        if len(self._deadlines) > 2 * len(self._jobs) + 1024:
            self._deadlines = [entry for entry in self._deadlines if not entry[2].finished]
            heapq.heapify(self._deadlines)
        if job.scope is not None:
            job.scope.cancel()
        if not self._jobs:
            self._all_done.set()
        return True

    def _finish_result(self, job: Job, reply: UpstreamReply) -> None:
        if self._close(job):
            job.lane.succeeded += 1
            job.owner.deliver(
                Result(
                    id=job.request_id,
                    status=reply.status,
                    body=reply.body,
                    headers=reply.headers,
                    attempts=job.attempts,
                    timings=self._timings(job),
                )
            )

    def _finish_error(self, job: Job, kind: ErrorKind, message: str, reply: UpstreamReply | None = None) -> None:
        if not self._close(job):
            return
        job.lane.failed += 1
        # Cancellations and shutdown are summarised elsewhere; per-request lines are for real failures.
        if kind not in {ErrorKind.CANCELLED, ErrorKind.SHUTTING_DOWN}:
            log.warning("request %s failed: %s: %s", job.log_label, kind.value, message)
        job.owner.deliver(
            Error(
                id=job.request_id,
                kind=kind,
                message=message,
                status=reply.status if reply else None,
                body=reply.body if reply else None,
                headers=reply.headers if reply else {},
                attempts=job.attempts,
            )
        )

    # --- the tasks ---------------------------------------------------------------------------------------

    def _open_lane(self, name: str) -> Lane:
        lane = Lane(name=name, budget=self._ledger.lane(name))
        self._lanes[name] = lane
        assert self._nursery is not None, "Scheduler.run must be started before submit"
        self._nursery.start_soon(self._dispatch, lane, name=f"dispatch {name}")
        return lane

    def _evict_idle_lane(self) -> bool:
        """Make room for a new model by dropping a lane with no work; False when every lane is busy.

        Lanes are per model name, which clients choose: without eviction, made-up names could fill the
        table for good and lock real models out.
        """
        for name, lane in self._lanes.items():
            busy = sum(count for state, count in lane.counts.items() if state is not JobState.DONE)
            if not busy and lane.budget.statistics().in_flight == 0:
                lane.dispatcher.cancel()
                del self._lanes[name]
                self._ledger.forget(name)
                return True
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._retry_timer)
            nursery.start_soon(self._deadline_keeper)
            task_status.started()

    async def _dispatch(self, lane: Lane) -> None:
        # The dispatcher waits for the budget and then for a concurrency slot before it takes the next job,
        # so jobs stay in their lane's fair queue (not in the limiter's FIFO) and a reservation is never
        # made long before its request is sent.
        with lane.dispatcher:
            while True:
                await self._dispatch_one(lane, await lane.take())

    async def _dispatch_one(self, lane: Lane, job: Job) -> None:
        self._set_state(job, JobState.RESERVING)
        reservation: Reservation | None = None
        slot_taken = False
        with trio.CancelScope(deadline=job.deadline) as scope:
            job.scope = scope
            try:
                reservation = await lane.budget.reserve(job.cost)
            except RequestTooLarge as exc:
                # The limits were lowered (reload, or the upstream's headers) after it was accepted.
                job.scope = None
                self._finish_error(job, ErrorKind.REQUEST_TOO_LARGE, str(exc))
                return
            await self.limiter.acquire_on_behalf_of(job)
            slot_taken = True
        job.scope = None
        if not slot_taken or job.finished:
            # Cancelled by the client, shutdown or the deadline before anything was sent.
            if slot_taken:
                self.limiter.release_on_behalf_of(job)
            if reservation is not None:
                lane.budget.refund(reservation)
            if scope.cancelled_caught:
                self._expire(job)
            return
        assert reservation is not None  # the slot is taken only after the reservation
        self._set_state(job, JobState.IN_FLIGHT)
        if job.first_dispatched_at is None:
            job.first_dispatched_at = trio.current_time()
        assert self._nursery is not None
        self._nursery.start_soon(self._attempt, job, reservation)

    async def _attempt(self, job: Job, reservation: Reservation) -> None:
        """One upstream call for a job that holds a reservation and a concurrency slot (released here)."""
        lane = job.lane
        reply: UpstreamReply | None = None
        verdict: Verdict | None = None
        if job.finished:  # answered (cancelled, shutdown) between dispatch and this task's start
            self.limiter.release_on_behalf_of(job)
            lane.budget.refund(reservation)
            return
        try:
            with trio.CancelScope(deadline=job.deadline) as scope:
                job.scope = scope
                job.attempts += 1
                started = trio.current_time()
                try:
                    reply = await self._upstream.send(job.method, job.url, job.body)
                except Exception as exc:  # classify_exception re-raises what is not an Exception
                    verdict = classify_exception(exc)
                else:
                    verdict = classify_response(reply.status, reply.headers, reply.body)
                finally:
                    job.upstream_seconds += trio.current_time() - started
            job.scope = None
        finally:
            self.limiter.release_on_behalf_of(job)

        if verdict is None:  # cancelled: by the client, shutdown (already answered) or the deadline
            lane.budget.reconcile(reservation, prompt_tokens=None, snapshot=None)
            if scope.cancelled_caught:
                self._expire(job)
            return

        prompt_tokens = _prompt_tokens_used(reply.body) if reply is not None else None
        lane.budget.reconcile(
            reservation,
            prompt_tokens=prompt_tokens,
            snapshot=RateLimitSnapshot.from_headers(reply.headers) if reply is not None else None,
        )
        if prompt_tokens is not None:
            lane.estimated_prompt_tokens += job.estimate.prompt_tokens
            lane.actual_prompt_tokens += prompt_tokens
        self._conclude(job, verdict, reply)

    def _conclude(self, job: Job, verdict: Verdict, reply: UpstreamReply | None) -> None:
        lane = job.lane
        if job.finished:
            return
        if isinstance(verdict, Success):
            assert reply is not None
            return self._finish_result(job, reply)
        if isinstance(verdict, FinalFailure):
            return self._finish_error(job, verdict.kind, verdict.message, reply)

        wait: float
        if isinstance(verdict, RateLimitRetry):
            lane.upstream_429s += 1
            if verdict.wait is not None and verdict.wait > MAX_HONOURED_WAIT:
                failure = exhausted(verdict, attempts=job.attempts, wait=verdict.wait)
                return self._finish_error(job, failure.kind, failure.message, reply)
            lane.budget.pause(verdict.wait, verdict.scope)
            log.info(
                "lane %s paused %.3fs after a 429 (%s budget) on %s",
                lane.name,
                verdict.wait or 0.0,
                verdict.scope or "unknown",
                job.log_label,
            )
            wait = 0.0  # the lane's pause delays it; the retry goes first once the lane resumes
        else:
            assert isinstance(verdict, BackoffRetry)
            wait = backoff_delay(job.attempts, hint=verdict.wait_hint, rng=self._rng)

        job.last_failure = verdict.reason
        if self._closing:
            return self._finish_error(
                job,
                ErrorKind.SHUTTING_DOWN,
                f"the engine is shutting down and did not retry (last answer: {verdict.reason}); resubmit",
                reply,
            )
        if job.attempts >= job.max_attempts:
            failure = exhausted(verdict, attempts=job.attempts)
            return self._finish_error(job, failure.kind, failure.message, reply)
        due = trio.current_time() + wait
        if due >= job.deadline:
            return self._finish_error(
                job,
                ErrorKind.TIMEOUT,
                f"the deadline would pass before the next attempt (last answer: {verdict.reason}); "
                "submit with a later deadline",
                reply,
            )
        lane.retries_made += 1
        self._set_state(job, JobState.RETRY_WAIT)
        self._retry_send.send_nowait((due, job))

    def _expire(self, job: Job) -> None:
        if not job.finished:
            detail = f" (last answer: {job.last_failure})" if job.last_failure else ""
            self._finish_error(
                job,
                ErrorKind.TIMEOUT,
                f"the deadline passed after {job.attempts} attempt(s){detail}; submit with a later deadline",
            )

    async def _retry_timer(self) -> None:
        """The retry channel's consumer: holds waiting retries and puts each back in its lane when due."""
        waiting: list[tuple[float, int, Job]] = []
        while True:
            next_due = waiting[0][0] if waiting else math.inf
            with trio.move_on_at(next_due):
                due, job = await self._retry_receive.receive()
                heapq.heappush(waiting, (due, next(self._sequence), job))
                continue
            now = trio.current_time()
            while waiting and waiting[0][0] <= now:
                _, _, job = heapq.heappop(waiting)
                if not job.finished:
                    self._set_state(job, JobState.QUEUED)
                    job.lane.push_front(job)

    async def _deadline_keeper(self) -> None:
        """Answers ``timeout`` for jobs whose deadline passes while they wait in a queue.

        Jobs being reserved or in flight carry the deadline on their own cancel scope.
        """
        while True:
            next_deadline = self._deadlines[0][0] if self._deadlines else math.inf
            with trio.move_on_at(next_deadline):
                self._deadline_changed = trio.Event()
                await self._deadline_changed.wait()
                continue
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, job = heapq.heappop(self._deadlines)
                if job.state in {JobState.QUEUED, JobState.RETRY_WAIT}:
                    self._expire(job)

    # --- shutdown ------------------------------------------------------------------------------------------

    async def shutdown(self, grace_period: float) -> None:
        """Refuse new work, answer waiting jobs ``shutting_down``, give in-flight ones ``grace_period``."""
        self._closing = True
        waiting = [job for job in self._jobs.values() if job.state is not JobState.IN_FLIGHT]
        for job in waiting:
            self._finish_error(job, ErrorKind.SHUTTING_DOWN, "the engine is shutting down; resubmit later")
        in_flight = len(self._jobs)
        log.info(
            "shutting down: answered %d waiting requests 'shutting_down'; giving %d in flight up to %gs",
            len(waiting),
            in_flight,
            grace_period,
        )
        with self._grace:
            self._grace.relative_deadline = grace_period
            await self._all_done.wait()
        unfinished = list(self._jobs.values())
        for job in unfinished:
            self._finish_error(
                job,
                ErrorKind.SHUTTING_DOWN,
                "the engine shut down before the upstream answered; the upstream may have processed it",
            )
        if unfinished:
            log.warning("cancelled %d requests still in flight at the end of the grace period", len(unfinished))
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def end_grace_period(self) -> None:
        """Stop waiting for in-flight requests (a second signal)."""
        self._grace.cancel()

    # --- statistics ----------------------------------------------------------------------------------------

    def statistics(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        limiter = self.limiter.statistics()
        engine = {
            "outstanding": len(self._jobs),
            "in_flight": limiter.borrowed_tokens,
            "max_concurrent_reqs": limiter.total_tokens,
            "waiting_for_slot": limiter.tasks_waiting,
            "max_queued": self._max_queued,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "closing": self._closing,
        }
        ledger_stats = self._ledger.statistics()
        lanes: dict[str, dict[str, Any]] = {}
        for name, lane in self._lanes.items():
            budget = ledger_stats.get(name)
            lanes[name] = {
                "queued": lane.counts[JobState.QUEUED] + lane.counts[JobState.RESERVING],
                "retry_wait": lane.counts[JobState.RETRY_WAIT],
                "in_flight": lane.counts[JobState.IN_FLIGHT],
                "succeeded": lane.succeeded,
                "failed": lane.failed,
                "upstream_429s": lane.upstream_429s,
                "retries": lane.retries_made,
                "estimated_prompt_tokens": lane.estimated_prompt_tokens,
                "actual_prompt_tokens": lane.actual_prompt_tokens,
                "budget": attrs.asdict(budget) if budget is not None else {},
            }
        return engine, lanes
