"""The ledger: one `LaneBudget` per model ("lane"), created on first use from a meter factory.

The scheduler asks a lane to `reserve(cost)` before sending a request, then either `refund`s the
reservation (never sent) or `reconcile`s it with what the upstream answered. Each lane is this process's
waiting queue (`budget/queue.py`) in front of a `Meter` the factory makes: by default the in-memory
`LocalMeter` (`budget/local.py`); a meter over a shared store fits the same place (`budget/interface.py`).
docs/ledger.md explains the accounting modes, how replies correct the budget, and the split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, final

import trio

from trio_mapper.engine.budget.interface import (
    MODES,
    Cost,
    LaneBudget,
    LaneStatistics,
    Limits,
    MeterFactory,
    Mode,
    check_cost,
)
from trio_mapper.engine.budget.local import LocalMeter
from trio_mapper.engine.budget.queue import QueuedLaneBudget

#: The continuous bucket matches how the upstream meters, learns a smaller upstream burst, and measured
#: fewest 429s in tests/engine/budget/test_ledger.py's simulation (numbers in docs/ledger.md).
DEFAULT_MODE: Final[Mode] = "bucket"
#: `--period_length` default: the upstream's limits are per minute.
DEFAULT_PERIOD: Final = 60.0

#: A model name ending in a snapshot date, ``gpt-4o-2024-08-06`` or the older ``gpt-4-0613``: group 1 is the
#: family whose limit it shares upstream.
_DATED_SNAPSHOT: Final = re.compile(r"(.+?)-(?:\d{4}-\d{2}-\d{2}|(?:0[1-9]|1[0-2])\d{2})")

_NO_PER_MODEL: Final[Mapping[str, Limits]] = MappingProxyType({})


@final
class Ledger:
    """All lanes of the engine: one `LaneBudget` per model, created on first use.

    Args:
        default_limits: limits of a model absent from ``per_model``.
        period: seconds; the window length ("period") or the bucket's burst in seconds of refill ("bucket").
        per_model: limits by model name.
        mode: "bucket" (continuous, the default) or "period" (fixed windows); see docs/ledger.md.
        meter_factory: makes each lane's `Meter`; by default the in-memory `LocalMeter`.
    """

    def __init__(
        self,
        default_limits: Limits,
        period: float = DEFAULT_PERIOD,
        *,
        per_model: Mapping[str, Limits] = _NO_PER_MODEL,
        mode: str = DEFAULT_MODE,
        meter_factory: MeterFactory = LocalMeter,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ledger mode {mode!r}; expected one of {', '.join(MODES)}")
        if not (period > 0 and math.isfinite(period)):
            raise ValueError(f"period must be a positive number of seconds, not {period!r}")
        self.mode: Mode = mode
        self.period = float(period)
        self._default = default_limits
        self._per_model = dict(per_model)
        self._meter_factory = meter_factory
        self._lanes: dict[str, LaneBudget] = {}
        # Windows align on the ledger's start; read lazily so a ledger can be built outside trio.run.
        self._origin: float | None = None

    def __repr__(self) -> str:
        return f"<Ledger mode={self.mode} period={self.period} lanes={sorted(self._lanes)}>"

    def lane(self, model: str) -> LaneBudget:
        lane = self._lanes.get(model)
        if lane is None:
            if self._origin is None:
                self._origin = trio.current_time()
            limits = self._per_model.get(model, self._default)
            meter = self._meter_factory(model, limits, period=self.period, mode=self.mode, origin=self._origin)
            lane = QueuedLaneBudget(meter)
            self._lanes[model] = lane
        return lane

    def statistics(self) -> dict[str, LaneStatistics]:
        return {name: lane.statistics() for name, lane in self._lanes.items()}

    def lane_statistics(self, name: str) -> LaneStatistics | None:
        """One lane's snapshot (None when there is no such lane; never creates one)."""
        lane = self._lanes.get(name)
        return lane.statistics() if lane is not None else None

    def forget(self, model: str) -> bool:
        """Drop a lane whose budget is at rest (`LaneBudget.at_rest`); it is created afresh if used again.

        A lane that is not at rest is kept: a fresh one would start with a budget the upstream still counts
        as spent (or ignore a pause, or debt). Returns whether the lane is gone (True also when there was
        none).
        """
        lane = self._lanes.get(model)
        if lane is not None:
            if not lane.at_rest():
                return False
            del self._lanes[model]
        return True

    def lane_name(self, model: str) -> str:
        """The lane whose budget ``model``'s requests spend: the model's own when it has configured limits,
        else its family's. Dated snapshots share their family's limit upstream (``gpt-4o-2024-08-06`` counts
        against ``gpt-4o``), so they share its lane."""
        if model in self._per_model:
            return model
        match = _DATED_SNAPSHOT.fullmatch(model)
        return match.group(1) if match else model

    def configured_limits(self, model: str) -> Limits:
        """The limits configured for a lane (the upstream's headers may have lowered the ones in force)."""
        return self._per_model.get(model, self._default)

    def check_admissible(self, model: str, cost: Cost) -> None:
        """`LaneBudget.check_admissible` for a lane that may not exist yet, without creating it."""
        lane = self._lanes.get(model)
        if lane is not None:
            lane.check_admissible(cost)
        else:
            check_cost(model, self.configured_limits(model), cost)

    def update_limits(self, default_limits: Limits, per_model: Mapping[str, Limits]) -> None:
        self._default = default_limits
        self._per_model = dict(per_model)
        for name, lane in self._lanes.items():
            lane.update_limits(self._per_model.get(name, default_limits))
