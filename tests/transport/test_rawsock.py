"""RawSocketStream on real loopback TCP sockets: the stream contract the proxy and
the relay rely on, and the scheduling promises that make it cheaper than trio's."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from tunneld.transport.rawsock import RawSocketStream, raw_stream

TIMEOUT = 10


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[RawSocketStream, RawSocketStream]]:
    """Two connected RawSocketStreams over 127.0.0.1 (port 0)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    await listeners[0].aclose()
    a, b = raw_stream(client), raw_stream(server)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


class _Steps(trio.abc.Instrument):
    """Counts the scheduler's task steps: a call that yields makes at least one."""

    def __init__(self) -> None:
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def receive_exactly(stream: RawSocketStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(65536)
        assert data, "EOF before the whole transfer"
        out += data
    return bytes(out)


async def test_carries_bytes_both_ways_concurrently() -> None:
    size = 8 << 20  # far more than the socket buffers: sends must wait for the reader
    blob = os.urandom(size)
    async with pair() as (a, b):
        got: dict[str, bytes] = {}

        async def read(name: str, stream: RawSocketStream) -> None:
            got[name] = await receive_exactly(stream, size)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_all, blob)
                nursery.start_soon(b.send_all, blob[::-1])
                nursery.start_soon(read, "b", b)
                nursery.start_soon(read, "a", a)
    assert hashlib.sha256(got["b"]).digest() == hashlib.sha256(blob).digest()
    assert hashlib.sha256(got["a"]).digest() == hashlib.sha256(blob[::-1]).digest()


async def test_a_receive_of_waiting_bytes_makes_one_scheduler_pass() -> None:
    async with pair() as (a, b):
        await a.send_all(b"hello")
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(b.socket)
        received: list[bytes] = []

        async def receive() -> None:
            received.append(await b.receive_some(100))

        # A checkpoint, as every trio stream call is, and no more: no wait, one pass.
        assert await counted_steps(receive) == 1
        assert received == [b"hello"]


async def counted_steps(work: Callable[[], Awaitable[None]]) -> int:
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        await work()
    finally:
        trio.lowlevel.remove_instrument(steps)
    return steps.count


async def test_a_small_send_makes_one_scheduler_pass() -> None:
    async with pair() as (a, _):
        assert await counted_steps(partial(a.send_all, b"x")) == 1


async def test_a_cancelled_send_sends_nothing() -> None:
    async with pair() as (a, b):
        with trio.CancelScope() as scope:
            scope.cancel()
            await a.send_all(b"never")
        assert scope.cancelled_caught
        await a.send_all(b"sent")
        with trio.fail_after(TIMEOUT):
            assert await receive_exactly(b, 4) == b"sent"


async def test_a_flood_still_lets_other_tasks_run() -> None:
    # Sends that never block and receives that never wait still pass to the
    # scheduler, once per call, so one busy socket cannot starve the rest.
    piece = b"x" * 1024
    calls = 12  # a flood that fits in the socket buffers

    async def send_flood() -> None:
        for _ in range(calls):
            await a.send_all(piece)

    async def receive_flood() -> None:
        got = 0
        while got < calls * len(piece):
            got += len(await b.receive_some(len(piece)))

    async with pair() as (a, b):
        with trio.fail_after(TIMEOUT):
            assert await counted_steps(send_flood) >= calls
            await trio.sleep(0.05)  # everything sent is in b's buffer by now
            assert await counted_steps(receive_flood) >= calls


async def test_a_cancelled_receive_raises_even_with_bytes_waiting() -> None:
    async with pair() as (a, b):
        await a.send_all(b"kept")
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(b.socket)
        with trio.CancelScope() as scope:
            scope.cancel()
            await b.receive_some(100)
        assert scope.cancelled_caught
        assert await b.receive_some(100) == b"kept"  # nothing was lost


async def test_receive_nowait() -> None:
    async with pair() as (a, b):
        assert b.receive_nowait() is None  # empty: would have to wait
        await a.send_all(b"ping")
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(b.socket)
        assert b.receive_nowait() == b"ping"
        await a.send_eof()
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(b.socket)
        assert b.receive_nowait() == b""


async def test_send_eof_half_closes() -> None:
    async with pair() as (a, b):
        await a.send_all(b"last words")
        await a.send_eof()
        with trio.fail_after(TIMEOUT):
            assert await receive_exactly(b, 10) == b"last words"
            assert await b.receive_some(100) == b""
            # The other direction still works.
            await b.send_all(b"reply")
            assert await receive_exactly(a, 5) == b"reply"


async def test_aclose_wakes_a_waiting_receiver() -> None:
    async with pair() as (_, b):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def closer() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    await b.aclose()

                nursery.start_soon(closer)
                with pytest.raises(trio.ClosedResourceError):
                    await b.receive_some(100)
        with pytest.raises(trio.ClosedResourceError):
            await b.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            b.receive_nowait()


async def test_concurrent_receives_are_refused() -> None:
    async with pair() as (_, b):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b.receive_some, 100)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await b.receive_some(100)
                with pytest.raises(trio.BusyResourceError):
                    b.receive_nowait()
                nursery.cancel_scope.cancel()


async def test_a_reset_is_broken_with_the_os_error_as_cause() -> None:
    async with pair() as (a, b):
        # SO_LINGER 0: closing sends RST instead of FIN.
        a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await a.aclose()
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(b.socket)
        with pytest.raises(trio.BrokenResourceError) as info:
            await b.receive_some(100)
        assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_max_bytes_must_be_positive() -> None:
    async with pair() as (_, b):
        with pytest.raises(ValueError):
            await b.receive_some(0)


class _CountingSocket(socket.socket):
    """Counts recv() calls, the ones that find nothing (EAGAIN) included."""

    recvs = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.recvs += 1
        return super().recv(bufsize, flags)


@asynccontextmanager
async def counted_pair() -> AsyncIterator[tuple[RawSocketStream, RawSocketStream, _CountingSocket]]:
    """Like pair(), with b's socket counting its recv() calls."""
    async with pair() as (a, b):
        sock = _CountingSocket(fileno=b.socket.detach())
        counted = RawSocketStream(sock)
        try:
            yield a, counted, sock
        finally:
            await counted.aclose()


async def test_after_a_short_read_the_next_one_waits_without_a_failed_recv() -> None:
    # A splice reads the same side again at once: the socket is empty, so trying recv()
    # first would only cost a syscall and an EAGAIN exception per message.
    async with counted_pair() as (a, b, sock):
        await a.send_all(b"one")
        with trio.fail_after(TIMEOUT):
            assert await b.receive_some(100) == b"one"  # short: the socket is drained
            assert sock.recvs == 1
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def receive() -> None:
                    got.append(await b.receive_some(100))

                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                assert sock.recvs == 1  # waiting, with no recv() tried
                await a.send_all(b"two")
            assert got == [b"two"] and sock.recvs == 2


async def test_after_a_send_the_answer_is_read_at_once() -> None:
    # A request/response exchange: the answer is usually there by the next read, and
    # it comes back at once (one scheduler pass, no wait), short read before or not.
    async with counted_pair() as (a, b, _):
        await a.send_all(b"hello")
        with trio.fail_after(TIMEOUT):
            assert await b.receive_some(100) == b"hello"  # short
            await b.send_all(b"request")
            assert await receive_exactly(a, 7) == b"request"
            await a.send_all(b"answer")
            await trio.lowlevel.wait_readable(b.socket)
        received: list[bytes] = []

        async def receive() -> None:
            received.append(await b.receive_some(100))

        assert await counted_steps(receive) == 1
        assert received == [b"answer"]


async def test_a_read_after_close_is_refused_even_when_drained() -> None:
    async with pair() as (a, b):
        await a.send_all(b"short")
        with trio.fail_after(TIMEOUT):
            assert await b.receive_some(100) == b"short"
        await b.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await b.receive_some(100)
