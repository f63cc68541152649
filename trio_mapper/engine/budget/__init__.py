"""The rate budget: per-model RPM/TPM lanes that admit requests only when the budget allows (docs/ledger.md).

`interface` names the pieces and the two seams, `LaneBudget` (what the scheduler uses) and `Meter` (what
counts); `queue` is this process's waiting line; `local` the in-memory meter; `ledger` the lanes by model.
"""

from trio_mapper.engine.budget.interface import (
    Cost,
    LaneBudget,
    LaneStatistics,
    Limits,
    Meter,
    MeterFactory,
    RequestTooLarge,
    Reservation,
)
from trio_mapper.engine.budget.ledger import Ledger
from trio_mapper.engine.budget.local import LocalMeter
from trio_mapper.engine.budget.queue import QueuedLaneBudget

__all__ = [
    "Cost",
    "LaneBudget",
    "LaneStatistics",
    "Ledger",
    "Limits",
    "LocalMeter",
    "Meter",
    "MeterFactory",
    "QueuedLaneBudget",
    "RequestTooLarge",
    "Reservation",
]
