"""TLSStream.pass_through over a real MuxStream: the daemon's session reader decrypts
an upgraded connection's bytes and writes them to the upstream socket itself.

The session runs in memory (tests/transport/test_session.py); the client is trio's own
SSLStream on the relay's end of the stream; the upstream is a real socket pair.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from tests.transport.test_session import session_pair
from tests.transport.test_tls import HOST, Certs, certs, client_context, server_ctx
from tunneld.transport.rawsock import RawSocketStream
from tunneld.transport.session import MuxStream
from tunneld.transport.tls import TLSStream

__all__ = ["certs", "server_ctx"]  # fixtures, used by name

TIMEOUT = 10


@dataclass
class World:
    client: trio.SSLStream[MuxStream]
    raw: MuxStream  # the relay's end, under the client's TLS
    server: TLSStream  # the daemon's end, over its MuxStream
    peer: socket.socket  # the upstream app's end of the upstream socket pair
    upstream: socket.socket  # the daemon's end: pass_through writes here
    relayed: list[bytes]  # what the daemon's own receive loop had to forward


@asynccontextmanager
async def world(certs: Certs, server_ctx: ssl.SSLContext) -> AsyncIterator[World]:
    """A client's TLS connection through a session to a daemon that forwards upstream
    like the proxy's splice: pass_through installed, its own loop for the rest."""
    upstream, peer = socket.socketpair()
    upstream.setblocking(False)
    peer.setblocking(False)
    ready: trio.MemorySendChannel[TLSStream]
    ready, ready_recv = trio.open_memory_channel[TLSStream](1)
    relayed: list[bytes] = []

    async def daemon(stream: MuxStream) -> None:
        server = TLSStream(stream, server_ctx, server_side=True)
        await server.do_handshake()
        await ready.send(server)
        stream.deliver_to(server.pass_through(upstream.send))
        up = RawSocketStream(upstream)
        try:
            while data := await server.receive_some(65536):
                relayed.append(data)
                await up.send_all(data)
            relayed.append(b"<eof>")
        except trio.BrokenResourceError:
            relayed.append(b"<broken>")
        finally:
            stream.deliver_to(None)
        await trio.sleep_forever()

    with upstream, peer, trio.fail_after(TIMEOUT):
        async with session_pair(daemon) as pair:
            raw = pair.relay.open_stream("192.0.2.1", 5555, "h.test")
            client = trio.SSLStream(raw, client_context(certs.ca_pem), server_hostname=HOST)
            await client.do_handshake()
            server = await ready_recv.receive()
            yield World(client, raw, server, peer, upstream, relayed)


async def read_upstream(peer: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        await trio.lowlevel.wait_readable(peer)
        chunk = peer.recv(1 << 20)
        assert chunk, f"upstream EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def test_messages_reach_the_upstream_without_the_receive_loop(
    certs: Certs, server_ctx: ssl.SSLContext
) -> None:
    async with world(certs, server_ctx) as w:
        sent = b""
        for i in range(200):
            message = f"message {i} ".encode() * 5
            await w.client.send_all(message)
            sent += message
            await trio.testing.wait_all_tasks_blocked()
        assert await read_upstream(w.peer, len(sent)) == sent
        assert w.relayed == []  # every byte went through the session reader


async def test_a_full_upstream_hands_the_rest_to_the_receive_loop_in_order(
    certs: Certs, server_ctx: ssl.SSLContext
) -> None:
    async with world(certs, server_ctx) as w:
        filled = 0
        for piece in (65536, 4096, 256, 1):  # to the brim
            with contextlib.suppress(BlockingIOError):
                while True:
                    filled += w.upstream.send(b"f" * piece)
        messages = [os.urandom(1000 + i) for i in range(50)]
        for m in messages:
            await w.client.send_all(m)
        await trio.testing.wait_all_tasks_blocked()
        # The socket took none of it: the receive loop holds the first message(s) (the
        # relay may have put several in one frame) and waits to write them; the rest
        # waits in the stream, behind them.
        assert len(w.relayed) == 1 and w.relayed[0].startswith(messages[0])
        got = await read_upstream(w.peer, filled + sum(map(len, messages)))
        assert got[:filled] == b"f" * filled
        assert got[filled:] == b"".join(messages)


async def test_a_large_message_crosses_in_records_and_frames(
    certs: Certs, server_ctx: ssl.SSLContext
) -> None:
    async with world(certs, server_ctx) as w:
        body = os.urandom(1 << 20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.client.send_all, body)
            got = await read_upstream(w.peer, len(body))
        assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


async def test_close_notify_after_data_ends_the_receive_loop(
    certs: Certs, server_ctx: ssl.SSLContext
) -> None:
    async with world(certs, server_ctx) as w:
        await w.client.send_all(b"last words")
        await trio.testing.wait_all_tasks_blocked()
        await w.client.aclose()  # close_notify, then the stream's EOF
        assert await read_upstream(w.peer, 10) == b"last words"
        await trio.testing.wait_all_tasks_blocked()
        assert w.relayed == [b"<eof>"]  # a clean end, not an error; the data went direct


@pytest.mark.parametrize("after", [b"", b"valid data first"])
async def test_a_corrupt_record_breaks_the_stream_with_the_tls_error(
    certs: Certs, server_ctx: ssl.SSLContext, after: bytes
) -> None:
    async with world(certs, server_ctx) as w:
        if after:
            await w.client.send_all(after)
            assert await read_upstream(w.peer, len(after)) == after
        await w.raw.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))  # application data, bad MAC
        await trio.testing.wait_all_tasks_blocked()
        assert w.relayed == [b"<broken>"]
        with pytest.raises(trio.BrokenResourceError) as info:
            await w.server.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLError)
