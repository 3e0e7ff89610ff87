"""Connections to the upstream app (`[upstream] url`), kept in a small pool.

Each connection pairs a trio stream (TCP, or TLS for an https:// upstream)
with a `ResponseReader`. A connection whose last exchange ended cleanly (the
request sent, the response read whole, keep-alive) goes back to the pool; one
that sits idle too long, or that the upstream closed meanwhile (readable while
idle), is dropped instead of reused.
"""

from __future__ import annotations

import logging
import select
import ssl
from collections.abc import Awaitable, Callable

import trio

from tunneld.config import UpstreamSection
from tunneld.errors import TunneldError
from tunneld.home.proxy.http1 import (
    CHUNKED_END,
    NEED_DATA,
    Event,
    ResponseReader,
    Sentinel,
    frame_chunk,
)
from tunneld.transport.rawsock import RawSocketStream, raw_stream
from tunneld.transport.splice import STREAM_ERRORS, abort_socket, aclose_quietly

__all__ = ["UpstreamConnection", "UpstreamError", "UpstreamPool", "upstream_ssl_context"]

log = logging.getLogger("tunneld.upstream")

RECEIVE_SIZE = 256 * 1024  # a body arrives in few reads: fewer TLS records written per call
# Upstream response heads are trusted but still bounded (memory per connection).
MAX_RESPONSE_HEAD = 256 * 1024
# Servers close idle keep-alive connections after a while (aiohttp: 75 s); dropping
# ours sooner avoids racing a request against that close.
POOL_IDLE_TIMEOUT = 30.0

Connect = Callable[[], Awaitable[trio.abc.Stream]]


class UpstreamError(TunneldError):
    """The upstream could not be reached (refused, unreachable, TLS failed, timed out)."""


def upstream_ssl_context(config: UpstreamSection) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        cafile=str(config.ca_file) if config.ca_file is not None else None
    )
    if not config.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class UpstreamConnection:
    """One upstream connection: the request framed out, the response read in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = ResponseReader(MAX_RESPONSE_HEAD)
        self.reused = False
        self.idle_since = 0.0
        self.bytes_in = 0  # received in this exchange: a retry is only safe at 0
        self._chunked = False  # the request body being sent is chunked
        self.request_done = True  # no request is partly sent
        self._poller: select.poll | None = None

    async def _send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _receive(self) -> bytes:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        return data if type(data) is bytes else bytes(data)

    async def send_head(self, head: bytes, method: bytes, *, chunked: bool, end: bool) -> None:
        """Send a framed request head (`end`: it has no body); `chunked` frames the body."""
        self.reader.expect(method)
        self._chunked = chunked
        self.request_done = end
        await self._send(head)

    async def send_body(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            await self._send(b"".join(frame_chunk(data)))
        else:
            await self._send(data)

    async def end_body(self) -> None:
        if self._chunked:
            await self._send(CHUNKED_END)
        self.request_done = True

    def event_nowait(self) -> Event | Sentinel | None:
        """The next event if it needs no waiting: from what is buffered, or what a
        plain TCP socket holds right now. None when it would have to wait."""
        reader = self.reader
        event = reader.next_event()
        stream = self.stream
        while event is NEED_DATA:
            if not isinstance(stream, RawSocketStream):
                return None
            data = stream.receive_nowait(RECEIVE_SIZE)
            if data is None:
                return None
            self.bytes_in += len(data)
            reader.receive_data(data)
            event = reader.next_event()
        return event

    def buffered_event(self) -> Event | Sentinel | None:
        """The next event if it needs no more bytes, else None (no I/O)."""
        event = self.reader.next_event()
        return None if event is NEED_DATA else event

    async def next_event(self) -> Event | Sentinel:
        """The next event from the upstream (raises RemoteHttpError, STREAM_ERRORS)."""
        reader = self.reader
        while True:
            event = reader.next_event()
            if event is not NEED_DATA:
                return event
            data = await self._receive()
            self.bytes_in += len(data)
            reader.receive_data(data)

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly and nothing came after the response.

        Bytes past the response's end (a body sent to HEAD, a wrong Content-Length)
        would be read as the answer to the next request, maybe another client's.
        """
        reader = self.reader
        return self.request_done and reader.done and reader.keep_alive and not self._stray()

    @property
    def idle(self) -> bool:
        """Ready for a new request (`next_cycle` done) with nothing unread."""
        return self.request_done and self.reader.idle and not self._stray()

    def _stray(self) -> bool:
        data, closed = self.reader.trailing_data
        if data or closed:
            return True
        if isinstance(self.stream, trio.SSLStream):
            # Records already read from the socket but not yet asked for: `pending()`
            # is the SSLObject's (forwarded by SSLStream); the encrypted rest sits in
            # trio's incoming BIO, which has no public accessor.
            incoming = getattr(self.stream, "_incoming", None)
            return bool(self.stream.pending() or getattr(incoming, "pending", 0))
        return False

    def looks_closed(self) -> bool:
        """An idle connection with anything to read (EOF, stray bytes) is unusable."""
        if self._poller is None:  # made once: asked before every reuse
            fd = _fileno(self.stream)
            if fd is None:
                return False
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
        try:
            return bool(self._poller.poll(0))
        except OSError:
            return True

    def next_cycle(self) -> None:
        """Ready for the next request after an exchange that ended cleanly."""
        self.reader.start_next_cycle()
        self.idle_since = trio.current_time()
        self.bytes_in = 0

    async def aclose(self) -> None:
        await aclose_quietly(self.stream)

    async def abort(self) -> None:
        """Close with a TCP reset, so the upstream never takes a cut request as complete."""
        if isinstance(self.stream, trio.SSLStream):
            abort_socket(self.stream.transport_stream)
            # No close_notify: that would tell the upstream the request ended cleanly.
            await aclose_quietly(self.stream.transport_stream)
        else:
            abort_socket(self.stream)
            await aclose_quietly(self.stream)


def _fileno(stream: trio.abc.Stream) -> int | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return int(sock.fileno())
    except (OSError, ValueError):
        return None


class UpstreamPool:
    """Hands out upstream connections; keeps up to `size` idle ones for reuse."""

    def __init__(self, config: UpstreamSection, connect: Connect | None = None) -> None:
        self.config = config
        self.size = config.pool_size
        self._connect = connect or self._open
        self._idle: list[UpstreamConnection] = []
        self._ssl: ssl.SSLContext | None = None
        self.opened = 0  # connections made (statistics, tests)

    async def acquire(self) -> UpstreamConnection:
        """A pooled connection if a live one is idle, else a new one (raises UpstreamError)."""
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < POOL_IDLE_TIMEOUT and not conn.looks_closed():
                conn.reused = True
                return conn
            await conn.aclose()
        try:
            with trio.fail_after(self.config.connect_timeout):
                stream = await self._connect()
        except trio.TooSlowError:
            raise UpstreamError(
                f"connecting took longer than {self.config.connect_timeout:g}s"
            ) from None
        except (*STREAM_ERRORS, ssl.SSLError) as exc:
            cause = exc.__cause__ or exc
            raise UpstreamError(str(cause) or type(cause).__name__) from None
        self.opened += 1
        return UpstreamConnection(stream)

    async def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool when its exchange ended cleanly, else closed."""
        if (conn.reusable or conn.idle) and len(self._idle) < self.size:
            if conn.reusable:
                conn.next_cycle()
            self._idle.append(conn)
            return
        await conn.aclose()

    async def aclose(self) -> None:
        """Close the idle connections (also after one turned out dead: likely all are)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()

    async def _open(self) -> trio.abc.Stream:
        cfg = self.config
        tcp = await trio.open_tcp_stream(cfg.host, cfg.port)
        if cfg.scheme != "https":
            return raw_stream(tcp)  # see rawsock.py: most of a small exchange's socket time
        if self._ssl is None:
            self._ssl = upstream_ssl_context(cfg)
        tls = trio.SSLStream(tcp, self._ssl, server_hostname=cfg.host)
        try:
            await tls.do_handshake()
        except BaseException:
            await aclose_quietly(tcp)
            raise
        return tls
