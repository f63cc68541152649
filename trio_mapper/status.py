"""``trio-mapper status``: the engine's lanes, queues and budget usage, readable at a glance."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .client import Client
from .client_errors import EngineUnavailable, TrioMapperError


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, metavar="PATH", help="engine socket (default: $TRIO_MAPPER_SOCKET, …)")
    parser.add_argument("--json", action="store_true", help="print the raw counters as JSON, for scripts")


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

    engine = stats["engine"]
    console = Console()
    limits = engine.get("default_limits", {})
    console.print(
        f"[bold]trio-mapper {engine.get('version', '?')}[/] pid {engine.get('pid', '?')} on {engine.get('socket', '?')}"
        f" → {engine.get('base_url', '?')}  up {_number(engine.get('uptime'), 0)}s"
        + ("  [yellow]shutting down[/]" if engine.get("closing") else "")
    )
    console.print(
        f"connections {engine.get('connections', 0)}  outstanding {engine.get('outstanding', 0)} "
        f"(max {_number(engine.get('max_queued'))})  in flight {engine.get('in_flight', 0)}"
        f"/{engine.get('max_concurrent_reqs', '?')}  accepted {_number(engine.get('accepted'))}  "
        f"refused {_number(engine.get('rejected'))}  default limits {_number(limits.get('rpm'))} rpm, "
        f"{_number(limits.get('tpm'))} tpm, period {engine.get('period_length', '?')}s "
        f"({engine.get('ledger_mode', '?')})"
    )
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
            name,
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
        print(f"trio-mapper status: the engine answered with an error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(stats, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        render(stats)
    return 0
