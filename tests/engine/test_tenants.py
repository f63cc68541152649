"""Tenants end to end: the engine as a real subprocess with ``[tenants.NAME]`` tables in its config file, the
simulator as a real HTTP upstream, and msgpack clients whose hello names make them different tenants.

Each scenario makes the engine queue (few concurrency slots, a little upstream latency, or a cap) and looks at
what each tenant got: queue waits, tokens dispatched (``stats`` → ``engine.tenants[NAME].tokens_24h``), errors.
They assert behaviour with generous margins, never exact timings.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import running_engine, simulator

from trio_mapper import AsyncClient, BudgetExhaustedError
from trio_mapper.client.core import Result

MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
#: 8 prompt tokens + 16 of output budget: what each request costs (the engine's estimate, the simulator's count).
BODY: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
REQUEST_TOKENS = 24
#: The engine's cap burst (`tenants.CAP_BURST_SECONDS`): a capped tenant may spend one second of its pace at once.
CAP_BURST_SECONDS = 1.0

#: ``stats`` → ``engine.tenants``: each tenant's settings, tokens over the last 24 hours and queued requests.
Tenants = dict[str, dict[str, Any]]


def toml_value(value: Any) -> str:
    # JSON strings, numbers and arrays of them are valid TOML.
    return json.dumps(value)


def write_config(path: Path, tenants: Mapping[str, Mapping[str, Any]]) -> Path:
    """A config file of ``[tenants.NAME]`` tables (a None value: the key is left out)."""
    lines = ["[server]"]
    for name, table in tenants.items():
        settings = [f"{key} = {toml_value(value)}" for key, value in table.items() if value is not None]
        lines += ["", f"[tenants.{name}]", *settings]
    path.write_text("\n".join(lines) + "\n")
    return path


def limits(concurrent: int, rpm: int = 100_000, tpm: int = 10_000_000) -> tuple[str, ...]:
    """Command-line limits; they override the config file's, so they are given here (after conftest's)."""
    return ("--max_concurrent_reqs", str(concurrent), "--rpm", str(rpm), "--tpm", str(tpm))


async def tenants_of(client: AsyncClient) -> Tenants:
    tenants: Tenants = (await client.stats())["engine"]["tenants"]
    return tenants


async def flood(client: AsyncClient, count: int, results: list[Result], errors: list[BaseException]) -> None:
    """``count`` requests at once on one connection; each outcome lands in ``results`` or ``errors``."""

    async def one() -> None:
        try:
            results.append(await client.request_result(ENDPOINT, BODY))
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def wait_until(predicate: Callable[[Tenants], Any], client: AsyncClient) -> Tenants:
    """Poll the engine's tenant statistics until ``predicate(tenants)`` holds (10 s at most); returns them."""
    with trio.fail_after(10):
        while True:
            tenants = await tenants_of(client)
            if predicate(tenants):
                return tenants
            await trio.sleep(0.02)


async def test_an_interactive_tenant_waits_far_less_than_a_flooding_batch(short_tmp: Path) -> None:
    config = write_config(
        short_tmp / "engine.toml",
        {
            "ui": {"priority": "interactive", "names": ["ui"]},
            "bulk": {"priority": "batch", "names": ["bulk"]},
        },
    )
    batch: list[Result] = []
    batch_errors: list[BaseException] = []
    interactive: list[Result] = []
    async with (
        simulator(latency_ms=10.0) as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=2)) as engine,
        AsyncClient(engine.socket, client_name="bulk") as bulk,
        AsyncClient(engine.socket, client_name="ui") as ui,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(flood, bulk, 200, batch, batch_errors)
        await wait_until(lambda tenants: tenants["bulk"]["queued"] >= 100, ui)
        for _ in range(5):  # a person's requests, one after the other, while the batch saturates the key
            interactive.append(await ui.request_result(ENDPOINT, BODY))
            await trio.sleep(0.05)
        assert (await tenants_of(ui))["bulk"]["queued"] > 0, "the batch must still be queued for the comparison"
    assert not batch_errors
    assert len(batch) == 200, "the batch completes too"
    batch_wait = statistics.median(result.timings.queued for result in batch)
    interactive_wait = max(result.timings.queued for result in interactive)
    assert batch_wait > 0.2, f"the batch must have queued for the comparison to mean anything ({batch_wait:.3f}s)"
    assert interactive_wait * 10 < batch_wait, (interactive_wait, batch_wait)


async def test_a_batch_tenant_is_not_starved_by_a_saturating_interactive_one(short_tmp: Path) -> None:
    config = write_config(
        short_tmp / "engine.toml",
        {
            "ui": {"priority": "interactive", "names": ["ui"]},
            "bulk": {"priority": "batch", "names": ["bulk"]},
        },
    )
    flood_results: list[Result] = []
    errors: list[BaseException] = []
    async with (
        simulator(latency_ms=10.0) as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=2)) as engine,
        AsyncClient(engine.socket, client_name="ui") as ui,
        AsyncClient(engine.socket, client_name="bulk") as bulk,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(flood, ui, 300, flood_results, errors)
        await wait_until(lambda tenants: tenants["ui"]["queued"] >= 200, bulk)
        batch: list[Result] = []
        # One dispatch in GUARD_EVERY + 1 (21) goes to the waiting lower class: 5 batch requests need ~105.
        await flood(bulk, 5, batch, errors)
        left = (await tenants_of(bulk))["ui"]["queued"]
    assert not errors and len(batch) == 5
    assert left >= 50, f"the batch finished only once the interactive flood had drained ({left} left)"
    assert len(flood_results) == 300


async def test_two_batch_tenants_share_the_key_by_weight_in_tokens(short_tmp: Path) -> None:
    config = write_config(
        short_tmp / "engine.toml",
        {
            "heavy": {"priority": "batch", "weight": 3, "names": ["heavy"]},
            "light": {"priority": "batch", "weight": 1, "names": ["light"]},
        },
    )
    results: list[Result] = []
    errors: list[BaseException] = []
    async with (
        simulator(latency_ms=10.0) as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=2)) as engine,
        AsyncClient(engine.socket, client_name="heavy") as heavy,
        AsyncClient(engine.socket, client_name="light") as light,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(flood, heavy, 240, results, errors)
        nursery.start_soon(flood, light, 100, results, errors)
        # Both saturating: all submitted, both with requests waiting.
        await wait_until(lambda t: t["heavy"]["queued"] >= 150 and t["light"]["queued"] >= 60, heavy)
        first = await tenants_of(heavy)
        last = first
        started = trio.current_time()
        while trio.current_time() - started < 1.0:
            await trio.sleep(0.1)
            now = await tenants_of(heavy)
            if now["heavy"]["queued"] < 10 or now["light"]["queued"] < 10:
                break  # one of them is about to stop saturating: the window ends with the last snapshot
            last = now
    assert not errors and len(results) == 340
    heavy_tokens = last["heavy"]["tokens_24h"] - first["heavy"]["tokens_24h"]
    light_tokens = last["light"]["tokens_24h"] - first["light"]["tokens_24h"]
    assert light_tokens >= 12 * REQUEST_TOKENS, f"the window is too short to measure ({heavy_tokens}, {light_tokens})"
    assert 2.3 <= heavy_tokens / light_tokens <= 3.9, (heavy_tokens, light_tokens)


async def test_caps_hold_a_tenant_to_its_pace_and_its_requests_wait(short_tmp: Path) -> None:
    lane_tpm = 600_000
    caps = {"fixed": 12_000.0, "share": 0.04 * lane_tpm}  # tokens per minute
    rpm_cap = 600  # requests per minute
    config = write_config(
        short_tmp / "engine.toml",
        {
            "fixed": {"priority": "batch", "tpm_cap": 12000, "names": ["fixed"]},
            "share": {"priority": "batch", "tpm_cap": "4%", "names": ["share"]},
            "paced": {"priority": "batch", "rpm_cap": rpm_cap, "names": ["paced"]},
        },
    )
    counts = {"fixed": 30, "share": 60, "paced": 36}
    results: dict[str, list[Result]] = {name: [] for name in counts}
    errors: list[BaseException] = []
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=8, tpm=lane_tpm)) as engine,
        AsyncClient(engine.socket, client_name="stats") as observer,
        AsyncClient(engine.socket, client_name="fixed") as fixed,
        AsyncClient(engine.socket, client_name="share") as share,
        AsyncClient(engine.socket, client_name="paced") as paced,
        trio.open_nursery() as nursery,
    ):
        for name, client in {"fixed": fixed, "share": share, "paced": paced}.items():
            nursery.start_soon(flood, client, counts[name], results[name], errors)
        await wait_until(lambda t: all(t[name]["queued"] for name in counts), observer)
        await trio.sleep(0.2)
        first, first_at = await tenants_of(observer), trio.current_time()
        await trio.sleep(1.5)
        last, last_at = await tenants_of(observer), trio.current_time()
    assert not errors, errors
    assert {name: len(done) for name, done in results.items()} == counts, "a capped tenant's requests wait"
    # Without the caps the engine would have sent all of it in a fraction of a second.
    assert all(last[name]["queued"] for name in counts), {name: last[name]["queued"] for name in counts}
    interval = last_at - first_at + 0.1  # the two stats round trips: generous
    for name, cap in caps.items():
        spent = last[name]["tokens_24h"] - first[name]["tokens_24h"]
        per_second = cap / 60
        bound = per_second * interval + per_second * CAP_BURST_SECONDS + REQUEST_TOKENS
        assert spent <= bound, (name, spent, bound)
        assert spent >= 0.5 * per_second * (last_at - first_at), f"{name} must go on at about its cap ({spent})"
    sent = (last["paced"]["tokens_24h"] - first["paced"]["tokens_24h"]) / REQUEST_TOKENS
    per_second = rpm_cap / 60
    assert sent <= per_second * interval + per_second * CAP_BURST_SECONDS + 1, sent
    assert sent >= 0.5 * per_second * (last_at - first_at), sent
    assert last["fixed"]["tpm_cap"] == "12000/min"
    assert last["share"]["tpm_cap"] == "4% of the limit"
    assert last["paced"]["rpm_cap"] == "600/min"


async def test_a_spent_daily_budget_refuses_that_tenant_only(short_tmp: Path) -> None:
    daily = 200
    config = write_config(
        short_tmp / "engine.toml",
        {
            "other": {"names": ["other"]},
            # Proven by the uid alone: the HTTP front on the Unix socket (no name) lands here too.
            "me": {"uids": [os.getuid()], "daily_tokens": daily},
        },
    )
    results: list[Result] = []
    errors: list[BaseException] = []
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=4)) as engine,
        AsyncClient(engine.socket, client_name="spender") as spender,
        AsyncClient(engine.socket, client_name="other") as other,
    ):
        # All accepted at once; the budget runs out while most of them wait: those fail, not only new ones.
        await flood(spender, 20, results, errors)
        assert len(results) == math.ceil(daily / REQUEST_TOKENS), (len(results), errors[:1])
        assert len(errors) == 20 - len(results)
        assert all(isinstance(error, BudgetExhaustedError) for error in errors), errors[:1]
        assert "daily budget" in str(errors[0])
        with pytest.raises(BudgetExhaustedError):
            await spender.request_result(ENDPOINT, BODY)
        transport = httpx.AsyncHTTPTransport(uds=str(engine.socket) + ".http")
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as http:
            refused = await http.post(ENDPOINT, json=BODY)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "insufficient_quota"
        assert refused.headers["x-should-retry"] == "false"
        # Another tenant is not affected.
        assert (await other.request_result(ENDPOINT, BODY)).status == 200
        tenants = await tenants_of(other)
    assert daily <= tenants["me"]["tokens_24h"] < daily + REQUEST_TOKENS
    assert tenants["me"]["daily_tokens"] == daily
    assert tenants["other"]["tokens_24h"] == REQUEST_TOKENS


async def reloaded(engine: Any, times: int = 1) -> None:
    """Wait for the engine's log to say it reloaded ``times`` times in all."""
    with trio.fail_after(10):
        while engine.log.count("reloaded: ") < times:  # noqa: ASYNC110 - another process's log: only the clock
            await trio.sleep(0.05)


async def test_a_reload_changes_tenants_while_their_requests_wait(short_tmp: Path) -> None:
    # 1,200 tokens a minute: a 24-token request every 1.2 s. Twenty would take half a minute under the cap.
    capped = {"priority": "batch", "tpm_cap": 1200, "names": ["slow"]}
    config = write_config(short_tmp / "engine.toml", {"slow": capped})
    results: list[Result] = []
    errors: list[BaseException] = []
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=4)) as engine,
        AsyncClient(engine.socket, client_name="slow") as slow,
        AsyncClient(engine.socket, client_name="watcher") as watcher,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, slow, 20, results, errors)
            before = await wait_until(lambda t: t["slow"]["queued"] >= 15, watcher)
            assert before["slow"]["tpm_cap"] == "1200/min"
            write_config(config, {"slow": {**capped, "tpm_cap": None} | {"weight": 2}})
            engine.process.send_signal(signal.SIGHUP)
            await reloaded(engine)
            reloaded_at = trio.current_time()
        drained_in = trio.current_time() - reloaded_at
        after = await tenants_of(watcher)
    assert not errors, errors
    assert len(results) == 20, "nothing lost"
    assert drained_in < 5.0, f"the cap is gone: the rest goes at the key's pace ({drained_in:.1f}s)"
    assert after["slow"]["tpm_cap"] is None and after["slow"]["weight"] == 2
    reload_line = next(line for line in engine.log.splitlines() if "reloaded: " in line)
    assert "tenants.slow: weight 1 -> 2, tpm_cap 1200 -> unset" in reload_line


async def test_lifting_a_small_cap_frees_the_waiting_requests_at_once(short_tmp: Path) -> None:
    # 60 tokens a minute: the first request goes at once (into debt), the next one would wait ~23 s.
    capped = {"priority": "batch", "tpm_cap": 60, "names": ["slow"]}
    config = write_config(short_tmp / "engine.toml", {"slow": capped})
    results: list[Result] = []
    errors: list[BaseException] = []
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=4)) as engine,
        AsyncClient(engine.socket, client_name="slow") as slow,
        AsyncClient(engine.socket, client_name="watcher") as watcher,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(flood, slow, 5, results, errors)
        await wait_until(lambda t: t["slow"]["tokens_24h"] and t["slow"]["queued"] == 4, watcher)
        write_config(config, {"slow": {**capped, "tpm_cap": None}})
        engine.process.send_signal(signal.SIGHUP)
        await reloaded(engine)
        with trio.fail_after(3):
            await wait_until(lambda t: t["slow"]["queued"] == 0, watcher)
    assert len(results) == 5 and not errors


async def test_a_raised_daily_budget_applies_to_requests_already_queued(short_tmp: Path) -> None:
    # Two requests' worth a day, and a request a second (the cap's burst holds just one): the third would fail at
    # its dispatch, two seconds in, had the budget not been raised meanwhile.
    tenant = {"priority": "batch", "daily_tokens": 2 * REQUEST_TOKENS, "tpm_cap": 60 * REQUEST_TOKENS, "names": ["t"]}
    config = write_config(short_tmp / "engine.toml", {"t": tenant})
    results: list[Result] = []
    errors: list[BaseException] = []
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=4)) as engine,
        AsyncClient(engine.socket, client_name="t") as client,
        AsyncClient(engine.socket, client_name="watcher") as watcher,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(flood, client, 4, results, errors)
        await wait_until(lambda t: t["t"]["tokens_24h"] == REQUEST_TOKENS and t["t"]["queued"] == 3, watcher)
        write_config(config, {"t": {**tenant, "daily_tokens": 1_000_000}})
        engine.process.send_signal(signal.SIGHUP)
        await reloaded(engine)
    assert not errors, errors
    assert len(results) == 4


async def test_hello_names_are_claims_that_only_narrow(short_tmp: Path) -> None:
    uid = os.getuid()
    config = write_config(
        short_tmp / "engine.toml",
        {
            "named": {"names": ["alice"]},  # names only: whoever says "alice"
            "guarded": {"uids": [uid + 4242], "names": ["bob"]},  # "bob" from a uid this client does not have
            "mine": {"uids": [uid], "names": ["carol"]},  # this uid, and the name "carol"
        },
    )
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=4)) as engine,
        AsyncClient(engine.socket, client_name="watcher") as watcher,
    ):
        expected = {"alice": "named", "bob": "default", "carol": "mine", "dave": "default"}
        for name, tenant in expected.items():
            before = await tenants_of(watcher)
            async with AsyncClient(engine.socket, client_name=name) as client:
                await client.request_result(ENDPOINT, BODY)
            after = await tenants_of(watcher)
            spent = {key: after[key]["tokens_24h"] - before[key]["tokens_24h"] for key in after}
            assert spent == {key: REQUEST_TOKENS if key == tenant else 0 for key in after}, name
        # The HTTP front on the Unix socket knows the uid but no name: "mine" wants both.
        before = await tenants_of(watcher)
        transport = httpx.AsyncHTTPTransport(uds=str(engine.socket) + ".http")
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as http:
            assert (await http.post(ENDPOINT, json=BODY)).status_code == 200
        after = await tenants_of(watcher)
    assert after["default"]["tokens_24h"] - before["default"]["tokens_24h"] == REQUEST_TOKENS
    assert after["mine"]["tokens_24h"] == before["mine"]["tokens_24h"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a client process a supplementary group takes root")
async def test_a_supplementary_group_proves_a_tenant(short_tmp: Path) -> None:
    group = os.getgid() + 4242  # not this process's primary group; the client below gets it as a supplementary one
    config = write_config(short_tmp / "engine.toml", {"staff": {"gids": [group]}})
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), *limits(concurrent=4)) as engine,
        AsyncClient(engine.socket, client_name="watcher") as watcher,
    ):
        before = await tenants_of(watcher)
        one_request = (
            "import sys; from trio_mapper import Client\n"
            "with Client(sys.argv[1]) as client: client.request(sys.argv[2], " + repr(BODY) + ")"
        )
        client = await trio.run_process(
            [sys.executable, "-c", one_request, str(engine.socket), ENDPOINT], extra_groups=[group], check=False
        )
        assert client.returncode == 0
        after = await tenants_of(watcher)
    assert after["staff"]["tokens_24h"] - before["staff"]["tokens_24h"] == REQUEST_TOKENS
    assert after["default"]["tokens_24h"] == before["default"]["tokens_24h"]


@pytest.mark.parametrize(("key", "value"), [("names", "alice"), ("uids", "1000")])
def test_a_string_where_a_list_belongs_is_refused(tmp_path: Path, key: str, value: str) -> None:
    from trio_mapper.engine.process.settings import SettingsError, load_settings

    config = write_config(tmp_path / "engine.toml", {"team": {key: value}})
    with pytest.raises(SettingsError, match=f"tenants.team.{key}"):
        load_settings(
            cli={"rpm": 100, "tpm": 10_000, "max_concurrent_reqs": 1},
            config_file=config,
            environ={"OPENAI_API_KEY": "sk-test"},
            dotenv_dir=None,
        )


async def test_a_tenant_naming_a_key_the_keys_file_lacks_is_warned_about(short_tmp: Path) -> None:
    """An operator's finding: keys = ["promm"] where the keys file says "prom" started silently, and that
    client was served as the default tenant, without the caps or budget meant for it."""
    config = write_config(short_tmp / "engine.toml", {"monitoring": {"keys": ["promm"]}})
    keys = short_tmp / "keys.toml"
    keys.write_text('[keys]\nprom = "tm-prometheus-key-0123456789"\n')
    keys.chmod(0o600)
    async with (
        simulator() as url,
        running_engine(short_tmp, url, "--config", str(config), "--http-keys-file", str(keys), *limits(4)) as engine,
    ):
        assert "tenants.monitoring names client key(s) promm that the keys file does not hold" in engine.log
