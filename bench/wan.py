"""A WAN link in user space, between two TCP endpoints (the kernel here has no netem):

    python -m bench.wan --listen 127.0.0.1:0 --target HOST:PORT \\
        --delay-ms 25 --rate-mbit 100 --buffer-kib 512

Every connection accepted on `--listen` is proxied to `--target`. Each direction is one
link shared by every connection: a bottleneck FIFO of `--buffer-kib` bytes drained at
`--rate-mbit` (payload bytes; no header overhead is counted), then a one-way delay of
`--delay-ms` (propagation, after the bottleneck), so an idle round trip takes twice the
delay. When the FIFO is full the proxy stops reading from the senders that feed it, and
TCP backpressure does the rest: no byte is dropped, and the queue a sender meets is the
configured buffer, not hidden kernel buffers (the proxy's own sockets get small
SO_RCVBUF/SO_SNDBUF). What the endpoints' own kernels buffer is theirs, as on a real link.

One thread, one selector, time slots of about 1 ms: the link's clock advances in whole
slots and sends every byte its rate allows in that time, splitting chunks where the
budget ends, so the rate is exact over any stretch longer than a few slots. Memory is
bounded: the FIFO, the bytes in flight (rate x delay) and, per connection direction,
`OUT_CAP` bytes delivered but not yet accepted by a slow receiver (then that
connection's sender is no longer read; the others go on). Half-close passes through in
order with the data; a reset or error on either side closes both. It prints
`LISTENING HOST:PORT` on stdout once listening, exits cleanly on SIGTERM, and prints one
`STATS {json}` line on stderr as it exits (bytes carried, the deepest the FIFO got).
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

SLOT = 0.001  # the link's time step, seconds
READ = 64 * 1024  # largest read from a sender
OUT_CAP = 256 * 1024  # per connection direction: delivered but not yet written
SOCKBUF = 16 * 1024  # the proxy's SO_RCVBUF/SO_SNDBUF (Linux doubles it)


class Stop(Exception):
    """SIGTERM or SIGINT: leave the loop and close everything."""


@dataclass(eq=False)
class End:
    """One socket of a proxied connection."""

    sock: socket.socket
    conn: Conn
    mask: int = 0  # the events it is registered for (0: not registered)
    connected: bool = True


@dataclass(eq=False)
class Half:
    """One direction of a connection: bytes read from `src` go through `link` to `dst`."""

    src: End
    dst: End
    link: Link
    out: deque[memoryview | None] = field(default_factory=deque)  # None: the EOF
    out_bytes: int = 0
    eof_read: bool = False
    shut: bool = False  # the EOF reached dst (shutdown(SHUT_WR) done)


@dataclass(eq=False)
class Conn:
    a: End = field(init=False)
    b: End = field(init=False)
    fwd: Half = field(init=False)  # a -> b (accepted side -> target)
    rev: Half = field(init=False)
    dead: bool = False


class Link:
    """One direction's bottleneck (FIFO + rate) and propagation delay."""

    def __init__(self, name: str, rate: float, delay: float, capacity: int) -> None:
        self.name = name
        self.rate = rate  # bytes per second; 0 = unlimited
        self.delay = delay
        self.capacity = capacity
        self.queue: deque[tuple[Half, memoryview | None]] = deque()
        self.queued = 0
        self.clock = 0.0  # when the link has finished sending what it took from the queue
        self.flight: deque[tuple[float, Half, memoryview | None]] = deque()
        self.blocked: set[Half] = set()  # senders not read because the FIFO was full
        self.carried = 0
        self.max_queued = 0

    def room(self) -> int:
        return self.capacity - self.queued

    def push(self, half: Half, data: memoryview | None, now: float) -> None:
        if not self.queue:
            self.clock = max(self.clock, now)  # an idle link banks no time
        self.queue.append((half, data))
        if data is not None:
            self.queued += len(data)
            self.max_queued = max(self.max_queued, self.queued)

    def due(self, now: float) -> bool:
        """Worth a pass: a whole slot has passed, or the budget covers the whole queue."""
        if not self.queue:
            return False
        elapsed = now - self.clock
        return not self.rate or elapsed >= SLOT or elapsed * self.rate >= self.queued

    def serve(self, now: float) -> bool:
        """Move what the link has sent by `now` into the delay line; True if room grew."""
        if not self.queue:
            return False
        before = self.queued
        while self.queue:
            half, data = self.queue[0]
            if data is None:
                self.queue.popleft()
                self.flight.append((self.clock + self.delay, half, None))
                continue
            if not self.rate:
                n = len(data)
            else:
                n = min(len(data), int((now - self.clock) * self.rate))
                if n <= 0:
                    break
            self.clock = self.clock + n / self.rate if self.rate else now
            self.flight.append((self.clock + self.delay, half, data[:n]))
            self.queued -= n
            self.carried += n
            if n == len(data):
                self.queue.popleft()
            else:
                self.queue[0] = (half, data[n:])
                break
        return self.queued < before

    def arrived(self, now: float) -> list[Half]:
        """Hand every chunk whose delay has passed to its connection; the halves touched."""
        touched = []
        while self.flight and self.flight[0][0] <= now:
            _, half, data = self.flight.popleft()
            if half.src.conn.dead:
                continue
            half.out.append(data)
            if data is not None:
                half.out_bytes += len(data)
            touched.append(half)
        return touched

    def next_wakeup(self, now: float) -> float | None:
        times = []
        if self.queue:
            times.append(self.clock + SLOT if self.rate else now)
        if self.flight:
            times.append(self.flight[0][0])
        return min(times) if times else None


def small_buffers(sock: socket.socket, size: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class Proxy:
    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        links: tuple[Link, Link],
        sockbuf: int,
    ) -> None:
        self.target = target
        self.fwd, self.rev = links
        self.sockbuf = sockbuf
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(listen, backlog=128)
        small_buffers(self.listener, sockbuf)  # inherited by accepted sockets
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.conns: set[Conn] = set()
        self.dirty: set[End] = set()
        self.accepted = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    # -- the loop ------------------------------------------------------------------
    def run(self) -> None:
        while True:
            now = time.monotonic()
            wakeups = [w for w in (self.fwd.next_wakeup(now), self.rev.next_wakeup(now)) if w]
            timeout = max(0.0, min(wakeups) - now) if wakeups else None
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    self.accept()
                else:
                    self.ready(key.data, mask)
            now = time.monotonic()
            for link in (self.fwd, self.rev):
                if link.due(now) and link.serve(now) and link.room() > 0:
                    for half in link.blocked:
                        self.dirty.add(half.src)
                    link.blocked.clear()
                for half in link.arrived(now):
                    self.flush(half)
            while self.dirty:
                self.update(self.dirty.pop())

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds, say: keep serving the others
                print(f"wan: accept failed: {exc}", file=sys.stderr, flush=True)
                return
            self.accepted += 1
            sock.setblocking(False)
            small_buffers(sock, self.sockbuf)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET)
            small_buffers(out, self.sockbuf)  # before connect: the window scale is set then
            out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out.setblocking(False)
            conn = Conn()
            conn.a, conn.b = End(sock, conn), End(out, conn, connected=False)
            conn.fwd = Half(conn.a, conn.b, self.fwd)
            conn.rev = Half(conn.b, conn.a, self.rev)
            self.conns.add(conn)
            err = out.connect_ex(self.target)
            if err not in (0, errno.EINPROGRESS):
                self.abort(conn)
                continue
            conn.b.connected = err == 0
            self.dirty.update((conn.a, conn.b))

    def ready(self, end: End, mask: int) -> None:
        conn = end.conn
        if conn.dead:
            return
        if mask & selectors.EVENT_WRITE:
            if not end.connected:
                if end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.abort(conn)
                    return
                end.connected = True
                self.dirty.add(conn.a)  # a is read once b can take the bytes
            half = conn.fwd if end is conn.b else conn.rev
            self.flush(half)
        if mask & selectors.EVENT_READ and not conn.dead:
            half = conn.fwd if end is conn.a else conn.rev
            self.read(half)
        if not conn.dead:
            self.dirty.add(end)

    def read(self, half: Half) -> None:
        link = half.link
        room = link.room()
        if room <= 0 or half.eof_read:
            return
        try:
            data = half.src.sock.recv(min(room, READ))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort(half.src.conn)
            return
        now = time.monotonic()
        if not data:
            half.eof_read = True
            link.push(half, None, now)
        else:
            link.push(half, memoryview(data), now)
        if link.room() <= 0:
            link.blocked.add(half)

    def flush(self, half: Half) -> None:
        """Write what has arrived for `half.dst`; pass the EOF on once the bytes are out."""
        dst = half.dst
        conn = dst.conn
        if conn.dead or not dst.connected:
            return
        was_full = half.out_bytes >= OUT_CAP
        while half.out:
            data = half.out[0]
            if data is None:
                half.out.popleft()
                try:
                    dst.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self.abort(conn)
                    return
                half.shut = True
                if conn.fwd.shut and conn.rev.shut:
                    self.close(conn)
                    return
                continue
            try:
                n = dst.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.abort(conn)
                return
            half.out_bytes -= n
            if n == len(data):
                half.out.popleft()
            else:
                half.out[0] = data[n:]
                break
        self.dirty.add(dst)
        if was_full and half.out_bytes < OUT_CAP:
            self.dirty.add(half.src)

    def update(self, end: End) -> None:
        """Register `end` for what it can do now: read while its link has room and its
        receiver keeps up; write while bytes wait for it (or to finish connecting)."""
        conn = end.conn
        if conn.dead:
            return
        sending = conn.fwd if end is conn.a else conn.rev
        receiving = conn.rev if end is conn.a else conn.fwd
        mask = 0
        if (
            not sending.eof_read
            and sending.link.room() > 0
            and sending.out_bytes < OUT_CAP
            and conn.b.connected
        ):
            mask |= selectors.EVENT_READ
        if not end.connected or receiving.out:
            mask |= selectors.EVENT_WRITE
        if sending.link.room() <= 0:
            sending.link.blocked.add(sending)
        if mask == end.mask:
            return
        if end.mask and mask:
            self.sel.modify(end.sock, mask, end)
        elif mask:
            self.sel.register(end.sock, mask, end)
        else:
            self.sel.unregister(end.sock)
        end.mask = mask

    def close(self, conn: Conn, reset: bool = False) -> None:
        conn.dead = True
        self.conns.discard(conn)
        for end in (conn.a, conn.b):
            if end.mask:
                self.sel.unregister(end.sock)
                end.mask = 0
            self.dirty.discard(end)
            if reset:  # the peer sees a reset, as it would see the error on a real path
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            end.sock.close()
        for link in (self.fwd, self.rev):
            link.blocked.discard(conn.fwd)
            link.blocked.discard(conn.rev)

    def abort(self, conn: Conn) -> None:
        if not conn.dead:
            self.close(conn, reset=True)

    def shutdown(self) -> None:
        for conn in list(self.conns):
            self.close(conn)
        self.sel.close()
        self.listener.close()

    def stats(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            **{
                f"{link.name}_{key}": value
                for link in (self.fwd, self.rev)
                for key, value in (("bytes", link.carried), ("max_queued", link.max_queued))
            },
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=parse_address, default=("127.0.0.1", 0))
    parser.add_argument("--target", type=parse_address, required=True)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one way, per direction")
    parser.add_argument(
        "--rate-mbit", type=float, default=100.0, help="per direction (0: unlimited)"
    )
    parser.add_argument("--buffer-kib", type=int, default=512, help="bottleneck FIFO per direction")
    parser.add_argument(
        "--sockbuf-kib", type=int, default=SOCKBUF // 1024, help="the proxy's socket buffers"
    )
    args = parser.parse_args(argv)
    rate = args.rate_mbit * 1e6 / 8
    delay = args.delay_ms / 1000
    capacity = max(1, args.buffer_kib * 1024)
    links = (Link("fwd", rate, delay, capacity), Link("rev", rate, delay, capacity))

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    proxy = Proxy(args.listen, args.target, links, args.sockbuf_kib * 1024)
    host, port = proxy.address
    print(f"LISTENING {host}:{port}", flush=True)
    try:
        proxy.run()
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        proxy.shutdown()
        print("STATS " + json.dumps(proxy.stats()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
