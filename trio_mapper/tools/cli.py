"""The ``trio-mapper`` command: one subcommand per tool, each imported only when it runs.

Building every subcommand's parser would import every tool (the simulator brings hypercorn, the engine
tiktoken): ``trio-mapper map`` must not pay for ``launch-engine``, nor the other way round. So the top-level
parser knows the commands by name and help text only, and the chosen command's module adds its arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

import attrs

from trio_mapper._version import __version__


@attrs.frozen
class Command:
    help: str
    #: The module that defines ``add_arguments(parser)`` and ``run(args) -> int`` under the names below.
    module: str
    add_arguments: str
    run: str


COMMANDS: Final = {
    "launch-engine": Command(
        "Run the engine in the foreground. The key comes from OPENAI_API_KEY (or ./.env), never from argv.",
        "trio_mapper.tools.launch",
        "add_engine_arguments",
        "run_launch_engine",
    ),
    "check-config": Command(
        "Check the settings launch-engine would read with the same options, without starting it: exit 0 if it "
        "would start, 2 if not. Run it before systemctl reload or restart.",
        "trio_mapper.tools.launch",
        "add_check_config_arguments",
        "run_check_config",
    ),
    "simulate": Command(
        "Run the OpenAI-compatible simulator (the project's test upstream).",
        "trio_mapper.simulator",
        "add_simulate_arguments",
        "run_simulate",
    ),
    "status": Command(
        "Show the engine's lanes, queues, usage against limits, 429s and retries.",
        "trio_mapper.tools.status",
        "add_status_arguments",
        "run_status",
    ),
    "map": Command(
        "Send every request of a JSONL file (Batch API or plain bodies) through the engine; resumable.",
        "trio_mapper.tools.mapper",
        "add_map_arguments",
        "run_map",
    ),
    "demo": Command(
        "Run the whole thing on the simulator: an engine, a batch of requests, a summary (no key, no network).",
        "trio_mapper.tools.demo",
        "add_demo_arguments",
        "run_demo",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, that command's arguments too (importing its module)."""
    parser = argparse.ArgumentParser(
        prog="trio-mapper",
        description="A local engine that owns an OpenAI API key and its rate limits, shared by local clients "
        "over a Unix socket.",
    )
    parser.add_argument("--version", action="version", version=f"trio-mapper {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        sub = subparsers.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            getattr(importlib.import_module(spec.module), spec.add_arguments)(sub)
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), if it is one."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen(argv)
    args = build_parser(command).parse_args(argv)
    spec = COMMANDS[args.command]
    run = getattr(importlib.import_module(spec.module), spec.run)
    try:
        status: int = run(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
