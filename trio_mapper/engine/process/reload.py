"""What a SIGHUP may change in a running engine, and what needs a restart.

Only settings that the running parts can take on the fly are applied: the ledger's limits
(`Ledger.update_limits` keeps reservations and waiters), the concurrency bound (`CapacityLimiter.total_tokens`),
the log level and the peer allow-list (read at each accept). Everything else — the socket, the upstream, the
key, the queue bound whose channel is already sized — keeps its running value and is reported.

`Reloads` keeps how the reloads went, for the status line, the stats and the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
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
    #: The settings those changes are to, as the config file names them (``server.max_queued``).
    needs_restart: list[str] = attrs.field(factory=list)


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
    needs_restart: list[str] = []
    for field in attrs.fields(ServerSettings):
        old_value, new_value = getattr(current.server, field.name), getattr(new.server, field.name)
        if old_value == new_value:
            continue
        if field.name in RELOADABLE:
            applied.extend(_changes(("server", field.name), old_value, new_value))
        else:
            refused.extend(_changes(("server", field.name), old_value, new_value))
            needs_restart.append(config_path("server", field.name))
    for field in attrs.fields(OpenAISettings):
        old_value, new_value = getattr(current.openai, field.name), getattr(new.openai, field.name)
        if old_value == new_value:
            continue
        if field.name == "api_key":
            refused.append("openai.api_key: the key changed")
        else:
            refused.extend(_changes(("openai", field.name), old_value, new_value))
        needs_restart.append(config_path("openai", field.name))
    server = attrs.evolve(current.server, **{name: getattr(new.server, name) for name in RELOADABLE})
    return ReloadPlan(
        settings=attrs.evolve(current, server=server), applied=applied, refused=refused, needs_restart=needs_restart
    )


#: At most this many settings are named in the status line; the log has them all.
STATUS_NAMES: Final = 3


@attrs.define
class Reloads:
    """How the reloads went, where operators look: the ``STATUS=`` line of ``systemctl status``, the stats and
    the metrics. A failed reload (a bad file keeps the settings in force) or one that leaves a file's change
    without effect used to be told only in the log.

    Times are wall-clock (``time.time()``): they are shown as a time of day and exported as timestamps, and
    nothing waits on them.
    """

    #: When the settings in force were read: at start, then by each reload that succeeded.
    succeeded_at: float
    applied: int = 0
    failed: int = 0
    #: When the last reload failed and why (what it kept, too); None once one succeeds.
    failure: tuple[float, str] | None = None
    #: What the files say and the engine does not run, as of the last reload that applied them: a change that
    #: needs a restart, ``server.max_queued (needs a restart)``, or a value a later layer overrides,
    #: ``server.rpm (the command line sets it)``.
    not_applied: tuple[str, ...] = ()

    def succeeded(self, at: float, not_applied: Iterable[str]) -> None:
        self.applied += 1
        self.succeeded_at = at
        self.failure = None
        self.not_applied = tuple(not_applied)

    def failed_with(self, at: float, reason: str, *, not_applied: Iterable[str] | None = None) -> None:
        """Count a failed reload. ``not_applied``: the reload applied the settings but not everything (the
        keys file was refused), and this is what its settings left out."""
        self.failed += 1
        self.failure = (at, reason)
        if not_applied is not None:
            self.not_applied = tuple(not_applied)

    def status(self) -> str:
        """For the status line: the last failure until a reload succeeds, else what is not applied; "" if all is."""
        if self.failure is not None:
            at, reason = self.failure
            return f"reload failed at {_time_of_day(at)}: {reason}"
        if self.not_applied:
            named = ", ".join(self.not_applied[:STATUS_NAMES])
            more = len(self.not_applied) - STATUS_NAMES
            return f"reloaded at {_time_of_day(self.succeeded_at)}; not applied: {named}" + (
                f" and {more} more (see the log)" if more > 0 else ""
            )
        return ""

    def statistics(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "failed": self.failed,
            "succeeded_at": self.succeeded_at,
            "failure": None if self.failure is None else {"at": self.failure[0], "reason": self.failure[1]},
            "not_applied": list(self.not_applied),
        }


def _time_of_day(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))
