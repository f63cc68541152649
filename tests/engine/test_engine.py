"""End to end: the engine as a real subprocess, a real Unix socket, the simulator as a real HTTP upstream."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio
from conftest import TEST_API_KEY, engine_command, engine_env, running_engine, simulator, simulator_stats
from raw_client import RawClient, chat


async def test_concurrent_requests_each_get_their_own_reply(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        async with await RawClient.connect(str(engine.socket)) as client:
            ids = list(range(50)) + [f"s{i}" for i in range(10)]
            for request_id in ids:
                await client.send(chat(request_id, f"question {request_id}"))
            replies = [await client.receive() for _ in ids]
        assert sorted(map(str, (reply["id"] for reply in replies))) == sorted(map(str, ids))
        for reply in replies:
            assert reply["type"] == "result", reply
            assert reply["status"] == 200
            assert reply["body"]["object"] == "chat.completion"
            assert reply["headers"]["x-request-id"].startswith("req_")
            assert reply["attempts"] == 1
            timings = reply["timings"]
            assert timings["upstream"] > 0 and timings["queued"] >= 0
            assert timings["total"] >= timings["queued"] + timings["upstream"] - 1e-6
        mode = stat.S_IMODE(os.stat(engine.socket).st_mode)
        assert mode == 0o660
        assert await engine.stop() == 0
        assert not engine.socket.exists()
        assert TEST_API_KEY not in engine.log


async def test_several_clients_at_once(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        results: dict[int, list[dict[str, object]]] = {}

        async def one_client(number: int) -> None:
            async with await RawClient.connect(str(engine.socket)) as client:
                for i in range(20):
                    await client.send(chat(i))
                results[number] = [await client.receive() for _ in range(20)]

        async with trio.open_nursery() as nursery:
            for number in range(8):
                nursery.start_soon(one_client, number)
        for replies in results.values():
            assert sorted(reply["id"] for reply in replies) == list(range(20))  # type: ignore[type-var]
            assert all(reply["type"] == "result" for reply in replies)


async def test_bad_input_gets_clear_errors_and_the_connection_lives_on(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        async with await RawClient.connect(str(engine.socket)) as client:
            cases = {
                b"\xc1": "malformed",
                msgspec.msgpack.encode([1, 2, 3]): "object",
                msgspec.msgpack.encode({"type": "launch_missiles", "id": 1}): "must be one of",
                msgspec.msgpack.encode({"type": "submit", "id": 2, "endpoint": 5, "body": {}}): "$.endpoint",
                msgspec.msgpack.encode({"type": "submit", "id": 3.5, "endpoint": "x", "body": {}}): "$.id",
                msgspec.msgpack.encode({"id": 4}): "type",
            }
            for payload, needle in cases.items():
                await client.send_raw(struct.pack(">I", len(payload)) + payload)
                reply = await client.receive()
                assert reply["type"] == "error"
                assert reply["kind"] == "protocol_error"
                assert needle in reply["message"], reply
            wrong_type = await client.request({"type": "submit", "id": 2, "endpoint": 5, "body": {}})
            assert wrong_type["id"] == 2  # the id is salvaged so the client can tell which request failed

            refused = {
                "https://evil.example/v1/chat/completions": "names a host",
                "/v1/../../etc/passwd": "'..'",
                "//evil.example/v1/x": "names a host",
                "/v1/chat/completions?x=1": "plain path",
            }
            for n, (endpoint, needle) in enumerate(refused.items()):
                reply = await client.request(
                    {"type": "submit", "id": f"e{n}", "endpoint": endpoint, "body": {"model": "gpt-4o-mini"}}
                )
                assert reply["kind"] == "invalid_request", reply
                assert needle in reply["message"]
            # A GET elsewhere than models would list what the whole project stored: others' conversations.
            for n, endpoint in enumerate(("/v1/chat/completions", "/v1/responses/resp_1/input_items")):
                reply = await client.request(
                    {"type": "submit", "id": f"g{n}", "endpoint": endpoint, "body": {}, "method": "GET"}
                )
                assert reply["kind"] == "invalid_request", reply
                assert "Only GET /v1/models" in reply["message"] or "is not passed on" in reply["message"], reply
            conversations = await client.request(
                {"type": "submit", "id": "c", "endpoint": "/v1/conversations", "body": {"model": "gpt-4o-mini"}}
            )
            assert conversations["kind"] == "invalid_request" and "is not passed on" in conversations["message"]
            bad_body = await client.request(
                {"type": "submit", "id": "b", "endpoint": "/v1/chat/completions", "body": {"model": "gpt-4o-mini"}}
            )
            assert bad_body["kind"] == "invalid_request"
            assert "messages" in bad_body["message"]
            assert bad_body["param"] == "messages"
            # Still serving on the same connection.
            assert (await client.request(chat("ok")))["type"] == "result"
            assert (await client.request({"type": "ping", "id": "p"}))["type"] == "pong"
        assert await engine.stop() == 0


async def test_oversized_frame_is_refused_then_closed(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url, "--max-frame-bytes", "4096") as engine:
        async with await RawClient.connect(str(engine.socket)) as client:
            await client.send_raw(struct.pack(">I", 10_000_000) + b"\x80" * 100)
            reply = await client.receive()
            assert reply["kind"] == "protocol_error"
            assert "10000000 bytes exceeds the limit of 4096" in reply["message"]
            with pytest.raises(EOFError):
                await client.receive()
        async with await RawClient.connect(str(engine.socket)) as client:
            assert (await client.request(chat(1)))["type"] == "result"


async def test_handshake_is_required_and_versioned(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        async with await RawClient.connect(str(engine.socket), hello=False) as client:
            reply = await client.request(chat(1))
            assert reply["kind"] == "protocol_error" and "first frame must be a hello" in reply["message"]
            with pytest.raises(EOFError):
                await client.receive()
        async with await RawClient.connect(str(engine.socket), hello=False) as client:
            reply = await client.request({"type": "hello", "protocol": 99})
            assert reply["kind"] == "protocol_error" and "speaks protocol 1" in reply["message"]


async def test_half_a_frame_then_vanish_frees_everything(short_tmp: Path) -> None:
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        for _ in range(20):
            client = await RawClient.connect(str(engine.socket))
            await client.send_raw(struct.pack(">I", 1000) + b"\x81\xa4")
            await client.aclose()
        async with await RawClient.connect(str(engine.socket)) as client:
            # The engine notices each EOF asynchronously; wait (bounded) until it has.
            with trio.fail_after(10):
                while (  # noqa: ASYNC110 - polling another process's state: no event to wait on
                    stats := await client.request({"type": "stats", "id": "s"})
                )["engine"]["connections"] > 1:
                    await trio.sleep(0.05)
            assert stats["engine"]["connections"] == 1
            assert stats["engine"]["outstanding"] == 0


async def test_fuzzed_frames_never_crash_the_engine(short_tmp: Path) -> None:
    rng = random.Random(20261125)
    templates: list[object] = [
        {"type": "submit", "id": 1, "endpoint": "/v1/chat/completions", "body": {"model": "gpt-4o-mini"}},
        {"type": "cancel", "id": 1},
        {"type": "stats", "id": 1},
        {"type": "hello", "protocol": 1},
        {"type": "submit", "id": "x", "endpoint": "/v1/embeddings", "body": {"model": "m", "input": [1, 2]}},
    ]

    def mutate(value: object) -> object:
        choice = rng.random()
        if isinstance(value, dict) and choice < 0.5:
            key = rng.choice(list(value) or ["k"])
            return {**value, key: mutate(value.get(key))}
        return rng.choice(
            [None, True, -1, 2**63 - 1, 1.5, "", "x" * rng.randint(0, 300), [], {}, [None], {"a": [1]}, b"\x00\xff"]
        )

    async with simulator() as url, running_engine(short_tmp, url, "--log-level", "debug") as engine:
        for round_number in range(6):
            async with await RawClient.connect(str(engine.socket)) as client:
                for _ in range(500):
                    kind = rng.random()
                    if kind < 0.4:
                        payload = msgspec.msgpack.encode(mutate(rng.choice(templates)))
                    elif kind < 0.7:
                        payload = rng.randbytes(rng.randint(0, 64))
                    else:
                        payload = bytearray(msgspec.msgpack.encode(rng.choice(templates)))
                        for _ in range(rng.randint(1, 4)):
                            payload[rng.randrange(len(payload))] = rng.randrange(256)
                        payload = bytes(payload)
                    await client.send_raw(struct.pack(">I", len(payload)) + payload)
                await client.send({"type": "ping", "id": f"alive-{round_number}"})
                while (reply := await client.receive()).get("id") != f"alive-{round_number}":
                    assert reply["type"] in {"error", "result", "stats_reply", "welcome"}, reply
        async with await RawClient.connect(str(engine.socket)) as client:
            assert (await client.request(chat("after-fuzz")))["type"] == "result"
        assert await engine.stop() == 0
        assert "Traceback" not in engine.log
        assert "unexpected error" not in engine.log


async def test_sigterm_answers_every_request_exactly_once(short_tmp: Path) -> None:
    # Slow replies keep many requests in flight; the grace period lets them finish.
    async with (
        simulator(latency_ms=400.0) as url,
        running_engine(short_tmp, url, "--max_concurrent_reqs", "100", "--grace-period", "20") as engine,
    ):
        async with await RawClient.connect(str(engine.socket)) as client:
            total = 400
            for i in range(total):
                await client.send(chat(i))
            stats = await client.request({"type": "stats", "id": "s"})
            # Some results may arrive before the stats reply; count them too.
            early = [stats] if stats["type"] != "stats_reply" else []
            while stats["type"] != "stats_reply":
                stats = await client.receive()
            assert stats["engine"]["outstanding"] > 0
            engine.process.send_signal(signal.SIGTERM)
            replies = [reply for reply in early if reply["type"] != "stats_reply"]
            while True:
                try:
                    replies.append(await client.receive())
                except EOFError:
                    break
        goodbye = replies.pop()
        assert goodbye["type"] == "error" and goodbye["id"] is None and goodbye["kind"] == "shutting_down"
        ids = [reply["id"] for reply in replies]
        assert sorted(ids) == list(range(total)), "every request answered exactly once, before the goodbye"
        kinds = {reply.get("kind", reply["type"]) for reply in replies}
        assert kinds <= {"result", "shutting_down"}
        assert "result" in kinds
        # No second signal: the engine is already on its way out and must exit 0 by itself.
        with trio.fail_after(60):
            assert await engine.process.wait() == 0
        assert not engine.socket.exists()


async def test_requests_sent_while_the_engine_closes_are_answered_or_never_run(short_tmp: Path) -> None:
    # A client that keeps sending while the engine stops: whatever the engine read is answered before its
    # goodbye, and whatever is unanswered at the goodbye never reached the upstream (the simulator counts).
    async with (
        simulator(latency_ms=300.0) as url,
        running_engine(short_tmp, url, "--max_concurrent_reqs", "100", "--grace-period", "20") as engine,
    ):
        async with await RawClient.connect(str(engine.socket)) as client:
            sent: list[int] = []
            replies: list[dict[str, object]] = []

            async def keep_sending() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for i in itertools.count():
                        await client.send(chat(i))
                        sent.append(i)
                        if i == 20:
                            engine.process.send_signal(signal.SIGTERM)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_sending)
                with contextlib.suppress(EOFError, trio.BrokenResourceError):
                    while True:
                        replies.append(await client.receive())
                nursery.cancel_scope.cancel()
        with trio.fail_after(60):
            assert await engine.process.wait() == 0
        upstream = await simulator_stats(url)
    goodbye = replies.pop()
    assert goodbye == {**goodbye, "type": "error", "id": None, "kind": "shutting_down"}, goodbye
    assert "never ran" in str(goodbye["message"])
    answered = [reply["id"] for reply in replies]
    assert len(answered) == len(set(answered)), "nothing answered twice"
    assert {reply.get("kind", reply["type"]) for reply in replies} <= {"result", "shutting_down"}
    results = sum(reply["type"] == "result" for reply in replies)
    assert results, "some requests ran before the SIGTERM"
    assert len(sent) > len(answered), "requests were sent after the engine stopped reading (the race this tests)"
    # What the engine did not answer, it did not run: every upstream request is one of the results.
    assert upstream["received"] == results


async def test_stale_socket_is_replaced_and_live_one_refused(short_tmp: Path) -> None:
    import socket as stdlib_socket

    stale = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    stale.bind(str(short_tmp / "engine.sock"))
    stale.close()  # the file stays, nothing listens: what a crash leaves
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        async with await RawClient.connect(str(engine.socket)) as client:
            assert (await client.request({"type": "ping", "id": 1}))["type"] == "pong"
        with trio.fail_after(60):
            second = await trio.run_process(
                engine_command(engine.socket, url),
                env=engine_env(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert second.returncode == 1
        assert b"another engine is" in second.stderr
        assert engine.socket.exists(), "the refused engine must not remove the live one's socket"


def test_start_up_errors_are_one_line_each_and_exit_2(short_tmp: Path) -> None:
    env = engine_env()
    del env["OPENAI_API_KEY"]
    command = [sys.executable, "-m", "trio_mapper", "launch-engine", "--socket", str(short_tmp / "s")]

    def launch(*options: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *options], env=env, capture_output=True, text=True, timeout=60, check=False, cwd=cwd
        )

    missing = launch(env=env, cwd=short_tmp)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert "OPENAI_API_KEY" in missing.stderr
    assert "max_concurrent_reqs: required" in missing.stderr

    config = short_tmp / "engine.toml"
    config.write_text('[server]\nrpm = "many"\ntmp = 5\nsocket_mode = 0o666\n')
    bad = launch("--config", str(config), "--tpm", "10", "--max_concurrent_reqs", "1", env=engine_env())
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "server.rpm: expected an integer, got 'many'" in bad.stderr
    assert "unknown key(s): tmp (did you mean tpm?)" in bad.stderr

    (short_tmp / ".env").write_text(f"OPENAI_API_KEY={TEST_API_KEY}\n")
    limits = ("--rpm", "1", "--tpm", "1", "--max_concurrent_reqs", "1")
    from_dotenv = launch(*limits, "--socket-mode", "0666", env=env, cwd=short_tmp)
    assert from_dotenv.returncode == 2
    assert "OPENAI_API_KEY" not in from_dotenv.stderr  # found in .env
    assert "world-writable" in from_dotenv.stderr

    # A queue too small for the largest request would take one only when nothing else is queued.
    queue = launch(*limits, "--max-queued-bytes", "1000000", env=engine_env())
    assert queue.returncode == 2
    assert "server.max_queued_bytes: must be at least max_frame_bytes (4194304), got 1000000" in queue.stderr


def test_help_lists_the_seed_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_mapper", "launch-engine", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for option in ("--max_concurrent_reqs", "--rpm", "--tpm", "--period_length", "--max_nb_sockets", "--socket"):
        assert option in result.stdout
    assert "--max-concurrent-reqs" in result.stdout


async def test_a_client_may_take_upstream_bodies_as_json_bytes(short_tmp: Path) -> None:
    # body_format "json": the engine forwards the upstream's bytes instead of re-encoding them as msgpack.
    async with simulator() as url, running_engine(short_tmp, url) as engine:
        client = await RawClient.connect(str(engine.socket), hello=False)
        welcome = await client.request({"type": "hello", "protocol": 1, "body_format": "json"})
        assert welcome["type"] == "welcome" and welcome["body_format"] == "json"
        reply = await client.request(chat(1))
        assert reply["type"] == "result" and isinstance(reply["body"], bytes)
        body = msgspec.json.decode(reply["body"])
        assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] > 0
        bad = {**chat(2), "body": {"model": "gpt-4o-mini", "messages": "not a list"}}
        error = await client.request(bad)
        assert error["type"] == "error"
        await client.aclose()

        legacy = await RawClient.connect(str(engine.socket), hello=False)
        welcome = await legacy.request({"type": "hello", "protocol": 1, "body_format": "xml"})
        assert welcome["body_format"] == "msgpack"  # unknown formats fall back, and the welcome says so
        reply = await legacy.request(chat(3))
        assert reply["body"]["object"] == "chat.completion"
        await legacy.aclose()


async def test_default_deadline_answers_a_request_that_names_none(short_tmp: Path) -> None:
    async with (
        simulator(latency_ms=600_000.0) as url,
        running_engine(short_tmp, url, "--default-deadline", "1") as engine,
    ):
        client = await RawClient.connect(str(engine.socket))
        with trio.fail_after(30):
            reply = await client.request(chat(1))
        assert (reply["type"], reply["kind"]) == ("error", "timeout")
        await client.aclose()


async def test_other_connections_are_served_while_a_large_body_is_counted(short_tmp: Path) -> None:
    # A body over 64 KiB is counted in a worker thread. A ping on another connection, sent right after the big
    # frame, is answered before the big request: counted in the event loop, the big request's answer (an
    # invalid_request found only after its first message was counted) would come first.
    async with simulator() as url, running_engine(short_tmp, url, "--max-frame-bytes", str(8 * 2**20)) as engine:
        big = await RawClient.connect(str(engine.socket))
        other = await RawClient.connect(str(engine.socket))
        words = " ".join(f"w{i % 5003}" for i in range(600_000))  # about 3.6 MB, a fraction of a second to count
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}, "not a message"]}
        order: list[str] = []
        async with trio.open_nursery() as nursery:

            async def big_request() -> None:
                reply = await big.request({"type": "submit", "id": 1, "endpoint": "/v1/chat/completions", "body": body})
                assert (reply["type"], reply["kind"]) == ("error", "invalid_request")
                order.append("big")

            nursery.start_soon(big_request)
            await trio.sleep(0.05)  # the big frame is on its way (another process: nothing to wait on)
            with trio.fail_after(30):
                pong = await other.request({"type": "ping", "id": "p"})
            assert pong["type"] == "pong"
            order.append("ping")
        assert order == ["ping", "big"]
        await big.aclose()
        await other.aclose()
