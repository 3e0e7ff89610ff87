"""`[relay] proxy_protocol`: the client's address from a load balancer's PROXY header.

Only peers inside the configured networks may send a header; the relay then
treats the address the header names as the client (rate, per-address limit,
bans, access rules, the OPEN frame the home sees). A trusted peer may also
connect without a header (a balancer's plain TCP health check): its own
address is used. A header from any other peer is refused in `server._route`.
"""

from __future__ import annotations

import ipaddress
import logging

import trio

from tunneld.config import IPNetwork
from tunneld.netaddr import normalize_ip
from tunneld.transport.splice import STREAM_ERRORS
from tunneld.wire.proxyheader import (
    NEED_DATA,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    starts_like_proxy,
)

__all__ = ["read_proxy_header", "trusted_proxy"]

log = logging.getLogger("tunneld.relay")


def trusted_proxy(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == net.version and addr in net for net in networks)


async def read_proxy_header(
    tcp: trio.SocketStream, peer: str, limit: float
) -> tuple[str, int, bytes] | None:
    """(client ip, client port, the bytes after the header) from a trusted peer's
    connection, or None when the header is bad, late or the peer went away. Without
    a header the peer is the client and every byte read is returned."""
    reader = ProxyHeaderReader()
    port = int(tcp.socket.getpeername()[1])
    with trio.move_on_after(limit):
        try:
            data = await tcp.receive_some(4096)
            if not data:
                return None
            if not starts_like_proxy(data[:1]):
                return peer, port, bytes(data)  # no header: the peer is the client
            while True:
                reader.receive_data(data)
                try:
                    event = reader.next_event()
                except ProxyHeaderError as exc:
                    log.info("refused %s: %s", peer, exc)
                    return None
                if event is not NEED_DATA:
                    break
                data = await tcp.receive_some(4096)
                if not data:
                    return None
        except STREAM_ERRORS:
            return None
        assert isinstance(event, ProxyHeader)
        rest = reader.trailing_data
        if event.source is None:  # LOCAL / UNKNOWN: the balancer itself
            return peer, port, rest
        log.debug("PROXY v%d from %s: client %s:%d", event.version, peer, *event.source)
        return normalize_ip(event.source[0]), event.source[1], rest
    log.info("refused %s: no complete PROXY header within %.0fs", peer, limit)
    return None
