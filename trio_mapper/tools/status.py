"""``trio-mapper status``: the engine's lanes, queues, budget usage and tenants, readable at a glance.

Every string shown comes from the engine's stats, and some of them from its clients: a lane is named by
whatever model name a client sent. They are printed as plain text (never as rich markup) with their control
characters escaped, so a name cannot recolour the table, clear the screen or retitle the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Final

from trio_mapper.client.errors import EngineUnavailable, TrioMapperError
from trio_mapper.client.sync import Client
from trio_mapper.text import escape_control_characters

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text


#: How long `trio-mapper status` waits for the statistics once connected (a busy engine answers in well
#: under a second).
STATS_TIMEOUT: Final = 10.0
#: Columns assumed when the output is not a terminal: enough that no name or figure is ever cut.
PIPE_WIDTH: Final = 10_000


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    from trio_mapper.tools.args import add_socket_argument

    add_socket_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the raw counters as JSON, for scripts")
    parser.add_argument(
        "--timeout",
        type=float,
        default=STATS_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the engine's answer once connected (default {STATS_TIMEOUT:.0f})",
    )


def _text(value: Any) -> str:
    """An engine-provided value as text fit for a terminal: its control characters written as escapes."""
    return escape_control_characters(str(value))


def _number(value: Any, digits: int = 0) -> str:
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return "-"


def _mebibytes(value: Any) -> str:
    return _number(value / 2**20, 1) if isinstance(value, int | float) else "-"


def _used_of(used: Any, capacity: Any) -> str:
    if not isinstance(used, int | float) or not isinstance(capacity, int | float) or capacity <= 0:
        return "-"
    return f"{used:,.0f} / {capacity:,.0f} ({100 * used / capacity:.0f}%)"


def render(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.text import Text

    engine = stats["engine"]
    # On a terminal rich fits the tables to its width. Into a pipe or a file it would assume 80 columns and
    # cut model names short ("gpt-4o-mini-2024-…"), which a script grepping for one would not find.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    console = Console(width=PIPE_WIDTH) if wide else Console()
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
            f"(max {_number(engine.get('max_queued'))}, bodies {_mebibytes(engine.get('queued_bytes'))} of "
            f"{_mebibytes(engine.get('max_queued_bytes'))} MiB)  in flight {_text(engine.get('in_flight', 0))}"
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
                f"unauthorized {_number(http.get('unauthorized'))}  not found {_number(http.get('not_found'))}  "
                f"disconnected {_number(http.get('disconnected'))}  SDK retries {_number(http.get('sdk_retries'))}"
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
        kept = budget.get("kept_for_cut_off_engines")
        if isinstance(kept, (int, float)) and kept > 0:
            line.append(f"  keeping {100 * min(1.0, kept):.0f}% of the limits for engines cut off from Redis", "yellow")
        console.print(line)
    reload_line = _reload_line(engine.get("reloads"))
    if reload_line is not None:
        console.print(reload_line)
    lanes: dict[str, dict[str, Any]] = stats.get("lanes", {})
    if lanes:
        console.print(_lanes_table(lanes))
    else:
        console.print("no requests seen yet")
    tenants = engine.get("tenants")
    if isinstance(tenants, dict) and _configured(tenants):
        console.print()
        console.print(_tenants_table(tenants))


def _time_of_day(value: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(value)) if isinstance(value, int | float) else "?"


def _reload_line(reloads: Any) -> Text | None:
    """What the last reload left undone, if anything: a failure (the settings in force were kept), else the
    settings the files give that the engine does not run (a restart needed, a value overridden)."""
    from rich.text import Text

    if not isinstance(reloads, dict):
        return None
    failure = reloads.get("failure")
    if isinstance(failure, dict):
        return Text.assemble(
            ("last reload failed", "bold red"),
            f" at {_time_of_day(failure.get('at'))}: {_text(failure.get('reason', '?'))}",
        )
    not_applied = reloads.get("not_applied")
    if isinstance(not_applied, list) and not_applied:
        return Text.assemble(
            ("not applied", "yellow"),
            f" since the reload at {_time_of_day(reloads.get('succeeded_at'))}: "
            f"{_text(', '.join(map(str, not_applied)))}",
        )
    return None


def _lanes_table(lanes: dict[str, dict[str, Any]]) -> Table:
    from rich.table import Table
    from rich.text import Text

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
    return table


#: A tenant's settings when nothing configures it: the default tenant of an engine without [tenants.*] tables.
_UNCONFIGURED: Final = {"priority": "default", "weight": 1, "rpm_cap": None, "tpm_cap": None, "daily_tokens": None,
                        "daily_cost": None}  # fmt: skip


def _configured(tenants: dict[str, Any]) -> bool:
    """Whether the tenants are worth a table: some are configured, or the default one has settings of its own."""
    if set(tenants) != {"default"}:
        return bool(tenants)
    default = tenants["default"]
    return isinstance(default, dict) and any(default.get(key, value) != value for key, value in _UNCONFIGURED.items())


def _tenants_table(tenants: dict[str, Any]) -> Table:
    from rich.table import Table
    from rich.text import Text

    rows = [(name, tenant) for name, tenant in tenants.items() if isinstance(tenant, dict)]
    # Cost only once something can cost: a price table gave a cost, or a tenant has a cost budget.
    costs = any(tenant.get("cost_24h") or tenant.get("daily_cost") is not None for _, tenant in rows)
    table = Table(show_edge=False, header_style="bold")
    columns = ["tenant", "class", "weight", "rpm cap", "tpm cap", "daily budget", "tokens 24h"]
    for column in [*columns, *(["cost 24h"] if costs else []), "queued"]:
        table.add_column(column, justify="left" if column in {"tenant", "class"} else "right")
    # In the engine's order (the configuration's, the default tenant last): the order rules are tried in.
    for name, tenant in rows:
        budget = [f"{_number(tenant['daily_tokens'])} tokens"] if tenant.get("daily_tokens") is not None else []
        if tenant.get("daily_cost") is not None:
            budget.append(f"cost {_number(tenant['daily_cost'], 2)}")
        cells: list[Text | str] = [
            Text(_text(name)),
            Text(_text(tenant.get("priority", "?"))),
            Text(_text(f"{tenant['weight']:g}" if isinstance(tenant.get("weight"), int | float) else "-")),
            Text(_text(tenant.get("rpm_cap") or "-")),
            Text(_text(tenant.get("tpm_cap") or "-")),
            Text(", ".join(budget) or "-"),
            _number(tenant.get("tokens_24h")),
        ]
        if costs:
            cells.append(_number(tenant.get("cost_24h"), 4))
        table.add_row(*cells, _number(tenant.get("queued")))
    return table


def run_status(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, client_name="trio-mapper status") as client:
            stats = client.stats(timeout=args.timeout)
    except EngineUnavailable as exc:
        print(f"trio-mapper status: {exc}", file=sys.stderr)
        return 3
    except TimeoutError:
        print(
            "trio-mapper status: the engine took the connection but did not answer within "
            f"{args.timeout:g} s; it may be wedged (see its log, or `systemctl status`)",
            file=sys.stderr,
        )
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
