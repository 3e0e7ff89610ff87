"""Sans-IO reader and writer of the PROXY protocol header, versions 1 and 2.

A load balancer in front of the relay (HAProxy, nginx `proxy_protocol`, AWS NLB,
Hetzner/DigitalOcean LBs) opens its own TCP connection to the relay, so the
relay would see the balancer's address, not the client's. With the PROXY
protocol (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt) the
balancer writes one header first, naming the client's address; the client's
bytes (its TLS ClientHello) follow untouched. The relay accepts the header only
from the peers `[relay] proxy_protocol` names, and the fleet's relay-to-relay
forwarding (README "Fleet") writes a v2 header the same way.

The reader works in the h11 manner: feed bytes with `receive_data`, call
`next_event` until it returns a `ProxyHeader` (or `NEED_DATA`), then take the
bytes after the header from `trailing_data`. Bad input raises
`ProxyHeaderError` with a one-line reason, as soon as the bytes that show it
have arrived (a v1 line that is not "PROXY ..." fails on its first wrong byte).
The reader never holds more than `max_size` bytes of header.

Version 1 (text): ``PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\\r\\n``, at most
107 bytes; ``PROXY UNKNOWN ...\\r\\n`` means "use the connection's own address".

Version 2 (binary): a 12-byte signature, version/command, family/transport, a
16-bit length, the addresses, then TLVs (type, 16-bit length, value), which are
kept raw and checked only for their framing. Command LOCAL (a balancer's own
health check) and families UNSPEC/UNIX name no client: `source` is then None,
and the relay uses the peer's address. DGRAM transport is refused (the relay
serves TCP).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_HEADER",
    "NEED_DATA",
    "V1_MAX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "encode_v1",
    "encode_v2",
    "starts_like_proxy",
]

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included (the spec's bound)
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16  # signature, ver/cmd, fam/proto, length
# Default bound on a whole v2 header. The spec allows 16 + 65535 bytes; real
# balancers send the 12 or 36 address bytes plus a few TLVs (AWS's VPC endpoint
# id, a TLS summary): a few hundred bytes.
MAX_HEADER: Final = 4096

_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_FAM_UNSPEC, _FAM_INET, _FAM_INET6, _FAM_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM = 0x0, 0x1, 0x2
_ADDRESS_SIZE: Final = {_FAM_UNSPEC: 0, _FAM_INET: 12, _FAM_INET6: 36, _FAM_UNIX: 216}


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why, in one line."""


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    # The client's (address, port) as the balancer saw it; None when the header names
    # none (v1 UNKNOWN, v2 LOCAL, UNSPEC or UNIX): use the connection's own peer.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 only, raw
    size: int = 0  # the header's bytes on the wire


def starts_like_proxy(data: bytes | bytearray) -> bool:
    """Whether `data` (at least one byte) could be the start of a PROXY header.
    One byte decides against a TLS record (0x16) or a data connection ("T")."""
    for magic in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(magic))
        if n and data[:n] == magic[:n]:
            return True
    return False


class ProxyHeaderReader:
    """Reads one PROXY header (v1 or v2) from the start of a connection."""

    def __init__(self, max_size: int = MAX_HEADER) -> None:
        self.max_size = max(max_size, V1_MAX)
        self._buf = bytearray()
        self._header: ProxyHeader | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def header_bytes(self) -> bytes:
        """The header's own bytes as received (for a MAC over them); valid once
        `next_event` returned the header."""
        if self._header is None:
            return b""
        return bytes(self._buf[: self._header.size])

    @property
    def trailing_data(self) -> bytes:
        """The bytes after the header (the client's own first bytes); valid once
        `next_event` returned the header."""
        if self._header is None:
            return b""
        return bytes(self._buf[self._header.size :])

    def next_event(self) -> ProxyHeader | _NeedData:
        if self._header is not None:
            return self._header
        buf = self._buf
        if not buf:
            return NEED_DATA
        if not starts_like_proxy(buf):
            raise ProxyHeaderError("not a PROXY protocol header")
        if buf[:1] == b"P":
            header = _parse_v1(buf)
        else:
            header = _parse_v2(buf, self.max_size)
        if header is None:
            return NEED_DATA
        self._header = header
        return header


def _parse_v1(buf: bytearray) -> ProxyHeader | None:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        if b"\n" in buf or b"\r" in buf[:-1]:
            raise ProxyHeaderError("PROXY v1 line not ended by CRLF")
        if len(buf) >= len(V1_PREFIX) and buf[: len(V1_PREFIX)] != V1_PREFIX:
            raise ProxyHeaderError("not a PROXY protocol header")
        return None
    try:
        line = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    size = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, None, None, size=size)  # the rest of the line is ignored
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 line malformed: {line[:60]!r}")
    family = 4 if parts[1] == "TCP4" else 6
    src = _v1_address(parts[2], family)
    dst = _v1_address(parts[3], family)
    return ProxyHeader(1, (src, _v1_port(parts[4])), (dst, _v1_port(parts[5])), size=size)


def _v1_address(text: str, family: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address {text[:45]!r} is not an IP address") from None
    if addr.version != family:
        raise ProxyHeaderError(f"PROXY v1 address {text!r} is not TCP{family}")
    return str(addr)


def _v1_port(text: str) -> int:
    # Decimal, no sign, no leading zero (the spec), 0 to 65535.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"PROXY v1 port {text[:8]!r} is not a port number")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {port} is over 65535")
    return port


def _parse_v2(buf: bytearray, max_size: int) -> ProxyHeader | None:
    n = min(len(buf), len(V2_SIGNATURE))
    if buf[:n] != V2_SIGNATURE[:n]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(buf) > 12:
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != 2:
            raise ProxyHeaderError(f"PROXY v2 header with version {version}")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    if len(buf) > 13:
        family, proto = buf[13] >> 4, buf[13] & 0x0F
        if family not in _ADDRESS_SIZE or proto not in (_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM):
            raise ProxyHeaderError(f"PROXY v2 header with unknown address family 0x{buf[13]:02x}")
        if proto == _PROTO_DGRAM and buf[12] & 0x0F == _CMD_PROXY:
            raise ProxyHeaderError("PROXY v2 header for a datagram connection (the relay is TCP)")
    if len(buf) < _V2_FIXED:
        return None
    (length,) = struct.unpack_from("!H", buf, 14)
    size = _V2_FIXED + length
    if size > max_size:
        raise ProxyHeaderError(f"PROXY v2 header of {size} bytes, over the limit of {max_size}")
    if len(buf) < size:
        return None
    command, family, proto = buf[12] & 0x0F, buf[13] >> 4, buf[13] & 0x0F
    if command == _CMD_LOCAL:  # the balancer's own connection: the body is ignored
        return ProxyHeader(2, None, None, (), size)
    body = bytes(buf[_V2_FIXED:size])
    need = _ADDRESS_SIZE[family]
    if len(body) < need:
        raise ProxyHeaderError(
            f"PROXY v2 header too short for its addresses ({len(body)} of {need} bytes)"
        )
    tlvs = _tlvs(body[need:])
    if family in (_FAM_UNSPEC, _FAM_UNIX) or proto == _PROTO_UNSPEC:
        return ProxyHeader(2, None, None, tlvs, size)
    if family == _FAM_INET:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack_from("!HH", body, 8)
    else:
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack_from("!HH", body, 32)
    return ProxyHeader(2, (src, sport), (dst, dport), tlvs, size)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyHeaderError("PROXY v2 TLV cut short")
        kind = data[i]
        (length,) = struct.unpack_from("!H", data, i + 1)
        if i + 3 + length > len(data):
            raise ProxyHeaderError(f"PROXY v2 TLV 0x{kind:02x} longer than the header")
        out.append((kind, data[i + 3 : i + 3 + length]))
        i += 3 + length
    return tuple(out)


# -- writing ------------------------------------------------------------------------


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line; `None` for either end gives ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("PROXY v1 needs both addresses of one family")
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header: PROXY over TCP for two addresses of one family (an IPv4 one beside
    an IPv6 one is sent as IPv4-mapped IPv6), LOCAL when `source` is None."""
    extra = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    if source is None or destination is None:
        return (
            V2_SIGNATURE + bytes([0x20 | _CMD_LOCAL, 0x00]) + struct.pack("!H", len(extra)) + extra
        )
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    if src.version == 4:
        family, addresses = _FAM_INET, src.packed + dst.packed
    else:
        family, addresses = _FAM_INET6, src.packed + dst.packed
    body = addresses + struct.pack("!HH", source[1], destination[1]) + extra
    return (
        V2_SIGNATURE
        + bytes([0x20 | _CMD_PROXY, family << 4 | _PROTO_STREAM])
        + struct.pack("!H", len(body))
        + body
    )


def _as_v6(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address):
        return addr
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
