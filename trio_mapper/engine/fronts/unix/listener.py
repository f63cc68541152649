"""The engine's Unix-domain listening socket: created safely, refused when another engine owns it; and the
accept loop every listener of the engine runs (`accept_forever`), Unix or TCP, msgpack or HTTP.

Trio has no Unix listener of its own, so this builds one the way `trio.open_tcp_listeners` does: create,
bind, listen, wrap in `trio.SocketListener`, close on error.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket as stdlib_socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import trio

from trio_mapper.engine.fronts.throttle import LogThrottle

log = logging.getLogger("trio_mapper.engine")

#: The kernel's limit for sun_path, minus the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
#: Connections the kernel holds before `accept`: clients of a busy engine should wait, not see ECONNREFUSED.
BACKLOG: Final = 1024


class ListenerError(Exception):
    """The socket cannot be created; the message says why and what to do."""


@attrs.define
class OwnedSocketFile:
    """The socket file this engine created, identified by inode so we never unlink someone else's.

    It also holds the lock that keeps a second engine from taking over the path while this one lives.
    """

    path: Path
    device: int
    inode: int
    lock_fd: int | None = None

    def remove(self) -> None:
        """Unlink the socket if it is still ours, and release the lock. Safe to call twice."""
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if (current.st_dev, current.st_ino) == (self.device, self.inode):
                self.path.unlink(missing_ok=True)
        if self.lock_fd is not None:
            # The lock file stays (empty, 0600, reused by the next engine): unlinking it would race with an
            # engine that has just opened it and is about to lock it, which would then hold a lock on a file
            # no longer at the path while another engine creates and locks a new one.
            os.close(self.lock_fd)
            self.lock_fd = None


def _not_permitted_in(directory: Path, option: str) -> str:
    """What to say when the engine's user may not create or look up files in the socket's directory."""
    try:
        info = os.stat(directory)
        owner = f" (owner uid {info.st_uid}, group {info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o})"
    except OSError:
        owner = ""
    return (
        f"permission denied in the socket's directory {directory}{owner}; the engine runs as uid {os.geteuid()}. "
        "Give that directory to the engine's user (a directory left by an engine run as root, say), or choose "
        f"another {option}"
    )


def _lock_path(path: Path, option: str) -> int:
    """Hold an exclusive lock beside the socket for the engine's life: two engines started at the same
    moment would otherwise both find the path free and both rename their socket into place."""
    lock_file = path.with_name(f".{path.name}.lock")
    try:
        # Not through a symlink someone planted (a sticky /tmp lets others create names beside ours).
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except PermissionError:
        raise ListenerError(_not_permitted_in(path.parent, option)) from None
    except OSError as exc:
        raise ListenerError(
            f"cannot open the lock file {lock_file}: {exc.strerror}; remove it if it is a symlink, or choose "
            f"another {option}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ListenerError(
            f"another engine is starting or running on {path}; stop it first or choose another {option}"
        ) from None
    return fd


async def _someone_listens(path: Path) -> bool:
    probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(2):
                await probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except trio.TooSlowError:
            # Something holds the path and accepts nothing: treat it as alive rather than steal it.
            return True
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
    return True


def _prepare_parent(path: Path, socket_mode: int, option: str) -> None:
    parent = path.parent
    if not parent.exists():
        # Clients need to traverse the directory only if the socket grants them access through its group.
        directory_mode = 0o750 if socket_mode & 0o070 else 0o700
        try:
            parent.mkdir(mode=directory_mode, parents=True, exist_ok=True)
        except OSError as exc:
            raise ListenerError(
                f"cannot create the socket's directory {parent}: {exc.strerror}; create it or choose another {option}"
            ) from None
    info = os.lstat(parent)
    if not stat.S_ISDIR(info.st_mode):
        raise ListenerError(f"{parent} is not a directory (or is a symlink); choose another {option}")
    # Whoever can write to the directory can swap the socket for their own and read every client's
    # requests. The sticky bit (/tmp) stops others from renaming or removing what we own; without it the
    # directory must be closed to writers other than its owner, group members included. And the owner may
    # rename anything in their directory, sticky bit or not: it must be us, or root.
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        who = "world-writable" if info.st_mode & 0o002 else "group-writable"
        raise ListenerError(
            f"{parent} is {who} without the sticky bit; choose a {option} in a directory only you can write"
        )
    if info.st_uid not in (os.geteuid(), 0):
        raise ListenerError(
            f"{parent} belongs to uid {info.st_uid}, not to this engine (uid {os.geteuid()}); "
            f"another user could replace the socket. Choose another {option}"
        )


def _check_path(path: Path, mode: int, option: str) -> tuple[Path, bool]:
    """The absolute path, and whether a socket already exists there (alive or stale)."""
    path = Path(os.path.abspath(path))
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ListenerError(
            f"socket path {path} is longer than the {MAX_SOCKET_PATH_BYTES} bytes Unix allows; "
            f"choose a shorter {option}"
        )
    _prepare_parent(path, mode, option)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return path, False
    except PermissionError:
        raise ListenerError(_not_permitted_in(path.parent, option)) from None
    if not stat.S_ISSOCK(existing.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; remove it or choose another {option}")
    return path, True


async def open_unix_listener(
    path: Path, *, mode: int, option: str = "--socket"
) -> tuple[trio.SocketListener, OwnedSocketFile]:
    """Listen on ``path`` with permission ``mode``, replacing a stale socket left by a crash.

    The socket is bound under a temporary name, given its mode, then renamed into place, so there is no
    moment where the final path exists with the process umask's permissions.

    Args:
        option: the command-line option that chose ``path``, which the errors tell the operator to change.

    Raises:
        ListenerError: the path is too long, is not a socket, or another process is listening on it.
    """
    path, stale_candidate = _check_path(path, mode, option)
    lock_fd = _lock_path(path, option)
    try:
        listener, created = await _bind(path, mode, stale_candidate, option)
    except BaseException:
        os.close(lock_fd)
        raise
    return listener, OwnedSocketFile(path, created.st_dev, created.st_ino, lock_fd)


async def _bind(
    path: Path, mode: int, stale_candidate: bool, option: str
) -> tuple[trio.SocketListener, os.stat_result]:
    try:
        someone_listens = stale_candidate and await _someone_listens(path)
    except OSError as exc:
        raise ListenerError(f"cannot tell whether an engine listens on {path}: {exc}") from None
    if someone_listens:
        raise ListenerError(f"another engine is already listening on {path}; stop it first or choose another {option}")

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        # The umask gives the socket its mode at creation, with no window in which it is more open (and
        # no chmod that could follow a symlink swapped in). Start-up is single-threaded, so the
        # process-wide umask is safe to change for this one call.
        previous_umask = os.umask(0o777 & ~mode)
        try:
            await sock.bind(os.fspath(temporary))
        finally:
            os.umask(previous_umask)
        sock.listen(BACKLOG)
        os.replace(temporary, path)
        created = os.lstat(path)
    except BaseException as exc:
        # Cancelled too (a signal during start-up): no half-made socket or temporary file may stay behind.
        sock.close()
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ListenerError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        raise
    return trio.SocketListener(sock), created


#: accept() errors that mean "out of resources right now", not "the listener is broken" (as in trio).
_ACCEPT_CAPACITY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: How long to wait before accepting again after such an error.
ACCEPT_RETRY_SLEEP: Final = 0.1


async def accept_forever(
    listener: trio.SocketListener, serve: Callable[[trio.SocketStream], object], what: str
) -> None:
    """Accept connections for ever, handing each to ``serve`` (which starts the task that serves it).

    Running out of file descriptors or memory is waited out, not fatal: the clients already connected are
    served, and new ones are accepted once some have gone. It is logged once per `LOG_INTERVAL`, with
    how often it happened, rather than at every retry.
    """
    failures = LogThrottle()  # the errors repeat at every retry
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            if (count := failures.count()) is not None:
                log.error(
                    "%s: cannot accept connections (%s; %d time(s) since the last report); retrying every %.1fs. "
                    "Raise the engine's open-file limit (LimitNOFILE) if clients need more connections",
                    what,
                    os.strerror(exc.errno or 0),
                    count,
                    ACCEPT_RETRY_SLEEP,
                )
            await trio.sleep(ACCEPT_RETRY_SLEEP)
            continue
        serve(stream)
