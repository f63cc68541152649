"""The seam between the engine's core and its fronts: what a front asks for, and what the core tells it back.

A front (the msgpack Unix socket, the OpenAI HTTP API) turns what its clients send into a `RequestSpec` and
hands it to the core with a `ReplySink` of its own. The core reports each request's life to that sink as
events — `Started` when the reply is committed (its status and headers known), for a stream each `Chunk` as
it arrives, then exactly one of `Finished` or `Failed` — and the front renders them in its own format. The
core never builds a wire message and never sees a connection: fairness is keyed by the identity the sink
gives (`ReplySink.client_key`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Protocol

import attrs

from trio_mapper.engine.core.tenants import ClientIdentity
from trio_mapper.engine.upstream.client import ReplyBody
from trio_mapper.engine.upstream.streams import Chunk
from trio_mapper.kinds import ErrorKind

__all__ = ["Chunk", "ClientIdentity", "Failed", "Finished", "Outcome", "ReplySink", "RequestSpec", "Started", "Timings"]


@attrs.frozen
class RequestSpec:
    """One API request as a front received it, before any validation."""

    #: A relative API path (``/v1/chat/completions``); the core validates it.
    endpoint: str
    #: The JSON request body, decoded.
    body: Mapping[str, Any]
    method: str = "POST"
    #: Seconds from acceptance; None: the engine's default deadline. Past it the request is answered
    #: ``timeout`` if it has not been sent (waiting in a queue, or to retry); one already sent runs on until
    #: ``patience``.
    deadline: float | None = None
    #: Seconds from acceptance the client waits for its answer to begin, when that is longer than the
    #: deadline (an SDK's read timeout, the deadline being set short of it so that a ``timeout`` answer
    #: arrives first). An attempt in flight at the deadline runs on until then, since its answer may still
    #: reach the client; cut at the deadline, the upstream's work would be lost and paid for again.
    patience: float | None = None
    #: Upstream attempts that end in a fault; None: the engine's default.
    max_attempts: int | None = None
    #: Client headers to pass to the upstream. Only names in the upstream's allow-list
    #: (`FORWARDED_REQUEST_HEADERS`) are ever sent; anything else here is dropped.
    headers: Mapping[str, str] = attrs.field(factory=dict)
    #: The priority class the client asks for (``interactive``, ``default``, ``batch``); None: its
    #: tenant's. A client may ask for a lower class than its tenant's, never a higher one.
    priority: str | None = None


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
    """The reply is committed: the upstream answered the attempt whose reply the client gets, with this status
    and these headers. For a stream, its first `Chunk` follows at once; from here on nothing is retried."""

    status: int
    headers: Mapping[str, str]
    #: Upstream attempts so far, this one included.
    attempts: int = 1
    #: Seconds from acceptance to the first dispatch to the upstream.
    queued: float = 0.0
    #: The body follows as `Chunk` events (the client asked for a stream and the upstream streams).
    streaming: bool = False


@attrs.frozen
class Finished:
    """The request succeeded (a 2xx from the upstream)."""

    status: int
    headers: Mapping[str, str]
    body: ReplyBody
    attempts: int
    timings: Timings
    #: The body went out as `Chunk` events; ``body`` is empty.
    streamed: bool = False


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
    #: The request body's field at fault, named as OpenAI's error bodies do (``messages[0].content``), when
    #: the engine refused the request itself; None otherwise.
    param: str | None = None
    #: The failure is the upstream's own error event, which ended the stream and reached the client as its last
    #: chunk in a shape the client raises at (`StreamRelay.error_shown`): a front that ends a failed stream with
    #: an error event of its own adds none (one error, not two).
    error_relayed: bool = False


Outcome = Started | Finished | Failed


class ReplySink(Protocol):
    """Where a front's requests report their life. Each accepted request gets at most one `Started`, then (a
    stream) `Chunk` events through `relay`, then exactly one `Finished` or `Failed`; a submit refused at once
    gets just a `Failed`. A `Failed` after a `Started` ends a reply the client has partly received."""

    @property
    def client_key(self) -> Hashable:
        """Which client is asking: fairness between clients, and request ids, are scoped by it."""

    @property
    def client(self) -> ClientIdentity:
        """Who is asking, as the tenants are matched against it (docs/tenants.md)."""

    @property
    def identity(self) -> str:
        """Who is asking, stable across connections (``uid 1000``, a client key's name): statistics and
        metrics are kept per identity, so their number stays bounded however often clients reconnect."""

    @property
    def label(self) -> str:
        """How logs name this client."""

    def report(self, request_id: Hashable | None, event: Outcome) -> None:
        """Take one event; never blocks. ``request_id`` is None for a refusal that must not name the id
        (a duplicate of an outstanding request's id)."""

    async def relay(self, request_id: Hashable, chunk: Chunk) -> None:
        """Take one chunk of a streamed reply. Waits while the client is behind, which slows the reading of
        the upstream's stream to the client's pace instead of buffering it."""
