"""Sans-IO TLS ClientHello parser: SNI and ALPN, read before any decryption.

The relay routes a connection by the SNI; the home daemon picks its certificate
by the ALPN (`acme-tls/1` gets the ACME challenge certificate). Both feed
`parse_client_hello` everything received so far, from byte 0, until it returns
something other than `Status.NEED_MORE`.

Guarantees: it never raises for any input; its cost is linear in the bytes it
looks at (at most `max_size` plus one record header); and its answers are
prefix-monotonic: over growing prefixes of one byte stream it returns
`NEED_MORE` some number of times, then one final answer that longer prefixes
repeat. Every check runs as soon as the bytes it needs exist, so garbage is
refused early (`NOT_TLS` from the first byte of "GET / ...").

Choices the RFCs leave to us:

* SNI: the host_name must be ASCII letters, digits, `-`, `_` and dots with no
  empty label (one trailing dot allowed, then stripped). Anything else,
  including an empty or non-ASCII name, a second host_name or an empty list,
  is `MALFORMED`: such a client violates RFC 6066 and cannot be routed anyway.
  Entries of unknown name types are skipped (read as u16-length opaque, as Go
  and OpenSSL do).
* ALPN: protocol names are decoded as latin-1, so any byte string (GREASE
  values included) maps one-to-one to a `str`; `name.encode("latin-1")` gives
  the wire bytes back.
* The record holding the end of the ClientHello must end with it: a client
  sends nothing else in a handshake record before the server answers, and
  RFC 8446 requires a record boundary before 0-RTT data.
* SSLv2-compatible ClientHellos (first byte 0x80) are `NOT_TLS`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from tunneld.hostnames import hostname_key

__all__ = [
    "MAX_CLIENT_HELLO",
    "ClientHello",
    "Status",
    "parse_client_hello",
    "unrecognized_name_alert",
]

_MAX_RECORD = 2**14  # largest plaintext fragment a peer may send (RFC 8446 5.1)
_HEADER = 5  # record header: type, version (2), length (2)

# Default bound on the input bytes (record headers included) one ClientHello may
# occupy: a full 16 KiB ClientHello, split over up to four records. Real ones are
# far smaller (about 2 KiB with post-quantum key shares), so this leaves room for
# growth while capping what the relay buffers per connection before routing.
MAX_CLIENT_HELLO = _MAX_RECORD + _HEADER * 4

_CT_HANDSHAKE = 22
_HT_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_TYPE_HOST = 0

# One optional trailing dot; labels of LDH characters plus `_` (seen in the wild).
_HOSTNAME_RE = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")

# TLS fatal alert (level 2) unrecognized_name (112) in a TLS 1.2 record (type 21).
_UNRECOGNIZED_NAME_ALERT = bytes([21, 3, 3, 0, 2, 2, 112])


@dataclass(frozen=True)
class ClientHello:
    """What routing and certificate choice need from a ClientHello."""

    sni: str | None  # normalized (see tunneld.hostnames), ASCII A-label; None if absent
    alpn: tuple[str, ...]  # offered ALPN protocols, in the client's order
    length: int  # input bytes taken by the records holding the ClientHello
    tls_version: tuple[int, int]  # legacy version of the first record, informational


class Status(enum.Enum):
    """Why `parse_client_hello` returned no ClientHello."""

    NEED_MORE = "need_more"  # a prefix of a possibly valid ClientHello: read more
    NOT_TLS = "not_tls"  # the first bytes are not a TLS handshake record
    TOO_LARGE = "too_large"  # the ClientHello would take more than max_size bytes
    MALFORMED = "malformed"  # TLS handshake records, but not a valid ClientHello


class _Malformed(Exception):
    """Internal: the ClientHello body is invalid (never escapes this module)."""


def unrecognized_name_alert() -> bytes:
    """Return the raw TLS fatal `unrecognized_name` alert record, sent before closing."""
    return _UNRECOGNIZED_NAME_ALERT


def parse_client_hello(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_CLIENT_HELLO
) -> ClientHello | Status:
    """Parse the ClientHello at the start of `data` (everything received so far).

    Returns the ClientHello once all records holding it have arrived, else a
    `Status`. The ClientHello may span several handshake records; `max_size`
    bounds the bytes of those records, headers included.
    """
    buf = memoryview(data)
    if buf.format != "B" or buf.ndim != 1 or not buf.c_contiguous:  # strided, typed, 2-D views
        buf = memoryview(buf.tobytes())
    size = len(buf)
    pos = 0  # start of the current record
    fragments: list[memoryview] = []
    have = 0  # handshake bytes in complete records so far
    need = -1  # total handshake message bytes (header included), once known
    while True:
        # Record header: check each byte as soon as it exists. A bad first record
        # means "not TLS"; a bad later one is a corrupt or interleaved stream.
        bad = Status.NOT_TLS if pos == 0 else Status.MALFORMED
        avail = size - pos
        if avail >= 1 and buf[pos] != _CT_HANDSHAKE:
            return bad
        if avail >= 2 and buf[pos + 1] != 3:
            return bad
        if avail >= 3 and buf[pos + 2] > 4:
            return bad
        if avail < _HEADER:
            return Status.NEED_MORE
        rec_len = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if not 0 < rec_len <= _MAX_RECORD:  # RFC 8446 5.1 forbids empty handshake records
            return Status.MALFORMED
        end = pos + _HEADER + rec_len
        if end > max_size:  # the ClientHello is not complete before this record
            return Status.TOO_LARGE
        frag = buf[pos + _HEADER : min(end, size)]

        if need < 0:
            # Handshake header (type, u24 length) may straddle records.
            head = b"".join([*fragments, frag[:4]])[:4]
            if head and head[0] != _HT_CLIENT_HELLO:
                return Status.MALFORMED
            if len(head) == 4:
                need = 4 + int.from_bytes(head[1:4], "big")
                records = -(-need // _MAX_RECORD)
                if need + _HEADER * records > max_size:
                    return Status.TOO_LARGE
        if need >= 0 and have + rec_len > need:
            return Status.MALFORMED  # the record goes on past the ClientHello
        if end > size:
            return Status.NEED_MORE

        fragments.append(frag)
        have += rec_len
        pos = end
        if have == need:
            break

    message = fragments[0] if len(fragments) == 1 else memoryview(b"".join(fragments))
    try:
        sni, alpn = _parse_body(message[4:])
    except _Malformed:
        return Status.MALFORMED
    return ClientHello(sni=sni, alpn=alpn, length=pos, tls_version=(buf[1], buf[2]))


class _Reader:
    """Bounds-checked cursor over a buffer; raises _Malformed on any overrun."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.end - self.pos:
            raise _Malformed
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int, minimum: int = 0) -> _Reader:
        """Read a length-prefixed vector of at least `minimum` bytes."""
        n = self.uint(len_bytes)
        if n < minimum:
            raise _Malformed
        return _Reader(self.take(n))

    def take_all(self) -> bytes:
        return bytes(self.take(self.remaining()))


def _parse_body(body: memoryview) -> tuple[str | None, tuple[str, ...]]:
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    if r.vector(1).remaining() > 32:  # legacy_session_id
        raise _Malformed
    if r.vector(2, minimum=2).remaining() % 2:  # cipher_suites
        raise _Malformed
    r.vector(1, minimum=1)  # legacy_compression_methods
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if r.remaining() == 0:  # TLS 1.2 allows omitting the extensions block
        return sni, alpn
    exts = r.vector(2)
    if r.remaining():
        raise _Malformed
    seen: set[int] = set()
    while exts.remaining():
        ext_type = exts.uint(2)
        ext = exts.vector(2)
        if ext_type in seen:  # RFC 8446 4.2: at most one extension of each type
            raise _Malformed
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return sni, alpn


def _parse_server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, minimum=1)
    if ext.remaining():
        raise _Malformed
    host: str | None = None
    while names.remaining():
        name_type = names.uint(1)
        name = names.vector(2, minimum=1).take_all()
        if name_type != _NAME_TYPE_HOST:
            continue
        if host is not None or _HOSTNAME_RE.fullmatch(name) is None:
            raise _Malformed
        host = hostname_key(name.decode("ascii"))
    return host


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, minimum=2)
    if ext.remaining():
        raise _Malformed
    offered: list[str] = []
    while protocols.remaining():
        offered.append(protocols.vector(1, minimum=1).take_all().decode("latin-1"))
    return tuple(offered)
