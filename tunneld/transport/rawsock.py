"""A connected TCP socket as a trio stream, used directly.

trio's `SocketStream` runs every call through a generic helper: an async
context manager and a conflict detector around each system call. This stream
makes the system call itself and keeps trio's stream contract
(`trio.testing.check_half_closeable_stream`, tests/transport/test_stream_contract.py):

- every call is a checkpoint: cancellation is checked first
  (`checkpoint_if_cancelled`), and a call that did not wait makes one scheduler
  pass before it returns, so a flood on one socket (a session carrying a bulk
  upload, say) still lets every other task run;
- a receive after a short read waits for the socket first instead of trying
  recv() for an EAGAIN (a syscall and an exception);
- OS errors are `trio.BrokenResourceError` (cause kept), use after close is
  `trio.ClosedResourceError`, two concurrent receives (or sends) are
  `trio.BusyResourceError`; `send_eof` half-closes, `aclose` wakes any waiter.
"""

from __future__ import annotations

import socket

import trio

from tunneld.transport import contract

__all__ = ["SESSION_UNSENT", "RawSocketStream", "raw_stream"]

RECEIVE_SIZE = 64 * 1024
# Unsent bytes a session socket's kernel buffer may hold (TCP_NOTSENT_LOWAT). The
# kernel grows a send buffer to megabytes on a long link, and whatever sits there
# is first in, first out: a small answer queued behind a download's megabyte waits
# for it. Kept short, the queue stays in the mux, which serves streams in turn.
SESSION_UNSENT = 64 * 1024


class RawSocketStream(trio.abc.HalfCloseableStream):
    """`socket` is a connected stdlib TCP socket; the stream makes it non-blocking
    and sets TCP_NODELAY (as trio does: small writes are requests, not a stream)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._closed = False
        self._eof_sent = False
        self._receiving = False
        self._sending = False
        # The last read was short and nothing was sent since, so the socket is most likely
        # still empty (a splice reading the same side again): the next read waits first
        # instead of trying recv() for an EAGAIN, a syscall and an exception. A send may
        # bring an answer, so it clears this (a request/response exchange reads at once).
        self._drained = False

    def _broken(self, exc: OSError) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(str(exc) or type(exc).__name__)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this socket")
        size = contract.receive_size(max_bytes, RECEIVE_SIZE)
        self._receiving = True
        try:
            waited = False
            if self._drained and not self._closed:
                self._drained = False
                await trio.lowlevel.wait_readable(self.socket)
                waited = True
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket already closed")
                try:
                    data = self.socket.recv(size)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.socket)
                    waited = True
                    continue
                except OSError as exc:
                    raise self._broken(exc) from exc
                self._drained = 0 < len(data) < size
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int = RECEIVE_SIZE) -> bytes | None:
        """What the socket holds right now (b"" at EOF), or None when it is empty.
        Not a checkpoint: the caller's next async call is."""
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
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof")
            if type(data) is bytes:  # the usual case: all of it in one send, no view
                try:
                    sent = self.socket.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise self._broken(exc) from exc
                if sent == len(data):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                data = memoryview(data)[sent:]
            waited = False
            with memoryview(data) as raw, raw.cast("B") as view:
                sent, total = 0, len(view)
                while sent < total:
                    try:
                        sent += self.socket.send(view[sent:])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self.socket)
                        waited = True
                    except OSError as exc:
                        raise self._broken(exc) from exc
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this socket")
        if self._closed:
            raise trio.ClosedResourceError("socket already closed")
        self._sending = True
        try:
            await trio.lowlevel.wait_writable(self.socket)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this socket")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("socket already closed")
        if self._eof_sent:
            return
        self._eof_sent = True
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


def raw_stream(stream: trio.SocketStream, *, unsent: int | None = None) -> RawSocketStream:
    """The socket under a freshly connected `trio.SocketStream`, as a RawSocketStream;
    `unsent` caps the bytes its kernel send buffer holds unsent (TCP_NOTSENT_LOWAT)."""
    sock = socket.socket(fileno=stream.socket.detach())
    if unsent is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, unsent)
        except (OSError, AttributeError):  # not Linux, or an old kernel: a longer queue
            pass
    return RawSocketStream(sock)
