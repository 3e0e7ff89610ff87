"""A stream that first replays bytes already read from it.

The relay and the daemon read a ClientHello (or an HTTP request) before they
know what to do with a connection; the TLS or WebSocket layer that takes over
must see those bytes again.
"""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.HalfCloseableStream):
    def __init__(self, stream: trio.abc.Stream, prefix: bytes | bytearray) -> None:
        self.transport = stream
        self._prefix = bytes(prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return bytes(await self.transport.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not isinstance(self.transport, trio.abc.HalfCloseableStream):
            raise trio.BrokenResourceError("underlying stream cannot half-close")
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()
