"""The command dispatcher: each command imports what it needs, and nothing else (a unit test of tools/cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after_building(command: str) -> dict[str, bool]:
    code = (
        "import json, sys\n"
        "from trio_mapper.tools.cli import build_parser\n"
        f"build_parser({command!r})\n"
        "names = ('hypercorn', 'trio_mapper.simulator', 'trio_mapper.engine', 'tiktoken', 'httpx')\n"
        "print(json.dumps({name: name in sys.modules for name in names}))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded: dict[str, bool] = json.loads(output.stdout)
    return loaded


def test_launch_engines_parser_needs_neither_the_simulator_nor_hypercorn() -> None:
    loaded = _loaded_after_building("launch-engine")
    assert not loaded["hypercorn"] and not loaded["trio_mapper.simulator"] and not loaded["tiktoken"]
    assert loaded["trio_mapper.engine"]  # its options quote the engine's settings


@pytest.mark.parametrize("command", ["map", "status"])
def test_client_tools_do_not_load_the_engine(command: str) -> None:
    assert _loaded_after_building(command) == {
        "hypercorn": False,
        "trio_mapper.simulator": False,
        "trio_mapper.engine": False,
        "tiktoken": False,
        "httpx": False,
    }


def test_every_command_is_listed_without_importing_any() -> None:
    output = subprocess.run(
        [sys.executable, "-c", "import sys; from trio_mapper.tools.cli import main; sys.exit(main(['--help']))"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert output.returncode == 0
    for command in ("launch-engine", "check-config", "simulate", "status", "map", "demo"):
        assert command in output.stdout
