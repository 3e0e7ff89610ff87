"""The benchmark's load generator, run as its own process: `python -m bench.client SPEC`.

SPEC is one JSON object (see `main`); the result is one JSON line on stdout.
Stdlib ssl sockets and epoll, no framework: per request this costs a fraction
of what the trio servers it drives spend, so it is not the bottleneck, and it
is the same code for the tunnel and the direct baseline. Its own CPU time over
the measured window is part of every result.
"""

from __future__ import annotations

import json
import resource
import selectors
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

RECV = 256 * 1024


class BenchError(Exception):
    """The run cannot go on (a bad answer, a broken connection)."""


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
    finally:
        sel.close()
        for c in conns:
            c.sock.close()
    if not latencies:
        raise BenchError("no response completed in the measured window")
    latencies.sort()
    return {
        "conns": conns_n,
        "requests": len(latencies),
        "seconds": seconds,
        "rate": len(latencies) / seconds,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "max_ms": 1000 * latencies[-1],
        "errors": errors,
        "t0": wall0,
        "t1": wall0 + seconds,
        "cpu": cpu,
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


MODES = {"download": run_download, "rate": run_rate, "hold": run_hold}


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
