"""One client stream at home: the watchdog's admission, ClientHello, TLS, then the HTTP proxy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from tunneld.config import HomeConfig
from tunneld.home.access import AccessControl
from tunneld.home.certs import CertificateStore
from tunneld.home.proxy import Proxy
from tunneld.home.watchdog import Watchdog
from tunneld.transport.session import MuxStream
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
        self.proxy = Proxy(config.upstream, self.watchdog)
        self.access: AccessControl | None = None  # set by the daemon
        self.active = 0
        self.total = 0
        self.refused = 0
        self.banned = 0
        self.tls_failed = 0

    @property
    def upstream_failed(self) -> int:
        return self.proxy.upstream_failed

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            self.active,
            self.total,
            self.refused,
            self.tls_failed,
            self.upstream_failed,
            self.banned,
        )

    async def __call__(self, stream: MuxStream) -> None:
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

    async def _serve(self, stream: MuxStream, ip: str) -> None:
        tls_cfg = self.config.tls
        hello: ClientHello | None = None
        first = b""
        with trio.move_on_after(tls_cfg.client_hello_timeout):
            hello, first = await self._read_client_hello(stream)
        if hello is None:
            self.tls_failed += 1
            stream.reset(ResetCode.TLS_FAILED)
            return
        context = self.certs.context_for(hello)
        tls = TLSStream(stream, context, server_side=True, prefix=first)
        try:
            with trio.fail_after(tls_cfg.handshake_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, *STREAM_ERRORS) as exc:
            self.tls_failed += 1
            log.info("TLS handshake with %s failed: %s", ip, _describe(exc))
            stream.reset(ResetCode.TLS_FAILED)
            return
        reset = await self.proxy.serve(tls, ip, stream.sni)
        log.debug("stream %d from %s ended %s", stream.stream_id, ip, _END[reset is None])
        if reset is None:
            await aclose_quietly(tls)
        else:
            # Never a clean end for a cut exchange: the client must see an error.
            stream.reset(reset)

    async def _read_client_hello(self, stream: MuxStream) -> tuple[ClientHello | None, bytes]:
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
