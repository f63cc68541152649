"""The ``simulate`` command: flags, their translation into a SimulatorConfig, and the blocking runner."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
import trio

from .config import SimulatorConfig, load_model_limits, parse_model_flag
from .server import serve_simulator

_DEFAULTS = {field.name: field.default for field in attrs.fields(SimulatorConfig)}

# (flag, config field, type, help); every default comes from SimulatorConfig so the two never disagree.
_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on; 0 picks a free one"),
    ("--rpm", "rpm", int, "default requests per minute, per model"),
    ("--tpm", "tpm", int, "default tokens per minute, per model"),
    ("--quantum", "quantum", float, "seconds of burst a bucket holds: 60 = a minute, 1 = per second"),
    ("--latency-ms", "latency_ms", float, "base latency of every admitted request"),
    ("--per-token-latency-ms", "per_token_latency_ms", float, "extra latency per output token"),
    ("--fail-rate", "fail_rate", float, "probability of a 500 server_error"),
    ("--bad-gateway-rate", "bad_gateway_rate", float, "probability of a 502 with an HTML body"),
    ("--overloaded-rate", "overloaded_rate", float, "probability of a 503 server_is_overloaded"),
    ("--reset-rate", "reset_rate", float, "probability of a connection reset mid-response"),
    ("--slow-rate", "slow_rate", float, "probability that a reply is slow"),
    ("--slow-ms", "slow_ms", float, "latency added to a slow reply"),
    ("--seed", "seed", int, "seed of the one random generator; makes runs repeatable"),
    ("--default-max-tokens", "default_max_tokens", int, "output tokens charged when a request sets no cap"),
    ("--output-tokens-min", "output_tokens_min", int, "shortest natural reply, in tokens"),
    ("--output-tokens-max", "output_tokens_max", int, "longest natural reply, in tokens"),
    ("--api-key", "api_key", str, "accept only this bearer key"),
)


def _shown_default(name: str) -> object:
    if name == "api_key" and _DEFAULTS[name] is None:
        return "any non-empty key"
    return _DEFAULTS[name]


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` flags to ``parser``."""
    for flag, name, kind, text in _OPTIONS:
        parser.add_argument(
            flag, dest=f"sim_{name}", type=kind, default=None, help=f"{text} (default: {_shown_default(name)})"
        )
    parser.add_argument(
        "--insufficient-quota",
        dest="sim_insufficient_quota",
        action="store_true",
        help="answer every model request with a 429 insufficient_quota",
    )
    parser.add_argument(
        "--no-ratelimit-headers",
        dest="sim_no_ratelimit_headers",
        action="store_true",
        help="send no x-ratelimit-* headers, like many OpenAI-compatible servers and proxies",
    )
    parser.add_argument(
        "--no-retry-after",
        dest="sim_no_retry_after",
        action="store_true",
        help="rate-limit 429s name no wait: no retry-after(-ms) header, no 'Please try again in' in the message",
    )
    parser.add_argument(
        "--model",
        dest="sim_models",
        action="append",
        default=[],
        metavar="NAME=RPM:TPM",
        help="limits for one model (repeatable); other models use --rpm/--tpm",
    )
    parser.add_argument(
        "--model-limits",
        dest="sim_model_limits",
        type=Path,
        default=None,
        metavar="FILE",
        help='TOML or JSON table of per-model limits, e.g. {"gpt-4o": {"rpm": 500, "tpm": 30000}}',
    )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Build the config from parsed flags.

    Raises:
        ValueError: a flag value or the limits file is invalid; the message says which.
    """
    values: dict[str, Any] = {}
    for _, name, _, _ in _OPTIONS:
        value = getattr(args, f"sim_{name}", None)
        if value is not None:
            values[name] = value
    values["insufficient_quota"] = bool(getattr(args, "sim_insufficient_quota", False))
    values["ratelimit_headers"] = not getattr(args, "sim_no_ratelimit_headers", False)
    values["retry_after"] = not getattr(args, "sim_no_retry_after", False)
    limits: dict[str, tuple[int, int]] = {}
    path = getattr(args, "sim_model_limits", None)
    if path is not None:
        try:
            limits.update(load_model_limits(path))
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}") from error
    # Flags come after the file so a one-off override needs no edit to it.
    for flag in getattr(args, "sim_models", None) or []:
        name, pair = parse_model_flag(flag)
        limits[name] = pair
    values["model_limits"] = limits
    return SimulatorConfig(**values)


async def _serve_until_signal(config: SimulatorConfig) -> None:
    # Signals cancel the server rather than raising KeyboardInterrupt somewhere inside hypercorn.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_simulator, config)
            print(f"simulator listening on {url}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _find_os_error(error: BaseException) -> OSError | None:
    if isinstance(error, OSError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _find_os_error(inner)
            if found is not None:
                return found
    return None


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT/SIGTERM; 0 on a signal, 2 on bad flags, 1 if it cannot listen."""
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"trio-mapper simulate: {error}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signal, config)
    except KeyboardInterrupt:
        # Ctrl+C before the signal receiver was installed.
        return 0
    except (OSError, BaseExceptionGroup) as error:
        found = _find_os_error(error)
        if found is None:
            raise
        print(f"trio-mapper simulate: cannot listen on {config.host}:{config.port}: {found}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trio_mapper.simulator", description="An OpenAI-compatible API simulator."
    )
    add_simulate_arguments(parser)
    return run_simulate(parser.parse_args(argv))
