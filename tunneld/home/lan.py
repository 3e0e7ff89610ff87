"""`[lan] listen`: the same hostnames served straight on the home network.

Each accepted TCP connection goes through the very handler the relay's streams
use (`StreamHandler`): the watchdog's admission and bans, the ClientHello, the
route's certificate and client-certificate check, the proxy with its forwarded
headers. The client address is the LAN peer's. Nothing here depends on the
relay session, so the LAN path keeps serving while the relay is unreachable.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio

from tunneld.config import Listen, format_listen
from tunneld.errors import ConfigError
from tunneld.netaddr import normalize_ip
from tunneld.transport.splice import aclose_quietly

__all__ = ["LanListener", "LanStream"]

log = logging.getLogger("tunneld.lan")


class LanStream(trio.abc.HalfCloseableStream):
    """A LAN client's TCP connection, shaped like the relay's MuxStream for the handler:
    `client_ip`, `client_port`, `sni` (unknown until the ClientHello), `reset`."""

    stream_id = 0
    sni = ""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        peer = stream.socket.getpeername()
        self.client_ip = normalize_ip(peer[0])
        self.client_port = int(peer[1])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def reset(self, code: int = 0) -> None:
        """Abort: a TCP RST, so the client sees an error rather than a clean end."""
        sock = self.stream.socket
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()


class LanListener:
    def __init__(self, handler: Callable[[Any], Awaitable[None]]) -> None:
        self.handler = handler
        self.listening: list[str] = []
        self.active = 0
        self.total = 0

    async def run(
        self,
        addresses: Sequence[Listen],
        *,
        label: str = "[lan] listen",
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners: list[trio.SocketListener] = []
        try:
            for host, port in addresses:
                try:
                    listeners += await trio.open_tcp_listeners(port, host=host)
                except OSError as exc:
                    raise ConfigError(
                        f"{label}: cannot listen on {format_listen((host, port))}: "
                        f"{exc.strerror or exc}"
                    ) from None
        except BaseException:
            for listener in listeners:
                await aclose_quietly(listener)
            raise
        self.listening = [_where(lst) for lst in listeners]
        log.info("serving the LAN on %s", ", ".join(self.listening))
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(partial(trio.serve_listeners, self._serve, [listener]))
            task_status.started(self.listening)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            lan = LanStream(stream)
        except (OSError, ValueError):  # gone before we asked who it was
            await aclose_quietly(stream)
            return
        self.total += 1
        self.active += 1
        try:
            await self.handler(lan)
        except Exception:  # one client's trouble never stops the listener
            log.exception("LAN connection from %s failed", lan.client_ip)
        finally:
            self.active -= 1
            await aclose_quietly(lan)

    def status(self) -> dict[str, Any]:
        return {"listen": self.listening, "active": self.active, "total": self.total}


def _where(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return format_listen((host, int(port)))
