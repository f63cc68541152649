"""Client helpers (`trio_mapper.client`: the sync and aio drivers) against a fake engine on a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio.lowlevel
from client_fixtures import (
    FakeEngine,
    _Connection,
    remove_dir,
    short_socket_dir,
    socket_path_in,
)

from trio_mapper import paths
from trio_mapper.client import (
    AsyncClient,
    Client,
    MapResult,
    Request,
)
from trio_mapper.client.errors import (
    ERROR_CLASSES,
    ConnectionLost,
    EngineUnavailable,
    InvalidRequestError,
    ProtocolError,
    RateLimitedError,
    RequestCancelledError,
    TrioMapperError,
    UpstreamError,
    error_class_for,
    make_error,
    may_succeed_later,
)
from trio_mapper.paths import SOCKET_ENV_VAR
from trio_mapper.wire import PROTOCOL_VERSION, ErrorKind, Ping, RequestId

ENDPOINT = "/v1/chat/completions"
#: The hang guard of a ping: a round trip on this machine takes microseconds, never this long.
PING_GUARD = 10.0


@pytest.fixture
def socket_dir() -> Iterator[str]:
    directory = short_socket_dir()
    yield directory
    remove_dir(directory)


@pytest.fixture
def engine(socket_dir: str) -> Iterator[FakeEngine]:
    fake = FakeEngine(socket_path_in(socket_dir)).start()
    yield fake
    fake.stop()


def make_engine(socket_dir: str, **options: Any) -> FakeEngine:
    return FakeEngine(socket_path_in(socket_dir), **options).start()


@pytest.fixture
def pings(monkeypatch: pytest.MonkeyPatch) -> list[RequestId]:
    """The ids of the ping frames fake engines decode during the test, in order (each is answered as before)."""
    seen: list[RequestId] = []
    handle = _Connection.handle

    def counting_handle(self: _Connection, message: Any) -> None:
        if isinstance(message, Ping):
            with self.engine.lock:
                seen.append(message.id)  # before the pong goes out, so the client's return implies it
        handle(self, message)

    monkeypatch.setattr(_Connection, "handle", counting_handle)
    return seen


def assert_round_trip(seconds: object, pings: list[RequestId], count: int) -> None:
    """``ping()`` returned a measured round trip, after the engine got the ``count``-th ping frame."""
    assert isinstance(seconds, float)
    assert 0 < seconds < PING_GUARD
    assert len(pings) == count and len(set(pings)) == count, pings


async def until(predicate: Any) -> None:
    """Poll from async code (Trio or asyncio), letting the client's background tasks run meanwhile.

    Polling, not an Event: the state lives in the fake engine's threads.
    """
    with anyio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.005)


def in_a_thread(engine: FakeEngine, work: Any, guard: float = 60) -> Any:
    """Run blocking ``work()`` in a thread and return what it returned; if it is still running after ``guard``
    seconds (a hang guard), drop the engine's connections so that it ends, and fail."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(work()), daemon=True)
    thread.start()
    thread.join(guard)
    if thread.is_alive():
        engine.drop_connections()
        thread.join(5)
        raise AssertionError(f"still blocked after {guard} s")
    assert outcome, "the work raised (see the thread's traceback above)"
    return outcome[0]


# --- packaging --------------------------------------------------------------------------------------------


#: Heavy modules a client program must never load by importing the client helpers.
ENGINE_ONLY_IMPORTS = {"trio", "httpx", "httpcore", "h11", "hypercorn", "rich", "tiktoken", "attrs", "cattrs", "dotenv"}
#: Everything beyond the standard library that importing a client module may load, and why.
CLIENT_IMPORTS_ALLOWED = {
    "trio_mapper": "the package itself",
    "msgspec": "the protocol's encoding",
    "typing_extensions": "msgspec's own import",
}
#: What the async client adds, and only it.
ASYNC_CLIENT_IMPORTS = {"anyio": "AsyncClient runs on trio and asyncio through it", "sniffio": "anyio's own import"}


def fresh_interpreter(code: str) -> Any:
    """Run ``code`` in a new interpreter (this one has trio and anyio loaded already); return what it prints
    as JSON."""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(output.stdout)


@pytest.mark.parametrize(
    "module",
    [
        "trio_mapper.client",
        "trio_mapper.client.sync",
        "trio_mapper.client.core",
        "trio_mapper.client.errors",
        "trio_mapper.client.aio",
        "trio_mapper.wire",
    ],
)
def test_client_modules_import_light(module: str) -> None:
    loaded = set(
        fresh_interpreter(
            "import json, sys\n"
            "before = set(sys.modules)\n"
            f"import {module}\n"
            "new = {name.partition('.')[0] for name in set(sys.modules) - before}\n"
            "print(json.dumps(sorted(new - set(sys.stdlib_module_names))))\n"
        )
    )
    allowed = set(CLIENT_IMPORTS_ALLOWED) | (set(ASYNC_CLIENT_IMPORTS) if module.endswith(".aio") else set())
    assert loaded & ENGINE_ONLY_IMPORTS == set(), f"importing {module} pulled in {loaded & ENGINE_ONLY_IMPORTS}"
    assert loaded <= allowed, f"importing {module} pulled in {loaded - allowed}"
    assert {"trio_mapper", "msgspec"} <= loaded


def test_the_async_client_loads_on_first_use_only() -> None:
    # Through the package, as client programs import it: anyio arrives with the first use of AsyncClient.
    through_package = fresh_interpreter(
        "import json, sys\n"
        "import trio_mapper\n"
        "from trio_mapper import Client\n"
        "seen = [name in sys.modules for name in ('trio_mapper.client.aio', 'anyio')]\n"
        "from trio_mapper import AsyncClient\n"
        "seen += [name in sys.modules for name in ('trio_mapper.client.aio', 'anyio')]\n"
        "print(json.dumps(seen))\n"
    )
    assert through_package == [False, False, True, True]
    # The client package alone (trio_mapper's own __init__ not run): the same, on first use only.
    module_alone = fresh_interpreter(
        "import importlib.util, json, sys, types\n"
        "package = types.ModuleType('trio_mapper')\n"
        "package.__path__ = importlib.util.find_spec('trio_mapper').submodule_search_locations\n"
        "sys.modules['trio_mapper'] = package\n"
        "import trio_mapper.client as client\n"
        "seen = [name in sys.modules for name in ('trio_mapper.client.aio', 'anyio')]\n"
        "async_client = client.AsyncClient\n"
        "seen += [name in sys.modules for name in ('trio_mapper.client.aio', 'anyio')]\n"
        "print(json.dumps(seen + [async_client is sys.modules['trio_mapper.client.aio'].AsyncClient]))\n"
    )
    assert module_alone == [False, False, True, True, True]


# --- errors -----------------------------------------------------------------------------------------------


def test_every_error_kind_has_its_class() -> None:
    assert set(ERROR_CLASSES) == set(ErrorKind)
    for kind, cls in ERROR_CLASSES.items():
        assert issubclass(cls, TrioMapperError)
        assert error_class_for(kind) is cls
        assert error_class_for(str(kind)) is cls
    assert error_class_for("from_the_future") is TrioMapperError


def test_errors_pickle() -> None:
    error = RateLimitedError(
        "rate_limited", "quota", status=429, body={"error": {}}, headers={"a": "b"}, attempts=3, request_id=7
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RateLimitedError
    assert (copy.kind, copy.message, copy.status, copy.body, copy.headers, copy.attempts, copy.request_id) == (
        "rate_limited",
        "quota",
        429,
        {"error": {}},
        {"a": "b"},
        3,
        7,
    )
    lost = pickle.loads(pickle.dumps(ConnectionLost("gone", socket_path="/x.sock")))
    assert type(lost) is ConnectionLost and lost.socket_path == "/x.sock"


#: Every engine kind, and whether the same request sent again unchanged may succeed (`upstream_error`: by status).
MAY_SUCCEED_LATER = {
    ErrorKind.INVALID_REQUEST: False,
    ErrorKind.UPSTREAM_ERROR: None,
    ErrorKind.RATE_LIMITED: True,
    ErrorKind.REQUEST_TOO_LARGE: False,
    ErrorKind.OVERLOADED: True,
    ErrorKind.TIMEOUT: True,
    ErrorKind.CANCELLED: True,
    ErrorKind.SHUTTING_DOWN: True,
    ErrorKind.PROTOCOL_ERROR: False,
    ErrorKind.UPSTREAM_UNREACHABLE: True,
    ErrorKind.INTERNAL_ERROR: False,
    ErrorKind.FORBIDDEN: False,
    ErrorKind.BUDGET_EXHAUSTED: True,
}


def test_which_errors_may_succeed_later() -> None:
    assert set(MAY_SUCCEED_LATER) == set(ErrorKind), "classify the new kind"
    for kind, expected in MAY_SUCCEED_LATER.items():
        if expected is not None:
            assert may_succeed_later(make_error(kind, "x")) is expected, kind
    # An upstream_error is the request's fault but for the faults of the moment the engine retried.
    for status, expected in [(400, False), (401, False), (404, False), (422, False), (408, True), (409, True)]:
        assert may_succeed_later(make_error("upstream_error", "x", status=status)) is expected, status
    for status in (500, 502, 503, None):
        assert may_succeed_later(make_error("upstream_error", "x", status=status)), status
    assert may_succeed_later(ConnectionLost("gone")) and may_succeed_later(EngineUnavailable("none"))
    assert not may_succeed_later(make_error("from_the_future", "x"))  # unknown: nothing to promise


# --- blocking client --------------------------------------------------------------------------------------


def test_request_returns_body_and_forwards_fields(engine: FakeEngine) -> None:
    with Client(engine.path, client_name="tests") as client:
        assert client.welcome.server == "fake-engine"
        body = client.request(ENDPOINT, {"model": "m"}, deadline=2.5, max_attempts=3)
        result = client.request_result("/v1/models", {}, method="GET")
    assert body == {"echo": {"model": "m"}, "id": 1}
    assert result.status == 200 and result.headers == {"x-request-id": "req-2"}
    assert engine.hellos[0].protocol == PROTOCOL_VERSION and engine.hellos[0].client == "tests"
    first, second = engine.submits
    assert (first.endpoint, first.deadline, first.max_attempts, first.method) == (ENDPOINT, 2.5, 3, "POST")
    assert (second.endpoint, second.method) == ("/v1/models", "GET")


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_engine_errors_raise_typed_exceptions(engine: FakeEngine, kind: ErrorKind) -> None:
    body = {
        "error": kind.value,
        "message": "nope",
        "status": 400,
        "error_body": {"error": {"message": "bad"}},
        "headers": {"x-request-id": "abc"},
        "attempts": 2,
        "param": "messages[0].content",
    }
    with Client(engine.path) as client, pytest.raises(TrioMapperError) as caught:
        client.request(ENDPOINT, body)
    error = caught.value
    assert type(error) is ERROR_CLASSES[kind]
    assert error.kind == kind.value and error.message == "nope"
    assert error.status == 400 and error.body == {"error": {"message": "bad"}}
    assert error.headers == {"x-request-id": "abc"} and error.attempts == 2 and error.request_id == 1
    assert error.param == "messages[0].content"
    assert "nope" in str(error) and "400" in str(error)


def test_unknown_error_kind_maps_to_base_class(engine: FakeEngine) -> None:
    with Client(engine.path) as client:
        with pytest.raises(TrioMapperError) as caught:
            client.request(ENDPOINT, {"error": "brand_new_kind", "status": 418})
        assert type(caught.value) is TrioMapperError
        assert caught.value.kind == "brand_new_kind" and caught.value.status == 418
        # The connection is still usable afterwards.
        assert client.request(ENDPOINT, {"n": 1})["echo"] == {"n": 1}


def test_unknown_message_types_are_ignored(engine: FakeEngine) -> None:
    with Client(engine.path) as client:
        assert client.request(ENDPOINT, {"progress": True, "n": 1})["echo"]["n"] == 1


async def test_unknown_message_types_are_ignored_trio(engine: FakeEngine) -> None:
    async with AsyncClient(engine.path) as client:
        assert (await client.request(ENDPOINT, {"progress": True, "n": 1}))["echo"]["n"] == 1


def test_undecodable_reply_fails_its_request_only(engine: FakeEngine) -> None:
    with Client(engine.path) as client:
        with pytest.raises(ProtocolError, match="could not decode"):
            client.request(ENDPOINT, {"malformed": True})
        assert client.request(ENDPOINT, {"n": 2})["echo"]["n"] == 2


def test_socket_path_from_environment(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch, pings: list[RequestId]
) -> None:
    monkeypatch.setenv(SOCKET_ENV_VAR, engine.path)
    with Client() as client:
        assert str(client.socket_path) == engine.path
        assert_round_trip(client.ping(), pings, 1)


def test_explicit_socket_path_wins_over_environment(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch, socket_dir: str, pings: list[RequestId]
) -> None:
    monkeypatch.setenv(SOCKET_ENV_VAR, socket_dir + "/nothing-here.sock")
    with Client(engine.path) as client:
        assert_round_trip(client.ping(), pings, 1)


def test_no_engine_raises_engine_unavailable_with_advice(socket_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOCKET_ENV_VAR, raising=False)
    missing = socket_path_in(socket_dir)
    with pytest.raises(EngineUnavailable) as caught:
        Client(missing)
    message = str(caught.value)
    assert missing in message
    assert "trio-mapper launch-engine" in message
    assert SOCKET_ENV_VAR in message
    assert caught.value.socket_path == missing


def _no_socket_settings(monkeypatch: pytest.MonkeyPatch, socket_dir: str) -> tuple[str, str]:
    """The default paths moved into ``socket_dir``: (this user's engine's socket, the system service's)."""
    monkeypatch.delenv(SOCKET_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", os.path.join(socket_dir, "run-user"))
    system = os.path.join(socket_dir, "system.sock")
    monkeypatch.setattr(paths, "SYSTEM_SOCKET_PATH", Path(system))
    return os.path.join(socket_dir, "run-user", "trio-mapper", "engine.sock"), system


def test_the_default_socket_falls_back_to_the_system_services(
    socket_dir: str, monkeypatch: pytest.MonkeyPatch, pings: list[RequestId]
) -> None:
    """An operator's finding: on a machine with only the systemd service, clients given no socket looked for
    the per-user one alone, and every user had to set TRIO_MAPPER_SOCKET."""
    own, system = _no_socket_settings(monkeypatch, socket_dir)
    service = FakeEngine(system).start()
    try:
        with Client() as client:
            assert str(client.socket_path) == system
            assert_round_trip(client.ping(), pings, 1)
        os.makedirs(os.path.dirname(own))
        mine = FakeEngine(own).start()  # an engine of the user's own, once there, comes first
        try:
            with Client() as client:
                assert str(client.socket_path) == own
                assert 0 < client.ping() < PING_GUARD
            assert len(mine.connections) == 1 and len(service.connections) == 1
        finally:
            mine.stop()
    finally:
        service.stop()


async def test_the_async_client_falls_back_to_the_system_services_socket_trio(
    socket_dir: str, monkeypatch: pytest.MonkeyPatch, pings: list[RequestId]
) -> None:
    _, system = _no_socket_settings(monkeypatch, socket_dir)
    service = FakeEngine(system).start()
    try:
        async with AsyncClient() as client:
            assert str(client.socket_path) == system
            assert_round_trip(await client.ping(), pings, 1)
    finally:
        service.stop()


def test_no_socket_at_any_default_path_names_them_all(socket_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    own, system = _no_socket_settings(monkeypatch, socket_dir)
    with pytest.raises(EngineUnavailable) as caught:
        Client()
    message = str(caught.value)
    assert f"no socket at {own}" in message and f"nor at {system} (the system service's" in message
    assert "trio-mapper launch-engine" in message and "systemctl enable --now trio-mapper.socket" in message
    assert SOCKET_ENV_VAR in message
    assert caught.value.socket_path == own


#: The uid and gid the permission tests connect as: a user that owns nothing here.
NOBODY = 65534


@pytest.mark.parametrize("made_by", ["anyone may write", "another user"])
def test_a_default_socket_in_a_directory_another_user_could_have_made_is_refused(
    socket_dir: str, monkeypatch: pytest.MonkeyPatch, made_by: str
) -> None:
    """Without $XDG_RUNTIME_DIR the default socket is under /tmp, where another user may create
    trio-mapper-<uid> first and listen there in the engine's place, reading every request."""
    own, _ = _no_socket_settings(monkeypatch, socket_dir)
    os.makedirs(os.path.dirname(own))
    impostor = FakeEngine(own).start()
    try:
        if made_by == "anyone may write":
            os.chmod(os.path.dirname(own), 0o777)
        elif os.geteuid() == 0:
            os.chown(os.path.dirname(own), NOBODY, NOBODY)
        else:
            pytest.skip("giving a directory to another user takes root")
        with pytest.raises(EngineUnavailable, match="refusing the default socket") as caught:
            Client()
        assert "another user could be listening there" in str(caught.value) and SOCKET_ENV_VAR in str(caught.value)

        async def connect_async() -> None:
            async with AsyncClient():
                pass

        with pytest.raises(EngineUnavailable, match="refusing the default socket"):
            trio.run(connect_async)
        assert not impostor.connections
        with Client(own) as client:  # named, the path is the user's choice
            assert client.ping() > 0
    finally:
        impostor.stop()


#: Connects with the default settings but for the socket and prints what it raised.
CONNECT_AS_ANOTHER_USER = (
    "import sys\n"
    "from trio_mapper import Client, EngineUnavailable\n"
    "try:\n"
    "    Client(sys.argv[1])\n"
    "except EngineUnavailable as exc:\n"
    "    print(exc)\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user takes root")
@pytest.mark.parametrize("directory_mode", [0o755, 0o700])
def test_a_socket_this_user_may_not_open_says_who_may_and_how(socket_dir: str, directory_mode: int) -> None:
    """An operator's finding: a user outside the service's group was told to start an engine of their own,
    as if none ran. The socket is there: the message must say that its permissions keep this user out, and
    how to be let in."""
    directory = os.path.join(socket_dir, "engine")
    os.mkdir(directory)
    path = os.path.join(directory, "engine.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        os.chmod(path, 0o660)  # root:root 0660: the group and owner only, like the service's socket
        os.chmod(directory, directory_mode)
        os.chmod(socket_dir, 0o755)
        done = subprocess.run(
            [sys.executable, "-c", CONNECT_AS_ANOTHER_USER, path],
            capture_output=True,
            text=True,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            timeout=60,
        )
    finally:
        listener.close()
    if "ModuleNotFoundError" in done.stderr or "PermissionError" in done.stderr:
        pytest.skip(f"the checkout is not readable by uid {NOBODY}: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    message = done.stdout
    assert f"cannot reach the trio-mapper engine at {path}" in message and "permission denied" in message
    if directory_mode == 0o755:
        assert "the socket exists, but this user" in message and "may not connect to it" in message
        assert "root:root, mode 0660" in message
    else:
        assert f"the socket's directory {directory} is closed to this user" in message
    for setting in ("SocketGroup=", "usermod -aG trio-mapper", "socket_mode", "allowed_uids"):
        assert setting in message, (setting, message)
    assert "Start one with" not in message  # an engine runs: starting another is not the answer


def test_stale_socket_raises_engine_unavailable(socket_dir: str) -> None:
    path = socket_path_in(socket_dir)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: connect() is refused
    try:
        with pytest.raises(EngineUnavailable, match="refused"):
            Client(path)
    finally:
        stale.close()


def test_handshake_refused_raises_protocol_error(socket_dir: str) -> None:
    fake = make_engine(socket_dir, refuse="unsupported protocol 1; this engine speaks 2")
    try:
        with pytest.raises(ProtocolError) as caught:
            Client(fake.path)
        assert "unsupported protocol 1; this engine speaks 2" in str(caught.value)
        assert f"this client speaks protocol {PROTOCOL_VERSION}" in str(caught.value)
    finally:
        fake.stop()


def test_welcome_with_other_protocol_raises_protocol_error(socket_dir: str) -> None:
    fake = make_engine(socket_dir, protocol=PROTOCOL_VERSION + 98)
    try:
        with pytest.raises(ProtocolError, match=f"speaks protocol {PROTOCOL_VERSION + 98}"):
            Client(fake.path)
    finally:
        fake.stop()


def test_stats_and_ping(engine: FakeEngine, pings: list[RequestId]) -> None:
    with Client(engine.path) as client:
        assert client.stats() == {"engine": {"connections": 1}, "lanes": {"gpt-test": {"queued": 0}}}
        assert_round_trip(client.ping(), pings, 1)
        assert_round_trip(client.ping(), pings, 2)


def test_close_is_idempotent_and_final(engine: FakeEngine) -> None:
    client = Client(engine.path)
    client.close()
    client.close()
    assert client.closed
    with pytest.raises(ConnectionLost, match="closed"):
        client.request(ENDPOINT, {})


def test_oversized_request_is_refused_locally(socket_dir: str, pings: list[RequestId]) -> None:
    fake = make_engine(socket_dir, max_frame_bytes=1000)
    try:
        with Client(fake.path) as client:
            with pytest.raises(InvalidRequestError, match="at most 1000 bytes"):
                client.request(ENDPOINT, {"text": "x" * 2000})
            results = list(client.map([{"text": "x" * 2000}, {"text": "ok"}], endpoint=ENDPOINT))
            assert_round_trip(client.ping(), pings, 1)  # the connection is still in step
        assert len(fake.submits) == 1
        assert sorted(r.ok for r in results) == [False, True]
    finally:
        fake.stop()


def test_engine_dropping_the_connection_fails_its_requests_and_the_next_call_reconnects(engine: FakeEngine) -> None:
    with Client(engine.path) as client:
        with pytest.raises(ConnectionLost, match="closed the connection") as caught:
            client.request(ENDPOINT, {"die": True})
        assert caught.value.may_have_reached_upstream is True and caught.value.request_id == 1
        assert "It was not sent again" in str(caught.value) and "connects again on its next call" in str(caught.value)
        assert client.request(ENDPOINT, {"after": 1}) == {"echo": {"after": 1}, "id": 1}  # ids start again
        engine.drop_connections()  # while no call waits: the next one notices, and connects again
        assert client.request(ENDPOINT, {"after": 2})["echo"]["after"] == 2
        assert len(list(client.map([{"after": 3}], endpoint=ENDPOINT))) == 1
    assert len(engine.connections) == 3
    # The lost request was not sent again: exactly-once answers matter more than convenience.
    assert [submit.body for submit in engine.submits] == [{"die": True}, {"after": 1}, {"after": 2}, {"after": 3}]


def in_threads(count: int, work: Callable[[Client, int], None], client: Client) -> None:
    """Run ``work(client, n)`` for n in range(count), each in its own thread, and wait for them all."""
    threads = [threading.Thread(target=work, args=(client, n)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)


def test_threads_share_one_reconnection(engine: FakeEngine) -> None:
    outcomes: dict[int, Any] = {}

    def work(client: Client, n: int) -> None:
        outcomes[n] = client.request(ENDPOINT, {"n": n})

    with Client(engine.path) as client:
        engine.drop_connections()
        in_threads(8, work, client)
    assert {n: body["echo"]["n"] for n, body in outcomes.items()} == {n: n for n in range(8)}
    assert len(engine.connections) == 2


def test_a_failed_reconnection_raises_to_its_call_and_the_next_call_tries_again(socket_dir: str) -> None:
    fake = make_engine(socket_dir)
    with Client(fake.path) as client:
        fake.stop()
        with pytest.raises(EngineUnavailable, match="refused"):  # the socket file stays, nobody listens
            client.ping()
        with pytest.raises(EngineUnavailable, match="refused"):
            client.request(ENDPOINT, {})
        os.unlink(fake.path)
        fake = make_engine(socket_dir)
        try:
            assert client.request(ENDPOINT, {"back": True})["echo"] == {"back": True}
        finally:
            fake.stop()


def test_sync_connection_level_error_is_reported(engine: FakeEngine) -> None:
    with Client(engine.path) as client, pytest.raises(ConnectionLost, match="going away"):
        client.request(ENDPOINT, {"goodbye": "going away"})


def test_connection_lost_wakes_every_thread(engine: FakeEngine) -> None:
    errors: list[BaseException] = []

    def hold(client: Client) -> None:
        try:
            client.request(ENDPOINT, {"hold": True})
        except BaseException as exc:
            errors.append(exc)

    with Client(engine.path) as client:
        threads = [threading.Thread(target=hold, args=(client,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        engine.wait_for(lambda: len(engine.submits) == 4)
        engine.drop_connections()
        for thread in threads:
            thread.join(timeout=5)
    assert len(errors) == 4 and all(isinstance(e, ConnectionLost) for e in errors)


def test_threads_share_one_connection(engine: FakeEngine) -> None:
    outcomes: dict[int, Any] = {}

    def work(client: Client, n: int) -> None:
        # Later threads answer sooner: replies arrive out of order and must reach the right thread.
        outcomes[n] = client.request(ENDPOINT, {"n": n, "delay": 0.002 * (8 - n)})

    with Client(engine.path) as client:
        in_threads(8, work, client)
    assert {n: body["echo"]["n"] for n, body in outcomes.items()} == {n: n for n in range(8)}
    assert len(engine.connections) == 1


# --- blocking map -----------------------------------------------------------------------------------------


def test_map_bounds_the_window_and_yields_in_completion_order(socket_dir: str) -> None:
    fake = make_engine(socket_dir, batch=4)
    try:
        requests = [{"n": n, "last": n == 9} for n in range(10)]
        with Client(fake.path) as client:
            order = [item["n"] for item, _ in client.map(requests, endpoint=ENDPOINT, window=4)]
        # The fake answers each full window in reverse: completion order, not input order.
        assert order == [3, 2, 1, 0, 7, 6, 5, 4, 9, 8]
        assert fake.max_in_flight == 4
    finally:
        fake.stop()


def test_map_consumes_its_input_lazily(engine: FakeEngine) -> None:
    pulled = 0

    def endless() -> Iterator[dict[str, int]]:
        nonlocal pulled
        for n in itertools.count():
            pulled += 1
            yield {"n": n}

    with Client(engine.path) as client:
        results = client.map(endless(), endpoint=ENDPOINT, window=3)
        got = [next(results) for _ in range(5)]
        results.close()
    assert len(got) == 5
    assert pulled <= 5 + 3


def test_map_input_shapes_and_results(engine: FakeEngine) -> None:
    items: list[Any] = [
        Request(ENDPOINT, {"a": 1}, tag="row-1", deadline=9.0),
        (ENDPOINT, {"a": 2}),
        Request("/v1/embeddings", {"a": 3}, tag="row-3"),
        (ENDPOINT, {"error": "upstream_error", "status": 400}),
    ]
    with Client(engine.path) as client:
        results = list(client.map(items, deadline=1.5, max_attempts=2))
    by_body = {id(r.input): r for r in results}
    assert set(by_body) == {id(item) for item in items}
    first = by_body[id(items[0])]
    assert isinstance(first, MapResult) and first.ok and first.request.tag == "row-1"
    assert first.body["echo"] == {"a": 1} and first.result is not None and first.result.status == 200
    failed = by_body[id(items[3])]
    assert not failed.ok and isinstance(failed.error, UpstreamError) and failed.body is None
    item, outcome = failed
    assert item is items[3] and outcome is failed.error
    with pytest.raises(UpstreamError):
        failed.unwrap()
    deadlines = sorted((s.body.get("a", 0), s.deadline, s.max_attempts) for s in engine.submits)
    assert deadlines == [(0, 1.5, 2), (1, 9.0, 2), (2, 1.5, 2), (3, 1.5, 2)]
    assert {s.endpoint for s in engine.submits} == {ENDPOINT, "/v1/embeddings"}


def test_map_rejects_a_body_without_endpoint(engine: FakeEngine) -> None:
    with Client(engine.path) as client:
        with pytest.raises(TypeError, match="endpoint"):
            list(client.map([{"a": 1}]))
        with pytest.raises(ValueError, match="window"):
            client.map([], window=0)


def test_leaving_map_early_cancels_outstanding_requests(engine: FakeEngine) -> None:
    items = [{"quick": True}, {"hold": True}, {"hold": True}, {"hold": True}]
    with Client(engine.path) as client:
        for item, outcome in client.map(items, endpoint=ENDPOINT, window=4):
            assert item == {"quick": True} and outcome["echo"] == item
            break  # CPython closes the dropped generator right here
        engine.wait_for(lambda: sorted(engine.cancels) == [2, 3, 4])
        # The late Error(cancelled) replies are dropped; the connection carries on.
        assert client.request(ENDPOINT, {"after": 1})["echo"] == {"after": 1}


def test_map_connection_lost_is_raised(engine: FakeEngine) -> None:
    with Client(engine.path) as client, pytest.raises(ConnectionLost):
        list(client.map([{"hold": True}, {"die": True}], endpoint=ENDPOINT))


def test_map_reads_replies_while_it_writes(engine: FakeEngine) -> None:
    # Regression: map wrote its whole window before reading any reply. The fake, like the engine, stops
    # reading while its replies wait unread, so writing blocked for good once the socket buffers were full.
    count = 5_000

    def work() -> list[MapResult]:
        with Client(engine.path) as client:
            return list(client.map(({"n": n} for n in range(count)), endpoint=ENDPOINT, window=count))

    results = in_a_thread(engine, work)
    assert sorted(r.body["echo"]["n"] for r in results) == list(range(count))


def test_threads_share_the_connection_with_a_map(engine: FakeEngine) -> None:
    # Whichever thread waits does the I/O for all: requests from other threads complete during a big map,
    # and the map's replies keep flowing while those threads wait.
    count = 3_000

    def work() -> tuple[list[MapResult], dict[int, Any]]:
        outcomes: dict[int, Any] = {}
        with Client(engine.path) as client:

            def one(n: int) -> None:
                outcomes[n] = client.request(ENDPOINT, {"n": n, "delay": 0.001 * n})

            threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            results = list(client.map(({"m": m} for m in range(count)), endpoint=ENDPOINT, window=count))
            for thread in threads:
                thread.join()
        return results, outcomes

    results, outcomes = in_a_thread(engine, work)
    assert sorted(r.body["echo"]["m"] for r in results) == list(range(count))
    assert {n: body["echo"]["n"] for n, body in outcomes.items()} == {n: n for n in range(8)}


def _waiting_for_the_engine(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in `Client`'s poll() for the engine's next bytes."""
    frame = sys._current_frames().get(thread.ident or 0)
    if frame is None or frame.f_code is not Client._pump_once.__code__:
        return False
    lines, first = inspect.getsourcelines(Client._pump_once)
    return ".poll(" in lines[frame.f_lineno - first]


def test_ctrl_c_during_a_request_cancels_it_and_keeps_the_client(engine: FakeEngine, pings: list[RequestId]) -> None:
    # The interrupt lands where a user's Ctrl+C does: while the call waits for its reply. (Not in the
    # microseconds after a send() and before its count is recorded: nobody can know then what was written,
    # so the client closes the connection instead.)
    main = threading.current_thread()

    def interrupt_once_submitted() -> None:
        engine.wait_for(lambda: len(engine.submits) == 1)
        while not _waiting_for_the_engine(main):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    with Client(engine.path) as client:
        threading.Thread(target=interrupt_once_submitted, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            client.request(ENDPOINT, {"hold": True})
        engine.wait_for(lambda: engine.cancels == [1])
        assert_round_trip(client.ping(), pings, 1)
        assert client.request(ENDPOINT, {"after": 1})["echo"] == {"after": 1}
    assert engine.decode_errors == []


# --- AsyncClient on Trio ----------------------------------------------------------------------------------


async def test_async_request_trio(engine: FakeEngine, pings: list[RequestId]) -> None:
    async with AsyncClient(engine.path, client_name="trio-test") as client:
        assert client.welcome is not None and client.welcome.protocol == PROTOCOL_VERSION
        assert (await client.request(ENDPOINT, {"x": 1}, deadline=3.0))["echo"] == {"x": 1}
        result = await client.request_result(ENDPOINT, {"x": 2})
        assert result.headers == {"x-request-id": "req-2"}
        assert await client.stats() == {"engine": {"connections": 1}, "lanes": {"gpt-test": {"queued": 0}}}
        assert_round_trip(await client.ping(), pings, 1)
        with pytest.raises(RateLimitedError) as caught:
            await client.request(ENDPOINT, {"error": "rate_limited", "status": 429})
        assert caught.value.status == 429
    assert engine.hellos[0].client == "trio-test"
    assert engine.submits[0].deadline == 3.0


async def test_async_concurrent_requests_share_one_connection_trio(engine: FakeEngine) -> None:
    outcomes: dict[int, Any] = {}

    async with AsyncClient(engine.path) as client:

        async def one(n: int) -> None:
            outcomes[n] = await client.request(ENDPOINT, {"n": n, "delay": 0.002 * (20 - n)})

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(one, n)
    assert {n: body["echo"]["n"] for n, body in outcomes.items()} == {n: n for n in range(20)}
    assert len(engine.connections) == 1 and engine.max_in_flight > 1


async def test_cancelling_an_async_request_cancels_it_in_the_engine_trio(engine: FakeEngine) -> None:
    async with AsyncClient(engine.path) as client:
        async with trio.open_nursery() as nursery:

            async def held() -> None:
                await client.request(ENDPOINT, {"hold": True})

            nursery.start_soon(held)
            await until(lambda: len(engine.submits) == 1)
            nursery.cancel_scope.cancel()
        await until(lambda: engine.cancels == [1])
        # move_on_after, the everyday form, does the same.
        with trio.move_on_after(0.01):
            await client.request(ENDPOINT, {"hold": True})
        await until(lambda: engine.cancels == [1, 2])
        assert not client._core.outstanding
        assert (await client.request(ENDPOINT, {"after": 1}))["echo"] == {"after": 1}


async def test_engine_vanishing_fails_every_waiter_trio(engine: FakeEngine) -> None:
    errors: list[BaseException] = []
    async with AsyncClient(engine.path) as client:

        async def held() -> None:
            try:
                await client.request(ENDPOINT, {"hold": True})
            except ConnectionLost as exc:
                errors.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(held)
                await until(lambda: len(engine.submits) == 5)
                engine.drop_connections()
        assert len(errors) == 5
        assert all("closed the connection" in str(e) and e.may_have_reached_upstream for e in errors)
        # The next calls connect again; the five lost requests are not sent again.
        assert await client.request(ENDPOINT, {"after": 1}) == {"echo": {"after": 1}, "id": 1}
        assert [r.body["echo"]["a"] async for r in client.map([{"a": 1}], endpoint=ENDPOINT)] == [1]
    assert len(engine.connections) == 2
    assert len(engine.submits) == 5 + 2


async def test_concurrent_calls_share_one_reconnection_and_a_map_made_meanwhile_waits_for_it_trio(
    engine: FakeEngine,
) -> None:
    async with AsyncClient(engine.path) as client:
        engine.drop_connections()
        await until(lambda: client._core.closed)
        results = client.map([{"m": 1}, {"m": 2}], endpoint=ENDPOINT)  # not a coroutine: connects when iterated
        outcomes: dict[int, Any] = {}

        async def one(n: int) -> None:
            outcomes[n] = await client.request(ENDPOINT, {"n": n})

        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(one, n)
        assert {n: body["echo"]["n"] for n, body in outcomes.items()} == {n: n for n in range(10)}
        assert sorted([r.body["echo"]["m"] async for r in results]) == [1, 2]
    assert len(engine.connections) == 2


async def test_async_map_connection_lost_trio(engine: FakeEngine) -> None:
    async with AsyncClient(engine.path) as client:
        with trio.fail_after(5), pytest.raises(ConnectionLost):
            async for _ in client.map([{"hold": True}, {"die": True}], endpoint=ENDPOINT):
                pass


async def test_a_lost_async_map_says_which_items_had_been_sent_trio(engine: FakeEngine) -> None:
    # A program that carries on after a restart (`trio-mapper map`) must know which of a map's items may have
    # run, so as never to send those twice, and which never left: those it can send again.
    pulled_after_the_loss = anyio.Event()

    async def items() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        yield {"n": 2, "hold": True}
        yield {"n": 3, "die": True}  # the fake engine closes the connection on reading it
        await until(lambda: client._core.closed)
        pulled_after_the_loss.set()
        yield {"n": 4}

    async with AsyncClient(engine.path) as client:
        results = client.map(items(), endpoint=ENDPOINT, window=4)
        assert results.lost == []
        with trio.fail_after(5):
            assert (await anext(results)).input == {"n": 1}
            await pulled_after_the_loss.wait()
            await until(lambda: len(results.lost) == 3)  # the feeder took item 4 and found the connection gone
            with pytest.raises(ConnectionLost):
                await anext(results)
        lost = results.lost
        assert [item.input["n"] for item in lost] == [2, 3, 4]
        assert all(isinstance(item.error, ConnectionLost) for item in lost)
        assert [item.error.may_have_reached_upstream for item in lost] == [True, True, False]  # type: ignore[union-attr]
        assert [submit.body["n"] for submit in engine.submits] == [1, 2, 3]


async def test_async_no_engine_trio(socket_dir: str) -> None:
    with pytest.raises(EngineUnavailable, match="launch-engine"):
        async with AsyncClient(socket_path_in(socket_dir)):
            pass


async def test_async_handshake_refused_trio(socket_dir: str) -> None:
    fake = make_engine(socket_dir, refuse="unsupported protocol")
    try:
        with pytest.raises(ProtocolError, match="unsupported protocol"):
            async with AsyncClient(fake.path):
                pass
    finally:
        fake.stop()


async def test_async_client_requires_async_with(engine: FakeEngine) -> None:
    client = AsyncClient(engine.path)
    with pytest.raises(RuntimeError, match="async with"):
        await client.request(ENDPOINT, {})


async def test_async_map_window_and_order_trio(socket_dir: str) -> None:
    fake = make_engine(socket_dir, batch=4)
    try:
        requests = [{"n": n, "last": n == 9} for n in range(10)]
        async with AsyncClient(fake.path) as client:
            order = [r.input["n"] async for r in client.map(requests, endpoint=ENDPOINT, window=4)]
        assert order == [3, 2, 1, 0, 7, 6, 5, 4, 9, 8]
        assert fake.max_in_flight == 4
    finally:
        fake.stop()


async def test_async_map_accepts_async_iterables_trio(engine: FakeEngine) -> None:
    async def produce() -> AsyncIterator[Request]:
        for n in range(5):
            await trio.lowlevel.checkpoint()
            yield Request(ENDPOINT, {"n": n}, tag=n)

    async with AsyncClient(engine.path) as client:
        tags = sorted([r.request.tag async for r in client.map(produce(), window=2)])
    assert tags == [0, 1, 2, 3, 4]
    assert engine.max_in_flight <= 2


async def test_async_map_answers_while_its_input_waits_trio(engine: FakeEngine) -> None:
    # Regression: the map filled its window from the input before handing back any answer, so while a slow
    # input waited for its 4th item the first 3 answers (in long ago) waited too.
    more = trio.Event()

    async def produce() -> AsyncIterator[Request]:
        for n in range(3):
            yield Request(ENDPOINT, {"n": n}, tag=n)
        await more.wait()
        yield Request(ENDPOINT, {"n": 3}, tag=3)

    tags: list[int] = []
    async with AsyncClient(engine.path) as client:
        with trio.fail_after(10):  # hang guard
            async with client.map(produce(), window=8) as results:
                async for result in results:
                    tags.append(result.request.tag)
                    if len(tags) == 3:
                        assert not more.is_set()  # the 3 answers came while the input was waiting
                        more.set()
    assert sorted(tags[:3]) == [0, 1, 2] and tags[3] == 3


async def test_async_map_raises_what_its_input_raises_trio(engine: FakeEngine) -> None:
    async def produce() -> AsyncIterator[dict[str, int]]:
        yield {"n": 0}
        raise LookupError("the input broke")

    async with AsyncClient(engine.path) as client:
        with pytest.raises(LookupError, match="the input broke"):
            async for _ in client.map(produce(), endpoint=ENDPOINT):
                pass
        with pytest.raises(TypeError, match="endpoint"):
            async for _ in client.map([{"a": 1}]):
                pass
        assert (await client.request(ENDPOINT, {"after": 1}))["echo"] == {"after": 1}


async def test_async_map_reads_replies_while_it_writes_trio(engine: FakeEngine) -> None:
    count = 5_000
    async with AsyncClient(engine.path) as client:
        with trio.fail_after(60):  # hang guard
            results = [r async for r in client.map(({"n": n} for n in range(count)), endpoint=ENDPOINT, window=count)]
    assert sorted(r.body["echo"]["n"] for r in results) == list(range(count))


async def test_async_map_break_cancels_outstanding_trio(engine: FakeEngine) -> None:
    items = [{"quick": True}, {"hold": True}, {"hold": True}]
    async with AsyncClient(engine.path) as client:
        async for result in client.map(items, endpoint=ENDPOINT):
            assert result.input == {"quick": True}
            break
        await until(lambda: sorted(engine.cancels) == [2, 3])
        # With `async with`, the cancel happens at a precise point, however the loop is left.
        async with client.map(items, endpoint=ENDPOINT) as results:
            async for _ in results:
                break
        await until(lambda: sorted(engine.cancels) == [2, 3, 5, 6])
        assert not client._core.outstanding


async def test_cancelling_the_scope_around_map_cancels_outstanding_trio(engine: FakeEngine) -> None:
    async with AsyncClient(engine.path) as client:
        results: list[MapResult] = []
        with trio.CancelScope() as scope:
            async for result in client.map([{"hold": True}] * 3 + [{"quick": True}], endpoint=ENDPOINT):
                results.append(result)
                scope.cancel()
        assert [r.input for r in results] == [{"quick": True}]
        await until(lambda: sorted(engine.cancels) == [1, 2, 3])


async def test_cancelled_writes_never_leave_half_a_frame_trio(engine: FakeEngine, pings: list[RequestId]) -> None:
    big = "x" * 300_000
    with trio.fail_after(10):  # a torn frame would leave the engine waiting for bytes that never come
        async with AsyncClient(engine.path) as client:
            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(client.request, ENDPOINT, {"n": n, "hold": True, "big": big})
                await until(lambda: len(engine.submits) >= 1)
                nursery.cancel_scope.cancel()
            # The engine decoded the ping that followed the cancelled writes: the framing is intact.
            assert_round_trip(await client.ping(), pings, 1)
            await until(lambda: len(engine.cancels) == len(engine.submits))
    assert engine.decode_errors == []


async def test_aclose_is_idempotent_and_fails_waiters_trio(engine: FakeEngine) -> None:
    async with AsyncClient(engine.path) as client:
        errors: list[BaseException] = []

        async def held() -> None:
            try:
                await client.request(ENDPOINT, {"hold": True})
            except ConnectionLost as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held)
            await until(lambda: len(engine.submits) == 1)
            await client.aclose()
            await client.aclose()
        assert len(errors) == 1 and client.closed


async def test_errors_raised_inside_async_with_are_not_wrapped_trio(engine: FakeEngine) -> None:
    with pytest.raises(ValueError, match="mine"):
        async with AsyncClient(engine.path):
            raise ValueError("mine")
    group = ExceptionGroup("user group", [KeyError("k")])
    with pytest.raises(ExceptionGroup) as caught:
        async with AsyncClient(engine.path):
            raise group
    assert caught.value is group


async def test_connection_level_error_is_reported_in_connection_lost_trio(engine: FakeEngine) -> None:
    async with AsyncClient(engine.path) as client:
        with pytest.raises(ConnectionLost, match="engine stopping for maintenance") as caught:
            await client.request(ENDPOINT, {"goodbye": "engine stopping for maintenance"})
        assert isinstance(caught.value.__cause__, TrioMapperError)
        assert caught.value.__cause__.kind == "shutting_down"


async def test_a_write_failing_before_the_goodbye_is_read_still_learns_what_never_ran_trio(
    engine: FakeEngine,
) -> None:
    # Regression: the engine closing made the client's next write fail before its reader had taken the goodbye,
    # and the write's failure closed the connection first: the requests outstanding were reported as ones
    # that may have run, although the goodbye said the engine never read them.
    outcomes: dict[str, BaseException] = {}

    async def call(name: str, body: dict[str, Any]) -> None:
        with pytest.raises(ConnectionLost) as caught:
            await client.request(ENDPOINT, body)
        outcomes[name] = caught.value

    async with AsyncClient(engine.path) as client, trio.open_nursery() as nursery:
        nursery.start_soon(call, "held", {"hold": True})
        await until(lambda: len(engine.submits) == 1)
        nursery.start_soon(call, "goodbye", {"goodbye": "shutting down", "stop_reading": 0.3})
        await until(lambda: len(engine.submits) == 2)
        nursery.start_soon(call, "written into the closing connection", {"x": 1})
    assert len(outcomes) == 3
    for name, error in outcomes.items():
        assert isinstance(error, ConnectionLost) and error.may_have_reached_upstream is False, (name, error)
        assert "it never ran" in error.message


# --- AsyncClient on asyncio -------------------------------------------------------------------------------


def test_async_client_on_asyncio(engine: FakeEngine, pings: list[RequestId]) -> None:
    async def main() -> None:
        async with AsyncClient(engine.path) as client:
            assert (await client.request(ENDPOINT, {"x": 1}))["echo"] == {"x": 1}
            bodies = await asyncio.gather(
                *(client.request(ENDPOINT, {"n": n, "delay": 0.002 * (10 - n)}) for n in range(10))
            )
            assert [b["echo"]["n"] for b in bodies] == list(range(10))
            with pytest.raises(RequestCancelledError):
                await client.request(ENDPOINT, {"error": "cancelled"})
            assert (await client.stats())["lanes"] == {"gpt-test": {"queued": 0}}
            # Client-side timeout → Cancel frame for that id.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.request(ENDPOINT, {"hold": True}), 0.02)
            await until(lambda: len(engine.cancels) == 1)
            # map, with a break that cancels the outstanding request.
            seen = []
            async for result in client.map([{"hold": True}, {"quick": 1}], endpoint=ENDPOINT):
                seen.append(result.body["echo"])
                break
            assert seen == [{"quick": 1}]
            await until(lambda: len(engine.cancels) == 2)
            assert_round_trip(await client.ping(), pings, 1)

    asyncio.run(main())


def test_async_map_answers_while_its_input_waits_on_asyncio(engine: FakeEngine) -> None:
    async def main() -> list[int]:
        more = asyncio.Event()

        async def produce() -> AsyncIterator[dict[str, int]]:
            for n in range(3):
                yield {"n": n}
            await more.wait()
            yield {"n": 3}

        seen: list[int] = []
        async with AsyncClient(engine.path) as client:
            async for result in client.map(produce(), endpoint=ENDPOINT):
                seen.append(result.input["n"])
                if len(seen) == 3:
                    assert not more.is_set()
                    more.set()
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 10))  # hang guard
    assert sorted(seen[:3]) == [0, 1, 2] and seen[3] == 3


def test_errors_raised_inside_async_with_are_not_wrapped_on_asyncio(engine: FakeEngine) -> None:
    async def main() -> None:
        async with AsyncClient(engine.path):
            raise ValueError("mine")

    with pytest.raises(ValueError, match="mine"):
        asyncio.run(main())


def test_native_asyncio_cancellation_never_tears_a_frame(engine: FakeEngine, pings: list[RequestId]) -> None:
    # asyncio.wait_for cancels natively, which goes through anyio's shields: only the writer task may write.
    big = "x" * 300_000

    async def main() -> None:
        async with AsyncClient(engine.path) as client:
            tasks = [
                asyncio.ensure_future(client.request(ENDPOINT, {"n": n, "hold": True, "big": big})) for n in range(20)
            ]
            await until(lambda: len(engine.submits) >= 1)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert_round_trip(await asyncio.wait_for(client.ping(), PING_GUARD), pings, 1)
            await until(lambda: len(engine.cancels) == len(engine.submits))
            assert not client._core.outstanding

    asyncio.run(main())
    assert engine.decode_errors == []


def test_engine_vanishing_on_asyncio(engine: FakeEngine) -> None:
    async def main() -> tuple[list[BaseException | Any], Any]:
        async with AsyncClient(engine.path) as client:
            waiters = [asyncio.ensure_future(client.request(ENDPOINT, {"hold": True})) for _ in range(3)]
            await until(lambda: len(engine.submits) == 3)
            engine.drop_connections()
            lost = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
            return lost, await asyncio.wait_for(client.request(ENDPOINT, {"after": 1}), 5)

    outcomes, after = asyncio.run(main())
    assert len(outcomes) == 3 and all(isinstance(o, ConnectionLost) for o in outcomes)
    assert after == {"echo": {"after": 1}, "id": 1} and len(engine.connections) == 2


def test_async_no_engine_on_asyncio(socket_dir: str) -> None:
    async def main() -> None:
        async with AsyncClient(socket_path_in(socket_dir)):
            pass

    with pytest.raises(EngineUnavailable, match=SOCKET_ENV_VAR):
        asyncio.run(main())


# --- against the real engine ------------------------------------------------------------------------------


def _chat(content: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 8}


async def test_both_clients_against_the_real_engine(short_tmp: Any) -> None:
    from conftest import running_engine, simulator

    async with simulator() as url, running_engine(short_tmp, url) as engine:
        path = str(engine.socket)
        async with AsyncClient(path) as client:
            body = await client.request(ENDPOINT, _chat("hello"))
            assert body["object"] == "chat.completion"
            with pytest.raises(InvalidRequestError):
                await client.request("https://elsewhere.example/v1/chat/completions", _chat("no"))
            results = [r async for r in client.map((_chat(f"q{n}") for n in range(30)), endpoint=ENDPOINT, window=8)]
            assert len(results) == 30 and all(r.ok for r in results)
            stats = await client.stats()
            assert stats["engine"]["accepted"] == 1 + 30
            assert stats["lanes"]["gpt-4o-mini"]["succeeded"] == 1 + 30
            seconds = await client.ping()  # the real engine's pong: no fake to count the ping
            assert isinstance(seconds, float) and 0 < seconds < PING_GUARD

        def blocking() -> None:
            with Client(path) as sync_client:
                assert sync_client.request(ENDPOINT, _chat("hi"))["object"] == "chat.completion"
                outcomes = list(sync_client.map([(ENDPOINT, _chat(f"s{n}")) for n in range(10)], window=4))
                assert all(r.ok for r in outcomes) and len(outcomes) == 10
                assert sync_client.stats()["engine"]

        await trio.to_thread.run_sync(blocking)


#: Chats against `_restart_simulator`: one output token answers at once, 200 take 10 s (the engine dies first).
FAST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "quick"}], "max_tokens": 1}
SLOW = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 200}


async def test_both_clients_reconnect_after_the_engine_restarts_and_resend_nothing(short_tmp: Any) -> None:
    """An operator's finding: after `systemctl restart trio-mapper`, a long-running program's clients raised
    ConnectionLost on every call for ever. Now: the requests in flight when the engine went away fail,
    saying they may have run, and are never sent again; while no engine listens, each call raises
    EngineUnavailable at once; once one listens on the same socket again, the next call is served by it."""
    from conftest import running_engine, simulator

    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(
            simulator(per_token_latency_ms=50.0, output_tokens_min=200, output_tokens_max=200)
        )
        first = await stack.enter_async_context(running_engine(short_tmp, url))
        path = str(first.socket)
        client = await stack.enter_async_context(AsyncClient(path))
        blocking = await trio.to_thread.run_sync(Client, path)
        stack.callback(blocking.close)
        assert (await client.request(ENDPOINT, FAST))["object"] == "chat.completion"
        assert (await trio.to_thread.run_sync(blocking.request, ENDPOINT, FAST))["object"] == "chat.completion"

        # A crash (or a stop whose grace period ran out) with a request of each client at the upstream.
        lost: list[BaseException] = []

        async def in_flight(call: Any) -> None:
            with pytest.raises(ConnectionLost) as caught:
                await call()
            lost.append(caught.value)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight, lambda: client.request(ENDPOINT, SLOW))
                nursery.start_soon(in_flight, lambda: trio.to_thread.run_sync(blocking.request, ENDPOINT, SLOW))
                while True:
                    if (await client.stats())["engine"]["outstanding"] == 2:
                        break
                    await trio.sleep(0.02)  # the engine's counters: its stats are the only way to watch them
                first.process.kill()
                await first.process.wait()  # its listening socket closed too, not only our connections
        assert len(lost) == 2
        for error in lost:
            assert error.may_have_reached_upstream is True, error
            assert "was outstanding" in error.message and "may have sent it upstream" in error.message
            assert "It was not sent again" in error.message and "connects again on its next call" in error.message

        # No engine behind the socket: each call tries once and says so, no hidden retry loop.
        with trio.fail_after(5):
            with pytest.raises(EngineUnavailable, match="connection refused"):
                await client.request(ENDPOINT, FAST)
            with pytest.raises(EngineUnavailable, match="connection refused"):
                await trio.to_thread.run_sync(blocking.ping)

        second = await stack.enter_async_context(running_engine(short_tmp, url))
        assert second.socket == first.socket
        assert (await client.request(ENDPOINT, FAST))["object"] == "chat.completion"
        assert (await trio.to_thread.run_sync(blocking.request, ENDPOINT, FAST))["object"] == "chat.completion"
        stats = await client.stats()
        blocking_stats = await trio.to_thread.run_sync(blocking.stats)
        assert stats["engine"]["pid"] == blocking_stats["engine"]["pid"] == second.process.pid
        assert stats["engine"]["accepted"] == 2  # the two new requests; the lost ones were not sent again

        # A graceful restart while the clients are idle, as `systemctl restart` does: nothing to see but
        # the next call being served by the next engine.
        assert await second.stop() == 0
        third = await stack.enter_async_context(running_engine(short_tmp, url))
        assert (await client.request(ENDPOINT, FAST))["object"] == "chat.completion"
        assert (await trio.to_thread.run_sync(blocking.request, ENDPOINT, FAST))["object"] == "chat.completion"
        assert (await client.stats())["engine"]["pid"] == third.process.pid


#: More requests in one window than the engine queues replies for before it stops reading a connection
#: (10,000: docs/protocol.md, Session item 8).
FLOOD = 40_000
#: Hang guard of the flood tests: they take seconds; a deadlocked client would never finish.
FLOOD_GUARD = 300


def _refused_at_once(n: int) -> dict[str, Any]:
    """A chat body without a model: the engine answers ``invalid_request`` as it reads it, with no upstream call."""
    return {"messages": [{"role": "user", "content": f"q{n}"}]}


async def test_blocking_map_reads_while_it_writes_against_the_real_engine(short_tmp: Any) -> None:
    # Regression: Client.map wrote its whole window before reading. Answered at once, the replies filled the
    # engine's queue, the engine stopped reading, sendall blocked, and nobody read: a deadlock.
    from conftest import running_engine, simulator

    async with simulator() as url, running_engine(short_tmp, url) as engine:

        def blocking() -> list[MapResult]:
            with Client(str(engine.socket)) as client:
                items = (_refused_at_once(n) for n in range(FLOOD))
                results = list(client.map(items, endpoint=ENDPOINT, window=FLOOD))
                assert client.request(ENDPOINT, _chat("after"))["object"] == "chat.completion"
                return results

        with trio.fail_after(FLOOD_GUARD):
            results = await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
    assert len(results) == FLOOD
    assert all(isinstance(r.error, InvalidRequestError) for r in results)
    assert sorted(int(r.input["messages"][0]["content"][1:]) for r in results) == list(range(FLOOD))


async def test_async_map_reads_while_it_writes_against_the_real_engine(short_tmp: Any) -> None:
    from conftest import running_engine, simulator

    async with simulator() as url, running_engine(short_tmp, url) as engine, AsyncClient(str(engine.socket)) as client:
        with trio.fail_after(FLOOD_GUARD):
            items = (_refused_at_once(n) for n in range(FLOOD))
            results = [r async for r in client.map(items, endpoint=ENDPOINT, window=FLOOD)]
            assert (await client.request(ENDPOINT, _chat("after")))["object"] == "chat.completion"
    assert len(results) == FLOOD
    assert all(isinstance(r.error, InvalidRequestError) for r in results)
