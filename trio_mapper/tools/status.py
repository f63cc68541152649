"""``trio-mapper status``: the engine's lanes, queues and budget usage, readable at a glance.

Every string shown comes from the engine's stats, and some of them from its clients: a lane is named by
whatever model name a client sent. They are printed as plain text (never as rich markup) with their control
characters escaped, so a name cannot recolour the table, clear the screen or retitle the terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trio_mapper.client.errors import EngineUnavailable, TrioMapperError
from trio_mapper.client.sync import Client
from trio_mapper.text import escape_control_characters


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, metavar="PATH", help="engine socket (default: $TRIO_MAPPER_SOCKET, …)")
    parser.add_argument("--json", action="store_true", help="print the raw counters as JSON, for scripts")


def _text(value: Any) -> str:
    """An engine-provided value as text fit for a terminal: its control characters written as escapes."""
    return escape_control_characters(str(value))


def _number(value: Any, digits: int = 0) -> str:
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return "-"


def _used_of(used: Any, capacity: Any) -> str:
    if not isinstance(used, int | float) or not isinstance(capacity, int | float) or capacity <= 0:
        return "-"
    return f"{used:,.0f} / {capacity:,.0f} ({100 * used / capacity:.0f}%)"


def render(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    engine = stats["engine"]
    console = Console()
    limits = engine.get("default_limits", {})
    # Text objects, not markup strings: rich reads no markup in them, so "[red]" in a name stays as it is.
    header = Text.assemble(
        (f"trio-mapper {_text(engine.get('version', '?'))}", "bold"),
        f" pid {_text(engine.get('pid', '?'))} on {_text(engine.get('socket', '?'))}"
        f" → {_text(engine.get('base_url', '?'))}  up {_number(engine.get('uptime'), 0)}s",
    )
    if engine.get("closing"):
        header.append("  shutting down", style="yellow")
    console.print(console.highlighter(header))
    console.print(
        console.highlighter(
            f"connections {_text(engine.get('connections', 0))}  outstanding {_text(engine.get('outstanding', 0))} "
            f"(max {_number(engine.get('max_queued'))})  in flight {_text(engine.get('in_flight', 0))}"
            f"/{_text(engine.get('max_concurrent_reqs', '?'))}  accepted {_number(engine.get('accepted'))}  "
            f"refused {_number(engine.get('rejected'))}  default limits {_number(limits.get('rpm'))} rpm, "
            f"{_number(limits.get('tpm'))} tpm, period {_text(engine.get('period_length', '?'))}s "
            f"({_text(engine.get('ledger_mode', '?'))})"
        )
    )
    http = engine.get("http_requests")
    if engine.get("http") and isinstance(http, dict):
        console.print(
            console.highlighter(
                f"http on {_text(', '.join(map(str, engine['http'])))}  requests {_number(http.get('requests'))}  "
                f"unauthorized {_number(http.get('unauthorized'))}  SDK retries {_number(http.get('sdk_retries'))}"
            )
        )
    budget = engine.get("budget")
    if isinstance(budget, dict) and budget.get("backend") == "redis":
        state = _text(budget.get("state", "?"))
        line = Text.assemble(
            "budget shared through Redis: ",
            (state, "green" if state == "ok" else "bold red"),
            f"  engines on the key {_number(budget.get('engines'))}  failure policy "
            f"{_text(budget.get('failure_policy', '?'))}",
        )
        console.print(line)
    lanes: dict[str, dict[str, Any]] = stats.get("lanes", {})
    if not lanes:
        console.print("no requests seen yet")
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("model", "queued", "retrying", "in flight", "ok", "failed", "tokens used", "requests used",
                   "429s", "retries", "estimate/actual", "paused"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, lane in sorted(lanes.items()):
        budget = lane.get("budget", {})
        estimated, actual = lane.get("estimated_prompt_tokens", 0), lane.get("actual_prompt_tokens", 0)
        ratio = f"{estimated / actual:.2f}" if actual else "-"
        pause = budget.get("pause_remaining") or 0
        table.add_row(
            Text(_text(name)),
            _number(lane.get("queued")),
            _number(lane.get("retry_wait")),
            _number(lane.get("in_flight")),
            _number(lane.get("succeeded")),
            _number(lane.get("failed")),
            _used_of(budget.get("tokens_used"), budget.get("token_capacity")),
            _used_of(budget.get("requests_used"), budget.get("request_capacity")),
            _number(lane.get("upstream_429s")),
            _number(lane.get("retries")),
            ratio,
            f"{pause:.1f}s" if pause > 0 else "",
        )
    console.print(table)


def run_status(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, client_name="trio-mapper status") as client:
            stats = client.stats()
    except EngineUnavailable as exc:
        print(f"trio-mapper status: {exc}", file=sys.stderr)
        return 3
    except TrioMapperError as exc:
        print(f"trio-mapper status: the engine answered with an error: {_text(exc)}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(stats, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        render(stats)
    return 0
