"""``trio-mapper map``: send every request of a JSONL file through the engine, write Batch API output lines.

The run is a Trio program on one `AsyncClient` connection: a lazy generator reads the input as it comes (in a
worker thread, see `InputReader`), at most ``--window`` requests are in flight, each in its own task, and each
answer is appended to the output as soon as it arrives, whether or not more input has come. Memory is constant
in the number of lines, except for the custom ids (see `trio_mapper.jsonl`).

Resuming: `trio_mapper.jsonl.prepare_output` keeps the previous run's successful lines and drops its failed
ones; this run skips the kept ids and appends one line for every other id. So a completed run's output has
every id exactly once, and an interrupted one (Ctrl+C, SIGTERM, kill -9, an engine gone for longer than
``--engine-wait``) has a subset the next run completes. See docs/map.md.

An engine restart: when the connection drops, the run waits (up to ``--engine-wait``) for an engine on the same
socket and goes on where it was. What never reached the engine (not sent yet, or refused ``shutting_down``
before any upstream attempt) is sent to the new one; what may have reached the upstream is never sent twice in
one run: its line fails with ``connection_lost`` (or the engine's ``shutting_down``), which a re-run retries.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal, final

import trio

from trio_mapper.client import DEFAULT_WINDOW, PRIORITY_CLASSES, Request
from trio_mapper.client.aio import AsyncClient
from trio_mapper.client.errors import ConnectionLost, EngineUnavailable, TrioMapperError, may_succeed_later
from trio_mapper.text import escape_control_characters
from trio_mapper.tools.jsonl import (
    BadLine,
    InputRequest,
    LineSplitter,
    OutputFileError,
    OutputScan,
    OutputWriter,
    OverlongLine,
    count_lines,
    failure_record,
    parse_line,
    prepare_output,
    success_record,
)
from trio_mapper.wire import ErrorKind

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from trio_mapper.client import MapResult
    from trio_mapper.wire import Result

DEFAULT_ENDPOINT: Final = "/v1/chat/completions"
#: A redrawn rich bar (stderr is a terminal), a plain line every `PLAIN_INTERVAL` s (a log), or nothing.
ProgressMode = Literal["bar", "plain", "off"]
#: Exit statuses (documented in docs/map.md). 128 + signal number is the shell's convention for "killed by".
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_ENGINE: Final = 3
#: Seconds between ``stats()`` polls of the engine for its 429 counters: cheap, and 429s are not urgent.
STATS_INTERVAL: Final = 2.0
#: Seconds between redraws of the progress bar, and between plain progress lines when stderr is not a TTY.
BAR_INTERVAL: Final = 0.25
PLAIN_INTERVAL: Final = 10.0
#: Request and token rates (and so the ETA) are measured over this many recent seconds.
RATE_WINDOW: Final = 30.0
#: Failures and bad lines reported one by one on stderr; later ones are only counted (a job whose key has no
#: quota fails every line: a million messages would bury the summary).
MAX_REPORTED: Final = 20
#: The input generator yields to Trio every so many lines: a resumed run may skip a long stretch of answered
#: lines inside one ``next()``, and signals and the progress bar must not wait for it.
CHECKPOINT_EVERY: Final = 1000
#: Bytes asked of the input per read: one worker-thread round trip per chunk of lines, not per line, and a
#: bounded amount of input in memory.
READ_CHUNK_BYTES: Final = 64 * 1024
STDIN_FILENO: Final = 0
#: Seconds ``--engine-wait`` waits by default for the engine to come back after the connection dropped: a
#: ``systemctl restart`` (a graceful stop within its grace period, then a start) fits in it.
DEFAULT_ENGINE_WAIT: Final = 120.0
#: Seconds between attempts to connect again while the engine is away: each is one connect, cheap for both.
ENGINE_RETRY_INTERVAL: Final = 0.5
#: What to do about a failed line a re-run may mend (`may_succeed_later`), by error kind. A run retries every
#: failed line of the output it resumes, so "run the same command again" is all these need, sometimes later.
RERUN_ADVICE: Final[dict[str, str]] = {
    "rate_limited": "the key's rate limit or quota stopped it: run the same command again later (if it says "
    "quota or spend limit, once the account's billing allows)",
    "overloaded": "the engine's queue was full: run the same command again, with a smaller --window",
    "timeout": "its deadline passed: run the same command again (with a longer --deadline if you set one)",
    "shutting_down": "the engine was stopping: run the same command again once it is back",
    "upstream_unreachable": "the upstream could not be reached: check the engine's network, then run the same "
    "command again",
    "budget_exhausted": "the tenant's daily budget is spent: run the same command again once it refills, or ask "
    "the engine's operator to raise it",
    "upstream_error": "the upstream kept failing: run the same command again",
    "connection_lost": "the engine went away while it was outstanding, so it may have run (and been paid for): "
    "it is never sent twice in one run; run the same command again to retry it",
}
#: What to do about a failed line that fails again as it is, by error kind: something must change first.
FIX_ADVICE: Final[dict[str, str]] = {
    "invalid_request": "the request is unusable as written: fix this line",
    "request_too_large": "it needs more tokens than the model's whole per-minute budget: shorten its input or "
    "max_tokens",
    "upstream_error": "the upstream refused the request itself: fix this line (the upstream's error is in the output)",
    "forbidden": "this user may not use the engine: ask its operator",
    "protocol_error": "the engine and this trio-mapper do not understand each other: upgrade so both match",
    "internal_error": "a bug in the engine: report it, with the engine's log",
}


def add_map_arguments(parser: argparse.ArgumentParser) -> None:
    from trio_mapper.tools.args import (
        add_socket_argument,
        client_name,
        non_negative_float,
        positive_float,
        positive_int,
    )

    parser.add_argument(
        "input", metavar="INPUT.jsonl", help="requests, one JSON object a line (Batch API or plain bodies); - for stdin"
    )
    parser.add_argument(
        "-o", "--output", required=True, type=Path, metavar="OUTPUT.jsonl",
        help="Batch API output lines; an existing file is resumed (answered ids are skipped, failed ones retried)",
    )  # fmt: skip
    add_socket_argument(parser)
    parser.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, metavar="PATH",
        help=f"endpoint of plain-body lines (Batch API lines name their own url); default {DEFAULT_ENDPOINT}",
    )  # fmt: skip
    parser.add_argument(
        "--window", type=positive_int, default=DEFAULT_WINDOW, metavar="N",
        help=f"requests in flight at once (default {DEFAULT_WINDOW})",
    )  # fmt: skip
    parser.add_argument(
        "--deadline", type=positive_float, metavar="S",
        help="seconds the engine may spend on each request before it fails it with 'timeout' (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--max-attempts", type=positive_int, metavar="N",
        help="upstream attempts per request, first try included (default, and at most: the engine's)",
    )  # fmt: skip
    parser.add_argument(
        "--priority", choices=PRIORITY_CLASSES,
        help="priority class of the job's requests, at most your tenant's: a lower one (batch) takes effect, a "
        "higher one gets the tenant's (default: the tenant's)",
    )  # fmt: skip
    parser.add_argument(
        "--client-name", type=client_name, metavar="NAME",
        help="the name the job gives the engine; a tenant with NAME in its names takes it "
        "(default: trio-mapper map[PID])",
    )  # fmt: skip
    parser.add_argument(
        "--engine-wait", type=non_negative_float, default=DEFAULT_ENGINE_WAIT, metavar="S",
        help="seconds to wait for the engine to come back when the connection to it drops mid-run (a restart), "
        f"then go on where the run was; 0 stops at once (exit 3) (default {DEFAULT_ENGINE_WAIT:g})",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress display, only the final summary")


@dataclass(slots=True)
class MapCounters:
    """What the run has done so far; read by the progress display and the summary."""

    total: int | None
    succeeded: int = 0
    failed: int = 0
    bad_lines: int = 0
    duplicates: int = 0
    skipped: int = 0
    tokens: int = 0
    upstream_429s: int = 0
    reported: int = 0
    #: This run's failed requests by error kind: those a re-run may mend (`may_succeed_later`), and those that
    #: fail again as they are. Bad lines and duplicate ids are counted apart (above); they fail again too.
    to_rerun: collections.Counter[str] = field(default_factory=collections.Counter)
    to_fix: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def answered(self) -> int:
        """Requests the engine answered in this run (successes and failures, not bad lines)."""
        return self.succeeded + self.failed - self.bad_lines - self.duplicates

    @property
    def processed(self) -> int:
        """Input lines dealt with, one way or another: what the progress bar counts against `total`."""
        return self.succeeded + self.failed + self.skipped


@final
class InputReader:
    """The input's lines, read from a file descriptor in a worker thread, so that Trio's loop never waits on it.

    A producer that is slow or idle (``generate | trio-mapper map -``) must not stop replies from being written,
    the progress display, or Ctrl+C. A worker thread running `os.read` rather than `trio.lowlevel.FdStream`,
    because it reads every kind of input the same way: a regular file (which epoll cannot wait on, so FdStream
    refuses it, and ``map - < file`` is one), a pipe, or a terminal (FdStream would set ``O_NONBLOCK`` on the
    open file the shell shares with us). ``os.read`` returns what is there, so lines that a slow producer has
    written are sent at once; and it takes no lock, unlike ``sys.stdin.buffer``, so a thread left blocked in it
    cannot trip up the interpreter's exit.

    With ``abandon_on_cancel`` (stdin), cancelling does not wait for a read blocked on an idle producer: the
    thread is left to finish on its own (a daemon thread: it does not hold up the exit). The descriptor must
    then stay open for the life of the process, which holds for fd 0. A regular file's reads never block for
    long, so they are awaited, and the file may be closed once the run is over.
    """

    def __init__(self, fd: int, *, abandon_on_cancel: bool) -> None:
        self._fd = fd
        self._abandon_on_cancel = abandon_on_cancel
        self._splitter = LineSplitter()
        self._eof = False

    async def read_lines(self) -> list[bytes | OverlongLine]:
        """The next lines, with their newlines (at least one), or an empty list at the end of the input."""
        while not self._eof:
            chunk = await self._read()
            if not chunk:
                self._eof = True
                last = self._splitter.finish()
                return [] if last is None else [last]
            lines = self._splitter.feed(chunk)
            if lines:
                return lines
        return []

    async def _read(self) -> bytes:
        while True:
            try:
                return await trio.to_thread.run_sync(
                    os.read, self._fd, READ_CHUNK_BYTES, abandon_on_cancel=self._abandon_on_cancel
                )
            except BlockingIOError:
                # Another process sharing our pipe or terminal made it non-blocking: wait for data in the loop.
                await trio.lowlevel.wait_readable(self._fd)


@dataclass(slots=True)
class _RateMeter:
    """Requests/min and tokens/min over the last `RATE_WINDOW` seconds, from periodic samples (bounded)."""

    samples: collections.deque[tuple[float, int, int]] = field(default_factory=collections.deque)

    def sample(self, now: float, answered: int, tokens: int) -> tuple[float, float]:
        self.samples.append((now, answered, tokens))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        then, answered_then, tokens_then = self.samples[0]
        elapsed = now - then
        if elapsed <= 0:
            return 0.0, 0.0
        return (answered - answered_then) * 60 / elapsed, (tokens - tokens_then) * 60 / elapsed


def _tokens_of(body: Any) -> int:
    usage = body.get("usage") if isinstance(body, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) else 0


def _format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MapJob:
    """One ``trio-mapper map`` run, from an open input and a prepared output to the counters of its summary."""

    def __init__(
        self,
        *,
        lines: InputReader,
        writer: OutputWriter,
        done: set[str],
        counters: MapCounters,
        socket: Path | None,
        endpoint: str,
        window: int,
        deadline: float | None,
        max_attempts: int | None,
        progress: ProgressMode,
        priority: str | None = None,
        client_name: str | None = None,
        engine_wait: float = DEFAULT_ENGINE_WAIT,
    ) -> None:
        self._lines = lines
        self._writer = writer
        #: Ids answered by a previous run. An id moves from here to `_seen` when its line is met, so the two
        #: sets together never hold more than the ids of the input and the output.
        self._done = done
        self._seen: set[str] = set()
        self.counters = counters
        self._socket = socket
        self._endpoint = endpoint
        self._window = window
        self._deadline = deadline
        self._max_attempts = max_attempts
        self._priority = priority
        self._client_name = client_name if client_name is not None else f"trio-mapper map[{os.getpid()}]"
        self._progress_mode = progress
        self._bar: Progress | None = None
        self._bar_task: TaskID | None = None
        self._baseline_429s: dict[str, int] | None = None
        #: 429s counted on the engines before the last reconnection (a new engine's counters start at 0).
        self._429s_before = 0
        self._engine_wait = engine_wait
        #: Requests handed to the client and not recorded yet, by custom id: what a lost connection may take.
        self._outstanding: dict[str, InputRequest] = {}
        #: Requests that never reached the upstream when the engine stopped: sent again, before new input.
        self._resend: collections.deque[InputRequest] = collections.deque()
        #: The engine refused a request because it is stopping: no new input until the next engine.
        self._engine_stopping = False
        #: Since when the run waits for the engine to come back (for the progress display), else None.
        self._waiting_since: float | None = None
        #: Why the run stopped early, if it did: the signal that stopped it; what went wrong with the engine.
        self.interrupted_by: int | None = None
        self.engine_problem: str | None = None

    # -- the run -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        # The receiver is open for the whole run, so SIGINT never becomes a KeyboardInterrupt at a random
        # point: the watcher cancels the run, and the map's cancellation withdraws what is in flight.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                await self._run_with_engine()
                nursery.cancel_scope.cancel()

    async def _watch_signals(self, signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
        async for signum in signals:
            if self.interrupted_by is None:
                self.interrupted_by = signum
                self._note(f"{signal.Signals(signum).name}: stopping, cancelling the requests in flight…")
            scope.cancel()

    async def _run_with_engine(self) -> None:
        try:
            async with AsyncClient(self._socket, client_name=self._client_name, priority=self._priority) as client:
                async with trio.open_nursery() as helpers:
                    # Rendezvous: the input is read about ``window`` lines ahead of the answers only.
                    lines_in, lines_out = trio.open_memory_channel[InputRequest](0)
                    helpers.start_soon(self._read_input, lines_in)
                    helpers.start_soon(self._poll_stats, client)
                    if self._progress_mode == "bar":
                        helpers.start_soon(self._show_bar)
                    elif self._progress_mode == "plain":
                        helpers.start_soon(self._print_progress_lines)
                    await self._map(client, lines_out)
                    helpers.cancel_scope.cancel()
                if self.engine_problem is None:
                    await self._update_429s(client)  # the final figure for the summary
        except EngineUnavailable as exc:
            self.engine_problem = str(exc)

    async def _read_input(self, lines: trio.MemorySendChannel[InputRequest]) -> None:
        """The input's requests into ``lines``, for as many maps as the run takes (one per connection).

        A task of its own, not the map's input: a map ends with its connection, and cancelling a read of the
        input there would lose the lines it had read (or, for stdin, the read itself). A cancelled receive from
        the channel loses nothing.
        """
        async with lines:
            async for line in self._requests():
                await lines.send(line)

    async def _map(self, client: AsyncClient, lines: trio.MemoryReceiveChannel[InputRequest]) -> None:
        """Send the input's requests with at most ``window`` in flight; record each answer as it arrives.

        `AsyncClient.map` pulls the input in a task of its own, so answers are written whatever the input
        does (a producer on stdin may pause for as long as it likes). Requests reach the engine in input
        order. Cancelling (a signal) withdraws the requests in flight from the engine.

        When the connection drops, one map is over: `_wait_for_engine`, then another map on the new connection
        goes on with the input, after the requests that never reached the upstream (`_settle_lost`).
        """
        while True:
            results = client.map(
                self._map_input(lines), window=self._window, deadline=self._deadline, max_attempts=self._max_attempts
            )
            try:
                async with results:
                    async for item in results:
                        self._on_result(item)
                if not self._resend:
                    return
                # The input ran out while the engine was stopping: the next map waits for it to close the
                # connection (`_map_input` holds while it stops), then the next engine gets what it refused.
            except TrioMapperError as exc:  # the connection (requests' failures are results), or connecting again
                if self._engine_wait == 0:  # as before --engine-wait: stop, and the next run resumes
                    self.engine_problem = str(exc)
                    return
                self._note(f"trio-mapper map: {exc}")
                self._settle_lost(results.lost, exc)
                if not await self._wait_for_engine(client, exc):
                    return

    async def _map_input(self, lines: trio.MemoryReceiveChannel[InputRequest]) -> AsyncGenerator[Request, None]:
        """One map's input: the requests to send again first, then the input's; none while the engine stops."""
        while True:
            if self._engine_stopping:
                # It answers what it has and closes the connection, which ends this map; the next engine gets
                # the rest. Sending more would only collect a `shutting_down` refusal for each line.
                await trio.sleep_forever()
            if self._resend:
                line = self._resend.popleft()
            else:
                try:
                    line = await lines.receive()
                except trio.EndOfChannel:
                    return
            self._outstanding[line.custom_id] = line
            yield Request(line.endpoint, line.body, method=line.method, tag=line)

    def _on_result(self, item: MapResult) -> None:
        line: InputRequest = item.request.tag
        del self._outstanding[line.custom_id]
        error = item.error
        if (
            self._engine_wait > 0
            and error is not None
            and error.kind == ErrorKind.SHUTTING_DOWN
            and error.attempts == 0  # refused, or dropped from its queue, before any upstream attempt
        ):
            self._resend.append(line)
            if not self._engine_stopping:
                self._engine_stopping = True
                self._note(
                    "trio-mapper map: the engine is shutting down; holding the input, the requests it did not start "
                    "go to the next engine"
                )
            return
        self._record(line, item.result, error)

    def _settle_lost(self, lost: list[MapResult], cause: TrioMapperError) -> None:
        """The requests the connection took with it: those that never left are sent again, the others fail."""
        never_sent = {
            item.request.tag.custom_id
            for item in lost
            if isinstance(item.error, ConnectionLost) and item.error.may_have_reached_upstream is False
        }
        # The client accounts for every item it took (`lost`); any other outstanding one is taken as sent.
        for custom_id, line in list(self._outstanding.items()):
            if custom_id in never_sent:
                self._resend.append(line)
            else:  # it may have run: never twice in one run
                message = f"{cause.message}; it was outstanding, so the engine may have run it (and spent its tokens)"
                self._record(line, None, ConnectionLost(message, may_have_reached_upstream=True))
        self._outstanding.clear()

    async def _wait_for_engine(self, client: AsyncClient, lost: TrioMapperError) -> bool:
        """Connect again within ``--engine-wait``; False (with `engine_problem` set) if no engine came back."""
        self._note(
            f"trio-mapper map: waiting up to {self._engine_wait:g} s (--engine-wait) for the engine to come back"
        )
        started = trio.current_time()
        self._waiting_since = started
        last: TrioMapperError = lost
        try:
            with trio.move_on_after(self._engine_wait):
                while True:
                    try:
                        await client.ping()  # connects again, through the socket's backlog under systemd
                    except TrioMapperError as exc:  # EngineUnavailable, ConnectionLost, a refused handshake
                        last = exc
                        await trio.sleep(ENGINE_RETRY_INTERVAL)
                        continue
                    break
                waited = trio.current_time() - started
                again = f"; {_requests(len(self._resend))} that never reached it sent again" if self._resend else ""
                self._note(f"trio-mapper map: the engine is back after {waited:.1f} s; going on{again}")
                self._engine_stopping = False
                self._429s_before = self.counters.upstream_429s
                self._baseline_429s = None  # a new engine's counters start again
                return True
        finally:
            self._waiting_since = None
        gone = f"; last attempt: {last}" if last is not lost else ""
        self.engine_problem = f"{lost}; no engine came back within {self._engine_wait:g} s (--engine-wait){gone}"
        return False

    async def _requests(self) -> AsyncGenerator[InputRequest, None]:
        """The input's requests, read lazily: `_map` reads about ``window`` lines ahead of the answers only.

        Lines that do not become requests (blank, answered by a previous run, bad, duplicate) are dealt with
        here. The reads happen in a worker thread (`InputReader`); the lines of one read are parsed here.
        """
        line_no = 0
        while batch := await self._lines.read_lines():
            for raw in batch:
                line_no += 1
                if line_no % CHECKPOINT_EVERY == 0:
                    await trio.lowlevel.checkpoint()
                if (request := self._request_of(raw, line_no)) is not None:
                    yield request

    def _request_of(self, raw: bytes | OverlongLine, line_no: int) -> InputRequest | None:
        """The request of one input line, or None when the line was dealt with here."""
        counters = self.counters
        parsed = parse_line(raw, line_no, self._endpoint)
        if parsed is None:
            if counters.total is not None:
                counters.total -= 1  # blank lines were counted by the first pass but are not requests
            return None
        custom_id = parsed.custom_id
        if custom_id in self._seen:
            counters.failed += 1
            counters.duplicates += 1
            self._report(f"line {line_no}: custom_id {custom_id!r} was already used by an earlier line; skipped")
            return None
        self._seen.add(custom_id)
        if custom_id in self._done:
            self._done.discard(custom_id)
            counters.skipped += 1
            return None
        if isinstance(parsed, BadLine):
            counters.failed += 1
            counters.bad_lines += 1
            self._report(f"{parsed.message} (fails again as it is: fix this line)")
            self._writer.write(
                failure_record(
                    custom_id,
                    code="invalid_request",
                    message=parsed.message,
                    metadata=parsed.metadata,
                    has_metadata=parsed.has_metadata,
                )
            )
            return None
        return parsed

    def _record(self, line: InputRequest, result: Result | None, error: TrioMapperError | None) -> None:
        if error is None:
            assert result is not None
            self.counters.succeeded += 1
            self.counters.tokens += _tokens_of(result.body)
            record = success_record(
                line.custom_id,
                status=result.status,
                request_id=result.headers.get("x-request-id"),
                body=result.body,
                metadata=line.metadata,
                has_metadata=line.has_metadata,
            )
        else:
            self.counters.failed += 1
            if may_succeed_later(error):
                self.counters.to_rerun[error.kind] += 1
                advice = RERUN_ADVICE.get(error.kind, "run the same command again")
                verdict = "may succeed if run again"
            else:
                self.counters.to_fix[error.kind] += 1
                advice = FIX_ADVICE.get(error.kind, "see its error; running it again unchanged will not help")
                verdict = "fails again as it is"
            self._report(f"line {line.line_no} ({line.custom_id}): {error} ({verdict}: {advice})")
            record = failure_record(
                line.custom_id,
                code=error.kind,
                message=error.message,
                status=error.status,
                request_id=error.headers.get("x-request-id"),
                body=error.body,
                metadata=line.metadata,
                has_metadata=line.has_metadata,
            )
        self._writer.write(record)

    # -- engine stats --------------------------------------------------------------------------------------

    async def _poll_stats(self, client: AsyncClient) -> None:
        # Same connection as the requests: replies are multiplexed, so a stats reply never waits behind them.
        while True:
            with contextlib.suppress(TrioMapperError):  # the engine is away: the map deals with it
                await self._update_429s(client)
            await trio.sleep(STATS_INTERVAL)

    async def _update_429s(self, client: AsyncClient) -> None:
        """429s absorbed by the engine since this run started, over all lanes (they are engine-wide, so
        they include other clients' traffic on the same models)."""
        with trio.move_on_after(STATS_INTERVAL):
            stats = await client.stats()
            counts = {name: int(lane.get("upstream_429s", 0)) for name, lane in stats.get("lanes", {}).items()}
            if self._baseline_429s is None:
                self._baseline_429s = counts
            baseline = self._baseline_429s
            self.counters.upstream_429s = self._429s_before + sum(
                max(0, n - baseline.get(name, 0)) for name, n in counts.items()
            )

    # -- progress and messages -----------------------------------------------------------------------------

    def _rates(self, meter: _RateMeter) -> tuple[float, float, float | None]:
        counters = self.counters
        rpm, tpm = meter.sample(trio.current_time(), counters.answered, counters.tokens)
        eta: float | None = None
        if counters.total is not None and rpm > 0:
            eta = max(0, counters.total - counters.processed) * 60 / rpm
        return rpm, tpm, eta

    def _progress_text(self, meter: _RateMeter) -> str:
        rpm, tpm, eta = self._rates(meter)
        failed = f"  [red]{self.counters.failed:,} failed[/]" if self.counters.failed else ""
        return (
            f"{self._waiting_text()}{rpm:,.0f} req/min  {tpm:,.0f} tok/min  "
            f"{self.counters.upstream_429s:,} 429s absorbed  ETA {_format_eta(eta)}{failed}"
        )

    async def _print_progress_lines(self) -> None:
        """When stderr is a file or a pipe (a log), a plain line now and then rather than a redrawn bar."""
        meter = _RateMeter()
        while True:
            await trio.sleep(PLAIN_INTERVAL)
            rpm, tpm, eta = self._rates(meter)
            total = "?" if self.counters.total is None else f"{self.counters.total:,}"
            print(
                f"trio-mapper map: {self._waiting_text()}{self.counters.processed:,}/{total} lines, "
                f"{self.counters.failed:,} failed, "
                f"{rpm:,.0f} req/min, {tpm:,.0f} tok/min, {self.counters.upstream_429s:,} 429s absorbed, "
                f"ETA {_format_eta(eta)}",
                file=sys.stderr,
                flush=True,
            )

    async def _show_bar(self) -> None:
        meter = _RateMeter()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # Redrawn by this task rather than rich's refresh thread: the counters are only touched in Trio's thread.
        bar = Progress(
            TextColumn("[bold]map[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rates]}"),
            console=Console(stderr=True),
            auto_refresh=False,
        )
        self._bar = bar
        self._bar_task = bar.add_task("map", total=self.counters.total, rates="")
        bar.start()
        try:
            while True:
                self._redraw(meter)
                await trio.sleep(BAR_INTERVAL)
        finally:
            self._redraw(meter)  # the last figures stay on screen above the summary
            bar.stop()
            self._bar = None

    def _redraw(self, meter: _RateMeter) -> None:
        assert self._bar is not None and self._bar_task is not None
        self._bar.update(
            self._bar_task,
            total=self.counters.total,
            completed=self.counters.processed,
            rates=self._progress_text(meter),
            refresh=True,
        )

    def _waiting_text(self) -> str:
        if self._waiting_since is None:
            return ""
        return f"waiting for the engine ({trio.current_time() - self._waiting_since:.0f} s), "

    def _note(self, message: str) -> None:
        """A message on stderr, above the progress bar when there is one."""
        # Messages quote the engine and the upstream: no escape sequence of theirs reaches the terminal.
        message = escape_control_characters(message)
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def _report(self, message: str) -> None:
        self.counters.reported += 1
        if self.counters.reported <= MAX_REPORTED:
            self._note(f"trio-mapper map: {message}")
        elif self.counters.reported == MAX_REPORTED + 1:
            self._note(f"trio-mapper map: more failures: only the first {MAX_REPORTED} are shown; see the output")


# --- the command ---------------------------------------------------------------------------------------------


def _summary(job: MapJob, scan: OutputScan, output: Path, elapsed: float) -> str:
    c = job.counters
    input_problems = [
        f"{count:,} {what}{'' if count == 1 else 's'}"
        for count, what in ((c.bad_lines, "bad line"), (c.duplicates, "duplicate id"))
        if count
    ]
    parts = [
        f"{c.succeeded:,} succeeded",
        f"{c.failed:,} failed" + (f" ({', '.join(input_problems)})" if input_problems else ""),
        f"{c.skipped:,} skipped (answered by a previous run)",
        f"{c.tokens:,} tokens",
        f"{c.upstream_429s:,} 429s absorbed by the engine",
        f"{elapsed:.1f} s",
    ]
    lines = [f"trio-mapper map: {c.succeeded + c.failed:,} done: " + ", ".join(parts) + f" → {output}"]
    if scan.dropped_failures or scan.torn_bytes:
        retried = f"{scan.dropped_failures:,} failed lines of a previous run retried"
        torn = f", a torn last line ({scan.torn_bytes} bytes) cut off" if scan.torn_bytes else ""
        lines.append(f"trio-mapper map: {retried}{torn}")
    stopped = job.interrupted_by is not None or job.engine_problem is not None
    if job.interrupted_by is not None:
        name = signal.Signals(job.interrupted_by).name
        lines.append(f"trio-mapper map: interrupted by {name}; run the same command again to resume")
    elif job.engine_problem is not None:
        lines.append(f"trio-mapper map: {job.engine_problem}")
        lines.append("trio-mapper map: stopped early; run the same command again to resume")
    rerun = sum(c.to_rerun.values())
    if rerun and not stopped:  # else resuming, just advised, retries them too
        them = "it" if rerun == 1 else "them"
        lines.append(
            f"trio-mapper map: {_lines(rerun)} may succeed if run again ({_kinds(c.to_rerun)}): run the same "
            f"command again{_later(c.to_rerun)} to retry {them}"
        )
    to_fix = sum(c.to_fix.values()) + c.bad_lines + c.duplicates
    if to_fix:
        causes = _kinds(c.to_fix)
        for count, what in ((c.bad_lines, "bad line"), (c.duplicates, "duplicate id")):
            if count:
                causes += f"{', ' if causes else ''}{what} {count:,}"
        one = to_fix == 1
        lines.append(
            f"trio-mapper map: {_lines(to_fix)} will fail again as {'it is' if one else 'they are'} ({causes}): "
            f"fix {'it' if one else 'them'} in the input first (the errors, on stderr and in the output, say what "
            "is wrong); a run retries every failed line, so unchanged they only fail again"
        )
    return "\n".join(lines)


def _requests(count: int) -> str:
    return f"{count:,} request{'' if count == 1 else 's'}"


def _lines(count: int) -> str:
    return f"{count:,} failed line{'' if count == 1 else 's'}"


def _kinds(counts: collections.Counter[str]) -> str:
    return ", ".join(f"{kind} {count:,}" for kind, count in counts.most_common())


def _later(kinds: collections.Counter[str]) -> str:
    """``" later"`` when what stopped them needs time to pass (a rate limit or quota, a daily budget)."""
    return " later" if kinds.keys() & {"rate_limited", "budget_exhausted"} else ""


def _progress_mode(args: argparse.Namespace) -> ProgressMode:
    if args.no_progress:
        return "off"
    return "bar" if sys.stderr.isatty() else "plain"


def run_map(args: argparse.Namespace) -> int:
    """Run ``trio-mapper map``; returns the exit status (see `EXIT_OK` and docs/map.md)."""
    output: Path = args.output
    stdin = args.input == "-"
    source = Path(args.input)
    problem = _check_paths(source, output, stdin)
    if problem is not None:
        print(f"trio-mapper map: {problem}", file=sys.stderr)
        return EXIT_USAGE
    file: BinaryIO | None = None  # the input file; stdin is never closed (see InputReader)
    try:
        scan = prepare_output(output)
        total = None if stdin else count_lines(source)
        if not stdin:
            file = source.open("rb", buffering=0)  # read by os.read: a buffer would only copy
        writer = OutputWriter(output)
    except (OutputFileError, OSError) as exc:
        if file is not None:
            file.close()
        print(f"trio-mapper map: {exc}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    if file is None:
        lines = InputReader(STDIN_FILENO, abandon_on_cancel=True)  # Ctrl+C must not wait for an idle producer
    else:
        lines = InputReader(file.fileno(), abandon_on_cancel=False)
    job = MapJob(
        lines=lines,
        writer=writer,
        done=scan.done,
        counters=MapCounters(total=total),
        socket=args.socket,
        endpoint=args.endpoint,
        window=args.window,
        deadline=args.deadline,
        max_attempts=args.max_attempts,
        progress=_progress_mode(args),
        priority=args.priority,
        client_name=args.client_name,
        engine_wait=args.engine_wait,
    )
    try:
        trio.run(job.run)
    except KeyboardInterrupt:
        job.interrupted_by = signal.SIGINT  # before the signal receiver was open, or after it closed
    finally:
        try:
            writer.close()  # flush and fsync: everything answered is on disk before we say so
        finally:
            if file is not None:
                file.close()
    print(_summary(job, scan, output, time.monotonic() - started), file=sys.stderr)
    if job.interrupted_by is not None:
        return 128 + job.interrupted_by
    if job.engine_problem is not None:
        return EXIT_ENGINE
    return EXIT_FAILED if job.counters.failed else EXIT_OK


def _check_paths(source: Path, output: Path, stdin: bool) -> str | None:
    if stdin:
        try:
            os.fstat(STDIN_FILENO)
        except OSError as exc:
            return f"cannot read stdin: {exc.strerror}"
    elif not source.is_file():
        return f"{source}: no such file"
    if output.is_dir():
        return f"{output} is a directory; give the output file's path"
    if not output.parent.is_dir():
        return f"{output.parent}: no such directory"
    if not stdin and output.exists() and os.path.samefile(source, output):
        return "the output must not be the input file"
    return None


__all__ = ["DEFAULT_ENDPOINT", "InputReader", "MapCounters", "MapJob", "add_map_arguments", "run_map"]
