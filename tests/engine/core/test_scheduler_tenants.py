"""The scheduler with tenants: attribution, daily token and cost budgets, priority requests (mock upstream,
mock clock). Ordering itself is tested on the fair queue alone (test_fair_queue.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from test_scheduler import Sink, chat, ok_response, submit

from trio_mapper.engine.budget import Ledger, Limits
from trio_mapper.engine.core.fair_queue import GUARD_EVERY
from trio_mapper.engine.core.scheduler import Scheduler
from trio_mapper.engine.core.tenants import Price, Prices, Tenant, Tenants
from trio_mapper.engine.estimate.tokens import TokenEstimator
from trio_mapper.engine.process.settings import OpenAISettings
from trio_mapper.engine.upstream.client import Upstream
from trio_mapper.wire import Error, Result, Submit


@pytest.fixture(scope="module")
def estimator() -> TokenEstimator:
    return TokenEstimator.load()


#: ok_response reports 10 prompt and 5 completion tokens: 10 x 0.1 + 5 x 0.2 = 2.0 per request.
PRICES = Prices({"gpt-4o-mini": Price(input=100_000, output=200_000)})


@asynccontextmanager
async def scheduler_for(
    tenants: Tenants, estimator: TokenEstimator, *, tpm: int = 10_000_000, handler: Any = ok_response
) -> AsyncIterator[Scheduler]:
    upstream = Upstream(
        OpenAISettings(api_key="sk-test-0123456789", base_url="http://upstream.test/v1"),
        max_connections=8,
        transport=lambda: httpx.MockTransport(handler),
    )
    scheduler = Scheduler(
        ledger=Ledger(Limits(rpm=10_000, tpm=tpm), 60.0),
        upstream=upstream,
        estimator=estimator,
        max_concurrent_reqs=4,
        max_queued=100,
        default_max_attempts=2,
        tenants=tenants,
        prices=PRICES,
    )
    async with upstream, trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        yield scheduler
        nursery.cancel_scope.cancel()


async def answered(sink: Sink, scheduler: Scheduler, request_id: int) -> Result | Error:
    expected = len(sink.replies) + 1  # a refusal is answered within submit
    submit(scheduler, sink, chat(request_id))
    await sink.wait_for(expected)
    return sink.replies[-1]


async def test_a_spent_daily_cost_budget_fails_new_requests_with_its_own_kind(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    frugal = Tenant("frugal", daily_cost=5.0, names=frozenset({"frugal"}))
    async with scheduler_for(Tenants((frugal,)), estimator) as scheduler:
        sink, other = Sink("frugal"), Sink("someone else")
        for request_id in range(3):  # 2.0 each: 6.0 spent, over the budget of 5.0
            assert isinstance(await answered(sink, scheduler, request_id), Result)
        stats = scheduler.tenant_statistics()
        assert stats["frugal"]["cost_24h"] == pytest.approx(6.0) and stats["default"]["cost_24h"] == 0.0
        refused = await answered(sink, scheduler, 3)
        assert isinstance(refused, Error) and refused.kind == "budget_exhausted"
        assert "daily cost budget" in refused.message
        # Other tenants are not affected.
        assert isinstance(await answered(other, scheduler, 0), Result)
        # A day later the spending has aged out.
        await trio.sleep(86_400)
        assert isinstance(await answered(sink, scheduler, 4), Result)


async def test_a_request_answered_without_usage_is_charged_its_estimated_cost(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    """A reviewer's finding: cost was charged from usage alone, so streams the client left (and failures)
    cost nothing, and a tenant limited by daily_cost alone could spend without limit so. The estimate is
    charged when the request is first sent, and replaced by the usage when it comes."""

    def refused(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "no", "type": "invalid_request_error"}})

    frugal = Tenant("frugal", daily_cost=5.0, names=frozenset({"frugal"}))
    async with scheduler_for(Tenants((frugal,)), estimator, handler=refused) as scheduler:
        sink = Sink("frugal")
        failed = await answered(sink, scheduler, 0)
        assert isinstance(failed, Error)
        # The estimate: its prompt at 0.1 a token, and its output budget (max_tokens 10) at 0.2.
        assert scheduler.tenant_statistics()["frugal"]["cost_24h"] >= 10 * 0.2
    async with scheduler_for(Tenants((frugal,)), estimator) as scheduler:
        sink = Sink("frugal")
        assert isinstance(await answered(sink, scheduler, 0), Result)
        assert scheduler.tenant_statistics()["frugal"]["cost_24h"] == pytest.approx(2.0)  # the usage's, in the end


async def test_a_spent_daily_token_budget_fails_new_requests(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    small = Tenant("small", daily_tokens=30, names=frozenset({"small"}))
    async with scheduler_for(Tenants((small,)), estimator) as scheduler:
        sink = Sink("small")
        first = await answered(sink, scheduler, 0)  # about 18 tokens charged (prompt + max_tokens 10)
        assert isinstance(first, Result)
        while isinstance(await answered(sink, scheduler, len(sink.replies)), Result):
            pass
        assert sink.replies[-1].kind == "budget_exhausted"  # type: ignore[union-attr]
        assert scheduler.tenant_statistics()["small"]["tokens_24h"] >= 30


async def test_priority_must_be_a_class_and_a_client_may_only_step_down(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    async with scheduler_for(Tenants(), estimator) as scheduler:
        sink = Sink("a")
        submit(scheduler, sink, chat(1, priority="urgent"))
        submit(scheduler, sink, chat(2, priority="batch"))
        submit(scheduler, sink, chat(3, priority="interactive"))  # above default: served as default
        await sink.wait_for(3)
    replies = sink.by_id()
    assert isinstance(replies[1], Error) and replies[1].kind == "invalid_request"
    assert "interactive, default, batch" in replies[1].message
    assert isinstance(replies[2], Result) and isinstance(replies[3], Result)


# --- a higher class overtakes a request waiting for the budget ----------------------------------------------

UI = Tenant("ui", priority="interactive", names=frozenset({"ui"}))
NIGHTLY = Tenant("nightly", priority="batch", names=frozenset({"nightly"}))


def labelled(label: str, max_tokens: int) -> Submit:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": label}], "max_tokens": max_tokens}
    return Submit(id=label, endpoint="/v1/chat/completions", body=body)


@asynccontextmanager
async def spent_key(estimator: TokenEstimator, sent: list[str]) -> AsyncIterator[tuple[Scheduler, Sink]]:
    """6,000 TPM: the lane's bucket holds a second of it, 100 tokens, all taken by a batch request that stays in
    flight for 100 s. A request costing more than the bucket waits for it to be full, then goes into debt
    (docs/ledger.md): whatever waits behind it then waits for the debt. ``sent`` gets each label as it goes."""

    async def handler(request: httpx.Request) -> httpx.Response:
        label = json.loads(request.content)["messages"][0]["content"]
        sent.append(label)
        if label == "hog":
            await trio.sleep(100)
        return ok_response(request)

    async with scheduler_for(Tenants((UI, NIGHTLY)), estimator, tpm=6_000, handler=handler) as scheduler:
        nightly = Sink("nightly")
        submit(scheduler, nightly, labelled("hog", 90))
        await trio.sleep(0.1)
        yield scheduler, nightly


async def test_an_interactive_request_overtakes_a_batch_request_waiting_for_the_budget(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    sent: list[str] = []
    async with spent_key(estimator, sent) as (scheduler, nightly):
        submit(scheduler, nightly, labelled("big batch", 3_000))  # waits for a full bucket, then 29 s of debt
        await trio.sleep(0.4)
        ui = Sink("ui")
        submit(scheduler, ui, labelled("interactive", 10))
        await ui.wait_for(1)
        # Served once its own tokens are there, not after the batch request's wait and debt (~30 s).
        assert trio.current_time() < 1
        assert sent == ["hog", "interactive"]
        await nightly.wait_for(1)
    assert sent == ["hog", "interactive", "big batch"]
    assert isinstance(ui.by_id()["interactive"], Result) and isinstance(nightly.by_id()["big batch"], Result)


@pytest.mark.parametrize("one_at_a_time", [True, False], ids=["again-and-again", "all-at-once"])
async def test_an_overtaken_request_goes_after_at_most_the_guards_count_of_higher_requests(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock, one_at_a_time: bool
) -> None:
    """However the interactive requests come (one at a time, each while the batch request waits again, or
    all at once), the batch request goes after GUARD_EVERY of them, as the fair queue's guard promises."""
    sent: list[str] = []
    async with spent_key(estimator, sent) as (scheduler, nightly):
        submit(scheduler, nightly, labelled("big batch", 3_000))
        await trio.sleep(0.4)
        ui = Sink("ui")
        for n in range(GUARD_EVERY + 5):
            submit(scheduler, ui, labelled(f"ui {n}", 10))
            if one_at_a_time:
                await ui.wait_for(n + 1)
                await trio.sleep(0.05)
        await ui.wait_for(GUARD_EVERY + 5)
        await nightly.wait_for(1)
    assert sent.index("big batch") == 1 + GUARD_EVERY  # after the hog and GUARD_EVERY interactive ones


async def test_an_overtaken_request_can_still_expire(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    sent: list[str] = []
    async with spent_key(estimator, sent) as (scheduler, nightly):
        expiring = Submit(
            id="expiring", endpoint="/v1/chat/completions", body=labelled("expiring", 3_000).body, deadline=1.0
        )
        submit(scheduler, nightly, expiring)
        await trio.sleep(0.4)
        ui = Sink("ui")
        submit(scheduler, ui, labelled("interactive", 10))
        await ui.wait_for(1)
        await nightly.wait_for(1)
        expired = nightly.by_id()["expiring"]
        assert isinstance(expired, Error) and expired.kind == "timeout"
        # The lane goes on: the next batch request is served once the budget allows.
        submit(scheduler, nightly, labelled("after", 10))
        await nightly.wait_for(2)
    assert sent == ["hog", "interactive", "after"]


async def test_an_overtaken_request_cancelled_while_it_waits_its_turn_leaves_the_lane_working(
    estimator: TokenEstimator, autojump_clock: trio.testing.MockClock
) -> None:
    sent: list[str] = []
    async with spent_key(estimator, sent) as (scheduler, nightly):
        submit(scheduler, nightly, labelled("big batch", 3_000))
        await trio.sleep(0.4)
        ui = Sink("ui")
        submit(scheduler, ui, labelled("interactive", 80))  # waits ~0.6 s for its own tokens
        await trio.sleep(0.1)
        assert scheduler.cancel(nightly, "big batch")  # held, behind the interactive request
        await nightly.wait_for(1)
        cancelled = nightly.by_id()["big batch"]
        assert isinstance(cancelled, Error) and cancelled.kind == "cancelled"
        await ui.wait_for(1)
        submit(scheduler, nightly, labelled("after", 10))
        await nightly.wait_for(2)
        await trio.sleep(5)
        engine, lanes = scheduler.statistics()
        # Nothing of the cancelled request is left: only the hog is outstanding, in flight.
        assert engine["outstanding"] == 1 and lanes["gpt-4o-mini"]["in_flight"] == 1
        assert lanes["gpt-4o-mini"]["queued"] == 0
    assert sent == ["hog", "interactive", "after"]
