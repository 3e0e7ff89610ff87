"""The data connections a session's home holds open to this relay (PROTOCOL.md 11).

The relay asks the home for each one (DIAL, with a fresh random ticket, on the
session, which is encrypted and authenticated); the home opens a TCP connection
to the relay's public port and presents the ticket. A ticket is good once, for
`ASK_TIMEOUT` seconds, for the session that asked. Arrived connections wait idle
until a client comes; each client takes one (its bytes then go through the kernel,
kernelsplice.py) and the pool asks for another. Without an idle one, a client's
bytes go in DATA frames on the session, as before.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from tunneld.errors import ProtocolError
from tunneld.transport.attached import still_open
from tunneld.transport.rawsock import RawSocketStream
from tunneld.wire.events import TICKET_SIZE

log = logging.getLogger("tunneld.relay")

ASK_TIMEOUT = 30.0  # seconds a ticket waits for its connection
IDLE_TIMEOUT = 240.0  # an idle data connection is replaced after this (NAT mappings age)
REFILL_INTERVAL = 5.0  # seconds between checks for tickets that never came


@dataclass
class _Idle:
    ticket: bytes
    stream: RawSocketStream
    since: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    taken: bool = False


@dataclass(frozen=True)
class PoolStatistics:
    idle: int
    in_use: int
    asked: int  # tickets sent and not yet presented
    used_total: int  # clients whose bytes went on a data connection
    fallback_total: int  # clients that found none idle (their bytes went in DATA frames)


class DataPool:
    """`size`: idle connections to keep; `limit`: most the home holds at once (its
    HELLO); `dial(ticket)` sends DIAL; `tickets` is the relay's ticket -> pool map."""

    def __init__(
        self,
        size: int,
        limit: int,
        dial: Callable[[bytes], None],
        tickets: dict[bytes, DataPool],
    ) -> None:
        self.size = size
        self.limit = limit
        self._dial = dial
        self._tickets = tickets
        self._asked: dict[bytes, float] = {}  # ticket -> when (monotonic)
        self._idle: deque[_Idle] = deque()
        self.in_use = 0
        self.used_total = 0
        self.fallback_total = 0
        self.closed = False

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            len(self._idle), self.in_use, len(self._asked), self.used_total, self.fallback_total
        )

    def refill(self) -> None:
        """Forget tickets that never came; ask for connections up to `size` idle."""
        now = time.monotonic()
        for ticket, asked in list(self._asked.items()):
            if now - asked > ASK_TIMEOUT:
                self._forget(ticket)
        while (
            not self.closed
            and len(self._idle) + len(self._asked) < self.size
            and self.in_use + len(self._idle) + len(self._asked) < self.limit
        ):
            ticket = secrets.token_bytes(TICKET_SIZE)
            self._asked[ticket] = now
            self._tickets[ticket] = self
            try:
                self._dial(ticket)
            except (trio.BrokenResourceError, ProtocolError):  # the session is closing
                self._forget(ticket)
                return

    def _forget(self, ticket: bytes) -> None:
        self._asked.pop(ticket, None)
        if self._tickets.get(ticket) is self:
            del self._tickets[ticket]

    def take(self) -> tuple[bytes, RawSocketStream] | None:
        """An idle data connection for a client, with its ticket (the caller owns it
        now and calls `release` when done), or None."""
        while self._idle:
            idle = self._idle.popleft()
            if not still_open(idle.stream.socket):
                idle.scope.cancel()  # its holder closes it
                continue
            idle.taken = True
            idle.scope.cancel()  # its holder stops watching it, synchronously
            self.in_use += 1
            self.used_total += 1
            self.refill()
            return idle.ticket, idle.stream
        self.fallback_total += 1
        self.refill()
        return None

    def release(self) -> None:
        """A client's data connection is done with."""
        self.in_use -= 1
        self.refill()

    async def hold(self, ticket: bytes, stream: RawSocketStream) -> bool:
        """Keep a connection that presented `ticket` idle until a client takes it
        (True: the taker owns it now) or it ends, ages or the pool closes (False: the
        caller closes it). Refused (False) if the ticket is not this pool's."""
        if self._asked.pop(ticket, None) is None or self.closed:
            return False
        self._forget(ticket)
        idle = _Idle(ticket, stream, time.monotonic())
        self._idle.append(idle)
        with idle.scope:
            idle.scope.deadline = trio.current_time() + IDLE_TIMEOUT
            # An idle connection carries nothing until ATTACH: readable means the home
            # closed it (or broke the protocol).
            await trio.lowlevel.wait_readable(stream.socket)
        if idle.taken:
            return True
        if idle in self._idle:
            self._idle.remove(idle)
        self.refill()
        return False

    def close(self) -> None:
        """The session ended: every idle connection closes, no ticket is good."""
        self.closed = True
        for ticket in list(self._asked):
            self._forget(ticket)
        for idle in self._idle:
            idle.scope.cancel()
        self._idle.clear()
