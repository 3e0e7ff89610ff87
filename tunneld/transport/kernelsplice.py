"""The relay's side of an attached stream: client <-> data connection in the kernel.

splice(2) moves the bytes from one socket into a pipe and from the pipe into the
other socket, so they never enter Python: the relay's cost per byte becomes a
few system calls per 256 KiB. The stream's credit rules hold as for DATA frames
(attached.py): toward the home only what the home's credit allows, and credit
back to the home for what the client's socket took.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from tunneld.transport.attached import abort
from tunneld.transport.rawsock import RawSocketStream
from tunneld.transport.session import MuxStream

CHUNK = 256 * 1024  # bytes moved per splice call, at most (the pipe holds this much)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
SPLICE_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _Pipe:
    """One direction's pipe. `drained`: the last read was short, so the socket is
    most likely empty and the next read waits for it first (no splice for EAGAIN)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.drained = False
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, CHUNK)
        except OSError:  # over /proc/sys/fs/pipe-max-size: the default 64 KiB
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


async def _move(src: socket.socket, dst: socket.socket, pipe: _Pipe, limit: int) -> int:
    """Up to `limit` bytes from `src` to `dst`, all of what was read; 0 at EOF. A
    checkpoint (one scheduler pass when nothing had to wait)."""
    waited = False
    if pipe.drained:
        await trio.lowlevel.wait_readable(src)
        waited = True
    else:
        await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            n = os.splice(src.fileno(), pipe.w, limit, flags=_FLAGS)
            break
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            waited = True
    pipe.drained = 0 < n < limit
    left = n
    while left:
        try:
            left -= os.splice(pipe.r, dst.fileno(), left, flags=_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(dst)
            waited = True
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return n


async def send_first(stream: MuxStream, data: RawSocketStream, first: bytes) -> None:
    """The client's bytes the relay read before it knew where they go (its
    ClientHello), sent within the stream's credit."""
    view = memoryview(first)
    while view:
        room = await stream.credit()
        piece = view[:room]
        stream.spend(len(piece))
        await data.send_all(piece)
        view = view[len(piece) :]


async def splice_attached(
    client: RawSocketStream, data: RawSocketStream, stream: MuxStream
) -> bool:
    """Both directions until both end; True if both ended cleanly (the caller then
    closes, else aborts both sockets: a cut transfer never looks complete)."""
    broken = False
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    async def up(pipe: _Pipe) -> None:  # client -> home, within the home's credit
        while True:
            room = await stream.credit()
            n = await _move(client.socket, data.socket, pipe, min(room, CHUNK))
            if not n:
                data.socket.shutdown(socket.SHUT_WR)
                await stream.send_eof()  # closes the stream's state at the home
                return
            stream.spend(n)

    async def down(pipe: _Pipe) -> None:  # home -> client, credit back as it leaves
        while True:
            n = await _move(data.socket, client.socket, pipe, CHUNK)
            if not n:
                if stream.error is not None:  # a RESET shut the socket: not an end
                    raise trio.BrokenResourceError(stream.error)
                client.socket.shutdown(socket.SHUT_WR)
                return
            if not stream.took(n):
                raise trio.BrokenResourceError("the home sent more than the stream's window")

    async def run(direction: Callable[[_Pipe], Awaitable[None]]) -> None:
        nonlocal broken
        pipe = _Pipe()
        try:
            await direction(pipe)
        except SPLICE_ERRORS:
            broken = True
            nursery.cancel_scope.cancel()
        finally:
            pipe.close()

    def on_fail() -> None:  # RESET or the session lost: both sockets end now
        abort(client.socket)
        abort(data.socket)

    stream.attach(on_fail)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, up)
        nursery.start_soon(run, down)
    return not broken
