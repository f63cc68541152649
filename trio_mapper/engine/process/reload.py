"""What a SIGHUP may change in a running engine, and what needs a restart.

Only settings that the running parts can take on the fly are applied: the ledger's limits
(`Ledger.update_limits` keeps reservations and waiters), the concurrency bound (`CapacityLimiter.total_tokens`),
the log level and the peer allow-list (read at each accept). Everything else — the socket, the upstream, the
key, the queue bound whose channel is already sized — keeps its running value and is reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import attrs

from trio_mapper.engine.process.settings import OpenAISettings, Place, ServerSettings, Settings, config_path

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
    #: One line per applied change, e.g. ``server.rpm: 5000 -> 6000``, ``tenants.batch: weight 1 -> 3``.
    applied: list[str]
    #: One line per change that needs a restart.
    refused: list[str]


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, float):
        return f"{value:g}"  # a weight of 1, not 1.0
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    return str(value)


def _default(field: attrs.Attribute[Any]) -> Any:
    default: Any = field.default
    return default.factory() if isinstance(default, attrs.Factory) else default  # type: ignore[arg-type]


def _changes(place: Place, old: Any, new: Any) -> Iterator[str]:
    """What changed in one setting, readable: ``server.rpm: 5000 -> 6000``. A table of tables (``[models.*]``,
    ``[tenants.*]``, ``[prices.*]``) is told entry by entry and field by field, ``tenants.batch: weight 1 -> 3``,
    rather than as two dicts of attrs reprs in which the one change is hard to find."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        yield f"{config_path(*place)}: {_show(old)} -> {_show(new)}"
        return
    for key in sorted(old.keys() | new.keys()):
        where = config_path(*place, key)
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if after is None:
            yield f"{where}: removed"
        elif not attrs.has(type(after)):
            yield f"{where}: {_show(before)} -> {_show(after)}"
        elif before is None:
            # What the new table sets, leaving out what it leaves at the defaults.
            fields = attrs.fields(type(after))
            told = [
                f"{f.name} {_show(getattr(after, f.name))}" for f in fields if getattr(after, f.name) != _default(f)
            ]
            yield f"{where}: added ({', '.join(told)})"
        else:
            fields = attrs.fields(type(after))
            told = [
                f"{f.name} {_show(getattr(before, f.name))} -> {_show(getattr(after, f.name))}"
                for f in fields
                if getattr(before, f.name) != getattr(after, f.name)
            ]
            yield f"{where}: {', '.join(told)}"


def plan_reload(current: Settings, new: Settings) -> ReloadPlan:
    """Compare the running settings with freshly loaded ones; never mentions the key's value."""
    applied: list[str] = []
    refused: list[str] = []
    for field in attrs.fields(ServerSettings):
        old_value, new_value = getattr(current.server, field.name), getattr(new.server, field.name)
        if old_value != new_value:
            lines = _changes(("server", field.name), old_value, new_value)
            (applied if field.name in RELOADABLE else refused).extend(lines)
    for field in attrs.fields(OpenAISettings):
        old_value, new_value = getattr(current.openai, field.name), getattr(new.openai, field.name)
        if old_value == new_value:
            continue
        if field.name == "api_key":
            refused.append("openai.api_key: the key changed")
        else:
            refused.extend(_changes(("openai", field.name), old_value, new_value))
    server = attrs.evolve(current.server, **{name: getattr(new.server, name) for name in RELOADABLE})
    return ReloadPlan(settings=attrs.evolve(current, server=server), applied=applied, refused=refused)
