"""A small upstream web app: the stand-in for Home Assistant.

`tunneld demo` runs it behind the tunnel, the integration tests and the benchmark
use it as the upstream, and with `ssl_context` it is the benchmark's baseline
(client -> app directly, TLS terminated in the app, like Home Assistant with
`ssl_certificate`). HTTP/1.1 with h11 and WebSockets with wsproto share one port.
Bodies are streamed both ways; nothing is logged per request.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import html
import http
import json
import logging
import os
import random
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

from tunneld.files import atomic_write
from tunneld.httpio import next_event

__all__ = [
    "CHUNK_SIZE",
    "LOGIN_PASSWORD",
    "LOGIN_USER",
    "MAX_BYTES",
    "main",
    "pattern",
    "pattern_sha256",
    "serve_app",
]

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
MAX_BYTES = 8 * 1024**3
MAX_WS_MESSAGE = 16 * 1024**2
MAX_SLOW_DELAY = 600.0
# The login flow mimics Home Assistant's (`POST /auth/login_flow/<flow id>`), so the
# watchdog's failed-login detection can be tried end to end.
LOGIN_USER = "demo"
LOGIN_PASSWORD = "demo-password"
MAX_LOGIN_BODY = 64 * 1024
RECEIVE_SIZE = 64 * 1024
# The pattern repeats with an odd period, so a proxy that drops, duplicates or
# reorders power-of-two sized pieces changes the hash instead of hiding in the repetition.
PATTERN_PERIOD = 1024 * 1024 - 1

_SMALL_BODY = b"hello tunnel\n"
_SMALL_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"13")]
_GET = frozenset({b"GET", b"HEAD"})
_POST = frozenset({b"POST"})

_INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>tunneld demo</title></head>
<body><h1>tunneld demo</h1>
<p>Your address, as this app sees it: <b id="client">{client}</b></p>
<p>Live counter: <b id="counter">-</b></p>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://")
  + location.host + "/ws/counter");
ws.onmessage = (e) => {{ document.getElementById("counter").textContent = e.data; }};
ws.onclose = () => {{ document.getElementById("counter").textContent += " (closed)"; }};
</script></body></html>
"""


# ---------------------------------------------------------------------------
# Deterministic data


@functools.lru_cache(maxsize=8)
def _pattern_buffer(seed: int) -> bytes:
    """One period of the pattern for `seed`, followed by its first chunk again so that
    any CHUNK_SIZE window starting inside the period is one contiguous slice."""
    block = random.Random(seed).randbytes(PATTERN_PERIOD)
    return block + block[:CHUNK_SIZE]


def pattern(n: int, seed: int = 0) -> Iterator[bytes]:
    """The body of `GET /bytes?n=N&seed=S`: n bytes in chunks of at most CHUNK_SIZE."""
    if n < 0:
        raise ValueError("n must not be negative")
    buf = _pattern_buffer(seed)
    offset = 0
    while offset < n:
        start = offset % PATTERN_PERIOD
        size = min(CHUNK_SIZE, n - offset)
        yield buf[start : start + size]
        offset += size


@functools.lru_cache(maxsize=32)
def pattern_sha256(n: int, seed: int = 0) -> str:
    """Hex SHA-256 of the first n pattern bytes, hashed a whole period at a time."""
    if n < 0:
        raise ValueError("n must not be negative")
    period = memoryview(_pattern_buffer(seed))[:PATTERN_PERIOD]
    digest = hashlib.sha256()
    full, rest = divmod(n, PATTERN_PERIOD)
    for _ in range(full):
        digest.update(period)
    digest.update(period[:rest])
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# HTTP


class _BadRequest(Exception):
    """A well-formed request with bad parameters: answered 400, connection kept."""


def _query_int(query: dict[str, list[str]], name: str, default: int | None, hi: int) -> int:
    values = query.get(name)
    if not values:
        if default is None:
            raise _BadRequest(f"missing query parameter {name!r}")
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if not 0 <= value <= hi:
        raise _BadRequest(f"{name} must be between 0 and {hi}")
    return value


@functools.lru_cache(maxsize=64)
def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _format_peer(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(stream: trio.abc.Stream) -> tuple[str, str]:
    """(ip, "ip:port") of the TCP peer under `stream` (an SSLStream or a SocketStream)."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        name = getattr(inner, "socket").getpeername()  # noqa: B009 - only SocketStream has it
    except (AttributeError, OSError):
        return "unknown", "unknown"
    return str(name[0]), _format_peer(name)


class _HttpConnection:
    """One client connection: h11 request/response cycles until either side closes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)
        self.peer_ip, self.peer = _peer_of(stream)
        self.head = False

    async def next_event(self) -> Any:
        return await next_event(self.stream, self.conn, RECEIVE_SIZE)

    async def body(self) -> AsyncIterator[bytes]:
        """Async iterator over the request body's chunks, answering `Expect: 100-continue`."""
        if self.conn.they_are_waiting_for_100_continue:
            await self.stream.send_all(
                self.conn.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
            )
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                return

    async def drain(self) -> None:
        async for _ in self.body():
            pass

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        if extra:
            headers += extra
        response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        out = self.conn.send(response) or b""
        if body and not self.head:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)

    async def respond_json(self, status: int, value: object) -> None:
        await self.respond(status, json.dumps(value).encode() + b"\n", b"application/json")

    async def serve(self) -> None:
        while True:
            try:
                event = await self.next_event()
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed: the client is done
                await self.dispatch(event)
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, str(exc))
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return  # closing (MUST_CLOSE) or the connection became a WebSocket
            self.conn.start_next_cycle()

    async def _refuse(self, status: int, reason: str) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.head = False
            body = f"{status} {reason}\n".encode()
            await self.respond(status, body, extra=[(b"connection", b"close")])

    async def dispatch(self, request: h11.Request) -> None:
        self.head = request.method == b"HEAD"
        split = urlsplit(request.target.decode("latin-1"))
        path = split.path
        route = _ROUTES.get(path)
        if route is None and path.startswith("/status/"):
            route = _status_route
        if route is None and path.startswith("/auth/login_flow/"):
            route = _login_step_route
        if route is None:
            await self.drain()
            await self.respond(404, b"not found\n")
            return
        methods, handler = route
        if request.method not in methods:
            await self.drain()
            allow = b", ".join(sorted(methods))
            await self.respond(405, b"method not allowed\n", extra=[(b"allow", allow)])
            return
        if handler is not _upload and handler is not _login_step:
            await self.drain()
        try:
            query = parse_qs(split.query, keep_blank_values=True)
            await handler(self, request, query)
        except _BadRequest as exc:
            await self.respond(400, f"{exc}\n".encode())


_Handler = Callable[[_HttpConnection, h11.Request, dict[str, list[str]]], Awaitable[None]]


async def _index(c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]) -> None:
    forwarded = None
    for name, value in request.headers:
        if name == b"x-forwarded-for":
            forwarded = value.decode("latin-1").strip()
            break
    client = html.escape(forwarded or c.peer_ip)
    await c.respond(200, _INDEX.format(client=client).encode(), b"text/html; charset=utf-8")


async def _headers(c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]) -> None:
    target = request.target.decode("latin-1")
    await c.respond_json(
        200,
        {
            "method": request.method.decode("latin-1"),
            "path": urlsplit(target).path,
            "target": target,
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in request.headers.raw_items()
            ],
            "peer": c.peer,
        },
    )


async def _small(c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]) -> None:
    conn = c.conn
    out = conn.send(h11.Response(status_code=200, headers=_SMALL_HEADERS, reason=b"OK")) or b""
    if not c.head:
        out += conn.send(h11.Data(data=_SMALL_BODY)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await c.stream.send_all(out)


async def _bytes(c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]) -> None:
    n = _query_int(query, "n", None, MAX_BYTES)
    seed = _query_int(query, "seed", 0, 2**64 - 1)
    conn, stream = c.conn, c.stream
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % n)]
    response = h11.Response(status_code=200, headers=headers, reason=b"OK")
    await stream.send_all(conn.send(response) or b"")
    if not c.head:
        for chunk in pattern(n, seed):
            # passthrough: h11 hands the chunk back as-is instead of copying it into a join
            for piece in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():
                await stream.send_all(piece)
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _bytes_sha256(
    c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]
) -> None:
    n = _query_int(query, "n", None, MAX_BYTES)
    seed = _query_int(query, "seed", 0, 2**64 - 1)
    # Up to 8 GiB of hashing: off the event loop so other connections keep moving.
    digest = await trio.to_thread.run_sync(pattern_sha256, n, seed, abandon_on_cancel=True)
    await c.respond(200, digest.encode() + b"\n")


async def _upload(c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]) -> None:
    digest = hashlib.sha256()
    size = 0
    async for chunk in c.body():
        digest.update(chunk)
        size += len(chunk)
    await c.respond_json(200, {"bytes": size, "sha256": digest.hexdigest()})


async def _status(c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]) -> None:
    code = urlsplit(request.target.decode("latin-1")).path.removeprefix("/status/")
    if not (len(code) == 3 and code.isdigit() and 200 <= int(code) <= 599):
        raise _BadRequest("status must be a number from 200 to 599")
    status = int(code)
    if status in (204, 304):  # these never carry a body, nor a Content-Length
        response = h11.Response(status_code=status, headers=[], reason=_reason(status))
        out = c.conn.send(response) or b""
        out += c.conn.send(h11.EndOfMessage()) or b""
        await c.stream.send_all(out)
        return
    await c.respond(status, b"%d %s\n" % (status, _reason(status)))


async def _slow(c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]) -> None:
    raw = query.get("delay", ["1"])[-1]
    try:
        delay = float(raw)
    except ValueError:
        raise _BadRequest("delay must be a number of seconds") from None
    if not 0 <= delay <= MAX_SLOW_DELAY:
        raise _BadRequest(f"delay must be between 0 and {MAX_SLOW_DELAY:g}")
    await trio.sleep(delay)
    await c.respond(200, f"slept {delay:g}s\n".encode())


_LOGIN_FORM = {
    "type": "form",
    "handler": ["homeassistant", None],
    "step_id": "init",
    "data_schema": [
        {"type": "string", "name": "username", "required": True},
        {"type": "string", "name": "password", "required": True},
    ],
    "description_placeholders": None,
    "last_step": None,
}


async def _login_start(
    c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]
) -> None:
    """`POST /auth/login_flow`: a new flow, answered like Home Assistant (no errors yet)."""
    await c.respond_json(200, {**_LOGIN_FORM, "flow_id": os.urandom(16).hex(), "errors": {}})


async def _login_step(
    c: _HttpConnection, request: h11.Request, query: dict[str, list[str]]
) -> None:
    """`POST /auth/login_flow/<id>` with `{"username", "password"}`: 200 either way, as
    Home Assistant answers; a wrong password is `"errors": {"base": "invalid_auth"}`."""
    flow_id = urlsplit(request.target.decode("latin-1")).path.rsplit("/", 1)[1]
    body = bytearray()
    async for chunk in c.body():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            raise _BadRequest("login body too large")
    try:
        creds = json.loads(body)
    except ValueError:
        raise _BadRequest("expected a JSON body") from None
    if not isinstance(creds, dict):
        raise _BadRequest("expected a JSON object")
    if creds.get("username") == LOGIN_USER and creds.get("password") == LOGIN_PASSWORD:
        result = {
            "type": "create_entry",
            "flow_id": flow_id,
            "handler": ["homeassistant", None],
            "result": os.urandom(16).hex(),
            "description": None,
            "description_placeholders": None,
            "version": 1,
        }
        await c.respond_json(200, result)
        return
    await c.respond_json(
        200, {**_LOGIN_FORM, "flow_id": flow_id, "errors": {"base": "invalid_auth"}}
    )


# ---------------------------------------------------------------------------
# WebSocket


class _WebSocket:
    def __init__(self, stream: trio.abc.Stream, trailing: bytes) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER, trailing_data=trailing)
        self._send_lock = trio.Lock()

    async def send(self, event: Any) -> bool:
        """Send `event` unless the connection is closing; False if it was not sent.
        The lock keeps frames from two tasks in the order wsproto framed them."""
        async with self._send_lock:
            if self.ws.state is not ConnectionState.OPEN:
                return False
            await self.stream.send_all(self.ws.send(event))
            return True

    async def run(self, on_message: Callable[[Message[Any]], Awaitable[bool]] | None) -> None:
        """Handle control frames and feed data frames (partial ones too) to `on_message`
        until the peer closes, the stream ends, or `on_message` returns False."""
        while True:
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self.send(event.response())
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        async with self._send_lock:
                            await self.stream.send_all(self.ws.send(event.response()))
                    else:  # wsproto reports a malformed frame as a close; echo its code
                        await self.send(CloseConnection(code=event.code))
                    return
                elif isinstance(event, Message) and on_message is not None:
                    if not await on_message(event):
                        return
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            self.ws.receive_data(cast(bytes, data))

    async def echo(self) -> None:
        size = 0

        async def on_message(event: Message[Any]) -> bool:
            nonlocal size
            size += len(event.data)
            if size > MAX_WS_MESSAGE:
                await self.send(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                return False
            # Echo each fragment as it arrives: memory stays bounded by one read.
            kind = TextMessage if isinstance(event, TextMessage) else BytesMessage
            await self.send(kind(data=event.data, message_finished=event.message_finished))
            if event.message_finished:
                size = 0
            return True

        await self.run(on_message)

    async def counter(self) -> None:
        async def tick() -> None:
            count = 0
            while True:
                count += 1
                if not await self.send(TextMessage(data=str(count))):
                    return
                await trio.sleep(1)

        async def until_done(fn: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
            try:
                await fn()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_done, tick, nursery.cancel_scope)
            nursery.start_soon(until_done, functools.partial(self.run, None), nursery.cancel_scope)


def _websocket_route(
    kind: Callable[[_WebSocket], Awaitable[None]],
) -> _Handler:
    async def handler(c: _HttpConnection, request: h11.Request, q: dict[str, list[str]]) -> None:
        headers = {name: value for name, value in request.headers}
        key = headers.get(b"sec-websocket-key")
        if (
            # h11 exports this state at runtime but leaves it out of __all__
            c.conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]
            or b"websocket" not in headers.get(b"upgrade", b"").lower()
            or headers.get(b"sec-websocket-version") != b"13"
            or not key
        ):
            raise _BadRequest("this path expects a WebSocket upgrade (version 13)")
        accept = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(key)),
        ]
        switch = h11.InformationalResponse(
            status_code=101, headers=accept, reason=b"Switching Protocols"
        )
        out = c.conn.send(switch) or b""
        await c.stream.send_all(out)
        await kind(_WebSocket(c.stream, c.conn.trailing_data[0]))

    return handler


_ROUTES: dict[str, tuple[frozenset[bytes], _Handler]] = {
    "/": (_GET, _index),
    "/headers": (_GET, _headers),
    "/small": (_GET, _small),
    "/bytes": (_GET, _bytes),
    "/bytes-sha256": (_GET, _bytes_sha256),
    "/upload": (_POST, _upload),
    "/slow": (_GET, _slow),
    "/auth/login_flow": (_POST, _login_start),
    "/ws/echo": (frozenset({b"GET"}), _websocket_route(_WebSocket.echo)),
    "/ws/counter": (frozenset({b"GET"}), _websocket_route(_WebSocket.counter)),
}
_status_route: tuple[frozenset[bytes], _Handler] = (_GET, _status)
_login_step_route: tuple[frozenset[bytes], _Handler] = (_POST, _login_step)


# ---------------------------------------------------------------------------
# Server


async def _handle(stream: trio.abc.Stream) -> None:
    async with stream:
        try:
            await _HttpConnection(stream).serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (or failed the TLS handshake)
        except Exception:  # a bug here must not take the other connections down
            log.exception("demo app: connection failed")


async def serve_app(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo app on host:port (0 picks a port) until cancelled.

    Reports (host, bound_port) through `task_status` once the socket listens.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        # A name like "localhost" binds each address on its own random port: keep the one we report.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound = int(listeners[0].socket.getsockname()[1])
    served: list[trio.abc.Listener[trio.abc.Stream]] = []
    for listener in listeners:
        if ssl_context is None:
            served.append(listener)
        else:
            served.append(trio.SSLListener(listener, ssl_context, https_compatible=True))
    task_status.started((host, bound))
    await trio.serve_listeners(_handle, served)


# ---------------------------------------------------------------------------
# CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tunneld.demoapp", description="tunneld's demo upstream web app"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here (atomically)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="private key for --tls-cert (PEM)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def _write_port_file(path: str, port: int) -> None:
    atomic_write(path, f"{port}\n".encode("ascii"), mode=0o644)


async def _run(args: argparse.Namespace, ssl_context: ssl.SSLContext | None) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            try:
                host, port = await nursery.start(
                    functools.partial(serve_app, args.host, args.port, ssl_context=ssl_context)
                )
            except OSError as exc:
                print(f"demoapp: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
                return 1
            # The port file first: whoever reads the stdout line may rely on it being there.
            if args.port_file:
                try:
                    _write_port_file(args.port_file, port)
                except OSError as exc:
                    print(f"demoapp: cannot write {args.port_file}: {exc}", file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return 1
            scheme = "https" if ssl_context else "http"
            shown = f"[{host}]" if ":" in host else host
            try:
                print(f"listening on {scheme}://{shown}:{port}", flush=True)
            except OSError:
                pass  # nobody reads stdout any more: keep serving, the port file still works
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    ssl_context = None
    if args.tls_cert:
        try:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
            ssl_context.set_alpn_protocols(["http/1.1"])
        except (OSError, ssl.SSLError) as exc:
            print(f"demoapp: cannot load the TLS certificate or key: {exc}", file=sys.stderr)
            return 2
    return trio.run(_run, args, ssl_context)


if __name__ == "__main__":
    raise SystemExit(main())
