"""The status page in a real browser: Debian's chromium, headless, against a real engine (a subprocess, on the
simulator) serving it on a loopback port; the page must show the engine's lanes and tenants and follow them
live as more requests arrive, without a reload.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ended by a
NUL byte, on the browser's fds 3 and 4), which needs no websocket client and no driver. Skipped when chromium is
missing, unless ``TRIO_MAPPER_REQUIRE_BROWSER=1`` (CI installs it and sets that).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import EngineProcess, running_engine, simulator
from test_http_front import free_port, write_keys

ALICE_KEY = "tm-status-alice-0123456789abcdef"
BOB_KEY = "tm-status-bob-0123456789abcdef00"
#: Tenants by client-key name; one named to test that names reach the page as text, never as markup.
CONFIG = """
[tenants.research]
keys = ["alice"]
weight = 2
[tenants."<b>batch</b>"]
keys = ["bob"]
priority = "batch"
"""
CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
#: A model name is the client's choice, and it names a lane: it must be shown, never run.
HOSTILE_MODEL = "<img src=x onerror=\"document.title='pwned'\">"
#: The machine's known-good flags for headless chromium (as root, on a closed network).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,1600", "--remote-debugging-pipe",
)  # fmt: skip

#: CI sets it: a missing chromium then fails the browser tests instead of skipping them.
REQUIRE_ENV = "TRIO_MAPPER_REQUIRE_BROWSER"
#: Seconds the page may take to show something: it polls every 2 s, and a poll is answered in milliseconds.
PAGE_TIMEOUT = 20.0

# What the page shows, read in the page itself (null until it has loaded).
PAGE_STATE = """document.readyState !== "complete" || !document.getElementById("status") ? null : JSON.stringify({
  href: location.href,
  title: document.title,
  stored: sessionStorage.getItem("trio-mapper.client-key"),
  main: !document.getElementById("status").hidden,
  form: !document.getElementById("key-form").hidden,
  notice: document.getElementById("notice").hidden ? "" : document.getElementById("notice").textContent,
  version: document.querySelector('[data-stat="version"]').textContent,
  budget: document.querySelector('[data-stat="budget"]').textContent,
  reloads: document.querySelector('[data-stat="reloads"]').textContent,
  reload: document.getElementById("reload").hidden ? "" : document.getElementById("reload").textContent,
  reload_state: document.getElementById("reload").className,
  images: document.querySelectorAll("main img, main b").length,
  lanes: Object.fromEntries([...document.querySelectorAll("article.lane")].map((card) => [
    card.querySelector("h3").textContent,
    {succeeded: card.querySelector('[data-stat="succeeded"]')?.textContent,
     charts: card.querySelectorAll("canvas").length}])),
  tenants: Object.fromEntries([...document.querySelectorAll("article.tenant")].map((card) => [
    card.querySelector("h3").textContent,
    {tokens: card.querySelector('[data-stat="tokens_24h"]')?.textContent,
     queued: card.querySelector('[data-stat="queued"]')?.textContent}])),
  charts: document.querySelectorAll("#tenant-tokens canvas, #tenant-queued canvas").length,
  shares: [...document.querySelectorAll("#shares .share")].map((share) => share.dataset.tenant),
})"""


@pytest.fixture
def chromium() -> str:
    """The ``chromium`` executable; skips without one, or fails when CI requires it. A synchronous fixture, so
    that the skip happens at setup with its reason (raised inside a trio test, the reason is lost)."""
    found = shutil.which("chromium")
    if found is not None:
        return found
    reason = "chromium is not installed (Debian: apt-get install chromium); the status page's browser tests need it"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 forbids skipping them", pytrace=False)
    pytest.skip(reason)


def count(text: str | None) -> int:
    """A number as the page prints it (``1,234``)."""
    return int(re.sub(r"\D", "", text or "") or 0)


class DevTools:
    """One page of a headless chromium, over the DevTools protocol on a pipe."""

    def __init__(self, process: trio.Process, to_browser: trio.lowlevel.FdStream, from_browser: trio.lowlevel.FdStream):
        self._process = process
        self._to = to_browser
        self._from = from_browser
        self._buffer = b""
        self._ids = 0
        self._session: str | None = None
        #: Events received so far (method, params), such as uncaught exceptions and console messages.
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        await self._to.send_all(json.dumps(message).encode() + b"\0")
        while True:
            reply = await self._receive()
            if reply.get("id") == self._ids:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append((reply["method"], reply.get("params", {})))

    async def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            data = await self._from.receive_some()
            if not data:
                raise AssertionError("chromium closed its DevTools pipe")
            self._buffer += data
        message, _, self._buffer = self._buffer.partition(b"\0")
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    async def open_page(self) -> None:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self._session = attached["sessionId"]
        await self.call("Runtime.enable")
        await self.call("Log.enable")
        await self.call("Page.enable")
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=1280, height=1600, deviceScaleFactor=1, mobile=False
        )

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    async def state(self) -> dict[str, Any] | None:
        shown = await self.evaluate(PAGE_STATE)
        state: dict[str, Any] | None = json.loads(shown) if shown is not None else None
        return state

    async def wait_for(self, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The page's state once ``condition`` holds: the page polls every 2 s, so this waits for it."""
        state: dict[str, Any] | None = None
        with trio.move_on_after(PAGE_TIMEOUT):
            while True:
                state = await self.state()
                if state is not None and condition(state):
                    return state
                await trio.sleep(0.2)  # another process: nothing to wait on but the clock
        raise AssertionError(f"the page never showed {what}; it shows {json.dumps(state, indent=1)}")

    async def screenshot(self, path: Path) -> None:
        """The whole page as a PNG (kept with ``TM_KEEP_TMP=1``, to look at); a failure to take it is ignored."""
        try:
            shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        except AssertionError:
            return
        await trio.Path(path).write_bytes(base64.b64decode(shot["data"]))

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and refused resources (CSP included) seen so far."""
        found = []
        for method, params in self.events:
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found


@asynccontextmanager
async def browser(executable: str, directory: Path) -> AsyncIterator[DevTools]:
    profile = directory / "chromium-profile"
    profile.mkdir()
    to_read, to_write = os.pipe()
    from_read, from_write = os.pipe()
    # Chromium reads commands on fd 3 and writes replies on fd 4: a small exec trampoline puts the pipes there
    # (copies first, so that neither end is closed by moving the other; dup2 onto itself keeps close-on-exec,
    # hence the explicit set_inheritable).
    trampoline = (
        "import os, sys; r, w = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
        "os.dup2(r, 3); os.dup2(w, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    command = [sys.executable, "-c", trampoline, str(to_read), str(from_write), executable, *CHROMIUM_FLAGS,
               f"--user-data-dir={profile}"]  # fmt: skip
    with (directory / "chromium.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(to_read, from_write)
        )
    os.close(to_read)
    os.close(from_write)
    to_browser, from_browser = trio.lowlevel.FdStream(to_write), trio.lowlevel.FdStream(from_read)
    devtools = DevTools(process, to_browser, from_browser)
    try:
        with trio.fail_after(30):
            await devtools.open_page()
        yield devtools
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                with contextlib.suppress(AssertionError, trio.BrokenResourceError, trio.ClosedResourceError):
                    await devtools.call("Browser.close")
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await to_browser.aclose()
            await from_browser.aclose()


@asynccontextmanager
async def status_engine(directory: Path, upstream: str) -> AsyncIterator[tuple[EngineProcess, str]]:
    """An engine on a loopback port with two client keys, each its own tenant, and its root URL."""
    keys = write_keys(directory, alice=ALICE_KEY, bob=BOB_KEY)
    config = directory / "engine.toml"
    config.write_text(CONFIG)
    port = free_port()
    args = ("--http", f"127.0.0.1:{port}", "--http-keys-file", str(keys), "--config", str(config))
    async with running_engine(directory, upstream, *args) as engine:
        yield engine, f"http://127.0.0.1:{port}"


async def send_traffic(root: str, rounds: int) -> None:
    """Chat requests from alice (tenant research), embeddings from bob (the other tenant)."""
    async with httpx.AsyncClient(base_url=root, timeout=30) as client:
        for _ in range(rounds):
            chat = await client.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {ALICE_KEY}"},
                json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 20},
            )
            assert chat.status_code == 200, chat.text
            embedding = await client.post(
                "/v1/embeddings",
                headers={"authorization": f"Bearer {BOB_KEY}"},
                json={"model": EMBEDDING_MODEL, "input": "hello"},
            )
            assert embedding.status_code == 200, embedding.text


async def test_the_page_shows_lanes_and_tenants_and_follows_them_live(short_tmp: Path, chromium: str) -> None:
    async with simulator() as url, status_engine(short_tmp, url) as (_, root), browser(chromium, short_tmp) as page:
        await send_traffic(root, 2)
        async with httpx.AsyncClient(base_url=root) as client:
            hostile = await client.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {ALICE_KEY}"},
                json={"model": HOSTILE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            )
        assert hostile.status_code < 500
        await page.navigate(f"{root}/#key={ALICE_KEY}")
        try:
            shown = await page.wait_for(
                lambda state: (
                    {CHAT_MODEL, EMBEDDING_MODEL, HOSTILE_MODEL} <= set(state["lanes"])
                    and {"research", "<b>batch</b>", "default"} <= set(state["tenants"])
                ),
                "both lanes and both tenants",
            )
            # The key was taken from the fragment, kept for the tab, and removed from the address bar.
            assert shown["href"] == f"{root}/"
            assert shown["stored"] == ALICE_KEY
            assert shown["main"] and not shown["form"] and not shown["notice"]
            assert shown["version"] not in {"", "\u2013"}  # an en dash until the first poll
            assert shown["budget"] == "local"
            assert shown["reloads"] == "0 applied \u00b7 0 failed" and shown["reload"] == ""
            # Names are text: the hostile model's markup is shown, not run; the tenant's <b> is not bold.
            assert shown["images"] == 0 and shown["title"] == "trio-mapper status"
            assert all(lane["charts"] >= 3 for lane in shown["lanes"].values())
            assert shown["charts"] >= 2
            assert set(shown["shares"]) == {"research", "<b>batch</b>"}
            succeeded = count(shown["lanes"][CHAT_MODEL]["succeeded"])
            embedded = count(shown["lanes"][EMBEDDING_MODEL]["succeeded"])
            spent = count(shown["tenants"]["research"]["tokens"])
            assert succeeded >= 2 and embedded >= 2 and spent > 0

            # More traffic while the page stays open: it follows without a reload.
            await send_traffic(root, 3)
            await page.wait_for(
                lambda state: (
                    count(state["lanes"][CHAT_MODEL]["succeeded"]) >= succeeded + 3
                    and count(state["lanes"][EMBEDDING_MODEL]["succeeded"]) >= embedded + 3
                    and count(state["tenants"]["research"]["tokens"]) > spent
                ),
                "the new requests",
            )
            assert page.problems() == []
        finally:
            await page.screenshot(short_tmp / "status-page.png")


async def test_the_page_asks_for_a_key_and_keeps_it_for_the_tab(short_tmp: Path, chromium: str) -> None:
    async with simulator() as url, status_engine(short_tmp, url) as (_, root), browser(chromium, short_tmp) as page:
        await send_traffic(root, 1)
        await page.navigate(f"{root}/")
        asked = await page.wait_for(lambda state: state["form"], "the key form")
        assert not asked["main"] and asked["lanes"] == {} and asked["stored"] is None

        submit = """(() => {
            document.getElementById("key").value = %s;
            document.querySelector("#key-form button").click();
        })()"""
        await page.evaluate(submit % json.dumps("tm-not-a-key-0123456789abcdef"))
        refused = await page.wait_for(lambda state: "did not accept" in state["notice"], "the key refused")
        assert refused["form"] and not refused["main"] and refused["stored"] is None

        await page.evaluate(submit % json.dumps(BOB_KEY))
        await page.wait_for(lambda state: state["main"] and CHAT_MODEL in state["lanes"], "the lanes")
        # The key is kept for the tab: a reload does not ask again.
        await page.evaluate("location.reload()")
        reloaded = await page.wait_for(lambda state: state["main"] and CHAT_MODEL in state["lanes"], "the lanes again")
        assert reloaded["stored"] == BOB_KEY and not reloaded["form"]
        # The 401 of the wrong key is the one error expected in the console.
        assert all("401" in problem for problem in page.problems())


async def test_the_page_tells_how_the_last_reload_went(short_tmp: Path, chromium: str) -> None:
    """As the STATUS= line of `systemctl status` does: the failure and its reason, never the file's values; then,
    after a reload that leaves a change to a restart, the setting by name."""
    marker = "a-value-of-the-file-0123456789"
    async with (
        simulator() as url,
        status_engine(short_tmp, url) as (engine, root),
        browser(chromium, short_tmp) as page,
    ):
        await page.navigate(f"{root}/#key={ALICE_KEY}")
        await page.wait_for(lambda state: state["main"] and state["reloads"].endswith("failed"), "the reloads")
        (short_tmp / "engine.toml").write_text(CONFIG + f'[server]\nmax_queued = "{marker}"\n')
        engine.process.send_signal(signal.SIGHUP)
        failed = await page.wait_for(lambda state: state["reload"].startswith("Reload failed"), "the failed reload")
        assert failed["reloads"] == "0 applied \u00b7 1 failed"
        assert "1 problem in the settings (the log names each)" in failed["reload"]
        assert "state-bad" in failed["reload_state"] and marker not in failed["reload"]
        (short_tmp / "engine.toml").write_text(CONFIG + "[server]\nmax_queued = 1000\n")
        engine.process.send_signal(signal.SIGHUP)
        applied = await page.wait_for(lambda state: state["reload"].startswith("Reloaded at"), "the next reload")
        assert applied["reloads"] == "1 applied \u00b7 1 failed"
        assert applied["reload"].endswith("; not applied: server.max_queued (needs a restart)")
        assert "state-warn" in applied["reload_state"]
        assert page.problems() == []
