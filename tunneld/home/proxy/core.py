"""The HTTP/1.1 reverse proxy at home: one client connection, `http1` on both sides.

Per request: read the head (with a header timeout; smuggling refused), rewrite
headers (`http.py`: hop-by-hop out, one true forwarded value each in), take an
upstream connection from the pool, then run two tasks: the client side streams
the request body upstream and afterwards keeps reading (bounded) so pipelined
requests are buffered and a vanished client is noticed; the response side
streams the response back. Bodies pass through chunk by chunk, never whole.
A `101 Switching Protocols` turns the connection into a byte splice.

`Proxy.serve` never raises for bad input or a bad peer: it answers 400/405/
408/431/501/502/504 with a small page while no response has started, and
otherwise reports that the client stream must be reset, so a cut response is
never presented as complete.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import NoReturn

import trio

from tunneld.config import UpstreamSection
from tunneld.errors import LocalHttpError, RemoteHttpError
from tunneld.home.proxy.http import (
    error_response,
    forwarded_chain,
    is_upgrade,
    response_headers,
    upstream_request_headers,
)
from tunneld.home.proxy.http1 import (
    CHUNKED_END,
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Request,
    RequestReader,
    Response,
    Sentinel,
    frame_chunk,
    frame_request_head,
    frame_response_head,
)
from tunneld.home.proxy.upstream import UpstreamConnection, UpstreamError, UpstreamPool
from tunneld.home.watchdog.core import Watchdog
from tunneld.netaddr import normalize_ip
from tunneld.transport.rawsock import RawSocketStream
from tunneld.transport.session import MuxStream
from tunneld.transport.splice import STREAM_ERRORS, splice
from tunneld.transport.tls import TLSStream
from tunneld.wire.events import ResetCode

__all__ = ["Proxy"]

log = logging.getLogger("tunneld.proxy")

RECEIVE_SIZE = 64 * 1024
ERROR_SEND_TIMEOUT = 5.0
# After an early response (before the request body was all forwarded), how long
# the rest of the body may take before the client connection is closed instead.
BODY_GRACE = 1.0
# Upstream failures that mean "this upstream connection is unusable".
_UPSTREAM_ERRORS = (*STREAM_ERRORS, RemoteHttpError)


# How long a bodyless request's answer may take before a task starts watching the
# client (see _Exchange._prefetch).
PREFETCH_WAIT = 0.5

# Hold small response pieces up to this size so they leave in one write.
COALESCE_BYTES = 16 * 1024


class _End(Exception):
    """Stop serving this client connection: close it cleanly, or reset it."""

    def __init__(self, reset: int | None) -> None:
        super().__init__(reset)
        self.reset = reset


class _ClientGone(Exception):
    """Sending to or receiving from the client failed: it is gone."""


class _Framing(enum.Enum):
    """How a response body is framed for the client."""

    NONE = "none"  # HEAD, 204, 304: no body whatever the headers say
    LENGTH = "length"  # the upstream's Content-Length, bytes passed as they come
    CHUNKED = "chunked"  # re-chunked: the length is unknown, the client speaks 1.1
    CLOSE = "close"  # an HTTP/1.0 client and no length: the end is the close


class _Outcome(enum.Enum):
    DONE = "done"  # response complete; keep-alive unless either side said close
    CLOSE = "close"  # response complete; close the client connection cleanly
    UPGRADED = "upgraded"  # 101 sent: splice bytes
    ERROR = "error"  # nothing sent to the client yet: answer with an error page
    RETRY = "retry"  # a pooled connection was dead before answering: try a new one
    ABORT = "abort"  # reset the client stream


class Proxy:
    """Serves client connections (already TLS-terminated) against one upstream."""

    def __init__(
        self, config: UpstreamSection, watchdog: Watchdog, pool: UpstreamPool | None = None
    ) -> None:
        self.config = config
        self.watchdog = watchdog
        self.pool = pool if pool is not None else UpstreamPool(config)
        # The names this proxy serves (its route's): a request whose Host is not one of
        # them, or differs from the connection's SNI, gets 421. None: no check.
        self.hostnames: frozenset[str] | None = None
        # The header that carries the verified client certificate's name; a client's
        # own copy of every header in `strip` (lower case names: every route's) is removed.
        self.name_header: bytes | None = None
        self.strip: frozenset[bytes] = frozenset()
        self.misdirected = 0  # 421 answers
        self.requests = 0
        self.upstream_failed = 0  # 502/504 answers and responses cut by the upstream
        self.websockets = 0  # upgraded connections being spliced now

    async def serve(
        self, client: trio.abc.Stream, client_ip: str, sni: str, client_name: str | None = None
    ) -> int | None:
        """Serve requests on `client` until it ends. `client_name`: the verified client
        certificate's name, sent upstream in `name_header`.

        Returns None when the connection ended cleanly (the caller closes it),
        else the RESET code the caller must abort the client stream with.
        """
        conn = _ClientConnection(self, client, client_ip, sni)
        conn.client_name = client_name
        try:
            await conn.run()
        except _End as end:
            return end.reset
        except _ClientGone:
            return ResetCode.CANCEL
        finally:
            await conn.give_back()
        return None

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def reconfigure(self, config: UpstreamSection) -> None:
        """New requests use `config` (reload); exchanges under way finish on their old pool."""
        old, self.pool, self.config = self.pool, UpstreamPool(config), config
        old.size = 0  # its connections in use close when released instead of idling
        await old.aclose()


class _ClientConnection:
    def __init__(self, proxy: Proxy, client: trio.abc.Stream, client_ip: str, sni: str) -> None:
        self.proxy = proxy
        self.config = proxy.config
        self.client = client
        # The relay already sends normalized addresses; this keeps the promise local.
        self.client_ip = _normalized(client_ip)
        self.sni = sni.encode("ascii", "replace")
        self.client_name: str | None = None
        self.reader = RequestReader(self.config.max_header_size)
        # The relay's address is the client for the whole connection, unless the
        # peer is a trusted proxy: then each request's chain names its client.
        self.trusted = proxy.watchdog.trusts(self.client_ip)
        # The upstream connection of the last request, kept for the next one on
        # this client connection: no pool round trip or new connect per request.
        self.kept: tuple[UpstreamPool, UpstreamConnection] | None = None
        self._out: list[bytes] = []  # framed bytes held by queue()
        self._out_bytes = 0
        # The response to the current request.
        self.http_version = b"1.1"
        self.head_request = False
        self.head_sent = False  # a final response head went out: no error page now
        self.framing = _Framing.LENGTH
        self.close_after = False  # the response ends the connection

    async def give_back(self) -> None:
        if self.kept is not None:
            pool, up = self.kept
            self.kept = None
            with trio.CancelScope(shield=True):
                await pool.release(up)

    async def _upstream(self, pool: UpstreamPool) -> UpstreamConnection:
        if self.kept is not None:
            kept_pool, up = self.kept
            self.kept = None
            if kept_pool is pool and not up.looks_closed():
                up.reused = True  # it may have died meanwhile: a bodyless request retries
                return up
            await up.abort()
        return await pool.acquire()

    async def run(self) -> None:
        first = True
        while True:
            self.head_sent = False  # a bad next request still gets its error page
            request = await self._read_request(first)
            if request is None:
                return
            first = False
            self.http_version = request.http_version
            self.head_request = request.method == b"HEAD"
            self.close_after = not self.reader.keep_alive
            await self._handle(request)
            self.reader.start_next_cycle()

    # -- request heads ------------------------------------------------------
    async def _read_request(self, first: bool) -> Request | None:
        """The next request head, or None when the client closed or idled out."""
        reader = self.reader
        started = not reader.idle  # pipelined bytes already read
        wait = self.config.header_timeout if first or started else self.config.idle_timeout
        deadline = trio.current_time() + wait
        eof = False
        while True:
            try:
                event = reader.next_event()
            except RemoteHttpError as exc:
                if eof:
                    return None  # the client hung up halfway: nobody to answer
                await self._refuse(exc.status_hint, str(exc), self.client_ip)
            if isinstance(event, Request):
                return event
            if event is not NEED_DATA:
                return None  # ConnectionClosed
            with trio.move_on_at(deadline) as scope:
                data = await self._receive(RECEIVE_SIZE)
            if scope.cancelled_caught:
                if not started:
                    return None  # idle keep-alive connection: close quietly
                await self._refuse(408, "request head too slow", self.client_ip)
            reader.receive_data(data)
            if not data:
                eof = True
            elif not started:
                started = True
                deadline = trio.current_time() + self.config.header_timeout

    async def _receive(self, max_bytes: int) -> bytes:
        try:
            return bytes(await self.client.receive_some(max_bytes))
        except STREAM_ERRORS as exc:
            raise _ClientGone() from exc

    # -- responses to the client ---------------------------------------------
    def queue(self, data: bytes) -> None:
        """Hold framed bytes, so a small response's head, body and end leave in one
        TLS record and one mux frame instead of three (see `send_data` for big ones)."""
        self._out.append(data)
        self._out_bytes += len(data)

    async def flush_client(self) -> None:
        out, self._out, self._out_bytes = self._out, [], 0
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        if not data:
            return
        try:
            await self.client.send_all(data)
        except STREAM_ERRORS as exc:
            raise _ClientGone() from exc

    def start_response(self, response: Response, upstream_framing: str, length: int | None) -> None:
        """Frame the final response head for the client (held until the next flush).

        The body keeps the upstream's length when it has one; otherwise it is
        re-chunked for an HTTP/1.1 client, or ends with the connection for 1.0.
        """
        status = response.status_code
        # One Content-Length line holding the length the reader took (upstreams may
        # repeat or list it; strict clients refuse that).
        headers = response_headers(response)
        if length is not None:
            headers.append((b"Content-Length", b"%d" % length))
        if self.head_request or status in (204, 304):
            self.framing = _Framing.NONE
        elif upstream_framing == "length":
            self.framing = _Framing.LENGTH
        elif self.http_version == b"1.1":
            self.framing = _Framing.CHUNKED
            headers.append((b"Transfer-Encoding", b"chunked"))
        else:
            self.framing = _Framing.CLOSE
            self.close_after = True
        if self.close_after:
            headers.append((b"Connection", b"close"))
        self.queue(frame_response_head(status, response.reason, headers))
        self.head_sent = True

    async def send_informational(self, response: Response) -> None:
        """A 1xx (101 included) as the upstream sent it, minus hop-by-hop headers."""
        headers = response_headers(response)
        self.queue(frame_response_head(response.status_code, response.reason, headers))
        await self.flush_client()

    async def send_data(self, data: bytes) -> None:
        """A piece of the response body; big ones go at once, never copied into a join."""
        if self.framing is _Framing.NONE or not data:
            return
        if self.framing is _Framing.CHUNKED:
            self._out.extend(frame_chunk(data))
        else:
            self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= COALESCE_BYTES:
            await self.flush_client()

    async def end_response(self) -> None:
        if self.framing is _Framing.CHUNKED:
            self.queue(CHUNKED_END)
        await self.flush_client()

    async def _refuse(
        self, status: int, why: str, client_ip: str, *, head: bool = False
    ) -> NoReturn:
        """Answer `status` with a small page, then end the connection (raises _End)."""
        if status >= 500:
            log.warning("%d for %s: %s", status, client_ip, why)
        else:
            log.info("%d for %s: %s", status, client_ip, why)
        if self.head_sent:
            raise _End(ResetCode.CANCEL)  # a response already started: it cannot become a page
        response, body = error_response(status)
        data = frame_response_head(status, response.reason, response.headers)
        if not head:
            data += body
        self._out, self._out_bytes = [], 0
        with trio.move_on_after(ERROR_SEND_TIMEOUT):
            try:
                await self.client.send_all(data)
            except STREAM_ERRORS:
                raise _End(ResetCode.CANCEL) from None
            raise _End(None)
        raise _End(ResetCode.CANCEL)

    # -- one request ----------------------------------------------------------
    async def _handle(self, request: Request) -> None:
        self.proxy.requests += 1
        head = self.head_request
        client_ip = self.client_ip
        if self.trusted:
            client_ip = self.proxy.watchdog.client_address(client_ip, forwarded_chain(request))
        # Per request: a ban lands mid keep-alive, and a trusted proxy's clients vary.
        if self.proxy.watchdog.banned(client_ip) is not None:
            await self._refuse(403, "banned", client_ip, head=head)
        if request.method == b"CONNECT":
            await self._refuse(405, "CONNECT request", client_ip)
        chunked = self.reader.body_framing == "chunked"
        bodyless = not self.reader.has_body
        upgrade = is_upgrade(request)
        host = next((v for n, v in request.headers if n.lower() == b"host"), b"") or self.sni
        if self.proxy.hostnames is not None:
            wrong = misdirected(host, self.sni, self.proxy.hostnames)
            if wrong:
                self.proxy.misdirected += 1
                await self._refuse(421, wrong, client_ip, head=head)
        headers = upstream_request_headers(
            request, client_ip, host, chunked=chunked, upgrade=upgrade
        )
        name_header = self.proxy.name_header
        strip = self.proxy.strip
        if strip:
            headers = [(n, v) for n, v in headers if n.lower() not in strip]
        if name_header is not None:
            if self.client_name is not None:
                headers.append((name_header, self.client_name.encode("ascii", "replace")))
        try:
            upstream_head = frame_request_head(request.method, request.target, headers)
        except LocalHttpError as exc:
            await self._refuse(400, f"cannot forward the request: {exc}", client_ip)
        if bodyless:
            end = self.reader.next_event()  # no I/O: a body of length 0 is complete
            assert isinstance(end, EndOfMessage), end
        forward = _Forward(upstream_head, request.method, request.target, chunked, upgrade)

        attempts = 2 if bodyless else 1  # a dead pooled connection is retried once
        pool = self.proxy.pool  # released to the pool it came from, even after a reload
        for attempt in range(attempts):
            try:
                up = await self._upstream(pool)
            except UpstreamError as exc:
                self.proxy.upstream_failed += 1
                await self._refuse(
                    502, f"upstream {self.config.url} unreachable: {exc}", client_ip, head=head
                )
            exchange = _Exchange(self, up, forward, bodyless=bodyless, ip=client_ip)
            exchange.pool = pool
            try:
                outcome = await exchange.run()
            except BaseException:  # cancelled from outside (session lost, shutdown)
                with trio.CancelScope(shield=True):
                    await up.abort()
                raise
            if outcome is _Outcome.RETRY and attempt + 1 < attempts:
                log.debug("pooled upstream connection was closed; retrying on a new one")
                await up.aclose()
                await pool.aclose()  # its idle siblings are likely dead too
                continue
            await self._finish(exchange, outcome, head=head)
            return

    async def _finish(self, exchange: _Exchange, outcome: _Outcome, *, head: bool) -> None:
        """Act on an exchange's outcome: keep going (return), or end (raise _End)."""
        up = exchange.up
        if outcome is _Outcome.UPGRADED:
            self.proxy.websockets += 1
            try:
                await self._splice(up)
            finally:
                self.proxy.websockets -= 1
        if outcome in (_Outcome.DONE, _Outcome.CLOSE):
            if outcome is _Outcome.CLOSE or self.close_after or not self.reader.done:
                await exchange.pool.release(up)
                raise _End(None)
            if up.reusable:
                up.next_cycle()
                self.kept = (exchange.pool, up)
            else:
                await exchange.pool.release(up)
            return
        await up.abort()
        if outcome is _Outcome.ABORT:
            raise _End(exchange.reset)
        if outcome is _Outcome.RETRY:  # the second attempt failed the same way
            exchange.status = 502
            exchange.why = "upstream closed the connection without answering"
        if exchange.status >= 500:
            self.proxy.upstream_failed += 1
        await self._refuse(exchange.status, exchange.why, exchange.ip, head=head)

    async def _splice(self, up: UpstreamConnection) -> NoReturn:
        """After 101: hand over what the readers already buffered, then copy bytes both ways."""
        client_rest = self.reader.trailing_data[0]
        upstream_rest = up.reader.trailing_data[0]
        try:
            if upstream_rest:
                await self.client.send_all(upstream_rest)
            if client_rest:
                await up.stream.send_all(client_rest)
        except STREAM_ERRORS:
            await up.abort()
            raise _End(ResetCode.CANCEL) from None
        mux = _pass_through(self.client, up.stream)
        try:
            clean = await splice(self.client, up.stream)
        finally:
            if mux is not None:
                mux.deliver_to(None)
        if clean:
            await up.aclose()
            raise _End(None)
        await up.abort()
        raise _End(ResetCode.CANCEL)


def _pass_through(client: trio.abc.Stream, upstream: trio.abc.Stream) -> MuxStream | None:
    """For an upgraded connection (a WebSocket, most often), let the session reader
    decrypt the client's bytes and write them to a plain upstream socket itself while
    the splice waits: no task switch per message. Returns the MuxStream to undo it on."""
    if not (isinstance(client, TLSStream) and isinstance(upstream, RawSocketStream)):
        return None
    mux = client.transport_stream
    if not isinstance(mux, MuxStream):
        return None
    mux.deliver_to(client.pass_through(upstream.socket.send))
    return mux


@dataclass(frozen=True, slots=True)
class _Forward:
    """A request as it goes upstream: its framed head and what the exchange needs to know."""

    head: bytes
    method: bytes
    target: bytes
    chunked: bool
    upgrade: bool


class _Exchange:
    """One request/response over one upstream connection: two tasks, one outcome."""

    def __init__(
        self,
        client: _ClientConnection,
        up: UpstreamConnection,
        request: _Forward,
        *,
        bodyless: bool,
        ip: str,
    ) -> None:
        self.c = client
        self.up = up
        self.request = request
        self.bodyless = bodyless
        self.ip = ip
        self.config = client.config
        self.pool = client.proxy.pool
        self.outcome: _Outcome | None = None
        self.status = 0
        self.why = ""
        self.reset: int = ResetCode.CANCEL
        self.response_started = False
        self.request_done = trio.Event()
        self.body_abandoned = False  # the upstream stopped taking the request body
        # When the response head is due (set once the request is sent); its scope is
        # made only when the response side may wait for the upstream.
        self.head_deadline = math.inf
        self.head_scope: trio.CancelScope | None = None
        self._whole = False  # _prefetch holds the answer's every event: no waiting
        self._nursery: trio.Nursery | None = None
        self._pending: deque[Event | Sentinel] = deque()  # taken by _prefetch
        self._pending_error: Exception | None = None

    def _stop(self, outcome: _Outcome, status: int = 0, why: str = "") -> None:
        if self.outcome is None:
            self.outcome, self.status, self.why = outcome, status, why
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _upstream_failed(self, why: str) -> None:
        if self.response_started:
            self.c.proxy.upstream_failed += 1
            log.warning("upstream broke off a response to %s: %s", self.ip, why)
            self.reset = ResetCode.UPSTREAM_FAILED
            self._stop(_Outcome.ABORT)
        elif self.up.reused and self.bodyless and self.up.bytes_in == 0:
            self._stop(_Outcome.RETRY)
        else:
            self._stop(_Outcome.ERROR, 502, f"upstream failed: {why}")

    def _request_sent(self) -> None:
        self.request_done.set()
        self._head_due(trio.current_time() + self.config.response_timeout)

    def _head_due(self, deadline: float) -> None:
        self.head_deadline = deadline
        if self.head_scope is not None:
            self.head_scope.deadline = deadline

    async def run(self) -> _Outcome:
        request = self.request
        try:
            await self.up.send_head(
                request.head, request.method, chunked=request.chunked, end=self.bodyless
            )
        except _UPSTREAM_ERRORS as exc:
            self._upstream_failed(_describe(exc))
        else:
            if self.bodyless:
                self._request_sent()
                if await self._prefetch():
                    self._whole = True
                    await self._response_side()  # all in hand: no waiting, no watcher
                    assert self.outcome is not None
                    return self.outcome
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._client_side)
                await self._response_side()
                nursery.cancel_scope.cancel()
        assert self.outcome is not None
        return self.outcome

    async def _prefetch(self) -> bool:
        """A bodyless request's answer, if it comes at once: True when it is all in hand.

        Most answers to a GET arrive whole within a moment; relaying them needs no
        task watching the client, whose start and cancellation cost more than the
        rest of a small exchange. Slower answers (long polls, streams) get the
        watcher, so a client that leaves is noticed while the upstream is silent.
        """
        up = self.up
        # One scheduler pass first: the rest of this batch's requests go out, and by
        # the time this task looks again the answer is usually there. Then it is taken
        # without a cancel scope, which costs as much as the rest of the wait.
        await trio.lowlevel.checkpoint()
        try:
            event = up.event_nowait()
            if event is None:
                with trio.move_on_at(min(self.head_deadline, trio.current_time() + PREFETCH_WAIT)):
                    event = await up.next_event()
        except _UPSTREAM_ERRORS as exc:
            self._pending_error = exc  # raised again, in order, to _response_side
            return True
        if event is None:
            return False  # not within PREFETCH_WAIT: the client watcher's turn
        self._pending.append(event)
        while self._pending:
            last = self._pending[-1]
            if last is PAUSED or isinstance(last, EndOfMessage | ConnectionClosed):
                return True
            if isinstance(last, Response) and last.status_code == 101:
                return True
            try:
                ready = up.buffered_event()
            except RemoteHttpError as exc:
                self._pending_error = exc
                return True
            if ready is None:
                return False
            self._pending.append(ready)
        return False

    def _take_prefetched(self) -> Event | Sentinel | None:
        """What `_prefetch` took from the upstream, in order, then its error if any."""
        if self._pending:
            return self._pending.popleft()
        if self._pending_error is not None:
            raise self._pending_error
        return None

    async def _upstream_event(self) -> Event | Sentinel:
        return self._take_prefetched() or await self.up.next_event()

    def _buffered_event(self) -> Event | Sentinel | None:
        return self._take_prefetched() or self.up.buffered_event()

    # -- client -> upstream -----------------------------------------------------
    async def _client_side(self) -> None:
        try:
            if not self.bodyless and not await self._pump_body():
                return
            await self._watch_client()
        except _ClientGone:
            self._stop(_Outcome.ABORT)

    async def _pump_body(self) -> bool:
        """Stream the request body upstream; False when the exchange cannot go on.

        One cancel scope for the whole body, its deadline moved before each wait
        (cheaper than a scope per chunk): the client may pause `idle_timeout`
        between chunks, the upstream may refuse bytes for `response_timeout`.
        """
        reader, up, config = self.c.reader, self.up, self.config
        eof = False
        waiting_for_client = True
        with trio.CancelScope() as scope:
            while True:
                try:
                    event = reader.next_event()
                except RemoteHttpError as exc:
                    if eof or self.response_started:
                        self._stop(_Outcome.ABORT)
                    else:
                        status = exc.status_hint
                        self._stop(_Outcome.ERROR, status, f"bad request body: {exc}")
                    return False
                if event is NEED_DATA:
                    waiting_for_client = True
                    scope.deadline = trio.current_time() + config.idle_timeout
                    data = await self.c._receive(RECEIVE_SIZE)
                    eof = not data
                    reader.receive_data(data)
                    continue
                if not isinstance(event, Data | EndOfMessage):
                    self._stop(_Outcome.ABORT)
                    return False
                waiting_for_client = False
                scope.deadline = trio.current_time() + config.response_timeout
                try:
                    if isinstance(event, Data):
                        await up.send_body(event.data)
                        continue
                    await up.end_body()
                except _UPSTREAM_ERRORS:
                    # The upstream stopped reading; it may still answer (early response).
                    self.body_abandoned = True
                    self._head_due(trio.current_time() + config.response_timeout)
                    return False
                self._request_sent()
                return True
        if self.response_started:
            self._stop(_Outcome.ABORT)
        elif waiting_for_client:
            self._stop(_Outcome.ERROR, 408, "request body stalled")
        else:
            self._stop(_Outcome.ERROR, 504, "upstream stopped reading the request")
        return False

    async def _watch_client(self) -> None:
        """Read ahead (bounded): buffers pipelined requests, notices a client that left."""
        budget = self.config.max_header_size
        while budget > 0:
            data = await self.c._receive(min(budget, RECEIVE_SIZE))
            self.c.reader.receive_data(data)
            if not data:
                return  # half-closed: the response is still wanted
            budget -= len(data)

    # -- upstream -> client -----------------------------------------------------
    async def _response_side(self) -> None:
        try:
            await self._relay_response()
        except _ClientGone:
            self._stop(_Outcome.ABORT)
        except _UPSTREAM_ERRORS as exc:
            self._upstream_failed(_describe(exc))
        except LocalHttpError as exc:  # the response cannot be framed for the client
            log.warning("cannot forward the upstream's response to %s: %s", self.ip, exc)
            self._stop(_Outcome.ABORT if self.response_started else _Outcome.ERROR, 502, str(exc))

    async def _final_head(self) -> Response | None:
        """The final response head, after passing on any 1xx; None once switched (101)."""
        while True:
            event = await self._upstream_event()
            if not isinstance(event, Response):
                raise RemoteHttpError(f"unexpected {event!r} before the response")
            if event.status_code >= 200:
                return event
            if event.status_code == 101:
                await self._switch(event)
                return None
            if self.c.http_version == b"1.1":  # HTTP/1.0 clients never see 1xx (RFC 9110 15.2)
                self.response_started = True
                await self.c.send_informational(event)

    async def _relay_response(self) -> None:
        c = self.c
        if self._whole:
            response = await self._final_head()
        else:
            self.head_scope = scope = trio.CancelScope(deadline=self.head_deadline)
            response = None
            with scope:
                response = await self._final_head()
            if scope.cancelled_caught:
                if self.response_started:  # a 1xx went out: too late for a 504 page
                    self._stop(_Outcome.ABORT)
                else:
                    limit = self.config.response_timeout
                    self._stop(_Outcome.ERROR, 504, f"no response within {limit:g}s")
                return
        if response is None:
            return  # switched protocols
        # Framed first: a head that cannot be sent still gets a 502 page.
        reader = self.up.reader
        c.start_response(response, reader.body_framing, reader.content_length)
        self.response_started = True  # from here on, failures can only reset the stream
        # Failed logins are counted from the answer; a login flow's body is peeked at (bounded).
        peek = c.proxy.watchdog.observe(
            self.ip,
            self.request.method,
            self.request.target,
            response.status_code,
            response.headers,
        )
        while True:
            ready = self._buffered_event()
            if ready is None:
                await c.flush_client()  # never hold bytes while waiting for more
                ready = await self._upstream_event()
            event = ready
            if isinstance(event, Data):
                if peek is not None:
                    peek.feed(event.data)
                await c.send_data(event.data)
            elif isinstance(event, EndOfMessage):
                if peek is not None:
                    peek.finish()
                await c.end_response()
                break
            else:
                raise RemoteHttpError(f"unexpected {event!r} in the response body")
        if not self.request_done.is_set() and not self.body_abandoned:
            # Answered before the whole request body was forwarded: give the rest a
            # moment, else close rather than wait for a body nobody reads.
            with trio.move_on_after(BODY_GRACE):
                await self.request_done.wait()
        self._stop(_Outcome.DONE if self.request_done.is_set() else _Outcome.CLOSE)

    async def _switch(self, event: Response) -> None:
        if not self.request.upgrade:
            raise LocalHttpError("101 Switching Protocols for a request that asked for no upgrade")
        self.response_started = True
        await self.c.send_informational(event)
        self._stop(_Outcome.UPGRADED)


def misdirected(host: bytes, sni: bytes, hostnames: frozenset[str]) -> str | None:
    """Why a request's Host does not belong on this connection (421), or None."""
    text = host.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        name = text[1:].split("]", 1)[0]
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    name = name.rstrip(".")
    server_name = sni.decode("ascii", "replace").lower().rstrip(".")
    if server_name and name != server_name:
        return f"Host {name!r} differs from the TLS server name {server_name!r}"
    if name not in hostnames:
        return f"Host {name!r} names no route"
    return None


def _normalized(ip: str) -> str:
    try:
        return normalize_ip(ip)
    except ValueError:
        return ip


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__
