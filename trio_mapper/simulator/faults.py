"""The simulator's one source of randomness: faults, slowness, latency, reply lengths and ids.

Every random choice goes through a single ``random.Random(seed)``, so a seeded run that sees the same
sequence of requests makes the same choices.
"""

from __future__ import annotations

import enum
import random
from typing import final

from .config import SimulatorConfig
from .content import WORDS


class Fault(enum.Enum):
    """What goes wrong with an admitted request (drawn after admission, so it stays charged)."""

    NONE = "none"
    SERVER_ERROR = "500"
    BAD_GATEWAY = "502"
    OVERLOADED = "503"
    RESET = "reset"


@final
class Dice:
    """Draws every random decision from one seeded generator."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self._rng = random.Random(config.seed)
        # Cumulative thresholds: one uniform draw picks at most one fault.
        thresholds: list[tuple[float, Fault]] = []
        edge = 0.0
        for rate, fault in (
            (config.fail_rate, Fault.SERVER_ERROR),
            (config.bad_gateway_rate, Fault.BAD_GATEWAY),
            (config.overloaded_rate, Fault.OVERLOADED),
            (config.reset_rate, Fault.RESET),
        ):
            if rate > 0.0:
                edge += rate
                thresholds.append((edge, fault))
        self._thresholds = tuple(thresholds)

    def __repr__(self) -> str:
        return f"<Dice seed={self._config.seed!r}>"

    def reseed(self) -> None:
        """Start the sequence over (with the same seed, or fresh entropy when unseeded)."""
        self._rng.seed(self._config.seed)

    def fault(self) -> Fault:
        draw = self._rng.random()
        for edge, fault in self._thresholds:
            if draw < edge:
                return fault
        return Fault.NONE

    def slow(self) -> bool:
        return self._config.slow_rate > 0.0 and self._rng.random() < self._config.slow_rate

    def reply(self, max_tokens: int | None) -> tuple[int, int, bool]:
        """Draw one reply: (first word index, completion tokens, whether max_tokens cut it short)."""
        natural = self._rng.randint(self._config.output_tokens_min, self._config.output_tokens_max)
        start = self._rng.randrange(len(WORDS))
        if max_tokens is not None and natural > max_tokens:
            return start, max_tokens, True
        return start, natural, False

    def hex_id(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"

    def latency(self, output_tokens: int, slow: bool) -> float:
        """Seconds to wait before answering: base + per output token (+ the slow-reply penalty)."""
        config = self._config
        millis = config.latency_ms + config.per_token_latency_ms * output_tokens
        if slow:
            millis += config.slow_ms
        return millis / 1000.0
