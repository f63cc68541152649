"""`TcpGate` alone, on real socket pairs and Trio's clock: who keeps a connection to the TCP port."""

from __future__ import annotations

import trio
import trio.testing

from trio_mapper.engine.fronts.http.tcp_gate import FIRST_REQUEST_TIMEOUT, TcpGate


def connection() -> tuple[trio.SocketStream, trio.socket.SocketType]:
    """The engine's end of a connection, and the client's."""
    engine, client = trio.socket.socketpair()
    return trio.SocketStream(engine), client


async def closed_by_engine(client: trio.socket.SocketType) -> bool:
    """Whether the engine closed its end (the client reads the end of the stream)."""
    with trio.move_on_after(0.001):
        return await client.recv(1) == b""
    return False


async def test_a_connection_that_shows_no_key_is_closed_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = TcpGate(limit=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.close_expired)
        keyless, keyless_client = connection()
        keyed, keyed_client = connection()
        gate.admit(keyless)
        keyed_slot = gate.admit(keyed)
        assert keyed_slot is not None
        gate.prove(keyed_slot)
        await trio.sleep(FIRST_REQUEST_TIMEOUT - 1)
        assert not await closed_by_engine(keyless_client)
        await trio.sleep(1)
        assert await closed_by_engine(keyless_client)
        assert gate.open == 1
        await trio.sleep(1000)
        assert not await closed_by_engine(keyed_client)
        nursery.cancel_scope.cancel()


async def test_a_full_port_closes_the_oldest_keyless_connection_never_a_keyed_one() -> None:
    gate = TcpGate(limit=3)
    keyed, keyed_client = connection()
    keyed_slot = gate.admit(keyed)
    assert keyed_slot is not None
    gate.prove(keyed_slot)
    first, first_client = connection()
    second, second_client = connection()
    assert gate.admit(first) is not None
    assert gate.admit(second) is not None

    newcomer, _ = connection()
    newcomer_slot = gate.admit(newcomer)
    assert newcomer_slot is not None
    assert await closed_by_engine(first_client)
    assert not await closed_by_engine(second_client)
    assert not await closed_by_engine(keyed_client)
    assert gate.open == 3


async def test_a_port_full_of_keyed_connections_refuses_newcomers() -> None:
    gate = TcpGate(limit=2)
    for _ in range(2):
        stream, _ = connection()
        slot = gate.admit(stream)
        assert slot is not None
        gate.prove(slot)
    late, _ = connection()
    assert gate.admit(late) is None
    assert gate.open == 2


async def test_a_connection_closed_to_make_room_is_counted_once() -> None:
    """Its task ends later and releases its slot again: that must not free a second place."""
    gate = TcpGate(limit=1)
    first, _ = connection()
    first_slot = gate.admit(first)
    second, _ = connection()
    second_slot = gate.admit(second)
    assert first_slot is not None and second_slot is not None
    gate.release(first_slot)  # the first connection's task ending
    assert gate.open == 1
    gate.release(second_slot)
    assert gate.open == 0
