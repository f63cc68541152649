"""Tenants: who is asking, in which priority class, with what weight, under which caps (docs/tenants.md).

A front describes each client as a `ClientIdentity` — the kernel's uid/gid on the Unix sockets, the client
key's name on TCP, and the name a client gives in its hello, which is a claim, not a proof. `Tenants.resolve`
maps it to a `Tenant` from the configuration (``[tenants.NAME]``); clients no tenant matches fall in the
default tenant. The scheduler then orders each lane's queue by class, shares a class between its tenants
by weight in tokens, and holds a capped tenant's requests until its cap allows (`TenantLimits`).

No I/O; time is `trio.current_time()`, so the tests run on the mock clock.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

import attrs
import trio

from trio_mapper.engine.budget.local import TokenBucket
from trio_mapper.kinds import PRIORITY_CLASSES, Priority

__all__ = [
    "CLASSES",
    "DEFAULT_TENANT",
    "Cap",
    "ClientIdentity",
    "DailyUsage",
    "Price",
    "Prices",
    "Priority",
    "Tenant",
    "TenantLimits",
    "TenantTable",
    "Tenants",
    "class_rank",
    "tenants_from_config",
]

#: Priority classes, highest first.
CLASSES: Final = PRIORITY_CLASSES
#: The tenant of clients no configured tenant matches (and of every client when none is configured).
DEFAULT_TENANT: Final = "default"
#: Seconds of a cap's pace a capped tenant may spend at once: small, so that its usage over any minute stays
#: close to the cap, yet at least one request always fits (a request costlier than that waits for a full
#: bucket and goes into debt, as with the key's own budget).
CAP_BURST_SECONDS: Final = 1.0
#: Seconds in the "day" of a daily budget: a rolling window, so that no calendar boundary hands every tenant
#: a fresh budget at the same moment.
DAY: Final = 86_400.0


def class_rank(priority: str) -> int:
    """0 for the highest class; unknown names rank as ``default``."""
    try:
        return CLASSES.index(priority)
    except ValueError:
        return CLASSES.index("default")


@attrs.frozen
class ClientIdentity:
    """A client as its front knows it. ``uid``/``gid`` and ``key`` are authoritative; ``name`` is claimed."""

    uid: int | None = None
    gid: int | None = None
    #: Every group the client's process is in: its primary gid and, where the kernel tells (Linux's
    #: ``SO_PEERGROUPS``), its supplementary ones; empty when unknown.
    groups: frozenset[int] = frozenset()
    #: The name of the client key it authenticated with (HTTP over TCP).
    key: str | None = None
    #: What it calls itself (the msgpack hello's ``client``).
    name: str | None = None

    def describe(self) -> str:
        parts = []
        if self.key is not None:
            parts.append(f"key {self.key}")
        if self.uid is not None:
            parts.append(f"uid {self.uid}")
        if self.name:
            parts.append(f"name {self.name!r}")
        return ", ".join(parts) or "unknown client"


@attrs.frozen
class Cap:
    """A per-minute cap: absolute, or a share of the lane's configured limit (``share`` in (0, 1])."""

    absolute: float | None = None
    share: float | None = None

    def per_minute(self, lane_limit: float) -> float:
        if self.absolute is not None:
            return self.absolute
        assert self.share is not None
        return self.share * lane_limit

    @classmethod
    def parse(cls, value: int | float | str) -> Cap:
        """``5000`` (per minute) or ``"25%"`` (of the key's limit for each model).

        Raises:
            ValueError: not a positive number or a percentage in (0, 100].
        """
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                percent = float(value.strip()[:-1])
            except ValueError:
                raise ValueError(f"a cap is a number per minute or a percentage like '25%', got {value!r}") from None
            if not 0 < percent <= 100:
                raise ValueError(f"a cap's percentage must be in (0, 100], got {value!r}")
            return cls(share=percent / 100)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"a cap is a number per minute or a percentage like '25%', got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"a cap is a number per minute or a percentage like '25%', got {value!r}") from None
        if not (number > 0 and math.isfinite(number)):
            raise ValueError(f"a cap must be positive, got {value!r}")
        return cls(absolute=number)

    def __str__(self) -> str:
        return f"{self.absolute:g}/min" if self.absolute is not None else f"{(self.share or 0) * 100:g}% of the limit"


@attrs.frozen
class Tenant:
    """One tenant from the configuration."""

    name: str
    priority: Priority = "default"
    #: Its share of its class, relative to the other tenants' weights, in tokens.
    weight: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    rpm_cap: Cap | None = None
    tpm_cap: Cap | None = None
    #: Tokens it may spend in any 24 hours; past it, its requests fail ``budget_exhausted``.
    daily_tokens: int | None = None
    #: Cost (in the price table's currency) it may spend in any 24 hours.
    daily_cost: float | None = None
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    keys: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()

    @property
    def matches_anyone(self) -> bool:
        return not (self.uids or self.gids or self.keys or self.names)

    def matches(self, client: ClientIdentity) -> bool:
        """A tenant's uids, gids and keys are alternatives (any one proves it); names, a claim, only narrow:
        a tenant with both matches a client that proves one and claims the other."""
        if self.matches_anyone:
            return False
        principal = bool(self.uids or self.gids or self.keys)
        proven = (
            (client.uid is not None and client.uid in self.uids)
            or (client.gid is not None and client.gid in self.gids)
            or not client.groups.isdisjoint(self.gids)
            or (client.key is not None and client.key in self.keys)
        )
        if principal and not proven:
            return False
        return not self.names or (client.name is not None and client.name in self.names)


@attrs.frozen
class Tenants:
    """The configured tenants, in configuration order, and the default one."""

    tenants: Sequence[Tenant] = ()
    default: Tenant = Tenant(DEFAULT_TENANT)

    def resolve(self, client: ClientIdentity) -> Tenant:
        """The first configured tenant that matches, else the default one."""
        for tenant in self.tenants:
            if tenant.matches(client):
                return tenant
        return self.default

    def by_name(self, name: str) -> Tenant | None:
        if name == self.default.name:
            return self.default
        return next((tenant for tenant in self.tenants if tenant.name == name), None)

    def all(self) -> list[Tenant]:
        return [*self.tenants, self.default]


@attrs.frozen
class Price:
    """What a million tokens of a model cost, in the operator's currency."""

    input: float
    output: float


@attrs.frozen
class Prices:
    """The price table, by lane: a model's family name (``gpt-4o-2024-08-06`` is priced as ``gpt-4o``) or a
    model with limits of its own. A model not in the table costs nothing."""

    table: Mapping[str, Price] = attrs.field(factory=dict)

    def cost(self, lane: str, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        price = self.table.get(lane)
        if price is None:
            return 0.0
        return ((prompt_tokens or 0) * price.input + (completion_tokens or 0) * price.output) / 1_000_000


class TenantLimits:
    """One tenant's caps in one lane: when it may send next, and what it spent."""

    def __init__(self, tenant: Tenant, lane_limits: tuple[int, int]) -> None:
        self._requests: TokenBucket | None = None
        self._tokens: TokenBucket | None = None
        self.configure(tenant, lane_limits)

    def configure(self, tenant: Tenant, lane_limits: tuple[int, int]) -> None:
        """Caps from the (re)loaded tenant and the lane's limits in force: (rpm, tpm)."""
        self._requests = self._bucket(self._requests, tenant.rpm_cap, lane_limits[0])
        self._tokens = self._bucket(self._tokens, tenant.tpm_cap, lane_limits[1])

    @staticmethod
    def _bucket(bucket: TokenBucket | None, cap: Cap | None, lane_limit: int) -> TokenBucket | None:
        # The ledger's own continuous bucket (refill, and a cost above the burst going into debt once full).
        if cap is None:
            return None
        per_minute = cap.per_minute(lane_limit)
        capacity = per_minute / 60.0 * CAP_BURST_SECONDS
        now = trio.current_time()
        if bucket is None:
            return TokenBucket(per_minute, capacity, now, level=capacity)
        bucket.configure(per_minute, capacity, now)
        return bucket

    def ready_at(self, tokens: int, now: float) -> float:
        """When a request of ``tokens`` fits under the caps (``now`` if it does)."""
        ready = now
        if self._requests is not None:
            ready = max(ready, self._requests.ready_at(1, now))
        if self._tokens is not None:
            ready = max(ready, self._tokens.ready_at(tokens, now))
        return ready

    def take(self, tokens: int, now: float) -> None:
        if self._requests is not None:
            self._requests.charge(1, now)
        if self._tokens is not None:
            self._tokens.charge(tokens, now)


class DailyUsage:
    """What one tenant spent over the last 24 hours, in tokens and cost, by the minute.

    Kept as running totals over minutes in time order, so that adding and reading cost O(1) however long
    the engine runs (a day of traffic is 1,440 minutes, read on every request of a tenant with a budget).
    """

    def __init__(self) -> None:
        self._minutes: collections.OrderedDict[int, list[float]] = collections.OrderedDict()
        self._tokens = 0.0
        self._cost = 0.0

    def _trim(self, now: float) -> None:
        oldest = math.floor((now - DAY) / 60.0)
        while self._minutes:
            minute, (tokens, cost) = next(iter(self._minutes.items()))
            if minute > oldest:
                break
            del self._minutes[minute]
            self._tokens -= tokens
            self._cost -= cost

    def add(self, tokens: float, cost: float, now: float) -> None:
        self._trim(now)
        minute = math.floor(now / 60.0)
        bucket = self._minutes.get(minute)
        if bucket is None:
            bucket = self._minutes[minute] = [0.0, 0.0]
        bucket[0] += tokens
        bucket[1] += cost
        self._tokens += tokens
        self._cost += cost

    def totals(self, now: float) -> tuple[float, float]:
        """(tokens, cost) over the last 24 hours."""
        self._trim(now)
        if not self._minutes:
            self._tokens = self._cost = 0.0  # no float drift left behind by the subtractions
        return self._tokens, self._cost


class TenantTable(Protocol):
    """One ``[tenants.NAME]`` table, as the settings checked it (`process.settings.TenantConfig`)."""

    @property
    def priority(self) -> Priority: ...
    @property
    def weight(self) -> float: ...
    @property
    def rpm_cap(self) -> str | None: ...
    @property
    def tpm_cap(self) -> str | None: ...
    @property
    def daily_tokens(self) -> int | None: ...
    @property
    def daily_cost(self) -> float | None: ...
    @property
    def uids(self) -> Sequence[int]: ...
    @property
    def gids(self) -> Sequence[int]: ...
    @property
    def keys(self) -> Sequence[str]: ...
    @property
    def names(self) -> Sequence[str]: ...


def tenants_from_config(tables: Mapping[str, TenantTable]) -> Tenants:
    """`Tenants` from the ``[tenants.NAME]`` tables, in their order; ``[tenants.default]`` configures the
    default tenant.

    Raises:
        ValueError: a bad cap, a default tenant with match rules, another tenant with none.
    """
    tenants: list[Tenant] = []
    default = Tenant(DEFAULT_TENANT)
    for name, config in tables.items():
        try:
            tenant = Tenant(
                name=name,
                priority=config.priority,
                weight=config.weight,
                rpm_cap=Cap.parse(config.rpm_cap) if config.rpm_cap is not None else None,
                tpm_cap=Cap.parse(config.tpm_cap) if config.tpm_cap is not None else None,
                daily_tokens=config.daily_tokens,
                daily_cost=config.daily_cost,
                uids=frozenset(config.uids),
                gids=frozenset(config.gids),
                keys=frozenset(config.keys),
                names=frozenset(config.names),
            )
        except ValueError as exc:
            raise ValueError(f"tenants.{name}: {exc}") from None
        if name == DEFAULT_TENANT:
            if not tenant.matches_anyone:
                raise ValueError(
                    "tenants.default: the default tenant takes every client no other tenant matches; "
                    "give it no uids, gids, keys or names"
                )
            default = tenant
        elif tenant.matches_anyone:
            raise ValueError(f"tenants.{name}: give it uids, gids, keys or names to match its clients by")
        else:
            tenants.append(tenant)
    return Tenants(tuple(tenants), default)
