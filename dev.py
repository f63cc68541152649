#!/usr/bin/env python3
"""One entry point for newcomers and CI: `python3 dev.py demo | test | lint | run CMD`.

It keeps a virtual environment in `.venv/` in sync with `pyproject.toml` (re-installing only when the
file changed), then runs the command inside it. Needs nothing but Python 3.11+ and access to PyPI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".trio-mapper-installed"


def _python() -> Path:
    return BIN / "python"


def ensure_environment() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs under whatever python3 the user has
        sys.exit(f"trio-mapper needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and _python().exists():
        return
    if not _python().exists():
        print("[dev] creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("[dev] installing trio-mapper and its test tools into .venv (first run only)", flush=True)
    pip = [str(_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def run(*argv: str) -> int:
    return subprocess.run(argv, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    rest = argv[1:]
    if command in {"help", "-h", "--help"}:
        print(__doc__)
        print("  demo   run the end-to-end demo on the embedded simulator (trio-mapper demo)")
        print("  test   run the test suite (extra arguments go to pytest)")
        print("  lint   ruff (lint with the ASYNC rules, format check), mypy and the import rules (lint-imports)")
        print("  run    run any command inside the environment, e.g. `dev.py run trio-mapper --help`")
        return 0
    ensure_environment()
    if command == "demo":
        return run(str(BIN / "trio-mapper"), "demo", *rest)
    if command == "test":
        return run(str(_python()), "-m", "pytest", *rest)
    if command == "lint":
        status = run(str(_python()), "-m", "ruff", "check", "trio_mapper", "tests", "bench", "dev.py")
        status = status or run(
            str(_python()), "-m", "ruff", "format", "--check", "trio_mapper", "tests", "bench", "dev.py"
        )
        status = status or run(str(_python()), "-m", "mypy")
        # The layers' import rules (pyproject.toml, [tool.importlinter]); docs/architecture.md explains them.
        return status or run(str(BIN / "lint-imports"), "--no-cache")
    if command == "run":
        if not rest:
            sys.exit("dev.py run: name a command")
        exe = BIN / rest[0]
        return run(str(exe) if exe.exists() else rest[0], *rest[1:])
    print(f"dev.py: unknown command {command!r}; try `python3 dev.py help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
