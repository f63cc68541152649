"""The status page's routes: ``/``, its static files and ``/status.json``, through the ASGI app alone (access
rules, allow-list, headers), then on a real engine over its real sockets (the JSON, the key over TCP)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import TEST_API_KEY, simulator
from test_app import ME, FakeScheduler
from test_operations import unix_http
from test_status_page import ALICE_KEY, CHAT_MODEL, CONFIG, status_engine

from trio_mapper.engine.fronts.http.app import PEER, TRANSPORT, OpenAIApp, Operation
from trio_mapper.engine.fronts.http.keys import ClientKeys
from trio_mapper.engine.fronts.http.status_page import ASSETS, status_page_routes

KEY = "tm-status-routes-0123456789abcdef"


async def status_json() -> tuple[int, str, bytes]:
    return 200, "application/json", b'{"lanes": {}}'


def app(**options: Any) -> OpenAIApp:
    operations = {"/status.json": Operation(status_json), **status_page_routes()}
    return OpenAIApp(
        FakeScheduler(), max_body_bytes=1024, keys=ClientKeys({KEY: "alice"}), operations=operations, **options
    )


async def get(
    target: OpenAIApp, path: str, *, key: str | None = None, transport: str = "tcp", peer: Any = ME
) -> tuple[int, dict[str, str], bytes]:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": b"",
        "headers": headers,
        "state": {TRANSPORT: transport, PEER: peer},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await target(scope, receive, send)
    reply_headers = {name.decode(): value.decode() for name, value in sent[0]["headers"]}
    return sent[0]["status"], reply_headers, sent[1]["body"]


def asset_paths() -> dict[str, str]:
    """Each static file's served path, by file name."""
    return {path.rsplit("/", 1)[1]: path for path in status_page_routes() if path.startswith("/static/")}


def test_every_asset_is_served_at_a_path_that_names_its_content() -> None:
    paths = asset_paths()
    assert set(paths) == set(ASSETS)
    for name, path in paths.items():
        digest = path.split("/")[2]
        assert len(digest) == 16 and int(digest, 16) >= 0, name
    page = status_page_routes()["/"]
    assert page.keyless and not any(route.listed for path, route in status_page_routes().items() if path != "/")


async def test_the_page_and_its_files_need_no_key_over_tcp_and_the_json_does() -> None:
    target = app()
    status, headers, body = await get(target, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    page = body.decode()
    # The page names the files at their served paths, and nothing of the engine.
    for name, path in asset_paths().items():
        assert f'"{path}"' in page and f'"/static/{name}"' not in page
    for name, path in asset_paths().items():
        status, headers, body = await get(target, path)
        assert status == 200 and headers["content-type"] == ASSETS[name]
        assert headers["cache-control"] == "public, max-age=31536000, immutable"
        assert headers["x-content-type-options"] == "nosniff"
        assert body
    assert (await get(target, "/status.json"))[0] == 401
    assert (await get(target, "/status.json", key="tm-wrong-0123456789abcdef"))[0] == 401
    status, headers, body = await get(target, "/status.json", key=KEY)
    assert (status, headers["cache-control"], json.loads(body)) == (200, "no-store", {"lanes": {}})
    assert target.stats.requests == 0 and target.stats.unauthorized == 2


async def test_over_the_unix_socket_the_allow_lists_apply_to_the_page_too() -> None:
    target = app(allowed_uids=[ME.uid + 1])
    for path in ["/", "/status.json", *asset_paths().values()]:
        assert (await get(target, path, transport="unix"))[0] == 403, path
    allowed = app(allowed_uids=[ME.uid])
    for path in ["/", "/status.json", *asset_paths().values()]:
        assert (await get(allowed, path, transport="unix"))[0] == 200, path


@pytest.mark.parametrize(
    "path",
    [
        "/static/../x",
        "/static/status.js",  # without its digest
        "/static/0000000000000000/status.js",  # an old digest
        "/static/",
        "/static/{digest}/../status.js",
        "/static/{digest}/status.html",  # in the directory, not in the allow-list
        "/static/{digest}/uPlot.LICENSE",
        "/index.html",
    ],
)
async def test_only_the_allow_listed_files_are_served(path: str) -> None:
    target = app()
    digest = asset_paths()["status.js"].split("/")[2]
    status, _, body = await get(target, path.format(digest=digest), key=KEY)
    assert status == 404
    error = json.loads(body)["error"]
    assert error["code"] == "unknown_url"
    # The 404 lists the page and the JSON, not the static files.
    served = error["message"].split("it serves ", 1)[1].removesuffix(" (no query strings)").split(", ")
    assert {"GET /", "GET /status.json"} <= set(served)
    assert not [route for route in served if "/static/" in route]


async def test_a_real_engine_serves_its_status(short_tmp: Path) -> None:
    async with simulator() as url, status_engine(short_tmp, url) as (engine, root):
        async with httpx.AsyncClient(base_url=root) as tcp:
            chat = await tcp.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {ALICE_KEY}"},
                json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            )
            assert chat.status_code == 200
            page = await tcp.get("/")
            no_key = await tcp.get("/status.json")
            # Sampled every 2 s: the request above shows once a sample has followed it.
            with trio.fail_after(10):
                while True:
                    status = await tcp.get("/status.json", headers={"authorization": f"Bearer {ALICE_KEY}"})
                    assert status.status_code == 200
                    if CHAT_MODEL in status.json()["history"]["lanes"]:
                        break
                    await trio.sleep(0.2)  # another process: nothing to wait on but the clock
            assets = [await tcp.get(path) for path in asset_paths().values()]
        async with unix_http(engine) as unix:
            over_unix = await unix.get("/status.json")
    assert page.status_code == 200 and "<title>trio-mapper status</title>" in page.text
    assert all(asset.status_code == 200 for asset in assets)
    assert no_key.status_code == 401
    assert over_unix.status_code == 200
    snapshot = status.json()
    assert set(snapshot) == {"interval", "window", "engine", "lanes", "tenants", "history"}
    assert snapshot["engine"]["budget"] == {"backend": "local"}
    assert snapshot["lanes"][CHAT_MODEL]["succeeded"] == 1
    assert set(snapshot["tenants"]) == {"research", "<b>batch</b>", "default"}
    history = snapshot["history"]
    assert len(history["time"]) >= 1
    assert all(len(values) == len(history["time"]) for values in history["lanes"][CHAT_MODEL].values())
    for secret in (TEST_API_KEY, ALICE_KEY, url, str(short_tmp)):
        assert secret not in status.text and secret not in page.text


async def test_a_real_engine_tells_its_reloads_as_its_status_line_does(short_tmp: Path) -> None:
    """A failed reload is counted with the reason STATUS= gives, which never quotes the file; a reload that
    leaves a change to a restart names the setting."""
    marker = "a-value-of-the-file-0123456789"
    config = short_tmp / "engine.toml"

    async def reloads_once(tcp: httpx.AsyncClient, done: Any) -> dict[str, Any]:
        with trio.fail_after(20):
            while True:
                status = await tcp.get("/status.json", headers={"authorization": f"Bearer {ALICE_KEY}"})
                assert status.status_code == 200
                assert marker not in status.text
                reloads: dict[str, Any] = status.json()["engine"]["reloads"]
                if done(reloads):
                    return reloads
                await trio.sleep(0.1)  # another process: nothing to wait on but the clock

    async with (
        simulator() as url,
        status_engine(short_tmp, url) as (engine, root),
        httpx.AsyncClient(base_url=root) as tcp,
    ):
        at_start = await reloads_once(tcp, lambda reloads: True)
        config.write_text(CONFIG + f'[server]\nmax_queued = "{marker}"\n')
        engine.process.send_signal(signal.SIGHUP)
        failed = await reloads_once(tcp, lambda reloads: reloads["failed"] == 1)
        config.write_text(CONFIG + "[server]\nmax_queued = 1000\n")
        engine.process.send_signal(signal.SIGHUP)
        applied = await reloads_once(tcp, lambda reloads: reloads["applied"] == 1)
    assert at_start["applied"] == at_start["failed"] == 0
    assert at_start["failure"] is None and at_start["not_applied"] == []
    assert failed["applied"] == 0 and failed["failure"]["reason"].startswith("1 problem in the settings")
    assert failed["failure"]["at"] >= at_start["succeeded_at"]
    assert applied["failed"] == 1 and applied["failure"] is None
    assert applied["not_applied"] == ["server.max_queued (needs a restart)"]
    assert applied["succeeded_at"] > at_start["succeeded_at"]
