"""Our stream classes keep trio's stream contract (trio.testing's generic checks).

RawSocketStream, TLSStream and MuxStream each drop some of what trio's own
classes do, for speed; these checks hold them to what every caller of a trio
stream relies on: ordering, EOF and half-close, closed and busy errors, and
cancellation that loses nothing.
"""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trio
import trio.testing

from tests.transport.test_session import connection, ws_pair
from tests.transport.test_tls import HOST, Certs, certs, client_context, server_ctx
from tunneld.transport.attached import AttachedStream
from tunneld.transport.rawsock import RawSocketStream
from tunneld.transport.session import ClientStream, MuxSession, MuxStream
from tunneld.transport.tls import TLSStream
from tunneld.wire import events as ev
from tunneld.wire.mux import Role

__all__ = ["certs", "server_ctx"]  # fixtures, shared with the TLS tests
CLOGGED_WINDOW = 16384  # the smallest window a session may advertise


async def fill(stream: RawSocketStream) -> None:
    """Send until the socket's buffers are full (send_all would block)."""
    sock = stream.socket
    chunk = b"x" * 65536
    for _ in range(10_000):
        try:
            sock.send(chunk)
        except BlockingIOError:
            return
    raise AssertionError("the socket never filled")


async def tcp_pair() -> tuple[RawSocketStream, RawSocketStream]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):  # small buffers: a clogged pair fills fast
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    await trio.lowlevel.checkpoint()
    return RawSocketStream(client), RawSocketStream(server)


async def test_raw_socket_stream_keeps_the_half_closeable_contract() -> None:
    async def clogged() -> tuple[RawSocketStream, RawSocketStream]:
        left, right = await tcp_pair()
        await fill(left)
        await fill(right)
        return left, right

    with trio.fail_after(20):
        await trio.testing.check_half_closeable_stream(tcp_pair, clogged)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_stream_keeps_the_two_way_contract(
    certs: Certs, server_ctx: ssl.SSLContext, version: ssl.TLSVersion
) -> None:
    client_ctx = client_context(certs.ca_pem, version)

    async def make(clogged: bool) -> tuple[TLSStream, TLSStream]:
        pair = trio.testing.lockstep_stream_pair if clogged else trio.testing.memory_stream_pair
        a, b = pair()
        client = TLSStream(a, client_ctx, server_side=False, server_hostname=HOST)
        server = TLSStream(b, server_ctx, server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        return client, server

    async def plain() -> tuple[TLSStream, TLSStream]:
        return await make(False)

    async def clogged() -> tuple[TLSStream, TLSStream]:
        return await make(True)

    with trio.fail_after(20):
        await trio.testing.check_two_way_stream(plain, clogged)


@pytest.mark.parametrize("tuned", [False, True], ids=["static", "tuned"])
async def test_mux_stream_keeps_the_half_closeable_contract(tuned: bool) -> None:
    """Pairs of a relay-side and a home-side MuxStream, on two sessions in memory: one
    with room to spare, one whose streams start with every byte of credit used up."""
    sessions: dict[bool, tuple[MuxSession, trio.MemoryReceiveChannel[MuxStream]]] = {}

    async def start(clogged: bool, task_status: trio.TaskStatus[None]) -> None:
        window = CLOGGED_WINDOW if clogged else 256 * 1024
        accepted_send, accepted = trio.open_memory_channel[MuxStream](100)

        async def handler(stream: MuxStream) -> None:
            await accepted_send.send(stream)
            await trio.sleep_forever()  # the session's end cancels it

        relay_ws, home_ws = ws_pair()
        relay = MuxSession(relay_ws, connection(Role.RELAY, window, tuned), session_id="r")
        home = MuxSession(home_ws, connection(Role.HOME, window, tuned), on_open=handler)
        await home.send_now(ev.Hello("t", ("h.test",), window, 1000))
        await relay.receive_handshake()
        await relay.send_now(ev.Welcome("r", ("h.test",), window, 20.0))
        await home.receive_handshake()
        sessions[clogged] = (relay, accepted)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            nursery.start_soon(home.run)
            task_status.started()

    async def make(clogged: bool) -> tuple[MuxStream, MuxStream]:
        relay, accepted = sessions[clogged]
        left = relay.open_stream("192.0.2.1", 1, "h.test")
        right = await accepted.receive()
        if clogged:  # the credit both ways used up: the next send waits for a read
            await left.send_all(bytes(CLOGGED_WINDOW))
            await right.send_all(bytes(CLOGGED_WINDOW))
        return left, right

    async def plain() -> tuple[MuxStream, MuxStream]:
        return await make(False)

    async def clogged() -> tuple[MuxStream, MuxStream]:
        return await make(True)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(start, False)
            await nursery.start(start, True)
            await trio.testing.check_half_closeable_stream(plain, clogged)
            nursery.cancel_scope.cancel()


async def test_attached_stream_keeps_the_half_closeable_contract() -> None:
    """Pairs of AttachedStreams: the relay's and the home's end of one stream opened by
    ATTACH, credit kept by two sessions in memory, bytes on a TCP pair of their own."""
    sessions: dict[bool, tuple[MuxSession, trio.MemoryReceiveChannel[ClientStream]]] = {}
    waiting: dict[bytes, RawSocketStream] = {}  # the home's data connections, by ticket

    def attach(stream: MuxStream, ticket: bytes) -> ClientStream | None:
        data = waiting.pop(ticket, None)
        return None if data is None else AttachedStream(stream, data)

    async def start(clogged: bool, task_status: trio.TaskStatus[None]) -> None:
        window = CLOGGED_WINDOW if clogged else 256 * 1024
        accepted_send, accepted = trio.open_memory_channel[ClientStream](100)

        async def handler(stream: ClientStream) -> None:
            await accepted_send.send(stream)
            await trio.sleep_forever()  # the session's end cancels it

        relay_ws, home_ws = ws_pair()
        relay = MuxSession(relay_ws, connection(Role.RELAY, window, True), session_id="r")
        home = MuxSession(
            home_ws, connection(Role.HOME, window, True), on_open=handler, attach=attach
        )
        await home.send_now(ev.Hello("t", ("h.test",), window, 1000, data_connections=8))
        await relay.receive_handshake()
        await relay.send_now(ev.Welcome("r", ("h.test",), window, 20.0, data_connections=4))
        await home.receive_handshake()
        assert relay.data_connections and home.data_connections
        sessions[clogged] = (relay, accepted)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            nursery.start_soon(home.run)
            task_status.started()

    async def make(clogged: bool) -> tuple[AttachedStream, ClientStream]:
        relay, accepted = sessions[clogged]
        relay_end, home_end = socket.socketpair()
        ticket = os.urandom(ev.TICKET_SIZE)
        waiting[ticket] = RawSocketStream(home_end)
        mux = relay.open_stream("192.0.2.1", 1, "h.test", ticket)
        left = AttachedStream(mux, RawSocketStream(relay_end))
        right = await accepted.receive()
        assert isinstance(right, AttachedStream)
        if clogged:  # the credit both ways used up: the next send waits for a read
            await left.send_all(bytes(CLOGGED_WINDOW))
            await right.send_all(bytes(CLOGGED_WINDOW))
        return left, right

    async def plain() -> tuple[AttachedStream, ClientStream]:
        return await make(False)

    async def clogged() -> tuple[AttachedStream, ClientStream]:
        return await make(True)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(start, False)
            await nursery.start(start, True)
            await trio.testing.check_half_closeable_stream(plain, clogged)
            nursery.cancel_scope.cancel()
