"""A connected TCP socket as a trio stream, used directly.

trio's `SocketStream` runs every call through a generic helper: an async
context manager, a conflict detector and a scheduler pass after each call that
did not wait. Under small requests those were most of the daemon's socket time.
This stream keeps the contract the proxy relies on and drops the rest:

- a receive that finds bytes waiting returns them at once (cancellation is
  still honoured); it waits on epoll only when the socket is empty;
- a send ends with one scheduler pass (unless it already waited), so a loop
  that only receives and sends still lets other tasks run; after a request
  goes upstream, that pass is also what gives the answer time to arrive;
- OS errors are `trio.BrokenResourceError` (cause kept), use after close is
  `trio.ClosedResourceError`, two concurrent receives (or sends) are
  `trio.BusyResourceError`; `send_eof` half-closes, `aclose` wakes any waiter.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["RawSocketStream", "raw_stream"]

RECEIVE_SIZE = 64 * 1024


class RawSocketStream(trio.abc.HalfCloseableStream):
    """`socket` is a connected stdlib TCP socket; the stream makes it non-blocking."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        self._receiving = False
        self._sending = False

    def _broken(self, exc: OSError) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(str(exc) or type(exc).__name__)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this socket")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket already closed")
                try:
                    return self.socket.recv(max_bytes or RECEIVE_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.socket)
                except OSError as exc:
                    raise self._broken(exc) from exc
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int = RECEIVE_SIZE) -> bytes | None:
        """What the socket holds right now (b"" at EOF), or None when it is empty."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this socket")
        if self._closed:
            raise trio.ClosedResourceError("socket already closed")
        try:
            return self.socket.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise self._broken(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this socket")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise trio.ClosedResourceError("socket already closed")
            waited = False
            with memoryview(data) as raw, raw.cast("B") as view:
                sent, total = 0, len(view)
                while sent < total:
                    try:
                        sent += self.socket.send(view[sent:])
                    except BlockingIOError:
                        waited = True
                        await trio.lowlevel.wait_writable(self.socket)
                    except OSError as exc:
                        raise self._broken(exc) from exc
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket already closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("socket already closed")
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._broken(exc) from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


def raw_stream(stream: trio.SocketStream) -> RawSocketStream:
    """The socket under a freshly connected `trio.SocketStream`, as a RawSocketStream."""
    return RawSocketStream(socket.socket(fileno=stream.socket.detach()))
