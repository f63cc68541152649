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

import collections
import enum
import heapq
import itertools
import logging
import math
import random
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from typing import Any, Final

import attrs
import httpx
import msgspec
import trio

from trio_mapper.engine.budget import Cost, LaneBudget, Ledger, RequestTooLarge, Reservation
from trio_mapper.engine.core.background import run_in_background
from trio_mapper.engine.core.fair_queue import GUARD_EVERY, FairQueue
from trio_mapper.engine.core.outcome import (
    Chunk,
    Failed,
    Finished,
    Outcome,
    ReplySink,
    RequestSpec,
    Started,
    Timings,
)
from trio_mapper.engine.core.retry import (
    MAX_HONOURED_WAIT,
    BackoffRetry,
    FinalFailure,
    RateLimitRetry,
    Success,
    Verdict,
    backoff_delay,
    classify_exception,
    classify_response,
    classify_stream_error,
    exhausted,
)
from trio_mapper.engine.core.tenants import CLASSES, DailyUsage, Prices, Tenant, Tenants, class_rank
from trio_mapper.engine.estimate.tokens import InvalidBody, TokenEstimate, TokenEstimator, TooManyTokens
from trio_mapper.engine.upstream.client import (
    ALLOWED_METHODS,
    GET_ENDPOINTS,
    InvalidEndpoint,
    InvalidHeader,
    ReplyBody,
    Upstream,
    UpstreamReply,
    Usage,
    forwarded_headers,
)
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot
from trio_mapper.engine.upstream.streams import StreamPlan, StreamRelay, plan_stream
from trio_mapper.kinds import ErrorKind
from trio_mapper.text import shorten

log = logging.getLogger("trio_mapper.scheduler")

#: How long a stream's chunks may wait for its client to read, in all, before the stream is ended (`_relay`).
#: In all, not per chunk: a client that reads a little every 50 s would otherwise hold its slot for ever.
RELAY_STALL_TIMEOUT: Final = 60.0
#: How an in-flight request cut by the end of the shutdown grace period was left.
SHUTDOWN_NO_ANSWER: Final = "before the upstream answered"
SHUTDOWN_CUT_STREAM: Final = "while the upstream's answer was streaming (what arrived was relayed, the rest is lost)"

#: Distinct models (lanes) the engine tracks; beyond this a new model name is refused, so that a client
#: inventing model names cannot make the engine grow without bound.
MAX_LANES: Final = 256
#: Longest model name accepted. Real names are a few dozen characters; the name is a lane's key and appears
#: in every stats reply and log line about the lane.
MAX_MODEL_NAME_CHARS: Final = 256
#: Frames above this size have their tokens counted (and body encoded) in a worker thread below the event
#: loop's priority (`run_in_background`): counting runs at about 10 MB/s, so a 64 KiB body costs the event
#: loop a few milliseconds at most.
LARGE_BODY_BYTES: Final = 64 * 1024
#: Jobs ended between two checkpoints when many end at once (a deadline shared by a whole batch, a client
#: with a hundred thousand queued requests going away): about 30 µs each, so the loop is never held long.
JOBS_PER_CHECKPOINT: Final = 500
#: One client (a uid, a client key) may hold at most this fraction of max_queued and of max_queued_bytes: the
#: queue's bounds are for everyone, and one client filling them (200,000 tiny requests of a capped batch
#: tenant, say) refused every other client's, whatever their class.
CLIENT_SHARE_OF_QUEUE: Final = 0.5
#: Timeouts logged one line each in one pass of the deadline keeper; one more line sums up the rest.
TIMEOUT_LINES_PER_PASS: Final = 10
#: An attempt in flight is cut this long after the instant its client said it gives up (`RequestSpec.patience`),
#: not at that instant: the two clocks started a moment apart, and the client's own timeout must fire first
#: (the SDK raises its APITimeoutError, and its going away withdraws the request) rather than a race between
#: them deciding what the client sees.
GIVE_UP_GRACE: Final = 1.0
#: An upstream that misreports usage does so on every reply: the first is logged, then one in this many.
IMPLAUSIBLE_USAGE_LOG_EVERY: Final = 100
#: What a request hears when a bug in the engine ended it.
_BUG_MESSAGE: Final = "the engine failed on this request (a bug, logged by the engine); please report it"
#: Worker threads counting tokens at once. Two cores: one thread leaves a core to the event loop.
TOKENIZER_THREADS: Final = 1


def _cost_of(estimate: TokenEstimate) -> Cost:
    return Cost(tokens=estimate.total, prompt_tokens=estimate.prompt_tokens)


class JobState(enum.Enum):
    QUEUED = "queued"
    RESERVING = "reserving"
    IN_FLIGHT = "in_flight"
    RETRY_WAIT = "retry_wait"
    DONE = "done"


@attrs.frozen
class JobRecord:
    """A finished job, for whoever keeps statistics over time (`Scheduler` ``observer``: the metrics)."""

    lane: str
    #: The client's identity (`ReplySink.identity`).
    identity: str
    #: ``succeeded``, or the `ErrorKind` value the request failed with.
    outcome: str
    attempts: int
    #: Attempts answered with a retryable 429.
    rate_limited_attempts: int
    #: Seconds from acceptance to the first dispatch (to the end, for a job never dispatched).
    queued: float
    #: Seconds in upstream calls, all attempts.
    upstream: float
    #: Tokens the job was charged at admission (0 if never admitted): its use of the lane's budget.
    charged_tokens: int


Observer = Callable[[JobRecord], None]


@attrs.define(eq=False)
class Job:
    request_id: Hashable
    #: Where the job's events go; None once the job is finished, so that a finished job lingering in a
    #: heap never keeps its connection (and that connection's buffers) alive.
    owner: ReplySink | None
    client_key: Hashable
    owner_label: str
    identity: str
    tenant: Tenant
    #: Its priority class, 0 the highest: its tenant's, or lower if the client asked.
    rank: int
    lane: Lane
    method: str
    url: httpx.URL
    body: bytes | None
    estimate: TokenEstimate
    received_at: float
    #: Past it, a job not in flight is answered ``timeout`` and no new attempt starts.
    deadline: float
    #: When the client stops waiting (≥ deadline): an attempt in flight runs until then.
    gives_up_at: float
    #: Seconds the client said it waits for an answer (`RequestSpec.patience`): an attempt's upstream read
    #: timeout stretches to it. None: the engine's read timeout.
    patience: float | None
    max_attempts: int
    #: Client headers for the upstream, already filtered to the allow-list.
    headers: dict[str, str] = attrs.field(factory=dict)
    #: How the reply streams, when the client asked for a stream.
    stream: StreamPlan | None = None
    #: Part of the reply reached the client (`Started` was reported): nothing may be retried any more.
    committed: bool = False
    state: JobState = JobState.QUEUED
    attempts: int = 0
    #: The cancel scope of whatever currently works on the job (reserving or in flight), so that a client
    #: cancel, a deadline or shutdown reaches it.
    scope: trio.CancelScope | None = None
    upstream_seconds: float = 0.0
    #: Seconds its stream's chunks have waited for the client to read them (`RELAY_STALL_TIMEOUT`).
    relay_waited: float = 0.0
    first_dispatched_at: float | None = None
    #: The cost its tenant was charged at its first dispatch, from the estimate, that the reply's usage has
    #: not replaced yet (`Scheduler._settle`): an attempt that ends without usage keeps it charged.
    estimated_cost: float = 0.0
    last_failure: str = ""
    #: Attempts answered with a retryable 429. They do not count against ``max_attempts``, which bounds
    #: faults (5xx, resets, timeouts): a 429 is the upstream saying "later", and only the deadline ends it.
    rate_limited_attempts: int = 0
    #: Requests of higher classes that went ahead of it while it waited for the budget (`Lane.hold`); at
    #: GUARD_EVERY it is not overtaken any more, as the fair queue's guard promises a lower class.
    overtaken_by: int = 0

    @property
    def fault_attempts(self) -> int:
        return self.attempts - self.rate_limited_attempts

    @property
    def finished(self) -> bool:
        return self.state is JobState.DONE

    @property
    def cost(self) -> Cost:
        return _cost_of(self.estimate)

    @property
    def tenant_name(self) -> str:
        return self.tenant.name

    @property
    def tokens(self) -> int:
        return self.estimate.total

    @property
    def log_label(self) -> str:
        return f"{self.owner_label} tenant={self.tenant.name} id={self.request_id!r}"


@attrs.define(eq=False)
class Lane:
    """One model's queue and counters; its budget lives in the ledger.

    New requests wait in a `FairQueue` (class, tenant share, caps, client turns); retries due go first. A
    job leaving early (cancel, deadline, disconnect) is removed at once in O(1): finished jobs never pile
    up behind a dispatcher that waits for budget.
    """

    name: str
    budget: LaneBudget
    waiting: FairQueue[Job]
    retries: collections.OrderedDict[Job, None] = attrs.field(factory=collections.OrderedDict)
    wakeup: trio.Event = attrs.field(factory=trio.Event)
    #: The dispatcher task's scope, so an idle lane can be dropped.
    dispatcher: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    counts: dict[JobState, int] = attrs.field(factory=lambda: dict.fromkeys(JobState, 0))
    #: The job the dispatcher waits for the budget for, and the scope of that wait: a push of a higher class
    #: cancels it (`push`), so that an interactive request does not wait for a batch request's tokens.
    reserving: Job | None = None
    reserve_wait: trio.CancelScope | None = None
    #: A job that was overtaken: it goes next, once no request of a higher class may go (`pop_next`).
    held: Job | None = None
    upstream_429s: int = 0
    retries_made: int = 0
    succeeded: int = 0
    failed: int = 0
    estimated_prompt_tokens: int = 0
    actual_prompt_tokens: int = 0
    #: Replies whose usage said more tokens than the lane's whole per-minute limit (`Scheduler._plausible`).
    implausible_usage: int = 0

    @property
    def busy(self) -> bool:
        return any(count for state, count in self.counts.items() if state is not JobState.DONE)

    def push(self, job: Job) -> None:
        self.waiting.push(job)
        self.wakeup.set()
        reserving = self.reserving
        # One held job at most: a second would have nowhere to wait.
        if (
            reserving is not None
            and job.rank < reserving.rank
            and reserving.overtaken_by < GUARD_EVERY
            and self.held is None
        ):
            assert self.reserve_wait is not None
            self.reserve_wait.cancel()

    @contextmanager
    def reserving_for(self, job: Job) -> Iterator[trio.CancelScope]:
        """The scope of the dispatcher's wait for ``job``'s budget, which a higher class cancels (`push`)."""
        self.reserving, self.reserve_wait = job, trio.CancelScope()
        try:
            with self.reserve_wait:
                yield self.reserve_wait
        finally:
            self.reserving = self.reserve_wait = None

    def hold(self, job: Job) -> None:
        """``job`` was overtaken while it waited for the budget: it goes next, after the requests of higher
        classes that may go now, and after at most `GUARD_EVERY` of them in all (the queue's guard against
        starvation), however many times it is overtaken."""
        self.held = job
        self.wakeup.set()

    def push_front(self, job: Job) -> None:
        self.retries[job] = None
        self.wakeup.set()

    def remove(self, job: Job) -> None:
        """Forget a job that finished while queued (a no-op for jobs not in a queue)."""
        self.retries.pop(job, None)
        self.waiting.remove(job)
        if self.held is job:
            self.held = None

    def pop_next(self, now: float) -> Job | float:
        """The next job: due retries first (their tenant's turn and cap were spent on the first attempt), then
        the fair queue's pick; else when a capped tenant may go (inf: nothing waits)."""
        if self.retries:
            return self.retries.popitem(last=False)[0]
        held = self.held
        if held is not None:
            if held.overtaken_by < GUARD_EVERY:
                overtaking = self.waiting.pop(now, above=held.rank)
                if isinstance(overtaking, Job):
                    held.overtaken_by += 1
                    return overtaking
            self.held = None
            return held
        return self.waiting.pop(now)

    async def take(self) -> Job:
        while True:
            answer = self.pop_next(trio.current_time())
            if isinstance(answer, Job):
                return answer
            self.wakeup = trio.Event()
            with trio.move_on_at(answer):
                await self.wakeup.wait()


@attrs.frozen
class _Checked:
    """What the cheap checks of a submit found: everything but the body's measurements."""

    method: str
    url: httpx.URL
    lane_name: str
    #: When the front handed the request over: its deadline and timings count from here.
    received_at: float
    deadline: float
    gives_up_at: float
    max_attempts: int
    #: The lane's whole per-minute token budget: counting a prompt stops there (read on the event loop, so
    #: the worker thread that measures never touches the ledger).
    token_budget: int
    tenant: Tenant
    rank: int
    #: The body to send upstream: the client's, or for a stream one that also asks for usage.
    body: Mapping[str, Any]
    stream: StreamPlan | None
    #: The client's headers that go upstream (`forwarded_headers`).
    headers: dict[str, str]


@attrs.frozen
class Measured:
    """The CPU-bound part of accepting a request: its token estimate and its body as JSON bytes."""

    estimate: TokenEstimate
    body: bytes | None


class _Refused(Exception):
    """A submit answered at once with an error, not accepted."""

    def __init__(self, kind: ErrorKind, message: str, *, anonymous: bool = False, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        #: Answer with a null id (the id is not this submit's to use).
        self.anonymous = anonymous
        #: The body field at fault (`Failed.param`).
        self.param = param


def _lingering(heap: list[tuple[float, int, Job]], live: int) -> bool:
    """Whether a lazily-cleaned heap holds enough finished jobs to be worth compacting (amortised O(1))."""
    return len(heap) > 2 * live + 64


def _compact(heap: list[tuple[float, int, Job]]) -> None:
    heap[:] = [entry for entry in heap if not entry[2].finished]
    heapq.heapify(heap)


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
        default_deadline: float | None = None,
        max_queued_bytes: int | None = None,
        rng: random.Random | None = None,
        observer: Observer | None = None,
        tenants: Tenants | None = None,
        prices: Prices | None = None,
    ) -> None:
        self._ledger = ledger
        self._upstream = upstream
        self._estimator = estimator
        self.limiter = trio.CapacityLimiter(max_concurrent_reqs)
        self._tokenizer = trio.CapacityLimiter(TOKENIZER_THREADS)
        self._max_queued = max_queued
        #: Bytes of request bodies the outstanding jobs may hold in all (None: no limit): max_queued alone
        #: bounds their number, not their size, and a body may be megabytes. A reload may change it.
        self.max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        #: The same, by client identity (only those holding some).
        self._queued_bytes_of: dict[str, int] = {}
        self._default_max_attempts = default_max_attempts
        #: Seconds a request that names no deadline may take (None: no limit); a reload may change it.
        self.default_deadline = default_deadline
        self._rng = rng or random.Random()
        self._observer = observer
        self._tenants = tenants if tenants is not None else Tenants()
        #: What a model's tokens cost, for each tenant's cost (empty: no cost accounting).
        self._prices = prices if prices is not None else Prices()
        #: What each tenant spent over the last 24 hours (tokens charged at admission, corrected by usage).
        self._daily: dict[str, DailyUsage] = {}
        self._lanes: dict[str, Lane] = {}
        #: Jobs by state per client identity, for statistics per client.
        self._identities: dict[str, collections.Counter[JobState]] = {}
        # Outstanding jobs by client, so that a disconnect costs that client's jobs, not everyone's.
        self._owners: dict[Hashable, dict[Hashable, Job]] = {}
        self._outstanding = 0
        # Retry channel: every job in it is an accepted job, so max_queued bounds it.
        self._retry_send, self._retry_receive = trio.open_memory_channel[tuple[float, Job]](max_queued)
        self._retry_waiting: list[tuple[float, int, Job]] = []
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
        self.internal_errors = 0

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # --- submission, from connection tasks -----------------------------------------------------------------

    async def intake(self, owner: ReplySink, request_id: Hashable, spec: RequestSpec, *, size_bytes: int) -> None:
        """`submit`, with a large body's CPU work done in a worker thread so other clients are not stalled.

        Args:
            size_bytes: the size of the request as the front received it, which decides whether a thread
                is worth it.

        The caller (a connection's reader) awaits it before reading its next frame, which keeps the
        connection's order and its backpressure.
        """
        if size_bytes < LARGE_BODY_BYTES:
            return self.submit(owner, request_id, spec)
        try:
            checked = self._check(owner, request_id, spec)
            # Before the thread's work, not only after: when the queue is full of bodies, measuring one more
            # would spend a core on a request refused anyway (the size received is the body's, near enough).
            self._check_room_for(size_bytes, owner.identity)
        except _Refused as refusal:
            return self._refuse(owner, request_id, refusal)
        try:
            measured = await run_in_background(self._measure, spec, checked, limiter=self._tokenizer)
        except _Refused as refusal:
            return self._refuse(owner, request_id, refusal)
        self.submit(owner, request_id, spec, measured=measured, received_at=checked.received_at)

    def submit(
        self,
        owner: ReplySink,
        request_id: Hashable,
        spec: RequestSpec,
        *,
        measured: Measured | None = None,
        received_at: float | None = None,
    ) -> None:
        """Accept a request or answer it at once (a `Failed` event); never blocks.

        Args:
            measured: the body's measurements, when `intake` made them in a worker thread.
            received_at: when the front handed the request over, if earlier than now (`intake`).
        """
        try:
            checked = self._check(owner, request_id, spec, received_at=received_at)
            if measured is None:
                measured = self._measure(spec, checked)
            self._check_room_for(len(measured.body) if measured.body is not None else 0, owner.identity)
            lane = self._lane_for(checked.lane_name, measured.estimate)
        except _Refused as refusal:
            return self._refuse(owner, request_id, refusal)

        job = Job(
            request_id=request_id,
            owner=owner,
            client_key=owner.client_key,
            owner_label=owner.label,
            identity=owner.identity,
            tenant=checked.tenant,
            rank=checked.rank,
            lane=lane,
            method=checked.method,
            url=checked.url,
            body=measured.body,
            estimate=measured.estimate,
            received_at=checked.received_at,
            deadline=checked.deadline,
            gives_up_at=checked.gives_up_at,
            patience=spec.patience,
            max_attempts=checked.max_attempts,
            headers=checked.headers,
            stream=checked.stream,
        )
        self._owners.setdefault(job.client_key, {})[job.request_id] = job
        self._outstanding += 1
        if job.body:
            self._queued_bytes += len(job.body)
            self._queued_bytes_of[job.identity] = self._queued_bytes_of.get(job.identity, 0) + len(job.body)
        if self._all_done.is_set():
            self._all_done = trio.Event()
        self.accepted += 1
        lane.counts[JobState.QUEUED] += 1
        self._identities.setdefault(job.identity, collections.Counter())[JobState.QUEUED] += 1
        lane.push(job)
        if job.deadline < math.inf:
            heapq.heappush(self._deadlines, (job.deadline, next(self._sequence), job))
            if self._deadlines[0][2] is job:
                self._deadline_changed.set()

    def _refuse(self, owner: ReplySink, request_id: Hashable, refusal: _Refused) -> None:
        self.rejected += 1
        failed = Failed(kind=refusal.kind, message=refusal.message, param=refusal.param)
        self._report(owner, None if refusal.anonymous else request_id, failed)

    def _check(
        self, owner: ReplySink, request_id: Hashable, spec: RequestSpec, *, received_at: float | None = None
    ) -> _Checked:
        """Everything about a submit that is cheap to check; raises `_Refused`."""
        if self.is_outstanding(owner, request_id):
            # Answered with a null id: a reply carrying this id would read as the final answer to the request
            # that is still outstanding under it (first, so that no other refusal carries the id either).
            raise _Refused(
                ErrorKind.INVALID_REQUEST,
                f"a submit reused id {request_id!r}, which is still outstanding on this connection; "
                "it was ignored. Use a unique id per outstanding request",
                anonymous=True,
            )
        if self._closing:
            raise _Refused(ErrorKind.SHUTTING_DOWN, "the engine is shutting down; resubmit to the next engine")
        if self._outstanding >= self._max_queued:
            raise _Refused(
                ErrorKind.OVERLOADED,
                f"the engine already holds {self._outstanding} requests (max_queued); "
                "wait for replies before submitting more, or raise max_queued",
            )
        held = self._identities.get(owner.identity)
        if held is not None and held.total() >= self._max_queued * CLIENT_SHARE_OF_QUEUE:
            raise _Refused(
                ErrorKind.OVERLOADED,
                f"this client ({owner.identity}) already holds {held.total()} requests, half of max_queued: one "
                "client may not fill the queue for everyone; wait for replies before submitting more",
            )
        method = spec.method.upper()
        if method not in ALLOWED_METHODS:
            raise _Refused(ErrorKind.INVALID_REQUEST, f"method {spec.method!r} is not supported; use POST")
        try:
            path, url = self._upstream.resolve(spec.endpoint)
        except InvalidEndpoint as exc:
            raise _Refused(ErrorKind.INVALID_REQUEST, str(exc)) from None
        if method == "GET" and path.split("/", 1)[0] not in GET_ENDPOINTS:
            raise _Refused(
                ErrorKind.INVALID_REQUEST,
                f"GET {spec.endpoint} is not passed on: a GET there would read what the key's whole project "
                "stored (other clients' completions and responses). Only GET /v1/models… is served",
            )
        body, stream = plan_stream(path, spec.body)
        if stream is not None and method != "POST":
            raise _Refused(ErrorKind.INVALID_REQUEST, f"a streamed request must be a POST, not {method}")
        if spec.max_attempts is not None and spec.max_attempts < 1:
            raise _Refused(ErrorKind.INVALID_REQUEST, "max_attempts must be at least 1")
        if spec.max_attempts is not None and spec.max_attempts > self._default_max_attempts:
            # The engine's setting is a ceiling as well as the default: fault retries are not charged to a
            # tenant's caps, so a client asking for a thousand would spend the key at will on a failing upstream.
            raise _Refused(
                ErrorKind.INVALID_REQUEST,
                f"max_attempts {spec.max_attempts} is above the engine's max_attempts ({self._default_max_attempts}); "
                "ask for at most that many, or ask the operator to raise it",
                param="max_attempts",
            )
        for name, seconds in (("deadline", spec.deadline), ("patience", spec.patience)):
            if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
                raise _Refused(ErrorKind.INVALID_REQUEST, f"{name} must be a positive number of seconds")
        try:
            headers = forwarded_headers(spec.headers)
        except InvalidHeader as exc:
            raise _Refused(ErrorKind.INVALID_REQUEST, str(exc)) from None
        model = spec.body.get("model")
        if isinstance(model, str) and len(model) > MAX_MODEL_NAME_CHARS:
            raise _Refused(
                ErrorKind.INVALID_REQUEST,
                f"body.model is {len(model)} characters long; model names have at most {MAX_MODEL_NAME_CHARS}",
                param="model",
            )
        tenant = self._tenants.resolve(owner.client)
        rank = class_rank(tenant.priority)
        if spec.priority is not None:
            if spec.priority not in CLASSES:
                raise _Refused(
                    ErrorKind.INVALID_REQUEST,
                    f"priority {shorten(str(spec.priority), 40)!r} is not a class; use one of {', '.join(CLASSES)}",
                )
            # A client may step down (a batch job asks for batch), never above its tenant's class.
            rank = max(rank, class_rank(spec.priority))
        exhausted = self._daily_budget_spent(tenant)
        if exhausted is not None:
            raise _Refused(ErrorKind.BUDGET_EXHAUSTED, exhausted)
        timeout = spec.deadline if spec.deadline is not None else self.default_deadline
        received_at = trio.current_time() if received_at is None else received_at
        lane_name = self._ledger.lane_name(model) if isinstance(model, str) and model else "default"
        deadline = received_at + timeout if timeout is not None else math.inf
        return _Checked(
            method=method,
            url=url,
            lane_name=lane_name,
            received_at=received_at,
            deadline=deadline,
            gives_up_at=max(deadline, received_at + spec.patience) if spec.patience is not None else deadline,
            max_attempts=spec.max_attempts or self._default_max_attempts,
            token_budget=self._ledger.configured_limits(lane_name).tpm,
            body=body,
            stream=stream,
            headers=headers,
            tenant=tenant,
            rank=rank,
        )

    def _measure(self, spec: RequestSpec, checked: _Checked) -> Measured:
        """The token estimate and the JSON body: CPU-bound, thread-safe (`intake` runs it in a thread)."""
        # A prompt above the whole per-minute budget can never be admitted: stop counting there.
        try:
            estimate = self._estimator.estimate(spec.endpoint, spec.body, limit=checked.token_budget)
            body = msgspec.json.encode(checked.body) if checked.method == "POST" else None
        except InvalidBody as exc:
            raise _Refused(ErrorKind.INVALID_REQUEST, str(exc), param=exc.param) from None
        except TooManyTokens as exc:
            raise _Refused(
                ErrorKind.REQUEST_TOO_LARGE,
                f"{checked.lane_name}: the prompt alone has more than {exc.limit} tokens, the whole per-minute "
                "budget; reduce input or max_tokens",
            ) from None
        except RecursionError:
            raise _Refused(
                ErrorKind.INVALID_REQUEST, "the body is nested too deeply; JSON request bodies nest a few levels"
            ) from None
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            # A msgpack value JSON cannot carry: an ext type, a non-string map key.
            raise _Refused(
                ErrorKind.INVALID_REQUEST,
                f"the body holds a value JSON cannot represent ({exc}); send only maps with string keys, "
                "arrays, strings, numbers, booleans and nil",
            ) from None
        return Measured(estimate, body)

    def _check_room_for(self, size: int, identity: str) -> None:
        """Refuses a body of ``size`` bytes that would take the bodies held past max_queued_bytes, or the
        client's past half of it; a lone one always fits (its size is bounded by the front's
        max_frame_bytes), so no valid request is refused for ever."""
        limit = self.max_queued_bytes
        if limit is None:
            return
        if self._queued_bytes and self._queued_bytes + size > limit:
            raise _Refused(
                ErrorKind.OVERLOADED,
                f"the engine already holds {self._queued_bytes:,} bytes of request bodies, and this one "
                f"({size:,} bytes) would take it past max_queued_bytes ({limit:,}); "
                "wait for replies before submitting more, or raise max_queued_bytes",
            )
        held = self._queued_bytes_of.get(identity, 0)
        if held and held + size > limit * CLIENT_SHARE_OF_QUEUE:
            raise _Refused(
                ErrorKind.OVERLOADED,
                f"this client ({identity}) already holds {held:,} bytes of request bodies, and this one "
                f"({size:,} bytes) would take it past half of max_queued_bytes: one client may not fill the "
                "queue for everyone; wait for replies before submitting more",
            )

    def _lane_for(self, name: str, estimate: TokenEstimate) -> Lane:
        """The request's lane, created only now that the request is known to be valid and admissible."""
        try:
            # The lane's limits in force when it exists, its configured ones when it does not (yet).
            self._ledger.check_admissible(name, _cost_of(estimate))
        except RequestTooLarge as exc:
            raise _Refused(ErrorKind.REQUEST_TOO_LARGE, str(exc)) from None
        lane = self._lanes.get(name)
        if lane is not None:
            return lane
        if len(self._lanes) >= MAX_LANES and not self._evict_idle_lane():
            raise _Refused(
                ErrorKind.OVERLOADED,
                f"the engine is busy with {MAX_LANES} distinct models; retry when some are idle",
            )
        return self._open_lane(name)

    # --- tenants -------------------------------------------------------------------------------------------

    def update_tenants(self, tenants: Tenants, prices: Prices | None = None) -> None:
        """New tenants, prices or limits (a reload): queued requests keep their place; caps and weights follow."""
        self._tenants = tenants
        if prices is not None:
            self._prices = prices
        for name, lane in self._lanes.items():
            lane.waiting.reconfigure(tenants, self._lane_limits(name))
            lane.wakeup.set()  # its dispatcher may sleep until a cap the reload lifted

    def _spend(self, tenant: Tenant, tokens: int, cost: float = 0.0) -> None:
        if tokens or cost:
            self._daily.setdefault(tenant.name, DailyUsage()).add(tokens, cost, trio.current_time())

    def _daily_budget_spent(self, tenant: Tenant) -> str | None:
        """Why the tenant may not send more today, or None."""
        if tenant.daily_tokens is None and tenant.daily_cost is None:
            return None
        usage = self._daily.get(tenant.name)
        if usage is None:
            return None
        tokens, cost = usage.totals(trio.current_time())
        if tenant.daily_tokens is not None and tokens >= tenant.daily_tokens:
            spent = f"{tokens:,.0f} tokens in the last 24 hours, its daily budget is {tenant.daily_tokens:,}"
        elif tenant.daily_cost is not None and cost >= tenant.daily_cost:
            spent = (
                f"{cost:,.4f} in the last 24 hours (by the price table), its daily cost budget is {tenant.daily_cost:,}"
            )
        else:
            return None
        return (
            f"tenant {tenant.name!r} spent {spent}; it refills as that spending ages out. Ask the operator to raise it"
        )

    def tenant_statistics(self) -> dict[str, dict[str, Any]]:
        """Each tenant's settings and what it spent in the last 24 hours."""
        now = trio.current_time()
        queued: collections.Counter[str] = collections.Counter()
        for lane in self._lanes.values():
            queued.update(lane.waiting.statistics())
        result: dict[str, dict[str, Any]] = {}
        for tenant in self._tenants.all():
            usage = self._daily.get(tenant.name)
            tokens, cost = usage.totals(now) if usage is not None else (0.0, 0.0)
            result[tenant.name] = {
                "priority": tenant.priority,
                "weight": tenant.weight,
                "rpm_cap": str(tenant.rpm_cap) if tenant.rpm_cap else None,
                "tpm_cap": str(tenant.tpm_cap) if tenant.tpm_cap else None,
                "daily_tokens": tenant.daily_tokens,
                "daily_cost": tenant.daily_cost,
                "tokens_24h": round(tokens),
                "cost_24h": cost,
                "queued": queued[tenant.name],
            }
        return result

    def is_outstanding(self, owner: ReplySink, request_id: Hashable) -> bool:
        return request_id in self._owners.get(owner.client_key, {})

    def cancel(self, owner: ReplySink, request_id: Hashable) -> bool:
        """Withdraw a request at the client's wish; False when it is unknown or already answered."""
        job = self._owners.get(owner.client_key, {}).get(request_id)
        if job is None:
            return False
        self._finish_error(job, ErrorKind.CANCELLED, "cancelled by the client")
        return True

    async def forget_owner(self, owner: ReplySink) -> int:
        """The client went away: withdraw its requests. Their replies have nowhere to go and are not built."""
        jobs = list(self._owners.get(owner.client_key, {}).values())
        for index, job in enumerate(jobs, 1):
            if self._close(job, ErrorKind.CANCELLED.value):
                job.lane.failed += 1
            if index % JOBS_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()
        if jobs:
            log.info("%s disconnected; cancelled %d outstanding requests", owner.label, len(jobs))
        return len(jobs)

    # --- finishing: exactly one reply per job ----------------------------------------------------------------

    def _set_state(self, job: Job, state: JobState) -> None:
        job.lane.counts[job.state] -= 1
        job.lane.counts[state] += 1
        counts = self._identities[job.identity]
        counts[job.state] -= 1
        if state is not JobState.DONE:
            counts[state] += 1
        elif not counts.total():
            del self._identities[job.identity]
        job.state = state

    def _timings(self, job: Job) -> Timings:
        now = trio.current_time()
        dispatched = job.first_dispatched_at if job.first_dispatched_at is not None else now
        return Timings(queued=dispatched - job.received_at, upstream=job.upstream_seconds, total=now - job.received_at)

    def _close(self, job: Job, outcome: str) -> ReplySink | None:
        """Mark the job finished and drop every reference to it that matters; returns where its reply goes.

        Finished jobs may linger in the deadline and retry heaps until popped or compacted; they keep
        neither their body nor their connection.

        Args:
            outcome: ``succeeded`` or the error kind's value, for the observer.
        """
        if job.finished or job.owner is None:
            return None
        owner, job.owner = job.owner, None
        self._observe(job, outcome)
        self._set_state(job, JobState.DONE)
        jobs = self._owners[job.client_key]
        del jobs[job.request_id]
        if not jobs:
            del self._owners[job.client_key]
        self._outstanding -= 1
        job.lane.remove(job)
        if job.body:
            self._queued_bytes -= len(job.body)
            if left := self._queued_bytes_of[job.identity] - len(job.body):
                self._queued_bytes_of[job.identity] = left
            else:
                del self._queued_bytes_of[job.identity]
        job.body = None
        if _lingering(self._deadlines, self._outstanding):
            _compact(self._deadlines)
        if _lingering(self._retry_waiting, self._outstanding):
            _compact(self._retry_waiting)
        if job.scope is not None:
            job.scope.cancel()
        if not self._outstanding:
            self._all_done.set()
        return owner

    def _observe(self, job: Job, outcome: str) -> None:
        if self._observer is None:
            return
        timings = self._timings(job)
        record = JobRecord(
            lane=job.lane.name,
            identity=job.identity,
            outcome=outcome,
            attempts=job.attempts,
            rate_limited_attempts=job.rate_limited_attempts,
            queued=timings.queued,
            upstream=timings.upstream,
            charged_tokens=job.cost.tokens if job.first_dispatched_at is not None else 0,
        )
        try:
            self._observer(record)
        except Exception:
            log.exception("the job observer failed on %s; statistics may be incomplete", job.log_label)

    def _report(self, owner: ReplySink, request_id: Hashable, *events: Outcome) -> None:
        """Hand a job's last events to its front: the one place they leave the core, so the one fence.

        A front that fails to take a success gets a `Failed` of kind ``internal_error`` instead: the request
        still gets its one final answer. If even that fails, the error is logged and the front is left to its
        own handling of a broken connection.
        """
        try:
            for event in events:
                owner.report(request_id, event)
        except Exception:
            self.internal_errors += 1
            log.exception("internal error while %s took the answer to id=%r", owner.label, request_id)
            if isinstance(events[-1], Failed) and events[-1].kind is ErrorKind.INTERNAL_ERROR:
                return
            try:
                owner.report(request_id, Failed(kind=ErrorKind.INTERNAL_ERROR, message=_BUG_MESSAGE))
            except Exception:
                log.exception("%s could not take an internal_error either", owner.label)

    def _finish_result(self, job: Job, reply: UpstreamReply) -> None:
        timings = self._timings(job)
        owner = self._close(job, "succeeded")
        if owner is None:
            return
        job.lane.succeeded += 1
        finished = Finished(
            status=reply.status,
            headers=reply.headers,
            body=reply.body,
            attempts=job.attempts,
            timings=timings,
            streamed=reply.streamed,
        )
        if job.committed:
            return self._report(owner, job.request_id, finished)
        started = Started(
            status=reply.status,
            headers=reply.headers,
            attempts=job.attempts,
            queued=timings.queued,
            streaming=reply.streamed,
        )
        self._report(owner, job.request_id, started, finished)

    def _finish_error(
        self,
        job: Job,
        kind: ErrorKind,
        message: str,
        reply: UpstreamReply | None = None,
        *,
        quiet: bool = False,
        error_relayed: bool = False,
    ) -> None:
        """Answer a job's failure. ``quiet``: its caller sums such failures up in the log; ``error_relayed``: as
        `Failed.error_relayed`."""
        owner = self._close(job, kind.value)
        if owner is None:
            return
        job.lane.failed += 1
        # Cancellations and shutdown are summarised elsewhere; per-request lines are for real failures.
        if kind not in {ErrorKind.CANCELLED, ErrorKind.SHUTTING_DOWN} and not quiet:
            log.warning("request %s failed: %s: %s", job.log_label, kind.value, message)
        failed = Failed(
            kind=kind,
            message=message,
            status=reply.status if reply else None,
            headers=reply.headers if reply else {},
            body=reply.body if reply else None,
            attempts=job.attempts,
            error_relayed=error_relayed,
        )
        self._report(owner, job.request_id, failed)

    def _internal_error(self, job: Job, what: str) -> None:
        """The bug fence: an unexpected exception costs the one job it happened in, never the engine."""
        self.internal_errors += 1
        log.exception("internal error while %s %s; answering it internal_error", what, job.log_label)
        self._finish_error(job, ErrorKind.INTERNAL_ERROR, f"{_BUG_MESSAGE} (while {what} it)")

    # --- the tasks ---------------------------------------------------------------------------------------

    def _lane_limits(self, name: str) -> tuple[int, int]:
        limits = self._ledger.configured_limits(name)
        return limits.rpm, limits.tpm

    def _open_lane(self, name: str) -> Lane:
        lane = Lane(
            name=name,
            budget=self._ledger.lane(name),
            waiting=FairQueue(self._tenants, self._lane_limits(name)),
        )
        self._lanes[name] = lane
        assert self._nursery is not None, "Scheduler.run must be started before submit"
        self._nursery.start_soon(self._dispatch, lane, name=f"dispatch {name}")
        return lane

    def _evict_idle_lane(self) -> bool:
        """Make room for a new model by dropping a lane with no work; False when every lane is busy.

        Lanes are per model name, which clients choose: without eviction, made-up names could fill the
        table for good and lock real models out. Only a lane whose budget is at rest (refilled, not paused)
        goes: a lane created again afresh must not hand out budget the upstream still counts as spent.
        """
        for name, lane in self._lanes.items():
            if not lane.busy and self._ledger.forget(name):
                lane.dispatcher.cancel()
                del self._lanes[name]
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
                job = await lane.take()
                try:
                    await self._dispatch_one(lane, job)
                except Exception:
                    self._internal_error(job, "admitting")

    async def _dispatch_one(self, lane: Lane, job: Job) -> None:
        # The tenant as configured now: a reload may have raised or lowered its budget since this one queued.
        tenant = self._tenants.by_name(job.tenant.name) or job.tenant
        exhausted = self._daily_budget_spent(tenant) if job.attempts == 0 else None
        if exhausted is not None:
            # Spent while this one waited: it fails as a new submit would, before any budget is reserved.
            return self._finish_error(job, ErrorKind.BUDGET_EXHAUSTED, exhausted)
        self._set_state(job, JobState.RESERVING)
        reservation: Reservation | None = None
        slot_taken = handed_over = False
        try:
            with trio.CancelScope(deadline=job.deadline) as scope:
                job.scope = scope
                try:
                    with lane.reserving_for(job) as reserve_wait:
                        reservation = await lane.budget.reserve(job.cost)
                    if reserve_wait.cancelled_caught:
                        # A request of a higher class came: it goes first, then this one.
                        job.scope = None
                        self._set_state(job, JobState.QUEUED)
                        lane.hold(job)
                        return
                except RequestTooLarge as exc:
                    # The limits were lowered (reload, or the upstream's headers) after it was accepted.
                    job.scope = None
                    self._finish_error(job, ErrorKind.REQUEST_TOO_LARGE, str(exc))
                    return
                try:
                    # A free slot is taken without another scheduling point (the reservation was one): each
                    # pass of the event loop here is time added to every request.
                    self.limiter.acquire_on_behalf_of_nowait(job)
                except trio.WouldBlock:
                    await self.limiter.acquire_on_behalf_of(job)
                slot_taken = True
            job.scope = None
            if not slot_taken or job.finished:
                # Cancelled by the client, shutdown or the deadline before anything was sent.
                if scope.cancelled_caught:
                    if reservation is None:
                        self._expire(job, f"while it waited for the rpm/tpm budget of model {lane.name!r}")
                    else:
                        self._expire(job, "while it waited for a free upstream slot (max_concurrent_reqs)")
                return
            assert reservation is not None  # the slot is taken only after the reservation
            self._set_state(job, JobState.IN_FLIGHT)
            if job.first_dispatched_at is None:
                job.first_dispatched_at = trio.current_time()
                # Charged now, like its tokens, not only once usage comes: a stream the client leaves, or an
                # attempt that fails, reports none, and daily_cost was spent without limit so.
                job.estimated_cost = self._prices.cost(
                    job.lane.name, job.estimate.prompt_tokens, job.estimate.output_tokens
                )
                self._spend(job.tenant, job.cost.tokens, job.estimated_cost)
            assert self._nursery is not None
            self._nursery.start_soon(self._attempt, job, reservation)
            handed_over = True
        finally:
            # Whatever ended this before the attempt task took over (a cancel, the deadline, a bug), the slot
            # and the budget go back: a leak would hold a slot for good and keep the lane from resting.
            if not handed_over:
                job.scope = None
                if slot_taken:
                    self.limiter.release_on_behalf_of(job)
                if reservation is not None:
                    lane.budget.refund(reservation)

    async def _attempt(self, job: Job, reservation: Reservation) -> None:
        """One upstream call for a job that holds a reservation and a concurrency slot (released here)."""
        lane = job.lane
        if job.finished:  # answered (cancelled, shutdown) between dispatch and this task's start
            self.limiter.release_on_behalf_of(job)
            lane.budget.refund(reservation)
            return
        reply: UpstreamReply | None = None
        failure: Exception | None = None
        try:
            # Sent, it runs past the deadline until the client gives up: its answer may still reach the client.
            grace = GIVE_UP_GRACE if job.patience is not None else 0.0
            with trio.CancelScope(deadline=job.gives_up_at + grace) as scope:
                job.scope = scope
                job.attempts += 1
                started = trio.current_time()
                try:
                    if job.stream is not None:
                        reply = await self._stream(job, job.stream)
                    else:
                        reply = await self._upstream.send(job.method, job.url, job.body, job.headers, job.patience)
                except Exception as exc:
                    failure = exc
                finally:
                    job.upstream_seconds += trio.current_time() - started
            job.scope = None
        finally:
            self.limiter.release_on_behalf_of(job)
        try:
            self._settle(job, reservation, reply, failure, cancelled=scope.cancelled_caught)
        except Exception:
            lane.budget.reconcile(reservation, prompt_tokens=None, snapshot=None)  # no-op if settled already
            self._internal_error(job, "concluding")

    async def _stream(self, job: Job, plan: StreamPlan) -> UpstreamReply:
        """One attempt of a streamed request: each event is relayed to the client as it arrives.

        The reply is committed (`Started`) with its first chunk; until then the attempt may still be retried
        like any other. A reply that does not stream (an error, or an upstream that ignored ``stream``) comes
        back whole, as from `Upstream.send`.
        """
        async with self._upstream.open_stream(job.method, job.url, job.body, job.headers, job.patience) as opened:
            if isinstance(opened, UpstreamReply):
                return opened
            relay = StreamRelay(plan)
            async with aclosing(opened.events) as events:
                async for event in events:
                    chunk = relay.feed(event.data, event.event)
                    if chunk is not None:
                        await self._relay(job, opened.status, opened.headers, chunk)
                    if relay.error is not None:
                        # The error is the stream's end, as for the SDK, which raises at it: what may follow
                        # (a [DONE]) is not waited for, nor an upstream that stalls after it.
                        break
            if not relay.ended:
                # Reported as a success, a cut stream would reach the client as a whole answer (the HTTP front
                # would even end it with [DONE]); as a broken stream it is retried, or ends with an error event.
                raise httpx.RemoteProtocolError("the upstream's stream ended before its last event")
            return UpstreamReply(
                status=opened.status,
                headers=opened.headers,
                body=ReplyBody(b""),
                elapsed=trio.current_time() - opened.started,
                streamed=True,
                streamed_usage=relay.usage,
                streamed_error=relay.error,
                streamed_error_shown=relay.error_shown,
            )

    async def _relay(self, job: Job, status: int, headers: Mapping[str, str], chunk: Chunk) -> None:
        owner = job.owner
        if owner is None:
            return  # finished meanwhile (cancelled): its scope is cancelled, the next checkpoint ends this attempt
        if not job.committed:
            job.committed = True
            if job.scope is not None:
                # The deadline bounds the wait for the answer to begin (what an SDK's read timeout means); a
                # stream that is flowing runs to its end, watched by the upstream read timeout between chunks.
                job.scope.deadline = math.inf
            started = Started(
                status=status, headers=headers, attempts=job.attempts, queued=self._timings(job).queued, streaming=True
            )
            self._report(owner, job.request_id, started)
        relay_started = trio.current_time()
        try:
            with trio.move_on_after(RELAY_STALL_TIMEOUT - job.relay_waited) as waiting:
                await owner.relay(job.request_id, chunk)
        except Exception:
            # The front failed to take a chunk: this request ends (internal_error, which cancels this
            # attempt); the engine and the other requests go on.
            self._internal_error(job, "relaying a chunk of")
            return
        job.relay_waited += trio.current_time() - relay_started
        if waiting.cancelled_caught:
            # The client has kept the stream waiting that long: it would hold a concurrency slot (and the
            # upstream's generation) for as long as it keeps the connection open, at everyone else's expense.
            self._finish_error(
                job,
                ErrorKind.TIMEOUT,
                f"the client kept this stream waiting for it to read for {RELAY_STALL_TIMEOUT:.0f}s in all, so the "
                "engine ended it to free its upstream slot; read streams as they come",
            )

    def _settle(
        self,
        job: Job,
        reservation: Reservation,
        reply: UpstreamReply | None,
        failure: Exception | None,
        *,
        cancelled: bool,
    ) -> None:
        """Reconcile the budget with what the upstream said, then answer or retry the job."""
        lane = job.lane
        if reply is None and failure is None:  # cancelled: by the client, shutdown (already answered) or deadline
            lane.budget.reconcile(reservation, prompt_tokens=None, snapshot=None)
            if cancelled:
                self._expire(job, "while the upstream was still answering (the client has given up on it)")
            return
        usage = self._plausible(lane, reply.usage()) if reply is not None else None
        prompt_tokens = usage.prompt if usage is not None else None
        lane.budget.reconcile(
            reservation,
            prompt_tokens=prompt_tokens,
            snapshot=RateLimitSnapshot.from_headers(reply.headers) if reply is not None else None,
        )
        if prompt_tokens is not None:
            lane.estimated_prompt_tokens += job.estimate.prompt_tokens
            lane.actual_prompt_tokens += prompt_tokens
            self._spend(job.tenant, prompt_tokens - job.estimate.prompt_tokens)
        if usage is not None:
            cost = self._prices.cost(job.lane.name, usage.prompt, usage.completion)
            self._spend(job.tenant, 0, cost - job.estimated_cost)
            job.estimated_cost = 0.0  # replaced: another attempt's usage is charged in full
        verdict: Verdict
        if reply is not None and reply.streamed_error is not None:
            verdict = classify_stream_error(reply.streamed_error)
        elif reply is not None:
            # A success is classified by its status alone: its body is not decoded here (see ReplyBody).
            body = None if 200 <= reply.status < 300 or reply.streamed else reply.body.decoded()
            verdict = classify_response(reply.status, reply.headers, body)
        else:
            assert failure is not None
            verdict = classify_exception(failure)
        self._conclude(job, verdict, reply)

    def _plausible(self, lane: Lane, usage: Usage | None) -> Usage | None:
        """The usage, each count no larger than the lane's whole per-minute token limit.

        No reply can use more: the upstream refuses a request that large, as the engine does at intake. One
        that says so anyway (a broken OpenAI-compatible server, a proxy) put the lane a billion tokens in
        debt, so that every later request for the model waited until its deadline, and the tenant's daily
        budget with it. Charged as the limit, such a reply costs the lane at most a minute.
        """
        if usage is None:
            return None
        _, tpm = self._lane_limits(lane.name)
        if max(usage.prompt or 0, usage.completion or 0) <= tpm:
            return usage
        lane.implausible_usage += 1
        if lane.implausible_usage % IMPLAUSIBLE_USAGE_LOG_EVERY == 1:
            log.warning(
                "lane %s: the upstream said a reply used %s prompt and %s completion tokens, more than the "
                "lane's whole per-minute limit (%d); each is counted as that limit (%d such replies so far)",
                lane.name,
                usage.prompt,
                usage.completion,
                tpm,
                lane.implausible_usage,
            )
        return Usage(
            None if usage.prompt is None else min(usage.prompt, tpm),
            None if usage.completion is None else min(usage.completion, tpm),
        )

    def _conclude(self, job: Job, verdict: Verdict, reply: UpstreamReply | None) -> None:
        lane = job.lane
        if job.finished:
            return
        if isinstance(verdict, Success):
            assert reply is not None
            return self._finish_result(job, reply)
        if isinstance(verdict, FinalFailure):
            if reply is not None and reply.streamed_error is not None:
                # Its 200 and empty body do not describe the failure. The stream's own last event told the client
                # when the client raises at it; when not, the front ends the stream with its own error.
                return self._finish_error(job, verdict.kind, verdict.message, error_relayed=reply.streamed_error_shown)
            return self._finish_error(job, verdict.kind, verdict.message, reply)
        if job.committed:
            # Part of the reply is with the client: another attempt would send it a second, different start.
            reason = verdict.reason
            kind = verdict.exhausted_kind if isinstance(verdict, BackoffRetry) else ErrorKind.UPSTREAM_ERROR
            return self._finish_error(
                job,
                kind,
                f"the upstream's stream broke after it had started ({reason}); the reply is incomplete, and it "
                "was not retried because part of it had reached the client. Submit it again",
            )

        wait: float
        if isinstance(verdict, RateLimitRetry):
            lane.upstream_429s += 1
            job.rate_limited_attempts += 1
            # A wait beyond what we honour (a daily limit's hour, a proxy's wild header) pauses the lane for
            # the longest we honour; if the 429s go on, the request waits on until its deadline.
            pause = verdict.wait if verdict.wait is None else min(verdict.wait, MAX_HONOURED_WAIT)
            lane.budget.pause(pause, verdict.scope)
            log.info(
                "lane %s paused %.3fs after a 429 (%s budget) on %s",
                lane.name,
                pause or 0.0,
                verdict.scope or "unknown",
                job.log_label,
            )
            wait = 0.0  # the lane's pause delays it; the retry goes first once the lane resumes
        else:
            assert isinstance(verdict, BackoffRetry)
            wait = backoff_delay(job.fault_attempts, hint=verdict.wait_hint, rng=self._rng)

        job.last_failure = verdict.reason
        if self._closing:
            return self._finish_error(
                job,
                ErrorKind.SHUTTING_DOWN,
                f"the engine is shutting down and did not retry (last answer: {verdict.reason}); resubmit",
                reply,
            )
        if isinstance(verdict, BackoffRetry) and job.fault_attempts >= job.max_attempts:
            failure = exhausted(verdict, attempts=job.fault_attempts)
            return self._finish_error(job, failure.kind, failure.message, reply)
        due = trio.current_time() + wait
        if due >= job.deadline:
            return self._finish_error(
                job,
                ErrorKind.TIMEOUT,
                f"the request's time ({job.deadline - job.received_at:.3g}s) would run out before the next "
                f"attempt (last answer: {verdict.reason}); give it more time (a longer timeout or deadline)",
                reply,
            )
        lane.retries_made += 1
        self._set_state(job, JobState.RETRY_WAIT)
        self._retry_send.send_nowait((due, job))

    def _expire(self, job: Job, waiting_for: str, *, quiet: bool = False) -> None:
        """Answer ``timeout``, saying what the job was waiting for when its time ran out."""
        if not job.finished:
            detail = f", last answer: {job.last_failure}" if job.last_failure else ""
            # In flight, it had until the client gives up; waiting, until the deadline.
            ran_out = job.gives_up_at if job.state is JobState.IN_FLIGHT else job.deadline
            self._finish_error(
                job,
                ErrorKind.TIMEOUT,
                f"the request's time ({ran_out - job.received_at:.3g}s) ran out {waiting_for}, after "
                f"{job.attempts} upstream attempt(s){detail}; give it more time (a longer timeout or deadline)",
                quiet=quiet,
            )

    async def _retry_timer(self) -> None:
        """The retry channel's consumer: holds waiting retries and puts each back in its lane when due."""
        waiting = self._retry_waiting
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
                    try:
                        self._set_state(job, JobState.QUEUED)
                        job.lane.push_front(job)
                    except Exception:
                        self._internal_error(job, "requeueing")

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
            expired = 0
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, job = heapq.heappop(self._deadlines)
                if job.state in {JobState.QUEUED, JobState.RETRY_WAIT}:
                    expired += 1
                    quiet = expired > TIMEOUT_LINES_PER_PASS
                    try:
                        if job.state is JobState.RETRY_WAIT:
                            self._expire(job, "while it waited to retry", quiet=quiet)
                        else:
                            self._expire(job, f"while it waited in model {job.lane.name!r}'s queue", quiet=quiet)
                    except Exception:
                        self._internal_error(job, "expiring")
                    if expired % JOBS_PER_CHECKPOINT == 0:
                        await trio.lowlevel.checkpoint()
            if expired > TIMEOUT_LINES_PER_PASS:
                log.warning(
                    "%d more requests failed: timeout: their time ran out while they waited (the first %d are "
                    "logged above)",
                    expired - TIMEOUT_LINES_PER_PASS,
                    TIMEOUT_LINES_PER_PASS,
                )

    # --- shutdown ------------------------------------------------------------------------------------------

    async def shutdown(self, grace_period: float) -> None:
        """Refuse new work, answer waiting jobs ``shutting_down``, give in-flight ones ``grace_period``."""
        self._closing = True
        waiting = [job for job in self._all_jobs() if job.state is not JobState.IN_FLIGHT]
        for job in waiting:
            self._finish_error(job, ErrorKind.SHUTTING_DOWN, "the engine is shutting down; resubmit later")
        in_flight = self._outstanding
        log.info(
            "shutting down: answered %d waiting requests 'shutting_down'; giving %d in flight up to %gs",
            len(waiting),
            in_flight,
            grace_period,
        )
        with self._grace:
            self._grace.relative_deadline = grace_period
            await self._all_done.wait()
        unfinished = list(self._all_jobs())
        for job in unfinished:
            self._finish_error(
                job,
                ErrorKind.SHUTTING_DOWN,
                f"the engine shut down {SHUTDOWN_CUT_STREAM if job.committed else SHUTDOWN_NO_ANSWER}; "
                "the upstream may have processed it",
            )
        if unfinished:
            log.warning("cancelled %d requests still in flight at the end of the grace period", len(unfinished))
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _all_jobs(self) -> list[Job]:
        return [job for jobs in self._owners.values() for job in jobs.values()]

    def end_grace_period(self) -> None:
        """Stop waiting for in-flight requests (a second signal)."""
        self._grace.cancel()

    # --- statistics ----------------------------------------------------------------------------------------

    def client_statistics(self) -> dict[str, dict[str, int]]:
        """Outstanding requests per client identity, by state."""
        return {
            identity: {
                "queued": counts[JobState.QUEUED] + counts[JobState.RESERVING],
                "retry_wait": counts[JobState.RETRY_WAIT],
                "in_flight": counts[JobState.IN_FLIGHT],
            }
            for identity, counts in self._identities.items()
        }

    def statistics(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        limiter = self.limiter.statistics()
        engine: dict[str, Any] = {
            "outstanding": self._outstanding,
            "in_flight": limiter.borrowed_tokens,
            "max_concurrent_reqs": limiter.total_tokens,
            "waiting_for_slot": limiter.tasks_waiting,
            "max_queued": self._max_queued,
            "queued_bytes": self._queued_bytes,
            "max_queued_bytes": self.max_queued_bytes,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "internal_errors": self.internal_errors,
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
                "implausible_usage": lane.implausible_usage,
                "budget": attrs.asdict(budget) if budget is not None else {},
                "tenants_queued": lane.waiting.statistics(),
            }
        engine["tenants"] = self.tenant_statistics()
        return engine, lanes
