"""TLS over any trio stream: an `ssl.SSLObject` between two memory BIOs, kept lean.

What trio's `SSLStream` does, for the shapes tunneld needs: the daemon's every
client stream (a server over a `MuxStream`, the ClientHello already read), the
daemon's session to the relay and the relay's `/v1/tunnel` endpoint. Under
small requests trio's SSLStream was about a fifth of the daemon's samples, crypto
included; its generic retry loop (two locks, a checkpoint and a BIO round per
call) is the part left out here. A read is
`SSLObject.read` and, only when it wants bytes, one `receive_some` of the
transport; a write is `SSLObject.write` and one `send_all`. Over a `MuxStream`,
`pass_through` lets the session reader do a waiting receiver's decryption and
forwarding itself (an upgraded connection's bytes, with no task switch).

Same contract as `trio.SSLStream` where the proxy relies on it: SSL errors and
an EOF without close_notify raise `trio.BrokenResourceError` (cause kept); a
close_notify reads as b""; concurrent receives (or sends) raise
`trio.BusyResourceError`; `aclose()` sends close_notify without waiting for the
peer's. One task may receive while another sends: bytes OpenSSL writes (a TLS
1.3 KeyUpdate answer while reading, say) reach the transport in the order they
were made, one sender at a time. A TLS 1.3 server's session tickets wait for
its first send, as trio does (openssl/openssl#7948).
"""

from __future__ import annotations

import copy
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from tunneld.transport import contract

__all__ = ["SESSION_RECEIVE", "TLSStream"]

RECEIVE_SIZE = 64 * 1024  # transport reads, unless `receive_size` says otherwise
RECORD_HEADER = 5  # fewer bytes than this in the incoming BIO cannot be a record
# a session's socket: big reads, few wakeups (docs/ARCHITECTURE.md, the performance levers)
SESSION_RECEIVE = 256 * 1024


class TLSStream(trio.abc.Stream):
    """TLS on `transport_stream`; `prefix` holds bytes already read from it (a ClientHello)."""

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        prefix: bytes = b"",
        receive_size: int = RECEIVE_SIZE,
    ) -> None:
        self.transport_stream = transport_stream
        self._receive_size = receive_size
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        if prefix:
            self._incoming.write(prefix)
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._handshook = False
        self._handshaking: trio.Event | None = None  # set when a handshake under way ends
        self._leftover = b""  # read, but its receive_some was cancelled while flushing
        self._broken: BaseException | None = None
        self._closed = False
        self._receiving = False
        self._sending = False
        self._transport_busy = False  # a task is in transport_stream.send_all
        self._turns = trio.lowlevel.ParkingLot()
        self._delayed = b""  # a TLS 1.3 server's session tickets, sent with its first write
        # pass_through: the receiver waits in the transport; bytes of the transport's
        # that a pass-through already decrypted (the receiver drops them); the peer's
        # close_notify or a TLS error a pass-through met (the receiver reports them).
        self._filling = False
        self._skip = 0
        self._peer_closed = False
        self._pending_error: ssl.SSLError | None = None

    # -- state ---------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream already closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("TLS stream is broken") from self._broken

    def _fail(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = _kept(exc)
        error = trio.BrokenResourceError(str(exc) or type(exc).__name__)
        error.__cause__ = exc
        return error

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._ssl.version()

    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's verified certificate (a client certificate, on a server), or None."""
        return self._ssl.getpeercert() or None  # type: ignore[return-value]

    # -- transport -------------------------------------------------------------
    async def _flush(self) -> None:
        """Send what OpenSSL wrote, in order: one task on the transport at a time."""
        while self._transport_busy:
            await self._turns.park()
        data = self._outgoing.read()
        if self._delayed:
            data, self._delayed = self._delayed + data, b""
        if not data:
            return
        self._transport_busy = True
        try:
            await self.transport_stream.send_all(data)
        except BaseException as exc:
            # Part of a record may have gone (even when cancelled): nothing can follow it.
            self._broken = self._broken or _kept(exc)
            raise
        finally:
            self._transport_busy = False
            self._turns.unpark_all()

    async def _fill(self) -> None:
        """One read of the transport into the incoming BIO (EOF included)."""
        self._filling = True
        try:
            data = await self.transport_stream.receive_some(self._receive_size)
        except (trio.BrokenResourceError, OSError) as exc:
            self._broken = self._broken or _kept(exc)
            raise
        finally:
            self._filling = False
        if not data:
            self._incoming.write_eof()
            return
        if self._skip:  # a pass-through decrypted these already
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if data:
            self._incoming.write(data)

    async def _want_bytes(self) -> None:
        """OpenSSL needs more of the peer's bytes: send what it wrote first (it may be
        what the peer waits for), then read the transport."""
        if self._outgoing.pending:
            await self._flush()
        await self._fill()

    # -- trio.abc.Stream -------------------------------------------------------
    async def do_handshake(self) -> None:
        self._check()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        if self._handshaking is not None:  # another task is at it: wait for its result
            await self._handshaking.wait()
            self._check()
            return
        self._handshaking = trio.Event()
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    await self._fill()
                except ssl.SSLError as exc:
                    await self._flush_quietly()  # the alert tells the peer why
                    raise self._fail(exc) from exc
            self._handshook = True
            if self._ssl.server_side and self._ssl.version() == "TLSv1.3":
                # The final flight went out above; what is left is session tickets.
                self._delayed = self._outgoing.read()
            else:
                await self._flush()
        finally:
            self._handshaking.set()

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = contract.receive_size(max_bytes, RECEIVE_SIZE)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._check()
        if not self._handshook:
            await self.do_handshake()
        self._receiving = True
        # A transport read was made: that is this call's checkpoint, and what it
        # brought is worth a read().
        filled = False
        try:
            incoming, tls = self._incoming, self._ssl
            while True:
                if self._leftover or self._pending_error is not None:  # a pass-through's
                    return await self._handed_over(size)
                # Nothing to decrypt: read() would only raise SSLWantReadError, which
                # costs as much as a small record's decryption. Read the transport first.
                if not (filled or incoming.pending or incoming.eof or tls.pending()):
                    if not self._peer_closed:  # else read() returns b"" again
                        await self._want_bytes()
                        filled = True
                        continue
                try:
                    data = tls.read(size)
                except ssl.SSLWantReadError:
                    await self._want_bytes()
                    filled = True
                    continue
                except ssl.SSLZeroReturnError:
                    data = b""  # close_notify: a clean end
                except ssl.SSLError as exc:
                    raise self._fail(exc) from exc
                if data and len(data) < size and incoming.pending >= RECORD_HEADER:
                    data = self._read_more(data, size)
                if self._outgoing.pending:  # a KeyUpdate answer, say
                    try:
                        await self._flush()
                    except trio.Cancelled:
                        self._leftover = data  # already decrypted: the next call gets it
                        raise
                elif not filled:
                    await trio.lowlevel.checkpoint()
                return data
        finally:
            self._receiving = False

    def _read_more(self, first: bytes, size: int) -> bytes:
        """`first` and the records after it that are already in, up to `size` bytes: one
        call returns what a 256 KiB transport read brought, not one 16 KiB record. What
        ends the run (the peer's close_notify, a TLS error) is met by the next call."""
        parts, n = [first], len(first)
        tls, incoming = self._ssl, self._incoming
        while n < size and incoming.pending >= RECORD_HEADER:
            try:
                more = tls.read(size - n)
            except ssl.SSLWantReadError:
                break  # a partial record: the rest is still on its way
            except ssl.SSLZeroReturnError:
                break  # close_notify: the next read() says so again
            except ssl.SSLError as exc:
                self._pending_error = exc  # reported after this data, by the next call
                break
            if not more:
                break
            parts.append(more)
            n += len(more)
        return first if len(parts) == 1 else b"".join(parts)

    async def _handed_over(self, max_bytes: int) -> bytes:
        """What a pass-through left for the receiver: plaintext it could not forward
        (before anything else), then the TLS error it met."""
        if self._outgoing.pending:  # a KeyUpdate answer, say
            await self._flush()
        else:
            await trio.lowlevel.checkpoint()
        if self._leftover:
            data = self._leftover[:max_bytes]
            self._leftover = self._leftover[max_bytes:]
            return data
        exc, self._pending_error = self._pending_error, None
        assert exc is not None
        raise self._fail(exc) from exc

    def pass_through(self, forward: Callable[[bytes], int]) -> Callable[[bytes], int]:
        """A sink for the transport's `deliver_to` (a `MuxStream`): while this stream's
        receiver waits for the transport with nothing in hand, the session reader
        decrypts what arrives and hands the plaintext to `forward` (a non-blocking
        socket's `send`), with no task switch. Anything else (plaintext `forward` did
        not take, the peer's close_notify, a TLS error, bytes OpenSSL must send) is
        left to the receiver, in order: the next `receive_some` returns or raises it."""
        return partial(self._pass, forward)

    def _pass(self, forward: Callable[[bytes], int], data: bytes) -> int:
        if not (
            self._filling
            and self._handshook
            and not (self._skip or self._leftover or self._peer_closed or self._closed)
            and self._pending_error is None
            and self._broken is None
            and not self._incoming.pending
            and not self._ssl.pending()
        ):
            raise BlockingIOError  # not in a state to do the receiver's work: it will
        self._incoming.write(data)
        queued = self._outgoing.pending  # a sender's, which it flushes itself
        parts: list[bytes] = []
        try:
            while chunk := self._ssl.read(RECEIVE_SIZE):
                parts.append(chunk)
            self._peer_closed = True  # b"": close_notify
        except ssl.SSLWantReadError:
            pass  # all of it decrypted (or a partial record kept by OpenSSL)
        except ssl.SSLZeroReturnError:
            self._peer_closed = True
        except ssl.SSLError as exc:
            self._pending_error = exc
        plain = b"".join(parts)
        # Bytes OpenSSL wrote while reading (a KeyUpdate answer, an alert) go out
        # through the receiver, as they would have.
        clean = not (
            self._peer_closed or self._pending_error is not None or self._outgoing.pending > queued
        )
        sent = 0
        if plain and clean:
            try:
                sent = forward(plain)
            except OSError:  # full, or broken: the receiver's own send finds out
                sent = 0
        if clean and sent == len(plain):
            return len(data)
        # The receiver takes over: it drops these transport bytes when they reach it,
        # returns what is left of the plaintext, then meets the rest.
        self._leftover = plain[sent:]
        self._skip += len(data)
        raise BlockingIOError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check()
        if not self._handshook:
            await self.do_handshake()
        self._sending = True
        try:
            if data:
                try:
                    self._ssl.write(data)
                except ssl.SSLError as exc:
                    raise self._fail(exc) from exc
            await self._flush()
            if not data:
                await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """close_notify (without waiting for the peer's), then close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshook and self._broken is None:
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass  # SSLWantReadError: the peer's close_notify is not awaited
                self._delayed = b""
                await self._flush_quietly()
        finally:
            await self.transport_stream.aclose()


def _kept(exc: BaseException, depth: int = 0) -> BaseException:
    """`exc` without its traceback, to keep as the reason the stream broke. The
    traceback's frames refer back to the stream, and that cycle held every broken stream
    (its SSL object and buffers) until a full collection: most clients vanish without
    close_notify, so under load that was a long pause every few seconds. Its causes are
    kept the same way (a few deep), so a later error still says what happened."""
    kept: BaseException
    if isinstance(exc, BaseExceptionGroup):  # a shallow copy would keep its members' frames
        kept = trio.BrokenResourceError(str(exc))
    else:
        try:
            kept = copy.copy(exc)
        except Exception:  # noqa: BLE001 - trio.Cancelled, say, has no public constructor
            kept = trio.BrokenResourceError(str(exc) or type(exc).__name__)
    kept.__traceback__ = None
    cause = exc.__cause__ or exc.__context__
    if cause is not None and depth < 3:
        kept.__cause__ = _kept(cause, depth + 1)
    return kept
