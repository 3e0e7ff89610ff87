"""h11 over a trio stream, for the small HTTP endpoints.

The relay's `/v1/tunnel`, `/healthz` and port-80 answers, the control socket, the
metrics endpoint, the daemon's side of the tunnel upgrade and the demo app all
read HTTP/1.1 with h11 and answer with whole, small messages. This is the one
loop that feeds an h11 connection from a stream until it has an event, and the one
writer of a whole response; the protocol stays h11's, the I/O is here.
"""

from __future__ import annotations

from collections.abc import Callable

import h11
import trio

__all__ = ["next_event", "send_response"]

Event = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


async def next_event(
    stream: trio.abc.ReceiveStream,
    conn: h11.Connection,
    max_bytes: int,
    *,
    raw: bytearray | None = None,
    on_eof: Callable[[], BaseException] | None = None,
) -> Event:
    """The next h11 event of `conn` (never NEED_DATA), reading `stream` as it needs.

    Reads at most `max_bytes` at a time (h11's `max_incomplete_event_size` bounds a
    head). Every byte read is appended to `raw` when given. At the end of the stream,
    `on_eof()` is raised when given; otherwise h11 is told, and answers with
    `ConnectionClosed` (or raises `h11.RemoteProtocolError` mid-message). h11's own
    errors propagate.
    """
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = bytes(await stream.receive_some(max_bytes))
        if not data and on_eof is not None:
            raise on_eof()
        if raw is not None:
            raw += data
        conn.receive_data(data)


async def send_response(
    stream: trio.abc.SendStream,
    conn: h11.Connection,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    head: bool = False,
    reason: str | bytes = b"",
) -> None:
    """Send one whole response (its head, `body` unless `head`, its end) in one write.

    `headers` must frame `body` (a Content-Length, or Connection: close); the caller
    bounds the time.
    """
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    if body and not head:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
