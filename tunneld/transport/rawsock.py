"""A connected TCP socket as a trio stream, used directly.

trio's `SocketStream` runs every call through a generic helper: an async
context manager, a conflict detector and a scheduler pass after each call that
did not wait. Under small requests and WebSocket messages those passes were
most of the relay's and the daemon's socket time: a task that has just sent
usually goes on to wait for something anyway. This stream keeps the contract
the proxy and the session rely on and drops the rest:

- a receive that finds bytes waiting returns them at once, and a send that
  fits in the socket buffer returns at once; cancellation is still honoured
  (`checkpoint_if_cancelled`);
- fairness by volume instead of by call: after `FAIR_BYTES` moved without a
  scheduler pass, the call makes one, so a flood on one socket (a session
  carrying a bulk upload, say) still lets every other task run;
- OS errors are `trio.BrokenResourceError` (cause kept), use after close is
  `trio.ClosedResourceError`, two concurrent receives (or sends) are
  `trio.BusyResourceError`; `send_eof` half-closes, `aclose` wakes any waiter.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["FAIR_BYTES", "RawSocketStream", "raw_stream"]

RECEIVE_SIZE = 64 * 1024
# Bytes a stream may move without a scheduler pass: a few reads of a busy socket.
FAIR_BYTES = 64 * 1024


class RawSocketStream(trio.abc.HalfCloseableStream):
    """`socket` is a connected stdlib TCP socket; the stream makes it non-blocking
    and sets TCP_NODELAY (as trio does: small writes are requests, not a stream)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._closed = False
        self._receiving = False
        self._sending = False
        self._unyielded = 0  # bytes moved since this stream last made a scheduler pass
        # The last read was short and nothing was sent since, so the socket is most likely
        # still empty (a splice reading the same side again): the next read waits first
        # instead of trying recv() for an EAGAIN, a syscall and an exception. A send may
        # bring an answer, so it clears this (a request/response exchange reads at once).
        self._drained = False

    def _broken(self, exc: OSError) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(str(exc) or type(exc).__name__)

    async def _moved(self, nbytes: int) -> None:
        """Count bytes moved without waiting; pass to the scheduler past FAIR_BYTES."""
        self._unyielded += nbytes
        if self._unyielded > FAIR_BYTES:
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this socket")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            size = max_bytes or RECEIVE_SIZE
            if self._drained and not self._closed:
                self._drained = False
                await trio.lowlevel.wait_readable(self.socket)
                self._unyielded = 0
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket already closed")
                try:
                    data = self.socket.recv(size)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.socket)
                    self._unyielded = 0
                    continue
                except OSError as exc:
                    raise self._broken(exc) from exc
                self._drained = 0 < len(data) < size
                await self._moved(len(data))
                return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int = RECEIVE_SIZE) -> bytes | None:
        """What the socket holds right now (b"" at EOF), or None when it is empty."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this socket")
        if self._closed:
            raise trio.ClosedResourceError("socket already closed")
        try:
            data = self.socket.recv(max_bytes)
        except BlockingIOError:
            self._drained = True
            return None
        except OSError as exc:
            raise self._broken(exc) from exc
        self._drained = 0 < len(data) < max_bytes
        self._unyielded += len(data)  # the next async call makes up for it if need be
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this socket")
        self._sending = True
        self._drained = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise trio.ClosedResourceError("socket already closed")
            if type(data) is bytes:  # the usual case: all of it in one send, no view
                try:
                    sent = self.socket.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise self._broken(exc) from exc
                if sent == len(data):
                    await self._moved(sent)
                    return
                self._unyielded += sent
                data = memoryview(data)[sent:]
            with memoryview(data) as raw, raw.cast("B") as view:
                sent, total, since_wait = 0, len(view), 0
                while sent < total:
                    try:
                        sent += self.socket.send(view[sent:])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self.socket)
                        self._unyielded, since_wait = 0, sent
                    except OSError as exc:
                        raise self._broken(exc) from exc
            await self._moved(total - since_wait)
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
