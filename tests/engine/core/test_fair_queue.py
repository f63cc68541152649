"""The fair queue alone: classes, the starvation guard, weighted shares in tokens, caps and client turns."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable

import attrs
import trio
import trio.testing

from trio_mapper.engine.core.fair_queue import GUARD_EVERY, FairQueue
from trio_mapper.engine.core.tenants import Cap, ClientIdentity, DailyUsage, Tenant, Tenants, class_rank

LANE_LIMITS = (1000, 100_000)


@attrs.define(eq=False)
class Request:
    client_key: Hashable
    tenant_name: str
    rank: int
    tokens: int


def tenants(*configured: Tenant) -> Tenants:
    return Tenants(tuple(configured))


def request(tenant: Tenant, tokens: int = 100, client: Hashable = "c", priority: str | None = None) -> Request:
    return Request(client, tenant.name, class_rank(priority or tenant.priority), tokens)


def drain(queue: FairQueue[Request], count: int, now: float = 0.0) -> list[Request]:
    popped = []
    for _ in range(count):
        job = queue.pop(now)
        assert isinstance(job, Request)
        popped.append(job)
    return popped


INTERACTIVE = Tenant("alice", priority="interactive", uids=frozenset({1000}))
BATCH = Tenant("nightly", priority="batch", uids=frozenset({2000}))


async def test_a_higher_class_goes_first_and_a_lower_one_is_never_starved() -> None:
    queue: FairQueue[Request] = FairQueue(tenants(INTERACTIVE, BATCH), LANE_LIMITS)
    batch = [request(BATCH) for _ in range(5)]
    for job in batch:
        queue.push(job)
    interactive = [request(INTERACTIVE) for _ in range(3 * GUARD_EVERY)]
    for job in interactive:
        queue.push(job)
    order = drain(queue, len(batch) + len(interactive))
    # Interactive first, but the batch gets one turn after every GUARD_EVERY interactive dispatches.
    assert order[:GUARD_EVERY] == interactive[:GUARD_EVERY]
    assert order[GUARD_EVERY] is batch[0]
    positions = [order.index(job) for job in batch]
    assert positions[:3] == [GUARD_EVERY, 2 * GUARD_EVERY + 1, 3 * GUARD_EVERY + 2]
    assert queue.pop(0.0) == math.inf


async def test_weights_share_a_class_in_tokens_not_requests() -> None:
    heavy = Tenant("heavy", priority="batch", weight=3.0, uids=frozenset({1}))
    light = Tenant("light", priority="batch", weight=1.0, uids=frozenset({2}))
    queue: FairQueue[Request] = FairQueue(tenants(heavy, light), LANE_LIMITS)
    # The light tenant sends huge prompts: fewer requests cannot buy it more than its share of tokens.
    for _ in range(400):
        queue.push(request(heavy, tokens=100))
    for _ in range(100):
        queue.push(request(light, tokens=1000))
    spent: Counter[str] = Counter()
    for job in drain(queue, 200):
        spent[job.tenant_name] += job.tokens
    share = spent["heavy"] / (spent["heavy"] + spent["light"])
    assert abs(share - 0.75) < 0.05, spent


async def test_a_tenant_back_from_idle_has_saved_no_credit() -> None:
    busy = Tenant("busy", uids=frozenset({1}))
    idle = Tenant("idle", uids=frozenset({2}))
    queue: FairQueue[Request] = FairQueue(tenants(busy, idle), LANE_LIMITS)
    for _ in range(50):
        queue.push(request(busy))
    drain(queue, 40)
    for _ in range(20):
        queue.push(request(idle))
    order = [job.tenant_name for job in drain(queue, 20)]
    # It alternates with the busy tenant rather than taking 40 turns in a row to catch up.
    assert order[:4].count("idle") == 2, order


async def test_clients_of_one_tenant_take_turns() -> None:
    queue: FairQueue[Request] = FairQueue(tenants(), LANE_LIMITS)
    default = Tenants().default
    flood = [request(default, client="flood") for _ in range(10)]
    for job in flood:
        queue.push(job)
    late = request(default, client="late")
    queue.push(late)
    assert drain(queue, 2)[1] is late


async def test_a_capped_tenant_waits_for_its_cap_and_others_go_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    capped = Tenant("capped", tpm_cap=Cap(absolute=6000), uids=frozenset({1}))  # 100 tokens a second
    free = Tenant("free", uids=frozenset({2}))
    queue: FairQueue[Request] = FairQueue(tenants(capped, free), LANE_LIMITS)
    for _ in range(3):
        queue.push(request(capped, tokens=100))
    now = trio.current_time()
    assert drain(queue, 1, now)[0].tenant_name == "capped"  # its one-second burst
    ready = queue.pop(now)
    assert ready == now + 1.0  # the next 100 tokens after one second of its pace
    queue.push(request(free))
    assert drain(queue, 1, now)[0].tenant_name == "free"  # others are not held behind it
    assert drain(queue, 1, now + 1.0)[0].tenant_name == "capped"


async def test_a_share_cap_follows_the_lane_limit_and_a_reload(autojump_clock: trio.testing.MockClock) -> None:
    capped = Tenant("capped", rpm_cap=Cap(share=0.06), uids=frozenset({1}))  # 6 % of 1000 rpm: 1 a second
    queue: FairQueue[Request] = FairQueue(tenants(capped), LANE_LIMITS)
    for _ in range(3):
        queue.push(request(capped))
    now = trio.current_time()
    drain(queue, 1, now)
    assert queue.pop(now) == now + 1.0
    # Reloaded with a bigger share: the same request goes sooner.
    queue.reconfigure(tenants(attrs.evolve(capped, rpm_cap=Cap(share=0.12))), LANE_LIMITS)
    assert queue.pop(now) == now + 0.5


async def test_a_removed_request_leaves_at_once() -> None:
    queue: FairQueue[Request] = FairQueue(tenants(), LANE_LIMITS)
    first, second = request(Tenants().default), request(Tenants().default)
    queue.push(first)
    queue.push(second)
    queue.remove(first)
    queue.remove(first)  # twice is harmless
    assert len(queue) == 1 and drain(queue, 1)[0] is second


def test_tenants_match_proofs_and_only_narrow_by_claimed_names() -> None:
    by_uid = Tenant("uid", uids=frozenset({1000}))
    by_key = Tenant("key", keys=frozenset({"ci"}))
    named = Tenant("named", uids=frozenset({1000}), names=frozenset({"nightly"}))
    claim_only = Tenant("claim", names=frozenset({"batch-job"}))
    configured = Tenants((named, by_uid, by_key, claim_only))
    assert configured.resolve(ClientIdentity(uid=1000, name="nightly")) is named
    assert configured.resolve(ClientIdentity(uid=1000)) is by_uid
    # A name alone cannot claim a tenant that requires a uid.
    assert configured.resolve(ClientIdentity(uid=1234, name="nightly")) is configured.default
    assert configured.resolve(ClientIdentity(key="ci")) is by_key
    assert configured.resolve(ClientIdentity(uid=1234, name="batch-job")) is claim_only
    assert configured.resolve(ClientIdentity()) is configured.default


def test_tenant_gids_match_supplementary_groups_too() -> None:
    staff = Tenant("staff", gids=frozenset({1500}))
    configured = Tenants((staff,))
    assert configured.resolve(ClientIdentity(uid=1000, gid=1500)) is staff
    assert configured.resolve(ClientIdentity(uid=1000, gid=1000, groups=frozenset({1000, 1500}))) is staff
    assert configured.resolve(ClientIdentity(uid=1000, gid=1000, groups=frozenset({1000, 27}))) is configured.default


def test_daily_usage_is_a_rolling_day_of_running_totals() -> None:
    usage = DailyUsage()
    for minute in range(2 * 1440):  # two days, one add a minute
        usage.add(10, 0.5, minute * 60.0)
    tokens, cost = usage.totals(2 * 1440 * 60.0 - 60.0)
    assert tokens == 1440 * 10 and cost == 1440 * 0.5
    assert usage.totals(10 * 86_400.0) == (0.0, 0.0)


async def test_dispatches_that_overtake_a_held_request_count_for_the_classes_below() -> None:
    """`pop(above=…)` serves only classes above a held request; the lower classes' guard must still count
    those dispatches, or a batch request waited up to twice GUARD_EVERY dispatches behind interactive ones."""
    queue: FairQueue[Request] = FairQueue(tenants(INTERACTIVE, BATCH), LANE_LIMITS)
    batch = request(BATCH)
    queue.push(batch)
    interactive = [request(INTERACTIVE) for _ in range(2 * GUARD_EVERY)]
    for job in interactive:
        queue.push(job)
    default_rank = class_rank("default")  # a default-class request is held beside the queue, being overtaken
    overtaking = [queue.pop(0.0, above=default_rank) for _ in range(GUARD_EVERY)]
    assert overtaking == interactive[:GUARD_EVERY]
    assert queue.pop(0.0) is batch, "the batch's turn comes after GUARD_EVERY dispatches, overtaking ones included"
