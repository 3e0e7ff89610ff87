"""The benchmark's load generator, run as its own process: `python -m bench.client SPEC`.

SPEC is one JSON object (see `main`); the result is one JSON line on stdout.
Stdlib ssl sockets and epoll, no framework: per request this costs a fraction
of what the trio servers it drives spend, so it is not the bottleneck, and it
is the same code for the tunnel and the direct baseline. Its own CPU time over
the measured window is part of every result.
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import os
import resource
import select
import selectors
import signal
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

RECV = 256 * 1024


class BenchError(Exception):
    """The run cannot go on (a bad answer, a broken connection)."""


class ConnectionLost(BenchError):
    """One connection ended under load: counted as an error, the others go on."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    sni: str
    cafile: str
    sources: tuple[str, ...]

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Target:
        return cls(
            spec["host"], int(spec["port"]), spec["sni"], spec["cafile"], tuple(spec["sources"])
        )

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def request(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {self.sni}\r\n\r\n".encode()


def connect(
    target: Target, ctx: ssl.SSLContext, index: int = 0, timeout: float = 30.0
) -> ssl.SSLSocket:
    """A handshaken TLS connection from source address number `index` (round robin)."""
    source = target.sources[index % len(target.sources)]
    raw = socket.create_connection(
        (target.host, target.port), timeout=timeout, source_address=(source, 0)
    )
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw, server_hostname=target.sni)
    except BaseException:
        raw.close()
        raise


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------
# HTTP/1.1 responses, parsed just enough


def parse_head(buf: bytearray | bytes) -> tuple[int, int, int] | None:
    """(status, body start, Content-Length or -1 when chunked), None until the head is in."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            length = -1
    if length is None:
        raise BenchError(f"response without a length (status {status}): keep-alive impossible")
    return status, end + 4, length


def response_end(buf: bytearray) -> tuple[int, int] | None:
    """(status, end offset) of the first complete response in `buf`, None if incomplete."""
    head = parse_head(buf)
    if head is None:
        return None
    status, pos, length = head
    if length >= 0:
        end = pos + length
        return (status, end) if len(buf) >= end else None
    while True:  # chunked: walk the chunk sizes
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # optional trailers, then an empty line
            return (status, end + 4) if end >= 0 else None
        pos += size + 2
        if pos > len(buf):
            return None


def get(sock: ssl.SSLSocket, target: Target, path: str, view: memoryview) -> tuple[int, bytes]:
    """One GET on a blocking keep-alive connection; returns (status, first 64 KiB of body)."""
    sock.sendall(target.request(path))
    buf = bytearray()
    head = None
    while head is None:
        n = sock.recv_into(view)
        if not n:
            raise BenchError("connection closed before the response head")
        buf += view[:n]
        head = parse_head(buf)
    status, start, length = head
    if status != 200:
        raise BenchError(f"GET {path}: status {status}")
    if length < 0:
        return status, _chunked_body(sock, target, path, bytes(buf), view)
    body = bytes(buf[start : start + 65536])
    remaining = length - (len(buf) - start)
    while remaining > 0:  # the hot loop: count bytes, copy nothing
        n = sock.recv_into(view, min(remaining, len(view)))
        if not n:
            raise BenchError(f"connection closed with {remaining} body bytes missing")
        if len(body) < 65536:
            body += view[: min(n, 65536 - len(body))]
        remaining -= n
    if remaining < 0:
        raise BenchError("more bytes than Content-Length")
    return status, body


def _chunked_body(
    sock: ssl.SSLSocket, target: Target, path: str, first: bytes, view: memoryview
) -> bytes:
    """The slow path for a chunked response (the direct app never sends one)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target=path, headers=[("Host", target.sni)]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(first)
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            n = sock.recv_into(view)
            if not n:
                raise BenchError("connection closed inside a chunked body")
            conn.receive_data(bytes(view[:n]))
        elif isinstance(event, h11.Data):
            if len(body) < 65536:
                body += event.data[: 65536 - len(body)]
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)


# ---------------------------------------------------------------------------
# Modes


def run_download(spec: dict[str, Any]) -> dict[str, Any]:
    """GET /bytes?n=SIZE. With `duration`: repeat on one connection until it has passed
    (a background load; `ready_file` appears once bytes flow). Otherwise one timed GET."""
    target = Target.from_spec(spec)
    size = int(spec["size"])
    duration = float(spec.get("duration", 0))
    ready = Path(spec["ready_file"]) if spec.get("ready_file") else None
    view = memoryview(bytearray(RECV))
    path = f"/bytes?n={size}"
    with connect(target, target.context()) as sock:
        cipher = sock.cipher()
        cpu0, wall0, t0 = cpu_seconds(), time.time(), time.monotonic()
        total = 0
        while True:
            get(sock, target, path, view)
            total += size
            if ready is not None and not ready.exists():
                ready.write_text("1")
            if time.monotonic() - t0 >= duration:
                break
        seconds = time.monotonic() - t0
        cpu = cpu_seconds() - cpu0
    return {
        "bytes": total,
        "seconds": seconds,
        "mbps": total / seconds / 1e6,
        "t0": wall0,
        "t1": wall0 + seconds,
        "cpu": cpu,
        "cipher": cipher[0] if cipher else None,
    }


def run_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """One GET /bytes?n=SIZE (larger than the window needs), counted from wall-clock
    `start_at` for `duration` seconds, then dropped: several of these started together
    measure how they share a link over the same window. Bytes per second of the window
    in `timeline`."""
    target = Target.from_spec(spec)
    duration = float(spec["duration"])
    view = memoryview(bytearray(RECV))
    with connect(target, target.context()) as sock:
        if spec.get("ready_file"):
            Path(spec["ready_file"]).write_text("1")
        time.sleep(max(0.0, float(spec.get("start_at", 0)) - time.time()))
        cpu0, wall0, t0 = cpu_seconds(), time.time(), time.monotonic()
        sock.sendall(target.request(f"/bytes?n={int(spec['size'])}"))
        sock.settimeout(1.0)
        timeline = [0] * max(1, int(duration + 0.999))
        total = 0
        while (now := time.monotonic() - t0) < duration:
            try:
                n = sock.recv_into(view)
            except TimeoutError:
                continue
            if not n:
                raise BenchError(f"connection closed after {total} bytes")
            total += n  # the response head too: a few hundred bytes in megabytes
            timeline[min(int(now), len(timeline) - 1)] += n
        seconds = time.monotonic() - t0
        cpu = cpu_seconds() - cpu0
    return {
        "bytes": total,
        "seconds": seconds,
        "mbps": total / seconds / 1e6,
        "timeline": timeline,
        "t0": wall0,
        "t1": wall0 + seconds,
        "cpu": cpu,
    }


@dataclass
class _Conn:
    sock: ssl.SSLSocket
    buf: bytearray = field(default_factory=bytearray)
    sent_at: float = 0.0
    due: float = 0.0  # when to send the next request (think time); 0 = waiting for a response


def run_rate(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: `conns` keep-alive connections each send GET `path`, wait for the whole
    response, wait `think` seconds, repeat. Only responses completed inside the measured
    window (after `warmup`) count."""
    target = Target.from_spec(spec)
    conns_n = int(spec["conns"])
    duration = float(spec["duration"])
    warmup = float(spec.get("warmup", 1.0))
    think = float(spec.get("think", 0.0))
    request = target.request(spec.get("path", "/small"))
    ctx = target.context()
    conns = [_Conn(connect(target, ctx, i)) for i in range(conns_n)]
    cipher = conns[0].sock.cipher()
    if spec.get("ready_file"):
        Path(spec["ready_file"]).write_text("1")
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = 0
    try:
        start = time.monotonic()
        for c in conns:
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ, c)
            c.sent_at = start
            c.sock.send(request)
        m0, m1 = start + warmup, start + warmup + duration
        recording = False
        cpu0 = wall0 = 0.0
        live = len(conns)
        while live:
            now = time.monotonic()
            if now >= m1:
                break
            if not recording and now >= m0:
                recording, cpu0, wall0 = True, cpu_seconds(), time.time()
            timeout = (m0 if not recording else m1) - now
            if think:
                timeout = min([timeout, *(c.due - now for c in conns if c.due)])
            for key, _ in sel.select(max(timeout, 0.0)):
                c = key.data
                try:
                    while True:
                        data = c.sock.recv(RECV)
                        if not data:
                            raise BenchError("closed by the server")
                        c.buf += data
                except ssl.SSLWantReadError:
                    pass
                except (OSError, BenchError):
                    errors += 1
                    live -= 1
                    sel.unregister(c.sock)
                    continue
                done = time.monotonic()
                while (found := response_end(c.buf)) is not None:
                    status, end = found
                    if status != 200:
                        raise BenchError(f"status {status}")
                    if recording:
                        latencies.append(done - c.sent_at)
                    del c.buf[:end]
                    if think:
                        c.due = done + think
                    else:
                        c.sent_at = done
                        c.sock.send(request)
            if think:
                now = time.monotonic()
                for c in conns:
                    if c.due and c.due <= now:
                        c.due, c.sent_at = 0.0, now
                        c.sock.send(request)
        cpu = cpu_seconds() - cpu0
        seconds = time.time() - wall0
        # Requests still waiting at the end, sent inside the window: with `count_unfinished`
        # those older than every completed one count with their age so far (a lower
        # bound), so a stalled path shows in the percentiles instead of vanishing.
        end = time.monotonic()
        waiting = [end - c.sent_at for c in conns if not c.due and c.sent_at >= m0]
    finally:
        sel.close()
        for c in conns:
            c.sock.close()
    completed = len(latencies)
    stalled = [age for age in waiting if age > max(latencies, default=0.0)]
    if spec.get("count_unfinished"):
        latencies += stalled
    if not latencies:
        raise BenchError("no response completed in the measured window")
    _save_latencies(spec, latencies)
    return {
        "conns": conns_n,
        "requests": completed,
        "unfinished": len(stalled),  # waiting at the end, older than any completed one
        **_closed_loop_figures(latencies, seconds, wall0, cpu),
        "errors": errors,
        "cipher": cipher[0] if cipher else None,
    }


def _save_latencies(spec: dict[str, Any], latencies: list[float]) -> None:
    """Every latency to `latency_file` (doubles), for percentiles over several runs."""
    if spec.get("latency_file"):
        Path(spec["latency_file"]).write_bytes(array.array("d", latencies).tobytes())


def _closed_loop_figures(
    latencies: list[float], seconds: float, wall0: float, cpu: float
) -> dict[str, float]:
    """Rate and latency percentiles of a measured window, and its wall-clock bounds and
    the client's CPU (the harness charges each process's CPU over [t0, t1])."""
    latencies.sort()
    return {
        "seconds": seconds,
        "rate": len(latencies) / seconds,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p90_ms": 1000 * _percentile(latencies, 0.90),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "p999_ms": 1000 * _percentile(latencies, 0.999),
        "max_ms": 1000 * latencies[-1],
        "t0": wall0,
        "t1": wall0 + seconds,
        "cpu": cpu,
    }


# ---------------------------------------------------------------------------
# WebSocket (RFC 6455), just enough for an echo client

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_handshake(sock: ssl.SSLSocket, target: Target, path: str) -> bytearray:
    """Upgrade a blocking connection; returns any bytes that came after the 101 head."""
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {target.sni}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = sock.recv(RECV)
        if not data:
            raise BenchError("connection closed during the WebSocket handshake")
        buf += data
    lines = bytes(buf[:end]).split(b"\r\n")
    status = lines[0].split(b" ", 2)[1]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    accept = headers.get(b"sec-websocket-accept")
    if status != b"101":
        raise BenchError(f"WebSocket handshake: status {status.decode(errors='replace')}")
    if accept != base64.b64encode(hashlib.sha1(key + WS_GUID).digest()):
        raise BenchError(f"WebSocket handshake: wrong Sec-WebSocket-Accept {accept!r}")
    del buf[: end + 4]
    return buf


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame: always masked (RFC 6455 5.3)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    if not n:
        return head + mask
    key = (mask * (n // 4 + 1))[:n]  # XOR as one big integer: no per-byte Python loop
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


def ws_parse(buf: bytearray) -> tuple[int, bool, bytes, int] | None:
    """(opcode, fin, payload, frame length) of the first whole server frame in `buf`,
    None while it is incomplete. Server frames must not be masked."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    if b1 & 0x80 or b0 & 0x70:
        raise BenchError(f"bad server frame header {bytes(buf[:2]).hex()}")
    n, pos = b1 & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack_from("!H", buf, 2)[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
    if len(buf) < pos + n:
        return None
    return b0 & 0x0F, bool(b0 & 0x80), bytes(buf[pos : pos + n]), pos + n


def send_all(sock: ssl.SSLSocket, data: bytes, timeout: float = 30.0) -> None:
    """sendall for a non-blocking TLS socket (a large message may not fit at once)."""
    view, deadline = memoryview(data), time.monotonic() + timeout
    while view:
        try:
            view = view[sock.send(view) :]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            if time.monotonic() > deadline:
                raise BenchError("send stalled") from None
            select.select([sock], [sock], [], 0.1)


@dataclass
class _WsConn:
    sock: ssl.SSLSocket
    buf: bytearray
    sent: bytes = b""  # the payload in flight
    sent_at: float = 0.0
    got: bytearray = field(default_factory=bytearray)  # echo so far (it may be fragmented)
    in_message: bool = False
    seq: int = 0
    alive: bool = True


def _ws_send(c: _WsConn, base: bytes) -> None:
    """Send the next message: `base` with the sequence number in front, so a stale or
    repeated echo cannot pass for the right one."""
    c.seq += 1
    c.sent = (struct.pack("!Q", c.seq) + base)[: len(base)] if len(base) >= 8 else base
    c.sent_at = time.monotonic()
    send_all(c.sock, ws_frame(OP_BINARY, c.sent))


def _ws_receive(c: _WsConn) -> None:
    """Everything readable now (a non-blocking socket) into `c.buf`."""
    try:
        while True:
            data = c.sock.recv(RECV)
            if not data:
                raise ConnectionLost("closed by the server")
            c.buf += data
    except ssl.SSLWantReadError:
        pass


def _ws_messages(c: _WsConn) -> int:
    """Consume the whole frames in `c.buf`; the number of echoes completed (checked)."""
    done = 0
    while (frame := ws_parse(c.buf)) is not None:
        opcode, fin, payload, length = frame
        del c.buf[:length]
        if opcode == OP_PING:
            send_all(c.sock, ws_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            pass
        elif opcode == OP_CLOSE:
            raise ConnectionLost(f"closed by the server: {payload[:2].hex()}")
        elif opcode in (OP_BINARY, OP_CONT) and (opcode == OP_CONT) == c.in_message:
            c.got += payload
            c.in_message = not fin
            if fin:
                if c.got != c.sent:
                    raise BenchError(f"echo differs: {len(c.got)} bytes for {len(c.sent)}")
                c.got.clear()
                done += 1
        else:
            raise BenchError(f"unexpected frame opcode {opcode} (in message: {c.in_message})")
    return done


def _ws_close(conns: list[_WsConn], timeout: float = 5.0) -> int:
    """Close handshake on every connection (an echo may still be in flight); returns how
    many did not end with the server's close frame in time."""
    deadline = time.monotonic() + timeout
    unclean = 0
    for c in conns:
        try:
            send_all(c.sock, ws_frame(OP_CLOSE, struct.pack("!H", 1000)))
            while True:
                frame = ws_parse(c.buf)
                if frame is not None:
                    del c.buf[: frame[3]]
                    if frame[0] == OP_CLOSE:
                        break
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([c.sock], [], [], left)[0]:
                    raise BenchError("no close frame")
                try:
                    data = c.sock.recv(RECV)
                except ssl.SSLWantReadError:
                    continue
                if not data:
                    raise BenchError("closed without a close frame")
                c.buf += data
        except (OSError, BenchError):
            unclean += 1
    return unclean


def run_ws(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed loop over `conns` WebSocket connections to `path` (an echo): each sends one
    binary message of `size` bytes, waits for the whole echo, checks it, repeats. Only
    round trips completed inside the measured window (after `warmup`) count."""
    target = Target.from_spec(spec)
    conns_n = int(spec.get("conns", 10))
    size = int(spec.get("size", 64))
    duration = float(spec["duration"])
    warmup = float(spec.get("warmup", 1.0))
    path = spec.get("path", "/ws/echo")
    base = os.urandom(size)
    ctx = target.context()
    conns: list[_WsConn] = []
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = 0
    try:
        for i in range(conns_n):
            sock = connect(target, ctx, i)
            conns.append(_WsConn(sock, bytearray()))
            conns[-1].buf = ws_handshake(sock, target, path)
        cipher = conns[0].sock.cipher()
        if spec.get("ready_file"):
            Path(spec["ready_file"]).write_text("1")
        start = time.monotonic()
        for c in conns:
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ, c)
            _ws_send(c, base)
        m0, m1 = start + warmup, start + warmup + duration
        recording = False
        cpu0 = wall0 = 0.0
        live = len(conns)
        while live:
            now = time.monotonic()
            if now >= m1:
                break
            if not recording and now >= m0:
                recording, cpu0, wall0 = True, cpu_seconds(), time.time()
            for key, _ in sel.select(max((m0 if not recording else m1) - now, 0.0)):
                c = key.data
                try:
                    _ws_receive(c)
                    done = time.monotonic()
                    if _ws_messages(c):  # closed loop: at most one message is in flight
                        if recording:
                            latencies.append(done - c.sent_at)
                        _ws_send(c, base)
                except (OSError, ConnectionLost):
                    errors += 1
                    live -= 1
                    c.alive = False
                    sel.unregister(c.sock)
        cpu = cpu_seconds() - cpu0
        seconds = time.time() - wall0
        unclean = _ws_close([c for c in conns if c.alive])
    finally:
        sel.close()
        for c in conns:
            c.sock.close()
    if not latencies:
        raise BenchError("no round trip completed in the measured window")
    _save_latencies(spec, latencies)
    return {
        "conns": conns_n,
        "size": size,
        "messages": len(latencies),
        **_closed_loop_figures(latencies, seconds, wall0, cpu),
        "errors": errors,
        "unclean_closes": unclean,
        "cipher": cipher[0] if cipher else None,
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_hold(spec: dict[str, Any]) -> dict[str, Any]:
    """Open `conns` TLS connections, write `ready_file`, then send nothing until stdin
    closes (the parent's signal) or `max_seconds` pass; then close them all."""
    target = Target.from_spec(spec)
    ctx = target.context()
    signal.alarm(int(spec.get("max_seconds", 300)))  # never outlive a dead parent for long
    socks: list[ssl.SSLSocket] = []
    t0 = time.monotonic()
    try:
        for i in range(int(spec["conns"])):
            socks.append(connect(target, ctx, i))
        opened = time.monotonic() - t0
        Path(spec["ready_file"]).write_text(str(len(socks)))
        sys.stdin.read()
    finally:
        for sock in socks:
            sock.close()
    return {"conns": len(socks), "handshake_seconds": opened}


MODES = {
    "download": run_download,
    "stream": run_stream,
    "rate": run_rate,
    "hold": run_hold,
    "ws": run_ws,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.client '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        result = MODES[spec["mode"]](spec)
    except (BenchError, OSError) as exc:
        print(f"bench client ({spec['mode']}): {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
