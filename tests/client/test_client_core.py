"""The client's protocol core (`trio_mapper.client.core`) on its own: bytes and events, no sockets."""

from __future__ import annotations

import pickle
from typing import Any

import msgspec
import pytest

from trio_mapper.client.core import (
    Answered,
    ChunkReceived,
    ClientConnection,
    ConnectionClosed,
    ConnectionLevelError,
    Event,
    MapResult,
    MapWindow,
    PongReceived,
    Request,
    State,
    StatsReceived,
    StreamChunk,
    StreamState,
    Welcomed,
    check_priority,
    unwrap,
)
from trio_mapper.client.errors import (
    ConnectionLost,
    ForbiddenError,
    InvalidRequestError,
    ProtocolError,
    RateLimitedError,
    TrioMapperError,
    UpstreamError,
)
from trio_mapper.wire import (
    LENGTH_PREFIX,
    PRIORITY_CLASSES,
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Error,
    FrameBuffer,
    Hello,
    Ping,
    Pong,
    Result,
    Stats,
    StatsRequest,
    Submit,
    Welcome,
    engine_codec,
)

ENDPOINT = "/v1/chat/completions"
PATH = "/run/test/engine.sock"
ENGINE = engine_codec()


def welcome(**fields: Any) -> bytes:
    return ENGINE.encode(Welcome(**{"protocol": PROTOCOL_VERSION, "server": "test", "max_frame_bytes": 1000, **fields}))


def raw(fields: dict[str, Any]) -> bytes:
    """A frame holding any map (the message classes cannot express broken ones)."""
    payload = msgspec.msgpack.encode(fields)
    return LENGTH_PREFIX.pack(len(payload)) + payload


def sent(data: bytes) -> list[Any]:
    """The client messages in ``data``, decoded as the engine decodes them."""
    frames = FrameBuffer(1 << 20)
    frames.feed(data)
    messages = []
    while (frame := frames.next_frame()) is not None:
        messages.append(ENGINE.decode(frame))
    assert frames.pending_bytes == 0
    return messages


def feed(connection: ClientConnection, data: bytes) -> list[Event]:
    connection.receive_data(data)
    return list(connection.events())


def opened(**options: Any) -> ClientConnection:
    connection = ClientConnection(socket_path=PATH, client_name="core-test", **options)
    connection.send_hello()
    assert [type(e) for e in feed(connection, welcome())] == [Welcomed]
    return connection


def chat(n: int = 0) -> Request:
    return Request(ENDPOINT, {"model": "m", "n": n})


def result(request_id: int, body: Any = None, **fields: Any) -> bytes:
    return ENGINE.encode(
        Result(id=request_id, status=200, body=body if body is not None else {"ok": request_id}, **fields)
    )


# --- handshake --------------------------------------------------------------------------------------------


def test_hello_then_welcome_opens_the_connection() -> None:
    connection = ClientConnection(socket_path=PATH, client_name="core-test")
    assert connection.state is State.IDLE
    hello = Hello(protocol=PROTOCOL_VERSION, client="core-test", body_format="json", minor=PROTOCOL_MINOR)
    assert sent(connection.send_hello()) == [hello]
    assert connection.state is State.HANDSHAKING
    # Bytes may come one at a time: nothing happens until a frame is whole.
    frame = welcome()
    for byte in frame[:-1]:
        assert feed(connection, bytes([byte])) == []
    [event] = feed(connection, frame[-1:])
    assert isinstance(event, Welcomed) and event.welcome.max_frame_bytes == 1000
    assert connection.state is State.OPEN and connection.welcome == event.welcome
    with pytest.raises(RuntimeError, match="first frame"):
        connection.send_hello()


def test_requests_before_the_handshake_are_a_local_mistake() -> None:
    connection = ClientConnection(socket_path=PATH)
    with pytest.raises(RuntimeError, match="handshake"):
        connection.submit(chat())
    connection.send_hello()
    with pytest.raises(RuntimeError, match="handshake"):
        connection.ping()


def test_another_protocol_version_closes_with_a_protocol_error() -> None:
    connection = ClientConnection(socket_path=PATH)
    connection.send_hello()
    [event] = feed(connection, welcome(protocol=PROTOCOL_VERSION + 98))
    assert isinstance(event, ConnectionClosed) and isinstance(event.error, ProtocolError)
    assert f"speaks protocol {PROTOCOL_VERSION + 98}" in str(event.error)
    assert connection.state is State.CLOSED and connection.error is event.error
    assert feed(connection, welcome()) == []  # nothing after the end


def test_a_refused_handshake_closes_with_the_engines_error() -> None:
    connection = ClientConnection(socket_path=PATH)
    connection.send_hello()
    [event] = feed(connection, ENGINE.encode(Error(id=None, kind="forbidden", message="uid 1000 may not")))
    assert isinstance(event, ConnectionClosed) and isinstance(event.error, ForbiddenError)
    assert "refused the handshake" in event.error.message and "uid 1000 may not" in event.error.message
    with pytest.raises(ConnectionLost, match="uid 1000 may not"):
        connection.ping()


def test_the_engine_closing_during_the_handshake() -> None:
    connection = ClientConnection(socket_path=PATH)
    connection.send_hello()
    [event] = feed(connection, b"")
    assert isinstance(event, ConnectionClosed) and isinstance(event.error, ConnectionLost)
    assert str(event.error).endswith(f"the engine at {PATH} closed the connection during the handshake")


def test_a_handshake_answered_with_another_message() -> None:
    connection = ClientConnection(socket_path=PATH)
    connection.send_hello()
    [event] = feed(connection, ENGINE.encode(Pong(id=1)))
    assert isinstance(event, ConnectionClosed) and "answered the handshake with Pong" in str(event.error)


def test_a_handshake_answered_in_http_names_the_msgpack_socket() -> None:
    """The engine's HTTP API socket (``engine.sock.http``) given for its msgpack socket: the reply's "HTTP" read
    as a frame length said "handshake reply refused: frame of 1213486160 bytes exceeds the limit"."""
    connection = ClientConnection(socket_path=PATH + ".http")
    connection.send_hello()
    [event] = feed(connection, b"HTTP/1.1 400 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    assert isinstance(event, ConnectionClosed) and isinstance(event.error, ProtocolError)
    assert f"{PATH}.http answered in HTTP" in str(event.error)
    assert f"its msgpack socket is {PATH}" in str(event.error)


# --- requests and replies ---------------------------------------------------------------------------------


def test_submit_gives_an_id_and_its_frame_and_the_reply_comes_back_as_an_event() -> None:
    connection = opened()
    request = Request("/v1/models", {}, method="GET", deadline=2.5, max_attempts=3)
    request_id, frame = connection.submit(request, "caller")
    assert request_id == 1 and connection.outstanding == {1: "caller"}
    assert sent(frame) == [Submit(id=1, endpoint="/v1/models", body={}, method="GET", deadline=2.5, max_attempts=3)]
    [event] = feed(connection, result(1, headers={"x-request-id": "r1"}))
    assert isinstance(event, Answered) and (event.request_id, event.context) == (1, "caller")
    assert isinstance(event.outcome, Result) and event.outcome.headers == {"x-request-id": "r1"}
    assert unwrap(event) is event.outcome and dict(connection.outstanding) == {}


def test_json_bodies_are_decoded_and_replies_are_routed_by_id() -> None:
    connection = opened()
    ids = [connection.submit(chat(n), n)[0] for n in range(3)]
    assert ids == [1, 2, 3]
    replies = (
        result(3, body=b'{"three": 3}')  # body_format "json": the upstream's bytes
        + ENGINE.encode(Error(id=1, kind="rate_limited", message="quota", status=429, body=b'{"e": 1}'))
        + result(2, body=b"not json")
    )
    events = feed(connection, replies)
    assert [(e.request_id, e.context) for e in events if isinstance(e, Answered)] == [(3, 2), (1, 0), (2, 1)]
    three, one, two = (e.outcome for e in events if isinstance(e, Answered))
    assert isinstance(three, Result) and three.body == {"three": 3}
    assert isinstance(one, RateLimitedError) and (one.status, one.body, one.request_id) == (429, {"e": 1}, 1)
    assert isinstance(two, Result) and two.body == "not json"
    with pytest.raises(RateLimitedError):
        unwrap(events[1])  # type: ignore[arg-type]


def test_unknown_error_kinds_become_the_base_class() -> None:
    connection = opened()
    connection.submit(chat())
    [event] = feed(connection, ENGINE.encode(Error(id=1, kind="from_the_future", message="new")))
    assert isinstance(event, Answered) and type(event.outcome) is TrioMapperError
    assert event.outcome.kind == "from_the_future"


def test_stats_and_ping() -> None:
    connection = opened()
    stats_id, stats_frame = connection.stats("s")
    ping_id, ping_frame = connection.ping("p")
    assert sent(stats_frame + ping_frame) == [StatsRequest(id=stats_id), Ping(id=ping_id)]
    events = feed(connection, ENGINE.encode(Pong(id=ping_id)) + ENGINE.encode(Stats(id=stats_id, engine={"a": 1})))
    pong, stats = events
    assert isinstance(pong, PongReceived) and pong.context == "p" and unwrap(pong) == Pong(id=ping_id)
    assert isinstance(stats, StatsReceived) and unwrap(stats) == {"engine": {"a": 1}, "lanes": {}}


def test_a_reply_of_the_wrong_type_is_a_protocol_error_for_its_request() -> None:
    connection = opened()
    stats_id, _ = connection.stats()
    submit_id, _ = connection.submit(chat())
    events = feed(connection, result(stats_id) + ENGINE.encode(Pong(id=submit_id)))
    assert [type(e) for e in events] == [StatsReceived, Answered]
    assert [str(e.outcome) for e in events] == [  # type: ignore[union-attr]
        "[protocol_error] expected Stats, the engine sent Result",
        "[protocol_error] expected a Result, the engine sent Pong",
    ]


def test_an_undecodable_reply_fails_its_request_only() -> None:
    connection = opened()
    connection.submit(chat(1))
    connection.submit(chat(2))
    events = feed(
        connection,
        raw({"type": "result", "id": 1, "status": "two hundred"})
        + raw({"type": "progress", "id": 2, "done": 0.5})  # a type from a newer engine: skipped
        + raw({"type": "error", "id": 2, "kind": "upstream_error"})  # lacks its message: still an error
        + raw({"type": "result", "id": 2, "status": 200, "body": {}}),  # id 2 is answered already: dropped
    )
    assert [type(e) for e in events] == [Answered, Answered]
    first, second = events
    assert isinstance(first, Answered) and isinstance(first.outcome, ProtocolError)
    assert "could not decode" in first.outcome.message and first.outcome.request_id == 1
    assert isinstance(second, Answered) and isinstance(second.outcome, UpstreamError)
    assert connection.state is State.OPEN


def test_requests_larger_than_the_engine_accepts_are_refused_locally() -> None:
    connection = opened()  # max_frame_bytes 1000
    with pytest.raises(InvalidRequestError, match="at most 1000 bytes") as caught:
        connection.submit(Request(ENDPOINT, {"text": "x" * 2000}))
    assert caught.value.request_id == 1 and dict(connection.outstanding) == {}
    assert connection.submit(chat())[0] == 2


def test_bodies_msgpack_cannot_carry_are_refused_locally_and_the_connection_goes_on() -> None:
    connection = opened()
    for body in ({"n": 2**70}, {"n": -(2**64)}):
        with pytest.raises(InvalidRequestError, match="cannot be encoded as msgpack"):
            connection.submit(Request(ENDPOINT, body))
    assert dict(connection.outstanding) == {}
    assert connection.submit(chat())[0] == 3


def test_cancel_sends_frames_for_submits_only_and_drops_late_replies() -> None:
    connection = opened()
    submit_id, _ = connection.submit(chat())
    answered_id, _ = connection.submit(chat())
    ping_id, _ = connection.ping()
    assert [type(e) for e in feed(connection, result(answered_id))] == [Answered]
    frames = connection.cancel([submit_id, answered_id, ping_id, 99])
    assert sent(frames) == [Cancel(id=submit_id)]  # answered, ping and unknown ids need none
    assert dict(connection.outstanding) == {}
    cancelled = ENGINE.encode(Error(id=submit_id, kind="cancelled", message="cancelled"))
    assert feed(connection, cancelled + ENGINE.encode(Pong(id=ping_id))) == []
    forgotten, _ = connection.submit(chat())
    connection.forget([forgotten])  # never written: no cancel needed
    assert connection.cancel([forgotten]) == b""


# --- the end of a connection ------------------------------------------------------------------------------


def test_the_engines_last_word_is_quoted_when_it_closes() -> None:
    connection = opened()
    first, _ = connection.submit(chat(), "a")
    connection.submit(chat(), "b")
    last_word = ENGINE.encode(Error(id=None, kind="protocol_error", message="frame too slow"))
    [notice] = feed(connection, last_word)
    assert isinstance(notice, ConnectionLevelError) and notice.error.kind == "protocol_error"
    assert connection.state is State.OPEN
    connection.receive_data(result(first))
    connection.receive_data(b"")  # closed right after: the reply it sent before still counts
    answered, closed = connection.events()
    assert isinstance(answered, Answered) and answered.context == "a"
    assert isinstance(closed, ConnectionClosed) and closed.orphans == ("b",)
    message = (
        f"the engine at {PATH} went away (it closed the connection); the engine's last word: [protocol_error] "
        "frame too slow"
    )
    assert str(closed.error) == f"[connection_lost] {message}"
    assert closed.error.__cause__ is notice.error
    with pytest.raises(ConnectionLost, match="last word") as caught:
        connection.submit(chat())
    assert caught.value is not connection.connection_lost()  # a fresh one each time
    assert feed(connection, b"") == [] and connection.cancel([2]) == b""


def test_after_the_engines_goodbye_an_unanswered_request_never_ran() -> None:
    """The engine answers every request it read before its goodbye (a connection-level shutting_down): what
    is unanswered then, even a request written whole before it, was never read. The connection is over at
    once, so the next call goes to the next engine."""
    connection = opened()
    answered_id, _ = connection.submit(chat(), "answered")
    unread, _ = connection.submit(chat(), "unread")
    feed(connection, result(answered_id))
    goodbye = ENGINE.encode(Error(id=None, kind="shutting_down", message="reads no more"))
    notice, closed = feed(connection, goodbye)
    assert isinstance(notice, ConnectionLevelError) and notice.error.kind == "shutting_down"
    assert isinstance(closed, ConnectionClosed) and closed.orphans == ("unread",)
    assert connection.state is State.CLOSED
    lost = connection.request_lost(unread, sent=True)
    assert lost.may_have_reached_upstream is False
    assert lost.message == (
        f"the engine at {PATH} is shutting down; the engine's last word: [shutting_down] reads no more; request 2 "
        "was not read by the engine: it never ran; resubmit it. The client connects again on its next call"
    )
    assert feed(connection, b"") == []
    with pytest.raises(ConnectionLost, match="is shutting down"):
        connection.submit(chat())
    # Without a goodbye, a request written whole may have run.
    other = opened()
    written, _ = other.submit(chat())
    feed(other, b"")
    assert other.request_lost(written, sent=True).may_have_reached_upstream is True


def test_the_driver_failing_the_transport() -> None:
    connection = opened()
    connection.submit(chat(), "waiter")
    cause = BrokenPipeError(32, "Broken pipe")
    connection.fail("sending to the engine failed", cause)
    connection.fail("a second failure changes nothing")
    connection.receive_data(result(1))  # ignored: the connection is over
    [closed] = list(connection.events())
    assert isinstance(closed, ConnectionClosed) and closed.orphans == ("waiter",)
    lost = connection.connection_lost()
    assert lost.message == "sending to the engine failed" and lost.__cause__ is cause
    assert str(lost.socket_path) == PATH


def test_a_request_lost_with_the_connection_says_whether_it_may_have_run() -> None:
    """What the drivers raise for each request still outstanding when the connection ends: never re-sent,
    so the caller must learn whether the engine may have run it."""
    connection = opened()
    written, _ = connection.submit(chat(), "written")
    unwritten, _ = connection.submit(chat(), "unwritten")
    cause = ConnectionResetError(104, "Connection reset by peer")
    connection.fail("reading from the engine failed", cause)
    [closed] = list(connection.events())
    assert isinstance(closed, ConnectionClosed) and closed.orphans == ("written", "unwritten")
    maybe = connection.request_lost(written, sent=True)
    assert maybe.request_id == written and maybe.may_have_reached_upstream is True
    assert maybe.message.startswith("reading from the engine failed; request 1 was outstanding")
    assert "may have sent it upstream" in maybe.message and "It was not sent again" in maybe.message
    assert maybe.message.endswith("The client connects again on its next call")
    assert maybe.__cause__ is cause
    never = connection.request_lost(unwritten, sent=False)
    assert never.may_have_reached_upstream is False and "never reached the engine" in never.message
    assert connection.connection_lost().may_have_reached_upstream is None
    assert pickle.loads(pickle.dumps(maybe)).may_have_reached_upstream is True

    closed_by_us = opened()
    request_id, _ = closed_by_us.submit(chat())
    closed_by_us.close()
    lost = closed_by_us.request_lost(request_id, sent=True)
    assert lost.message.startswith("the client was closed; request 1 was outstanding")
    assert "connects again" not in lost.message  # nothing reconnects a closed client


def test_closing_the_client() -> None:
    connection = opened()
    connection.close()
    [closed] = list(connection.events())
    assert isinstance(closed, ConnectionClosed) and closed.error.message == "the client was closed"


def test_a_reply_frame_over_the_limit_closes_the_connection() -> None:
    connection = opened(max_reply_frame_bytes=100)
    connection.submit(chat())
    [closed] = feed(connection, result(1, body={"big": "x" * 200}))
    assert isinstance(closed, ConnectionClosed) and "reply from the engine refused" in str(closed.error)


# --- map()'s window ---------------------------------------------------------------------------------------


def test_the_window_bounds_what_is_in_flight_or_untaken() -> None:
    connection = opened()
    window = MapWindow(connection, endpoint=ENDPOINT, window=2)
    assert window.wants_input
    first, frame = window.add({"n": 0})
    assert sent(frame) == [Submit(id=first, endpoint=ENDPOINT, body={"n": 0})]
    second, _ = window.add({"n": 1})
    assert not window.wants_input and window.next_result() is None
    for event in feed(connection, result(second)):
        assert isinstance(event, Answered) and event.context is window
        window.deliver(event)
    assert not window.wants_input  # answered but not taken still counts
    taken = window.next_result()
    assert isinstance(taken, MapResult) and taken.input == {"n": 1} and taken.ok
    assert window.wants_input and not window.done
    window.end_of_input()
    assert not window.wants_input and not window.done
    [event] = feed(connection, ENGINE.encode(Error(id=first, kind="upstream_error", message="bad", status=400)))
    window.deliver(event)  # type: ignore[arg-type]
    failed = window.next_result()
    assert failed is not None and isinstance(failed.error, UpstreamError) and failed.input == {"n": 0}
    assert window.done


def test_the_window_applies_defaults_and_refuses_oversized_items_locally() -> None:
    connection = opened()
    window = MapWindow(connection, deadline=1.5, max_attempts=2, context="mine")
    _, frame = window.add(Request(ENDPOINT, {"a": 1}, deadline=9.0, tag="row"))
    assert sent(frame) == [Submit(id=1, endpoint=ENDPOINT, body={"a": 1}, deadline=9.0, max_attempts=2)]
    refused_id, nothing = window.add((ENDPOINT, {"text": "x" * 2000}))
    assert nothing == b"" and refused_id == 2
    refused = window.next_result()
    assert refused is not None and isinstance(refused.error, InvalidRequestError)
    assert refused.input == (ENDPOINT, {"text": "x" * 2000}) and refused.request.deadline == 1.5
    assert connection.outstanding == {1: "mine"}
    with pytest.raises(TypeError, match="endpoint"):
        window.add({"no": "endpoint"})
    with pytest.raises(ValueError, match="window"):
        MapWindow(connection, window=0)


def test_closing_the_window_hands_back_what_to_cancel() -> None:
    connection = opened()
    window = MapWindow(connection, endpoint=ENDPOINT)
    ids = [window.add({"n": n})[0] for n in range(3)]
    [event] = feed(connection, result(ids[0]))
    window.deliver(event)  # type: ignore[arg-type]
    in_flight = window.close()
    assert in_flight == ids[1:]
    assert window.done and not window.wants_input and window.next_result() is None
    assert sent(connection.cancel(in_flight)) == [Cancel(id=ids[1]), Cancel(id=ids[2])]


# --- priority classes -------------------------------------------------------------------------------------


def test_submit_carries_no_priority_unless_asked_so_the_engine_uses_the_tenants_class() -> None:
    connection = opened()
    assert connection.priority is None
    [message] = sent(connection.submit(chat())[1])
    assert isinstance(message, Submit) and message.priority is None


@pytest.mark.parametrize("priority", PRIORITY_CLASSES)
def test_submit_carries_the_priority_the_request_asks_for(priority: str) -> None:
    connection = opened()
    request = Request(ENDPOINT, {"model": "m"}, priority=priority)
    assert sent(connection.submit(request)[1]) == [
        Submit(id=1, endpoint=ENDPOINT, body={"model": "m"}, priority=priority)
    ]


def test_the_connections_priority_is_the_default_and_a_request_overrides_it() -> None:
    connection = ClientConnection(socket_path=PATH, client_name="core-test", priority="batch")
    connection.send_hello()
    feed(connection, welcome(minor=1))  # streams too
    assert connection.priority == "batch"
    _, default = connection.submit(chat())
    _, override = connection.submit(Request(ENDPOINT, {"model": "m"}, priority="interactive"))
    _, stream = connection.submit(chat(), stream=True)
    assert [message.priority for message in sent(default + override + stream)] == ["batch", "interactive", "batch"]


def test_maps_priority_fills_the_items_that_name_none() -> None:
    connection = opened(priority="interactive")
    window = MapWindow(connection, endpoint=ENDPOINT, priority="batch")
    _, plain = window.add({"n": 1})
    _, own = window.add(Request(ENDPOINT, {"n": 2}, priority="default"))
    assert [message.priority for message in sent(plain + own)] == ["batch", "default"]
    assert [request.priority for _, request in window.in_flight.values()] == ["batch", "default"]
    # Without map's priority, the connection's applies (and the item's Request keeps None: nothing to fill).
    unset = MapWindow(connection, endpoint=ENDPOINT)
    _, frame = unset.add({"n": 3})
    assert [message.priority for message in sent(frame)] == ["interactive"]


@pytest.mark.parametrize("priority", ["urgent", "Batch", "", " batch", 1])
def test_a_priority_that_is_not_a_class_raises_value_error_naming_the_classes(priority: Any) -> None:
    connection = opened()
    pattern = "'interactive', 'default', 'batch'"
    with pytest.raises(ValueError, match=pattern):
        Request(ENDPOINT, {"model": "m"}, priority=priority)
    with pytest.raises(ValueError, match=pattern):
        ClientConnection(socket_path=PATH, priority=priority)
    with pytest.raises(ValueError, match=pattern):
        MapWindow(connection, endpoint=ENDPOINT, priority=priority)
    with pytest.raises(ValueError, match=pattern):
        check_priority(priority)
    # A value slipped past the constructors is still refused before an id is spent or anything is outstanding.
    connection.priority = priority
    with pytest.raises(ValueError, match=pattern):
        connection.submit(chat())
    assert connection.outstanding == {}
    connection.priority = None
    assert connection.submit(chat())[0] == 1


def test_map_results_unpack_and_unwrap() -> None:
    ok = MapResult({"n": 1}, chat(), result=Result(id=1, status=200, body={"b": 1}))
    failed = MapResult({"n": 2}, chat(), error=UpstreamError("upstream_error", "bad"))
    assert ok.ok and ok.body == {"b": 1} and ok.unwrap() == {"b": 1} and tuple(ok) == ({"n": 1}, {"b": 1})
    assert not failed.ok and failed.body is None and failed.outcome is failed.error
    with pytest.raises(UpstreamError):
        failed.unwrap()


# --- streams ----------------------------------------------------------------------------------------------


def streaming() -> ClientConnection:
    """An open connection whose engine agreed to minor 1 (streams)."""
    connection = ClientConnection(socket_path=PATH, client_name="core-test")
    connection.send_hello()
    [event] = feed(connection, welcome(minor=1))
    assert isinstance(event, Welcomed) and connection.can_stream
    return connection


def chunk(request_id: int, data: bytes, event: str | None = None) -> bytes:
    """A chunk frame as the engine sends it to this client (body format "json": the event's bytes)."""
    return ENGINE.encode(Chunk(id=request_id, data=data, event=event))


def test_a_stream_is_submitted_with_stream_true_and_its_chunks_come_in_order_then_its_result() -> None:
    connection = streaming()
    request_id, frame = connection.submit(Request(ENDPOINT, {"model": "m", "stream": False}), "s", stream=True)
    assert sent(frame) == [Submit(id=request_id, endpoint=ENDPOINT, body={"model": "m", "stream": True})]
    final = ENGINE.encode(Result(id=request_id, status=200, body=None, headers={"x-request-id": "r"}, streamed=True))
    events = feed(
        connection,
        chunk(request_id, b'{"n": 0}') + chunk(request_id, b'{"n": 1}') + chunk(request_id, b"[not json") + final,
    )
    assert [type(e) for e in events] == [ChunkReceived, ChunkReceived, ChunkReceived, Answered]
    assert all(e.request_id == request_id and e.context == "s" for e in events)  # type: ignore[union-attr]
    assert [e.chunk for e in events[:3]] == [  # type: ignore[union-attr]
        StreamChunk({"n": 0}),
        StreamChunk({"n": 1}),
        StreamChunk("[not json"),  # what is not JSON stays text, as bodies do
    ]
    answered = events[3]
    assert isinstance(answered, Answered) and isinstance(answered.outcome, Result)
    assert answered.outcome.streamed and answered.outcome.body is None
    assert dict(connection.outstanding) == {}
    assert feed(connection, chunk(request_id, b"{}")) == []  # after the end: nobody's


def test_responses_chunks_carry_their_event_name_and_msgpack_data_passes_as_is() -> None:
    connection = streaming()
    request_id, _ = connection.submit(Request("/v1/responses", {"model": "m"}), stream=True)
    events = feed(
        connection,
        chunk(request_id, b'{"type": "response.created"}', "response.created")
        + ENGINE.encode(Chunk(id=request_id, data={"type": "x"}, event="x")),  # body format "msgpack"
    )
    assert [e.chunk for e in events] == [  # type: ignore[union-attr]
        StreamChunk({"type": "response.created"}, "response.created"),
        StreamChunk({"type": "x"}, "x"),
    ]


def test_a_stream_ending_in_an_error_gives_the_error_class_of_its_kind() -> None:
    connection = streaming()
    request_id, _ = connection.submit(chat(), stream=True)
    error = ENGINE.encode(Error(id=request_id, kind="upstream_unreachable", message="gone", attempts=2))
    events = feed(connection, chunk(request_id, b"{}") + error)
    assert [type(e) for e in events] == [ChunkReceived, Answered]
    state = StreamState()
    for event in events:
        state.deliver(event)  # type: ignore[arg-type]
    assert state.next_chunk() == StreamChunk({}) and state.done
    with pytest.raises(TrioMapperError) as caught:
        state.finish()
    assert caught.value.kind == "upstream_unreachable" and type(caught.value).__name__ == "UpstreamUnreachableError"


def test_stream_state_gives_chunks_then_the_result() -> None:
    state = StreamState()
    assert not state.has_news and not state.done
    with pytest.raises(RuntimeError):
        state.finish()
    state.deliver(ChunkReceived(1, StreamChunk({"n": 0}), None))
    final = Result(id=1, status=200, body=None, streamed=True)
    state.deliver(Answered(1, final, None))
    assert state.has_news and not state.done  # a chunk is still to be taken
    assert state.next_chunk() == StreamChunk({"n": 0})
    assert state.done and state.next_chunk() is None and state.finish() is final


def test_a_reply_the_upstream_did_not_stream_is_the_streams_one_chunk() -> None:
    state = StreamState()
    whole = Result(id=1, status=200, body={"data": [1, 2]})  # an endpoint that does not stream
    state.deliver(Answered(1, whole, None))
    assert state.next_chunk() == StreamChunk({"data": [1, 2]}) and state.done and state.finish() is whole


def test_cancelling_a_stream_sends_a_cancel_and_drops_its_late_chunks() -> None:
    connection = streaming()
    request_id, _ = connection.submit(chat(), stream=True)
    [event] = feed(connection, chunk(request_id, b"{}"))
    assert isinstance(event, ChunkReceived)
    assert sent(connection.cancel([request_id])) == [Cancel(id=request_id)]
    late = chunk(request_id, b"{}") + ENGINE.encode(Error(id=request_id, kind="cancelled", message="cancelled"))
    assert feed(connection, late) == []


def test_chunks_for_a_request_not_streamed_fail_it_with_a_protocol_error() -> None:
    # Only an engine's bug sends them: ignoring them would make the request succeed with no body.
    connection = streaming()
    request_id, _ = connection.submit(chat(), "waiter")
    ping_id, _ = connection.ping("pinger")
    events = feed(
        connection,
        chunk(request_id, b"{}")
        + chunk(request_id, b"{}")
        + ENGINE.encode(Result(id=request_id, status=200, body=None, streamed=True))
        + chunk(ping_id, b"{}"),
    )
    assert [type(e) for e in events] == [Answered, PongReceived]  # the rest of the stream is dropped
    for event, context in zip(events, ["waiter", "pinger"], strict=True):
        assert isinstance(event.outcome, ProtocolError) and event.context == context  # type: ignore[union-attr]
        assert "was not submitted as a stream" in event.outcome.message  # type: ignore[union-attr]
    assert connection.state is State.OPEN and dict(connection.outstanding) == {}


def test_a_body_asking_for_a_stream_outside_stream_is_refused_locally() -> None:
    connection = streaming()
    with pytest.raises(InvalidRequestError, match="use stream"):
        connection.submit(Request(ENDPOINT, {"model": "m", "stream": True}))
    assert dict(connection.outstanding) == {}
    window = MapWindow(connection, endpoint=ENDPOINT)
    _, nothing = window.add({"model": "m", "stream": True})
    refused = window.next_result()
    assert nothing == b"" and refused is not None and isinstance(refused.error, InvalidRequestError)


@pytest.mark.parametrize("minor", [None, 0])
def test_an_engine_without_minor_1_cannot_stream(minor: int | None) -> None:
    connection = ClientConnection(socket_path=PATH, client_name="core-test")
    connection.send_hello()
    # An engine that predates the field sends none at all.
    fields = {"type": "welcome", "protocol": PROTOCOL_VERSION, "server": "trio-mapper/0.0.9", "max_frame_bytes": 1000}
    [event] = feed(connection, raw(fields if minor is None else {**fields, "minor": minor}))
    assert isinstance(event, Welcomed) and event.welcome.minor == 0 and not connection.can_stream
    with pytest.raises(ProtocolError, match="upgrade the engine") as caught:
        connection.submit(chat(), stream=True)
    assert "trio-mapper/0.0.9" in caught.value.message and f"minor {PROTOCOL_MINOR}" in caught.value.message
    assert dict(connection.outstanding) == {}
    assert connection.submit(chat())[1]  # whole requests are unaffected


def test_streams_orphaned_by_a_lost_connection() -> None:
    connection = streaming()
    connection.submit(chat(), "stream", stream=True)
    [closed] = feed(connection, b"")
    assert isinstance(closed, ConnectionClosed) and closed.orphans == ("stream",)
