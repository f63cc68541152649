"""``trio-mapper launch-engine``: its options and the process around the engine (signals, settings, logging).

The one tool that imports the engine: it is the engine's entry point. The other tools reach a running engine
through `trio_mapper.client` only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from trio_mapper.engine.process.settings import (
    DEFAULT_BASE_URL,
    LoadedSettings,
    ServerSettings,
    SettingsError,
    budget_password,
    read_settings,
)
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


def _read_layers(args: argparse.Namespace, dotenv_dir: Path) -> LoadedSettings:
    """The settings from every layer, as start-up and each SIGHUP read them: the config file and the environment
    (and ``.env`` in ``dotenv_dir``) as they are now, the command line given."""
    return read_settings(cli=vars(args), config_file=args.config, environ=os.environ, dotenv_dir=dotenv_dir)


def _read_at_start(args: argparse.Namespace, dotenv_dir: Path) -> tuple[LoadedSettings, str | None]:
    """What launch-engine reads before anything else: the settings and the shared budget's Redis password.

    Raises:
        SettingsError: one readable line per problem (launch-engine exits 2).
    """
    loaded = _read_layers(args, dotenv_dir)
    return loaded, budget_password(loaded.settings.server, os.environ, dotenv_dir)


def _secrets_known_before_reading(dotenv_dir: Path) -> list[str]:
    """The key and the Redis password wherever start-up finds them, known before the settings are read (which
    may fail), so that no message about the settings can show them."""
    from trio_mapper.engine.process.settings import environment_budget_password, find_api_key

    secrets = [secret for secret in (environment_budget_password(os.environ, dotenv_dir),) if secret]
    with contextlib.suppress(SettingsError):  # reported when the settings are read
        secrets += [key for key in (find_api_key(os.environ, dotenv_dir),) if key]
    return secrets


def _log_layers(loaded: LoadedSettings, log: logging.Logger) -> None:
    """What start-up tells of how the layers combined: ``TRIO_MAPPER_*`` variables nothing reads, config-file
    values a later layer overrides."""
    for line in loaded.unknown_variables:
        log.warning("%s", line)
    for override in loaded.overridden:
        # Information only at start: the command line is this run's choice. A reload warns (Engine.reload).
        log.info("%s", override)


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

    from trio_mapper.engine.daemon import Engine, SettingRefused
    from trio_mapper.engine.estimate.tokens import TokenEstimator
    from trio_mapper.engine.fronts.unix.listener import ListenerError
    from trio_mapper.engine.process.logs import RedactSecrets, configure_logging

    # SIGHUP reloads from the same layers: the config file and environment as they are now, the original argv.
    dotenv_dir = Path.cwd()

    def load() -> LoadedSettings:
        return _read_layers(args, dotenv_dir)

    try:
        loaded, password = _read_at_start(args, dotenv_dir)
    except SettingsError as exc:
        # A problem quotes the value it refuses, which may be the key pasted in the wrong place; stderr is the
        # journal, readable by more than the engine's user.
        redact = RedactSecrets(_secrets_known_before_reading(dotenv_dir)).redact
        for problem in exc.problems:
            print(f"trio-mapper launch-engine: {redact(problem)}", file=sys.stderr)
        return 2
    settings = loaded.settings
    server = settings.server
    secrets = [settings.openai.api_key] + ([password] if password else [])
    configure_logging(server.log_level, server.log_format, secrets=secrets)
    _log_layers(loaded, logging.getLogger("trio_mapper.engine"))
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
        return 2 if isinstance(exc, SettingRefused) else 1  # 2: a settings error, as a refused config exits
    return 0


#: check-config's exit status when launch-engine would refuse to start (launch-engine's own for a settings error).
CHECK_REFUSED = 2
CHECK_CONFIG = "trio-mapper check-config"


def add_check_config_arguments(parser: argparse.ArgumentParser) -> None:
    """launch-engine's options, all of them: the check must read the layers the engine would."""
    add_engine_arguments(parser)
    parser.epilog = (
        "Reads what launch-engine would read with these options, from this directory and environment (the config "
        "file, TRIO_MAPPER_* variables, .env, the key's presence, the HTTP keys file, the Redis password file), "
        "through the engine's own code, and says what it would refuse or warn about. It opens no socket and "
        "contacts neither the upstream nor Redis: the key's validity, Redis's password and the socket paths (one "
        "in use, a directory others may write to) are not checked. Exit status: 0 the engine would start (one "
        f"line says with what); {CHECK_REFUSED} it would refuse to (one line per problem). Run it with the options "
        "of ExecStart=, as the engine's user, before systemctl reload or restart (docs/systemd.md)."
    )


class _CheckFormatter(logging.Formatter):
    """One line per message, led as launch-engine leads its start-up errors: a problem as it would print it,
    a warning and a note (what start-up logs at INFO) marked as such."""

    LEADS = {logging.ERROR: "", logging.WARNING: "warning: ", logging.INFO: "note: "}

    def format(self, record: logging.LogRecord) -> str:
        return f"{CHECK_CONFIG}: {self.LEADS.get(record.levelno, '')}{record.getMessage()}"


def _report_to_stderr(secrets: list[str]) -> None:
    """Messages go to stderr through the engine's own filters: secrets redacted, client text bounded. Installed
    again as more secrets become known (the key, then the client keys)."""
    from trio_mapper.engine.process.logs import configure_logging

    # INFO whatever log_level says: what start-up logs at INFO about the layers (an overridden value) is the point.
    configure_logging("INFO", _CheckFormatter(), secrets=secrets)


def run_check_config(args: argparse.Namespace) -> int:
    from trio_mapper.engine.core.tenants import tenants_from_config
    from trio_mapper.engine.daemon import load_client_keys
    from trio_mapper.engine.fronts.http.keys import KeysError

    dotenv_dir = Path.cwd()
    log = logging.getLogger("trio_mapper.engine")
    secrets = _secrets_known_before_reading(dotenv_dir)
    _report_to_stderr(secrets)

    def refused(problems: list[str]) -> int:
        for problem in problems:
            log.error("%s", problem)
        count = len(problems)
        log.error(
            "the engine would not start: %d problem%s (exit status %d)", count, "s" if count != 1 else "", CHECK_REFUSED
        )
        return CHECK_REFUSED

    try:
        loaded, password = _read_at_start(args, dotenv_dir)
    except SettingsError as exc:
        return refused(exc.problems)
    settings = loaded.settings
    secrets = [settings.openai.api_key, *secrets] + ([password] if password else [])
    _report_to_stderr(secrets)
    _log_layers(loaded, log)
    problems = []
    # What start-up checks next, before it serves, with the functions it calls: the HTTP front's keys file
    # (`Engine._open_http_listeners`), the tenants as the scheduler takes them (`Engine._serve`).
    try:
        keys = load_client_keys(settings.server)
        _report_to_stderr([*secrets, *keys.names_by_key])
    except KeysError as exc:
        problems.append(str(exc))
    try:
        tenants_from_config(settings.server.tenants)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        return refused(problems)
    print(f"{CHECK_CONFIG}: ok: {_what_would_run(settings.server, settings.openai.base_url)}")
    return 0


def _what_would_run(server: ServerSettings, base_url: str) -> str:
    """One line: the limits and where the engine would listen. No secret: the settings hold none but the key,
    and a budget URL or base URL that holds a password is refused before this."""
    limits = (
        f"{server.rpm} rpm, {server.tpm} tpm, {server.max_concurrent_reqs} concurrent, "
        f"period {server.period_length:g}s ({server.ledger_mode})"
    )
    if server.models:
        limits += f", {len(server.models)} model table{'s' if len(server.models) != 1 else ''}"
    if server.tenants:
        limits += f", {len(server.tenants)} tenant{'s' if len(server.tenants) != 1 else ''}"
    listeners = [f"unix:{server.socket}"]
    if server.http_socket_path is not None:
        listeners.append(f"HTTP unix:{server.http_socket_path}")
    if server.http:
        listeners.append(f"HTTP http://{server.http}")
    budget = "local budget" if server.budget == "local" else f"budget in {server.budget} ({server.budget_failure})"
    return (
        f"the engine would start with {limits}; {budget}; upstream {base_url}; listening on "
        f"{', '.join(listeners)} (or the sockets systemd passes)"
    )
