"""What a SIGHUP may change in a running engine, and what needs a restart.

Only settings that the running parts can take on the fly are applied: the ledger's limits
(`Ledger.update_limits` keeps reservations and waiters), the concurrency bound (`CapacityLimiter.total_tokens`),
the log level and the peer allow-list (read at each accept). Everything else — the socket, the upstream, the
key, the queue bound whose channel is already sized — keeps its running value and is reported.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from trio_mapper.engine.process.settings import LaneLimits, OpenAISettings, ServerSettings, Settings

#: `ServerSettings` fields a reload applies; every other difference is refused with a warning.
RELOADABLE: Final = frozenset(
    {
        "rpm",
        "tpm",
        "models",
        "max_concurrent_reqs",
        "log_level",
        "allowed_uids",
        "allowed_gids",
        "default_deadline",
        "max_queued_bytes",
        "http_keys_file",
        "tenants",
        "prices",
    }
)


@attrs.frozen
class ReloadPlan:
    #: The running settings with the reloadable fields taken from the new ones.
    settings: Settings
    #: One line per applied change, e.g. ``server.rpm: 5000 -> 6000``.
    applied: list[str]
    #: One line per change that needs a restart.
    refused: list[str]


def _show(value: Any) -> str:
    if isinstance(value, dict):
        parts = [
            f"{name} ({lim.rpm} rpm, {lim.tpm} tpm)" if isinstance(lim, LaneLimits) else f"{name}={lim!r}"
            for name, lim in sorted(value.items())
        ]
        return "{" + ", ".join(parts) + "}"
    return str(value)


def plan_reload(current: Settings, new: Settings) -> ReloadPlan:
    """Compare the running settings with freshly loaded ones; never mentions the key's value."""
    applied: list[str] = []
    refused: list[str] = []
    for field in attrs.fields(ServerSettings):
        old_value, new_value = getattr(current.server, field.name), getattr(new.server, field.name)
        if old_value == new_value:
            continue
        line = f"server.{field.name}: {_show(old_value)} -> {_show(new_value)}"
        (applied if field.name in RELOADABLE else refused).append(line)
    for field in attrs.fields(OpenAISettings):
        old_value, new_value = getattr(current.openai, field.name), getattr(new.openai, field.name)
        if old_value == new_value:
            continue
        if field.name == "api_key":
            refused.append("openai.api_key: the key changed")
        else:
            refused.append(f"openai.{field.name}: {_show(old_value)} -> {_show(new_value)}")
    server = attrs.evolve(current.server, **{name: getattr(new.server, name) for name in RELOADABLE})
    return ReloadPlan(settings=attrs.evolve(current, server=server), applied=applied, refused=refused)
