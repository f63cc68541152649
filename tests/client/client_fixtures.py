"""A fake engine for the client tests: real Unix socket, real protocol frames, canned behaviour.

It runs on plain threads (stdlib sockets), so the same fake serves blocking, Trio and asyncio clients.
What it does with each ``Submit`` is chosen by the request body:

- ``{"error": kind, "status": 429, "error_body": ..., "headers": ..., "attempts": n}``: answer an ``Error``.
- ``{"hold": True}``: answer only when cancelled (then ``Error(cancelled)``).
- ``{"delay": seconds}``: answer after a delay (so answers come back out of order).
- ``{"die": True}``: drop the connection.
- ``{"progress": True}``: first send a message of a type no client knows (with the id), then answer.
- ``{"malformed": True}``: answer with a ``result`` frame whose ``status`` has the wrong type.
- ``{"goodbye": text}``: send a connection-level ``Error`` (id nil, ``shutting_down``), then drop it.
  With ``"stop_reading": seconds``, first stop reading (the client's writes fail at once), and wait that long.
- ``{"chunks": n}``: first send ``n`` chunk frames (``{"n": 0}``…, as bytes: the clients ask for body format
  "json"), then go on as the rest of the body says (``hold``, ``error``, a result). Only an engine created
  with ``minor=1`` welcomes streams.
- anything else: ``Result(status=200, body={"echo": body, "id": id})``.

With ``batch=n`` every non-error submit is held until ``n`` are held (or one has ``"last": True``), then
all are answered in reverse order: the client's window is observable and the order deterministic.

Framing, encoding and decoding are `trio_mapper.protocol`'s (`FrameBuffer`, the engine's `Codec`, its
message classes); only deliberately broken replies are built by hand (`raw_frame`). Like the real engine,
it stops reading a connection while its replies wait unread: the thread that reads a frame writes its
answer, so a client that writes without reading blocks once the socket buffers are full.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from trio_mapper.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    LENGTH_PREFIX,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Error,
    ErrorKind,
    FrameBuffer,
    Hello,
    Ping,
    Pong,
    RequestId,
    Result,
    Stats,
    StatsRequest,
    Submit,
    Welcome,
    describe_decode_error,
    engine_codec,
)


def raw_frame(fields: dict[str, Any]) -> bytes:
    """A frame holding any map: for replies the message classes cannot express (unknown types, bad fields)."""
    payload = msgspec.msgpack.encode(fields)
    return LENGTH_PREFIX.pack(len(payload)) + payload


class _Connection:
    def __init__(self, engine: FakeEngine, sock: socket.socket) -> None:
        self.engine = engine
        self.sock = sock
        self.codec = engine_codec()
        self.write_lock = threading.Lock()
        self.held: dict[RequestId, Submit] = {}
        self.closed = False

    def send(self, message: Any) -> None:
        """Write one message, or the bytes of frames (`raw_frame`); nothing once the connection is closed."""
        data = message if isinstance(message, bytes) else self.codec.encode(message)
        with self.write_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def finish(self, message: Any) -> None:
        """Send a final reply (a message, or a `raw_frame` standing for one), keeping the in-flight count."""
        with self.engine.lock:
            self.engine.in_flight -= 1
            self.engine.changed.notify_all()
        self.send(message)

    def serve(self) -> None:
        frames = FrameBuffer(self.engine.max_frame_bytes)
        greeted = False
        try:
            while True:
                frame = frames.next_frame()
                if frame is None:
                    data = self.sock.recv(1 << 20)
                    if not data:
                        return
                    frames.feed(data)
                    continue
                try:
                    message = self.codec.decode(frame)
                except (msgspec.MsgspecError, ValueError) as exc:
                    self.engine.record("decode_errors", str(exc))
                    self.send(Error(id=None, kind=ErrorKind.PROTOCOL_ERROR, message=describe_decode_error(exc)))
                    continue
                if not greeted:
                    greeted = True
                    if not self.handshake(message):
                        return
                    continue
                self.handle(message)
        except OSError:
            return
        finally:
            self.close()
            self.sock.close()

    def handshake(self, message: Any) -> bool:
        engine = self.engine
        if not isinstance(message, Hello):
            self.send(Error(id=None, kind=ErrorKind.PROTOCOL_ERROR, message="expected hello"))
            return False
        engine.record("hellos", message)
        if engine.refuse is not None:
            self.send(Error(id=None, kind=ErrorKind.PROTOCOL_ERROR, message=engine.refuse))
            return False
        self.send(
            Welcome(
                protocol=engine.protocol,
                server="fake-engine",
                max_frame_bytes=engine.max_frame_bytes,
                minor=engine.minor,
            )
        )
        return True

    def handle(self, message: Any) -> None:
        engine = self.engine
        if isinstance(message, Submit):
            self.submit(message)
        elif isinstance(message, Cancel):
            engine.record("cancels", message.id)
            submit = self.held.pop(message.id, None)
            if submit is not None:
                self.finish(Error(id=message.id, kind=ErrorKind.CANCELLED, message="cancelled"))
        elif isinstance(message, StatsRequest):
            self.send(Stats(id=message.id, engine={"connections": 1}, lanes={"gpt-test": {"queued": 0}}))
        elif isinstance(message, Ping):
            self.send(Pong(id=message.id))

    def submit(self, message: Submit) -> None:
        engine = self.engine
        body = message.body
        with engine.lock:
            engine.submits.append(message)
            engine.in_flight += 1
            engine.max_in_flight = max(engine.max_in_flight, engine.in_flight)
            engine.changed.notify_all()
        if body.get("die"):
            self.close()
            return
        if body.get("progress"):  # a message type from the future, carrying the id, then the result
            self.send(raw_frame({"type": "progress", "id": message.id, "done": 0.5}))
        for n in range(body.get("chunks", 0)):
            self.send(Chunk(id=message.id, data=msgspec.json.encode({"n": n})))
        if body.get("malformed"):  # a known type with a field of the wrong type: undecodable
            self.finish(raw_frame({"type": "result", "id": message.id, "status": "two hundred"}))
            return
        if "goodbye" in body:
            if "stop_reading" in body:  # as the engine does, with time for the client to write into it
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RD)
                time.sleep(body["stop_reading"])
            self.send(Error(id=None, kind=ErrorKind.SHUTTING_DOWN, message=body["goodbye"]))
            self.close()
            return
        if "error" in body:
            self.finish(
                Error(
                    id=message.id,
                    kind=body["error"],  # a plain str is encoded as is, unknown kinds included
                    message=body.get("message", "it failed"),
                    status=body.get("status"),
                    body=body.get("error_body"),
                    headers=body.get("headers", {}),
                    attempts=body.get("attempts", 1),
                    param=body.get("param"),
                ),
            )
            return
        if body.get("hold"):
            self.held[message.id] = message
            return
        if engine.batch is not None:
            self.held[message.id] = message
            if len(self.held) >= engine.batch or body.get("last"):
                for request_id in reversed(list(self.held)):
                    self.finish(self.result(self.held.pop(request_id)))
            return
        delay = body.get("delay")
        if delay:
            timer = threading.Timer(delay, self.finish, (self.result(message),))
            timer.daemon = True
            timer.start()
            return
        self.finish(self.result(message))

    @staticmethod
    def result(message: Submit) -> Result:
        return Result(
            id=message.id,
            status=200,
            body={"echo": message.body, "id": message.id},
            headers={"x-request-id": f"req-{message.id}"},
            attempts=1,
        )


class FakeEngine:
    """Listens on ``path`` and speaks the protocol from threads; inspect what it saw through its lists."""

    def __init__(
        self,
        path: str,
        *,
        protocol: int = PROTOCOL_VERSION,
        refuse: str | None = None,
        batch: int | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        minor: int = 0,
    ) -> None:
        self.path = path
        self.protocol = protocol
        #: What the welcome says: 0 (the default) is an engine from before streams.
        self.minor = minor
        self.refuse = refuse
        self.batch = batch
        self.max_frame_bytes = max_frame_bytes
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.hellos: list[Hello] = []
        self.submits: list[Submit] = []
        self.cancels: list[RequestId] = []
        self.decode_errors: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def record(self, name: str, value: Any) -> None:
        with self.lock:
            getattr(self, name).append(value)
            self.changed.notify_all()

    def start(self) -> FakeEngine:
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            connection = _Connection(self, sock)
            with self.lock:
                self.connections.append(connection)
            self._spawn(connection.serve)

    def drop_connections(self) -> None:
        with self.lock:
            connections = list(self.connections)
        for connection in connections:
            connection.close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block (a plain thread only!) until ``predicate()`` holds, checked under the engine's lock."""
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise AssertionError("the fake engine never reached the expected state")

    def stop(self) -> None:
        self._stopping = True
        self.drop_connections()
        for thread in self._threads:
            thread.join(timeout=2)
        self._listener.close()


def short_socket_dir() -> str:
    """A private directory whose socket paths stay well under the ~107-byte AF_UNIX limit."""
    return tempfile.mkdtemp(prefix="tm-", dir="/tmp")


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def socket_path_in(directory: str) -> str:
    return os.path.join(directory, "engine.sock")
