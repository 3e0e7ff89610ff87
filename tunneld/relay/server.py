"""The public relay: one TLS port routed by SNI, the tunnel endpoint on the same port."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import secrets
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import h11
import trio
import trio_websocket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tunneld import __version__
from tunneld.checks import relay_tls
from tunneld.config import RelayConfig, RelaySection, format_listen
from tunneld.control import (
    SOCKET_MODE,
    ControlRequest,
    ControlResponse,
    Router,
    serve_control,
)
from tunneld.errors import ConfigError, KeyFileError, ProtocolError, TokenError
from tunneld.hostnames import hostname_key
from tunneld.httpio import next_event, send_response
from tunneld.metrics import RelayCollector, make_registry, metrics_endpoint, serve_metrics
from tunneld.netaddr import normalize_ip
from tunneld.pki import CertificateInfo
from tunneld.relay.datapool import REFILL_INTERVAL, DataPool
from tunneld.relay.proxied import read_proxy_header, trusted_proxy
from tunneld.relay.ratelimit import ConnectionRate
from tunneld.relay.registry import HomeSession, Registry
from tunneld.relay.reload import certificate_status, reload_relay
from tunneld.reload import Settings
from tunneld.signals import run_until_signalled
from tunneld.systemd import notify, run_watchdog
from tunneld.tokens import (
    Claims,
    check_hostnames,
    check_version,
    load_public_keys,
    verify_token,
)
from tunneld.transport.attached import abort
from tunneld.transport.channel import (
    RAW_SUBPROTOCOL,
    ChannelClosed,
    RawChannel,
    websocket_accept,
)
from tunneld.transport.kernelsplice import send_first, splice_attached
from tunneld.transport.prefixed import PrefixedStream
from tunneld.transport.rawsock import SESSION_UNSENT, RawSocketStream, raw_stream
from tunneld.transport.session import (
    MAX_MESSAGE_SIZE,
    RECEIVE_BUFFER,
    MuxSession,
    MuxStream,
    tuned_connection,
)
from tunneld.transport.splice import STREAM_ERRORS, abort_socket, aclose_quietly, splice
from tunneld.transport.tls import SESSION_RECEIVE, TLSStream
from tunneld.wire import events as ev
from tunneld.wire.clienthello import (
    ClientHello,
    parse_client_hello,
    unrecognized_name_alert,
)
from tunneld.wire.dataconn import LINE_SIZE, Preamble, is_data_start, parse_preamble
from tunneld.wire.mux import Role
from tunneld.wire.proxyheader import starts_like_proxy

if TYPE_CHECKING:  # imported when [relay.acme] is on: the ACME client costs ~8 MB
    from tunneld.acmeclient import AcmeManager
    from tunneld.relay.certs import LoadedRelayCertificate, RelayCertificates
    from tunneld.relay.fleet import Fleet

log = logging.getLogger("tunneld.relay")

TUNNEL_PATH = "/v1/tunnel"
# HTTP status of each refusal reason; others (hostname, version) are 403.
REFUSAL_STATUS = {
    "bad_token": 401,
    "bad_signature": 401,
    "expired": 401,
    "revoked": 401,
    "bad_request": 400,
}
MAX_REQUEST_HEAD = 16 * 1024


async def _refill(pool: DataPool) -> None:
    """Ask for the data connections a session lacks (tickets that never came expire)."""
    while True:
        pool.refill()
        await trio.sleep(REFILL_INTERVAL)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class RelayStats:
    connections_total: int = 0
    routed_total: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.settings = Settings(config)  # the running config; SIGHUP replaces it
        self.registry = Registry()
        self.stats = RelayStats()
        self.state = "starting"
        self.started_at = time.time()
        self._per_ip: Counter[str] = Counter()
        self._rate = ConnectionRate(self.cfg.connections_per_ip_per_second)
        try:
            self._public_keys = load_public_keys(self.cfg.token_public_key)
        except KeyFileError as exc:
            raise ConfigError(f"{config.path}: [relay] token_public_key: {exc}") from None
        # [relay.acme]: the relay's own certificate from an ACME CA (relay/certs.py).
        self.own_certs: RelayCertificates | None = None
        if config.relay_acme.enabled:
            from tunneld.relay.certs import RelayCertificates

            self.own_certs = RelayCertificates(config, on_change=self.set_tls)
            loaded = _load_own(self.own_certs, config)
            self._ssl, self.certificate = loaded.context, loaded.info
        else:
            self._ssl, self.certificate = relay_tls(config)
        self._stop = trio.Event()
        self.listening: list[tuple[str, int]] = []
        self.metrics = make_registry(RelayCollector(self.status))
        self.metrics_listening: list[str] = []
        self._tickets: dict[bytes, DataPool] = {}  # DIAL tickets not yet presented
        # [fleet]: the registry shared with other relays on Redis (relay/fleet.py).
        self.fleet: Fleet | None = None
        if config.fleet.enabled:
            from tunneld.relay.fleet import Fleet

            self.fleet = Fleet(
                config.fleet,
                self.registry,
                lambda: self.cfg.revoked_tokens,
                label=str(config.path),
            )

    @property
    def config(self) -> RelayConfig:
        return self.settings.current

    @property
    def cfg(self) -> RelaySection:
        return self.settings.current.relay

    def set_tls(self, context: ssl.SSLContext, certificate: CertificateInfo) -> None:
        """New connections to the relay's own hostname get `context` (reload)."""
        self._ssl, self.certificate = context, certificate

    def set_public_keys(self, keys: tuple[Ed25519PublicKey, ...]) -> None:
        self._public_keys = keys

    def set_connection_rate(self, per_second: int) -> None:
        """A changed per-address rate starts with fresh buckets; an unchanged one keeps them."""
        if per_second != self._rate.rate:
            self._rate = ConnectionRate(per_second)

    def stop(self) -> None:
        self._stop.set()

    async def _open_listeners(
        self, key: str, host: str, port: int, table: str = "relay"
    ) -> list[trio.SocketListener]:
        """TCP listeners for one `[relay] listen` / `http_listen` entry; a refusal (the port
        taken, an address this host does not have, a privileged port) is a ConfigError
        naming the address and the key."""
        try:
            return await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError(
                f"{self.config.path}: [{table}] {key}: cannot listen on "
                f"{format_listen((host, port))}: {exc.strerror or exc}"
            ) from None

    # -- top level -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as root:
            async with trio.open_nursery() as conns:
                listener_scope = trio.CancelScope()

                async def serve_public(task_status: trio.TaskStatus[None]) -> None:
                    # The control socket goes with the listeners: a relay
                    # that drains must not stop its successor from starting.
                    with listener_scope:
                        async with trio.open_nursery() as lst:
                            await lst.start(
                                partial(serve_control, mode=SOCKET_MODE),
                                self.cfg.control_socket,
                                self._control_router(),
                            )
                            if self.cfg.metrics_listen is not None:
                                self.metrics_listening = await lst.start(
                                    partial(
                                        serve_metrics,
                                        label=f"{self.config.path}: [relay] metrics_listen",
                                    ),
                                    self.cfg.metrics_listen,
                                    self.metrics,
                                )
                            for host, port in self.cfg.listen:
                                listeners = await self._open_listeners("listen", host, port)
                                for listener in listeners:
                                    sock = listener.socket
                                    self.listening.append(sock.getsockname()[:2])
                                # Connections live in `conns`, so closing the
                                # listeners at shutdown leaves them draining.
                                await lst.start(
                                    partial(trio.serve_listeners, handler_nursery=conns),
                                    self._handle_client,
                                    listeners,
                                )
                            fleet = self.config.fleet
                            if self.fleet is not None and fleet.forward_listen is not None:
                                from tunneld.relay.forwarding import serve_forwarded

                                host, port = fleet.forward_listen
                                listeners = await self._open_listeners(
                                    "forward_listen", host, port, "fleet"
                                )
                                await lst.start(
                                    partial(trio.serve_listeners, handler_nursery=conns),
                                    partial(serve_forwarded, self),
                                    listeners,
                                )
                            for host, port in self.cfg.http_listen:
                                listeners = await self._open_listeners("http_listen", host, port)
                                # Connections live in `conns`, so closing the
                                # listeners at shutdown leaves them draining.
                                await lst.start(
                                    partial(trio.serve_listeners, handler_nursery=conns),
                                    self._handle_http,
                                    listeners,
                                )
                            task_status.started()
                            await trio.sleep_forever()

                await conns.start(serve_public)
                self.state = "running"
                log.info(
                    "relay %s listening on %s (tunneld %s)",
                    self.cfg.hostname,
                    ", ".join(f"{h}:{p}" for h, p in self.listening),
                    __version__,
                )
                root.start_soon(run_watchdog)
                if self.fleet is not None:
                    await root.start(self.fleet.run)
                if self.own_certs is not None and self.own_certs.acme_enabled:
                    root.start_soon(self._own_acme().run)
                notify("READY=1", f"STATUS=listening on {len(self.listening)} address(es)")
                task_status.started()
                await self._stop.wait()
                notify("STOPPING=1")
                # Drain: no new clients, every session told to go away, then wait.
                self.state = "stopping"
                listener_scope.cancel()
                log.info("relay stopping: GOAWAY to %d session(s)", len(self.registry.sessions))
                for session in list(self.registry.sessions):
                    session.mux.goaway(ev.ResetCode.SHUTDOWN, "relay shutting down")
                with trio.move_on_after(self.cfg.drain_timeout):
                    for session in list(self.registry.sessions):
                        await session.mux.idle.wait()
                # Close the WebSockets while their readers still run, so the
                # close handshake completes instead of timing out.
                with trio.move_on_after(3):
                    for session in list(self.registry.sessions):
                        session.mux.close("relay shutting down")
                        await session.mux.finished.wait()
                conns.cancel_scope.cancel()
            root.cancel_scope.cancel()
        log.info("relay stopped")

    # -- public TLS port -------------------------------------------------------
    async def _handle_client(self, tcp: trio.SocketStream) -> None:
        peer = tcp.socket.getpeername()
        ip, port = normalize_ip(peer[0]), int(peer[1])
        self.stats.connections_total += 1
        first = b""
        if self.cfg.proxy_protocol and trusted_proxy(ip, self.cfg.proxy_protocol):
            # A load balancer: the client is the address its PROXY header names, and
            # every check below (rate, limits, bans, access) applies to that address.
            named = await read_proxy_header(tcp, ip, self.cfg.client_hello_timeout)
            if named is None:
                self.stats.refused["proxy_header"] += 1
                abort_socket(tcp)
                await aclose_quietly(tcp)
                return
            ip, port, first = named
        home = self.registry.is_home(ip)  # its data connections are not a client's flood
        if not home and not self._rate.allow(ip):
            # Counted, logged at debug only: a flood must not flood the journal too.
            self.stats.refused["ip_rate"] += 1
            log.debug("refused %s: over %d new connections per second", ip, self._rate.rate)
            abort_socket(tcp)
            await aclose_quietly(tcp)
            return
        limit = self.cfg.max_connections_per_ip
        if not home and limit and self._per_ip[ip] >= limit:
            self.stats.refused["ip_limit"] += 1
            log.warning("refused %s: over %d connections per address", ip, limit)
            abort_socket(tcp)
            await aclose_quietly(tcp)
            return
        self._per_ip[ip] += 1
        try:
            await self._route(tcp, ip, port, first)
        except STREAM_ERRORS as exc:  # the client's doing, not a bug: one line
            log.warning("connection from %s failed: %r", ip, exc)
            abort_socket(tcp)
            await aclose_quietly(tcp)
        except Exception as exc:  # one client must never take the relay down
            log.exception("connection from %s failed: %r", ip, exc)
            abort_socket(tcp)
            await aclose_quietly(tcp)
        finally:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]

    async def route_forwarded(
        self, tcp: trio.SocketStream, ip: str, port: int, first: bytes
    ) -> None:
        """A client another relay of the fleet forwarded (relay/forwarding.py): routed to
        a session held here, never forwarded again."""
        await self._route(tcp, ip, port, first, forwarded=True)

    async def _route(
        self,
        tcp: trio.SocketStream,
        ip: str,
        port: int,
        first: bytes = b"",
        forwarded: bool = False,
    ) -> None:
        buf = bytearray()
        hello: ClientHello | None = None
        with trio.move_on_after(self.cfg.client_hello_timeout):
            try:
                while hello is None:
                    data = first or await tcp.receive_some(16384)
                    first = b""
                    if not data:
                        break
                    buf += data
                    if starts_like_proxy(buf):
                        # From a peer not in [relay] proxy_protocol (or a second header).
                        self.stats.refused["proxy_untrusted"] += 1
                        log.info("refused %s: PROXY header from an untrusted peer", ip)
                        abort_socket(tcp)
                        await aclose_quietly(tcp)
                        return
                    if is_data_start(buf):
                        break
                    result = parse_client_hello(buf)
                    if isinstance(result, ClientHello):
                        hello = result
                    elif result.name != "NEED_MORE":
                        log.info("dropped %s: %s", ip, result.name.lower().replace("_", " "))
                        break
            except STREAM_ERRORS:
                pass
        if hello is None and is_data_start(buf) and not forwarded:
            await self._serve_data(tcp, buf, ip)
            return
        if hello is None:
            self.stats.refused["client_hello"] += 1
            await aclose_quietly(tcp)
            return
        sni = hello.sni  # normalized by the parser (tunneld.hostnames)
        if sni == self.cfg.hostname:
            if self.own_certs is not None and self.own_certs.is_challenge(hello):
                await self._answer_acme(tcp, bytes(buf), hello)  # TLS-ALPN-01
                return
            await self._serve_own(tcp, bytes(buf), ip)
            return
        session = self.registry.lookup(sni) if sni else None
        if session is None and sni and not forwarded and self.fleet and self.fleet.secret:
            from tunneld.relay.forwarding import forward_client

            if await forward_client(self, tcp, bytes(buf), ip, port, sni):
                return  # spliced to the relay of the fleet that holds `sni`
        if session is None:
            self.stats.refused["unknown_name"] += 1
            log.info("refused %s: no session for %s", ip, sni or "(no SNI)")
            try:
                with trio.move_on_after(5):
                    await tcp.send_all(unrecognized_name_alert())
            except STREAM_ERRORS:
                pass
            await aclose_quietly(tcp)
            return
        if session.is_banned(ip):
            self.stats.refused["banned"] += 1
            log.info("refused %s for %s: banned by the home", ip, sni)
            abort_socket(tcp)
            await aclose_quietly(tcp)
            return
        refusal = session.access.refusal(ip, sni or "")
        if refusal is not None:
            self.stats.refused[refusal] += 1
            log.info("refused %s for %s: %s by the home's [access] rules", ip, sni, refusal)
            abort_socket(tcp)
            await aclose_quietly(tcp)
            return
        taken = None if session.data is None else session.data.take()
        try:
            stream = session.mux.open_stream(
                ip, port, sni or "", None if taken is None else taken[0]
            )
        except (ProtocolError, trio.BrokenResourceError) as exc:
            self.stats.refused["session_limit"] += 1
            log.warning("refused %s for %s: %s", ip, sni, exc)
            abort_socket(tcp)
            await aclose_quietly(tcp)
            if taken is not None:
                await self._drop_data(session, taken[1])
            return
        self.stats.routed_total += 1
        if taken is None:
            await self._splice_client(tcp, stream, bytes(buf))
            return
        try:
            await self._splice_attached(tcp, taken[1], stream, bytes(buf))
        finally:
            assert session.data is not None
            session.data.release()

    async def _splice_client(self, tcp: trio.SocketStream, stream: MuxStream, first: bytes) -> None:
        # The socket used directly (rawsock.py): a small request's bytes cross here twice.
        client = raw_stream(tcp)
        clean = False
        stream.deliver_to(client.socket.send)  # the home's bytes go out without a task switch
        try:
            await stream.send_all(first)
            clean = await splice(client, stream)
            log.debug("client stream %d ended %s", stream.stream_id, "cleanly" * clean or "broken")
        except STREAM_ERRORS:
            clean = False
        finally:
            stream.deliver_to(None)
            if clean:
                await stream.aclose()
            else:
                # A cut stream must look cut to the client: TCP reset, not FIN.
                stream.reset(ev.ResetCode.CANCEL)
                abort_socket(client)
            await aclose_quietly(client)

    async def _splice_attached(
        self, tcp: trio.SocketStream, data: RawSocketStream, stream: MuxStream, first: bytes
    ) -> None:
        """The client's bytes to and from the home's data connection, in the kernel."""
        client = raw_stream(tcp)
        clean = False
        try:
            await send_first(stream, data, first)
            clean = await splice_attached(client, data, stream)
            log.debug("attached stream %d ended %s", stream.stream_id, _END[clean])
        except STREAM_ERRORS:
            clean = False
        finally:
            if clean:
                await stream.aclose()
            else:
                stream.reset(ev.ResetCode.CANCEL)
                abort(client.socket)
                abort(data.socket)
            await aclose_quietly(client)
            await aclose_quietly(data)

    async def _drop_data(self, session: HomeSession, data: RawSocketStream) -> None:
        abort(data.socket)
        await aclose_quietly(data)
        if session.data is not None:
            session.data.release()

    async def _serve_data(self, tcp: trio.SocketStream, buf: bytearray, ip: str) -> None:
        """A home's data connection: its ticket line, then idle in its session's pool
        until a client takes it (the client's task owns it then)."""
        parsed: tuple[bytes, int] | Preamble = Preamble.NEED_MORE
        with trio.move_on_after(self.cfg.client_hello_timeout):
            try:
                while (parsed := parse_preamble(buf)) is Preamble.NEED_MORE:
                    data = await tcp.receive_some(LINE_SIZE - len(buf))
                    if not data:
                        break
                    buf += data
            except STREAM_ERRORS:
                pass
        pool = None
        if isinstance(parsed, tuple) and parsed[1] == len(buf):
            pool = self._tickets.get(parsed[0])
        if pool is None or not isinstance(parsed, tuple):
            self.stats.refused["data_ticket"] += 1
            log.info("refused a data connection from %s: no such ticket", ip)
            abort_socket(tcp)
            await aclose_quietly(tcp)
            return
        stream = raw_stream(tcp)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if not await pool.hold(parsed[0], stream):
            await aclose_quietly(stream)

    # -- the relay's own hostname: /healthz and /v1/tunnel ----------------------
    async def _serve_own(self, tcp: trio.SocketStream, hello: bytes, ip: str) -> None:
        # A session carries every request of a home: its socket is used directly too.
        tls = TLSStream(
            raw_stream(tcp, unsent=SESSION_UNSENT),
            self._ssl,
            server_side=True,
            prefix=hello,
            receive_size=SESSION_RECEIVE,
        )
        try:
            with trio.fail_after(self.cfg.client_hello_timeout):
                await tls.do_handshake()
                http, request, head = await _read_request_head(tls)
        except (trio.TooSlowError, *STREAM_ERRORS, h11.RemoteProtocolError) as exc:
            log.info("relay endpoint: %s dropped (%s)", ip, type(exc).__name__)
            await aclose_quietly(tls)
            return
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        try:
            if target == "/healthz":
                await _respond(tls, http, 200, b"ok\n", "text/plain")
            elif target == TUNNEL_PATH:
                await self._serve_tunnel(tls, http, request, head, ip)
            else:
                await _respond(tls, http, 404, b"not found\n", "text/plain")
        except STREAM_ERRORS:
            pass
        finally:
            await aclose_quietly(tls)

    def _authorize(self, request: h11.Request) -> tuple[Claims, tuple[str, ...], str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise TokenError("bad_token", "no bearer token in the Authorization header")
        revoked = set(self.cfg.revoked_tokens)
        if self.fleet is not None:
            revoked |= self.fleet.revoked
        claims = verify_token(auth[7:].strip(), self._public_keys, revoked=revoked)
        requested = (
            tuple(
                hostname_key(h)
                for h in headers.get("tunneld-hostnames", "").split(",")
                if h.strip()
            )
            or claims.hostnames
        )
        check_hostnames(claims, requested, self.cfg.hostname)
        version = headers.get("tunneld-version", "").strip()
        if not version:
            raise TokenError("bad_request", "the Tunneld-Version header is missing")
        check_version(version, self.cfg.blocked_versions, claims)
        return claims, requested, version

    async def _serve_tunnel(
        self,
        tls: TLSStream,
        http: h11.Connection,
        request: h11.Request,
        head: bytes,
        ip: str,
    ) -> None:
        try:
            claims, hostnames, version = self._authorize(request)
        except TokenError as exc:
            status = REFUSAL_STATUS.get(exc.reason, 403)
            self.stats.refused[exc.reason] += 1
            log.warning("refused tunnel from %s: %s (%s)", ip, exc.reason, exc)
            body = json.dumps({"reason": exc.reason, "detail": str(exc)}).encode()
            await _respond(tls, http, status, body, "application/json")
            return
        if _header(request, b"tunneld-check"):
            # `tunneld doctor`: this token would be accepted; no session is opened.
            body = json.dumps({"ok": True, "hostnames": list(hostnames)}).encode()
            await _respond(tls, http, 200, body, "application/json")
            return
        offered = _header(request, b"sec-websocket-protocol")
        key = _header(request, b"sec-websocket-key")
        if self.cfg.raw_transport and key and RAW_SUBPROTOCOL in _tokens(offered):
            # Accept the upgrade ourselves, then carry frames without
            # WebSocket framing (see tunneld/transport/channel.py).
            switch = h11.InformationalResponse(
                status_code=101,
                headers=[
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", websocket_accept(key)),
                    ("Sec-WebSocket-Protocol", RAW_SUBPROTOCOL),
                ],
            )
            with trio.fail_after(self.cfg.client_hello_timeout):
                await tls.send_all(http.send(switch) or b"")
            trailing = bytes(http.trailing_data[0])
            channel = RawChannel(PrefixedStream(tls, trailing) if trailing else tls)
            log.debug("tunnel from %s: raw transport", ip)
            await self._run_session(channel, claims, hostnames, version, ip)
            return
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(self.cfg.client_hello_timeout):
                    ws_request = await trio_websocket.wrap_server_stream(
                        nursery,
                        PrefixedStream(tls, head),
                        max_message_size=MAX_MESSAGE_SIZE,
                        receive_buffer_size=RECEIVE_BUFFER,
                    )
                    ws = await ws_request.accept()
                log.debug("tunnel from %s: websocket transport", ip)
            except (trio.TooSlowError, trio_websocket.HandshakeError, *STREAM_ERRORS) as exc:
                log.info("tunnel handshake from %s failed: %r", ip, exc)
                nursery.cancel_scope.cancel()
                return
            await self._run_session(ws, claims, hostnames, version, ip)
            nursery.cancel_scope.cancel()

    async def _run_session(
        self, ws: Any, claims: Claims, hostnames: tuple[str, ...], version: str, ip: str
    ) -> None:
        conn = tuned_connection(
            Role.RELAY,
            window=self.cfg.stream_window,
            max_window=self.cfg.max_stream_window,
            budget=self.cfg.session_buffer,
            max_streams=self.cfg.max_streams_per_session,
        )
        session_id = secrets.token_hex(6)
        home: HomeSession | None = None

        def on_event(event: ev.Event) -> None:
            if isinstance(event, ev.Ban) and home is not None:
                home.apply_bans(event)
                if self.fleet is not None:
                    self.fleet.bans_changed(home)
            elif isinstance(event, ev.GoAway):
                log.info("session %s going away: %s", session_id, event.reason or event.code)
                if home is not None:
                    self.registry.unregister(home)

        mux = MuxSession(ws, conn, session_id=session_id, on_event=on_event)
        try:
            with trio.fail_after(self.cfg.client_hello_timeout):
                first = await mux.receive_handshake()
            if not isinstance(first, ev.Hello):
                raise ProtocolError(f"expected HELLO, got {type(first).__name__}")
            if set(first.hostnames) != set(hostnames):
                raise ProtocolError("HELLO hostnames differ from the handshake headers")
            await mux.send_now(
                ev.Welcome(
                    session_id=session_id,
                    hostnames=hostnames,
                    window=self.cfg.stream_window,
                    ping_interval=self.cfg.ping_interval,
                    data_connections=self.cfg.data_connections if first.data_connections else 0,
                    access=True,  # BAN frames' access rules are enforced here
                )
            )
        except (
            ProtocolError,
            trio.TooSlowError,
            trio_websocket.ConnectionClosed,
            ChannelClosed,  # gone after the upgrade (`tunneld doctor` closes at once)
        ) as exc:
            log.warning(
                "session from %s failed its handshake: %s", ip, str(exc) or type(exc).__name__
            )
            with trio.move_on_after(2):
                await ws.aclose(1002, "handshake failed")
            return
        if self.state != "running":
            mux.goaway(ev.ResetCode.SHUTDOWN, "relay shutting down")
        home = HomeSession(
            mux=mux,
            session_id=session_id,
            subject=claims.subject,
            token_id=claims.token_id,
            version=version,
            hostnames=hostnames,
            peer=ip,
        )
        if mux.data_connections:
            assert isinstance(first, ev.Hello)

            def dial(ticket: bytes) -> None:
                mux.send(ev.Dial(ticket))

            home.data = DataPool(
                self.cfg.data_connections, first.data_connections, dial, self._tickets
            )
        self.registry.register(home)
        if self.fleet is not None:
            self.fleet.session_started(home)
        log.info(
            "session %s connected from %s: %s for %s (tunneld %s)",
            session_id,
            ip,
            claims.subject,
            ", ".join(hostnames),
            version,
        )

        def extra(nursery: trio.Nursery) -> None:
            nursery.start_soon(self._liveness, mux)
            if home.data is not None:
                nursery.start_soon(_refill, home.data)

        try:
            await mux.run(extra=extra)
            if mux.protocol_error is not None:
                log.warning("session %s closed: %s", session_id, mux.close_reason)
        finally:
            self.registry.unregister(home)
            if self.fleet is not None:
                self.fleet.session_ended(home)
            if home.data is not None:
                home.data.close()
            log.info("session %s ended (%s)", session_id, mux.close_reason or "closed")

    async def _liveness(self, mux: MuxSession) -> None:
        # The home pings every ping_interval; silence for three intervals = dead.
        limit = 3 * self.cfg.ping_interval
        while True:
            await trio.sleep(self.cfg.ping_interval / 2)
            if time.monotonic() - mux.last_received > limit:
                log.warning("session %s silent for %.0fs: closing", mux.session_id, limit)
                mux.close("no traffic from the home (liveness)")
                return

    # -- [relay.acme]: the relay's own certificate ---------------------------------
    def _own_acme(self) -> AcmeManager:
        from tunneld.acmeclient import AcmeManager, AcmeSettings

        certs, acme = self.own_certs, self.config.relay_acme
        assert certs is not None
        return AcmeManager(
            acme,
            certs,
            (self.cfg.hostname,),
            AcmeSettings.from_section(acme, acme.state_directory, acme.challenge),
            publish_http=certs.set_http_challenges,
        )

    async def _answer_acme(self, tcp: trio.SocketStream, hello: bytes, parsed: ClientHello) -> None:
        """A TLS-ALPN-01 validation of the relay's own name: the challenge handshake, closed."""
        assert self.own_certs is not None
        context = self.own_certs.challenge_context(parsed)
        if context is None:
            await aclose_quietly(tcp)
            return
        tls = TLSStream(raw_stream(tcp), context, server_side=True, prefix=hello)
        try:
            with trio.fail_after(self.cfg.client_hello_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, *STREAM_ERRORS):
            pass
        await aclose_quietly(tls)

    def _http01(self, target: str) -> bytes | None:
        """The HTTP-01 key authorization for `target`, when an order is pending."""
        if self.own_certs is None:
            return None
        answer = self.own_certs.http_answer(target)
        return answer.encode("ascii") if answer is not None else None

    # -- plain HTTP: redirect to https -------------------------------------------
    async def _handle_http(self, tcp: trio.SocketStream) -> None:
        try:
            with trio.fail_after(self.cfg.client_hello_timeout):
                http, request, _ = await _read_request_head(tcp)
            host = ""
            for name, value in request.headers:
                if name.lower() == b"host":
                    host = value.decode("ascii", "replace").split(":", 1)[0]
            target = request.target.decode("ascii", "replace")
            answer = self._http01(target)
            if answer is not None:
                await _respond(tcp, http, 200, answer, "application/octet-stream")
            elif not host or not target.startswith("/"):
                await _respond(tcp, http, 400, b"bad request\n", "text/plain")
            else:
                location = f"https://{host}{target}"
                await _respond(tcp, http, 308, b"", "text/plain", extra=[("Location", location)])
        except (trio.TooSlowError, *STREAM_ERRORS, h11.RemoteProtocolError):
            pass
        finally:
            await aclose_quietly(tcp)

    # -- control socket ------------------------------------------------------
    def _control_router(self) -> Router:
        router = Router()

        async def status(_: ControlRequest) -> ControlResponse:
            return ControlResponse.json(self.status())

        router.add("GET", "/v1/status", status)
        router.add("GET", "/metrics", metrics_endpoint(self.metrics))
        return router

    def status(self) -> dict[str, Any]:
        sessions = []
        for s in self.registry.sessions:
            st = s.mux.statistics()
            sessions.append(
                {
                    "id": s.session_id,
                    "subject": s.subject,
                    "hostnames": list(s.hostnames),
                    "peer": s.peer,
                    "version": s.version,
                    "connected_since": _iso(st.connected_since),
                    "streams": {"active": st.streams_active, "total": st.streams_total},
                    "bytes": {"in": st.bytes_in, "out": st.bytes_out},
                    "bans": len(s.bans),
                    "access_rules": len(s.access.rules),
                    "going_away": st.going_away or s.replaced,
                    "flow": st.flow_json(),
                    "data_connections": None
                    if s.data is None
                    else dataclasses.asdict(s.data.statistics()),
                }
            )
        return {
            "role": "relay",
            "state": self.state,
            "hostname": self.cfg.hostname,
            "listen": [f"{h}:{p}" for h, p in self.listening],
            "started": _iso(self.started_at),
            "sessions": sessions,
            "tasks": trio.lowlevel.current_statistics().tasks_living,
            "connections": {
                "total": self.stats.connections_total,
                "routed": self.stats.routed_total,
                "refused": dict(self.stats.refused),
            },
            "streams": {"active": self.registry.stream_count(), "total": self.stats.routed_total},
            "hostnames": sorted(
                {h for s in self.registry.sessions if not s.replaced for h in s.hostnames}
            ),
            "certificate": {
                **certificate_status(self.certificate, time.time()),
                **({"renewal": self.own_certs.renewal_status()} if self.own_certs else {}),
            },
            "metrics_listen": self.metrics_listening,
            "fleet": None if self.fleet is None else self.fleet.status(),
            "config": self.settings.status(),
            "warnings": self.settings.warnings(),
            "version": __version__,
        }


def _header(request: h11.Request, name: bytes) -> str:
    for key, value in request.headers:
        if key == name:  # h11 lower-cases names
            return value.decode("latin-1").strip()
    return ""


def _tokens(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


async def _read_request_head(
    stream: trio.abc.Stream,
) -> tuple[h11.Connection, h11.Request, bytes]:
    """Read one HTTP request head; returns it and every raw byte read."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    raw = bytearray()
    event = await next_event(
        stream,
        conn,
        MAX_REQUEST_HEAD,
        raw=raw,
        on_eof=lambda: trio.BrokenResourceError("client closed before a request"),
    )
    if not isinstance(event, h11.Request):
        raise h11.RemoteProtocolError("unexpected event before the request")
    return conn, event, bytes(raw)


async def _respond(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("Server", f"tunneld-relay/{__version__}"),
        # `tunneld doctor` compares the home's clock with this one.
        ("Date", email.utils.formatdate(usegmt=True)),
        *(extra or []),
    ]
    with trio.fail_after(10):
        await send_response(stream, conn, status, headers, body)


def _load_own(certs: RelayCertificates, config: RelayConfig) -> LoadedRelayCertificate:
    try:
        return certs.load()
    except (OSError, ssl.SSLError, ValueError, KeyFileError) as exc:
        raise ConfigError(
            f"{config.path}: [relay] certificate / private_key: cannot load or create "
            f"{certs.cert_path} / {certs.key_path} for [relay.acme]: {exc}"
        ) from None


async def run_relay(config: RelayConfig) -> int:
    """The `tunneld relay` process: serve until SIGTERM/SIGINT, then drain."""
    relay = Relay(config)
    return await run_until_signalled(
        relay.run,
        reload=lambda: reload_relay(relay),
        stop=relay.stop,
        config_path=lambda: relay.config.path,
        log=log,
    )


_END = {True: "cleanly", False: "broken"}
