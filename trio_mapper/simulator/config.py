"""The simulator's settings: one frozen record, validated when built, plus the per-model limits file."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs

# A gpt-4o-mini-like tier: enough headroom for demos, small enough that a benchmark can reach it.
DEFAULT_RPM = 500
DEFAULT_TPM = 200_000
# The real API's unconfirmed default for a request without max_tokens is unknown; charging the longest reply
# the simulator would produce keeps the charge an upper bound of what the request can cost.
DEFAULT_MAX_TOKENS = 64
OUTPUT_TOKENS_MIN = 16
OUTPUT_TOKENS_MAX = 64


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _probability(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def _quantum(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    # Beyond 60 s the bucket would hold more than the per-minute limit the headers advertise.
    if not 0.0 < value <= 60.0:
        raise ValueError(f"quantum must be in (0, 60] seconds, got {value!r}")


def _model_limits(instance: object, attribute: attrs.Attribute[Any], value: dict[str, tuple[int, int]]) -> None:
    for name, (rpm, tpm) in value.items():
        if rpm <= 0 or tpm <= 0:
            raise ValueError(f"limits for model {name!r} must be positive, got RPM {rpm}, TPM {tpm}")


def _normalise_limits(value: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {str(name): (int(rpm), int(tpm)) for name, (rpm, tpm) in value.items()}


@attrs.frozen(kw_only=True)
class SimulatorConfig:
    """Everything that shapes one simulator run.

    Fault rates are probabilities drawn once per *admitted* request, so failed requests stay charged like on
    the real API. `fail_rate` (500), `bad_gateway_rate` (502), `overloaded_rate` (503) and `reset_rate`
    (connection reset mid-response) are exclusive outcomes and must sum to at most 1; `slow_rate` is drawn
    independently and adds `slow_ms` to the reply's latency.
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(default=0, validator=_non_negative)
    rpm: int = attrs.field(default=DEFAULT_RPM, validator=_positive)
    tpm: int = attrs.field(default=DEFAULT_TPM, validator=_positive)
    quantum: float = attrs.field(default=60.0, validator=_quantum)
    latency_ms: float = attrs.field(default=50.0, validator=_non_negative)
    per_token_latency_ms: float = attrs.field(default=1.0, validator=_non_negative)
    fail_rate: float = attrs.field(default=0.0, validator=_probability)
    bad_gateway_rate: float = attrs.field(default=0.0, validator=_probability)
    overloaded_rate: float = attrs.field(default=0.0, validator=_probability)
    reset_rate: float = attrs.field(default=0.0, validator=_probability)
    slow_rate: float = attrs.field(default=0.0, validator=_probability)
    slow_ms: float = attrs.field(default=2000.0, validator=_non_negative)
    insufficient_quota: bool = False
    # Many OpenAI-compatible servers and proxies send no x-ratelimit-* headers, and some no wait on their
    # 429s either: a client must then learn the limits from the 429s alone.
    ratelimit_headers: bool = True
    retry_after: bool = True
    seed: int | None = None
    model_limits: dict[str, tuple[int, int]] = attrs.field(
        factory=dict, converter=_normalise_limits, validator=_model_limits
    )
    default_max_tokens: int = attrs.field(default=DEFAULT_MAX_TOKENS, validator=_positive)
    output_tokens_min: int = attrs.field(default=OUTPUT_TOKENS_MIN, validator=_positive)
    output_tokens_max: int = attrs.field(default=OUTPUT_TOKENS_MAX, validator=_positive)
    # When set, only this bearer key is accepted; otherwise any non-empty key is.
    api_key: str | None = None

    def __attrs_post_init__(self) -> None:
        failures = self.fail_rate + self.bad_gateway_rate + self.overloaded_rate + self.reset_rate
        if failures > 1.0 + 1e-9:
            raise ValueError(f"fault rates 500+502+503+reset sum to {failures:.3f}, more than 1")
        if self.output_tokens_min > self.output_tokens_max:
            raise ValueError("output_tokens_min must not exceed output_tokens_max")

    def limits_for(self, model: str) -> tuple[int, int]:
        """Return (RPM, TPM) for a model: its table entry, else the defaults."""
        return self.model_limits.get(model, (self.rpm, self.tpm))


@attrs.frozen
class _ModelLimitsEntry:
    rpm: int
    tpm: int


# forbid_extra_keys turns a typo like `tmp = 1000` into a start-up error instead of a silent default.
_converter = cattrs.Converter(forbid_extra_keys=True)


def load_model_limits(path: Path) -> dict[str, tuple[int, int]]:
    """Read a per-model limits table from TOML or JSON: ``{"gpt-4o-mini": {"rpm": 500, "tpm": 200000}}``.

    In TOML, either top-level tables (``["gpt-4o-mini"]``) or tables under ``[models]`` work.

    Raises:
        ValueError: the file cannot be parsed or an entry is malformed; the message names the entry.
    """
    text = path.read_text(encoding="utf-8")
    try:
        raw: Any = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: {error}") from error
    if isinstance(raw, dict) and set(raw) == {"models"}:
        raw = raw["models"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a table of models")
    try:
        entries = _converter.structure(raw, dict[str, _ModelLimitsEntry])
    except Exception as error:
        lines = cattrs.transform_error(error) if isinstance(error, cattrs.BaseValidationError) else [str(error)]
        raise ValueError(f"{path}: " + "; ".join(lines)) from error
    return {name: (entry.rpm, entry.tpm) for name, entry in entries.items()}


def parse_model_flag(value: str) -> tuple[str, tuple[int, int]]:
    """Parse ``NAME=RPM:TPM`` as given to ``--model``."""
    name, sep, limits = value.rpartition("=")
    rpm_text, colon, tpm_text = limits.partition(":")
    if not sep or not name or not colon:
        raise ValueError(f"expected NAME=RPM:TPM, got {value!r}")
    try:
        return name, (int(rpm_text), int(tpm_text))
    except ValueError:
        raise ValueError(f"expected integer RPM and TPM in {value!r}") from None
