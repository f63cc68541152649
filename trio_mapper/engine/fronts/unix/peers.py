"""Who is on the other end of a client connection (SO_PEERCRED), and the optional uid/gid allow-list."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Collection
from typing import Final

import attrs
import trio

from trio_mapper.kinds import ErrorKind
from trio_mapper.wire import Error, engine_codec

log = logging.getLogger("trio_mapper.peers")

#: struct ucred: pid_t pid, uid_t uid, gid_t gid (three C ints on Linux).
_UCRED: Final = struct.Struct("3i")
#: Linux's SO_PEERGROUPS (since 4.13): the peer's supplementary groups at connect time. Python has no name
#: for it; without it a client whose only link to an allowed group is a supplementary group would be refused.
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
#: gid_t is 4 bytes; first try room for 256 groups, then the kernel's NGROUPS_MAX.
_GROUPS_SMALL: Final = 256
_GROUPS_MAX: Final = 65536
#: How long a refused client gets to send its hello (and so be able to read the refusal) before we close.
REFUSAL_LINGER: Final = 2.0


@attrs.frozen
class PeerCredentials:
    """The client process as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int
    #: Primary and supplementary gids (supplementary only where SO_PEERGROUPS works).
    groups: frozenset[int]

    @property
    def label(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


def _supplementary_groups(sock: trio.socket.SocketType) -> frozenset[int]:
    for count in (_GROUPS_SMALL, _GROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return frozenset()  # kernel too old or not a Unix socket: primary gid only
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return frozenset()


def peer_credentials(sock: trio.socket.SocketType) -> PeerCredentials | None:
    """The connected peer's pid/uid/gid and groups; None when the kernel cannot tell (not AF_UNIX)."""
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=frozenset({gid}) | _supplementary_groups(sock))


def is_allowed(peer: PeerCredentials | None, uids: Collection[int], gids: Collection[int]) -> bool:
    """Empty lists allow anyone who can open the socket; otherwise the uid or any of the groups must match."""
    if not uids and not gids:
        return True
    if peer is None:
        return False
    return peer.uid in uids or not peer.groups.isdisjoint(gids)


def refusal_message(peer: PeerCredentials | None) -> str:
    who = f"uid {peer.uid} (gid {peer.gid})" if peer is not None else "a client whose credentials are unknown"
    return (
        f"{who} is not allowed to use this engine: it is not in the engine's allowed_uids/allowed_gids. "
        "Ask the operator to add it to allowed_uids or allowed_gids in the engine's config"
    )


async def refuse(stream: trio.SocketStream, message: str) -> None:
    """Send a ``forbidden`` error frame, give the client a moment to send its hello, then close.

    Closing at once would make a client that is still writing its hello see EPIPE instead of the reason.
    """
    frame = engine_codec().encode(Error(id=None, kind=ErrorKind.FORBIDDEN, message=message))
    try:
        with trio.move_on_after(REFUSAL_LINGER):
            await stream.send_all(frame)
            await stream.receive_some(4096)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()
