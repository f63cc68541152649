"""The engine's recent past for the status page (``GET /status.json``): its lanes and tenants sampled every
`INTERVAL` seconds into a ring buffer covering the last `WINDOW` seconds, in the engine's memory only.

Each sample reads the statistics the ``stats`` reply shows, so the page agrees with ``trio-mapper status`` and
``/metrics``; what a snapshot cannot show is derived between samples: 429s and retries are the lane counters'
increase since the previous sample, a tenant's tokens the increase of its spending over the last 24 hours.
Queue waits come from the scheduler's observer (as for the metrics' histograms): the longest and the mean wait
of the requests each lane answered during the interval.

Memory is bounded twice: at most `MAX_SAMPLES` samples (and none older than `WINDOW`), and per sample at most
`MAX_CHARTED_LANES` lanes — the busiest — leaving out lanes at rest (nothing used, queued, sent or refused),
which is most of them on most engines. Tenants come from the configuration, so they are few.

This module imports nothing of the engine: it knows the statistics by their shape and a finished job by the
`FinishedJob` protocol, and the daemon wires it in, as it does the metrics.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import attrs
import msgspec
import trio

log = logging.getLogger("trio_mapper.status")

#: Seconds between samples: the page polls at this pace, and a sample costs one read of the statistics.
INTERVAL: Final = 2.0
#: Seconds of history kept: enough to see a burst, its 429s and the queue draining; not a metrics store.
WINDOW: Final = 15 * 60.0
#: One sample per interval over the window.
MAX_SAMPLES: Final = round(WINDOW / INTERVAL)
#: Lanes kept per sample, the busiest first. A real engine has a handful; the scheduler allows 256, whose
#: history would cost tens of MB and a status.json too large to poll every 2 s.
MAX_CHARTED_LANES: Final = 32

#: An operational route's answer, as the HTTP front takes it: status, content type, body.
Reply = tuple[int, str, bytes]
#: The engine's and its lanes' statistics, as the ``stats`` reply has them (`Engine.statistics`).
Statistics = Callable[[], tuple[Mapping[str, Any], Mapping[str, Mapping[str, Any]]]]

#: What of the engine's statistics the page shows: no paths, no base URL, no pid.
_ENGINE_FIELDS: Final = (
    "version", "uptime", "outstanding", "in_flight", "max_concurrent_reqs", "max_queued", "accepted", "rejected",
    "closing", "ledger_mode",
)  # fmt: skip
_BUDGET_FIELDS: Final = ("backend", "state", "engines", "failure_policy")
_LANE_FIELDS: Final = ("queued", "retry_wait", "in_flight", "succeeded", "failed", "upstream_429s", "retries")
_LANE_BUDGET_FIELDS: Final = (
    "mode", "token_capacity", "tokens_used", "tokens_available", "request_capacity", "requests_used",
    "requests_available", "pause_remaining", "learned_rpm", "learned_tpm",
)  # fmt: skip
_TENANT_FIELDS: Final = ("priority", "weight", "rpm_cap", "tpm_cap", "daily_tokens", "tokens_24h", "queued")

_encoder: Final = msgspec.json.Encoder()


class FinishedJob(Protocol):
    """What the history needs of each finished job (`JobRecord`)."""

    @property
    def lane(self) -> str: ...
    @property
    def queued(self) -> float: ...


@attrs.frozen
class LaneSample:
    """One lane at one sample: its budget, its queue, and what happened since the previous sample."""

    tokens_used: float
    token_capacity: float
    requests_used: float
    request_capacity: float
    queued: int
    retry_wait: int
    in_flight: int
    #: Increases of the lane's counters over the interval.
    upstream_429s: int
    retries: int
    #: Requests the lane answered during the interval, and their longest and summed queue waits (seconds).
    answered: int
    longest_wait: float
    total_wait: float
    paused: bool

    @property
    def at_rest(self) -> bool:
        return not (
            self.tokens_used > 0
            or self.requests_used > 0
            or self.queued
            or self.retry_wait
            or self.in_flight
            or self.upstream_429s
            or self.retries
            or self.answered
            or self.paused
        )

    @property
    def busy(self) -> tuple[int, float]:
        """Sort key: the lanes with the most requests outstanding, then the most budget used, come first."""
        used = self.tokens_used / self.token_capacity if self.token_capacity > 0 else 0.0
        return self.queued + self.retry_wait + self.in_flight, used


@attrs.frozen
class TenantSample:
    #: Tokens the tenant's spending over the last 24 hours grew by during the interval (never negative: what
    #: ages out of the 24 hours is not a refund).
    tokens: int
    queued: int


@attrs.frozen
class Sample:
    #: `trio.current_time()` when taken; ``elapsed`` since the previous sample (`INTERVAL` for the first).
    at: float
    elapsed: float
    #: Seconds since the epoch, for the page's time axis.
    wall: float
    lanes: Mapping[str, LaneSample]
    tenants: Mapping[str, TenantSample]


@attrs.define
class _Waits:
    answered: int = 0
    longest: float = 0.0
    total: float = 0.0


class StatusHistory:
    """Samples the engine's statistics into a bounded ring buffer; `respond` serves ``GET /status.json``.

    Args:
        statistics: the engine's and its lanes' statistics (``({}, {})`` before the scheduler exists).
        wall_clock: seconds since the epoch, for labels only (every interval is measured on Trio's clock).
    """

    def __init__(
        self,
        *,
        statistics: Statistics,
        interval: float = INTERVAL,
        window: float = WINDOW,
        max_lanes: int = MAX_CHARTED_LANES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._statistics = statistics
        self.interval = interval
        self.window = window
        self._max_lanes = max_lanes
        self._wall_clock = wall_clock
        self.samples: deque[Sample] = deque(maxlen=max(1, round(window / interval)))
        #: The counters as last read, to take their increase: every lane's (at most the scheduler's 256), not
        #: only the charted ones, and each tenant's 24-hour spending.
        self._lane_counters: dict[str, tuple[int, int]] = {}
        self._tenant_tokens: dict[str, int] = {}
        self._waits: dict[str, _Waits] = {}
        self._last_at: float | None = None

    def observe(self, job: FinishedJob) -> None:
        """The scheduler's observer (beside the metrics'): one finished job's queue wait."""
        waits = self._waits.get(job.lane)
        if waits is None:
            if len(self._waits) >= 4 * self._max_lanes:
                return  # more lanes answered within one interval than are ever charted: the rest wait for the next
            waits = self._waits[job.lane] = _Waits()
        waits.answered += 1
        waits.longest = max(waits.longest, job.queued)
        waits.total += job.queued

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample every ``interval`` seconds until cancelled. A late wake-up (a busy event loop) delays the next
        samples rather than taking several at once."""
        task_status.started()
        due = trio.current_time()
        while True:
            try:
                self.sample()
            except Exception:
                # A bug here costs the page its history, never the engine its service.
                log.exception("status history: sampling failed")
            due = max(due + self.interval, trio.current_time())
            await trio.sleep_until(due)

    def sample(self) -> Sample:
        """Read the statistics once and append what they show."""
        now = trio.current_time()
        engine, lanes = self._statistics()
        elapsed = now - self._last_at if self._last_at is not None else self.interval
        first = self._last_at is None
        self._last_at = now
        waits, self._waits = self._waits, {}
        charted: dict[str, LaneSample] = {}
        counters: dict[str, tuple[int, int]] = {}
        for name, lane in lanes.items():
            counters[name] = (int(lane.get("upstream_429s", 0)), int(lane.get("retries", 0)))
            # A lane new since the previous sample counted from 0 in between; on the first sample there is no
            # "in between": its counters are the baseline.
            before = counters[name] if first else self._lane_counters.get(name, (0, 0))
            sample = _lane_sample(lane, before, waits.get(name, _Waits()))
            if not sample.at_rest:
                charted[name] = sample
        self._lane_counters = counters
        if len(charted) > self._max_lanes:
            busiest = sorted(charted, key=lambda name: charted[name].busy, reverse=True)[: self._max_lanes]
            charted = {name: charted[name] for name in sorted(busiest)}
        tenants: dict[str, TenantSample] = {}
        spending: dict[str, int] = {}
        for name, tenant in (engine.get("tenants") or {}).items():
            spending[name] = int(tenant.get("tokens_24h", 0))
            before_tokens = self._tenant_tokens.get(name, spending[name])  # a tenant new (a reload): no spike
            tenants[name] = TenantSample(
                tokens=max(0, spending[name] - before_tokens), queued=int(tenant.get("queued", 0))
            )
        self._tenant_tokens = spending
        taken = Sample(at=now, elapsed=elapsed, wall=self._wall_clock(), lanes=charted, tenants=tenants)
        self.samples.append(taken)
        while self.samples and self.samples[0].at < now - self.window:
            self.samples.popleft()
        return taken

    def snapshot(self) -> dict[str, Any]:
        """The engine now and its history, as ``/status.json`` has them: the history is columnar (one list per
        series, aligned on ``history.time``), as charts take it. A lane absent from a sample was at rest (0); one
        at rest over the whole window has no history at all, only its current figures."""
        engine, lanes = self._statistics()
        samples = list(self.samples)
        lane_names = sorted({name for sample in samples for name in sample.lanes})
        tenant_names = list(engine.get("tenants") or {})
        tenant_names += sorted({name for sample in samples for name in sample.tenants} - set(tenant_names))
        budget = engine.get("budget") or {}
        shown = {key: engine[key] for key in _ENGINE_FIELDS if key in engine}
        shown["budget"] = {key: budget[key] for key in _BUDGET_FIELDS if key in budget}
        if isinstance(engine.get("reloads"), Mapping):
            shown["reloads"] = _reloads(engine["reloads"])
        return {
            "interval": self.interval,
            "window": self.window,
            "engine": shown,
            "lanes": {name: _lane_now(lane) for name, lane in sorted(lanes.items())},
            "tenants": {
                name: {key: tenant.get(key) for key in _TENANT_FIELDS}
                for name, tenant in (engine.get("tenants") or {}).items()
            },
            "history": {
                "time": [round(sample.wall, 3) for sample in samples],
                "lanes": {name: _lane_columns(name, samples) for name in lane_names},
                "tenants": {name: _tenant_columns(name, samples) for name in tenant_names},
            },
        }

    async def respond(self) -> Reply:
        """``GET /status.json``."""
        return 200, "application/json", _encoder.encode(self.snapshot())


def _reloads(reloads: Mapping[str, Any]) -> dict[str, Any]:
    """How the reloads went, as the ``STATUS=`` line tells it (`Reloads.status`): the counts, the last failure's
    time and reason, and the settings not applied by name. The reason is the one ``STATUS=`` shows, which counts
    a bad file's problems and never quotes them (a problem may quote a value of the file); the problems
    themselves are only in the log."""
    failure = reloads.get("failure")
    return {
        "applied": reloads.get("applied", 0),
        "failed": reloads.get("failed", 0),
        "succeeded_at": reloads.get("succeeded_at"),
        "failure": (
            {"at": failure.get("at"), "reason": failure.get("reason")} if isinstance(failure, Mapping) else None
        ),
        "not_applied": list(reloads.get("not_applied") or ()),
    }


def _lane_sample(lane: Mapping[str, Any], before: tuple[int, int], waits: _Waits) -> LaneSample:
    budget = lane.get("budget") or {}
    upstream_429s, retries = int(lane.get("upstream_429s", 0)), int(lane.get("retries", 0))
    # A counter that went down belongs to a lane dropped and created again: all of it is new.
    return LaneSample(
        tokens_used=float(budget.get("tokens_used", 0.0)),
        token_capacity=float(budget.get("token_capacity", 0.0)),
        requests_used=float(budget.get("requests_used", 0.0)),
        request_capacity=float(budget.get("request_capacity", 0.0)),
        queued=int(lane.get("queued", 0)),
        retry_wait=int(lane.get("retry_wait", 0)),
        in_flight=int(lane.get("in_flight", 0)),
        upstream_429s=upstream_429s - before[0] if upstream_429s >= before[0] else upstream_429s,
        retries=retries - before[1] if retries >= before[1] else retries,
        answered=waits.answered,
        longest_wait=waits.longest,
        total_wait=waits.total,
        paused=float(budget.get("pause_remaining", 0.0)) > 0,
    )


def _lane_now(lane: Mapping[str, Any]) -> dict[str, Any]:
    budget = lane.get("budget") or {}
    now: dict[str, Any] = {key: lane[key] for key in _LANE_FIELDS if key in lane}
    now["budget"] = {key: budget[key] for key in _LANE_BUDGET_FIELDS if key in budget}
    for kind in ("effective", "configured"):
        limits = budget.get(kind) or {}
        now["budget"][kind] = {"rpm": limits.get("rpm"), "tpm": limits.get("tpm")}
    now["tenants_queued"] = dict(lane.get("tenants_queued") or {})
    return now


def _fraction(used: float, capacity: float) -> float:
    return round(used / capacity, 4) if capacity > 0 else 0.0


def _lane_columns(name: str, samples: list[Sample]) -> dict[str, list[float]]:
    rest = LaneSample(0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, False)
    rows = [sample.lanes.get(name, rest) for sample in samples]
    return {
        "tokens_used": [round(row.tokens_used, 1) for row in rows],
        "tokens_fraction": [_fraction(row.tokens_used, row.token_capacity) for row in rows],
        "requests_used": [round(row.requests_used, 2) for row in rows],
        "requests_fraction": [_fraction(row.requests_used, row.request_capacity) for row in rows],
        "queued": [row.queued for row in rows],
        "retry_wait": [row.retry_wait for row in rows],
        "in_flight": [row.in_flight for row in rows],
        "upstream_429s": [row.upstream_429s for row in rows],
        "retries": [row.retries for row in rows],
        "longest_wait": [round(row.longest_wait, 3) for row in rows],
        "mean_wait": [round(row.total_wait / row.answered, 3) if row.answered else 0.0 for row in rows],
    }


def _tenant_columns(name: str, samples: list[Sample]) -> dict[str, list[float]]:
    rows = [(sample.tenants.get(name), sample.elapsed) for sample in samples]
    return {
        "tokens": [row.tokens if row is not None else 0 for row, _ in rows],
        "tokens_per_minute": [
            round(row.tokens * 60 / elapsed, 1) if row is not None and elapsed > 0 else 0.0 for row, elapsed in rows
        ],
        "queued": [row.queued if row is not None else 0 for row, _ in rows],
    }
