"""The first line of a data connection (PROTOCOL.md section 11), sans-IO.

A data connection is a TCP connection the home opens to the relay's public port
when the relay asks for one (DIAL, on the session). It starts with one ASCII
line naming the ticket the DIAL carried::

    TUNNELD-DATA/1 <32 hex digits>\\n

and then carries one client connection's bytes, untouched (the client's TLS),
once the relay has sent ATTACH for it. The line cannot be mistaken for a TLS
ClientHello (whose first byte is 0x16), so the relay tells the two apart from
the first byte.
"""

from __future__ import annotations

import binascii
import enum
from typing import Final

from tunneld.wire.events import TICKET_SIZE

MAGIC: Final = b"TUNNELD-DATA/1 "
LINE_SIZE: Final = len(MAGIC) + 2 * TICKET_SIZE + 1  # with the newline: 48 bytes


class Preamble(enum.Enum):
    NEED_MORE = "need_more"  # a prefix of a valid line so far
    NOT_DATA = "not_data"  # not a data connection (a TLS client, say)
    MALFORMED = "malformed"  # starts like one, but the line is wrong


def is_data_start(first: bytes | bytearray) -> bool:
    """The first bytes of a connection could begin a data connection's line."""
    n = min(len(first), len(MAGIC))
    return n > 0 and first[:n] == MAGIC[:n]


def preamble(ticket: bytes) -> bytes:
    if len(ticket) != TICKET_SIZE:
        raise ValueError(f"a ticket is exactly {TICKET_SIZE} bytes")
    return MAGIC + ticket.hex().encode("ascii") + b"\n"


def parse_preamble(buf: bytes | bytearray) -> tuple[bytes, int] | Preamble:
    """(ticket, bytes the line took) or why not. Bytes after the line belong to the
    connection's payload; a data connection's home sends none before ATTACH."""
    if not is_data_start(buf):
        return Preamble.NOT_DATA
    if len(buf) < LINE_SIZE:
        return Preamble.NEED_MORE if b"\n" not in buf else Preamble.MALFORMED
    line = bytes(buf[:LINE_SIZE])
    digits = line[len(MAGIC) : -1]
    if line[-1:] != b"\n" or digits != digits.lower():
        return Preamble.MALFORMED
    try:
        ticket = binascii.unhexlify(digits)
    except (binascii.Error, ValueError):
        return Preamble.MALFORMED
    return ticket, LINE_SIZE
