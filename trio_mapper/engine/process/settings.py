"""Engine settings: frozen attrs classes built from defaults < TOML file < environment < command line.

Every layer is merged into one plain dict and structured once by a strict cattrs converter, so a typo in a
config file, a bad environment value and a bad flag all produce the same kind of readable error:
one line per problem with its path, e.g. ``server.rpm: must be > 0, got -5``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import attrs
import cattrs
from attrs import validators as v

from trio_mapper.kinds import Priority
from trio_mapper.paths import default_socket_path

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
API_KEY_ENV_VAR: Final = "OPENAI_API_KEY"
#: Environment variables for `ServerSettings` fields are this prefix + the upper-cased field name.
SERVER_ENV_PREFIX: Final = "TRIO_MAPPER_"
#: The official SDK's environment names for the other OpenAI settings.
OPENAI_ENV_VARS: Final = {
    "base_url": "OPENAI_BASE_URL",
    "organization": "OPENAI_ORG_ID",
    "project": "OPENAI_PROJECT_ID",
}


class SettingsError(Exception):
    """Start-up configuration is unusable; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a finite number > 0, got {value}")


def _http_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http(s) URL such as {DEFAULT_BASE_URL}, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {value!r}")
    if parts.username is not None or parts.password is not None:
        # They would appear in logs and stats; the key is the only credential the engine sends.
        raise ValueError("must not contain a user name or password")


def _not_world_writable(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 0o777:
        raise ValueError(f"must be a permission mode between 0 and 0o777, got {value:#o}")
    if value & 0o002:
        raise ValueError(f"must not be world-writable (anyone could spend the key), got {value:#o}")


def _room_for_the_largest_request(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < instance.max_frame_bytes:
        raise ValueError(
            f"must be at least max_frame_bytes ({instance.max_frame_bytes}), got {value}: a request of the largest "
            "size allowed could be accepted only when nothing else is queued"
        )


#: URL schemes of the shared budget's Redis (``rediss``: TLS; ``unix``: a local socket).
BUDGET_SCHEMES: Final = ("redis", "rediss", "unix")
#: Where the Redis password may come from besides ``budget_password_file``; never the command line.
BUDGET_PASSWORD_ENV_VAR: Final = "TRIO_MAPPER_BUDGET_PASSWORD"


_CAP: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*")


def _cap(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    match = _CAP.fullmatch(value)
    if match is None or float(match[1]) <= 0 or (match[2] and float(match[1]) > 100):
        raise ValueError(
            f"must be a positive number per minute (5000) or a share of the model's limit ('25%'), got {value!r}"
        )


@attrs.frozen
class TenantConfig:
    """One ``[tenants.NAME]`` table (docs/tenants.md)."""

    priority: Priority = "default"
    weight: float = attrs.field(default=1.0, validator=_positive)
    #: Requests per minute in each model's lane: a number, or a share of the lane's limit like "25%".
    rpm_cap: str | None = attrs.field(default=None, validator=_cap)
    #: Tokens per minute in each model's lane, likewise.
    tpm_cap: str | None = attrs.field(default=None, validator=_cap)
    daily_tokens: int | None = attrs.field(default=None, validator=v.optional(_positive))
    daily_cost: float | None = attrs.field(default=None, validator=v.optional(_positive))
    uids: list[int] = attrs.field(factory=list, validator=v.deep_iterable(v.ge(0)))
    gids: list[int] = attrs.field(factory=list, validator=v.deep_iterable(v.ge(0)))
    keys: list[str] = attrs.field(factory=list)
    names: list[str] = attrs.field(factory=list)


@attrs.frozen
class PriceConfig:
    """One ``[prices.MODEL]`` table: the price of a million tokens, in the operator's currency."""

    input: float = attrs.field(validator=v.ge(0))
    output: float = attrs.field(validator=v.ge(0))


def _valid_tenants(instance: Any, attribute: attrs.Attribute[Any], value: dict[str, TenantConfig]) -> None:
    for name, tenant in value.items():
        rules = tenant.uids or tenant.gids or tenant.keys or tenant.names
        if name == "default" and rules:
            raise ValueError(
                "[tenants.default] takes every client no other tenant matches: give it no uids, gids, keys or names"
            )
        if name != "default" and not rules:
            raise ValueError(f"[tenants.{name}] matches nobody: give it uids, gids, keys or names")


def _budget_location(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value == "local":
        return
    parts = urlsplit(value)
    if parts.scheme not in BUDGET_SCHEMES:
        # The value is not quoted: a malformed URL may still hold a password, and this message is logged.
        raise ValueError(
            "must be 'local' or a Redis URL (redis://host:6379/0, rediss://…, unix:///path/redis.sock), got "
            + (f"a URL of scheme {parts.scheme!r}" if parts.scheme else "something else")
        )
    credentials = [name for name, _ in parse_qsl(parts.query) if _names_a_credential(name)]
    if parts.password is not None or credentials:
        # coredis takes ?password= as well as user:password@: either would reach logs, `ps` and reload lines.
        raise ValueError(
            "must not contain a password (command lines and config files are readable, and the URL is logged); "
            f"put it in budget_password_file or {BUDGET_PASSWORD_ENV_VAR}"
        )


def _names_a_credential(parameter: str) -> bool:
    name = parameter.lower()
    return any(word in name for word in ("pass", "secret", "token", "auth", "credential"))


def _loopback_address(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        parse_loopback_address(value)


def parse_loopback_address(value: str) -> tuple[str, int]:
    """``127.0.0.1:8765`` or ``[::1]:8765`` as (host, port); only loopback addresses are accepted.

    Raises:
        ValueError: not HOST:PORT, not an IP address, or not a loopback one.
    """
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        if not sep:
            raise ValueError
        port = int(port_text)
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"must be a loopback HOST:PORT such as 127.0.0.1:8765, got {value!r}") from None
    if not address.is_loopback:
        raise ValueError(
            f"must be a loopback address (127.0.0.1, ::1), got {value!r}: the HTTP front spends the key for "
            "whoever reaches it, so it never listens beyond this machine"
        )
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    return host, port


@attrs.frozen
class LaneLimits:
    """Per-minute limits of one model, as on the organization's limits page."""

    rpm: int = attrs.field(validator=_positive)
    tpm: int = attrs.field(validator=_positive)


@attrs.frozen
class OpenAISettings:
    """How to reach the upstream. The key is excluded from repr so it cannot leak into logs by accident."""

    api_key: str = attrs.field(repr=False, validator=v.min_len(1))
    base_url: str = attrs.field(default=DEFAULT_BASE_URL, validator=_http_url)
    organization: str | None = None
    project: str | None = None
    #: Seconds; the read timeout bounds one upstream attempt (long completions are slow).
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    read_timeout: float = attrs.field(default=600.0, validator=_positive)
    write_timeout: float = attrs.field(default=30.0, validator=_positive)


@attrs.frozen
class ServerSettings:
    """How the engine serves clients and spends the budget."""

    max_concurrent_reqs: int = attrs.field(validator=_positive)
    rpm: int = attrs.field(validator=_positive)
    tpm: int = attrs.field(validator=_positive)
    period_length: float = attrs.field(default=60.0, validator=_positive)
    max_nb_sockets: int = attrs.field(default=1024, validator=_positive)
    socket: Path = attrs.field(factory=default_socket_path)
    socket_mode: int = attrs.field(default=0o660, validator=_not_world_writable)
    #: Requests waiting for budget (retries included) beyond which new ones get ``overloaded`` at once.
    max_queued: int = attrs.field(default=200_000, validator=_positive)
    #: Bytes of request bodies those requests may hold in all, beyond which new ones get ``overloaded``: a
    #: bound on the memory they take whatever their size (a lone request always fits).
    max_queued_bytes: int = attrs.field(default=1024**3, validator=[_positive, _room_for_the_largest_request])
    max_frame_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=v.ge(1024))
    #: Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled.
    grace_period: float = attrs.field(default=30.0, validator=v.ge(0))
    #: Upstream attempts per request (first try included) unless the request says otherwise. Attempts
    #: answered with a retryable 429 do not count: they wait for budget, bounded by the deadline.
    max_attempts: int = attrs.field(default=6, validator=_positive)
    #: Seconds from acceptance after which a request that names no deadline is answered ``timeout``. It is
    #: what ends a request the upstream keeps answering 429; an hour covers a long queue of a busy key.
    default_deadline: float = attrs.field(default=3600.0, validator=_positive)
    ledger_mode: Literal["bucket", "period"] = "bucket"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    models: dict[str, LaneLimits] = attrs.field(factory=dict)
    #: ``[tenants.NAME]`` tables: who gets which priority class, weight and caps (docs/tenants.md).
    tenants: dict[str, TenantConfig] = attrs.field(factory=dict, validator=_valid_tenants)
    #: ``[prices.MODEL]`` tables: what a million input and output tokens cost, for each tenant's cost.
    prices: dict[str, PriceConfig] = attrs.field(factory=dict)
    #: Client uids / gids (primary or supplementary) allowed to connect, checked with SO_PEERCRED. Both empty:
    #: anyone who can open the socket file, whose permissions are then the only access control.
    allowed_uids: list[int] = attrs.field(factory=list, validator=v.deep_iterable(v.ge(0)))
    allowed_gids: list[int] = attrs.field(factory=list, validator=v.deep_iterable(v.ge(0)))
    #: The OpenAI-compatible HTTP front on a Unix socket (same mode and directory rules as ``socket``).
    http_unix: bool = True
    #: Its path; None: ``<socket>.http`` beside the msgpack socket.
    http_socket: Path | None = None
    #: A loopback ``HOST:PORT`` for the HTTP front over TCP; empty: no port is opened. Needs ``http_keys_file``.
    http: str = attrs.field(default="", validator=_loopback_address)
    #: TOML file of client keys for the HTTP front over TCP (``[keys] name = "key"``); never world-readable.
    http_keys_file: Path | None = None
    #: Where the budget is kept: ``local`` (this process), or a Redis URL that every engine on the key shares
    #: (docs/ledger.md, "Shared budget"). The password never goes in the URL.
    budget: str = attrs.field(default="local", validator=_budget_location)
    #: A file holding the Redis password (or the environment's TRIO_MAPPER_BUDGET_PASSWORD).
    budget_password_file: Path | None = None
    #: Prefix of the shared budget's keys, so several deployments can share one Redis.
    budget_namespace: str = attrs.field(default="trio-mapper", validator=v.matches_re(r"[A-Za-z0-9_.\-]{1,64}"))
    #: Without Redis: ``wait`` (send nothing until it is back) or ``local-share`` (limits ÷ engines seen).
    budget_failure: Literal["wait", "local-share"] = "wait"
    #: Seconds one Redis call may take before the failure policy applies.
    budget_timeout: float = attrs.field(default=0.5, validator=_positive)

    @property
    def http_socket_path(self) -> Path | None:
        """Where the HTTP front's Unix socket goes, or None when it is turned off."""
        if not self.http_unix:
            return None
        return self.http_socket if self.http_socket is not None else self.socket.with_name(self.socket.name + ".http")


@attrs.frozen
class Settings:
    openai: OpenAISettings
    server: ServerSettings


def _strict_bool(value: Any, _: type) -> bool:
    # cattrs would call bool("false") and get True; environment values need real parsing.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _strict_int(value: Any, _: type) -> int:
    # int(3.7) would silently truncate and int(True) is 1; accept only integers or integer strings.
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text, 0) if text.lower().startswith(("0o", "0x")) else int(text)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(Path, lambda value, _: Path(os.path.expanduser(str(value))))

    def structure_list(value: Any, type_: Any) -> list[Any]:
        # cattrs would iterate a string: names = "alice" would match clients named "a", "l"…, and
        # uids = "1000" would become [1, 0, 0, 0], root included.
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ValueError(f'expected a list such as [1000, 1001] or ["a", "b"], got {value!r}')
        (item_type,) = typing.get_args(type_) or (Any,)
        return [converter.structure(item, item_type) for item in value]

    converter.register_structure_hook_func(lambda type_: typing.get_origin(type_) is list, structure_list)
    return converter


_converter = _make_converter()

_SERVER_FIELDS: Final = frozenset(field.name for field in attrs.fields(ServerSettings))
#: Fields given in the environment as comma-separated lists (TRIO_MAPPER_ALLOWED_UIDS="1000,1001").
_LIST_FIELDS: Final = frozenset({"allowed_uids", "allowed_gids"})
_OPENAI_FIELDS: Final = frozenset(field.name for field in attrs.fields(OpenAISettings))
#: Each section's field types, resolved, to read one layer's value alone (`_same_value`).
_FIELD_TYPES: Final = {"server": typing.get_type_hints(ServerSettings), "openai": typing.get_type_hints(OpenAISettings)}


def _normalize(server: dict[str, Any]) -> None:
    """Values of one layer as the settings read them, so that layers can be compared (`Override`).

    A permission mode written as a string is octal, as for chmod and --socket-mode: "0660" means 0o660 (in
    TOML, 0o660 is the number; "0660" as decimal would be 0o1224). A log level may be written in any case.
    """
    mode = server.get("socket_mode")
    if isinstance(mode, str) and mode.strip().isdigit() and set(mode.strip()) <= set("01234567"):
        server["socket_mode"] = int(mode.strip(), 8)
    if isinstance(server.get("log_level"), str):
        server["log_level"] = server["log_level"].upper()


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file's ``[server]``, ``[openai]``, ``[models.NAME]`` and ``[tenants.NAME]`` tables, as a settings dict.

    The key is never read from the file: keep it in the environment, a ``.env`` file or a systemd credential.
    """
    try:
        raw = tomllib.loads(path.read_text())
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SettingsError([f"config file {path} does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError([f"config file {path} cannot be read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"config file {path} is not valid TOML: {exc}"]) from None
    if mode & stat.S_IWOTH:
        # Whoever may write it decides, at the next reload, who may connect, which tenant gets what and
        # where the key is sent.
        raise SettingsError([f"config file {path} is writable by everyone; chmod o-w {path}"])
    problems = [
        f"config file {path}: unknown table or key {key!r} (expected [server], [openai], [models.NAME], "
        "[tenants.NAME], [prices.MODEL])"
        for key in raw
        if key not in {"server", "openai", "models", "tenants", "prices"}
    ]
    openai_section = dict(raw.get("openai", {}))
    if "api_key" in openai_section:
        problems.append(
            f"config file {path}: openai.api_key is not read from files; "
            f"set {API_KEY_ENV_VAR} in the environment, a .env file or a systemd credential"
        )
        openai_section.pop("api_key")
    if problems:
        raise SettingsError(problems)
    server_section = dict(raw.get("server", {}))
    _normalize(server_section)
    if "models" in raw:
        server_section["models"] = raw["models"]
    for table in ("tenants", "prices"):
        if table in raw:
            server_section[table] = raw[table]
    return {"server": server_section, "openai": openai_section}


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings found in the environment: ``TRIO_MAPPER_<FIELD>`` and the SDK's ``OPENAI_*`` names."""
    server: dict[str, Any] = {
        name: environ[SERVER_ENV_PREFIX + name.upper()]
        for name in _SERVER_FIELDS - {"models", "tenants", "prices"}
        if SERVER_ENV_PREFIX + name.upper() in environ
    }
    for name in _LIST_FIELDS & server.keys():
        server[name] = server[name].replace(",", " ").split()
    _normalize(server)
    openai = {name: environ[var] for name, var in OPENAI_ENV_VARS.items() if environ.get(var)}
    if environ.get("OPENAI_ORGANIZATION") and "organization" not in openai:
        openai["organization"] = environ["OPENAI_ORGANIZATION"]
    return {"server": server, "openai": openai}


def _dotenv_variables(dotenv_dir: Path | None) -> dict[str, str]:
    """The variables of ``.env`` in ``dotenv_dir``, read as a layer below the environment: the key found there
    must not go to a base URL other than the one written beside it (a third-party key sent to api.openai.com)."""
    if dotenv_dir is None or not (dotenv_dir / ".env").is_file():
        return {}
    from dotenv import dotenv_values

    return {name: value for name, value in dotenv_values(dotenv_dir / ".env").items() if value is not None}


def find_api_key(environ: Mapping[str, str], dotenv_dir: Path | None) -> str | None:
    """The key from the environment, else the systemd credential, else ``.env`` in ``dotenv_dir``.

    The environment wins so that an operator can override a credential for one run; under systemd the key is
    normally only in ``$CREDENTIALS_DIRECTORY/openai-api-key`` (LoadCredential=). os.environ is left untouched.
    """
    key = environ.get(API_KEY_ENV_VAR)
    if key:
        return key.strip()
    from trio_mapper.engine.process.systemd import API_KEY_CREDENTIAL, SystemdError, read_credential

    try:
        credential = read_credential(API_KEY_CREDENTIAL, environ)
    except SystemdError as exc:
        raise SettingsError([f"openai.api_key: {exc}"]) from None
    if credential:
        return credential
    if dotenv_dir is not None and (dotenv_dir / ".env").is_file():
        from dotenv import dotenv_values

        value = dotenv_values(dotenv_dir / ".env").get(API_KEY_ENV_VAR)
        if value:
            return value.strip()
    return None


def _merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {"server": {}, "openai": {}}
    for layer in layers:
        for section in ("server", "openai"):
            merged[section].update(layer.get(section, {}))
    return merged


#: A setting's place in `Settings`: attribute names, dict keys, list indices (``("server", "models", "gpt-4o")``).
Place = tuple[str | int, ...]
#: The config file's top-level tables that `read_config_file` moves under ``server``.
_SERVER_TABLES: Final = frozenset({"models", "tenants", "prices"})
#: A TOML bare key; any other key is written quoted.
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def config_path(*place: str | int) -> str:
    """Where a setting is written in the config file, given its place in `Settings`, as TOML spells a dotted
    key: ``server.rpm``, ``models."gpt-4o".rpm`` (the ``[models.NAME]`` tables are under ``server`` in
    `Settings`, at the top of the file), ``tenants.ui.uids[1]``. Messages name it so that the operator can
    search the file for what they wrote."""
    if len(place) > 1 and place[0] == "server" and place[1] in _SERVER_TABLES:
        place = place[1:]
    path = ""
    for step in place:
        if isinstance(step, int):
            path += f"[{step}]"
        else:
            # A JSON string is a valid TOML basic string (same escapes), which quoted keys are.
            key = step if _BARE_KEY.fullmatch(step) else json.dumps(step, ensure_ascii=False)
            path += f".{key}" if path else key
    return path


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s): {', '.join(_with_closest(sorted(exc.extra_fields), _field_names(exc.cl)))}"
    if getattr(type_, "__origin__", None) is Literal:
        choices = ", ".join(repr(choice) for choice in type_.__args__)
        return f"must be one of {choices}"
    if isinstance(exc, ValueError | TypeError) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def _field_names(cls: type) -> list[str]:
    return [field.name for field in attrs.fields(cls)] if attrs.has(cls) else []


def _with_closest(unknown: list[str], known: list[str]) -> list[str]:
    """Each unknown key, with the known one it was probably meant to be: ``rmp (did you mean rpm?)``."""
    named = []
    for key in unknown:
        closest = difflib.get_close_matches(key, known, n=1)
        named.append(f"{key} (did you mean {closest[0]}?)" if closest else key)
    return named


def _readable(exc: Exception) -> list[str]:
    if isinstance(exc, cattrs.BaseValidationError):
        return list(_structure_problems(exc, ()))
    return [str(exc)]


def _structure_problems(exc: BaseException, path: Place, type_: Any = None) -> Iterator[str]:
    """One line per problem in cattrs' tree of errors, led by where the key is in the config file.

    cattrs' own `transform_error` names ``$.server.models['gpt-4o'].rpm``: a place in `Settings`, which is not
    where the operator wrote ``[models."gpt-4o"]``; the tree's notes give the steps, `config_path` the place.
    """
    placed: list[tuple[BaseException, str | int, Any]]
    if isinstance(exc, cattrs.ClassValidationError):
        attributes, unplaced = exc.group_exceptions()
        placed = [(inner, attribute.name, attribute.type) for inner, attribute in attributes]
    elif isinstance(exc, cattrs.IterableValidationError):
        items, unplaced = exc.group_exceptions()
        placed = [(inner, item.index, item.type) for inner, item in items]
    else:
        where = config_path(*path) or "settings"
        if isinstance(exc, KeyError):
            yield f"{where}: required but not set" + _how_to_set(path)
        else:
            yield f"{where}: {_describe(exc, type_)}"
        return
    for inner, step, inner_type in placed:
        yield from _structure_problems(inner, (*path, step), inner_type)
    for inner in unplaced:
        yield from _structure_problems(inner, path)


def _how_to_set(path: Place) -> str:
    if len(path) == 2 and path[0] == "server" and path[1] in _SERVER_FIELDS:
        name = str(path[1])
        env_var = SERVER_ENV_PREFIX + name.upper()
        return f" (use --{name}, {name} = … under [server] in the config file, or {env_var})"
    if path == ("openai", "api_key"):
        return (
            f" (export {API_KEY_ENV_VAR}=…, put it in ./.env or, under systemd, in the credential "
            "openai-api-key; it is never taken from the command line)"
        )
    return ""


@attrs.frozen
class Override:
    """A value of the config file that a later layer replaces: changing it in the file changes nothing."""

    #: Where it is in the file: ``server.rpm``.
    path: str
    #: The layer whose value is in force: ``the command line``, ``TRIO_MAPPER_RPM in the environment``.
    by: str
    #: The value in force.
    value: str

    def __str__(self) -> str:
        return f"{self.path} in the config file has no effect: {self.by} sets it to {self.value}"


@attrs.frozen
class LoadedSettings:
    """The settings, and what the way their layers combine would otherwise hide from the operator."""

    settings: Settings
    #: Config-file values that a later layer (``.env``, the environment, the command line) replaces.
    overridden: tuple[Override, ...] = ()
    #: One line per ``TRIO_MAPPER_*`` variable that no setting reads, with the closest one that does.
    unknown_variables: tuple[str, ...] = ()


def load_settings(
    *,
    cli: Mapping[str, Any],
    config_file: Path | None,
    environ: Mapping[str, str],
    dotenv_dir: Path | None,
) -> Settings:
    """Build the engine's settings from every layer; raises `SettingsError` listing every problem."""
    return read_settings(cli=cli, config_file=config_file, environ=environ, dotenv_dir=dotenv_dir).settings


def read_settings(
    *,
    cli: Mapping[str, Any],
    config_file: Path | None,
    environ: Mapping[str, str],
    dotenv_dir: Path | None,
) -> LoadedSettings:
    """`load_settings`, with the config-file values a later layer overrides and the variables nothing reads.

    Raises:
        SettingsError: one readable line per problem.
    """
    file_layer = read_config_file(config_file) if config_file is not None else {}
    cli_layer = {
        "server": {k: val for k, val in cli.items() if k in _SERVER_FIELDS and val is not None},
        "openai": {k: val for k, val in cli.items() if k in _OPENAI_FIELDS and val is not None},
    }
    _normalize(cli_layer["server"])
    dotenv = _dotenv_variables(dotenv_dir)
    dotenv_file = dotenv_dir / ".env" if dotenv_dir is not None else None
    # The layers above the file, the last applied first, each with how to say that its value won.
    later: list[tuple[dict[str, Any], Callable[[str, str], str]]] = [
        (cli_layer, lambda section, name: "the command line"),
        (read_environment(environ), lambda section, name: f"{_variable(section, name, environ)} in the environment"),
        (read_environment(dotenv), lambda section, name: f"{_variable(section, name, dotenv)} in {dotenv_file}"),
    ]
    merged = _merge(file_layer, *(layer for layer, _ in reversed(later)))
    api_key = find_api_key(environ, dotenv_dir)
    if api_key is not None:
        merged["openai"]["api_key"] = api_key
    unknown = [*_unknown_variables(environ, "in the environment"), *_unknown_variables(dotenv, f"in {dotenv_file}")]
    try:
        settings = _structure(merged)
    except SettingsError as exc:
        # A misspelt variable is often why a setting is missing: its line is the one that says how to fix it.
        raise SettingsError([*exc.problems, *unknown]) from None
    return LoadedSettings(settings, tuple(_overrides(settings, file_layer, later)), tuple(unknown))


def _overrides(
    settings: Settings, file_layer: Mapping[str, Any], later: list[tuple[dict[str, Any], Callable[[str, str], str]]]
) -> Iterator[Override]:
    """The file's values that a later layer replaced with a different one."""
    for section in ("server", "openai"):
        for name, written in file_layer.get(section, {}).items():
            winner = next(((layer, by) for layer, by in later if name in layer.get(section, {})), None)
            if winner is None or _same_value(section, name, written, winner[0][section][name]):
                continue
            value = getattr(getattr(settings, section), name)
            yield Override(config_path(section, name), winner[1](section, name), _shown(name, value))


def _shown(name: str, value: Any) -> str:
    """A setting's value as an operator writes it: strings quoted, a permission mode in octal (0660, not 432)."""
    if name == "socket_mode":
        return f"{value:04o}"
    return repr(value) if isinstance(value, str) else str(value)


def _variable(section: str, name: str, variables: Mapping[str, str]) -> str:
    """The environment variable `read_environment` took a setting from."""
    if section == "server":
        return SERVER_ENV_PREFIX + name.upper()
    variable = OPENAI_ENV_VARS[name]
    return variable if variables.get(variable) else "OPENAI_ORGANIZATION"


def _same_value(section: str, name: str, first: Any, second: Any) -> bool:
    """Whether two layers' values of a setting are the same once read: 5000 and "5000" are."""
    if first == second:
        return True
    type_ = _FIELD_TYPES[section].get(name, Any)
    try:
        return bool(_converter.structure(first, type_) == _converter.structure(second, type_))
    except Exception:
        return False


#: ``TRIO_MAPPER_*`` variables that are not settings and yet are meant: the shared budget's Redis password
#: (`budget_password`), and the switches the project's CI exports for its test suite (.ci/run), which an engine
#: started from such a shell sees too. (``TRIO_MAPPER_SOCKET``, which the clients read, is the ``socket`` setting.)
_OTHER_VARIABLES: Final = frozenset(
    {BUDGET_PASSWORD_ENV_VAR, "TRIO_MAPPER_REQUIRE_REDIS", "TRIO_MAPPER_REQUIRE_BROWSER"}
)


def _unknown_variables(variables: Mapping[str, str], where: str) -> Iterator[str]:
    """A line for each ``TRIO_MAPPER_*`` variable that nothing reads. A typo (TRIO_MAPPER_RMP) was ignored
    without a word, and the engine ran without the setting its operator thought they gave. Names only: the
    value may be a secret."""
    suffixes = {
        variable.removeprefix(SERVER_ENV_PREFIX): variable
        for variable in {SERVER_ENV_PREFIX + name.upper() for name in _SERVER_FIELDS - _SERVER_TABLES}
        | _OTHER_VARIABLES
    }
    for variable in sorted(variables):
        suffix = variable.removeprefix(SERVER_ENV_PREFIX)
        if not variable.startswith(SERVER_ENV_PREFIX) or suffix in suffixes:
            continue
        if suffix.lower() in _SERVER_TABLES:
            yield f"{variable} {where} is ignored: [{suffix.lower()}.NAME] tables are read from the config file only"
            continue
        if suffix.lower() in OPENAI_ENV_VARS:  # --base-url's variable is the SDK's, not TRIO_MAPPER_BASE_URL
            name = suffix.lower()
            yield (
                f"{variable} {where} is ignored: the engine reads {OPENAI_ENV_VARS[name]} for {name}, "
                "as the openai SDK does"
            )
            continue
        # Against the part after the prefix: every name shares the prefix, which would make any name look close.
        guesses = difflib.get_close_matches(suffix, suffixes, n=1)
        hint = (
            f"did you mean {suffixes[guesses[0]]}?"
            if guesses
            else f"the engine reads {SERVER_ENV_PREFIX}<OPTION> for each option, e.g. {SERVER_ENV_PREFIX}RPM for --rpm"
        )
        yield f"{variable} {where} is not a setting of the engine and is ignored; {hint}"


def _structure(merged: dict[str, Any]) -> Settings:
    """The merged layers as `Settings`.

    Raises:
        SettingsError: every problem found, one line each.
    """
    try:
        # Validators run afterwards, field by field, so that every bad value is reported, not the first.
        with attrs.validators.disabled():
            settings = _converter.structure(merged, Settings)
    except Exception as exc:
        raise SettingsError(_readable(exc)) from None
    problems = list(_validation_problems(settings, ()))
    if settings.server.http and settings.server.http_keys_file is None:
        problems.append("server.http: the HTTP front over TCP needs client keys; set http_keys_file (see docs/http.md)")
    if settings.server.http and _is_own_front(settings.openai.base_url, settings.server.http):
        problems.append(
            f"openai.base_url: {settings.openai.base_url} is this engine's own HTTP front (server.http "
            f"{settings.server.http}): every request would call the engine again. Point it at the real API; "
            "OPENAI_BASE_URL is read by the engine too, so give it to your tools, not to the engine's environment"
        )
    if settings.server.budget != "local" and settings.server.ledger_mode != "bucket":
        problems.append(
            "server.budget: the shared budget meters continuously; use ledger_mode 'bucket' (the default) with it"
        )
    if problems:
        raise SettingsError(problems)
    return settings


def _is_own_front(base_url: str, http: str) -> bool:
    """Whether the upstream URL is the engine's own loopback HTTP front (any loopback name, same port)."""
    try:
        url = urlsplit(base_url)
        _, port = parse_loopback_address(http)
        upstream_port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return False
    hostname = url.hostname or ""
    try:
        loopback = hostname == "localhost" or ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        loopback = False
    return loopback and upstream_port == port


def environment_budget_password(environ: Mapping[str, str], dotenv_dir: Path | None) -> str | None:
    """``TRIO_MAPPER_BUDGET_PASSWORD`` from the environment, else from ``.env`` in ``dotenv_dir`` (where the
    key may be too); None if neither has it."""
    return environ.get(BUDGET_PASSWORD_ENV_VAR) or _dotenv_variables(dotenv_dir).get(BUDGET_PASSWORD_ENV_VAR) or None


def budget_password(server: ServerSettings, environ: Mapping[str, str], dotenv_dir: Path | None = None) -> str | None:
    """The shared budget's Redis password: from ``budget_password_file``, else the environment or ``.env``
    (`environment_budget_password`); None if none has it."""
    if server.budget_password_file is not None:
        try:
            return server.budget_password_file.read_text().strip() or None
        except OSError as exc:
            # Not quoted (an OSError's text quotes it): the password itself given in place of its file's path is
            # a likely slip, and this message goes to stderr, the journal, readable by more than the engine.
            reason = exc.strerror or type(exc).__name__
            problem = (
                f"server.budget_password_file: cannot be read: {reason} (the path is not shown: it may be the password)"
            )
            raise SettingsError([problem]) from None
        except UnicodeDecodeError as exc:
            raise SettingsError([f"server.budget_password_file: cannot be read: {exc}"]) from None
    return environment_budget_password(environ, dotenv_dir)


def _validation_problems(instance: Any, path: Place) -> Iterator[str]:
    for field in attrs.fields(type(instance)):
        value = getattr(instance, field.name)
        where = (*path, field.name)
        if field.validator is not None:
            try:
                field.validator(instance, field, value)
            except (ValueError, TypeError) as exc:
                yield f"{config_path(*where)}: {exc}"
        if attrs.has(type(value)):
            yield from _validation_problems(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                if attrs.has(type(item)):
                    yield from _validation_problems(item, (*where, key))
