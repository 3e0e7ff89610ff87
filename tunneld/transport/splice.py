"""Copy bytes both ways between two streams, honouring half-close."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable

import trio

log = logging.getLogger("tunneld.splice")

CHUNK = 64 * 1024
# What a broken peer looks like from trio: the connection is gone, not a bug.
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def splice(a: trio.abc.Stream, b: trio.abc.Stream) -> bool:
    """Pump a->b and b->a until both directions end.

    Returns True when both ended cleanly (EOF), False when either side broke;
    then the caller must abort rather than close, so a cut transfer is never
    presented as complete. A side that cannot half-close (TLS) is closed when
    its peer finishes, which also ends the other direction.
    """
    broken = False
    closing = False  # we closed a stream ourselves: the other pump's error is expected

    async with trio.open_nursery() as nursery:

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
            nonlocal broken, closing
            # A MuxStream takes what fits its credit without a second scheduler pass:
            # the receive just made one (a WebSocket message crosses here each way).
            send_nowait: Callable[[bytes | bytearray], bool] | None = getattr(
                dst, "send_nowait", None
            )
            try:
                while True:
                    data = await src.receive_some(CHUNK)
                    if not data:
                        break
                    if send_nowait is None or not send_nowait(data):
                        await dst.send_all(data)
                if isinstance(dst, trio.abc.HalfCloseableStream):
                    await dst.send_eof()
                    return
                closing = True
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await dst.aclose()
            except STREAM_ERRORS as exc:
                if not closing:
                    log.debug("%s -> %s broke: %r", type(src).__name__, type(dst).__name__, exc)
                    broken = True
            # dst is closed (or the transfer broke): the other direction is over.
            nursery.cancel_scope.cancel()

        nursery.start_soon(pump, a, b)
        nursery.start_soon(pump, b, a)
    return not broken


def abort_socket(stream: trio.abc.Stream) -> None:
    """Make the next close of a TCP stream send RST instead of FIN."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


async def aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.move_on_after(5) as scope:
        scope.shield = True
        try:
            await stream.aclose()
        except STREAM_ERRORS:
            pass
