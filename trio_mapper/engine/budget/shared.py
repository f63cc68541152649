"""The budget shared by every engine on one API key, kept in Redis: a `RemoteMeter` per lane over one Lua script.

`SharedBudget` is one engine's side of it: the Redis client, the ledger's meter factory, and two tasks — the
settler, which sends refunds, settlements and pauses in the background (each idempotent by reservation id,
so a call retried after a lost reply changes nothing), and the heartbeat, which counts the engines sharing
the key. `SharedMeter` is one lane's meter. Admission (`charge`) is one round trip running
``shared_budget.lua``, which reads Redis's clock, refills, checks the pause and charges both dimensions or
neither. docs/ledger.md ("Shared budget") has the design; this module is its plumbing.

When Redis cannot be reached in time the engine follows its failure policy, says so once in the log and in
`status`: ``wait`` sends nothing until Redis answers again (requests wait within their deadlines), and
``local-share`` falls back to a local meter per lane with the limits divided by the number of engines seen
through heartbeats. Never the full limits on every engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import itertools
import logging
import math
import os
import posixpath
import random
import socket
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, final

import attrs
import coredis
import coredis.exceptions
import trio

from trio_mapper.engine.budget.interface import (
    Cost,
    LaneStatistics,
    Limits,
    Meter,
    Mode,
    Reservation,
    check_cost,
)
from trio_mapper.engine.budget.local import DEFAULT_PAUSE, LocalMeter
from trio_mapper.engine.upstream.ratelimit_headers import RateLimitSnapshot

log = logging.getLogger("trio_mapper.shared_budget")

FailurePolicy = Literal["wait", "local-share"]
FAILURE_POLICIES: Final[tuple[FailurePolicy, ...]] = ("wait", "local-share")
#: What admission does while Redis is unreachable (`SharedBudget.without_redis`): hold requests (the ``wait``
#: policy, or ``local-share`` before a heartbeat counted the engines, or while the others make room for this
#: one's share), or spend the local share.
WithoutRedis = Literal["wait", "uncounted", "making room", "local share"]
#: Seconds a reservation counts as in flight before the store stops waiting for its settlement: longer than
#: any request may take upstream (the default read timeout is 600 s), so only a dead engine's ones expire.
RESERVATION_TTL: Final = 900.0
#: A lane's state lives on this long after its last use; then the lane starts again from a cold start.
IDLE_EXPIRY: Final = 3600
#: Heartbeats: how often an engine says it is alive, and how long one counts. Often, because an engine cut off
#: from Redis waits for the others to notice (`LOCAL_SHARE_DELAY`); a heartbeat is one small script.
HEARTBEAT_INTERVAL: Final = 2.0
HEARTBEAT_SPAN: Final = 30.0
#: An engine whose last answered heartbeat is this old has lost Redis. A healthy engine's is up to two
#: intervals old (its score is the previous heartbeat's, acknowledged by the next); one more, and 2 s, for a
#: busy engine or Redis: a false alarm costs the others its share for a heartbeat, and a warning.
SILENT_AFTER: Final = 3 * HEARTBEAT_INTERVAL + 2.0
#: How long the engines in touch with Redis keep room for an engine of the ``local-share`` policy that went
#: silent: cut off by a partition, it spends its share of the limits on its own. After this it is taken for
#: dead (a crash looks the same), and a partition that lasts longer may overspend by its share again.
SHARE_KEPT_FOR: Final = 300.0
#: A cut-off engine starts spending its share only once the others have had time to make room for it: one
#: heartbeat of theirs after its own heartbeats stopped counting, and a second for the round trips.
LOCAL_SHARE_DELAY: Final = SILENT_AFTER + HEARTBEAT_INTERVAL + 1.0
#: How long a queued refund or settlement may wait for its lane's next charge to take it along before the
#: settler sends it on its own: longer than an engine's turnaround between a reply and the next admission
#: (a few ms), so that a steady stream of requests costs one round trip each. A pause goes at once.
SETTLE_DELAY: Final = 0.01
#: While Redis is unreachable: how often it is tried again, and how long a `wait` admission sleeps.
RECONNECT_INTERVAL: Final = 1.0
#: Up to this fraction of a wait (and at most 50 ms) is added at random, so engines told the same ready
#: time do not all ask at once.
WAIT_JITTER: Final = 0.1
MAX_JITTER: Final = 0.05

#: KEYS: the engines (sorted set: id -> Redis time of its last heartbeat), those of them that would spend a
#: local share without Redis (for ``local-share`` engines only: id -> Redis time of its last heartbeat whose
#: answer reached it), and the share each would spend (hash: id -> the engines it counted). ARGV: this
#: engine's id, `HEARTBEAT_SPAN`, 1 if it is a ``local-share`` engine, `SILENT_AFTER`, `SHARE_KEPT_FOR`, and
#: the Redis time its last answered heartbeat answered ('' before any). Answers the engines counted, the sum
#: of the shares of the silent ``local-share`` engines (what the others keep for them), how many those are,
#: and Redis's time (the next heartbeat's acknowledgement).
#:
#: A sharer is timed by the answers it received, not by the heartbeats Redis ran: an engine whose commands
#: still arrive but whose answers are lost (a one-way fault; the client keeps a connection whose command
#: timed out) takes itself for cut off, and spends its share after `LOCAL_SHARE_DELAY`. Timed by the
#: heartbeats that ran, it looked alive to the others for ever, and they kept no room for it (1.5x the
#: limits with two engines, for as long as the fault lasted).
_HEARTBEAT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local span, silent_after, kept_for = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
redis.call('EXPIRE', KEYS[1], math.ceil(span * 4))
local count = redis.call('ZCARD', KEYS[1])
if ARGV[3] == '1' then
    local acked, seen = tonumber(ARGV[6]), tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
    if acked == nil then
        -- Its first heartbeat (none answered yet): counted from now, as the engine itself goes by its answer.
        if seen == nil then redis.call('ZADD', KEYS[2], now, ARGV[1]) end
    elseif seen == nil or acked > seen then
        redis.call('ZADD', KEYS[2], math.min(acked, now), ARGV[1])
    end
    redis.call('HSET', KEYS[3], ARGV[1], count)
else
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - kept_for)) do
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
end
-- The engine sending this one is in touch, whatever its score says (its first heartbeat back after a partition
-- acknowledges one from before it): it keeps no room for itself.
local silent = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - silent_after)) do
    if id ~= ARGV[1] then table.insert(silent, id) end
end
local reserved = 0
for _, id in ipairs(silent) do
    reserved = reserved + 1 / math.max(1, tonumber(redis.call('HGET', KEYS[3], id)) or 1)
end
redis.call('EXPIRE', KEYS[2], math.ceil(kept_for * 2))
redis.call('EXPIRE', KEYS[3], math.ceil(kept_for * 2))
return {count, string.format('%.17g', reserved), #silent, string.format('%.17g', now)}
"""
_LEAVE: Final = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


class BudgetUnavailable(Exception):
    """Redis did not answer in time, or refused: the failure policy applies."""


@attrs.frozen
class SharedBudgetSettings:
    """Where the shared budget lives and what to do without it."""

    #: ``redis://host:port/db``, ``rediss://…`` (TLS) or ``unix:///path/to/redis.sock``; no password in it.
    url: str
    password: str | None = attrs.field(default=None, repr=False)
    #: Prefix of every key, so several deployments can share one Redis.
    namespace: str = "trio-mapper"
    failure_policy: FailurePolicy = "wait"
    #: Seconds one Redis call may take before the failure policy applies.
    timeout: float = 0.5


def key_identity(api_key: str, base_url: str) -> str:
    """What names a key's budget in Redis: a hash of the key and its API, never the key itself.

    The base URL is taken as the upstream reads it (`canonical_api`), so engines whose settings spell the same
    API differently (a trailing slash, upper case) still share one budget.
    """
    digest = hashlib.sha256(b"trio-mapper budget\0" + canonical_api(base_url).encode() + b"\0" + api_key.encode())
    return digest.hexdigest()[:24]


def canonical_api(base_url: str) -> str:
    """``base_url`` with its scheme and host in lower case, without the scheme's default port, dot segments
    or a trailing slash."""
    parts = urllib.parse.urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    if parts.port is not None and (scheme, parts.port) not in {("http", 80), ("https", 443)}:
        host = f"{host}:{parts.port}"
    path = posixpath.normpath(parts.path) if parts.path else ""
    return f"{scheme}://{host}{'' if path in {'.', '/'} else path.rstrip('/')}"


@attrs.frozen
class _View:
    """A lane as the script last left it."""

    effective: Limits
    request_capacity: float
    token_capacity: float
    requests_available: float
    tokens_available: float
    pause_remaining: float
    in_flight: int
    learned_rpm: float | None
    learned_tpm: float | None
    pauses: int
    decreases: int

    @classmethod
    def parse(cls, reply: Sequence[Any]) -> tuple[_View, list[str]]:
        values = [item.decode() if isinstance(item, bytes) else str(item) for item in reply]
        rpm, tpm = (max(1, math.floor(float(value))) for value in values[:2])
        view = cls(
            effective=Limits(rpm=rpm, tpm=tpm),
            request_capacity=float(values[2]),
            token_capacity=float(values[3]),
            requests_available=float(values[4]),
            tokens_available=float(values[5]),
            pause_remaining=float(values[6]),
            in_flight=int(values[7]),
            learned_rpm=float(values[8]) if values[8] else None,
            learned_tpm=float(values[9]) if values[9] else None,
            pauses=int(float(values[10])),
            decreases=int(float(values[11])),
        )
        return view, values[12:]


@final
class _Mark:
    """A shared reservation's `Reservation.mark`: its id in Redis and our view at its admission."""

    __slots__ = ("adjusted", "id", "level", "rested", "seq")

    def __init__(
        self, id: str, seq: int, level: tuple[float, float], adjusted: tuple[float, float], rested: tuple[bool, bool]
    ) -> None:
        self.id = id
        self.seq = seq
        self.level = level  # (requests, tokens) right after the charge
        self.adjusted = adjusted
        self.rested = rested


def _number(value: int | None) -> str:
    # Azure sends -1 for "unknown": like a missing header.
    return "" if value is None or value < 0 else str(value)


@final
class SharedBudget:
    """One engine's connection to the shared budget. Start `run` in a nursery before the first admission;
    the instance is the ledger's meter factory (``Ledger(..., meter_factory=shared_budget)``)."""

    def __init__(
        self,
        settings: SharedBudgetSettings,
        *,
        key_id: str,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.key_id = key_id
        self.engine_id = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self._rng = rng or random.Random()
        # Made in `run`: a client belongs to the Trio run that uses it.
        self._client: coredis.Redis[bytes] | None = None
        self._script: Any = None
        self._heartbeat_script: Any = None
        self._leave_script: Any = None
        #: `leave` was called: this engine no longer counts itself among the key's engines.
        self._left = False
        #: Lanes with refunds, settlements or pauses not yet sent, and a wake-up for the settler.
        self._dirty: dict[SharedMeter, None] = {}
        self._queued_changed = trio.Event()
        self._urgent = False
        self._flushed = trio.Event()
        self._flushed.set()
        self._ids = itertools.count(1)
        self.available = True
        self._down_since: float | None = None
        self._back = trio.Event()
        self._wake_heartbeat = trio.Event()
        #: Engines sharing the key, as the last heartbeat counted them (this one included).
        self.engines = 1
        #: A heartbeat has counted them. Until then `engines` is a guess, and ``local-share`` holds requests
        #: as ``wait`` does: engines started while Redis was down each took the whole limits (2.96x together).
        self.counted = False
        #: When this engine's last answered heartbeat was sent (trio's clock): the others take it for cut off
        #: from Redis `SILENT_AFTER` seconds after that heartbeat ran, or sooner (`_HEARTBEAT`).
        self._counted_at = -math.inf
        #: The share of the limits kept for ``local-share`` engines that went silent (the lane script spends
        #: the rest), and how many those are: engines cut off from Redis while this one is not (a review
        #: measured 1.47x the limits with one of two engines cut off, before).
        self.reserved = 0.0
        self.silent_sharers = 0
        #: Redis's time in the answer to this engine's last answered heartbeat: the next one tells Redis that
        #: this one reached it ('' before any).
        self._acknowledged = ""
        self.calls = 0
        self.failures = 0
        #: The lanes' meters, held weakly: a lane the ledger drops (`Ledger.forget`, as clients name ever new
        #: models) must not stay here, read by `pending` after every settling call, for the engine's life.
        #: A meter with settlements still to send is held by `_dirty` until they are sent.
        self._meters: weakref.WeakSet[SharedMeter] = weakref.WeakSet()

    def __call__(self, lane: str, limits: Limits, *, period: float, mode: Mode, origin: float) -> SharedMeter:
        if mode != "bucket":
            raise ValueError("the shared budget meters continuously (ledger_mode bucket); 'period' is local only")
        meter = SharedMeter(self, lane, limits, period=period, origin=origin)
        self._meters.add(meter)
        return meter

    def keys(self, lane: str) -> list[str]:
        # One hash tag per key and lane: the lane's keys share a Cluster slot, lanes spread over slots.
        tag = f"{self.settings.namespace}:{{{self.key_id}:{lane}}}"
        return [f"{tag}:state", f"{tag}:reservations", f"{tag}:expiry", f"{tag}:claims"]

    def new_reservation_id(self) -> str:
        return f"{self.engine_id}:{next(self._ids)}"

    # --- calls ---------------------------------------------------------------------------------------------

    async def call(self, keys: list[str], args: Sequence[str | int | float]) -> list[Any]:
        """One run of the lane script, bounded by the timeout; `BudgetUnavailable` when Redis is not there."""
        if not self.available or self._script is None:
            raise BudgetUnavailable("Redis is unreachable")
        reply = await self._run(self._script, keys, [str(arg) for arg in args])
        self.calls += 1
        return list(reply)

    async def _run(self, script: Any, keys: list[str], args: list[str]) -> Any:
        """A script run within the timeout; a failure marks Redis down (the failure policy applies)."""
        try:
            with trio.fail_after(self.settings.timeout):
                return await script(keys=keys, args=args)
        except (trio.TooSlowError, OSError, coredis.exceptions.RedisError) as exc:
            self._went_down(exc)
            raise BudgetUnavailable(str(exc) or type(exc).__name__) from exc

    def queued(self, meter: SharedMeter, *, urgent: bool = False) -> None:
        """A lane queued a refund, settlement or pause: the settler sends it soon (at once if ``urgent``),
        unless the lane's next charge takes it along first."""
        self._dirty[meter] = None
        self._urgent = self._urgent or urgent
        self._queued_changed.set()
        if self._flushed.is_set():
            self._flushed = trio.Event()

    def sent(self) -> None:
        if not self.pending:
            self._flushed.set()

    async def flush(self) -> None:
        """Until every settlement made so far reached Redis. At shutdown, bound it (`trio.move_on_after`):
        what does not arrive stays charged until its reservation expires, and heals by refill."""
        await self._flushed.wait()

    async def leave(self) -> None:
        """Take this engine off the key's list of engines (at a clean shutdown), so the others count one fewer
        at once rather than after `HEARTBEAT_SPAN`. Best effort: if Redis does not answer, the entry expires."""
        self._left = True  # no heartbeat may put it back
        if self._client is None or not self.available:
            return
        with contextlib.suppress(BudgetUnavailable):
            await self._run(self._leave_script, self._engines_keys, [self.engine_id])

    @property
    def pending(self) -> int:
        """Refunds, settlements and pauses not yet applied in Redis."""
        return sum(meter.pending for meter in self._meters)

    def _went_down(self, exc: BaseException) -> None:
        self.failures += 1
        if self.available:
            self.available = False
            self._down_since = trio.current_time()
            self._back = trio.Event()
            mode = self.without_redis(trio.current_time())
            if mode == "wait":
                what = "holding requests until it answers (failure policy 'wait')"
            elif mode == "uncounted":
                what = "holding requests until it answers (the engines on the key were never counted: no share)"
            else:
                wait = max(0.0, self.local_share_from - trio.current_time())
                what = (
                    f"using 1/{self.engines} of the limits locally (failure policy 'local-share'), from {wait:.0f}s "
                    "on: the engines still in touch with Redis make room for it meanwhile"
                )
            how = "refused the engine's credentials" if isinstance(exc, _REFUSALS) else "unreachable"
            log.error("shared budget: Redis %s (%s); %s", how, str(exc) or type(exc).__name__, what)
            self._wake_heartbeat.set()  # try again in RECONNECT_INTERVAL, not at the next heartbeat

    def _came_back(self) -> None:
        if not self.available:
            down = trio.current_time() - (self._down_since or trio.current_time())
            log.warning("shared budget: Redis reachable again after %.1fs; using the shared budget", down)
            self.available = True
            self._back.set()
            for meter in self._meters:
                meter.changed()

    # --- tasks ---------------------------------------------------------------------------------------------

    async def run(
        self,
        *,
        client: coredis.Redis[bytes] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, count the engines once, then keep the heartbeat and the settler going until cancelled.

        Redis being unreachable at start is not an error: the failure policy applies until it answers.

        Args:
            client: a coredis client to use instead of one made from the settings (tests).
        """
        self._client = client if client is not None else _client(self.settings)
        self._script = self._client.register_script(
            importlib.resources.files(__package__).joinpath("shared_budget.lua").read_text()
        )
        self._heartbeat_script = self._client.register_script(_HEARTBEAT)
        self._leave_script = self._client.register_script(_LEAVE)
        async with self._client, trio.open_nursery() as nursery:
            await self._heartbeat_once()
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._settler)
            task_status.started()

    @property
    def _engines_keys(self) -> list[str]:
        tag = f"{self.settings.namespace}:{{{self.key_id}}}"
        return [f"{tag}:engines", f"{tag}:sharers", f"{tag}:shares"]

    def without_redis(self, now: float) -> WithoutRedis:
        """What admission does while Redis is unreachable: the one decision `SharedMeter._fallback` acts on,
        and the statistics and the log tell."""
        if self.settings.failure_policy == "wait":
            return "wait"
        if not self.counted:
            return "uncounted"
        return "making room" if now < self.local_share_from else "local share"

    @property
    def local_share_from(self) -> float:
        """When this engine, cut off from Redis, may spend its local share (trio's clock): not before the
        others have stopped counting its heartbeats and made room for it."""
        return self._counted_at + LOCAL_SHARE_DELAY

    async def _heartbeat_once(self) -> None:
        if self._left:
            return
        sent_at = trio.current_time()
        sharing = "1" if self.settings.failure_policy == "local-share" else "0"
        args = [
            self.engine_id, str(HEARTBEAT_SPAN), sharing, str(SILENT_AFTER), str(SHARE_KEPT_FOR), self._acknowledged
        ]  # fmt: skip
        try:
            count, reserved, silent, redis_now = await self._run(self._heartbeat_script, self._engines_keys, args)
        except BudgetUnavailable:
            return
        self.engines = max(1, int(count))
        self.counted = True
        self._counted_at = sent_at
        self._acknowledged = redis_now.decode() if isinstance(redis_now, bytes) else str(redis_now)
        self._note_silent_sharers(float(reserved), int(silent))
        self._came_back()

    def _note_silent_sharers(self, reserved: float, silent: int) -> None:
        if silent != self.silent_sharers:
            if silent:
                log.warning(
                    "shared budget: %d engine(s) on the key with failure policy 'local-share' stopped sending "
                    "heartbeats (cut off from Redis, or dead): %.0f%% of the limits is kept for them for up to %.0fs",
                    silent,
                    100 * min(1.0, reserved),
                    SHARE_KEPT_FOR,
                )
            else:
                log.info("shared budget: no engine is cut off from Redis any more; using the whole limits")
        self.reserved, self.silent_sharers = reserved, silent

    async def _heartbeats(self) -> None:
        started = trio.current_time()
        while True:
            if self.available:
                # Engines started together count each other within a second, not at the next 2 s beat (the
                # local share divides by that count). Cut short when a call finds Redis gone, so that its
                # return is noticed within RECONNECT_INTERVAL.
                young = trio.current_time() - started < 2 * HEARTBEAT_INTERVAL
                with trio.move_on_after(RECONNECT_INTERVAL if young else HEARTBEAT_INTERVAL):
                    await self._wake_heartbeat.wait()
            if not self.available:
                await trio.sleep(RECONNECT_INTERVAL)
            self._wake_heartbeat = trio.Event()
            await self._heartbeat_once()

    async def _settler(self) -> None:
        """Sends each lane's queued operations, all of them in one call, shortly after they were queued: a
        lane that charges meanwhile takes them along in its charge (one round trip instead of two)."""
        while True:
            await self._queued_changed.wait()
            self._queued_changed = trio.Event()
            if not self._urgent:
                with trio.move_on_after(SETTLE_DELAY):
                    while not self._urgent:  # a pause queued meanwhile cuts the wait short
                        await self._queued_changed.wait()
                        self._queued_changed = trio.Event()
            self._urgent = False
            while self._dirty:
                meter = next(iter(self._dirty))
                del self._dirty[meter]
                while True:
                    if not self.available:
                        await self._back.wait()
                    try:
                        await meter.send_queued()
                        break
                    except BudgetUnavailable:
                        continue  # sent again once Redis answers: each operation is idempotent by its id
            self.sent()

    def statistics(self) -> dict[str, Any]:
        share = f"local share 1/{self.engines}"
        state = "ok"
        if not self.available:
            state = (
                "unreachable: "
                + {
                    "wait": "holding requests",
                    "uncounted": "holding requests until the engines on the key are counted",
                    "making room": f"holding requests while the other engines make room for a {share}",
                    "local share": share,
                }[self.without_redis(trio.current_time())]
            )
        return {
            "backend": "redis",
            "state": state,
            "engines": self.engines,
            "engine_id": self.engine_id,
            "calls": self.calls,
            "failures": self.failures,
            "failure_policy": self.settings.failure_policy,
            "kept_for_cut_off_engines": self.reserved,
        }


class BudgetRefused(Exception):
    """Redis answered but refused the engine's credentials; the message says what to check."""


#: What Redis answers a client whose password (or user) is wrong, missing, or not allowed the commands.
_REFUSALS: Final = (coredis.exceptions.AuthenticationError, coredis.exceptions.AuthorizationError)


async def check_credentials(settings: SharedBudgetSettings) -> None:
    """Raises `BudgetRefused` when Redis answers but refuses the engine's credentials: a mistyped password
    would otherwise look like an outage for ever (the failure policy holding every request). Redis not
    answering at all is not an error here: the failure policy covers it once the engine serves."""
    refusal: BaseException | None = None
    try:
        with trio.move_on_after(4 * settings.timeout):
            async with _client(settings) as client:
                await client.ping()
    except* _REFUSALS as group:
        refusal = group.exceptions[0]
    except* (OSError, coredis.exceptions.RedisError):
        pass  # unreachable or unwell now: the failure policy deals with it while serving
    if refusal is not None:
        raise BudgetRefused(
            f"Redis at {settings.url} refused the engine's credentials ({refusal}); check "
            "--budget-password-file (or TRIO_MAPPER_BUDGET_PASSWORD) and the user in --budget"
        )


def _client(settings: SharedBudgetSettings) -> coredis.Redis[bytes]:
    return coredis.Redis.from_url(
        settings.url,
        password=settings.password,
        connect_timeout=settings.timeout,
        stream_timeout=settings.timeout,
        # The settler retries on its own, after the failure policy took over: the client must fail fast.
        retry_policy=coredis.retry.NoRetryPolicy(),
    )


@final
class SharedMeter:
    """One lane's `RemoteMeter` over the shared budget."""

    remote: Final = True

    def __init__(self, budget: SharedBudget, lane: str, limits: Limits, *, period: float, origin: float) -> None:
        self.name = lane
        self._budget = budget
        self._keys = budget.keys(lane)
        self._configured = limits
        self._period = period
        self._origin = origin
        self._view: _View | None = None
        self._listeners: list[Callable[[], None]] = []
        self._in_flight = 0
        self._paused_until = -math.inf
        self._last_settled: int | None = None
        self._reservations = 0
        self._refunds = 0
        self._reconciles = 0
        self._estimated = 0
        self._actual = 0
        self._local: LocalMeter | None = None
        #: Refunds, settlements and pauses for the script (its `queued` words), in order, not yet sent; and
        #: those a call is sending now (put back in front if it fails: each is idempotent).
        self._queued: list[str] = []
        self._sending: list[str] = []

    def __repr__(self) -> str:
        return f"<SharedMeter {self.name!r} in_flight={self._in_flight}>"

    @property
    def pending(self) -> int:
        return len(self._queued) + len(self._sending)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when budget may have been freed in the background (a settlement was applied)."""
        self._listeners.append(listener)

    def changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _queue(self, operation: list[str | int | float], *, urgent: bool = False) -> None:
        # Words of one queued operation for the script; '-' stands for an absent value.
        self._queued.append(" ".join(str(word) if word != "" else "-" for word in operation))
        self._budget.queued(self, urgent=urgent)

    async def _call(self, op: str, *args: str | int | float) -> list[str]:
        """One script run: this lane's queued operations first, then ``op``; returns the op's answer."""
        sending, self._queued = self._queued, []
        self._sending += sending
        head: list[str | int | float] = [
            op,
            self._configured.rpm,
            self._configured.tpm,
            self._period,
            self._budget.engine_id,
            IDLE_EXPIRY,
            self._budget.reserved,
            len(sending),
        ]
        try:
            reply = await self._budget.call(self._keys, [*head, *sending, *args])
        except BudgetUnavailable:
            self._queued[:0] = sending
            if sending:
                self._budget.queued(self, urgent=True)
            raise
        finally:
            for _ in sending:
                self._sending.pop(0)
        self._view, answer = _View.parse(reply)
        if self._view.pause_remaining > 0:
            # Kept here too: a Redis restarted without its data (or flushed) forgets the pause, and this
            # engine would be granted at once, into the upstream's 429s (a review: 19 s early).
            self._paused_until = max(self._paused_until, trio.current_time() + self._view.pause_remaining)
        if sending:
            self._budget.sent()
            if op != "charge":
                # Refunds and corrections may have freed budget for our waiters. A charge's own answer has
                # counted them already: waking its head again would only ask the same question at once.
                self.changed()
        return answer

    async def send_queued(self) -> None:
        if self._queued:
            await self._call("apply")

    @property
    def _effective(self) -> Limits:
        return self._view.effective if self._view is not None else self._configured

    def check_admissible(self, cost: Cost) -> None:
        check_cost(self.name, self._effective, cost)

    async def charge(self, costs: Sequence[Cost]) -> tuple[list[Reservation], float]:
        """Charge the costs of the first waiters, in order, in one round trip: the reservations of those that
        fit (a prefix), and when to ask again for the next one (trio's clock; now when all fit).

        Raises:
            RequestTooLarge: the first cost exceeds the limits in force (they may have dropped since it
                queued: another engine's headers).
        """
        head = costs[0]
        self.check_admissible(head)
        now = trio.current_time()
        if self._paused_until > now:
            return [], self._paused_until  # a pause this engine knows of (its 429, or the store said): no need to ask
        if not self._budget.available:
            return self._fallback(head, now)
        ids = [self._budget.new_reservation_id() for _ in costs]
        charges: list[str | int | float] = [RESERVATION_TTL]
        for reservation_id, cost in zip(ids, costs, strict=True):
            charges += [reservation_id, cost.tokens, cost.requests]
        try:
            answer = await self._call("charge", *charges)
        except BudgetUnavailable:
            # The charge may have run, or may yet run (held in a frozen Redis's input): either way its answer
            # is lost, and what it granted would stay spent, unused. Withdrawn once Redis answers again.
            for reservation_id in ids:
                self._queue(["withdraw", reservation_id, RESERVATION_TTL])
            return self._fallback(head, trio.current_time())
        now = trio.current_time()
        granted = int(float(answer[0]))
        if not granted and answer[1] == "too_large":
            self.check_admissible(head)  # raises: the limits in force dropped (another engine's headers)
            return [], now  # pragma: no cover - the script and the view agree; ask again at once if not
        reservations = []
        for index in range(granted):
            seq, level_t, level_r, adjusted_t, adjusted_r, rested_t, rested_r = answer[2 + 7 * index : 9 + 7 * index]
            mark = _Mark(
                ids[index],
                int(float(seq)),
                level=(float(level_r), float(level_t)),
                adjusted=(float(adjusted_r), float(adjusted_t)),
                rested=(rested_r == "1", rested_t == "1"),
            )
            reservations.append(Reservation(self.name, costs[index], now, costs[index].tokens, mark))
        self._reservations += granted
        self._in_flight += granted
        wait = float(answer[1]) if answer[1] != "too_large" else 0.0
        if wait > 0:
            now += wait + self._budget._rng.uniform(0.0, min(MAX_JITTER, wait * WAIT_JITTER))
        return reservations, now

    def _fallback(self, cost: Cost, now: float) -> tuple[list[Reservation], float]:
        mode = self._budget.without_redis(now)
        if mode in ("wait", "uncounted"):
            return [], now + RECONNECT_INTERVAL
        if mode == "making room":
            return [], min(now + RECONNECT_INTERVAL, self._budget.local_share_from)
        answer = self._local_share().try_charge(cost)
        return ([answer], now) if isinstance(answer, Reservation) else ([], answer)

    def _local_share(self) -> LocalMeter:
        share = max(1, self._budget.engines)
        limits = Limits(rpm=max(1, self._effective.rpm // share), tpm=max(1, self._effective.tpm // share))
        if self._local is None:
            self._local = LocalMeter(self.name, limits, period=self._period, mode="bucket", origin=self._origin)
        else:
            self._local.update_limits(limits)
        return self._local

    def _owned(self, reservation: Reservation) -> Meter | None:
        """The local meter that issued a fallback reservation, or None for a shared one."""
        if isinstance(reservation.mark, _Mark):
            return None
        if self._local is None or reservation.lane != self.name:
            raise ValueError(f"reservation of lane {reservation.lane!r} given to lane {self.name!r}")
        return self._local

    def refund(self, reservation: Reservation) -> bool:
        local = self._owned(reservation)
        if local is not None:
            return local.refund(reservation)
        if reservation.settled:
            return False
        reservation.settled = True
        self._in_flight -= 1
        self._refunds += 1
        mark = reservation.mark
        assert isinstance(mark, _Mark)
        self._queue(["refund", mark.id])
        return True

    def settle(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int | None,
        snapshot: RateLimitSnapshot | None,
    ) -> bool:
        local = self._owned(reservation)
        if local is not None:
            return local.settle(reservation, prompt_tokens=prompt_tokens, snapshot=snapshot)
        if reservation.settled:
            return False
        reservation.settled = True
        self._in_flight -= 1
        self._reconciles += 1
        mark = reservation.mark
        assert isinstance(mark, _Mark)
        self._last_settled = mark.seq
        estimate = reservation.cost.prompt_tokens
        usage_error = 0
        if prompt_tokens is not None and prompt_tokens >= 0 and estimate is not None:
            usage_error = prompt_tokens - estimate
            reservation.charged_tokens += usage_error
            self._estimated += estimate
            self._actual += prompt_tokens
        answered = snapshot is not None or prompt_tokens is not None
        operation: list[str | int | float] = [
            "settle",
            mark.id,
            usage_error,
            _number(snapshot.limit_requests if snapshot else None),
            _number(snapshot.limit_tokens if snapshot else None),
            _number(snapshot.remaining_requests if snapshot else None),
            _number(snapshot.remaining_tokens if snapshot else None),
            mark.level[0],
            mark.level[1],
            mark.adjusted[0],
            mark.adjusted[1],
            int(mark.rested[0]),
            int(mark.rested[1]),
            int(answered),
        ]
        self._queue(operation)
        return True

    def pause(self, wait: float | None, scope: str | None) -> None:
        if wait is None or not math.isfinite(wait) or wait < 0:
            wait = DEFAULT_PAUSE
        # This engine stops at once; the others learn it from the store at their next admission.
        self._paused_until = max(self._paused_until, trio.current_time() + wait)
        if self._local is not None:
            self._local.pause(wait, scope)
        answered = "" if self._last_settled is None else str(self._last_settled)
        self._last_settled = None
        # A pause must not wait for this lane's next charge: it is for the other engines too.
        self._queue(["pause", wait, (scope or "").replace(" ", "_"), answered], urgent=True)

    def update_limits(self, limits: Limits) -> None:
        self._configured = limits
        if self._local is not None:
            self._local_share()

    def at_rest(self) -> bool:
        # The state outlives the lane in Redis: a lane made again reads it back. Only this process's
        # reservations in flight (local ones included) keep the lane.
        return not self._in_flight and (self._local is None or self._local.at_rest())

    def statistics(self) -> LaneStatistics:
        if self._local is not None and not self._budget.available:
            # The local share is what admits now: show it, with this lane's shared reservations still out.
            local = self._local.statistics()
            return attrs.evolve(
                local,
                mode="bucket (local share while Redis is unreachable)",
                configured=self._configured,
                in_flight=local.in_flight + self._in_flight,
                reservations=local.reservations + self._reservations,
                refunds=local.refunds + self._refunds,
                reconciles=local.reconciles + self._reconciles,
                at_rest=self.at_rest(),
            )
        now = trio.current_time()
        view = self._view
        effective = self._effective
        pause = max(0.0, self._paused_until - now, view.pause_remaining if view else 0.0)
        token_capacity = view.token_capacity if view else effective.tpm / 60.0
        request_capacity = view.request_capacity if view else effective.rpm / 60.0
        tokens_available = view.tokens_available if view else token_capacity
        requests_available = view.requests_available if view else request_capacity
        return LaneStatistics(
            name=self.name,
            mode="bucket (shared)",
            period=self._period,
            configured=self._configured,
            effective=effective,
            token_capacity=token_capacity,
            request_capacity=request_capacity,
            tokens_used=max(0.0, token_capacity - tokens_available),
            requests_used=max(0.0, request_capacity - requests_available),
            tokens_available=tokens_available,
            requests_available=requests_available,
            waiters=0,
            in_flight=self._in_flight,
            paused_until=now + pause if pause > 0 else None,
            pause_remaining=pause,
            pauses=view.pauses if view else 0,
            estimated_prompt_tokens=self._estimated,
            actual_prompt_tokens=self._actual,
            correction=1.0,
            reservations=self._reservations,
            refunds=self._refunds,
            reconciles=self._reconciles,
            learned_rpm=view.learned_rpm if view else None,
            learned_tpm=view.learned_tpm if view else None,
            rate_decreases=view.decreases if view else 0,
            at_rest=self.at_rest(),
        )
