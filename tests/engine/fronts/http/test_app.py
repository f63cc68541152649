"""The ASGI app alone, driven with plain ASGI messages and a fake scheduler (no sockets, no subprocess)."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Hashable
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trio_mapper.engine.core.outcome import Failed, ReplySink, RequestSpec
from trio_mapper.engine.fronts.http.app import BODY_TIMEOUT, PEER, TRANSPORT, OpenAIApp, Operation
from trio_mapper.engine.fronts.receiving import ReceivingBytes
from trio_mapper.engine.fronts.unix.peers import PeerCredentials
from trio_mapper.kinds import ErrorKind

ME = PeerCredentials(pid=1, uid=1234, gid=1234, groups=frozenset({1234}))


class FakeScheduler:
    def __init__(self, *, fail: bool = False, answer: bool = True) -> None:
        self.fail, self.answer = fail, answer
        self.specs: list[RequestSpec] = []
        self.owners: list[ReplySink] = []
        self.cancelled: list[Hashable] = []

    async def intake(self, owner: ReplySink, request_id: Hashable, spec: RequestSpec, *, size_bytes: int) -> None:
        self.specs.append(spec)
        self.owners.append(owner)
        if self.fail:
            raise RuntimeError("a bug")
        if self.answer:
            owner.report(request_id, Failed(kind=ErrorKind.INVALID_REQUEST, message="checked"))

    def cancel(self, owner: ReplySink, request_id: Hashable) -> bool:
        self.cancelled.append(request_id)
        owner.report(request_id, Failed(kind=ErrorKind.CANCELLED, message="cancelled by the client"))
        return True


def chat_scope(
    *, transport: str = "unix", peer: Any = ME, headers: dict[str, str] | None = None, get: str | None = None
) -> dict[str, Any]:
    """The ASGI scope of a POST /v1/chat/completions (or a GET of ``get``) as the server hands it to the app."""
    state: dict[str, Any] = {TRANSPORT: transport, PEER: peer} if transport == "unix" else {TRANSPORT: transport}
    return {
        "type": "http",
        "method": "GET" if get else "POST",
        "path": get or "/v1/chat/completions",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        "state": state,
    }


async def call(
    app: OpenAIApp,
    headers: dict[str, str] | None = None,
    *,
    disconnect: bool = False,
    peer: Any = ME,
    body: bytes = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode(),
) -> tuple[int | None, dict[str, str], Any]:
    scope = chat_scope(peer=peer, headers=headers)
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if not sent:
        return None, {}, None
    reply_headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], reply_headers, json.loads(sent[1]["body"])


async def test_the_read_timeout_sets_the_deadline_and_patience_and_only_openai_beta_is_offered() -> None:
    scheduler = FakeScheduler()
    headers = {
        "x-stainless-read-timeout": "10",
        "openai-beta": "assistants=v2",
        "authorization": "Bearer sk-client",
        "connection": "x-other",
        "x-other": "1",
    }
    status, _, body = await call(OpenAIApp(scheduler, max_body_bytes=10_000), headers)
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    spec = scheduler.specs[0]
    assert (spec.deadline, spec.patience) == (9.0, 10.0)
    assert dict(spec.headers) == {"openai-beta": "assistants=v2"}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # openai-node and openai-go send their timeout in whole seconds under this name, not the Python SDK's.
        ({"x-stainless-timeout": "20"}, (19.0, 20.0)),
        # Both: the Python SDK's read timeout is the one that bounds the wait for the reply's head.
        ({"x-stainless-read-timeout": "10", "x-stainless-timeout": "20"}, (9.0, 10.0)),
        ({"x-stainless-read-timeout": "soon", "x-stainless-timeout": "20"}, (19.0, 20.0)),
        # A timeout under a second is sent truncated to "0": no deadline can be drawn from it.
        ({"x-stainless-timeout": "0"}, (None, None)),
    ],
)
async def test_the_other_sdks_timeout_sets_the_deadline_too(
    headers: dict[str, str], expected: tuple[float | None, float | None]
) -> None:
    scheduler = FakeScheduler()
    await call(OpenAIApp(scheduler, max_body_bytes=10_000), headers)
    assert (scheduler.specs[0].deadline, scheduler.specs[0].patience) == expected


async def test_a_bug_in_intake_is_an_openai_shaped_500() -> None:
    status, headers, body = await call(OpenAIApp(FakeScheduler(fail=True), max_body_bytes=10_000))
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert headers["x-should-retry"] == "false"


async def test_a_client_that_goes_away_has_its_request_withdrawn() -> None:
    scheduler = FakeScheduler(answer=False)
    app = OpenAIApp(scheduler, max_body_bytes=10_000)
    assert await call(app, disconnect=True) == (None, {}, None)
    assert scheduler.cancelled == [1]
    assert app.stats.disconnected == 1 and app.active == 0


async def test_uids_outside_the_allow_list_are_refused_on_the_unix_socket() -> None:
    scheduler = FakeScheduler()
    app = OpenAIApp(scheduler, max_body_bytes=10_000, allowed_uids=[1])
    status, _, body = await call(app)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, _, body = await call(app, peer=None)
    assert status == 403
    app.allowed_uids = [1234]  # what a SIGHUP does
    status, _, _ = await call(app)
    assert status == 400 and len(scheduler.specs) == 1


async def test_bodies_over_the_limit_are_413() -> None:
    status, _, body = await call(OpenAIApp(FakeScheduler(), max_body_bytes=10))
    assert (status, body["error"]["code"]) == (413, "request_too_large")


async def test_a_body_that_stalls_is_answered_408_after_the_allowance(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = FakeScheduler()
    app = OpenAIApp(scheduler, max_body_bytes=10_000)
    scope = chat_scope()
    first = [{"type": "http.request", "body": b'{"model": ', "more_body": True}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if first:
            return first.pop(0)
        await trio.sleep_forever()  # the rest of the body never comes
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    started = trio.current_time()
    await app(scope, receive, send)
    assert trio.current_time() - started == BODY_TIMEOUT
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"
    assert scheduler.specs == []


async def test_a_bug_anywhere_in_a_request_is_an_openai_shaped_500() -> None:
    class Broken(FakeScheduler):
        def cancel(self, owner: ReplySink, request_id: Hashable) -> bool:
            raise RuntimeError("a bug while cancelling")

    status, headers, body = await call(OpenAIApp(Broken(answer=False), max_body_bytes=10_000), disconnect=True)
    assert status == 500 and headers["x-should-retry"] == "false"
    assert body["error"]["code"] == "internal_error"


async def test_a_bug_in_an_operator_route_is_an_openai_shaped_500() -> None:
    async def broken() -> Any:
        raise RuntimeError("a bug in the metrics provider")

    app = OpenAIApp(FakeScheduler(), max_body_bytes=10_000, operations={"/metrics": Operation(broken)})
    scope = chat_scope(get="/metrics")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert sent[0]["status"] == 500 and headers["x-should-retry"] == "false"
    assert json.loads(sent[1]["body"])["error"]["code"] == "internal_error"


async def test_an_empty_body_is_refused_saying_what_to_send() -> None:
    scheduler = FakeScheduler()
    status, _, body = await call(OpenAIApp(scheduler, max_body_bytes=10_000), body=b" ")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    assert "the body is empty; send the request's parameters as a JSON object" in body["error"]["message"]
    assert scheduler.specs == []


async def test_processes_of_one_uid_take_turns_as_clients_but_count_as_one_identity() -> None:
    """Over the Unix socket a process is the client (its SDK's pooled connections come and go), as a connection
    is on the msgpack socket; statistics name the uid."""
    scheduler = FakeScheduler()
    app = OpenAIApp(scheduler, max_body_bytes=10_000)
    for pid in (101, 102, 101):
        await call(app, peer=attrs.evolve(ME, pid=pid))
    first, second, again = scheduler.owners
    assert first.client_key != second.client_key and first.client_key == again.client_key
    assert first.identity == second.identity == "uid 1234"


def slow_uploader(replies: list[dict[str, Any]], first_part: int) -> tuple[Any, Any]:
    """An ASGI client that sends ``first_part`` bytes of its body, then nothing for 10 s, then goes away."""
    pieces = [{"type": "http.request", "body": b" " * first_part, "more_body": True}]

    async def receive() -> dict[str, Any]:
        if pieces:
            return pieces.pop(0)
        await trio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        replies.append(message)

    return receive, send


def assert_overloaded(reply: list[dict[str, Any]]) -> None:
    assert reply[0]["status"] == 503
    assert (b"retry-after", b"1") in reply[0]["headers"]
    assert json.loads(reply[1]["body"])["error"]["code"] == "overloaded"


async def test_bodies_being_received_at_once_have_a_total(autojump_clock: trio.testing.MockClock) -> None:
    """Each connection (each HTTP/2 stream) may hold a body for BODY_TIMEOUT: without a total, a few hundred
    slow uploads held gigabytes. Past it a body is refused 503, worth retrying; what was held is let go."""
    app = OpenAIApp(FakeScheduler(), max_body_bytes=10_000)
    app.receiving = ReceivingBytes(400)
    for other_client, size in enumerate((100, 100, 100, 30)):  # 330 of the 400 held by others
        assert app.receiving.try_hold(size, other_client)
    scope = chat_scope()
    replies: list[list[dict[str, Any]]] = [[], []]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope, *slow_uploader(replies[0], 40))
        await trio.sleep(1)
        await app(scope, *slow_uploader(replies[1], 40))  # 330 + 40 + 40: over the total, not the client's share
    assert replies[0] == []  # the first went away before its body was whole: nothing to answer
    assert_overloaded(replies[1])
    assert app.receiving.held == 330


async def test_one_client_holds_at_most_a_quarter_of_the_total(autojump_clock: trio.testing.MockClock) -> None:
    """One client's slow uploads (or a reviewer's) could hold the whole total, and every other client's
    bodies were refused 503 for as long as they were held."""
    app = OpenAIApp(FakeScheduler(), max_body_bytes=10_000)
    app.receiving = ReceivingBytes(400)
    replies: list[list[dict[str, Any]]] = [[], [], []]
    other = attrs.evolve(ME, uid=5678, pid=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, chat_scope(), *slow_uploader(replies[0], 60))
        await trio.sleep(1)
        await app(chat_scope(), *slow_uploader(replies[1], 60))  # 120 bytes of one uid: over its 100
        nursery.start_soon(app, chat_scope(peer=other), *slow_uploader(replies[2], 60))
        await trio.sleep(1)
        assert app.receiving.held == 120  # the other uid's body is being received
    assert_overloaded(replies[1])
    assert replies[0] == replies[2] == []
    assert app.receiving.held == 0


async def test_refused_keys_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Anyone may knock on the TCP port: a line per refusal let any local user flood the log."""
    app = OpenAIApp(FakeScheduler(), max_body_bytes=10_000)
    scope = chat_scope(transport="tcp", headers={"authorization": "Bearer wrong-key-0123456789"})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO, logger="trio_mapper.http"):
        for _ in range(100):
            await app(scope, receive, send)
    assert [message["status"] for message in sent if "status" in message] == [401] * 100
    assert (b"www-authenticate", b'Bearer realm="trio-mapper"') in sent[0]["headers"]  # RFC 9110: a 401 names it
    assert app.stats.unauthorized == 100
    assert len([record for record in caplog.records if "without a valid client key" in record.message]) == 1


async def test_a_large_body_is_decoded_with_the_collector_paused() -> None:
    """A body of many tiny containers ran the cyclic collector hundreds of times on the event loop."""
    body = b'{"model":"gpt-4o-mini","messages":[' + b",".join([b"{}"] * 200_000) + b"]}"
    scheduler = FakeScheduler()
    collections: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(note)
    try:
        status, _, _ = await call(OpenAIApp(scheduler, max_body_bytes=10 << 20), body=body)
    finally:
        gc.callbacks.remove(note)
    assert status == 400 and len(scheduler.specs[0].body["messages"]) == 200_000
    assert len(collections) <= 2, "the pass owed once the collector is back on, and perhaps one for the test"
    assert gc.isenabled()


async def test_a_base_url_without_v1_gets_a_404_that_says_so() -> None:
    """The commonest slip with an OpenAI-compatible server: base_url="http://127.0.0.1:8765"."""
    app = OpenAIApp(FakeScheduler(), max_body_bytes=10_000)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({**chat_scope(), "path": "/chat/completions"}, receive, send)
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 404 and error["code"] == "unknown_url"
    assert "did you mean /v1/chat/completions? A base URL for this engine ends in /v1" in error["message"]


async def test_a_compressed_body_is_a_415_that_says_to_send_it_plain() -> None:
    """A gzip body read as JSON gave "not valid JSON", which sent its sender looking in the wrong place."""
    scheduler = FakeScheduler()
    app = OpenAIApp(scheduler, max_body_bytes=10_000)
    status, headers, body = await call(app, {"content-encoding": "gzip"}, body=b"\x1f\x8b\x08\x00")
    assert status == 415
    assert headers["accept-encoding"] == "identity"  # RFC 7694: what the engine takes instead
    assert body["error"]["code"] == "unsupported_content_encoding"
    assert "send the body uncompressed" in body["error"]["message"]
    await call(app, {"content-encoding": "identity"})
    assert len(scheduler.specs) == 1  # the uncompressed body reached the core


async def test_a_bodys_bytes_stay_held_until_the_core_has_the_request() -> None:
    """Decoded and waiting for the token-counting thread, a body takes many times its size: a reviewer's
    25 bodies accepted at once peaked at 1.27 GiB, because their room was let go as soon as they arrived."""
    entered, leave = trio.Event(), trio.Event()

    class SlowIntake(FakeScheduler):
        async def intake(self, owner: ReplySink, request_id: Hashable, spec: RequestSpec, *, size_bytes: int) -> None:
            entered.set()
            await leave.wait()
            await super().intake(owner, request_id, spec, size_bytes=size_bytes)

    app = OpenAIApp(SlowIntake(), max_body_bytes=10_000)
    body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(call, app, body=body))
        await entered.wait()
        assert app.receiving.held == len(body)
        leave.set()
    assert app.receiving.held == 0
