"""The engine daemon: one Trio nursery supervising the listener, the scheduler and the connections.

Shutdown follows hypercorn's two-nursery pattern. The front nursery (the accept loop) is cancelled first, so
no new client gets in; then the scheduler answers queued requests ``shutting_down`` and gives in-flight ones
the grace period; then every connection flushes its last replies and closes.

Signals are received from the first moment of the Trio run, before anything is created: SIGINT or SIGTERM
during start-up abandons it, and whatever start-up had created is removed on the way out.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import resource
import signal
import socket as stdlib_socket
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import trio

from trio_mapper._version import __version__
from trio_mapper.engine.budget import Ledger, Limits
from trio_mapper.engine.budget.local import LocalMeter
from trio_mapper.engine.budget.shared import (
    BudgetRefused,
    SharedBudget,
    SharedBudgetSettings,
    check_credentials,
    key_identity,
)
from trio_mapper.engine.core.scheduler import MAX_LANES, JobRecord, Scheduler
from trio_mapper.engine.core.tenants import ClientIdentity, Price, Prices, tenants_from_config
from trio_mapper.engine.estimate.tokens import TokenEstimator
from trio_mapper.engine.fronts.http.app import OpenAIApp, Operation
from trio_mapper.engine.fronts.http.keys import ClientKeys, KeysError, describe_key_changes, load_keys
from trio_mapper.engine.fronts.http.server import HttpServer, Transport
from trio_mapper.engine.fronts.http.status_page import status_page_routes
from trio_mapper.engine.fronts.receiving import ReceivingBytes, receiving_limit
from trio_mapper.engine.fronts.unix.connection import Connection
from trio_mapper.engine.fronts.unix.listener import ListenerError, OwnedSocketFile, accept_forever, open_unix_listener
from trio_mapper.engine.fronts.unix.peers import (
    PeerCredentials,
    is_allowed,
    peer_credentials,
    refusal_message,
    refuse,
)
from trio_mapper.engine.fronts.unsent import UnsentReplies
from trio_mapper.engine.process import systemd
from trio_mapper.engine.process.metrics import EngineMetrics, Readiness, healthz
from trio_mapper.engine.process.reload import Reloads, plan_reload
from trio_mapper.engine.process.settings import (
    LoadedSettings,
    ServerSettings,
    Settings,
    SettingsError,
    parse_loopback_address,
)
from trio_mapper.engine.process.status_history import StatusHistory
from trio_mapper.engine.upstream.client import Upstream
from trio_mapper.engine.upstream.ratelimit_headers import budget_headers

log = logging.getLogger("trio_mapper.engine")


class SettingRefused(ListenerError):
    """A setting found wrong only when the engine used it (the HTTP keys file, Redis's credentials): a settings
    error like those read before start-up, so the CLI exits with the same status (2), which the systemd unit
    does not restart: a restart every 2 s cannot mend it."""


#: The most open files the engine asks for (the kernel's default ceiling, fs.nr_open, is 1,048,576).
MAX_OPEN_FILES: Final = 1 << 20


def _raise_open_file_limit() -> int:
    """Take all the open files the hard limit allows. Each client connection costs one, and the soft limit is
    often 1024 (systemd's default for services), which a few hundred keep-alive clients and a slow moment
    would exhaust; the hard limit is the operator's ceiling (LimitNOFILE) and stays as it is.

    Returns:
        The open files the engine may use from now on (at most `MAX_OPEN_FILES`).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d (%s)", soft, wanted, exc)
        return soft
    log.debug("open-file limit raised from %d to %d", soft, wanted)
    return wanted


#: How often the one-line STATUS= shown by `systemctl status` is refreshed (only sent when it changed).
STATUS_INTERVAL: Final = 2.0
#: At exit, how long the last settlements may take to reach the shared budget's Redis.
SETTLE_AT_EXIT_TIMEOUT: Final = 2.0
#: SIGINT and SIGTERM stop the engine gracefully (a second one ends the grace period); SIGHUP reloads.
SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def prices_from_config(server: ServerSettings) -> Prices:
    return Prices({name: Price(price.input, price.output) for name, price in server.prices.items()})


def ledger_limits(server: ServerSettings) -> tuple[Limits, dict[str, Limits]]:
    """The default limits and the per-model table of the settings, as the ledger takes them."""
    per_model = {name: Limits(rpm=lim.rpm, tpm=lim.tpm) for name, lim in server.models.items()}
    return Limits(rpm=server.rpm, tpm=server.tpm), per_model


class Engine:
    """Everything the running engine holds. `serve` runs it until SIGINT/SIGTERM or `request_shutdown`."""

    def __init__(
        self,
        settings: Settings,
        estimator: TokenEstimator,
        *,
        reload_settings: Callable[[], LoadedSettings] | None = None,
        early_signals: list[int] | None = None,
        budget_password: str | None = None,
    ) -> None:
        self.settings = settings
        #: Loads the settings again from the same layers (file < env < original CLI args), for SIGHUP.
        self._reload_settings = reload_settings
        #: Signals that arrived before `serve` installed its receiver, recorded by whoever started the process
        #: (launch-engine does from its first line); `serve` acts on them, in order, once its receiver is in place.
        self._early_signals = early_signals if early_signals is not None else []
        #: Set by SIGHUP; `_reload_when_asked` reloads (one at a time, since a reload reads files in a thread).
        self._reload_asked = trio.Event()
        #: The socket actually served: --socket, or the one systemd passed (then --socket is informational).
        self.listening_on = str(settings.server.socket)
        self._notifier = systemd.Notifier(None)
        self._estimator = estimator
        server = settings.server
        default_limits, per_model = ledger_limits(server)
        #: The budget shared with other engines through Redis, when ``budget`` names one.
        self.shared_budget: SharedBudget | None = None
        if server.budget != "local":
            self.shared_budget = SharedBudget(
                SharedBudgetSettings(
                    url=server.budget,
                    password=budget_password,
                    namespace=server.budget_namespace,
                    failure_policy=server.budget_failure,
                    timeout=server.budget_timeout,
                ),
                key_id=key_identity(settings.openai.api_key, settings.openai.base_url),
            )
        self.ledger = Ledger(
            default_limits,
            server.period_length,
            per_model=per_model,
            mode=server.ledger_mode,
            meter_factory=self.shared_budget if self.shared_budget is not None else LocalMeter,
        )
        self._shutdown_requested = trio.Event()
        #: Covers start-up (socket, upstream clients); a shutdown request cancels it.
        self._starting = trio.CancelScope()
        #: READY=1 was sent: reloads are announced to systemd only from then on.
        self._ready = False
        #: The open files the engine may use (`_raise_open_file_limit`, at start-up).
        self._open_files = MAX_OPEN_FILES
        #: The msgpack connections, with who connected (so a reload that narrows the allow-lists can cut them).
        self._connections: dict[Connection, PeerCredentials | None] = {}
        #: Replies the clients of both fronts have not read yet, bounded together (`fronts.unsent`).
        self._unsent = UnsentReplies()
        self._receiving = ReceivingBytes(receiving_limit(self.settings.server.max_frame_bytes))
        self._started_at = time.time()
        #: How the reloads went, for STATUS=, the stats and the metrics.
        self.reloads = Reloads(succeeded_at=self._started_at)
        self.scheduler: Scheduler | None = None
        #: The HTTP front's listeners (its Unix socket, a loopback port) and the socket file we created.
        self._http_listeners: list[tuple[trio.SocketListener, Transport]] = []
        self._http_socket_file: OwnedSocketFile | None = None
        #: Where the HTTP front listens, for logs and stats.
        self.http_listening_on: list[str] = []
        self._http_keys = ClientKeys()
        self._http: HttpServer | None = None
        #: Built once for the engine's life (a reload changes limits, not what is measured), so its collectors
        #: are registered exactly once.
        self.metrics = EngineMetrics(
            statistics=self._statistics_for_metrics,
            clients=lambda: self.scheduler.client_statistics() if self.scheduler is not None else {},
            max_lanes=MAX_LANES,
        )
        #: The last minutes of the lanes and tenants, for the status page (sampled while serving).
        self.status_history = StatusHistory(statistics=self._statistics_for_metrics)

    def request_shutdown(self) -> None:
        self._shutdown_requested.set()
        self._starting.cancel()

    def statistics(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        assert self.scheduler is not None
        engine, lanes = self.scheduler.statistics()
        server = self.settings.server
        engine.update(
            version=__version__,
            pid=os.getpid(),
            uptime=round(time.time() - self._started_at, 3),
            connections=len(self._connections),
            # Large msgpack frames being received, and those waiting, unread, for room in that total.
            receiving_bytes=self._receiving.held,
            receiving_waiting=self._receiving.waiting,
            # Replies not yet read by their clients, on both fronts, and the bound past which the largest is cut.
            unsent_reply_bytes=self._unsent.total,
            max_unsent_reply_bytes=self._unsent.max_bytes,
            socket=self.listening_on,
            http=self.http_listening_on,
            base_url=self.settings.openai.base_url,
            default_limits={"rpm": server.rpm, "tpm": server.tpm},
            period_length=server.period_length,
            ledger_mode=server.ledger_mode,
            budget=self.shared_budget.statistics() if self.shared_budget is not None else {"backend": "local"},
            reloads=self.reloads.statistics(),
        )
        if self._http is not None:
            engine["http_requests"] = attrs.asdict(self._http.app.stats)
            engine["http_connections"] = self._http.connections
        return engine, lanes

    def _statistics_for_metrics(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        return self.statistics() if self.scheduler is not None else ({}, {})

    def _budget_problem(self) -> str | None:
        """Why the budget admits nothing now (for /readyz), or None."""
        budget = self.shared_budget
        if budget is None or budget.available or budget.settings.failure_policy != "wait":
            return None
        return "the shared budget's Redis is unreachable: requests are held until it answers (failure policy 'wait')"

    def _observe(self, job: JobRecord) -> None:
        self.metrics.observe(job)
        self.status_history.observe(job)

    def budget_headers(self, model: str) -> dict[str, str]:
        """``x-ratelimit-*`` describing the engine's budget for ``model``'s lane (the whole key's, shared by
        every client), in OpenAI's format; empty when the lane does not exist (yet, or any more)."""
        stats = self.ledger.lane_statistics(self.ledger.lane_name(model) if model else "default")
        if stats is None:
            return {}
        paused = stats.pause_remaining

        def reset(capacity: float, available: float, per_minute: int) -> float | None:
            if stats.mode != "bucket":
                return None  # a window resets at its end, which the snapshot does not say
            return max(paused, max(0.0, capacity - available) / (per_minute / 60))

        return budget_headers(
            limit_requests=stats.effective.rpm,
            limit_tokens=stats.effective.tpm,
            remaining_requests=0 if paused else stats.requests_available,
            remaining_tokens=0 if paused else stats.tokens_available,
            reset_requests=reset(stats.request_capacity, stats.requests_available, stats.effective.rpm),
            reset_tokens=reset(stats.token_capacity, stats.tokens_available, stats.effective.tpm),
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGINT/SIGTERM or `request_shutdown`, then stop gracefully; remove our socket on the way out.

        The signal receiver is the first thing installed: from then on a signal is a request the engine acts on,
        at any point of start-up as well as while serving, never the default action that would kill the
        process and leave the socket file behind.

        Raises:
            ListenerError: the socket cannot be created or taken over from systemd.
        """
        with trio.open_signal_receiver(*SIGNALS) as signals:
            # Those recorded before the receiver existed. Any later one reaches the receiver: the handlers
            # were all replaced before this list is read.
            while self._early_signals:
                self._on_signal(self._early_signals.pop(0))
            failure: ListenerError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                nursery.start_soon(self._reload_when_asked)
                try:
                    await self._start_and_serve(task_status)
                except ListenerError as exc:
                    # Raised below, outside the nursery, so that the CLI gets it as itself rather than inside
                    # an exception group.
                    failure = exc
                finally:
                    nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
        log.info("stopped")

    async def _start_and_serve(self, task_status: trio.TaskStatus[None]) -> None:
        server = self.settings.server
        self._open_files = _raise_open_file_limit()
        # Read (and removed from the environment) before anything else, so no child could inherit them.
        self._notifier = systemd.Notifier.from_environment(os.environ)
        watchdog_interval = systemd.watchdog_interval(os.environ)
        listener: trio.SocketListener | None = None
        socket_file: OwnedSocketFile | None = None
        upstream: Upstream | None = None
        try:
            # A stop requested before now (a signal recorded before the Trio run) creates nothing at all.
            if not self._shutdown_requested.is_set():
                with self._starting:
                    await self._check_budget_credentials()
                    listener, socket_file = await self._open_listener()
                    await self._open_http_listeners(systemd_socket=socket_file is None)
                    # Building the clients takes a while (an SSL context each) and cannot be interrupted: a
                    # signal meanwhile is acted on at the next checkpoint, which stops serving at once.
                    upstream = Upstream(
                        self.settings.openai,
                        max_connections=server.max_nb_sockets,
                        concurrency=server.max_concurrent_reqs,
                    )
            if listener is None or upstream is None or self._shutdown_requested.is_set():
                log.info("stopping before serving")
                return
            await self._serve(listener, socket_file, upstream, watchdog_interval, task_status)
        finally:
            with trio.CancelScope(shield=True):
                if listener is not None:
                    await listener.aclose()
                if socket_file is not None:
                    socket_file.remove()
                await self._close_http_listeners()
                if upstream is not None:
                    await upstream.aclose()
            self._notifier.close()

    async def _serve(
        self,
        listener: trio.SocketListener,
        socket_file: OwnedSocketFile | None,
        upstream: Upstream,
        watchdog_interval: float | None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        server = self.settings.server
        scheduler = self.scheduler = Scheduler(
            ledger=self.ledger,
            upstream=upstream,
            estimator=self._estimator,
            max_concurrent_reqs=server.max_concurrent_reqs,
            max_queued=server.max_queued,
            max_queued_bytes=server.max_queued_bytes,
            default_max_attempts=server.max_attempts,
            default_deadline=server.default_deadline,
            observer=self._observe,
            tenants=tenants_from_config(server.tenants),
            prices=prices_from_config(server),
        )
        models_url = upstream.url_for("models")

        async def probe() -> int:
            # Sent as is, outside the budget: a readiness probe must not wait behind queued work. Readiness
            # sends one only when the engine has been idle, at most once every few seconds.
            return (await upstream.send("GET", models_url, None)).status

        readiness = Readiness(
            shutting_down=self._shutdown_requested.is_set,
            last_contact=lambda: upstream.last_contact,
            probe=probe,
            budget_problem=self._budget_problem,
        )
        http = self._http = HttpServer(
            OpenAIApp(
                scheduler,
                max_body_bytes=server.max_frame_bytes,
                keys=self._http_keys,
                allowed_uids=server.allowed_uids,
                allowed_gids=server.allowed_gids,
                budget_headers=self.budget_headers,
                operations={
                    "/metrics": Operation(self.metrics.respond),
                    "/healthz": Operation(healthz, keyless=True),
                    "/readyz": Operation(readiness.respond, keyless=True),
                    "/status.json": Operation(self.status_history.respond),
                    **status_page_routes(),
                },
            ),
            # A quarter of the open files: the TCP port, open to every local user, can never take the
            # descriptors the Unix sockets' clients and the upstream connections need.
            max_tcp_connections=max(16, self._open_files // 4),
            unsent=self._unsent,
        )
        async with trio.open_nursery() as root:
            if self.shared_budget is not None:
                await root.start(self.shared_budget.run)
            await root.start(scheduler.run)
            await root.start(self.status_history.run)
            if watchdog_interval is not None:
                root.start_soon(self._keep_watchdog, watchdog_interval)
            async with trio.open_nursery() as connections:
                await connections.start(http.run)
                async with trio.open_nursery() as front:
                    front.start_soon(self._accept_loop, listener, connections)
                    for http_listener, transport in self._http_listeners:
                        front.start_soon(http.accept_loop, http_listener, transport)
                    front.start_soon(self._stop_on_request, front.cancel_scope)
                    log.info(
                        "listening on %s (%s); upstream %s; %d rpm, %d tpm, period %gs, %d concurrent",
                        self.listening_on,
                        f"mode {server.socket_mode:#o}" if socket_file is not None else "passed by systemd",
                        self.settings.openai.base_url,
                        server.rpm,
                        server.tpm,
                        server.period_length,
                        server.max_concurrent_reqs,
                    )
                    if self.http_listening_on:
                        log.info("OpenAI HTTP API on %s", ", ".join(self.http_listening_on))
                    # Everything loaded so far (the tokenizers' tables, modules, settings) lives as long as the
                    # process: out of the collector's sight, each full collection no longer walks it again.
                    gc.freeze()
                    task_status.started()
                    if self._notifier.enabled:
                        self._notifier.ready(self._status_line())
                        self._ready = True
                        root.start_soon(self._report_status)
                self._notifier.stopping(self._status_line())
                await self._stop_accepting(listener, socket_file)
                await scheduler.shutdown(server.grace_period)
                if self.shared_budget is not None:
                    # What the last replies taught the shared budget reaches Redis if it can, briefly.
                    with trio.move_on_after(SETTLE_AT_EXIT_TIMEOUT):
                        await self.shared_budget.flush()
                        await self.shared_budget.leave()
                for connection in list(self._connections):
                    connection.close_for_shutdown()
                http.begin_close()
            root.cancel_scope.cancel()

    async def _check_budget_credentials(self) -> None:
        """A shared budget whose Redis refuses the password is a mistake to fix, not an outage to wait out.

        Raises:
            SettingRefused: Redis refused the credentials (the engine does not start).
        """
        if self.shared_budget is not None:
            try:
                await check_credentials(self.shared_budget.settings)
            except BudgetRefused as exc:
                raise SettingRefused(str(exc)) from None

    async def _open_listener(self) -> tuple[trio.SocketListener, OwnedSocketFile | None]:
        """systemd's socket when it passed one, else our own at --socket (then None: nothing of ours to remove).

        When systemd passed the HTTP front's socket too (the fd named ``http``), it comes in the same hand-over and
        is put among the HTTP listeners here; `_open_http_listeners` then creates no HTTP socket file.
        """
        server = self.settings.server
        try:
            inherited = systemd.take_listening_sockets(os.environ)
        except systemd.SystemdError as exc:
            raise ListenerError(str(exc)) from None
        if inherited.engine is None:
            return await open_unix_listener(server.socket, mode=server.socket_mode)
        self.listening_on = systemd.socket_path(inherited.engine)
        log.info(
            "using the socket passed by systemd (%s); --socket/socket = %s is informational only",
            self.listening_on,
            server.socket,
        )
        if inherited.http is not None:
            http_path = systemd.socket_path(inherited.http)
            # Never removed by us, like the msgpack socket: systemd owns it and keeps it listening.
            self._http_listeners.append((trio.SocketListener(trio.socket.from_stdlib_socket(inherited.http)), "unix"))
            self.http_listening_on.append(f"unix:{http_path}")
            log.info("using the HTTP socket passed by systemd (%s)", http_path)
        return trio.SocketListener(trio.socket.from_stdlib_socket(inherited.engine)), None

    async def _open_http_listeners(self, *, systemd_socket: bool) -> None:
        """The HTTP front's Unix socket (beside ours, same rules) and loopback port, and its client keys.

        Raises:
            ListenerError: a socket cannot be created.
            SettingRefused: the keys file cannot be used.
        """
        server = self.settings.server
        try:
            self._http_keys = load_client_keys(server)
        except KeysError as exc:
            raise SettingRefused(str(exc)) from None
        path = server.http_socket_path
        if any(transport == "unix" for _, transport in self._http_listeners):
            # _open_listener took the HTTP socket systemd passed (fd named "http"): it wins over the settings,
            # as the msgpack socket does over --socket, and no socket file of ours is created.
            if not server.http_unix:
                log.warning("http_unix = false is overridden: systemd passed an HTTP socket, which is served")
            elif server.http_socket is not None:
                log.info("http_socket = %s is informational only: systemd passed the HTTP socket", server.http_socket)
            path = None
        elif path is not None and server.http_socket is None and systemd_socket:
            # systemd passed the msgpack socket: the default path beside it belongs to systemd's directory.
            log.info(
                "systemd passed the socket but no %r one: no HTTP Unix socket unless http_socket is set",
                systemd.HTTP_FD_NAME,
            )
            path = None
        if path is not None:
            listener, self._http_socket_file = await open_unix_listener(
                path, mode=server.socket_mode, option="--http-socket"
            )
            self._http_listeners.append((listener, "unix"))
            self.http_listening_on.append(f"unix:{self._http_socket_file.path}")
        if server.http:
            host, port = parse_loopback_address(server.http)
            try:
                tcp_listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise ListenerError(_cannot_listen(server.http, port, exc)) from None
            for tcp in tcp_listeners:
                self._http_listeners.append((tcp, "tcp"))
                address = tcp.socket.getsockname()
                host_part = address[0] if tcp.socket.family == stdlib_socket.AF_INET else f"[{address[0]}]"
                self.http_listening_on.append(f"http://{host_part}:{address[1]}")

    async def _close_http_listeners(self) -> None:
        if self._http_socket_file is not None:
            self._http_socket_file.remove()
        for listener, _ in self._http_listeners:
            await listener.aclose()

    async def _stop_accepting(self, listener: trio.SocketListener, socket_file: OwnedSocketFile | None) -> None:
        # Remove the path first so that new clients get a clear "no engine" instead of a hang. A socket passed
        # by systemd is never removed: systemd owns it and queues new clients for the next start.
        if socket_file is not None:
            socket_file.remove()
        await listener.aclose()
        await self._close_http_listeners()
        log.info("stopped accepting connections")

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        """First SIGINT/SIGTERM: graceful shutdown. A second one: skip what is left of the grace period.

        SIGHUP reloads the limits, here in a task rather than in the signal handler.
        """
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            self._reload_asked.set()  # several while a reload reads its files make one more reload
            return
        if not self._shutdown_requested.is_set():
            log.info("received %s; shutting down", name)
            self.request_shutdown()
        elif self.scheduler is not None:
            log.info("received %s again; cancelling in-flight requests now", name)
            self.scheduler.end_grace_period()

    async def _reload_when_asked(self) -> None:
        while True:
            await self._reload_asked.wait()
            self._reload_asked = trio.Event()
            await self.reload()

    async def reload(self) -> None:
        """Re-read the settings and apply what can change while serving; a bad config changes nothing.

        No request is touched: the ledger keeps its reservations and waiters, the limiter its borrowers. The
        files are read in a thread, within `RELOAD_READ_TIMEOUT`: a config path that is a FIFO, or on a hung
        network filesystem, stalled every client (and SIGTERM) when they were read on the event loop. How it went
        is kept in `reloads`, which STATUS=, the stats and the metrics show until the next reload.
        """
        if self._shutdown_requested.is_set() or self._reload_settings is None:
            log.warning("SIGHUP ignored: %s", "shutting down" if self._reload_settings else "nothing to reload from")
            return
        # During start-up the reload is applied too, but systemd hears of it only once READY=1 was sent.
        announce = self._ready
        if announce:
            self._notifier.reloading()
        try:
            try:
                loaded = await _read_in_thread(self._reload_settings)
                keys = None
                if loaded.settings.server.http_keys_file is not None:
                    keys = await _read_in_thread(partial(_try_load_keys, loaded.settings.server.http_keys_file))
            except SettingsError as exc:
                for problem in exc.problems:
                    log.error("reload: %s", problem)
                log.error("reload failed; keeping the current settings")
                # Counted, not quoted: a problem may quote a value of the file (a malformed URL with its
                # password), and STATUS= is shown to every local user by `systemctl status`.
                count = len(exc.problems)
                self.reloads.failed_with(
                    time.time(),
                    f"{count} problem{'s' if count != 1 else ''} in the settings (the log names each); "
                    "running with the previous settings",
                )
                return
            except trio.TooSlowError:
                log.error(
                    "reload: gave up reading the config or keys file after %gs (a FIFO, or a hung filesystem?); "
                    "keeping the current settings",
                    RELOAD_READ_TIMEOUT,
                )
                self.reloads.failed_with(
                    time.time(),
                    f"gave up reading the config or keys file after {RELOAD_READ_TIMEOUT:g}s; "
                    "running with the previous settings",
                )
                return
            if self._shutdown_requested.is_set():
                return
            for line in loaded.unknown_variables:
                log.warning("reload: %s", line)
            for override in loaded.overridden:
                # The operator edited the file to change this, and nothing changes.
                log.warning("reload: %s", override)
            plan = plan_reload(self.settings, loaded.settings)
            for line in plan.refused:
                log.warning("reload: %s needs a restart; keeping the running value", line)
            server = plan.settings.server
            self.ledger.update_limits(*ledger_limits(server))
            if self.scheduler is not None:
                self.scheduler.limiter.total_tokens = server.max_concurrent_reqs
                self.scheduler.default_deadline = server.default_deadline
                # Lowered below what is held, it refuses new requests until answers bring it under.
                self.scheduler.max_queued_bytes = server.max_queued_bytes
                # After the limits: a cap given as a share of a model's limit follows the new limit.
                self.scheduler.update_tenants(tenants_from_config(server.tenants), prices_from_config(server))
            logging.getLogger("trio_mapper").setLevel(server.log_level)
            applied = [*plan.applied, *self._reload_http(server, keys)]
            self.settings = plan.settings
            log.info("reloaded: %s", "; ".join(applied) if applied else "no changes")
            not_applied = [
                *(f"{path} (needs a restart)" for path in plan.needs_restart),
                *(f"{override.path} ({override.by} sets it)" for override in loaded.overridden),
            ]
            if isinstance(keys, KeysError):
                self.reloads.failed_with(
                    time.time(), f"{keys}; running with the previous client keys", not_applied=not_applied
                )
            else:
                self.reloads.succeeded(time.time(), not_applied)
        except Exception:
            # A bug in reloading must not stop the engine: it keeps serving with what it has.
            log.exception("reload failed; serving continues")
            self.reloads.failed_with(time.time(), "an internal error (the log has its traceback); serving continues")
        finally:
            if announce:
                self._notifier.ready(self._status_line())

    def _reload_http(self, server: ServerSettings, keys: ClientKeys | KeysError | None) -> list[str]:
        """New client keys (read already, or why not) and allow-lists for the HTTP front; a bad keys file keeps
        the current keys.

        Returns what changed in the keys file, by client name (never a key), for the reload's log line.
        """
        applied = []
        if keys is not None:
            if isinstance(keys, KeysError):
                log.error("reload: %s; keeping the current client keys", keys)
                applied.append("http client keys unchanged (the keys file was refused, see above)")
            else:
                changes = describe_key_changes(self._http_keys, keys)
                if changes:
                    applied.append(f"http client keys ({changes})")
                    if server.http_keys_file is not None:
                        _warn_if_no_keys(keys, server.http_keys_file)
                self._http_keys = keys
        _warn_about_tenant_keys_not_in(self._http_keys, server)
        if self._http is not None:
            self._http.app.keys = self._http_keys
            self._http.app.allowed_uids = server.allowed_uids
            self._http.app.allowed_gids = server.allowed_gids
        # The msgpack socket checks a client once, when it connects: one no longer allowed is cut now (its
        # requests are withdrawn), as the HTTP front refuses its next request.
        for connection, peer in list(self._connections.items()):
            if not is_allowed(peer, server.allowed_uids, server.allowed_gids):
                connection.disconnect("its uid/gid is no longer in allowed_uids/allowed_gids")
        return applied

    def _status_line(self) -> str:
        if self.scheduler is None:
            return "starting"
        engine, lanes = self.scheduler.statistics()
        state = "stopping" if self._shutdown_requested.is_set() else "serving"
        line = (
            f"{state}: {len(self._connections)} connections, {engine['outstanding']} outstanding, "
            f"{engine['in_flight']} in flight, 429s: {sum(lane['upstream_429s'] for lane in lanes.values())}"
        )
        # What an operator who just ran `systemctl reload` needs to see without reading the journal.
        reloads = self.reloads.status()
        return f"{line}; {reloads}" if reloads else line

    async def _report_status(self) -> None:
        sent = ""
        while True:
            line = self._status_line()
            if line != sent:
                self._notifier.status(line)
                sent = line
            await trio.sleep(STATUS_INTERVAL)

    async def _keep_watchdog(self, interval: float) -> None:
        # The ping comes from the event loop itself, so a loop blocked or wedged stops it and systemd restarts us.
        while True:
            self._notifier.watchdog()
            await trio.sleep(interval)

    async def _stop_on_request(self, front: trio.CancelScope) -> None:
        await self._shutdown_requested.wait()
        front.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        def serve(stream: trio.SocketStream) -> None:
            nursery.start_soon(self._run_connection, stream)

        await accept_forever(listener, serve, "msgpack socket")

    async def _run_connection(self, stream: trio.SocketStream) -> None:
        assert self.scheduler is not None
        server = self.settings.server
        peer = peer_credentials(stream.socket)
        if not is_allowed(peer, server.allowed_uids, server.allowed_gids):
            log.warning(
                "refused a client (%s): not in allowed_uids/allowed_gids",
                f"{peer.label} gid {peer.gid}" if peer is not None else "credentials unknown",
            )
            await refuse(stream, refusal_message(peer))
            return
        connection = Connection(
            stream,
            scheduler=self.scheduler,
            stats=self.statistics,
            max_frame_bytes=server.max_frame_bytes,
            peer=peer.label if peer is not None else "",
            identity=f"uid {peer.uid}" if peer is not None else "unknown peer",
            client=ClientIdentity(uid=peer.uid, gid=peer.gid, groups=peer.groups) if peer is not None else None,
            unsent=self._unsent,
            receiving=self._receiving,
            http_api=self.http_listening_on,
        )
        self._connections[connection] = peer
        try:
            await connection.serve()
        except Exception:
            # One broken connection must never take the engine down.
            log.exception("%s: unexpected error; connection closed", connection.label)
        finally:
            self._connections.pop(connection, None)


T = TypeVar("T")
#: How long a reload waits for its config and keys files to be read.
RELOAD_READ_TIMEOUT: Final = 10.0


async def _read_in_thread(read: Callable[[], T]) -> T:
    """``read()`` in a worker thread, within `RELOAD_READ_TIMEOUT` (trio.TooSlowError). A read that is stuck
    is abandoned in its thread: a blocking open() cannot be interrupted."""
    with trio.fail_after(RELOAD_READ_TIMEOUT):
        return await trio.to_thread.run_sync(read, abandon_on_cancel=True)


def _cannot_listen(address: str, port: int, exc: OSError) -> str:
    """Why the HTTP front's port cannot be opened, and what to do: "Address already in use" alone said neither."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {address}: the port is in use, probably by another engine (if so, "
            f'`curl -s http://{address}/healthz` answers {{"status": "ok"}} and `trio-mapper status` shows the '
            f"engine of the default socket; `ss -ltnp 'sport = :{port}'` names whatever holds the port). Stop it, "
            'or choose another port: --http HOST:PORT, or http = "HOST:PORT" under [server] in the config file'
        )
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {address}: a port below 1024 needs a privilege the engine does not have; choose a "
            'port above 1024 (--http HOST:PORT, or http = "HOST:PORT" under [server] in the config file)'
        )
    return f"cannot listen on {address}: {exc.strerror or exc}"


def load_client_keys(server: ServerSettings) -> ClientKeys:
    """The HTTP front's client keys as start-up reads them (none without a keys file), with the warnings it logs:
    a file that holds no key, a tenant naming a key the file does not hold. ``trio-mapper check-config`` calls
    it too, so that it refuses and warns exactly as a start would.

    Raises:
        KeysError: the keys file cannot be used (the engine does not start).
    """
    keys = ClientKeys()
    if server.http_keys_file is not None:
        keys = load_keys(server.http_keys_file)
        _warn_if_no_keys(keys, server.http_keys_file)
    _warn_about_tenant_keys_not_in(keys, server)
    return keys


def _warn_about_tenant_keys_not_in(keys: ClientKeys, server: ServerSettings) -> None:
    """A tenant that names a client key the keys file does not hold (a typo, a key removed) would silently
    lose those clients to the default tenant, without the caps or budget meant for them."""
    known = set(keys.names_by_key.values())
    # Without a keys file, "the keys file does not hold" would send the reader to a file that was never set.
    holder = "the keys file does not hold" if server.http_keys_file else "no keys file (http_keys_file) names"
    for name, tenant in server.tenants.items():
        if unknown := sorted(set(tenant.keys) - known):
            log.warning(
                "tenants.%s names client key(s) %s that %s; their clients would be served as the default tenant",
                name,
                ", ".join(unknown),
                holder,
            )


def _warn_if_no_keys(keys: ClientKeys, path: Path) -> None:
    """An empty keys file is allowed (it closes the TCP port to everyone, for a while), but rarely meant."""
    if not keys.names_by_key:
        log.warning(
            "keys file %s holds no keys: every request to the TCP port is refused 401 until keys are added "
            "(then SIGHUP)",
            path,
        )


def _try_load_keys(path: Path) -> ClientKeys | KeysError:
    try:
        return load_keys(path)
    except KeysError as exc:
        return exc
