"""The scheduler with tenants: attribution, daily token and cost budgets, priority requests (mock upstream,
mock clock). Ordering itself is tested on the fair queue alone (test_fair_queue.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing
from test_scheduler import Sink, chat, ok_response, submit

from trio_mapper.engine.budget import Ledger, Limits
from trio_mapper.engine.core.scheduler import Scheduler
from trio_mapper.engine.core.tenants import Price, Prices, Tenant, Tenants
from trio_mapper.engine.estimate.tokens import TokenEstimator
from trio_mapper.engine.process.settings import OpenAISettings
from trio_mapper.engine.upstream.client import Upstream
from trio_mapper.wire import Error, Result


@pytest.fixture(scope="module")
def estimator() -> TokenEstimator:
    return TokenEstimator.load()


#: ok_response reports 10 prompt and 5 completion tokens: 10 x 0.1 + 5 x 0.2 = 2.0 per request.
PRICES = Prices({"gpt-4o-mini": Price(input=100_000, output=200_000)})


@asynccontextmanager
async def scheduler_for(tenants: Tenants, estimator: TokenEstimator) -> AsyncIterator[Scheduler]:
    upstream = Upstream(
        OpenAISettings(api_key="sk-test-0123456789", base_url="http://upstream.test/v1"),
        max_connections=8,
        transport=lambda: httpx.MockTransport(ok_response),
    )
    scheduler = Scheduler(
        ledger=Ledger(Limits(rpm=10_000, tpm=10_000_000), 60.0),
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
        assert stats["frugal"]["cost_24h"] == 6.0 and stats["default"]["cost_24h"] == 0.0
        refused = await answered(sink, scheduler, 3)
        assert isinstance(refused, Error) and refused.kind == "budget_exhausted"
        assert "daily cost budget" in refused.message
        # Other tenants are not affected.
        assert isinstance(await answered(other, scheduler, 0), Result)
        # A day later the spending has aged out.
        await trio.sleep(86_400)
        assert isinstance(await answered(sink, scheduler, 4), Result)


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
