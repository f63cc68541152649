"""Counters behind ``GET /_simulator/stats``: totals and the same breakdown per model."""

from __future__ import annotations

from collections import Counter
from typing import Any, final

import attrs

RATE_LIMIT_KINDS = ("requests", "tokens", "too_large", "insufficient_quota")
SERVER_ERROR_STATUSES = ("500", "502", "503")


@attrs.define
class Counts:
    """What happened to the requests of one model (or of all of them)."""

    received: int = 0
    admitted: int = 0
    ok: int = 0
    client_errors: int = 0
    resets: int = 0
    streams_closed_by_client: int = 0
    tokens_charged: int = 0
    rate_limited: Counter[str] = attrs.field(factory=Counter)
    server_errors: Counter[str] = attrs.field(factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "admitted": self.admitted,
            "ok": self.ok,
            "rate_limited": {kind: self.rate_limited[kind] for kind in RATE_LIMIT_KINDS},
            "server_errors": {status: self.server_errors[status] for status in SERVER_ERROR_STATUSES},
            "resets": self.resets,
            "client_errors": self.client_errors,
            "streams_closed_by_client": self.streams_closed_by_client,
            "tokens_charged": self.tokens_charged,
        }


@final
class Stats:
    """Totals plus per-model counts; every ``record_*`` updates both."""

    def __init__(self) -> None:
        self.total = Counts()
        self.models: dict[str, Counts] = {}

    def __repr__(self) -> str:
        return f"<Stats received={self.total.received} ok={self.total.ok}>"

    def _pair(self, model: str | None) -> tuple[Counts, ...]:
        if model is None:
            return (self.total,)
        counts = self.models.get(model)
        if counts is None:
            counts = self.models[model] = Counts()
        return (self.total, counts)

    def received(self) -> None:
        self.total.received += 1

    def model_seen(self, model: str) -> None:
        # Counted on top of `received` (already counted globally) once the body names a model.
        counts = self.models.get(model)
        if counts is None:
            counts = self.models[model] = Counts()
        counts.received += 1

    def admitted(self, model: str, tokens: int) -> None:
        for counts in self._pair(model):
            counts.admitted += 1
            counts.tokens_charged += tokens

    def ok(self, model: str) -> None:
        for counts in self._pair(model):
            counts.ok += 1

    def rate_limited(self, model: str, kind: str) -> None:
        for counts in self._pair(model):
            counts.rate_limited[kind] += 1

    def server_error(self, model: str, status: int) -> None:
        for counts in self._pair(model):
            counts.server_errors[str(status)] += 1

    def reset(self, model: str) -> None:
        for counts in self._pair(model):
            counts.resets += 1

    def closed_by_client(self, model: str) -> None:
        for counts in self._pair(model):
            counts.streams_closed_by_client += 1

    def client_error(self, model: str | None) -> None:
        for counts in self._pair(model):
            counts.client_errors += 1

    def as_json(self) -> dict[str, Any]:
        return {
            **self.total.as_json(),
            "models": {name: c.as_json() for name, c in sorted(self.models.items())},
        }
