"""Priority classes from the client side: what each call puts on the ``Submit`` frame, and what a real engine
with tenants does with it.

The rule under test (docs/protocol.md, ``submit.priority``): a request may ask for its tenant's class or a
lower one; asking for a higher one gets the tenant's class, and a value that is not a class is refused. The
client refuses it itself (`ValueError`, nothing sent); an engine reached anyway answers ``invalid_request``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from client_fixtures import FakeEngine, remove_dir, short_socket_dir, socket_path_in
from conftest import running_engine, simulator

from trio_mapper.client import PRIORITY_CLASSES, AsyncClient, Client, InvalidRequestError, Request
from trio_mapper.client import core as client_core

CHAT = "/v1/chat/completions"
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
#: Hang guard of an end-to-end test.
GUARD = 60


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    """A fake engine that welcomes streams (minor 1), so every kind of submit can be looked at."""
    directory = short_socket_dir()
    engine = FakeEngine(socket_path_in(directory), minor=1).start()
    yield engine
    engine.stop()
    remove_dir(directory)


def priorities(engine: FakeEngine) -> list[str | None]:
    return [submit.priority for submit in engine.submits]


def test_the_classes_are_the_three_the_engine_knows() -> None:
    assert PRIORITY_CLASSES == ("interactive", "default", "batch")


# --- the drivers, against the fake engine -----------------------------------------------------------------


def test_blocking_client_sends_no_priority_unless_asked(fake: FakeEngine) -> None:
    with Client(fake.path) as client:
        assert client.priority is None
        client.request(CHAT, {"n": 1})
        client.request(CHAT, {"n": 2}, priority="batch")
    assert priorities(fake) == [None, "batch"]


def test_blocking_clients_default_priority_goes_on_every_call_that_names_none(fake: FakeEngine) -> None:
    with Client(fake.path, priority="batch") as client:
        assert client.priority == "batch"
        client.request(CHAT, {"n": 1})
        client.request_result(CHAT, {"n": 2}, priority="interactive")
        assert [chunk.data["echo"]["n"] for chunk in client.stream(CHAT, {"n": 3})] == [3]
        list(client.stream(CHAT, {"n": 4}, priority="default"))
        items = [{"n": 5}, Request(CHAT, {"n": 6}, priority="interactive")]
        assert len(list(client.map(items, endpoint=CHAT))) == 2
        assert len(list(client.map([{"n": 7}], endpoint=CHAT, priority="default"))) == 1
    by_n = {submit.body["n"]: submit.priority for submit in fake.submits}
    assert by_n == {1: "batch", 2: "interactive", 3: "batch", 4: "default", 5: "batch", 6: "interactive", 7: "default"}


def test_blocking_client_refuses_a_priority_that_is_not_a_class_before_sending(fake: FakeEngine) -> None:
    with pytest.raises(ValueError, match="'interactive', 'default', 'batch'"):
        Client(fake.path, priority="urgent")
    assert fake.hellos == []  # refused before connecting
    with Client(fake.path) as client:
        for call in (
            lambda: client.request(CHAT, {"n": 1}, priority="high"),
            lambda: client.request_result(CHAT, {"n": 1}, priority="BATCH"),
            lambda: client.stream(CHAT, {"n": 1}, priority=""),
            lambda: client.map([{"n": 1}], endpoint=CHAT, priority="low"),
        ):
            with pytest.raises(ValueError, match="one of 'interactive', 'default', 'batch'"):
                call()
        assert client.request(CHAT, {"n": 2})["echo"] == {"n": 2}  # nothing was sent; the connection is fine
    assert [submit.body for submit in fake.submits] == [{"n": 2}]


async def test_async_client_priority_on_trio(fake: FakeEngine) -> None:
    with pytest.raises(ValueError, match="'interactive', 'default', 'batch'"):
        AsyncClient(fake.path, priority="urgent")
    async with AsyncClient(fake.path, priority="batch") as client:
        assert client.priority == "batch"
        await client.request(CHAT, {"n": 1})
        await client.request_result(CHAT, {"n": 2}, priority="interactive")
        assert [chunk.data["echo"]["n"] async for chunk in client.stream(CHAT, {"n": 3}, priority="default")] == [3]
        async with client.map([{"n": 4}, Request(CHAT, {"n": 5}, priority="batch")], endpoint=CHAT) as results:
            assert len([item async for item in results]) == 2
        async with client.map([{"n": 6}], endpoint=CHAT, priority="interactive") as results:
            assert len([item async for item in results]) == 1
        with pytest.raises(ValueError, match="'interactive', 'default', 'batch'"):
            await client.request(CHAT, {"n": 0}, priority="high")
        with pytest.raises(ValueError, match="'interactive', 'default', 'batch'"):
            client.stream(CHAT, {"n": 0}, priority="high")
        with pytest.raises(ValueError, match="'interactive', 'default', 'batch'"):
            client.map([{"n": 0}], endpoint=CHAT, priority="high")
    by_n = {submit.body["n"]: submit.priority for submit in fake.submits}
    assert by_n == {1: "batch", 2: "interactive", 3: "default", 4: "batch", 5: "batch", 6: "interactive"}


def test_async_client_priority_on_asyncio(fake: FakeEngine) -> None:
    async def main() -> None:
        async with AsyncClient(fake.path, priority="default") as client:
            await client.request(CHAT, {"n": 1})
            await client.request(CHAT, {"n": 2}, priority="batch")
            async for _ in client.map([{"n": 3}], endpoint=CHAT, priority="interactive"):
                pass

    asyncio.run(main())
    assert priorities(fake) == ["default", "batch", "interactive"]


# --- a real engine with tenants ---------------------------------------------------------------------------


def write_tenants(path: Path, tenants: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, table in tenants.items():
        lines += [f"[tenants.{name}]", *(f"{key} = {json.dumps(value)}" for key, value in table.items()), ""]
    path.write_text("\n".join(lines))
    return path


TENANTS = {
    "nightly": {"priority": "interactive", "names": ["nightly"]},
    "bulk": {"priority": "batch", "names": ["bulk"]},
}


async def test_a_tenant_may_ask_for_a_lower_class_and_asking_higher_is_capped_not_refused(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_tenants(short_tmp / "tenants.toml", TENANTS)
    with trio.fail_after(GUARD):
        async with (
            simulator() as url,
            running_engine(short_tmp, url, "--config", str(config)) as engine,
            AsyncClient(engine.socket, client_name="nightly", priority="batch") as nightly,
            AsyncClient(engine.socket, client_name="bulk") as bulk,
        ):
            tenants = (await nightly.stats())["engine"]["tenants"]
            assert tenants["nightly"]["priority"] == "interactive" and tenants["nightly"]["tokens_24h"] == 0
            assert tenants["bulk"]["priority"] == "batch" and tenants["bulk"]["tokens_24h"] == 0

            # An interactive tenant asking for batch: its client-wide default, a call's own, a map's.
            body = await nightly.request(CHAT, BODY)
            assert body["object"] == "chat.completion"
            await nightly.request(CHAT, BODY, priority="batch")
            async with nightly.map([BODY] * 3, endpoint=CHAT, priority="batch") as results:
                outcomes = [item async for item in results]
            assert [item.ok for item in outcomes] == [True] * 3, [item.error for item in outcomes]
            # A batch tenant asking for more than its class: served (in its own class), not refused.
            assert (await bulk.request(CHAT, BODY, priority="interactive"))["object"] == "chat.completion"

            # A class that does not exist: the client refuses it, nothing reaches the engine.
            with pytest.raises(ValueError, match="'interactive', 'default', 'batch'"):
                await nightly.request(CHAT, BODY, priority="urgent")
            # Sent anyway (the client's check switched off), the engine refuses it: InvalidRequestError.
            monkeypatch.setattr(client_core, "check_priority", lambda priority: priority)
            with pytest.raises(InvalidRequestError, match="urgent"):
                await nightly.request(CHAT, BODY, priority="urgent")
            monkeypatch.undo()
            assert (await nightly.request(CHAT, BODY))["object"] == "chat.completion"  # the connection is fine

            tenants = (await nightly.stats())["engine"]["tenants"]
    # Every request went to its client's tenant: the hello names matched them.
    assert tenants["nightly"]["tokens_24h"] > tenants["bulk"]["tokens_24h"] > 0  # 6 requests against 1
    assert tenants["nightly"]["queued"] == 0 and tenants["bulk"]["queued"] == 0
