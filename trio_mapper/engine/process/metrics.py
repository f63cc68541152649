"""What operators watch: the engine's Prometheus metrics (``GET /metrics``) and its health checks (``/healthz``,
``/readyz``), served by the HTTP front through the routes the daemon gives it.

The metrics live in the engine's own `CollectorRegistry`, never prometheus_client's global one: nothing else
in the process (a library, a second engine in a test) can add series to it or collide with it. They come
two ways:

- **read at scrape time** from the statistics the ``stats`` reply shows (queues, the budget, the counters the
  scheduler and the HTTP front keep): nothing is counted twice, nothing costs anything between scrapes, and
  the numbers always agree with ``trio-mapper status``;
- **fed by the scheduler's observer** as each job finishes: the latency histograms and the per-client
  counters, which need every job rather than a snapshot.

Label values are bounded: lanes are model families, at most the scheduler's ``MAX_LANES`` at once, and the
series of a lane the scheduler dropped go with it; identities are uids and client-key names (never a
connection or a request); tenants come from the configuration. Beyond a cap, newcomers are counted under
``(other)``, so no client can make the exposition grow without bound. Nothing the engine holds as a secret is
in any statistic read here.

This module imports nothing of the engine: it knows the statistics by their shape and a finished job by the
`FinishedJob` protocol, and the daemon wires it in (the layers stay acyclic).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, Protocol

import attrs
import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("trio_mapper.metrics")

NAMESPACE: Final = "trio_mapper"
#: Client identities with series of their own; later ones are counted under `OTHER`. Identities are uids and
#: client-key names, so a real engine stays far below it: this is a safety net.
MAX_IDENTITIES: Final = 1024
#: Tenants with series of their own, in the configuration's order; the rest are summed under `OTHER`. Tenants
#: come from the operator's config file, so this too is only a safety net.
MAX_TENANTS: Final = 256
#: The label value that stands for every value beyond a cap (parentheses: no model or identity looks like it).
OTHER: Final = "(other)"
#: Seconds from acceptance to the first dispatch: the queue can be instant or wait out a paused lane.
QUEUE_WAIT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Seconds spent in upstream calls: an embedding takes tens of milliseconds, a long completion minutes.
UPSTREAM_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

#: An operational route's answer, as the HTTP front takes it: status, content type, body.
Reply = tuple[int, str, bytes]
#: The engine's and its lanes' statistics, as the ``stats`` reply has them (`Engine.statistics`).
Statistics = Callable[[], tuple[Mapping[str, Any], Mapping[str, Mapping[str, Any]]]]
#: Outstanding requests per client identity, by state (`Scheduler.client_statistics`).
ClientStatistics = Callable[[], Mapping[str, Mapping[str, int]]]


class FinishedJob(Protocol):
    """What the scheduler's observer reports of each finished job (`JobRecord`)."""

    @property
    def lane(self) -> str: ...
    @property
    def identity(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def rate_limited_attempts(self) -> int: ...
    @property
    def queued(self) -> float: ...
    @property
    def upstream(self) -> float: ...
    @property
    def charged_tokens(self) -> int: ...


#: (name, help, key) of series read from the engine's statistics.
_ENGINE_GAUGES: Final = (
    ("outstanding_requests", "Requests accepted and not answered yet, every lane.", "outstanding"),
    ("in_flight_requests", "Requests holding one of the max_concurrent_reqs slots (sent upstream).", "in_flight"),
    ("max_concurrent_requests", "The max_concurrent_reqs setting.", "max_concurrent_reqs"),
    ("max_queued_requests", "The max_queued setting: beyond it requests are answered overloaded.", "max_queued"),
    ("queued_request_bytes", "Bytes of request bodies the outstanding requests hold.", "queued_bytes"),
    (
        "max_queued_request_bytes",
        "The max_queued_bytes setting: beyond it requests are answered overloaded.",
        "max_queued_bytes",
    ),
    ("msgpack_connections", "Open connections on the msgpack socket.", "connections"),
    ("http_connections", "Open connections on the HTTP front's sockets.", "http_connections"),
    (
        "msgpack_receiving_bytes",
        "Declared bytes of large msgpack frames being received (16 x max_frame_bytes at most).",
        "receiving_bytes",
    ),
    ("msgpack_frames_waiting", "Large msgpack frames waiting, unread, for room in that total.", "receiving_waiting"),
    (
        "unsent_reply_bytes",
        "Bytes of replies not yet written to their clients, both fronts together (msgpack queues, HTTP writes).",
        "unsent_reply_bytes",
    ),
    (
        "max_unsent_reply_bytes",
        "The bound on unsent_reply_bytes past which the client holding the most is cut.",
        "max_unsent_reply_bytes",
    ),
)
_ENGINE_COUNTERS: Final = (
    ("accepted_requests", "Requests accepted into a lane, both fronts.", "accepted"),
    ("rejected_requests", "Requests answered at once, never queued (invalid, too large, overloaded...).", "rejected"),
    ("internal_errors", "Engine bugs that cost a request an internal_error (each one is logged).", "internal_errors"),
)
_HTTP_COUNTERS: Final = (
    ("http_requests", "API requests to the HTTP front (/metrics, /healthz and /readyz not counted).", "requests"),
    ("http_unauthorized", "HTTP requests refused for a missing or unknown client key (TCP).", "unauthorized"),
    ("http_not_found", "HTTP requests for a path the engine does not serve.", "not_found"),
    ("http_sdk_retries", "HTTP requests the SDK sent again on its own (x-stainless-retry-count > 0).", "sdk_retries"),
    ("http_disconnects", "HTTP clients that went away before their answer (their requests withdrawn).", "disconnected"),
)
_LANE_GAUGES: Final = (
    ("lane_queued_requests", "Requests waiting in the lane, for their turn or for budget.", "queued"),
    ("lane_retry_wait_requests", "Requests waiting out a backoff before their next attempt.", "retry_wait"),
    ("lane_in_flight_requests", "Requests of the lane being sent upstream.", "in_flight"),
)
_LANE_COUNTERS: Final = (
    ("lane_succeeded_requests", "Requests of the lane answered with the upstream's success.", "succeeded"),
    ("lane_failed_requests", "Requests of the lane answered with an error (cancellations included).", "failed"),
    ("lane_upstream_429s", "Retryable 429 answers from the upstream; each paused the lane.", "upstream_429s"),
    ("lane_retries", "Attempts scheduled again after a 429 or a fault.", "retries"),
    ("lane_estimated_prompt_tokens", "Prompt tokens estimated, of replies reporting usage.", "estimated_prompt_tokens"),
    ("lane_actual_prompt_tokens", "Prompt tokens the upstream reported, same replies.", "actual_prompt_tokens"),
)
#: (name, help, path in the lane's budget statistics); a None value (nothing learned) is left out.
_BUDGET_GAUGES: Final = (
    ("lane_limit_requests_per_minute", "Requests per minute in force: configured, lowered by what the upstream "
     "reported.", ("effective", "rpm")),
    ("lane_limit_tokens_per_minute", "Tokens per minute in force: configured, lowered by what the upstream "
     "reported.", ("effective", "tpm")),
    ("lane_configured_limit_requests_per_minute", "Requests per minute configured (--rpm, [models.NAME]).",
     ("configured", "rpm")),
    ("lane_configured_limit_tokens_per_minute", "Tokens per minute configured (--tpm, [models.NAME]).",
     ("configured", "tpm")),
    ("lane_learned_limit_requests_per_minute", "Pace learned from 429s, when the upstream sends no limit header.",
     ("learned_rpm",)),
    ("lane_learned_limit_tokens_per_minute", "Pace learned from 429s, when the upstream sends no limit header.",
     ("learned_tpm",)),
    ("lane_budget_capacity_requests", "Requests the budget lets through at once (its burst).", ("request_capacity",)),
    ("lane_budget_capacity_tokens", "Tokens the budget lets through at once (its burst).", ("token_capacity",)),
    ("lane_budget_used_requests", "Requests counted against the budget now.", ("requests_used",)),
    ("lane_budget_used_tokens", "Tokens counted against the budget now.", ("tokens_used",)),
    ("lane_budget_remaining_requests", "Requests the budget admits now; negative is debt.", ("requests_available",)),
    ("lane_budget_remaining_tokens", "Tokens the budget admits now; negative is debt.", ("tokens_available",)),
    ("lane_pause_remaining_seconds", "Seconds left of the lane's pause after a 429.", ("pause_remaining",)),
    ("lane_prompt_estimate_correction_ratio", "Factor applied to prompt estimates (actual / estimated).",
     ("correction",)),
)  # fmt: skip
_CLIENT_GAUGES: Final = (
    ("client_queued_requests", "The client's requests waiting in a lane.", "queued"),
    ("client_retry_wait_requests", "The client's requests waiting out a backoff.", "retry_wait"),
    ("client_in_flight_requests", "The client's requests being sent upstream.", "in_flight"),
)

#: (name, help, key) of each tenant's series, read from ``engine.tenants`` (`Scheduler.tenant_statistics`).
_TENANT_GAUGES: Final = (
    ("tenant_tokens_24h", "Tokens the tenant spent over the last 24 hours (charged at dispatch, corrected by "
     "the upstream's usage).", "tokens_24h"),
    ("tenant_cost_24h", "What the tenant spent over the last 24 hours by the price table (0 without one).",
     "cost_24h"),
    ("tenant_queued", "The tenant's requests waiting in the lanes' fair queues, every lane.", "queued"),
    ("tenant_daily_tokens_budget", "The tenant's daily_tokens: past it its requests fail budget_exhausted "
     "(tenants with a budget only).", "daily_tokens"),
)  # fmt: skip


def _name(suffix: str) -> str:
    return f"{NAMESPACE}_{suffix}"


@attrs.define
class _LabelValues:
    """The values one label has taken, at most ``limit``: later newcomers are counted under `OTHER`."""

    limit: int
    values: set[str] = attrs.field(factory=set)

    def admit(self, value: str) -> str:
        if value in self.values:
            return value
        if len(self.values) >= self.limit:
            return OTHER
        self.values.add(value)
        return value


class EngineMetrics:
    """The engine's metrics. `observe` is the scheduler's observer; `respond` serves ``GET /metrics``.

    Args:
        statistics: the engine's and its lanes' statistics, read at each scrape.
        clients: outstanding requests per client identity, read at each scrape.
        max_lanes: the scheduler's cap on lanes: lane labels of the observed series stop there too.
        max_identities: the cap on identity labels.
        max_tenants: the cap on tenant labels.
    """

    def __init__(
        self,
        *,
        statistics: Statistics,
        clients: ClientStatistics,
        max_lanes: int,
        max_identities: int = MAX_IDENTITIES,
        max_tenants: int = MAX_TENANTS,
    ) -> None:
        self.registry = CollectorRegistry()
        self._max_tenants = max_tenants
        self._statistics = statistics
        self._clients = clients
        self._lanes = _LabelValues(max_lanes)
        self._identities = _LabelValues(max_identities)
        # Registered first so that a scrape reads the statistics (and drops the series of lanes that are gone)
        # before the histograms below are collected.
        self.registry.register(_Snapshot(self))
        registry = self.registry
        self._queue_wait = Histogram(
            _name("lane_queue_wait_seconds"),
            "Seconds from acceptance to the first attempt (to the answer, for a request never sent), per request.",
            ["lane"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self._upstream = Histogram(
            _name("lane_upstream_seconds"),
            "Seconds in upstream calls per request sent, all its attempts together.",
            ["lane"],
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        self._client_requests = Counter(
            _name("client_requests"),
            "The client's finished requests, by outcome (succeeded, or the error kind).",
            ["identity", "outcome"],
            registry=registry,
        )
        self._client_tokens = Counter(
            _name("client_charged_tokens"),
            "Tokens the client's requests were charged against the budget at admission.",
            ["identity"],
            registry=registry,
        )
        self._client_429s = Counter(
            _name("client_upstream_429s"),
            "Retryable 429 answers the client's requests met.",
            ["identity"],
            registry=registry,
        )
        self._client_retries = Counter(
            _name("client_retries"),
            "Attempts beyond the first for the client's requests.",
            ["identity"],
            registry=registry,
        )
        self._client_queue_wait = Counter(
            _name("client_queue_wait_seconds"),
            "Seconds the client's requests waited before their first attempt, summed (fairness between clients).",
            ["identity"],
            registry=registry,
        )
        # CPU, memory, open files of the engine's process, under the engine's prefix.
        ProcessCollector(namespace=NAMESPACE, registry=registry)

    def observe(self, job: FinishedJob) -> None:
        """The scheduler's observer: one finished job."""
        lane = self._lanes.admit(job.lane)
        identity = self._identities.admit(job.identity)
        self._queue_wait.labels(lane).observe(job.queued)
        if job.attempts:
            # A job never sent (cancelled or expired in the queue) has no upstream time to speak of.
            self._upstream.labels(lane).observe(job.upstream)
        self._client_requests.labels(identity, job.outcome).inc()
        self._client_tokens.labels(identity).inc(job.charged_tokens)
        self._client_429s.labels(identity).inc(job.rate_limited_attempts)
        self._client_retries.labels(identity).inc(max(0, job.attempts - 1))
        self._client_queue_wait.labels(identity).inc(job.queued)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def respond(self) -> Reply:
        """``GET /metrics``: the text exposition format. Rendered on the event loop, because the statistics are
        the scheduler's live state; it takes a few milliseconds even with hundreds of lanes."""
        return 200, CONTENT_TYPE_LATEST, self.render()

    def _read_statistics(self) -> Iterator[Metric]:
        engine, lanes = self._statistics()
        clients = self._clients()
        self._forget_lanes(lanes)
        yield from _engine_families(engine)
        yield from _tenant_families(engine.get("tenants") or {}, self._max_tenants)
        yield from _lane_families(lanes)
        yield from _client_families(clients, self._identities)

    def _forget_lanes(self, current: Mapping[str, object]) -> None:
        """Drop the observed series of lanes the scheduler dropped (an idle lane evicted to make room for
        another model): model names are the clients' choice, so their series must not pile up."""
        for lane in [lane for lane in self._lanes.values if lane not in current]:
            self._lanes.values.discard(lane)
            self._queue_wait.remove(lane)
            self._upstream.remove(lane)


class _Snapshot:
    """The collector of everything read from the engine's statistics at scrape time."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._read_statistics()


def _engine_families(engine: Mapping[str, Any]) -> Iterator[Metric]:
    info = GaugeMetricFamily(_name("build_info"), "The engine's version; always 1.", labels=["version"])
    if "version" in engine:
        info.add_metric([str(engine["version"])], 1)
    yield info
    for suffix, text, key in _ENGINE_GAUGES:
        gauge = GaugeMetricFamily(_name(suffix), text)
        if engine.get(key) is not None:  # None: a setting with no limit
            gauge.add_metric([], engine[key])
        yield gauge
    for suffix, text, key in _ENGINE_COUNTERS:
        counter = CounterMetricFamily(_name(suffix), text)
        if key in engine:
            counter.add_metric([], engine[key])
        yield counter
    http = engine.get("http_requests") or {}
    for suffix, text, key in _HTTP_COUNTERS:
        counter = CounterMetricFamily(_name(suffix), text)
        if key in http:
            counter.add_metric([], http[key])
        yield counter
    yield from _reload_families(engine.get("reloads"))
    budget = engine.get("budget") or {}
    if budget.get("backend") == "redis":
        # A shared budget whose Redis does not answer is the one state operators must be paged for.
        reachable = GaugeMetricFamily(
            _name("budget_redis_up"),
            "1 while the shared budget's Redis answers; 0 while the failure policy holds or shares locally.",
            labels=["failure_policy"],
        )
        reachable.add_metric([str(budget.get("failure_policy", ""))], 1 if budget.get("state") == "ok" else 0)
        yield reachable
        engines = GaugeMetricFamily(_name("budget_engines"), "Engines sharing the key's budget, by heartbeats.")
        engines.add_metric([], budget.get("engines", 0))
        yield engines
        kept = GaugeMetricFamily(
            _name("budget_kept_for_cut_off_engines"),
            "Share of the limits (0 to 1) this engine leaves to local-share engines that lost Redis.",
        )
        kept.add_metric([], budget.get("kept_for_cut_off_engines", 0.0))
        yield kept
        for suffix, text, key in (
            ("budget_redis_calls_total", "Lane script runs in Redis.", "calls"),
            ("budget_redis_failures_total", "Redis calls that failed or took longer than the timeout.", "failures"),
        ):
            counter = CounterMetricFamily(_name(suffix.removesuffix("_total")), text)
            counter.add_metric([], budget.get(key, 0))
            yield counter


def _reload_families(reloads: Mapping[str, Any] | None) -> Iterator[Metric]:
    # Named as Prometheus and Alertmanager name their own (prometheus_config_last_reload_successful...), so
    # that the alert rules operators already have for those read the same way here.
    if not reloads:
        return
    counter = CounterMetricFamily(
        _name("config_reloads"),
        "Reloads (SIGHUP), by result: failed kept the settings (or client keys) in force.",
        labels=["result"],
    )
    for result in ("applied", "failed"):
        counter.add_metric([result], reloads.get(result, 0))
    yield counter
    successful = GaugeMetricFamily(
        _name("config_last_reload_successful"), "1 unless the last reload failed (1 before the first)."
    )
    successful.add_metric([], 0 if reloads.get("failure") else 1)
    yield successful
    succeeded = GaugeMetricFamily(
        _name("config_last_reload_success_timestamp_seconds"),
        "When the settings in force were read: the start, or the last reload that succeeded (Unix time).",
    )
    succeeded.add_metric([], reloads.get("succeeded_at", 0))
    yield succeeded
    not_applied = GaugeMetricFamily(
        _name("config_settings_not_applied"),
        "Settings the files give that the engine does not run, after the last reload: changes that need a "
        "restart, values the command line or the environment overrides.",
    )
    not_applied.add_metric([], len(reloads.get("not_applied") or ()))
    yield not_applied


def _tenant_families(tenants: Mapping[str, Mapping[str, Any]], limit: int) -> Iterator[Metric]:
    # Read afresh at each scrape, so a tenant a reload removed leaves no series behind; the first ``limit`` in
    # the engine's order (the configuration's) have their own, the rest are summed under OTHER.
    labelled: dict[str, dict[str, float]] = {}
    for index, (name, tenant) in enumerate(tenants.items()):
        if not isinstance(tenant, Mapping):
            continue
        values = labelled.setdefault(str(name) if index < limit else OTHER, {})
        for _, _, key in _TENANT_GAUGES:
            value = tenant.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[key] = values.get(key, 0) + value
    for suffix, text, key in _TENANT_GAUGES:
        gauge = GaugeMetricFamily(_name(suffix), text, labels=["tenant"])
        for name, values in labelled.items():
            if key in values:
                gauge.add_metric([name], values[key])
        yield gauge


def _lane_families(lanes: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    for suffix, text, key in _LANE_GAUGES:
        gauge = GaugeMetricFamily(_name(suffix), text, labels=["lane"])
        for name, lane in lanes.items():
            if lane.get(key) is not None:
                gauge.add_metric([name], lane[key])
        yield gauge
    for suffix, text, key in _LANE_COUNTERS:
        counter = CounterMetricFamily(_name(suffix), text, labels=["lane"])
        for name, lane in lanes.items():
            if lane.get(key) is not None:
                counter.add_metric([name], lane[key])
        yield counter
    for suffix, text, path in _BUDGET_GAUGES:
        gauge = GaugeMetricFamily(_name(suffix), text, labels=["lane"])
        for name, lane in lanes.items():
            value: Any = lane.get("budget") or None
            for step in path:
                value = value.get(step) if isinstance(value, Mapping) else None
            if value is not None:
                gauge.add_metric([name], value)
        yield gauge


def _client_families(clients: Mapping[str, Mapping[str, int]], known: _LabelValues) -> Iterator[Metric]:
    # Every identity seen so far has its series, at 0 when idle, so that a graph shows "nothing waiting"
    # rather than a gap; those beyond the cap are summed under OTHER.
    states: dict[str, dict[str, int]] = {identity: {} for identity in known.values}
    for identity, counts in clients.items():
        totals = states.setdefault(known.admit(identity), {})
        for key, count in counts.items():
            totals[key] = totals.get(key, 0) + count
    for suffix, text, key in _CLIENT_GAUGES:
        gauge = GaugeMetricFamily(_name(suffix), text, labels=["identity"])
        for identity, totals in states.items():
            gauge.add_metric([identity], totals.get(key, 0))
        yield gauge


# --- health -------------------------------------------------------------------------------------------------

#: An upstream exchange younger than this that got an answer says it is reachable: a busy engine never probes.
RECENT_CONTACT: Final = 30.0
#: A failure (to connect, in time) is trusted only this long, so that the upstream's return is seen soon;
#: it is also the least time between two probes, however often ``/readyz`` is asked.
RECHECK_AFTER_FAILURE: Final = 5.0
#: How long a probe may take: readiness checks come with short timeouts of their own.
PROBE_TIMEOUT: Final = 2.0

_encoder: Final = msgspec.json.Encoder()


class Contact(Protocol):
    """The upstream's most recent exchange (`Upstream.last_contact`)."""

    @property
    def at(self) -> float: ...
    @property
    def reachable(self) -> bool: ...
    @property
    def detail(self) -> str: ...
    @property
    def status(self) -> int | None: ...


#: What /readyz says when the upstream answers 401: every request would fail the same way.
KEY_REFUSED: Final = (
    "the upstream refused the engine's key (HTTP 401): check the key, and organization/project under [openai]"
)


@attrs.frozen
class _Verdict:
    at: float
    reachable: bool
    detail: str
    #: ``traffic`` (the engine's own requests) or ``probe``.
    source: str
    #: The HTTP status it answered with, when it did.
    status: int | None = None


async def healthz() -> Reply:
    """``GET /healthz``: the process serves HTTP, which is all that "alive" means."""
    return 200, "application/json", b'{"status": "ok"}'


class Readiness:
    """``GET /readyz``: whether the engine should be sent work — it is not shutting down, its upstream is
    reachable and takes its key, and its budget is there (a shared budget whose Redis is down holds every
    request under the ``wait`` policy).

    Reachability is judged from the engine's most recent upstream exchange (any HTTP answer, whatever its
    status, means reachable; a failure to connect or a timeout means not): a reachable verdict holds for
    `RECENT_CONTACT` seconds, an unreachable one for `RECHECK_AFTER_FAILURE`. Without a verdict that fresh,
    the check sends ``probe`` (the daemon's: ``GET /models`` through the upstream client, outside the budget),
    one at a time whoever asks, its result kept like any exchange's. So a busy engine never probes, and an idle
    one probes at most once every few seconds, however often it is asked.

    Args:
        shutting_down: the engine stopped accepting work.
        last_contact: the upstream client's most recent exchange (None before the first).
        probe: one cheap upstream request; returns the HTTP status, raises when there was none.
        budget_problem: why the budget cannot admit requests now, or None when it can.
    """

    def __init__(
        self,
        *,
        shutting_down: Callable[[], bool],
        last_contact: Callable[[], Contact | None],
        probe: Callable[[], Awaitable[int]],
        budget_problem: Callable[[], str | None] = lambda: None,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._shutting_down = shutting_down
        self._budget_problem = budget_problem
        self._last_contact = last_contact
        self._probe = probe
        self._probe_timeout = probe_timeout
        self._probed: _Verdict | None = None
        self._probing: trio.Event | None = None

    async def respond(self) -> Reply:
        ready, body = await self.check()
        return (200 if ready else 503), "application/json", _encoder.encode(body)

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """Whether the engine is ready, and a body that says why (or why not)."""
        if self._shutting_down():
            return False, {"status": "not_ready", "shutting_down": True, "upstream": None}
        verdict = await self._upstream()
        upstream = {
            "reachable": verdict.reachable,
            "checked_by": verdict.source,
            "seconds_ago": round(max(0.0, trio.current_time() - verdict.at), 3),
        }
        key_refused = verdict.reachable and verdict.status == 401
        if key_refused:
            upstream["detail"] = KEY_REFUSED
        elif verdict.detail:
            upstream["detail"] = verdict.detail
        body: dict[str, Any] = {"shutting_down": False, "upstream": upstream}
        ready = verdict.reachable and not key_refused
        if (budget_problem := self._budget_problem()) is not None:
            body["budget"] = budget_problem
            ready = False
        return ready, {"status": "ready" if ready else "not_ready", **body}

    async def _upstream(self) -> _Verdict:
        verdict = self._fresh()
        if verdict is not None:
            return verdict
        if self._probing is None:
            self._probing = probing = trio.Event()
            try:
                self._probed = await self._run_probe()
            finally:
                self._probing = None
                probing.set()
        else:
            await self._probing.wait()
        return self._fresh() or self._probed or _Verdict(trio.current_time(), False, "probe interrupted", "probe")

    def _fresh(self) -> _Verdict | None:
        """The newest verdict, traffic's or a probe's, if it is recent enough to trust."""
        contact = self._last_contact()
        candidates = (
            [_Verdict(contact.at, contact.reachable, contact.detail, "traffic", contact.status)]
            if contact is not None
            else []
        )
        if self._probed is not None:
            candidates.append(self._probed)
        if not candidates:
            return None
        newest = max(candidates, key=lambda verdict: verdict.at)  # traffic wins a tie
        trusted_for = RECENT_CONTACT if newest.reachable else RECHECK_AFTER_FAILURE
        return newest if trio.current_time() - newest.at <= trusted_for else None

    async def _run_probe(self) -> _Verdict:
        with trio.move_on_after(self._probe_timeout):
            try:
                status = await self._probe()
            except Exception as exc:
                # Only the class: the message of a connection error names the upstream's host.
                return _Verdict(trio.current_time(), False, type(exc).__name__, "probe")
            return _Verdict(trio.current_time(), True, f"HTTP {status}", "probe", status)
        return _Verdict(trio.current_time(), False, f"no answer within {self._probe_timeout:g}s", "probe")
