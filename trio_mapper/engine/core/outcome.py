"""The seam between the engine's core and its fronts: what a front asks for, and what the core tells it back.

A front (the msgpack Unix socket today; an HTTP front, streaming, later) turns what its clients send into a
`RequestSpec` and hands it to the core with a `ReplySink` of its own. The core reports each request's life
to that sink as events — `Started` when the upstream's status and headers are known, then exactly one of
`Finished` or `Failed` — and the front renders them in its own format. The core never builds a wire message
and never sees a connection: fairness is keyed by the identity the sink gives (`ReplySink.client_key`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Protocol

import attrs

from trio_mapper.engine.upstream.client import ReplyBody
from trio_mapper.kinds import ErrorKind

__all__ = ["Failed", "Finished", "Outcome", "ReplySink", "RequestSpec", "Started", "Timings"]


@attrs.frozen
class RequestSpec:
    """One API request as a front received it, before any validation."""

    #: A relative API path (``/v1/chat/completions``); the core validates it.
    endpoint: str
    #: The JSON request body, decoded.
    body: Mapping[str, Any]
    method: str = "POST"
    #: Seconds from acceptance; None: the engine's default deadline.
    deadline: float | None = None
    #: Upstream attempts that end in a fault; None: the engine's default.
    max_attempts: int | None = None
    #: Client headers to pass to the upstream. Only names in the upstream's allow-list
    #: (`FORWARDED_REQUEST_HEADERS`) are ever sent; anything else here is dropped.
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Timings:
    """Seconds spent in each phase of a request, measured by the engine."""

    #: From acceptance to the first dispatch to the upstream.
    queued: float
    #: In upstream calls, all attempts.
    upstream: float
    #: From acceptance to the final event.
    total: float


@attrs.frozen
class Started:
    """The upstream answered the final attempt: its status and headers are known, the body follows."""

    status: int
    headers: Mapping[str, str]


@attrs.frozen
class Finished:
    """The request succeeded (a 2xx from the upstream)."""

    status: int
    headers: Mapping[str, str]
    body: ReplyBody
    attempts: int
    timings: Timings


@attrs.frozen
class Failed:
    """The request's final failure; upstream status, headers and body when there was an upstream answer."""

    kind: ErrorKind
    #: What happened and what to do, for humans.
    message: str
    status: int | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: ReplyBody | None = None
    attempts: int = 0


Outcome = Started | Finished | Failed


class ReplySink(Protocol):
    """Where a front's requests report their life. Each accepted request gets at most one `Started` and then
    exactly one `Finished` or `Failed`; a submit refused at once gets just a `Failed`."""

    @property
    def client_key(self) -> Hashable:
        """Who is asking: fairness between clients, and request ids, are scoped by it."""

    @property
    def label(self) -> str:
        """How logs name this client."""

    def report(self, request_id: Hashable | None, event: Outcome) -> None:
        """Take one event; never blocks. ``request_id`` is None for a refusal that must not name the id
        (a duplicate of an outstanding request's id)."""
