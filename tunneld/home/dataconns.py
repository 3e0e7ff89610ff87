"""The data connections the daemon opens to the relay when it asks (PROTOCOL.md 11).

For each DIAL the daemon opens a TCP connection to the relay's address (the one
the session uses), presents the DIAL's ticket, and keeps the connection until an
ATTACH names that ticket: a client connection's bytes then travel on it
(transport/attached.py), TLS end to end as ever, without the session's framing
and encryption around them. A ticket comes only over the session (encrypted,
authenticated) and is good once, so the line in clear on the data connection
gives an observer nothing to reuse.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from tunneld.transport.attached import AttachedStream, still_open
from tunneld.transport.rawsock import RawSocketStream
from tunneld.transport.session import ClientStream, MuxStream
from tunneld.transport.splice import aclose_quietly
from tunneld.wire.dataconn import preamble

log = logging.getLogger("tunneld.connector")

ATTACH_WAIT = 30.0  # a client's bytes came first: how long its ATTACH may take


@dataclass
class _Ready:
    stream: RawSocketStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    attached: bool = False


@dataclass(frozen=True)
class DialerStatistics:
    ready: int  # open, waiting for a client
    in_use: int  # carrying a client connection
    dialed_total: int
    failed_total: int


class DataDialer:
    """One session's data connections. `connect()` opens a TCP connection to the
    relay; `limit` caps how many are open at once; `timeout` bounds each dial."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[RawSocketStream]],
        limit: int,
        timeout: float,
    ) -> None:
        self._connect = connect
        self.limit = limit
        self._timeout = timeout
        self._ready: dict[bytes, _Ready] = {}
        self._dialing = 0
        self.in_use = 0
        self.dialed_total = 0
        self.failed_total = 0
        self._send, self._receive = trio.open_memory_channel[bytes](limit)

    def statistics(self) -> DialerStatistics:
        return DialerStatistics(len(self._ready), self.in_use, self.dialed_total, self.failed_total)

    def dial_soon(self, ticket: bytes) -> None:
        """The relay asked for a data connection (DIAL); over the limit it is ignored,
        and the relay's ticket expires."""
        if self._dialing + len(self._ready) + self.in_use >= self.limit:
            log.debug("DIAL ignored: %d data connections open already", self.limit)
            return
        try:
            self._send.send_nowait(ticket)
            self._dialing += 1
        except trio.WouldBlock:
            pass

    async def run(self) -> None:
        """Dial as asked until cancelled (the session's end); then close them all."""
        try:
            async with trio.open_nursery() as nursery:
                async for ticket in self._receive:
                    nursery.start_soon(self._dial, ticket)
        finally:
            for ready in list(self._ready.values()):
                ready.scope.cancel()
            with trio.CancelScope(shield=True):
                for ticket in list(self._ready):
                    await aclose_quietly(self._ready.pop(ticket).stream)

    async def _dial(self, ticket: bytes) -> None:
        try:
            with trio.fail_after(self._timeout):
                stream = await self._connect()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.failed_total += 1
            log.info("data connection to the relay failed: %s", exc)
            return
        finally:
            self._dialing -= 1
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        ready = _Ready(stream)
        self._ready[ticket] = ready  # before the line: an ATTACH may follow it at once
        self.dialed_total += 1
        try:
            with ready.scope:
                await stream.send_all(preamble(ticket))
                await trio.lowlevel.wait_readable(stream.socket)
                if still_open(stream.socket):  # a client's bytes, ahead of their ATTACH
                    await trio.sleep(ATTACH_WAIT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if ready.attached:
            return  # the stream handler owns it now
        # The relay closed it (its session ended, or it aged out), or no ATTACH came.
        self._ready.pop(ticket, None)
        await aclose_quietly(stream)

    def attach(self, stream: MuxStream, ticket: bytes) -> ClientStream | None:
        """The client stream for an ATTACH naming `ticket`, or None if we hold no such
        data connection (the session then refuses the stream)."""
        ready = self._ready.pop(ticket, None)
        if ready is None:
            return None
        ready.attached = True
        ready.scope.cancel()  # its dialer stops watching it, synchronously
        self.in_use += 1
        return AttachedStream(stream, ready.stream, on_close=self._released)

    def _released(self) -> None:
        self.in_use -= 1
