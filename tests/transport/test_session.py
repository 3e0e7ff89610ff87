"""MuxSession and MuxStream with two peers in memory (no sockets).

A fake WebSocket built on trio memory channels stands in for trio-websocket;
everything above it (mux, flow control, stream semantics) is the real code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import trio_websocket

from tunneld.transport.session import (
    PING_BURST,
    PING_RATE,
    PONG_BACKLOG,
    MuxSession,
    MuxStream,
    tuned_connection,
)
from tunneld.wire import events as ev
from tunneld.wire.frames import decode, encode
from tunneld.wire.mux import Connection, Role


class FakeWebSocket:
    """One end of an in-memory message pipe with trio-websocket's interface."""

    def __init__(
        self, send: trio.MemorySendChannel[bytes], recv: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._send = send
        self._recv = recv
        self.messages_sent = 0

    async def get_message(self) -> bytes:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio_websocket.ConnectionClosed(
                trio_websocket.CloseReason(1006, "gone")
            ) from None

    async def send_message(self, message: bytes) -> None:
        try:
            await self._send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio_websocket.ConnectionClosed(
                trio_websocket.CloseReason(1006, "gone")
            ) from None
        self.messages_sent += 1

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self._send.aclose()
        await self._recv.aclose()


def ws_pair() -> tuple[FakeWebSocket, FakeWebSocket]:
    a_send, b_recv = trio.open_memory_channel[bytes](4)
    b_send, a_recv = trio.open_memory_channel[bytes](4)
    return FakeWebSocket(a_send, a_recv), FakeWebSocket(b_send, b_recv)


@dataclass
class Pair:
    relay: MuxSession
    home: MuxSession
    relay_ws: FakeWebSocket
    home_ws: FakeWebSocket
    nursery: trio.Nursery


Handler = Callable[[MuxStream], Awaitable[None]]


def connection(role: Role, window: int, tuned: bool) -> Connection:
    if not tuned:  # also what a peer from before window tuning runs
        return Connection(role, window=window)
    return tuned_connection(
        role, window=window, max_window=64 * window, budget=256 * window, max_streams=1000
    )


@asynccontextmanager
async def session_pair(
    handler: Handler, window: int = 64 * 1024, tuned: tuple[bool, bool] = (False, False)
) -> AsyncIterator[Pair]:
    """`tuned`: whether the relay's and the home's windows follow their delivery rate."""
    relay_ws, home_ws = ws_pair()
    relay = MuxSession(relay_ws, connection(Role.RELAY, window, tuned[0]), session_id="r")
    home = MuxSession(home_ws, connection(Role.HOME, window, tuned[1]), on_open=handler)
    await home.send_now(
        ev.Hello(version="test", hostnames=("h.test",), window=window, max_streams=1000)
    )
    hello = await relay.receive_handshake()
    assert isinstance(hello, ev.Hello)
    await relay.send_now(
        ev.Welcome(session_id="r", hostnames=("h.test",), window=window, ping_interval=20)
    )
    assert isinstance(await home.receive_handshake(), ev.Welcome)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        nursery.start_soon(home.run)
        yield Pair(relay, home, relay_ws, home_ws, nursery)
        nursery.cancel_scope.cancel()


async def echo(stream: MuxStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()
    await stream.aclose()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some():
        out += data
    return bytes(out)


async def test_echo_with_half_close_and_flow_control() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # far more than the 64 KiB window
    with trio.fail_after(20):
        async with session_pair(echo) as pair:
            stream = pair.relay.open_stream("192.0.2.1", 5555, "h.test")
            received = b""

            async def reader() -> None:
                nonlocal received
                received = await read_all(stream)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await stream.send_all(payload)
                await stream.send_eof()
            await stream.aclose()
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            # Both sides forget the stream once both EOFs crossed.
            with trio.fail_after(5):
                await pair.home.idle.wait()
                await pair.relay.idle.wait()


@pytest.mark.parametrize(
    "tuned", [(True, True), (True, False), (False, True)], ids=["both", "relay", "home"]
)
async def test_tuned_windows_work_with_a_peer_that_keeps_them_static(
    tuned: tuple[bool, bool],
) -> None:
    # A relay or daemon from before window tuning grants static windows and never
    # sends PINGs of its own; either end may tune, the other need not know.
    payload = os.urandom(4 * 1024 * 1024 + 3)
    with trio.fail_after(30):
        async with session_pair(echo, tuned=tuned) as pair:
            stream = pair.relay.open_stream("192.0.2.1", 5555, "h.test")
            received = b""

            async def reader() -> None:
                nonlocal received
                received = await read_all(stream)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await stream.send_all(payload)
                await stream.send_eof()
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            for session, on in zip((pair.relay, pair.home), tuned, strict=True):
                stats = session._conn.tuner_statistics()
                if not on:
                    assert stats is None
                    continue
                assert stats is not None
                assert stats.min_rtt is not None  # its own PINGs measured the path
                assert stats.windows_total <= stats.budget


async def test_open_carries_client_address() -> None:
    seen: list[tuple[str, int, str]] = []

    async def handler(stream: MuxStream) -> None:
        seen.append((stream.client_ip, stream.client_port, stream.sni))
        await stream.aclose()

    with trio.fail_after(5):
        async with session_pair(handler) as pair:
            stream = pair.relay.open_stream("2001:db8::7", 443, "h.test")
            await stream.send_eof()
            assert await read_all(stream) == b""
    assert seen == [("2001:db8::7", 443, "h.test")]


async def test_slow_reader_does_not_stall_other_streams() -> None:
    gate = trio.Event()

    async def handler(stream: MuxStream) -> None:
        first = await stream.receive_some(1)
        if first == b"S":  # the slow stream: stop reading until told
            await gate.wait()
        await stream.send_all(b"ok")
        await stream.send_eof()
        await read_all(stream)
        await stream.aclose()

    with trio.fail_after(10):
        async with session_pair(handler, window=32 * 1024) as pair:
            slow = pair.relay.open_stream("192.0.2.1", 1, "h.test")
            await slow.send_all(b"S")
            # Fill the slow stream's window: the sender must block, not buffer.
            blob = b"x" * (32 * 1024 - 1)
            await slow.send_all(blob)
            with trio.move_on_after(0.3) as blocked:
                await slow.send_all(b"more")
            assert blocked.cancelled_caught, "a sender must never exceed the window"
            # Another stream still gets served at once.
            fast = pair.relay.open_stream("192.0.2.2", 2, "h.test")
            await fast.send_all(b"F")
            assert await fast.receive_some() == b"ok"
            gate.set()
            assert await slow.receive_some() == b"ok"


async def test_session_loss_breaks_every_stream() -> None:
    started = trio.Event()

    async def handler(stream: MuxStream) -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with session_pair(handler) as pair:
            stream = pair.relay.open_stream("192.0.2.1", 1, "h.test")
            await stream.send_all(b"hello")
            await started.wait()
            pair.home.close("test: link cut")
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"more")


async def test_handler_failure_resets_only_its_stream(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(stream: MuxStream) -> None:
        if stream.client_port == 1:
            raise RuntimeError("boom")
        await echo(stream)

    with trio.fail_after(5):
        async with session_pair(handler) as pair:
            bad = pair.relay.open_stream("192.0.2.1", 1, "h.test")
            with pytest.raises(trio.BrokenResourceError, match="reset"):
                await bad.receive_some()
            good = pair.relay.open_stream("192.0.2.1", 2, "h.test")
            await good.send_all(b"still here")
            await good.send_eof()
            assert await read_all(good) == b"still here"
    # A bug shows its cause: one ERROR record, with the traceback.
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, failures
    assert failures[0].levelname == "ERROR"
    assert failures[0].exc_info is not None and "boom" in str(failures[0].exc_info[1])


async def test_ping_measures_round_trip() -> None:
    with trio.fail_after(5):
        async with session_pair(echo) as pair:
            rtt = await pair.home.ping()
            assert 0 <= rtt < 5
            assert pair.home.rtt == rtt


async def test_goaway_reaches_the_home() -> None:
    got: list[ev.Event] = []
    arrived = trio.Event()

    def on_event(event: ev.Event) -> None:
        got.append(event)
        arrived.set()

    relay_ws, home_ws = ws_pair()
    relay = MuxSession(relay_ws, Connection(Role.RELAY))
    home = MuxSession(home_ws, Connection(Role.HOME), on_event=on_event)
    with trio.fail_after(5):
        await home.send_now(
            ev.Hello(version="t", hostnames=("h.test",), window=256 * 1024, max_streams=1000)
        )
        await relay.receive_handshake()
        await relay.send_now(
            ev.Welcome(session_id="r", hostnames=("h.test",), window=256 * 1024, ping_interval=20)
        )
        await home.receive_handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            nursery.start_soon(home.run)
            relay.goaway(ev.ResetCode.REPLACED, "replaced by another session")
            await arrived.wait()
            relay.goaway(ev.ResetCode.SHUTDOWN, "again")  # a second one: no error
            nursery.cancel_scope.cancel()
    assert got[0] == ev.GoAway(ev.ResetCode.REPLACED, "replaced by another session")
    assert home.going_away
    # Once the session is over there is nobody to tell: goaway() does nothing, quietly.
    relay.goaway(ev.ResetCode.SHUTDOWN, "relay shutting down")
    with pytest.raises(trio.BrokenResourceError):
        relay.send(ev.GoAway(ev.ResetCode.SHUTDOWN, "relay shutting down"))


async def test_many_streams_coalesce_into_few_messages() -> None:
    with trio.fail_after(10):
        async with session_pair(echo) as pair:
            streams = [pair.relay.open_stream("192.0.2.1", i, "h.test") for i in range(200)]
            before = pair.relay_ws.messages_sent

            async def client(s: MuxStream) -> None:
                await s.send_all(b"ping")
                await s.send_eof()
                assert await read_all(s) == b"ping"

            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(client, s)
            # 200 concurrent OPEN+DATA+EOF triples share WebSocket messages.
            assert pair.relay_ws.messages_sent - before < 100


async def test_send_all_in_a_cancelled_scope_sends_nothing() -> None:
    # send_all skips its own scheduler pass when there is credit, but still honours a
    # cancellation: nothing is queued, and the stream carries on afterwards.
    with trio.fail_after(10):
        async with session_pair(echo) as pair:
            stream = pair.relay.open_stream("192.0.2.1", 5555, "h.test")
            with trio.CancelScope() as scope:
                scope.cancel()
                await stream.send_all(b"never sent")
            assert scope.cancelled_caught
            await stream.send_all(b"sent")
            await stream.send_eof()
            assert await read_all(stream) == b"sent"


async def test_deliver_to_writes_straight_into_the_socket_and_keeps_order() -> None:
    # The relay's client socket gets the home's bytes from the session reader itself
    # while the splice waits; bytes the socket cannot take go through receive_some.
    go_send, go_recv = trio.open_memory_channel[bytes](4)

    async def home(stream: MuxStream) -> None:
        async for data in go_recv:
            await stream.send_all(data)
        await stream.send_eof()
        await read_all(stream)  # until the relay side ends too

    sink, peer = socket.socketpair()
    sink.setblocking(False)
    peer.setblocking(False)
    with sink, peer, trio.fail_after(10):
        async with session_pair(home) as pair:
            stream = pair.relay.open_stream("192.0.2.1", 5555, "h.test")
            stream.deliver_to(sink.send)
            await stream.send_all(b"hi")  # opens the stream at the home
            got: list[bytes] = []

            async def consumer() -> None:
                while data := await stream.receive_some():
                    got.append(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consumer)
                await go_send.send(b"direct")
                await trio.lowlevel.wait_readable(peer)
                assert peer.recv(100) == b"direct"
                assert got == []  # it never went through the consumer
                # A full socket: the next bytes wait for the consumer instead, in order.
                filled = 0
                with contextlib.suppress(BlockingIOError):
                    while True:
                        filled += sink.send(b"x" * 65536)
                await go_send.send(b"buffered")
                await go_send.aclose()
                await stream.send_eof()
            assert got == [b"buffered"]
            assert filled > 0


# -- a hand-driven peer: raw frames against a real relay session ----------------------------


@asynccontextmanager
async def relay_with_raw_peer(
    ping_burst: int = PING_BURST,
) -> AsyncIterator[tuple[MuxSession, FakeWebSocket, trio.Nursery]]:
    """A relay MuxSession after HELLO/WELCOME; the test speaks frames on `peer`.
    The HELLO arrives together with whatever the test queues first (see below)."""
    relay_ws, peer = ws_pair()
    relay = MuxSession(
        relay_ws, Connection(Role.RELAY, window=65536), session_id="r", ping_burst=ping_burst
    )
    async with trio.open_nursery() as nursery:
        yield relay, peer, nursery
        nursery.cancel_scope.cancel()


HELLO = ev.Hello(version="test", hostnames=("h.test",), window=65536, max_streams=10)


async def handshake(relay: MuxSession, peer: FakeWebSocket, *after: ev.Event) -> None:
    """HELLO plus `after` in ONE message, as a peer may coalesce them."""
    await peer.send_message(b"".join(encode(e) for e in (HELLO, *after)))
    assert isinstance(await relay.receive_handshake(), ev.Hello)
    await relay.send_now(
        ev.Welcome(session_id="r", hostnames=("h.test",), window=65536, ping_interval=20)
    )
    assert isinstance(decode(await peer.get_message())[0], ev.Welcome)


async def test_frames_that_came_with_the_hello_are_handled_without_another_read() -> None:
    async with relay_with_raw_peer() as (relay, peer, nursery):
        await handshake(relay, peer, ev.Ping(b"12345678"))
        nursery.start_soon(relay.run)
        with trio.fail_after(5):
            assert decode(await peer.get_message()) == [ev.Pong(b"12345678")]


async def test_protocol_violation_is_answered_with_goaway_then_closed() -> None:
    async with relay_with_raw_peer() as (relay, peer, _):
        await handshake(relay, peer)
        await peer.send_message(encode(ev.Data(9, b"x")))  # a stream never opened
        with trio.fail_after(5):
            await relay.run()  # returns: a peer's violation is not our crash
            frames = decode(await peer.get_message())
        assert relay.protocol_error is not None
        assert relay.close_reason == "protocol error: DATA for stream 9, never opened"
        assert len(frames) == 1 and isinstance(frames[0], ev.GoAway)
        assert frames[0].code == ev.ResetCode.PROTOCOL_ERROR


async def test_ping_flood_from_a_peer_that_never_reads_stops_our_reading() -> None:
    """Unread PONGs pile up to PONG_BACKLOG, then the session reads no more (so its
    memory stays bounded); once the peer reads, every PING is answered, in order.
    (The flood rule is lifted here: this is the bound behind it.)"""
    async with relay_with_raw_peer(ping_burst=10**9) as (relay, peer, nursery):
        await handshake(relay, peer)
        nursery.start_soon(relay.run)
        n = 3 * PONG_BACKLOG
        pings = [ev.Ping(i.to_bytes(8, "big")) for i in range(n)]
        sent = 0
        with trio.move_on_after(1):  # the pipe holds 4 messages: sends block once unread
            for i in range(0, n, 64):
                await peer.send_message(b"".join(encode(p) for p in pings[i : i + 64]))
                sent += 64
        assert sent < n, "the session kept reading although its PONGs were never read"
        queued = relay._conn.statistics().buffered_output
        assert queued <= 2 * PONG_BACKLOG * len(encode(ev.Pong(b"12345678")))

        async def rest() -> None:
            for i in range(sent, n, 64):
                await peer.send_message(b"".join(encode(p) for p in pings[i : i + 64]))

        nursery.start_soon(rest)
        answered: list[ev.Event] = []
        with trio.fail_after(10):
            while len(answered) < n:
                answered += decode(await peer.get_message())
        assert answered == [ev.Pong(p.payload) for p in pings]


async def test_ping_flood_ends_the_session_steady_pings_do_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with relay_with_raw_peer() as (relay, peer, nursery):
        await handshake(relay, peer)
        nursery.start_soon(relay.run)
        for i in range(3 * PING_BURST):  # steady, at the refill rate: never a flood
            await peer.send_message(encode(ev.Ping(i.to_bytes(8, "big"))))
            assert decode(await peer.get_message()) == [ev.Pong(i.to_bytes(8, "big"))]
            await trio.sleep(1 / PING_RATE)
        burst = [ev.Ping(i.to_bytes(8, "big")) for i in range(PING_BURST + 1)]
        await peer.send_message(b"".join(encode(p) for p in burst))
        frames: list[ev.Event] = []
        with trio.fail_after(5):
            while not any(isinstance(f, ev.GoAway) for f in frames):
                frames += decode(await peer.get_message())
    assert frames[:-1] == [ev.Pong(p.payload) for p in burst[:PING_BURST]]
    assert frames[-1] == ev.GoAway(
        ev.ResetCode.PROTOCOL_ERROR, f"PING flood: over {PING_BURST} PINGs at once"
    )
    assert relay.close_reason == f"protocol error: PING flood: over {PING_BURST} PINGs at once"


async def test_send_nowait_queues_only_what_the_credit_allows() -> None:
    with trio.fail_after(10):
        async with session_pair(echo, window=16384) as pair:
            stream = pair.relay.open_stream("192.0.2.1", 5555, "h.test")
            assert stream.send_nowait(b"x" * 16384)  # exactly the window
            assert not stream.send_nowait(b"y")  # no credit left: the caller must wait
            assert await receive_exactly(stream, 16384) == b"x" * 16384  # echoed back
            assert stream.send_nowait(b"z")  # credit returned as the echo consumed it
            await stream.aclose()
            assert not stream.send_nowait(b"after close")


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        assert data, "stream ended early"
        out += data
    return bytes(out)
