"""Several engines on one key, end to end: real engine processes, a real redis-server, the simulator
enforcing the key's limits strictly. With the shared budget they stay within the limits together; with
local budgets the same run collects 429s (the N x failure this exists to prevent, shown here so the test
is known to be able to fail)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from conftest import engine_command, engine_env, running_engine, simulator, simulator_stats
from raw_client import RawClient
from redis_fixtures import redis_server

from trio_mapper import AsyncClient

MODEL = "gpt-4o-mini"
#: The key's limit, enforced by the simulator per second (10 requests a second, no burst beyond that).
RPM = 600
ENGINES = 2
PER_ENGINE = 30


async def run_jobs(sockets: list[Path]) -> list[int]:
    """Each engine gets its own batch at once; returns how many of each batch succeeded."""
    succeeded = [0] * len(sockets)

    async def batch(index: int, socket: Path) -> None:
        async with AsyncClient(socket) as client:
            bodies = [
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"engine {index} request {i}"}],
                    "max_tokens": 5,
                }
                for i in range(PER_ENGINE)
            ]
            async with trio.open_nursery() as nursery:

                async def one(body: dict[str, Any]) -> None:
                    await client.request("/v1/chat/completions", body)
                    succeeded[index] += 1

                for body in bodies:
                    nursery.start_soon(one, body)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for index, socket in enumerate(sockets):
                nursery.start_soon(batch, index, socket)
    return succeeded


async def engines_on_one_key(directory: Path, url: str, *extra: str) -> tuple[list[int], dict[str, Any], list[Any]]:
    async with AsyncExitStack() as stack:
        engines = []
        for number in range(ENGINES):
            home = directory / f"e{number}"
            home.mkdir()
            args = ("--rpm", str(RPM), "--max_concurrent_reqs", "8", *extra)
            engines.append(await stack.enter_async_context(running_engine(home, url, *args)))
        before = await simulator_stats(url)
        succeeded = await run_jobs([engine.socket for engine in engines])
        after = await simulator_stats(url)
        statistics = []
        for engine in engines:
            async with await RawClient.connect(str(engine.socket)) as client:
                statistics.append(await client.request({"type": "stats", "id": "s"}))
    refused = sum(after["rate_limited"].values()) - sum(before["rate_limited"].values())
    return succeeded, {"refused": refused, "received": after["received"] - before["received"]}, statistics


async def test_engines_sharing_a_redis_budget_stay_within_the_key_limits(short_tmp: Path) -> None:
    async with simulator(rpm=RPM, quantum=1.0) as url, redis_server() as redis:
        (short_tmp / "shared").mkdir()
        succeeded, upstream, statistics = await engines_on_one_key(short_tmp / "shared", url, "--budget", redis.url)
        assert succeeded == [PER_ENGINE] * ENGINES
        # Together they never asked for more than the key allows: not a single 429.
        assert upstream["refused"] == 0, upstream
        for stats in statistics:
            budget = stats["engine"]["budget"]
            assert budget["backend"] == "redis" and budget["state"] == "ok"
            assert budget["engines"] == ENGINES
            assert stats["lanes"][MODEL]["budget"]["mode"] == "bucket (shared)"

        # The same run with each engine on its own budget: each spends the whole key's limit.
        (short_tmp / "local").mkdir()
        succeeded, upstream, _ = await engines_on_one_key(short_tmp / "local", url)
        assert succeeded == [PER_ENGINE] * ENGINES  # the engines absorb the 429s, but they were sent
        assert upstream["refused"] > 0, upstream


async def test_an_engine_whose_redis_password_is_refused_does_not_start(short_tmp: Path) -> None:
    """A mistyped password is a mistake to fix, not an outage to wait out with every request held."""
    wrong = short_tmp / "wrong-password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    async with simulator() as url, redis_server() as redis:
        await redis.command("CONFIG", "SET", "requirepass", "the-password")
        budget = ("--budget", redis.url, "--budget-password-file", str(wrong))
        command = engine_command(short_tmp / "engine.sock", url, *budget)
        with trio.fail_after(30):
            done = await trio.run_process(command, env=engine_env(), capture_stderr=True, check=False)
        await redis.command("AUTH", "the-password")
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr  # a settings error: systemd does not restart it
    assert "refused the engine's credentials" in stderr and "--budget-password-file" in stderr
    assert "not-the-password" not in stderr
    assert not (short_tmp / "engine.sock").exists()


async def test_the_redis_password_may_be_in_dot_env_beside_the_key(short_tmp: Path) -> None:
    """``.env`` in the engine's directory holds its key (docs): the Redis password is read from there too. It was
    not, and nothing said so: the engine refused to start ("refused the engine's credentials")."""
    (short_tmp / ".env").write_text("TRIO_MAPPER_BUDGET_PASSWORD=the-password\n")
    async with simulator() as url, redis_server() as redis:
        await redis.command("CONFIG", "SET", "requirepass", "the-password")
        try:
            async with running_engine(short_tmp, url, "--budget", redis.url) as engine:
                async with AsyncClient(engine.socket) as client:
                    budget = (await client.stats())["engine"]["budget"]
                assert budget["backend"] == "redis" and budget["state"] == "ok", budget
                assert "the-password" not in engine.log
        finally:
            await redis.command("AUTH", "the-password")
