"""The byte channel under a session: mux frames in WebSocket messages, or raw.

Both ends open with a real WebSocket handshake (so the relay's one port, its
proxies and its logs see an ordinary `wss://` upgrade). The daemon offers the
`tunneld-raw.1` subprotocol; a relay that selects it and the daemon then carry
mux frames directly on the TLS stream, skipping WebSocket framing and the
client-side masking that cost about half the CPU per byte (bench/RESULTS.md).
A relay that does not select it gets ordinary binary WebSocket messages.

A channel (`Channel`) has the three methods the session needs: `get_message()`,
`send_message(data)` and `aclose()`; both end with `ChannelClosed`.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Protocol

import h11
import trio
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from tunneld.errors import RemoteProtocolError, SessionRefused, TunneldError
from tunneld.httpio import next_event

RAW_SUBPROTOCOL = "tunneld-raw.1"
RECEIVE_BYTES = 256 * 1024
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
MAX_REFUSAL_BODY = 64 * 1024
_CHANNEL_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ChannelClosed(TunneldError):
    """The session's byte channel ended (peer closed, reset, or we closed it)."""


def websocket_accept(key: str) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return generate_accept_token(key.encode("ascii")).decode("ascii")


class Channel(Protocol):
    """The seam between a `MuxSession` and its transport: whole messages both ways.

    `RawChannel`, `WebSocketChannel` (the daemon's) and trio-websocket's
    `WebSocketConnection` (the relay's) all fit. A text message (`str`) is a
    protocol error the session answers; the end of the channel raises
    `ChannelClosed` or trio-websocket's `ConnectionClosed`.
    """

    async def get_message(self) -> bytes | str: ...

    async def send_message(self, message: bytes, /) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


class RawChannel:
    """Mux frames straight on the stream: each read is one "message"."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def get_message(self) -> bytes:
        return await _receive(self._stream)

    async def send_message(self, data: bytes) -> None:
        await _send(self._stream, data)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        try:
            await self._stream.aclose()
        except _CHANNEL_ERRORS:
            pass


class WebSocketChannel:
    """Client side of an established WebSocket (wsproto, after our own handshake)."""

    def __init__(self, stream: trio.abc.Stream, trailing: bytes = b"") -> None:
        self._stream = stream
        self._ws = WsConnection(ConnectionType.CLIENT)
        if trailing:
            self._ws.receive_data(trailing)
        self._parts: list[bytes] = []
        self._size = 0

    async def get_message(self) -> bytes:
        while True:
            for event in self._ws.events():
                if isinstance(event, BytesMessage):
                    self._parts.append(bytes(event.data))
                    self._size += len(event.data)
                    if self._size > MAX_MESSAGE_SIZE:
                        raise RemoteProtocolError("WebSocket message over the size limit")
                    if event.message_finished:
                        data = b"".join(self._parts)
                        self._parts, self._size = [], 0
                        return data
                elif isinstance(event, TextMessage):
                    raise RemoteProtocolError("text WebSocket message on a binary session")
                elif isinstance(event, Ping):
                    await self._send(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise ChannelClosed(
                        f"session closed by peer (WebSocket {event.code}"
                        f"{': ' + event.reason if event.reason else ''})"
                    )
            self._ws.receive_data(await _receive(self._stream))

    async def send_message(self, data: bytes) -> None:
        await self._send(self._ws.send(Message(data=data)))

    async def _send(self, data: bytes) -> None:
        await _send(self._stream, data)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        try:
            with trio.move_on_after(2):
                await self._stream.send_all(
                    self._ws.send(CloseConnection(code=code, reason=reason or ""))
                )
        except Exception:  # noqa: BLE001 - closing a dead connection may fail any way
            pass
        try:
            await self._stream.aclose()
        except _CHANNEL_ERRORS:
            pass


async def _receive(stream: trio.abc.Stream) -> bytes:
    """One read; the end of the stream or a broken one is ChannelClosed."""
    try:
        data = await stream.receive_some(RECEIVE_BYTES)
    except _CHANNEL_ERRORS as exc:
        raise ChannelClosed(f"connection lost ({_describe(exc)})") from None
    if not data:
        raise ChannelClosed("peer closed the connection")
    return bytes(data)


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except _CHANNEL_ERRORS as exc:
        raise ChannelClosed(f"connection lost ({_describe(exc)})") from None


async def open_channel(
    stream: trio.abc.Stream,
    host: str,
    path: str,
    headers: list[tuple[str, str]],
) -> RawChannel | WebSocketChannel:
    """The daemon's half of the handshake, on an established (TLS) stream.

    The caller bounds the time. A refusal (any non-101 answer) raises
    SessionRefused with the relay's machine-readable reason.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REFUSAL_BODY)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", RAW_SUBPROTOCOL),
            *headers,
        ],
    )
    await stream.send_all(http.send(request) or b"")
    answer = await _next_event(stream, http)
    if isinstance(answer, h11.InformationalResponse) and answer.status_code == 101:
        fields = {k.decode().lower(): v.decode("latin-1") for k, v in answer.headers}
        if fields.get("sec-websocket-accept") != websocket_accept(key):
            raise RemoteProtocolError("the relay's WebSocket accept key is wrong")
        trailing = bytes(http.trailing_data[0])
        if fields.get("sec-websocket-protocol", "").strip() == RAW_SUBPROTOCOL:
            from tunneld.transport.prefixed import PrefixedStream

            return RawChannel(PrefixedStream(stream, trailing) if trailing else stream)
        return WebSocketChannel(stream, trailing)
    if isinstance(answer, h11.Response):
        body = bytearray()
        while True:
            event = await _next_event(stream, http)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REFUSAL_BODY:
                    break
            else:
                break
        raise _refusal(answer.status_code, bytes(body))
    raise RemoteProtocolError("unexpected answer to the tunnel handshake")


async def _next_event(stream: trio.abc.Stream, http: h11.Connection) -> object:
    try:
        return await next_event(
            stream,
            http,
            RECEIVE_BYTES,
            on_eof=lambda: ChannelClosed("the relay closed the connection during the handshake"),
        )
    except h11.RemoteProtocolError as exc:
        raise RemoteProtocolError(f"bad HTTP answer from the relay: {exc}") from None


def _refusal(status: int, body: bytes) -> SessionRefused:
    reason, detail = "refused", ""
    try:
        parsed = json.loads(body or b"{}")
        reason = str(parsed.get("reason", reason))
        detail = str(parsed.get("detail", ""))
    except (ValueError, AttributeError):
        detail = body[:200].decode("utf-8", "replace")
    return SessionRefused(status, reason, detail or "no detail given")


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


__all__ = [
    "RAW_SUBPROTOCOL",
    "Channel",
    "ChannelClosed",
    "RawChannel",
    "WebSocketChannel",
    "open_channel",
    "websocket_accept",
]
