"""The header one relay of a fleet writes before a client it forwards to another
(PROTOCOL.md section 13), sans-IO: a PROXY v2 header whose last TLV authenticates it.

::

    PROXY v2, command PROXY, the client's address and port, the receiver's address
    TLV 0x02 (authority): the SNI
    TLV 0xE0 (tunneld fleet): version 1 | len(node_id) | node_id | time ms (u64) |
                              nonce (16) | HMAC-SHA-256 (32)

The MAC covers every header byte before it, under the fleet's shared secret. The
receiver also bounds the clock skew and refuses a nonce it has seen (`NonceCache`).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from tunneld.wire.proxyheader import ProxyHeader, encode_v2

__all__ = ["ForwardError", "Forwarded", "NonceCache", "seal", "verify"]

AUTHORITY_TLV: Final = 0x02
FLEET_TLV: Final = 0xE0
VERSION: Final = 1
NONCE_SIZE: Final = 16
MAC_SIZE: Final = 32
MAX_SKEW_MS: Final = 30_000


class ForwardError(ValueError):
    """A forwarded connection's header does not authenticate; the message says why."""


@dataclass(frozen=True)
class Forwarded:
    node: str  # the forwarding relay's node_id
    sni: str
    source: tuple[str, int]  # the client
    sent_at_ms: int
    nonce: bytes


def _mac(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def seal(
    secret: bytes,
    node_id: str,
    now_ms: int,
    nonce: bytes,
    source: tuple[str, int],
    destination: tuple[str, int],
    sni: str,
) -> bytes:
    node = node_id.encode("ascii")
    if len(nonce) != NONCE_SIZE or not 0 < len(node) < 256:
        raise ValueError("a 16-byte nonce and a node id of 1 to 255 ASCII bytes")
    body = bytes([VERSION, len(node)]) + node + struct.pack("!Q", now_ms) + nonce
    tlvs = ((AUTHORITY_TLV, sni.encode("ascii")), (FLEET_TLV, body + bytes(MAC_SIZE)))
    header = encode_v2(source, destination, tlvs)[:-MAC_SIZE]
    return header + _mac(secret, header)


def verify(secret: bytes, header: ProxyHeader, raw: bytes, now_ms: int) -> Forwarded:
    """Check a header read by `ProxyHeaderReader` (`raw`: its `header_bytes`)."""
    if header.version != 2 or header.source is None:
        raise ForwardError("not a PROXY v2 header naming a client")
    if not header.tlvs or header.tlvs[-1][0] != FLEET_TLV:
        raise ForwardError("no fleet TLV at the end of the header")
    body = header.tlvs[-1][1]
    if len(body) < 2 + 8 + NONCE_SIZE + MAC_SIZE or body[0] != VERSION:
        raise ForwardError("fleet TLV malformed or of another version")
    if not hmac.compare_digest(_mac(secret, raw[:-MAC_SIZE]), raw[-MAC_SIZE:]):
        raise ForwardError("bad MAC (another fleet secret?)")
    n = body[1]
    if len(body) != 2 + n + 8 + NONCE_SIZE + MAC_SIZE:
        raise ForwardError("fleet TLV malformed")
    node = body[2 : 2 + n].decode("ascii", "replace")
    (sent,) = struct.unpack_from("!Q", body, 2 + n)
    nonce = body[2 + n + 8 : 2 + n + 8 + NONCE_SIZE]
    if abs(now_ms - sent) > MAX_SKEW_MS:
        raise ForwardError(f"sent {abs(now_ms - sent) / 1000:.0f}s from this relay's clock")
    sni = next((v for t, v in header.tlvs if t == AUTHORITY_TLV), b"").decode("ascii", "replace")
    return Forwarded(node, sni, header.source, sent, nonce)


class NonceCache:
    """Nonces seen in the last `window_ms`, at most `max_size` (the oldest forgotten
    first; with MAX_SKEW_MS below the window, a forgotten one is also too old)."""

    def __init__(self, window_ms: int = 2 * MAX_SKEW_MS, max_size: int = 100_000) -> None:
        self.window_ms = window_ms
        self.max_size = max_size
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def fresh(self, nonce: bytes, now_ms: int) -> bool:
        """True the first time `nonce` is seen (and remembers it)."""
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if at > now_ms - self.window_ms and len(self._seen) < self.max_size:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now_ms
        return True
