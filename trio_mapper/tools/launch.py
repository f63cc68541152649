"""``trio-mapper launch-engine``: its options and the process around the engine (signals, settings, logging).

The one tool that imports the engine: it is the engine's entry point. The other tools reach a running engine
through `trio_mapper.client` only.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from trio_mapper.engine.process.settings import DEFAULT_BASE_URL, LoadedSettings, ServerSettings, SettingsError
from trio_mapper.paths import default_socket_path
from trio_mapper.tools.args import non_negative_float, octal_mode, positive_float, positive_int


def _default(name: str) -> Any:
    """A ServerSettings default, quoted in the help so the two cannot drift apart."""
    return attrs.fields_dict(ServerSettings)[name].default


def _both_spellings(name: str) -> list[str]:
    """The seed's snake_case option plus a kebab-case alias (``--max_nb_sockets``, ``--max-nb-sockets``)."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    elif "-" in name:
        spellings.append(f"--{name.replace('-', '_')}")
    return spellings


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    # Every default is None here so that only what the user typed overrides the config file and environment;
    # the real defaults live in settings.py and are quoted in the help.
    limits = parser.add_argument_group("limits (required: from the command line, the config file or the environment)")
    limits.add_argument(
        *_both_spellings("max_concurrent_reqs"),
        dest="max_concurrent_reqs",
        type=positive_int,
        metavar="N",
        help="upstream requests in flight at once",
    )
    limits.add_argument(
        "--rpm", type=positive_int, metavar="N", help="requests per minute allowed for the key (per model)"
    )
    limits.add_argument(
        "--tpm", type=positive_int, metavar="N", help="tokens per minute allowed for the key (per model)"
    )
    limits.add_argument(
        *_both_spellings("period_length"),
        dest="period_length",
        type=positive_float,
        metavar="SECONDS",
        help=f"budget period: at most limit x period / 60 is spent at once (default {_default('period_length'):g})",
    )
    limits.add_argument(
        *_both_spellings("max_nb_sockets"),
        dest="max_nb_sockets",
        type=positive_int,
        metavar="N",
        help=f"size of the upstream connection pool (default {_default('max_nb_sockets')})",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help=f"Unix socket to listen on (default {default_socket_path()}, i.e. $XDG_RUNTIME_DIR/trio-mapper/"
        "engine.sock or /tmp/trio-mapper-UID/engine.sock)",
    )
    serving.add_argument(
        *_both_spellings("socket-mode"),
        dest="socket_mode",
        type=octal_mode,
        metavar="MODE",
        help=f"permissions of the socket file, octal (default {_default('socket_mode'):04o}; never world-writable)",
    )
    http = parser.add_argument_group("OpenAI-compatible HTTP API (docs/http.md)")
    http.add_argument(
        *_both_spellings("http-socket"),
        dest="http_socket",
        type=Path,
        metavar="PATH",
        help="Unix socket of the HTTP API, same permissions as --socket (default: the --socket path + '.http')",
    )
    http.add_argument(
        *_both_spellings("no-http-socket"),
        dest="http_unix",
        action="store_const",
        const=False,
        default=None,
        help="do not serve the HTTP API on a Unix socket",
    )
    http.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the HTTP API on this loopback address (127.0.0.1:8765); needs --http-keys-file",
    )
    http.add_argument(
        *_both_spellings("http-keys-file"),
        dest="http_keys_file",
        type=Path,
        metavar="FILE.toml",
        help='client keys for --http: [keys] name = "key" (no access for others, no write for the group: 0600 or '
        "0640; re-read on SIGHUP)",
    )
    shared = parser.add_argument_group("shared budget (several engines on one key; docs/ledger.md)")
    shared.add_argument(
        "--budget",
        metavar="URL",
        help="keep the budget in Redis, shared by every engine on the key: redis://host:6379/0, rediss://..., "
        "unix:///path/redis.sock (default: local, this process only). The password goes in "
        "--budget-password-file or TRIO_MAPPER_BUDGET_PASSWORD, never in the URL",
    )
    shared.add_argument(
        *_both_spellings("budget-password-file"),
        dest="budget_password_file",
        type=Path,
        metavar="FILE",
        help="file holding the Redis password",
    )
    shared.add_argument(
        *_both_spellings("budget-namespace"),
        dest="budget_namespace",
        metavar="PREFIX",
        help="prefix of the budget's Redis keys (default trio-mapper)",
    )
    shared.add_argument(
        *_both_spellings("budget-failure"),
        dest="budget_failure",
        choices=("wait", "local-share"),
        help="when Redis is unreachable: wait (send nothing until it is back; the default) or local-share "
        "(the limits divided by the number of engines seen)",
    )
    shared.add_argument(
        *_both_spellings("budget-timeout"),
        dest="budget_timeout",
        type=float,
        metavar="SECONDS",
        help="longest a Redis call may take before the failure policy applies (default 0.5)",
    )
    serving.add_argument(
        *_both_spellings("base-url"),
        dest="base_url",
        metavar="URL",
        help=f"API root including the version, like the SDK's base_url (default {DEFAULT_BASE_URL})",
    )
    serving.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="TOML file with [server], [openai] and [models.NAME] tables (see README)",
    )
    serving.add_argument(
        *_both_spellings("max-queued"),
        dest="max_queued",
        type=positive_int,
        metavar="N",
        help=f"requests held at once before new ones get 'overloaded' (default {_default('max_queued')})",
    )
    serving.add_argument(
        *_both_spellings("max-queued-bytes"),
        dest="max_queued_bytes",
        type=positive_int,
        metavar="BYTES",
        help="bytes of request bodies held at once before new requests get 'overloaded' "
        f"(default {_default('max_queued_bytes')}, 1 GiB; at least --max-frame-bytes)",
    )
    serving.add_argument(
        *_both_spellings("max-attempts"),
        dest="max_attempts",
        type=positive_int,
        metavar="N",
        help=f"upstream attempts per request, first try included; 429s do not count; also the most a client "
        f"may ask for (default {_default('max_attempts')})",
    )
    serving.add_argument(
        *_both_spellings("default-deadline"),
        dest="default_deadline",
        type=positive_float,
        metavar="S",
        help="seconds after which a request that names no deadline is answered 'timeout' "
        f"(default {_default('default_deadline'):g})",
    )
    serving.add_argument(
        *_both_spellings("grace-period"),
        dest="grace_period",
        type=non_negative_float,
        metavar="SECONDS",
        help=f"time in-flight requests get to finish on SIGTERM (default {_default('grace_period'):g})",
    )
    serving.add_argument(
        *_both_spellings("max-frame-bytes"),
        dest="max_frame_bytes",
        type=positive_int,
        metavar="N",
        help=f"largest protocol frame accepted, in bytes (default {_default('max_frame_bytes')})",
    )
    serving.add_argument(
        *_both_spellings("ledger-mode"),
        dest="ledger_mode",
        choices=["bucket", "period"],
        help=f"budget semantics (default {_default('ledger_mode')}; see docs/ledger.md)",
    )
    serving.add_argument(
        *_both_spellings("log-level"),
        dest="log_level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help=f"default {_default('log_level')}",
    )
    serving.add_argument(
        *_both_spellings("log-format"),
        dest="log_format",
        choices=["text", "json"],
        help=f"default {_default('log_format')}",
    )


def _record_engine_signals() -> list[int]:
    """From now on SIGINT, SIGTERM and SIGHUP are appended to the returned list instead of acting.

    Their default actions would end start-up wherever it is (SIGTERM and SIGHUP kill the process, SIGINT raises
    KeyboardInterrupt), possibly with the socket file created and left behind. The engine acts on the
    recorded ones as soon as its Trio signal receiver is installed (`Engine.serve`), and the receiver puts
    these handlers back when it closes: a signal during the last moments of exit changes nothing.
    """
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # engine.SIGNALS, without importing the engine
        signal.signal(signum, record)
    return received


def run_launch_engine(args: argparse.Namespace) -> int:
    # First, before the imports below take their time: nothing is created on disk before this line.
    early_signals = _record_engine_signals()
    import trio

    from trio_mapper.engine.daemon import Engine
    from trio_mapper.engine.estimate.tokens import TokenEstimator
    from trio_mapper.engine.fronts.unix.listener import ListenerError
    from trio_mapper.engine.process.logs import configure_logging
    from trio_mapper.engine.process.settings import budget_password, read_settings

    # SIGHUP reloads from the same layers: the config file and environment as they are now, the original argv.
    dotenv_dir = Path.cwd()

    def load() -> LoadedSettings:
        return read_settings(cli=vars(args), config_file=args.config, environ=os.environ, dotenv_dir=dotenv_dir)

    try:
        loaded = load()
        password = budget_password(loaded.settings.server, os.environ)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"trio-mapper launch-engine: {problem}", file=sys.stderr)
        return 2
    settings = loaded.settings
    server = settings.server
    secrets = [settings.openai.api_key] + ([password] if password else [])
    configure_logging(server.log_level, server.log_format, secrets=secrets)
    log = logging.getLogger("trio_mapper.engine")
    for line in loaded.unknown_variables:
        log.warning("%s", line)
    for override in loaded.overridden:
        # Information only at start: the command line is this run's choice. A reload warns (Engine.reload).
        log.info("%s", override)
    # Encodings load before the event loop starts: the first request must not wait for them.
    estimator = TokenEstimator.load()
    engine = Engine(
        settings,
        estimator,
        reload_settings=load,
        early_signals=early_signals,
        budget_password=password,
    )
    try:
        trio.run(engine.serve)
    except ListenerError as exc:
        print(f"trio-mapper launch-engine: {exc}", file=sys.stderr)
        return 1
    return 0
