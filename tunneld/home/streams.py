"""One client stream at home: the watchdog's admission, ClientHello, TLS, then the HTTP proxy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from tunneld.config import HomeConfig
from tunneld.home.access import AccessControl
from tunneld.home.certs import CertificateStore
from tunneld.home.certs.clients import client_name, is_certificate_failure
from tunneld.home.proxy import Proxy
from tunneld.home.routes import RouteTable
from tunneld.home.watchdog import Watchdog
from tunneld.transport.session import ClientStream
from tunneld.transport.splice import STREAM_ERRORS, aclose_quietly
from tunneld.transport.tls import TLSStream
from tunneld.wire.clienthello import ClientHello, parse_client_hello
from tunneld.wire.events import ResetCode

log = logging.getLogger("tunneld.stream")


@dataclass(frozen=True)
class StreamStatistics:
    active: int
    total: int
    refused: int  # every refused stream, banned ones included
    tls_failed: int
    upstream_failed: int
    banned: int = 0


class StreamHandler:
    """Called by the session for every OPEN; owns nothing outside that call."""

    def __init__(
        self, config: HomeConfig, certs: CertificateStore, watchdog: Watchdog | None = None
    ) -> None:
        self.config = config
        self.certs = certs
        self.watchdog = watchdog if watchdog is not None else Watchdog(config.watchdog)
        # The route is the SNI's: its proxy, watchdog view and TLS context.
        self.routes = RouteTable(config, self.watchdog)
        self.access: AccessControl | None = None  # set by the daemon
        self.active = 0
        self.total = 0
        self.refused = 0
        self.banned = 0
        self.tls_failed = 0
        self.certificate_refused = 0  # handshakes without a valid client certificate

    @property
    def proxy(self) -> Proxy:
        """The default route's ([upstream])."""
        return self.routes.default.proxy

    @property
    def upstream_failed(self) -> int:
        return self.routes.upstream_failed

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            self.active,
            self.total,
            self.refused,
            self.tls_failed,
            self.upstream_failed,
            self.banned,
        )

    async def __call__(self, stream: ClientStream) -> None:
        ip = stream.client_ip
        self.total += 1
        # Before the ClientHello is even read: a refused client costs no TLS work.
        if self.active >= self.config.daemon.max_streams:
            why: str | None = f"over {self.config.daemon.max_streams} streams"
        else:
            # [access] again at home, for a relay that predates it (home/access.py).
            access = self.access
            host = stream.sni.lower().rstrip(".")  # as the relay matched it (normalized)
            why = access.refusal(ip, host) if access is not None else None
            if access is not None and why is not None:
                access.refused += 1
            else:
                why = self.watchdog.admit(ip)
        if why is not None:
            self.refused += 1
            if why == "banned":
                self.banned += 1
                log.info("refused stream from %s: banned", ip)
            elif why.startswith("access_"):
                log.info("refused stream from %s for %s: %s", ip, stream.sni, why)
            else:
                log.warning("refused stream from %s: %s", ip, why)
            stream.reset(ResetCode.REFUSED)
            return
        self.active += 1
        try:
            await self._serve(stream, ip)
        finally:
            self.active -= 1
            self.watchdog.release(ip)

    async def _serve(self, stream: ClientStream, ip: str) -> None:
        tls_cfg = self.config.tls
        hello: ClientHello | None = None
        first = b""
        with trio.move_on_after(tls_cfg.client_hello_timeout):
            hello, first = await self._read_client_hello(stream)
        if hello is None:
            self.tls_failed += 1
            stream.reset(ResetCode.TLS_FAILED)
            return
        route = self.routes.for_sni(hello.sni)
        context = self.certs.context_for(hello)
        if context is self.certs.context:  # not an ACME challenge: the route's own
            try:
                context = route.context(self.certs)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self.tls_failed += 1
                log.error("no TLS context for %s: %s", route.name, exc)
                stream.reset(ResetCode.TLS_FAILED)
                return
        tls = TLSStream(stream, context, server_side=True, prefix=first)
        try:
            with trio.fail_after(tls_cfg.handshake_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, *STREAM_ERRORS) as exc:
            self.tls_failed += 1
            log.info("TLS handshake with %s failed: %s", ip, _describe(exc))
            if route.clients is not None and is_certificate_failure(exc):
                self.certificate_refused += 1
                route.watchdog.failed(ip, f"no valid client certificate for {route.name}")
            stream.reset(ResetCode.TLS_FAILED)
            return
        name = client_name(tls.peer_certificate()) if route.clients is not None else None
        reset = await route.proxy.serve(tls, ip, hello.sni or "", name)
        log.debug("stream %d from %s ended %s", stream.stream_id, ip, _END[reset is None])
        if reset is None:
            await aclose_quietly(tls)
        else:
            # Never a clean end for a cut exchange: the client must see an error.
            stream.reset(reset)

    async def _read_client_hello(self, stream: ClientStream) -> tuple[ClientHello | None, bytes]:
        buf = bytearray()
        try:
            while True:
                data = await stream.receive_some()
                if not data:
                    break
                buf += data
                result = parse_client_hello(buf)
                if isinstance(result, ClientHello):
                    return result, bytes(buf)
                if result.name != "NEED_MORE":
                    log.info("stream from %s: %s", stream.client_ip, result.name.lower())
                    break
        except STREAM_ERRORS:
            pass
        return None, b""


_END = {True: "cleanly", False: "broken"}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__
