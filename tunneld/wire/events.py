"""Multiplexer events: what `Connection.next_event` returns and `send` accepts.

Each event is one frame on the wire (PROTOCOL.md documents the bytes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1


class FrameType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    OPEN = 0x03
    DATA = 0x04
    WINDOW = 0x05
    EOF = 0x06
    RESET = 0x07
    BAN = 0x08
    GOAWAY = 0x09
    PING = 0x0A
    PONG = 0x0B
    DIAL = 0x0C  # data connections (PROTOCOL.md section 11)
    ATTACH = 0x0D


TICKET_SIZE = 16  # bytes of a data connection's ticket


class ResetCode(enum.IntEnum):
    """Why a stream was reset (RESET) or a session is going away (GOAWAY)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    REFUSED = 4  # stream refused before any byte was processed (limits, bans)
    CANCEL = 5  # the stream's endpoint went away abnormally
    UPSTREAM_FAILED = 6  # home could not reach the upstream
    TLS_FAILED = 7  # the TLS handshake at home failed or timed out
    REPLACED = 8  # GOAWAY: a newer session claimed this session's hostnames
    SHUTDOWN = 9  # GOAWAY: the peer is shutting down or restarting


@dataclass(frozen=True)
class Event:
    """Base class of every multiplexer event."""


@dataclass(frozen=True)
class Hello(Event):
    """Home -> relay, first frame: versions, claimed hostnames, home's limits."""

    version: str  # the daemon's software version
    hostnames: tuple[str, ...]
    window: int  # per-stream receive window the home offers (relay's send credit)
    max_streams: int  # most concurrent streams the home accepts
    protocol: int = PROTOCOL_VERSION
    data_connections: int = 0  # most data connections the home holds at once; 0: none


@dataclass(frozen=True)
class Welcome(Event):
    """Relay -> home, answer to HELLO: what the relay confirmed, relay's limits."""

    session_id: str
    hostnames: tuple[str, ...]
    window: int  # per-stream receive window the relay offers (home's send credit)
    ping_interval: float  # seconds; the home pings at this interval
    protocol: int = PROTOCOL_VERSION
    data_connections: int = 0  # idle data connections the relay keeps ready; 0: none
    access: bool = False  # the relay enforces BAN frames' access rules (PROTOCOL.md 10)


@dataclass(frozen=True)
class Open(Event):
    """Relay -> home: a client connected for one of the session's hostnames.

    With a `ticket` (an ATTACH frame) the stream's bytes travel on the data
    connection that presented it, and the session carries the rest (WINDOW, EOF,
    RESET); without, in DATA frames (OPEN)."""

    stream_id: int
    client_ip: str
    client_port: int
    sni: str
    ticket: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Dial(Event):
    """Relay -> home: open a data connection to the relay, presenting `ticket`."""

    ticket: bytes = field(repr=False)


@dataclass(frozen=True)
class Data(Event):
    stream_id: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Window(Event):
    """Credit: the receiver consumed `increment` more bytes of the stream."""

    stream_id: int
    increment: int


@dataclass(frozen=True)
class Eof(Event):
    """Half-close: the sender will send no more DATA on this stream."""

    stream_id: int


@dataclass(frozen=True)
class Reset(Event):
    """Abort the stream in both directions; no more frames for it."""

    stream_id: int
    code: int = ResetCode.CANCEL


@dataclass(frozen=True)
class BanEntry:
    ip: str
    until: float | None  # Unix time; None = until removed


@dataclass(frozen=True)
class AccessRule:
    """Which clients may reach `hostname` ("*": every hostname of the session without
    a rule of its own): none in `deny`, and, when `allow` is not empty, only those in it."""

    hostname: str
    allow: tuple[str, ...] = ()  # CIDR strings
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ban(Event):
    """Home -> relay: client addresses the relay must refuse for this session.

    With `replace` the list is the whole ban list (sent after every connect);
    without, the entries are added (until in the past = lifted). `access`, when
    not None, replaces the session's whole access policy (an optional key: a relay
    that predates it ignores it).
    """

    entries: tuple[BanEntry, ...]
    replace: bool = True
    access: tuple[AccessRule, ...] | None = None


@dataclass(frozen=True)
class GoAway(Event):
    """Drain: no new streams on this session; existing ones may finish."""

    code: int = ResetCode.NO_ERROR
    reason: str = ""


@dataclass(frozen=True)
class Ping(Event):
    payload: bytes  # exactly 8 bytes, echoed in PONG


@dataclass(frozen=True)
class Pong(Event):
    payload: bytes


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The byte stream ended cleanly between frames (receive_data(b""))."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
