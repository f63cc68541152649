"""The scheduler alone, under autojump_clock, with an httpx.MockTransport upstream (a unit test of one module).

Each test checks one behaviour and that every accepted request got exactly one final reply.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import msgspec
import pytest
import trio

from trio_mapper.engine.budget import Ledger, Limits
from trio_mapper.engine.core.background import WORKER_NICENESS
from trio_mapper.engine.core.outcome import Chunk, ClientIdentity, Failed, Finished, Outcome, RequestSpec, Started
from trio_mapper.engine.core.scheduler import (
    GIVE_UP_GRACE,
    JOBS_PER_CHECKPOINT,
    LARGE_BODY_BYTES,
    RELAY_STALL_TIMEOUT,
    TIMEOUT_LINES_PER_PASS,
    Job,
    JobState,
    Scheduler,
)
from trio_mapper.engine.estimate.tokens import TokenEstimator
from trio_mapper.engine.process.settings import OpenAISettings
from trio_mapper.engine.upstream.client import MAX_STRETCHED_READ_TIMEOUT, Upstream
from trio_mapper.wire import Error, Result, Submit, Timings

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


@pytest.fixture(scope="module")
def estimator() -> TokenEstimator:
    return TokenEstimator.load()


@attrs.define(eq=False)
class Sink:
    """Stands in for a connection: collects replies."""

    name: str
    replies: list[Result | Error] = attrs.field(factory=list)
    started: set[Any] = attrs.field(factory=set)
    arrived: trio.Event = attrs.field(factory=trio.Event)
    #: Streamed chunks by request id, in the order relayed.
    chunks: dict[Any, list[Chunk]] = attrs.field(factory=dict)

    @property
    def client_key(self) -> str:
        return self.name

    @property
    def identity(self) -> str:
        return self.name

    @property
    def client(self) -> ClientIdentity:
        return ClientIdentity(name=self.name)

    async def relay(self, request_id: Any, chunk: Chunk) -> None:
        assert request_id in self.started, "a chunk before Started"
        self.chunks.setdefault(request_id, []).append(chunk)
        self.arrived.set()

    @property
    def label(self) -> str:
        return self.name

    def report(self, request_id: Any, event: Outcome) -> None:
        # Rendered as the msgpack front would, so the tests read replies as a client does.
        message: Result | Error
        match event:
            case Started():
                assert request_id not in self.started, "two Started events for one request"
                self.started.add(request_id)
                return
            case Finished():
                assert request_id in self.started, "Finished without Started"
                message = Result(
                    id=request_id,
                    status=event.status,
                    body=event.body.decoded(),
                    headers=dict(event.headers),
                    attempts=event.attempts,
                    timings=Timings(event.timings.queued, event.timings.upstream, event.timings.total),
                )
            case Failed():
                message = Error(
                    id=request_id,
                    kind=event.kind,
                    message=event.message,
                    status=event.status,
                    body=event.body.decoded() if event.body is not None else None,
                    headers=dict(event.headers),
                    attempts=event.attempts,
                )
        self.replies.append(message)
        self.arrived.set()

    def by_id(self) -> dict[object, Result | Error]:
        counts = Counter(reply.id for reply in self.replies)
        assert all(count == 1 for count in counts.values()), f"duplicate replies: {counts}"
        return {reply.id: reply for reply in self.replies}

    async def wait_for(self, count: int) -> None:
        while len(self.replies) < count:
            self.arrived = trio.Event()
            await self.arrived.wait()


def answered_after(seconds: float) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
    """An upstream that answers every request `ok_response` after ``seconds``."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(seconds)
        return ok_response(request)

    return handler


def ok_response(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={"object": "chat.completion", "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}},
        headers={"x-request-id": "req_test"},
    )


def submit(scheduler: Scheduler, sink: Sink, message: Submit) -> None:
    """Submit as the msgpack front does: the wire message becomes the core's RequestSpec."""
    spec = RequestSpec(
        endpoint=message.endpoint,
        body=message.body,
        method=message.method,
        deadline=message.deadline,
        max_attempts=message.max_attempts,
        priority=message.priority,
    )
    scheduler.submit(sink, message.id, spec)


def chat(request_id: object, **extra: Any) -> Submit:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    return Submit(id=request_id, endpoint="/v1/chat/completions", body=body, **extra)  # type: ignore[arg-type]


@asynccontextmanager
async def scheduler_with(
    handler: Handler,
    estimator: TokenEstimator,
    *,
    rpm: int = 10_000,
    tpm: int = 10_000_000,
    concurrency: int = 8,
    max_queued: int = 1000,
    max_attempts: int = 4,
    max_queued_bytes: int | None = None,
) -> AsyncIterator[Scheduler]:
    upstream = Upstream(
        OpenAISettings(api_key="sk-test-0123456789", base_url="http://upstream.test/v1"),
        max_connections=8,
        transport=lambda: httpx.MockTransport(handler),  # type: ignore[arg-type]
    )
    scheduler = Scheduler(
        ledger=Ledger(Limits(rpm=rpm, tpm=tpm), 60.0),
        upstream=upstream,
        estimator=estimator,
        max_concurrent_reqs=concurrency,
        max_queued=max_queued,
        default_max_attempts=max_attempts,
        max_queued_bytes=max_queued_bytes,
    )
    async with upstream, trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        yield scheduler
        nursery.cancel_scope.cancel()


async def test_a_request_is_answered_once_with_the_upstream_body(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url == "http://upstream.test/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer sk-test-0123456789"
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
    reply = sink.by_id()[1]
    assert isinstance(reply, Result)
    assert reply.body["object"] == "chat.completion"
    assert reply.attempts == 1
    assert reply.headers["x-request-id"] == "req_test"


async def test_server_errors_are_retried_with_backoff(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        if len(calls) < 3:
            return httpx.Response(500, json={"error": {"message": "boom", "type": "server_error"}})
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
    reply = sink.by_id()[1]
    assert isinstance(reply, Result) and reply.attempts == 3
    assert calls[1] - calls[0] >= 0.5 * 0.75  # the SDK's schedule, with jitter
    assert calls[2] - calls[1] >= 1.0 * 0.75


def _error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (400, _error("bad", "invalid_request_error", "context_length_exceeded"), "upstream_error"),
        (401, _error("key", "invalid_request_error", "invalid_api_key"), "upstream_error"),
        (404, _error("no", "invalid_request_error", "model_not_found"), "upstream_error"),
        (429, _error("You exceeded your current quota", "insufficient_quota", "insufficient_quota"), "rate_limited"),
        (
            429,
            _error("Request too large for gpt-4o. Limit 30000, Requested 31538.", "tokens", "rate_limit_exceeded"),
            "request_too_large",
        ),
    ],
)
async def test_final_errors_are_never_retried(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock, status: int, body: dict[str, Any], kind: str
) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json=body)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
    reply = sink.by_id()[1]
    assert isinstance(reply, Error)
    assert (reply.kind, reply.status, reply.body, reply.attempts) == (kind, status, body, 1)
    assert calls == 1


async def test_a_rate_limit_429_pauses_the_lane_for_the_named_wait(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        if len(calls) == 1:
            message = "Rate limit reached for gpt-4o-mini on tokens per min (TPM): Limit 100, Used 99. " + (
                "Please try again in 2s."
            )
            return httpx.Response(
                429,
                json={"error": {"message": message, "type": "tokens", "code": "rate_limit_exceeded"}},
                headers={"retry-after-ms": "2000"},
            )
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
        _, lanes = scheduler.statistics()
    reply = sink.by_id()[1]
    assert isinstance(reply, Result) and reply.attempts == 2
    assert calls[1] - calls[0] >= 2.0
    assert lanes["gpt-4o-mini"]["upstream_429s"] == 1
    assert lanes["gpt-4o-mini"]["retries"] == 1


async def test_attempts_are_bounded(estimator: TokenEstimator, autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, json={"error": {"message": "overloaded", "type": "server_error"}})

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        submit(scheduler, sink, chat(1, max_attempts=2))
        submit(scheduler, sink, chat(2))
        # Above the engine's: refused at once (a reviewer's finding: fault retries are not charged to a
        # tenant's caps, and a client could ask for any number of them).
        submit(scheduler, sink, chat(3, max_attempts=1000))
        await sink.wait_for(3)
    replies = sink.by_id()
    assert replies[1].attempts == 2 and replies[2].attempts == 4  # per request, else the engine default
    assert isinstance(replies[1], Error) and replies[1].kind == "upstream_error"
    assert isinstance(replies[2], Error) and replies[2].kind == "upstream_error"
    refused = replies[3]
    assert isinstance(refused, Error) and refused.kind == "invalid_request"
    assert "above the engine's max_attempts (4)" in refused.message
    assert calls == 6


async def test_connection_errors_are_retried_then_reported_unreachable(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, max_attempts=3) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
    reply = sink.by_id()[1]
    assert isinstance(reply, Error) and reply.kind == "upstream_unreachable" and reply.attempts == 3


async def test_deadline_cancels_the_upstream_call(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    finished = False

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal finished
        await trio.sleep(100)
        finished = True
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        submit(scheduler, sink, chat(1, deadline=5.0))
        await sink.wait_for(1)
        assert trio.current_time() < 10
    reply = sink.by_id()[1]
    assert isinstance(reply, Error) and reply.kind == "timeout"
    assert not finished


async def test_deadline_while_queued(estimator: TokenEstimator, autojump_clock: trio.testing.MockClock) -> None:
    # One request per minute: the second waits for budget and its deadline passes while it waits.
    sink = Sink("a")

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    async with scheduler_with(handler, estimator, rpm=1) as scheduler:
        submit(scheduler, sink, chat(1))
        submit(scheduler, sink, chat(2, deadline=3.0))
        await sink.wait_for(2)
        assert trio.current_time() < 10
    replies = sink.by_id()
    assert isinstance(replies[1], Result)
    assert isinstance(replies[2], Error) and replies[2].kind == "timeout" and replies[2].attempts == 0


def patient_chat(*, deadline: float, patience: float) -> RequestSpec:
    """A chat as the HTTP front submits it for an SDK: a deadline short of the SDK's timeout, its patience."""
    return RequestSpec(endpoint="/v1/chat/completions", body=chat(0).body, deadline=deadline, patience=patience)


async def test_an_attempt_sent_before_the_deadline_runs_on_until_the_client_gives_up(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """Cut at the deadline, an answer that would still reach the client in time is lost, and paid again."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(2.5)
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        scheduler.submit(sink, 1, patient_chat(deadline=2.0, patience=3.0))
        await sink.wait_for(1)
    assert isinstance(sink.by_id()[1], Result)


async def test_an_attempt_still_running_when_the_client_gives_up_is_cut_then(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(100)
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        scheduler.submit(sink, 1, patient_chat(deadline=2.0, patience=3.0))
        await sink.wait_for(1)
        # A moment after the client's own timeout, which fires first: its going away withdraws the request,
        # and the SDK raises its own timeout error rather than this answer, whichever clock started first.
        assert trio.current_time() == pytest.approx(3.0 + GIVE_UP_GRACE, abs=0.01)
    reply = sink.by_id()[1]
    assert isinstance(reply, Error) and reply.kind == "timeout" and reply.attempts == 1
    assert "the request's time (3s) ran out while the upstream was still answering" in reply.message


async def test_past_the_deadline_no_attempt_starts_however_patient_the_client(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """The deadline is when a request not yet sent gets its `timeout`, before its client gives up."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, rpm=1) as scheduler:
        submit(scheduler, sink, chat(1))
        scheduler.submit(sink, 2, patient_chat(deadline=2.0, patience=30.0))
        await sink.wait_for(2)
        assert trio.current_time() == pytest.approx(2.0, abs=0.01)
    reply = sink.by_id()[2]
    assert isinstance(reply, Error) and reply.kind == "timeout" and reply.attempts == 0
    assert "ran out while it waited for the rpm/tpm budget of model 'gpt-4o-mini'," in reply.message


async def test_a_client_that_waits_longer_than_the_read_timeout_gets_that_long(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """A slow reasoning model and an SDK timeout of 30 minutes: the engine's 10 minutes would cut the attempt
    and retry it from scratch, three times over."""
    read_timeouts: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        read_timeouts.append(request.extensions["timeout"]["read"])
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        scheduler.submit(sink, 1, patient_chat(deadline=1799.0, patience=1800.0))
        submit(scheduler, sink, chat(2, deadline=3000.0))  # a deadline is no patience: the read timeout holds
        # A client saying it waits for ever: a stalled upstream would hold a concurrency slot that long.
        scheduler.submit(sink, 3, patient_chat(deadline=1e300, patience=1e300))
        await sink.wait_for(3)
    assert read_timeouts == [1800.0, 600.0, MAX_STRETCHED_READ_TIMEOUT]


async def test_cancel_releases_the_reservation(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, concurrency=1) as scheduler:
        submit(scheduler, sink, chat("in-flight"))
        submit(scheduler, sink, chat("waiting-for-slot"))
        submit(scheduler, sink, chat("queued"))
        await trio.sleep(1)
        assert scheduler.cancel(sink, "waiting-for-slot")
        assert scheduler.cancel(sink, "queued")
        assert not scheduler.cancel(sink, "unknown")
        await sink.wait_for(2)
        release.set()
        await sink.wait_for(3)
        ledger_stats = scheduler._ledger.statistics()["gpt-4o-mini"]
    replies = sink.by_id()
    assert isinstance(replies["in-flight"], Result)
    assert replies["waiting-for-slot"].kind == "cancelled"  # type: ignore[union-attr]
    assert replies["queued"].kind == "cancelled"  # type: ignore[union-attr]
    # The reservation of the request that never reached the upstream went back to the budget.
    assert (ledger_stats.reservations, ledger_stats.refunds) == (2, 1)  # "queued" never held budget
    assert ledger_stats.in_flight == 0


async def test_disconnect_cancels_silently(estimator: TokenEstimator, autojump_clock: trio.testing.MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(100)
        return ok_response(request)

    gone, other = Sink("gone"), Sink("other")
    async with scheduler_with(handler, estimator, concurrency=2) as scheduler:
        for i in range(5):
            submit(scheduler, gone, chat(i))
        submit(scheduler, other, chat("x"))
        await trio.sleep(1)
        assert await scheduler.forget_owner(gone) == 5
        engine, _ = scheduler.statistics()
        assert engine["outstanding"] == 1
        await other.wait_for(1)
    assert isinstance(other.by_id()["x"], Result)


async def test_a_large_body_is_counted_below_the_event_loops_priority(estimator: TokenEstimator) -> None:
    # Counting a large body's tokens is background work: on a busy machine the kernel must give the event
    # loop (everyone else's replies) the CPU first. Linux sets niceness per thread.
    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread niceness is Linux's")
    loop_niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    counted_at: list[int] = []

    class Watching:
        def __getattr__(self, name: str) -> Any:
            return getattr(estimator, name)

        def estimate(self, *args: Any, **kwargs: Any) -> Any:
            counted_at.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return estimator.estimate(*args, **kwargs)

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        scheduler._estimator = Watching()  # type: ignore[assignment]
        message = chat(1)
        spec = RequestSpec(endpoint=message.endpoint, body=message.body)
        await scheduler.intake(sink, 1, spec, size_bytes=LARGE_BODY_BYTES)
        await sink.wait_for(1)
    assert isinstance(sink.by_id()[1], Result)
    assert counted_at == [min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + WORKER_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_niceness


async def test_queue_bound_and_too_large(estimator: TokenEstimator, autojump_clock: trio.testing.MockClock) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(10)
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, max_queued=2, tpm=100) as scheduler:
        huge_body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}
        huge = Submit(id=4, endpoint="/v1/chat/completions", body=huge_body)
        submit(scheduler, sink, huge)  # more than the whole per-minute budget: answered at once
        submit(scheduler, sink, chat(1))
        submit(scheduler, sink, chat(1))  # duplicate id while outstanding
        submit(scheduler, sink, chat(2))
        submit(scheduler, sink, chat(3))  # over the bound: answered at once
        replies = {reply.id: reply for reply in sink.replies}
        assert replies[3].kind == "overloaded"  # type: ignore[union-attr]
        assert replies[4].kind == "request_too_large"  # type: ignore[union-attr]
        # The duplicate is refused with a null id: id 1 still gets exactly one final reply, later.
        duplicate = replies[None]
        assert (
            isinstance(duplicate, Error) and duplicate.kind == "invalid_request" and "reused id 1" in duplicate.message
        )
        assert 1 not in replies


async def test_queued_bodies_are_bounded_in_bytes_and_the_room_comes_back(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(10)
        return ok_response(request)

    def sized(request_id: int, size: int) -> Submit:
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * size}]}
        return Submit(id=request_id, endpoint="/v1/chat/completions", body=body)

    sink = Sink("a")
    other = Sink("b")
    async with scheduler_with(handler, estimator, concurrency=1, max_queued_bytes=250_000) as scheduler:
        submit(scheduler, sink, sized(1, 100_000))  # in flight: its body is held until its answer
        submit(scheduler, other, sized(2, 100_000))
        submit(scheduler, sink, sized(3, 100_000))  # 300 kB in all: over the bound, answered at once
        submit(scheduler, sink, sized(4, 10_000))  # a small one still fits
        refused = sink.by_id()[3]
        assert isinstance(refused, Error) and refused.kind == "overloaded"
        assert "max_queued_bytes" in refused.message
        assert scheduler.statistics()[0]["queued_bytes"] > 210_000
        await sink.wait_for(2)  # the first answer (after the refusal) gives its room back
        assert isinstance(sink.by_id()[1], Result)
        submit(scheduler, sink, sized(5, 100_000))
        await sink.wait_for(4)
        await other.wait_for(1)
    assert all(isinstance(sink.by_id()[n], Result) for n in (1, 4, 5))
    assert isinstance(other.by_id()[2], Result)
    assert scheduler.statistics()[0]["queued_bytes"] == 0


async def test_one_client_holds_at_most_half_the_queue_in_requests_and_in_bytes(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """A reviewer's finding: a batch tenant capped at 1 rpm filled max_queued with 200,000 tiny requests in
    20 s, and from then on every interactive client's request was refused overloaded."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    filler, interactive = Sink("filler"), Sink("interactive")
    async with scheduler_with(handler, estimator, rpm=1, max_queued=10) as scheduler:
        for index in range(8):
            submit(scheduler, filler, chat(index))
        refused = [reply for reply in filler.replies if isinstance(reply, Error)]
        assert len(refused) == 3 and all(reply.kind == "overloaded" for reply in refused)
        assert "half of max_queued" in refused[0].message
        submit(scheduler, interactive, chat("mine"))
        assert interactive.replies == []  # accepted: it waits for the budget like the others
        assert scheduler.statistics()[0]["outstanding"] == 6

    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 100_000}]}
    async with scheduler_with(handler, estimator, rpm=1, max_queued_bytes=300_000) as scheduler:
        submit(scheduler, filler, Submit(id="a", endpoint="/v1/chat/completions", body=big))
        submit(scheduler, filler, Submit(id="b", endpoint="/v1/chat/completions", body=big))  # over 150 kB
        refused_bytes = filler.by_id()["b"]
        assert isinstance(refused_bytes, Error) and "half of max_queued_bytes" in refused_bytes.message
        submit(scheduler, interactive, Submit(id="c", endpoint="/v1/chat/completions", body=big))
        assert "c" not in interactive.by_id()


async def test_intake_refuses_a_large_body_for_want_of_room_before_measuring_it(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """Measuring a large body takes a worker thread's core; when the queue's bodies leave no room for it,
    that work was done for a request refused anyway."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(10)
        return ok_response(request)

    def chat_of(size: int) -> RequestSpec:
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * size}]}
        return RequestSpec(endpoint="/v1/chat/completions", body=body)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, concurrency=1, max_queued_bytes=300_000) as scheduler:
        await scheduler.intake(sink, 1, chat_of(200_000), size_bytes=200_000)
        measured = []
        measure = scheduler._measure
        scheduler._measure = lambda *args: measured.append(args) or measure(*args)  # type: ignore[method-assign]
        await scheduler.intake(sink, 2, chat_of(200_000), size_bytes=200_000)
        refused = sink.by_id()[2]
        assert isinstance(refused, Error) and refused.kind == "overloaded"
        assert measured == []
        await sink.wait_for(2)
    assert isinstance(sink.by_id()[1], Result)


async def test_a_body_larger_than_max_queued_bytes_alone_is_served(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, max_queued_bytes=1000) as scheduler:
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
        submit(scheduler, sink, Submit(id=1, endpoint="/v1/chat/completions", body=body))
        await sink.wait_for(1)
    assert isinstance(sink.by_id()[1], Result)


async def test_a_lowered_limit_fails_queued_requests_instead_of_the_engine(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1)
        response = ok_response(request)
        response.headers["x-ratelimit-limit-tokens"] = "1000"  # far below what the engine was told
        return response

    sink = Sink("a")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}
    async with scheduler_with(handler, estimator, concurrency=1, tpm=600_000) as scheduler:
        for i in range(4):
            submit(scheduler, sink, Submit(id=i, endpoint="/v1/chat/completions", body=body))
        await sink.wait_for(4)
        submit(scheduler, sink, chat("small"))
        await sink.wait_for(5)
    replies = sink.by_id()
    kinds = [reply.kind if isinstance(reply, Error) else "result" for reply in replies.values()]
    # The first (and one already reserved before the reply came back) may run; the rest are refused.
    assert set(kinds) == {"result", "request_too_large"} and kinds.count("request_too_large") >= 2
    assert isinstance(replies["small"], Result)


async def test_made_up_model_names_cannot_lock_real_models_out(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    from trio_mapper.engine.core.scheduler import MAX_LANES

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        for i in range(MAX_LANES + 10):
            submit(scheduler, sink, Submit(id=i, endpoint="/v1/embeddings", body={"model": f"junk-{i}", "input": "x"}))
        await sink.wait_for(MAX_LANES + 10)
        # Every lane has just spent budget the upstream still counts: none may be dropped and created afresh.
        submit(scheduler, sink, chat("too-soon"))
        await sink.wait_for(MAX_LANES + 11)
        await trio.sleep(60)  # the budgets have refilled: idle lanes can go
        submit(scheduler, sink, chat("real"))
        await sink.wait_for(MAX_LANES + 12)
        assert len(scheduler._lanes) <= MAX_LANES
    replies = sink.by_id()
    assert isinstance(replies["too-soon"], Error) and replies["too-soon"].kind == "overloaded"
    assert isinstance(replies["real"], Result)


async def test_one_flooding_client_does_not_starve_another(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    order: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        order.append(request.content.decode())
        await trio.sleep(1)
        return ok_response(request)

    flood, polite = Sink("flood"), Sink("polite")
    async with scheduler_with(handler, estimator, concurrency=1) as scheduler:
        for i in range(50):
            submit(scheduler, flood, chat(f"f{i}"))
        await trio.sleep(0.5)
        submit(scheduler, polite, chat("p"))
        await polite.wait_for(1)
        done_before_polite = len(flood.replies)
    # Round-robin between clients: the polite request waits for a handful of the flood, not all fifty.
    assert done_before_polite <= 3


async def test_shutdown_answers_queued_and_lets_in_flight_finish(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Sink("a")
    async with scheduler_with(answered_after(2), estimator, concurrency=2) as scheduler:
        for i in range(10):
            submit(scheduler, sink, chat(i))
        await trio.sleep(0.5)
        await scheduler.shutdown(grace_period=30)
        submit(scheduler, sink, chat("late"))
    replies = sink.by_id()
    assert len(replies) == 11
    kinds = Counter(reply.kind if isinstance(reply, Error) else "result" for reply in replies.values())
    assert kinds == {"result": 2, "shutting_down": 9}


async def test_a_reused_id_during_the_shutdown_is_not_taken_for_the_outstanding_requests_answer(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    # Regression: the shutdown's refusal came before the duplicate-id check, and carried the id: the client
    # took it for the final answer of the request still in flight under that id, which then ran on.
    sink = Sink("a")
    async with scheduler_with(answered_after(2), estimator) as scheduler, trio.open_nursery() as nursery:
        submit(scheduler, sink, chat(1))
        await trio.sleep(0.5)
        nursery.start_soon(scheduler.shutdown, 30)
        await trio.sleep(0.1)
        submit(scheduler, sink, chat(1))
    [refusal, answer] = sink.replies
    assert isinstance(refusal, Error) and refusal.id is None and refusal.kind == "invalid_request"
    assert answer.id == 1 and not isinstance(answer, Error)


async def test_grace_period_expiry_answers_in_flight(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1000)
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, concurrency=2) as scheduler:
        submit(scheduler, sink, chat(1))
        await trio.sleep(0.5)
        await scheduler.shutdown(grace_period=5)
        assert trio.current_time() < 10
    reply = sink.by_id()[1]
    assert isinstance(reply, Error) and reply.kind == "shutting_down"
    assert "may have processed it" in reply.message


def _rate_limited(wait_ms: int = 1000) -> httpx.Response:
    message = "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3."
    return httpx.Response(
        429,
        json={"error": {"message": message, "type": "requests", "code": "rate_limit_exceeded"}},
        headers={"retry-after-ms": str(wait_ms)},
    )


async def test_429s_do_not_use_up_max_attempts(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    # An upstream enforcing less than the engine was told answers 429 many times in a row: the request
    # waits for budget instead of failing rate_limited once max_attempts answers came back.
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return _rate_limited() if calls <= 10 else ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, max_attempts=2) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
    reply = sink.by_id()[1]
    assert isinstance(reply, Result) and reply.attempts == 11


async def test_faults_still_bound_attempts_when_mixed_with_429s(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls % 2:
            return _rate_limited()
        return httpx.Response(503, json={"error": {"message": "overloaded", "type": "server_error"}})

    sink = Sink("a")
    async with scheduler_with(handler, estimator, max_attempts=3) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
    reply = sink.by_id()[1]
    # Three 503s end it; the 429s between them were not counted.
    assert isinstance(reply, Error) and reply.kind == "upstream_error" and reply.attempts == 6


async def test_endless_429s_end_at_the_default_deadline(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return _rate_limited(wait_ms=600_000)  # beyond what the engine honours: it pauses for 120 s

    sink = Sink("a")
    async with scheduler_with(handler, estimator, max_attempts=2) as scheduler:
        scheduler.default_deadline = 1000.0
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
        answered_at = trio.current_time()
    reply = sink.by_id()[1]
    assert isinstance(reply, Error) and reply.kind == "timeout"
    assert "429" in reply.message and reply.attempts > 2
    assert 1000.0 <= answered_at <= 1001.0


def _live_jobs() -> int:
    import gc

    from trio_mapper.engine.core.scheduler import Job

    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Job))


async def test_submit_cancel_churn_holds_no_finished_jobs(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    # "Time out, cancel, resubmit" against a lane that waits for budget: the finished jobs must not pile up
    # in the lane's queue or the deadline heap behind a dispatcher that waits.
    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    before = _live_jobs()
    async with scheduler_with(handler, estimator, rpm=1, max_queued=100) as scheduler:
        submit(scheduler, sink, chat("first"))
        await sink.wait_for(1)  # the lane's budget is spent for a minute
        for i in range(20_000):
            submit(scheduler, sink, chat(i, deadline=600.0))
            assert scheduler.cancel(sink, i)
        assert all(isinstance(reply, Error) and reply.kind == "cancelled" for reply in sink.replies[1:])
        assert _live_jobs() - before <= 200


async def test_a_finished_job_does_not_keep_its_connection_alive(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    import weakref

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    async with scheduler_with(handler, estimator, rpm=1) as scheduler:
        keeper = Sink("keeper")
        submit(scheduler, keeper, chat("spend"))
        await keeper.wait_for(1)
        gone = Sink("gone")
        submit(scheduler, gone, chat(1, deadline=600.0))  # waits for budget, in the deadline heap
        await scheduler.forget_owner(gone)
        assert gone.replies == []  # nothing is delivered to a client that went away
        reference = weakref.ref(gone)
        del gone
        import gc

        gc.collect()
        assert reference() is None


async def test_an_unexpected_error_costs_one_request(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug while concluding one job (simulated by a classifier that fails on one body) answers that job
    # internal_error; the scheduler and the other requests carry on.
    import trio_mapper.engine.core.scheduler as scheduler_module

    real_classify = scheduler_module.classify_response

    def flaky_classify(status: int, headers: Any, body: Any) -> Any:
        if status == 203:
            raise RuntimeError("bug")
        return real_classify(status, headers, body)

    monkeypatch.setattr(scheduler_module, "classify_response", flaky_classify)

    async def handler(request: httpx.Request) -> httpx.Response:
        response = ok_response(request)
        if b'"poison"' in request.content:
            return httpx.Response(203, json={})
        return response

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        poisoned = chat("bad")
        poisoned.body["poison"] = True
        submit(scheduler, sink, poisoned)
        submit(scheduler, sink, chat("good"))
        await sink.wait_for(2)
        submit(scheduler, sink, chat("after"))
        await sink.wait_for(3)
        engine, _ = scheduler.statistics()
    replies = sink.by_id()
    assert isinstance(replies["bad"], Error) and replies["bad"].kind == "internal_error"
    assert isinstance(replies["good"], Result) and isinstance(replies["after"], Result)
    assert engine["internal_errors"] == 1 and engine["outstanding"] == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m" * 4_000_000, "input": "x"}, "model names have at most"),
        ({"model": "m", "input": "x", "extra": msgspec.msgpack.Ext(1, b"data")}, "JSON cannot represent"),
    ],
)
async def test_bad_bodies_are_refused_before_a_lane_exists(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock, body: dict[str, Any], message: str
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, tpm=1000) as scheduler:
        submit(scheduler, sink, Submit(id=1, endpoint="/v1/embeddings", body=body))
        too_large = {"model": "big", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}
        submit(scheduler, sink, Submit(id=2, endpoint="/v1/chat/completions", body=too_large))
        long_prompt = {"model": "big", "messages": [{"role": "user", "content": "word " * 100_000}], "max_tokens": 1}
        submit(scheduler, sink, Submit(id=3, endpoint="/v1/chat/completions", body=long_prompt))
        _, lanes = scheduler.statistics()
    replies = sink.by_id()
    assert isinstance(replies[1], Error) and replies[1].kind == "invalid_request" and message in replies[1].message
    assert isinstance(replies[2], Error) and replies[2].kind == "request_too_large"
    assert isinstance(replies[3], Error) and replies[3].kind == "request_too_large"
    assert "prompt alone has more than 1000 tokens" in replies[3].message
    assert lanes == {}


async def test_dated_snapshots_share_their_familys_lane(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator) as scheduler:
        for i, model in enumerate(["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20", "gpt-4-0613"]):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            submit(scheduler, sink, Submit(id=i, endpoint="/v1/chat/completions", body=body))
        await sink.wait_for(4)
        _, lanes = scheduler.statistics()
    assert sorted(lanes) == ["gpt-4", "gpt-4o"]
    assert lanes["gpt-4o"]["succeeded"] == 3


async def test_a_front_that_fails_to_take_a_success_gets_an_internal_error_instead(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    # The events' one exit from the core is fenced: the request still gets one final answer.
    class Fussy(Sink):
        def report(self, request_id: Any, event: Outcome) -> None:
            if isinstance(event, Finished):
                raise RuntimeError("the front's bug")
            super().report(request_id, event)

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Fussy("a")
    async with scheduler_with(handler, estimator) as scheduler:
        submit(scheduler, sink, chat(1))
        await sink.wait_for(1)
        submit(scheduler, sink, chat(2))
        await sink.wait_for(2)
        engine, _ = scheduler.statistics()
    replies = sink.by_id()
    assert all(isinstance(reply, Error) and reply.kind == "internal_error" for reply in replies.values())
    assert engine["internal_errors"] == 2 and engine["outstanding"] == 0


async def test_a_bug_while_admitting_gives_the_slot_and_the_budget_back(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    sink = Sink("a")
    async with scheduler_with(handler, estimator, concurrency=1) as scheduler:
        # A bug once the job holds both its reservation and its concurrency slot, just before the hand-over.
        real_set_state = scheduler._set_state
        failures = [RuntimeError("bug")]

        def flaky_set_state(job: Job, state: JobState) -> None:
            if state is JobState.IN_FLIGHT and failures:
                raise failures.pop()
            real_set_state(job, state)

        monkeypatch.setattr(scheduler, "_set_state", flaky_set_state)
        submit(scheduler, sink, chat("bad"))
        await sink.wait_for(1)
        submit(scheduler, sink, chat("good"))
        with trio.fail_after(600):  # a leaked slot would make it wait for good
            await sink.wait_for(2)
        ledger_stats = scheduler._ledger.statistics()["gpt-4o-mini"]
        limiter = scheduler.limiter.statistics()
    replies = sink.by_id()
    assert isinstance(replies["bad"], Error) and replies["bad"].kind == "internal_error"
    assert isinstance(replies["good"], Result)
    assert limiter.borrowed_tokens == 0 and ledger_stats.in_flight == 0
    assert (ledger_stats.reservations, ledger_stats.refunds) == (2, 1)


async def test_a_stream_its_client_does_not_read_is_ended_and_frees_its_slot(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that stops reading must not hold an upstream slot for as long as it keeps its connection."""
    chunk = b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'

    async def handler(request: httpx.Request) -> httpx.Response:
        if b'"stream":true' in request.content:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunk * 50)
        return ok_response(request)

    class Stalled(Sink):
        async def relay(self, request_id: Any, chunk: Chunk) -> None:
            await super().relay(request_id, chunk)
            await trio.sleep_forever()  # never reads on

    stalled, other = Stalled("stalled"), Sink("other")
    async with scheduler_with(handler, estimator, concurrency=1) as scheduler:
        streamed = chat(1)
        submit(scheduler, stalled, msgspec.structs.replace(streamed, body={**streamed.body, "stream": True}))
        await stalled.arrived.wait()
        started = trio.current_time()
        submit(scheduler, other, chat(2))
        await other.wait_for(1)
        waited = trio.current_time() - started
        await stalled.wait_for(1)
        engine, _ = scheduler.statistics()
    assert waited == pytest.approx(RELAY_STALL_TIMEOUT, abs=1)
    (cut,) = stalled.replies
    assert isinstance(cut, Error) and cut.kind == "timeout" and "kept this stream waiting" in cut.message
    assert isinstance(other.replies[0], Result)
    assert engine["outstanding"] == 0 and engine["in_flight"] == 0


async def test_a_stream_read_in_trickles_is_ended_once_it_has_waited_long_enough_in_all(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """A client taking a chunk every 20 s never made one wait 60 s, and held its slot for as long as it liked."""
    chunk = b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunk * 50)

    class Trickling(Sink):
        async def relay(self, request_id: Any, chunk: Chunk) -> None:
            await super().relay(request_id, chunk)
            await trio.sleep(20)

    trickling = Trickling("trickling")
    async with scheduler_with(handler, estimator) as scheduler:
        streamed = chat(1)
        submit(scheduler, trickling, msgspec.structs.replace(streamed, body={**streamed.body, "stream": True}))
        await trickling.wait_for(1)
        assert trio.current_time() == pytest.approx(RELAY_STALL_TIMEOUT, abs=1)
    (cut,) = trickling.replies
    assert isinstance(cut, Error) and cut.kind == "timeout" and "60s in all" in cut.message
    assert len(trickling.chunks[1]) == 3  # taken at 0, 20 and 40 s; the wait for the third read ran out at 60 s


async def test_many_requests_expiring_at_once_neither_hold_the_loop_nor_flood_the_log(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A reviewer's finding: 150,000 queued requests reaching a shared deadline held the event loop 5 s and
    wrote 150,000 warning lines."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return ok_response(request)

    count = 20 * JOBS_PER_CHECKPOINT
    first_failure = trio.Event()

    class Watched(Sink):
        def report(self, request_id: Any, event: Outcome) -> None:
            super().report(request_id, event)
            if isinstance(event, Failed):
                first_failure.set()

    sink = Watched("batch")
    seen_at_first_wake: list[int] = []
    async with scheduler_with(handler, estimator, rpm=1, max_queued=2 * count) as scheduler:  # one client: half
        for index in range(count):
            submit(scheduler, sink, chat(index, deadline=60.0))  # one sent, the rest wait for the budget

        async def watch() -> None:
            await first_failure.wait()
            seen_at_first_wake.append(len(sink.replies))

        with caplog.at_level(logging.WARNING, logger="trio_mapper.scheduler"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await sink.wait_for(count)
    timeouts = [reply for reply in sink.replies if isinstance(reply, Error) and reply.kind == "timeout"]
    assert len(timeouts) == count - 1
    lines = [record.getMessage() for record in caplog.records if "failed: timeout" in record.getMessage()]
    # Trio runs the tasks ready together in either order: with a checkpoint every JOBS_PER_CHECKPOINT, the
    # chance that the watcher waits for all of them is 2 ** -(checkpoints - 1).
    assert seen_at_first_wake[0] < count - 1, "other tasks run while the requests expire"
    assert any(" more requests failed: timeout" in line for line in lines)
    # The first few, one line for the rest, and at each checkpoint the one the lane's dispatcher takes.
    assert len(lines) <= TIMEOUT_LINES_PER_PASS + 1 + count // JOBS_PER_CHECKPOINT + 2
