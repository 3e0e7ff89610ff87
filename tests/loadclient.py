"""Trio HTTP/WebSocket clients for the end-to-end tests, and a many-connection load client.

The helpers (`open_tls`, `HttpClient`, `raw_exchange`) speak through the relay
to the daemon like a browser would. `python -m tests.loadclient ...` holds many
TLS connections open at once through one session, runs mixed verified work on
them (small GETs, downloads and uploads checked by SHA-256, WebSocket echoes)
while one other stream's reader is stalled, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
import trio_websocket

from tunneld.demoapp import pattern, pattern_sha256

HOST = "home.test"
RECEIVE_SIZE = 65536
MiB = 1024 * 1024
# What a connection that broke looks like from trio (reset, EOF without close_notify).
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


def client_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def open_tls(
    port: int, ctx: ssl.SSLContext, source: str = "127.0.0.1", sni: str = HOST
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection through the relay; a ragged EOF is an error (https_compatible off)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    stream = trio.SSLStream(tcp, ctx, server_hostname=sni)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


@dataclass
class Reply:
    """One response, or how the connection ended before a complete one arrived."""

    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the body ended as its framing said
    error: str = ""  # "eof", "closed", or the exception that ended the connection
    seconds: float = 0.0


class HttpClient:
    """h11 over one stream: keep-alive requests, and raw bytes for hostile ones."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def send_raw(self, data: bytes, method: bytes = b"GET") -> None:
        """Send bytes h11 did not frame; the reply is then parsed as the answer to `method`."""
        self.h11 = h11.Connection(h11.CLIENT)
        self.h11.send(h11.Request(method=method, target="/", headers=[("host", HOST)]))
        self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def start(
        self,
        target: str,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        length: int | None = None,
    ) -> None:
        """Send a request head (and, without `length`, its end): the next keep-alive cycle."""
        hs = [("host", HOST), *(headers or [])]
        if length is not None:
            hs.append(("content-length", str(length)))
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        out = self.h11.send(h11.Request(method=method, target=target, headers=hs)) or b""
        if length is None:
            out += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)

    async def send_body(self, data: bytes, end: bool = False) -> None:
        out = (self.h11.send(h11.Data(data=data)) or b"") if data else b""
        if end:
            out += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)

    async def request(
        self,
        target: str,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        start = time.monotonic()
        await self.start(target, method, headers, None if body is None else len(body))
        if body is not None:
            await self.send_body(body, end=True)
        reply = await self.reply()
        reply.seconds = time.monotonic() - start
        return reply

    async def reply(self, sink: Any = None) -> Reply:
        """The next response; its body is kept, or fed to `sink.update` (hashing)."""
        reply = Reply()
        body = bytearray()
        try:
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    self.h11.receive_data(bytes(await self.stream.receive_some(RECEIVE_SIZE)))
                    continue
                if isinstance(event, h11.Response):
                    reply.status = event.status_code
                    reply.headers = dict(event.headers)
                elif isinstance(event, h11.Data):
                    if sink is not None:
                        sink.update(event.data)
                    else:
                        body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    reply.complete = True
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    reply.error = "closed"
                    break
        except h11.RemoteProtocolError as exc:
            reply.error = f"eof: {exc}"  # h11: the peer closed mid-message
        except BROKEN as exc:
            reply.error = repr(exc)
        reply.body = bytes(body)
        return reply


async def raw_exchange(
    port: int,
    ctx: ssl.SSLContext,
    data: bytes,
    source: str = "127.0.0.1",
    method: bytes = b"GET",
) -> tuple[Reply, bytes]:
    """Send raw request bytes on a new connection: the reply, then whatever followed it."""
    stream = await open_tls(port, ctx, source)
    try:
        client = HttpClient(stream)
        await client.send_raw(data, method)
        reply = await client.reply()
        rest = bytearray(client.h11.trailing_data[0])
        if reply.complete:
            try:
                while len(rest) < MiB and (more := await stream.receive_some(RECEIVE_SIZE)):
                    rest += more
            except BROKEN:
                pass
        return reply, bytes(rest)
    finally:
        await trio.aclose_forcefully(stream)


# -- memory -------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    """Resident set size of `pid` in bytes (from /proc, as `ps` reports it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler:
    """Peak VmRSS of some processes, sampled from a thread every 100 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.base = {name: vm_rss(pid) for name, pid in pids.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], vm_rss(pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the load run --------------------------------------------------------------------


@dataclass
class Load:
    port: int
    ctx: ssl.SSLContext
    sources: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    verified_bytes: int = 0

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def fail(self, what: str) -> None:
        self.count("errors")
        if len(self.errors) < 20:
            self.errors.append(what)

    async def small(self, client: HttpClient, i: int) -> bool:
        reply = await client.request("/small")
        self.latencies.append(reply.seconds)
        if (reply.status, reply.body, reply.complete) == (200, b"hello tunnel\n", True):
            self.count("small_ok")
            self.verified_bytes += len(reply.body)
            return True
        self.fail(f"conn {i}: /small -> {reply.status} {reply.error} {reply.body[:80]!r}")
        return False

    async def download(self, client: HttpClient, i: int, size: int) -> None:
        digest = hashlib.sha256()
        await client.start(f"/bytes?n={size}&seed={i}")
        reply = await client.reply(sink=digest)
        if reply.status == 200 and reply.complete and digest.hexdigest() == pattern_sha256(size, i):
            self.count("downloads_ok")
            self.verified_bytes += size
        else:
            self.fail(f"conn {i}: download {reply.status} {reply.error} complete={reply.complete}")

    async def upload(self, client: HttpClient, i: int, size: int) -> None:
        await client.start("/upload", "POST", length=size)
        for chunk in pattern(size, i):
            await client.send_body(chunk)
        await client.send_body(b"", end=True)
        reply = await client.reply()
        want = {"bytes": size, "sha256": pattern_sha256(size, i)}
        if reply.status == 200 and reply.complete and json.loads(reply.body or b"{}") == want:
            self.count("uploads_ok")
            self.verified_bytes += size
        else:
            self.fail(f"conn {i}: upload {reply.status} {reply.error} {reply.body[:80]!r}")

    async def websocket(
        self, stream: trio.SSLStream[trio.SocketStream], i: int, messages: int
    ) -> None:
        rng = random.Random(i)
        sent: list[bytes | str] = []
        for n in range(messages):
            size = (16, 1000, 65536)[n % 3]
            sent.append(rng.randbytes(size) if n % 2 else rng.randbytes(size).hex()[:size])
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, HOST, "/ws/echo", max_message_size=4 * MiB
            )

            async def send_all() -> None:
                for message in sent:
                    await ws.send_message(message)

            nursery.start_soon(send_all)
            for message in sent:
                if await ws.get_message() != message:
                    self.fail(f"conn {i}: websocket echo differs")
                    break
            else:
                self.count("websockets_ok")
                self.count("ws_messages", len(sent))
                self.verified_bytes += 2 * sum(len(m) for m in sent)
            await ws.aclose()
            nursery.cancel_scope.cancel()


@dataclass
class Stalled:
    """A big download whose reader stops after the first MiB: its window must hold it."""

    stream: trio.SSLStream[trio.SocketStream]
    client: HttpClient
    size: int
    digest: Any = field(default_factory=hashlib.sha256)
    got: int = 0
    head: h11.Response | None = None

    async def read_until(self, limit: int | None) -> bool:
        """Read body bytes until `limit` (None: the end); True when the body completed."""
        c = self.client.h11
        while limit is None or self.got < limit:
            event = c.next_event()
            if event is h11.NEED_DATA:
                c.receive_data(bytes(await self.stream.receive_some(RECEIVE_SIZE)))
            elif isinstance(event, h11.Response):
                self.head = event
            elif isinstance(event, h11.Data):
                self.digest.update(event.data)
                self.got += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                return False
        return False


async def stall_download(load: Load, size: int, source: str) -> Stalled:
    stream = await open_tls(load.port, load.ctx, source)
    client = HttpClient(stream)
    await client.start(f"/bytes?n={size}&seed=77")
    stalled = Stalled(stream, client, size)
    await stalled.read_until(MiB)
    return stalled


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(
        args.port, client_context(args.ca), [f"127.0.1.{i}" for i in range(1, args.sources + 1)]
    )
    result: dict[str, Any] = {"connections": args.connections}
    stalled = await stall_download(load, args.stall_size, "127.0.2.1")
    result["stalled_at"] = stalled.got
    streams: dict[int, trio.SSLStream[trio.SocketStream]] = {}
    limiter = trio.CapacityLimiter(args.parallel_handshakes)
    connected = trio.Event()  # every connection is open (or failed)
    go = trio.Event()  # start the work
    finished = trio.Event()  # every connection's work is done
    done = 0
    start = time.monotonic()

    async def one(i: int) -> None:
        nonlocal done
        try:
            async with limiter:
                streams[i] = await open_tls(
                    load.port, load.ctx, load.sources[i % len(load.sources)]
                )
        except BROKEN as exc:
            load.fail(f"conn {i}: connect: {exc!r}")
            return
        finally:
            done += 1
            if done == args.connections:
                connected.set()
        await connected.wait()
        await go.wait()
        try:
            await work(HttpClient(streams[i]), i)
        except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal to the run
            load.fail(f"conn {i}: {exc!r}")
        finished_one()
        await finished.wait()  # every connection stays open until all work is done

    async def work(client: HttpClient, i: int) -> None:
        """A small GET; for some a download, an upload or a WebSocket; another small GET."""
        if not await load.small(client, i):
            return  # answered with an error page, and closed
        if i < args.downloads:
            await load.download(client, i, args.size)
        elif i < args.downloads + args.uploads:
            await load.upload(client, i, args.size)
        elif i < args.downloads + args.uploads + args.websockets:
            await load.websocket(streams[i], i, args.messages)
            return  # the WebSocket closed the connection
        await load.small(client, i)

    def finished_one() -> None:
        load.count("finished")
        if load.counts["finished"] == args.connections:
            finished.set()

    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            for i in range(args.connections):
                nursery.start_soon(one, i)
            await connected.wait()
            result["open_at_barrier"] = len(streams)
            result["connect_seconds"] = round(time.monotonic() - start, 2)
            if args.wait_go:  # the test looks at status while all connections are open
                print(json.dumps({"connected": len(streams)}), flush=True)
                await trio.to_thread.run_sync(sys.stdin.readline)
            work_start = time.monotonic()
            go.set()
            if len(streams) < args.connections:
                for _ in range(args.connections - len(streams)):
                    finished_one()
            await finished.wait()
            result["work_seconds"] = round(time.monotonic() - work_start, 2)
            nursery.cancel_scope.cancel()
        for stream in streams.values():
            await trio.aclose_forcefully(stream)
        # Still stalled: a fresh connection gets prompt answers.
        probe = HttpClient(await open_tls(load.port, load.ctx, "127.0.2.2"))
        probes = [await probe.request("/small") for _ in range(args.probes)]
        result["probe_ok"] = sum(r.status == 200 and r.complete for r in probes)
        result["probe_max_seconds"] = round(max(r.seconds for r in probes), 3)
        await trio.aclose_forcefully(probe.stream)
        # Resume the stalled reader: the body flows again, intact (its first
        # `resume` bytes are checked; all of them, with --resume 0).
        stalled_for = time.monotonic() - start
        complete = await stalled.read_until(args.resume or None)
        result["stalled_seconds"] = round(stalled_for, 2)
        result["stalled_read"] = stalled.got
        result["stalled_ok"] = (
            complete if not args.resume else stalled.got >= args.resume
        ) and stalled.digest.hexdigest() == pattern_sha256(stalled.got, 77)
        await trio.aclose_forcefully(stalled.stream)
    lat = sorted(load.latencies) or [0.0]
    result.update(load.counts)
    result["errors_seen"] = load.errors
    result["verified_bytes"] = load.verified_bytes
    result["small_p50"] = round(lat[len(lat) // 2], 3)
    result["small_p99"] = round(lat[int(len(lat) * 0.99)], 3)
    result["small_max"] = round(lat[-1], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.loadclient")
    parser.add_argument("--port", type=int, required=True, help="the relay's TLS port")
    parser.add_argument("--ca", required=True, help="the home certificate (PEM) to trust")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=100, help="client addresses 127.0.1.x")
    parser.add_argument("--downloads", type=int, default=20)
    parser.add_argument("--uploads", type=int, default=15)
    parser.add_argument("--websockets", type=int, default=15)
    parser.add_argument("--messages", type=int, default=30, help="per WebSocket")
    parser.add_argument("--size", type=int, default=4 * MiB, help="per download and upload")
    parser.add_argument("--stall-size", type=int, default=128 * MiB)
    parser.add_argument("--resume", type=int, default=32 * MiB, help="stalled bytes read after")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--parallel-handshakes", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument(
        "--wait-go", action="store_true", help="wait for a stdin line at the barrier"
    )
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1000), hard))
    print(json.dumps(trio.run(run, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
