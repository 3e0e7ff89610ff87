"""A misbehaving, recording upstream app for the end-to-end tests (trio, h11, raw bytes).

`python -m tests.badupstream --port-file F --record R [--port P]` serves HTTP/1.1
on 127.0.0.1. Every byte it receives is appended to R as JSON lines
(`{"conn": n, "data": "<latin-1 text>"}`, at most RECORD_LIMIT bytes per
connection, then one `{"conn": n, "truncated": true}`), so a test can prove that a
request never reached the upstream: `received()` fails on a truncated recording.

Routes, by path (anything else is `/ok`):
  /ok                 200 `ok <METHOD> <target> <body bytes>`, keep-alive
  /close-mid          ?framing=length|chunked&how=fin|rst: head and 64 KiB of a
                      1 MiB body, then the connection ends (a reset after a pause for rst)
  /trickle-head       ?interval=S: a response head, one byte every S seconds, never finished
  /no-read            reads the head, then neither reads the body nor answers
  /reject-body        answers 413 at once without reading the body, then stops reading
  /overlong           Content-Length: 5, then a second, unrequested response behind it
  /garbage            a non-HTTP answer
  /huge-head          a response head that never ends (megabytes of one header)
  /slow               ?delay=S: answers /ok after S seconds
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import h11
import trio

if TYPE_CHECKING:
    from tests.integration.harness import Proc, World
    from tests.loadclient import Reply

RECEIVE_SIZE = 65536
# Far above what the pooled connections of a test module carry (a few thousand small
# requests); past it a recording can no longer prove absence, and says so.
RECORD_LIMIT = 16 * 1024 * 1024
CUT_BODY = 1024 * 1024  # the promised body of /close-mid
CUT_SENT = 64 * 1024  # what is sent of it
MAX_WAIT = 600.0  # nothing here waits longer than this


class Recorder:
    """Appends what each connection received to a JSON-lines file, flushed per chunk."""

    def __init__(self, out: IO[str] | None) -> None:
        self.out = out
        self.recorded: dict[int, int] = {}

    def record(self, conn: int, data: bytes) -> None:
        done = self.recorded.get(conn, 0)
        if self.out is None or not data or done > RECORD_LIMIT:
            return
        piece = data[: RECORD_LIMIT - done]
        self.recorded[conn] = done + len(data)  # over the limit: truncated, once
        if piece:
            self.out.write(json.dumps({"conn": conn, "data": piece.decode("latin-1")}) + "\n")
        if len(piece) < len(data):
            self.out.write(json.dumps({"conn": conn, "truncated": True}) + "\n")
        self.out.flush()


class Connection:
    def __init__(self, stream: trio.SocketStream, n: int, recorder: Recorder) -> None:
        self.stream = stream
        self.n = n
        self.recorder = recorder
        self.h11 = h11.Connection(h11.SERVER)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.stream.receive_some(RECEIVE_SIZE)
            self.recorder.record(self.n, data)
            self.h11.receive_data(data)

    async def read_body(self) -> int:
        size = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return size
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")

    async def respond(self, status: int, body: bytes, close: bool = False) -> None:
        headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        out = self.h11.send(h11.Response(status_code=status, headers=headers)) or b""
        out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)

    def reset(self) -> None:
        """The next close sends RST instead of FIN."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


Route = Callable[[Connection, h11.Request, dict[str, list[str]]], Awaitable[bool]]


def _ok_body(request: h11.Request, size: int) -> bytes:
    return b"ok %s %s %d\n" % (request.method, request.target, size)


async def ok(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    await c.respond(200, _ok_body(request, await c.read_body()))
    return True


async def slow(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    size = await c.read_body()
    await trio.sleep(min(float(query.get("delay", ["1"])[0]), MAX_WAIT))
    await c.respond(200, _ok_body(request, size))
    return True


async def close_mid(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    await c.read_body()
    piece = b"x" * CUT_SENT
    if query.get("framing", ["length"])[0] == "chunked":
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"%x\r\n%s\r\n" % (len(piece), piece)
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % CUT_BODY
        body = piece
    await c.stream.send_all(head + body)
    if query.get("how", ["fin"])[0] == "rst":
        await trio.sleep(0.5)  # the daemon has read the head: the reset hits a started response
        c.reset()
    return False


async def trickle_head(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    await c.read_body()
    interval = float(query.get("interval", ["0.2"])[0])
    await c.stream.send_all(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    with trio.move_on_after(MAX_WAIT):
        while True:
            await trio.sleep(interval)
            await c.stream.send_all(b"a")
    return False


async def no_read(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    # The body stays in the kernel buffers; the daemon must not buffer it either.
    await _wait_closed_without_reading(c)
    return False


async def reject_body(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    await c.respond(413, b"too large\n", close=True)
    await _wait_closed_without_reading(c)
    return False


async def _wait_closed_without_reading(c: Connection) -> None:
    # Poll for the peer's FIN or reset without consuming the receive buffer; the
    # connection ends then, or after MAX_WAIT.
    poller = select.poll()
    poller.register(c.stream.socket.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    with trio.move_on_after(MAX_WAIT):
        while not poller.poll(0):  # noqa: ASYNC110 - no event to wait on: kernel state
            await trio.sleep(0.2)


async def overlong(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    await c.read_body()
    # h11 on our side would refuse to send this: raw bytes, then carry on as if all was well.
    await c.stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPOISON\n"
    )
    c.h11.send(h11.Response(status_code=200, headers=[("content-length", "5")]))
    c.h11.send(h11.Data(data=b"hello"))
    c.h11.send(h11.EndOfMessage())
    return True


async def garbage(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    await c.read_body()
    await c.stream.send_all(b"SSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n")
    await _wait_closed_without_reading(c)
    return False


async def huge_head(c: Connection, request: h11.Request, query: dict[str, list[str]]) -> bool:
    await c.read_body()
    await c.stream.send_all(b"HTTP/1.1 200 OK\r\nX-Huge: ")
    with trio.move_on_after(30):
        for _ in range(64):  # 4 MiB, unless the daemon stops reading first
            await c.stream.send_all(b"a" * 65536)
    return False


ROUTES: dict[str, Route] = {
    "/ok": ok,
    "/slow": slow,
    "/close-mid": close_mid,
    "/trickle-head": trickle_head,
    "/no-read": no_read,
    "/reject-body": reject_body,
    "/overlong": overlong,
    "/garbage": garbage,
    "/huge-head": huge_head,
}


class Server:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        c = Connection(stream, self.connections, self.recorder)
        try:
            while True:
                event = await c.next_event()
                if not isinstance(event, h11.Request):
                    return
                split = urlsplit(event.target.decode("latin-1"))
                route = ROUTES.get(split.path, ok)
                if not await route(c, event, parse_qs(split.query)):
                    return
                if c.h11.our_state is not h11.DONE or c.h11.their_state is not h11.DONE:
                    return
                c.h11.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except h11.ProtocolError:
            pass  # a request we cannot parse: just hang up (the daemon should never send one)
        finally:
            await trio.aclose_forcefully(stream)


# -- for the tests: run it as a World process ---------------------------------------


def start(world: World, port: int = 0, name: str = "badupstream") -> Proc:
    """Spawn it in `world` (recording to world.root/badupstream.jsonl); sets world.app_port."""
    from tests.integration.harness import PY, wait_for

    port_file = world.root / f"{name}.port"
    port_file.unlink(missing_ok=True)
    args = ["--port", str(port), "--port-file", str(port_file), "--record", str(record_path(world))]
    proc = world.spawn(name, [PY, "-m", "tests.badupstream", *args])
    wait_for(port_file.exists, what=f"{name} port file")
    world.app_port = int(port_file.read_text())
    return proc


def start_world(root: Path, **upstream: object) -> World:
    """Relay and daemon (calm pings) in front of this upstream; `upstream` is the
    daemon's [upstream] overrides. The caller stops it (`stop_all`)."""
    from tests.integration.harness import CALM_HOME, CALM_RELAY, World

    w = World(root)
    try:
        w.app = start(w)
        w.relay_overrides = CALM_RELAY
        w.start_relay()
        w.start_home(relay=CALM_HOME, upstream=upstream)
    except BaseException:
        w.stop_all()
        raise
    return w


def answered_ok(reply: Reply, target: str) -> bool:
    """A complete 200 from /ok for exactly this GET."""
    want = b"ok GET %s 0\n" % target.encode()
    return (reply.status, reply.complete, reply.body) == (200, True, want)


def record_path(world: World) -> Path:
    return world.root / "badupstream.jsonl"


def received(world: World) -> dict[int, bytes]:
    """What each upstream connection received so far.

    Fails, rather than under-report, when there is no recording or a connection's
    was cut at RECORD_LIMIT: either would make "never reached the upstream" vacuous.
    """
    out: dict[int, bytes] = {}
    path = record_path(world)
    assert path.is_file(), f"no upstream recording at {path}"
    for line in path.read_text(encoding="latin-1").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        assert "truncated" not in item, f"upstream connection {item['conn']} passed RECORD_LIMIT"
        out[item["conn"]] = out.get(item["conn"], b"") + item["data"].encode("latin-1")
    return out


@dataclass
class Received:
    """One request as the upstream parsed it from what it received."""

    conn: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


def requests_received(world: World) -> list[Received]:
    """Every request the upstream received, parsed again from the recording."""
    out: list[Received] = []
    for conn, data in received(world).items():
        parser = h11.Connection(h11.SERVER)
        parser.receive_data(data)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    headers = list(request.headers.raw_items())
                    out.append(Received(conn, request.method, request.target, headers, body))
                    # Answer it (to nobody), so the parser moves on to the next request.
                    parser.send(h11.Response(status_code=204, headers=[]))
                    parser.send(h11.EndOfMessage())
                    parser.start_next_cycle()
        except h11.ProtocolError:
            pass  # the rest of this connection is not HTTP (an upgrade, say)
    return out


async def main(port: int, port_file: str, out: IO[str] | None) -> None:
    server = Server(Recorder(out))
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, server.handle, listeners)
            tmp = trio.Path(f"{port_file}.{os.getpid()}.tmp")
            await tmp.write_text(str(bound))
            await tmp.replace(port_file)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--record", help="append every received byte here (JSON lines)")
    args = parser.parse_args()
    if args.record:
        with open(args.record, "a", encoding="latin-1") as record:
            trio.run(main, args.port, args.port_file, record)
    else:
        trio.run(main, args.port, args.port_file, None)
    sys.exit(0)
