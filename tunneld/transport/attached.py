"""A client connection whose bytes travel on a data connection of their own.

The session keeps the stream (ATTACH opened it; WINDOW, EOF and RESET still go
there), and the stream's credit rules hold as for DATA frames: a sender writes
only what its credit allows, a receiver returns credit for what it consumed. Only
the bytes move: straight on a TCP connection, so they are framed and encrypted
once (the client's own TLS) instead of again inside the session, and the relay
can pass them on in the kernel (kernelsplice.py). PROTOCOL.md section 11.

`AttachedStream` is a trio HalfCloseableStream
(tests/transport/test_stream_contract.py): a home's stream handler uses it as it
would a MuxStream.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import trio

from tunneld.transport import contract
from tunneld.transport.rawsock import RawSocketStream
from tunneld.transport.session import ClientStream, MuxStream
from tunneld.wire import events as ev

RECEIVE_SIZE = 256 * 1024
SEND_PIECE = 256 * 1024  # credit is taken at most this much at a time
LINGER_SECONDS = 1.0  # a closed stream reads and drops what the peer still sends...
LINGER_BYTES = 256 * 1024  # ...for this long, and this much at most


def abort(sock: socket.socket) -> None:
    """RST instead of FIN at close, and wake whatever waits on the socket now."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already, or never connected
        pass


def still_open(sock: socket.socket) -> bool:
    """The peer has not ended or reset the connection (bytes may be waiting)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


class AttachedStream(ClientStream):
    def __init__(
        self,
        stream: MuxStream,
        data: RawSocketStream,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """`on_close` runs once, when the stream is closed."""
        self._mux = stream
        self._on_close = on_close
        self._data = data
        self.stream_id = stream.stream_id
        self.client_ip = stream.client_ip
        self.client_port = stream.client_port
        self.sni = stream.sni
        self._sending = False
        self._closed = False
        stream.attach(lambda: abort(data.socket))

    @property
    def socket(self) -> socket.socket:
        return self._data.socket

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")

    def _broken_by_session(self) -> trio.BrokenResourceError | None:
        error = self._mux.error
        return None if error is None else trio.BrokenResourceError(error)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = contract.receive_size(max_bytes, RECEIVE_SIZE)
        self._check_open()
        data = await self._data.receive_some(size)
        if not data:
            broken = self._broken_by_session()  # a RESET shuts the socket: not an EOF
            if broken is not None:
                raise broken
            return b""
        if not self._mux.took(len(data)):
            self.reset(ev.ResetCode.FLOW_CONTROL_ERROR)
            raise trio.BrokenResourceError("the peer sent more than the stream's window")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            with memoryview(data) as raw, raw.cast("B") as view:
                if not view:
                    await self._data.send_all(b"")  # checks the socket, a checkpoint
                    return
                sent = 0
                while sent < len(view):
                    room = await self._credit()
                    piece = view[sent : sent + min(room, SEND_PIECE)]
                    self._mux.spend(len(piece))
                    await self._data.send_all(piece)
                    sent += len(piece)
        finally:
            self._sending = False

    async def _credit(self) -> int:
        try:
            return await self._mux.credit()
        except trio.ClosedResourceError:
            if self._closed:
                raise
            # Our EOF went out on the data connection: what the socket would say.
            raise trio.ClosedResourceError("cannot send after send_eof") from None

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_open()
            await self._credit()
            await self._data.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_open()
        await self._data.send_eof()
        broken = self._broken_by_session()
        if broken is not None:
            raise broken
        if not self._mux._local_closed:
            await self._mux.send_eof()  # the session's EOF closes the stream's state

    def reset(self, code: int = ev.ResetCode.CANCEL) -> None:
        """Abort both directions: RESET on the session, TCP reset on the data
        connection, which is closed now (a no-op once the stream is closed)."""
        if self._closed:
            return
        self._closed = True
        self._mux.reset(code)
        abort(self._data.socket)
        trio.lowlevel.notify_closing(self._data.socket)
        self._data.socket.close()
        self._released()

    @property
    def closed(self) -> bool:
        return self._closed

    def _released(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    async def aclose(self) -> None:
        """Close like a server's lingering close: our bytes are delivered (FIN), and
        what the peer still sends is read and dropped, its credit returned, for up to
        LINGER_SECONDS or until its end: closing a socket with unread bytes would
        reset it, and a reset can drop our last bytes before the peer read them.
        Cancelled, it closes at once, after dropping what already arrived."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            self._drop_unread()
            if not self._mux.finished:
                with trio.move_on_after(LINGER_SECONDS):
                    await self._linger()
        finally:
            self._released()
            try:  # each aclose does its work before its checkpoint: both run, cancelled or not
                await self._mux.aclose()
            finally:
                await self._data.aclose()

    def _drop_unread(self) -> int:
        """Read and drop what the socket holds now, returning its credit; the bytes."""
        dropped = 0
        while dropped < LINGER_BYTES:
            try:
                data = self._data.socket.recv(RECEIVE_SIZE)
            except OSError:  # empty (BlockingIOError), or reset
                break
            if not data:
                break
            dropped += len(data)
            self._mux.took(len(data))
        return dropped

    async def _linger(self) -> None:
        try:
            await self._data.send_eof()
            dropped = 0
            while dropped < LINGER_BYTES:
                data = await self._data.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                dropped += len(data)
                self._mux.took(len(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
