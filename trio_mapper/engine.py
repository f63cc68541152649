"""The engine daemon: one Trio nursery supervising the listener, the scheduler and the connections.

Shutdown follows hypercorn's two-nursery pattern. The front nursery (accept loop and signal watcher) is
cancelled first, so no new client gets in; then the scheduler answers queued requests ``shutting_down``
and gives in-flight ones the grace period; then every connection flushes its last replies and closes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Any, Final

import trio

from . import __version__
from .ledger import Ledger, Limits
from .listener import OwnedSocketFile, open_unix_listener
from .scheduler import Scheduler
from .server import Connection
from .settings import Settings
from .tokens import TokenEstimator
from .upstream import Upstream

log = logging.getLogger("trio_mapper.engine")

#: accept() errors that mean "out of resources right now", not "the listener is broken" (as in trio).
_ACCEPT_CAPACITY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_SLEEP: Final = 0.1


class Engine:
    """Everything the running engine holds. `serve` runs it until SIGINT/SIGTERM or `request_shutdown`."""

    def __init__(self, settings: Settings, estimator: TokenEstimator) -> None:
        self.settings = settings
        self._estimator = estimator
        server = settings.server
        self.ledger = Ledger(
            Limits(rpm=server.rpm, tpm=server.tpm),
            server.period_length,
            per_model={name: Limits(rpm=lim.rpm, tpm=lim.tpm) for name, lim in server.models.items()},
            mode=server.ledger_mode,
        )
        self._shutdown_requested = trio.Event()
        self._connections: set[Connection] = set()
        self._started_at = time.time()
        self.scheduler: Scheduler | None = None

    def request_shutdown(self) -> None:
        self._shutdown_requested.set()

    def statistics(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        assert self.scheduler is not None
        engine, lanes = self.scheduler.statistics()
        server = self.settings.server
        engine.update(
            version=__version__,
            pid=os.getpid(),
            uptime=round(time.time() - self._started_at, 3),
            connections=len(self._connections),
            socket=str(server.socket),
            base_url=self.settings.openai.base_url,
            default_limits={"rpm": server.rpm, "tpm": server.tpm},
            period_length=server.period_length,
            ledger_mode=server.ledger_mode,
        )
        return engine, lanes

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        server = self.settings.server
        listener, socket_file = await open_unix_listener(server.socket, mode=server.socket_mode)
        try:
            async with Upstream(self.settings.openai, max_connections=server.max_nb_sockets) as upstream:
                scheduler = self.scheduler = Scheduler(
                    ledger=self.ledger,
                    upstream=upstream,
                    estimator=self._estimator,
                    max_concurrent_reqs=server.max_concurrent_reqs,
                    max_queued=server.max_queued,
                    default_max_attempts=server.max_attempts,
                )
                async with trio.open_nursery() as root:
                    root.start_soon(self._watch_signals)
                    await root.start(scheduler.run)
                    async with trio.open_nursery() as connections:
                        async with trio.open_nursery() as front:
                            front.start_soon(self._accept_loop, listener, connections)
                            front.start_soon(self._stop_on_request, front.cancel_scope)
                            log.info(
                                "listening on %s (mode %#o); upstream %s; %d rpm, %d tpm, period %gs, %d concurrent",
                                server.socket,
                                server.socket_mode,
                                self.settings.openai.base_url,
                                server.rpm,
                                server.tpm,
                                server.period_length,
                                server.max_concurrent_reqs,
                            )
                            task_status.started()
                        await self._stop_accepting(listener, socket_file)
                        await scheduler.shutdown(server.grace_period)
                        for connection in list(self._connections):
                            connection.begin_close()
                    root.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            socket_file.remove()
        log.info("stopped")

    async def _stop_accepting(self, listener: trio.SocketListener, socket_file: OwnedSocketFile) -> None:
        # Remove the path first so that new clients get a clear "no engine" instead of a hang.
        socket_file.remove()
        await listener.aclose()
        log.info("stopped accepting connections")

    async def _watch_signals(self) -> None:
        """First SIGINT/SIGTERM: graceful shutdown. A second one: skip what is left of the grace period."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._shutdown_requested.is_set():
                    log.info("received %s; shutting down", name)
                    self._shutdown_requested.set()
                elif self.scheduler is not None:
                    log.info("received %s again; cancelling in-flight requests now", name)
                    self.scheduler.end_grace_period()

    async def _stop_on_request(self, front: trio.CancelScope) -> None:
        await self._shutdown_requested.wait()
        front.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    log.error(
                        "accept failed (%s); retrying in %.1fs",
                        os.strerror(exc.errno or 0),
                        _ACCEPT_RETRY_SLEEP,
                    )
                    await trio.sleep(_ACCEPT_RETRY_SLEEP)
                    continue
                raise
            nursery.start_soon(self._run_connection, stream)

    async def _run_connection(self, stream: trio.SocketStream) -> None:
        assert self.scheduler is not None
        connection = Connection(
            stream,
            scheduler=self.scheduler,
            stats=self.statistics,
            max_frame_bytes=self.settings.server.max_frame_bytes,
        )
        self._connections.add(connection)
        try:
            await connection.serve()
        except Exception:
            # One broken connection must never take the engine down.
            log.exception("%s: unexpected error; connection closed", connection.label)
        finally:
            self._connections.discard(connection)
