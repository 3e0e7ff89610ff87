"""Relay to relay in a fleet (PROTOCOL.md section 13): a client whose hostname another
relay holds is spliced to that relay's `[fleet] forward_listen`, behind an
authenticated PROXY v2 header naming the client. Neither relay decrypts the
client's TLS; the receiving relay routes only to a session it holds (one hop).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from tunneld.netaddr import normalize_ip
from tunneld.transport.splice import STREAM_ERRORS, abort_socket, aclose_quietly, splice
from tunneld.wire.fleetforward import NONCE_SIZE, ForwardError, seal, verify
from tunneld.wire.proxyheader import NEED_DATA, ProxyHeader, ProxyHeaderError, ProxyHeaderReader

if TYPE_CHECKING:
    from tunneld.relay.server import Relay

__all__ = ["forward_client", "serve_forwarded"]

log = logging.getLogger("tunneld.relay.fleet")


def _now_ms() -> int:
    return int(time.time() * 1000)


async def forward_client(
    relay: Relay, tcp: trio.SocketStream, first: bytes, ip: str, port: int, sni: str
) -> bool:
    """Splice the client to the relay holding `sni`; False when no other relay does
    (the caller then answers as to an unknown name)."""
    fleet = relay.fleet
    assert fleet is not None and fleet.secret is not None
    target = await fleet.locate(sni)
    if target is None:
        return False
    node, (host, target_port) = target
    if fleet.is_banned(sni, ip):  # the home's bans, checked here before a byte leaves
        relay.stats.refused["banned"] += 1
        log.info("refused %s for %s: banned by the home (held on %s)", ip, sni, node)
        abort_socket(tcp)
        await aclose_quietly(tcp)
        return True
    try:
        with trio.fail_after(relay.cfg.client_hello_timeout):
            upstream = await trio.open_tcp_stream(host, target_port)
    except (OSError, trio.TooSlowError) as exc:
        fleet.forget(sni)  # a dead relay: ask the registry again next time
        relay.stats.refused["forward_failed"] += 1
        log.warning("cannot forward %s for %s to %s: %r", ip, sni, node, exc)
        abort_socket(tcp)
        await aclose_quietly(tcp)
        return True
    header = seal(
        fleet.secret,
        fleet.node_id,
        _now_ms(),
        os.urandom(NONCE_SIZE),
        (ip, port),
        (host, target_port),
        sni,
    )
    fleet.forwarded += 1
    log.debug("forwarding %s for %s to %s", ip, sni, node)
    clean = False
    try:
        await upstream.send_all(header + first)
        clean = await splice(tcp, upstream)
    except STREAM_ERRORS:
        clean = False
    finally:
        if not clean:  # a cut connection must look cut on both sides: reset, not FIN
            abort_socket(tcp)
            abort_socket(upstream)
        await aclose_quietly(upstream)
        await aclose_quietly(tcp)
    return True


async def serve_forwarded(relay: Relay, tcp: trio.SocketStream) -> None:
    """A connection on `[fleet] forward_listen`: an authenticated header, then a client."""
    fleet = relay.fleet
    assert fleet is not None and fleet.secret is not None
    peer = normalize_ip(tcp.socket.getpeername()[0])
    reader = ProxyHeaderReader()
    event: ProxyHeader | None = None
    reason = "no header in time"
    with trio.move_on_after(relay.cfg.client_hello_timeout):
        try:
            while event is None:
                data = await tcp.receive_some(4096)
                if not data:
                    reason = "closed before a header"
                    break
                reader.receive_data(data)
                got = reader.next_event()
                if got is not NEED_DATA:
                    assert isinstance(got, ProxyHeader)
                    event = got
        except ProxyHeaderError as exc:
            reason = str(exc)
        except STREAM_ERRORS:
            reason = "connection lost"
    forwarded = None
    if event is not None:
        try:
            forwarded = verify(fleet.secret, event, reader.header_bytes, _now_ms())
            if not fleet.nonces.fresh(forwarded.nonce, _now_ms()):
                raise ForwardError("nonce seen before (a replay)")
        except ForwardError as exc:
            reason, forwarded = str(exc), None
    if forwarded is None:
        relay.stats.refused["forward_auth"] += 1
        log.warning("refused a forwarded connection from %s: %s", peer, reason)
        abort_socket(tcp)
        await aclose_quietly(tcp)
        return
    ip, port = normalize_ip(forwarded.source[0]), forwarded.source[1]
    log.debug("forwarded from %s (%s): client %s for %s", forwarded.node, peer, ip, forwarded.sni)
    try:
        await relay.route_forwarded(tcp, ip, port, reader.trailing_data)
    except Exception as exc:  # one client must never take the relay down
        log.error("forwarded connection from %s failed: %r", ip, exc)
        abort_socket(tcp)
        await aclose_quietly(tcp)
