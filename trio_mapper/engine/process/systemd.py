"""The engine's side of systemd: socket activation, sd_notify, the watchdog and credentials.

No libsystemd binding is needed: each of these is a documented environment-variable contract
(sd_listen_fds(3), sd_notify(3), systemd.exec(5) "Credentials"), a few lines each. Without systemd none of the
variables is set and every function here is a no-op.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Final

import attrs

log = logging.getLogger("trio_mapper.systemd")

#: The first fd systemd passes (sd_listen_fds(3): SD_LISTEN_FDS_START); 0-2 are stdio.
SD_LISTEN_FDS_START: Final = 3
#: The name the engine's socket unit gives its socket (FileDescriptorName=engine in trio-mapper.socket).
ENGINE_FD_NAME: Final = "engine"
#: The name the HTTP front's socket unit gives its socket (FileDescriptorName=http in trio-mapper-http.socket).
HTTP_FD_NAME: Final = "http"
#: The credential holding the API key (LoadCredential=openai-api-key:/etc/trio-mapper/openai-api-key).
API_KEY_CREDENTIAL: Final = "openai-api-key"
#: A credential larger than this is not an API key (keys are ~200 bytes); refuse rather than read a huge file.
MAX_CREDENTIAL_BYTES: Final = 64 * 1024

_LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_WATCHDOG_VARIABLES: Final = ("WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdError(Exception):
    """What systemd handed over is unusable; the message says what and what to do."""


# --- socket activation -------------------------------------------------------------------------------------


def listen_fds(environ: MutableMapping[str, str]) -> dict[int, str]:
    """The fds systemd passed to this process, by number, with their FileDescriptorName (sd_listen_fds).

    The variables are trusted only when ``LISTEN_PID`` is our pid: otherwise they were meant for a parent
    (a shell that exec'd us keeps the pid, a fork does not) and the fds are not ours to touch. They are
    removed from ``environ`` in every case so that no child process inherits them.

    Raises:
        SystemdError: ``LISTEN_FDS`` is present for us but is not a usable count.
    """
    values = {name: environ.pop(name, None) for name in _LISTEN_VARIABLES}
    pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if count is None:
        return {}
    if pid is None or not pid.strip().isdigit() or int(pid) != os.getpid():
        log.debug("ignoring LISTEN_FDS=%s: LISTEN_PID=%s is not our pid %d", count, pid, os.getpid())
        return {}
    try:
        number = int(count)
    except ValueError:
        raise SystemdError(f"LISTEN_FDS={count!r} is not a number of file descriptors") from None
    if not 0 <= number <= 1024:
        raise SystemdError(f"LISTEN_FDS={count!r} is out of range")
    labels = names.split(":") if names else []
    fds: dict[int, str] = {}
    for index in range(number):
        fd = SD_LISTEN_FDS_START + index
        # As sd_listen_fds does: the fds must not leak into anything we might exec.
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise SystemdError(f"LISTEN_FDS={number} but fd {fd} is not open: {exc.strerror}") from None
        fds[fd] = labels[index] if index < len(labels) else "unknown"
    return fds


def _describe_fd(fd: int, name: str) -> str:
    return f"fd {fd} (named {name!r})"


@attrs.frozen
class ListeningSockets:
    """The listening sockets systemd passed, by role; a role systemd passed no socket for is None.

    ``engine`` is None only when systemd passed nothing at all: a hand-over without the msgpack socket is refused.
    """

    #: The msgpack socket: the fd named ``engine`` (FileDescriptorName=engine), or the only one not named ``http``.
    engine: socket.socket | None = None
    #: The HTTP front's Unix socket: the fd named ``http`` (FileDescriptorName=http), if any.
    http: socket.socket | None = None


def take_listening_sockets(environ: MutableMapping[str, str]) -> ListeningSockets:
    """The listening Unix stream sockets systemd passed, by role (see `listening_sockets`); none without systemd.

    Raises:
        SystemdError: what systemd passed cannot be used as it is; the message says what to change.
    """
    return listening_sockets(listen_fds(environ))


def listening_sockets(fds: Mapping[int, str]) -> ListeningSockets:
    """Sort the passed fds (``listen_fds``) into the msgpack socket and the HTTP socket.

    The fd named ``http`` is the HTTP front's socket. The msgpack socket is the fd named ``engine`` or, when
    none is, the only fd not named ``http``, whatever its name (a unit without FileDescriptorName=). Each
    is checked (AF_UNIX, SOCK_STREAM, listening) because a misconfigured unit (ListenDatagram=, a TCP port,
    Accept=yes) would otherwise fail later in confusing ways. Fds that are not used are closed with a warning.

    The fds are this function's from the call on: each one ends up in the result or closed, also when it
    raises, so an engine that refuses to start leaves nothing open behind.

    Raises:
        SystemdError: two fds are named ``http``; none or several could be the msgpack socket; a chosen fd
            is not a listening Unix stream socket.
    """
    if not fds:
        return ListeningSockets()
    try:
        chosen = _assign_roles(fds)
    except SystemdError:
        for fd in fds:
            _close_quietly(fd)
        raise
    for fd, name in fds.items():
        if fd not in chosen.values():
            log.warning("closing %s passed by systemd: not used", _describe_fd(fd, name))
            _close_quietly(fd)
    roles = list(chosen.items())
    checked: dict[str, socket.socket] = {}
    for index, (role, fd) in enumerate(roles):
        try:
            checked[role] = _listening_unix_socket(fd, fds[fd], role)
        except BaseException:
            # This fd was closed by the check; close what was checked before it and what was not reached yet.
            for sock in checked.values():
                sock.close()
            for _, later in roles[index + 1 :]:
                _close_quietly(later)
            raise
    return ListeningSockets(engine=checked.get(ENGINE_FD_NAME), http=checked.get(HTTP_FD_NAME))


def _assign_roles(fds: Mapping[int, str]) -> dict[str, int]:
    """Which fd serves which role: ``{"engine": fd}``, plus ``"http": fd`` when one is named so."""
    listing = ", ".join(_describe_fd(fd, name) for fd, name in fds.items())
    http = [fd for fd, name in fds.items() if name == HTTP_FD_NAME]
    if len(http) > 1:
        raise SystemdError(
            f"systemd passed {len(http)} sockets named {HTTP_FD_NAME!r} ({listing}); the engine serves one HTTP "
            f"Unix socket: keep FileDescriptorName={HTTP_FD_NAME} on one socket unit only"
        )
    others = {fd: name for fd, name in fds.items() if name != HTTP_FD_NAME}
    named = [fd for fd, name in others.items() if name == ENGINE_FD_NAME]
    if len(named) == 1:
        engine = named[0]
    elif not named and len(others) == 1:
        engine = next(iter(others))
    elif not others:
        raise SystemdError(
            f"systemd passed only the HTTP socket ({listing}), not the engine's msgpack socket; list the socket "
            f"unit with FileDescriptorName={ENGINE_FD_NAME} (trio-mapper.socket) in the service's Sockets= too"
        )
    else:
        raise SystemdError(
            f"systemd passed {len(fds)} sockets ({listing}) and not exactly one is named {ENGINE_FD_NAME!r}; "
            f"set FileDescriptorName={ENGINE_FD_NAME} in the msgpack socket's unit "
            f"(and FileDescriptorName={HTTP_FD_NAME} in the HTTP socket's)"
        )
    return {ENGINE_FD_NAME: engine} | ({HTTP_FD_NAME: http[0]} if http else {})


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        log.debug("closing fd %d passed by systemd: %s", fd, exc.strerror)


def _listening_unix_socket(fd: int, name: str, role: str) -> socket.socket:
    """``fd`` as a socket, checked to be a listening AF_UNIX SOCK_STREAM one; closed if it is not."""
    what = f"fd {fd} (named {name!r}, the {'HTTP' if role == HTTP_FD_NAME else 'msgpack'} socket)"
    try:
        # socket(fileno=...) asks the kernel for family and type rather than trusting the arguments.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        _close_quietly(fd)
        raise SystemdError(f"{what} passed by systemd is not a socket: {exc.strerror}") from None
    try:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
            advice = "ListenStream=/path (AF_UNIX SOCK_STREAM)"
            if role == HTTP_FD_NAME:
                advice += '; for a loopback TCP port use the engine\'s own http = "127.0.0.1:PORT" instead'
            raise SystemdError(
                f"{what} passed by systemd is a {_enum_name(socket.AddressFamily, family)} "
                f"{_enum_name(socket.SocketKind, kind)} socket; the engine needs {advice}"
            )
        if not listening:
            raise SystemdError(
                f"{what} passed by systemd is not listening (Accept=yes passes connections); "
                "use Accept=no in the socket unit"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def _enum_name(kind: type[socket.AddressFamily] | type[socket.SocketKind], value: int) -> str:
    try:
        return kind(value).name
    except ValueError:
        return str(value)


def socket_path(sock: socket.socket) -> str:
    """The path a Unix socket is bound to, for logs; abstract names are shown with a leading '@'."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not name:
        return "(unnamed)"
    return "@" + name[1:] if name.startswith("\0") else name


# --- sd_notify ---------------------------------------------------------------------------------------------


def _notify_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace, as systemd spells it
    if value.startswith("/"):
        return value
    return None  # e.g. systemd >= 254's "vsock:CID:PORT", for VMs: not supported here


class Notifier:
    """Sends sd_notify messages to systemd; does nothing when there is no ``NOTIFY_SOCKET``.

    Sends are non-blocking datagrams, so they never stall the event loop: if systemd's queue were full, the
    message is dropped and logged, which is the better failure for a rate-limit engine than waiting.
    """

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._socket: socket.socket | None = None
        self._failed_once = False
        if address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str]) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, which is removed from ``environ`` so children do not inherit it."""
        value = environ.pop("NOTIFY_SOCKET", None)
        if not value:
            return cls(None)
        address = _notify_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%s is not a Unix socket address; systemd notifications are off", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if it was sent (always False without systemd)."""
        if self._socket is None or self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            # Systemd gone (ECONNREFUSED, ENOENT) or its queue full (EAGAIN): nothing to do but say so, once
            # loudly (READY=1 lost means systemd will time the start out) and then quietly.
            level = logging.DEBUG if self._failed_once else logging.WARNING
            self._failed_once = True
            log.log(level, "sd_notify %s failed: %s", fields[0].split("=")[0], os.strerror(exc.errno or errno.EIO))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={one_line(status)}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={one_line(status)}")

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) wants the CLOCK_MONOTONIC time with RELOADING=1; older
        # versions ignore the extra field.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={one_line(status)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def one_line(text: str) -> str:
    """STATUS= must be one line: a newline would start a new field in the datagram."""
    return " ".join(text.split())


def watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises).

    None when the watchdog is off or meant for another process (``WATCHDOG_PID`` set and not ours). The
    variables are removed from ``environ``.
    """
    usec, pid = (environ.pop(name, None) for name in _WATCHDOG_VARIABLES)
    if not usec:
        return None
    if pid is not None and (not pid.strip().isdigit() or int(pid) != os.getpid()):
        log.debug("ignoring WATCHDOG_USEC=%s: WATCHDOG_PID=%s is not our pid %d", usec, pid, os.getpid())
        return None
    try:
        microseconds = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    if microseconds <= 0:
        return None
    return microseconds / 2 / 1_000_000


# --- credentials -------------------------------------------------------------------------------------------


def read_credential(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The stripped content of ``$CREDENTIALS_DIRECTORY/<name>``, or None when there is no such credential.

    Raises:
        SystemdError: the credential exists but cannot be read or is not text; the message never contains
            the credential's content.
    """
    directory = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CREDENTIAL_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SystemdError(f"credential {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_CREDENTIAL_BYTES:
        raise SystemdError(f"credential {path} is larger than {MAX_CREDENTIAL_BYTES} bytes; is it the right file?")
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        raise SystemdError(f"credential {path} is not UTF-8 text") from None
    return text or None
