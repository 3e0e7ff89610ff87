"""bench/wan.py, the WAN link emulator the benchmark puts between daemon and relay.

A tool test: real processes on loopback, loose bounds (the machine is shared), so it
checks that the delay and the rate are there, not how exact they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serving(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    """A one-connection server on a loopback port 0, `handler` on a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(20)
                handler(conn)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
        thread.join(20)
        assert not thread.is_alive(), "server thread still running"
        assert not errors, errors
    finally:
        listener.close()


@contextlib.contextmanager
def wan(port: int, *args: str) -> Iterator[tuple[int, dict[str, int]]]:
    """bench.wan in front of `port`; yields its port and, after the block, its STATS."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.wan", "--target", f"127.0.0.1:{port}", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stats: dict[str, int] = {}
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "bench.wan did not print its port"
        line = proc.stdout.readline().split()
        assert line[0] == "LISTENING", line
        yield int(line[1].rsplit(":", 1)[1]), stats
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    stats.update(json.loads(err.split("STATS ", 1)[1]))


def test_round_trip_is_twice_the_one_way_delay() -> None:
    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    with serving(echo) as port, wan(port, "--delay-ms", "20", "--rate-mbit", "100") as (p, _):
        with socket.create_connection(("127.0.0.1", p), timeout=20) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(8):
                t0 = time.monotonic()
                sock.sendall(b"x" * 100)
                got = 0
                while got < 100:
                    got += len(sock.recv(100 - got))
                rtts.append(time.monotonic() - t0)
    assert 0.038 <= statistics.median(rtts) <= 0.1, rtts


def test_rate_cap_each_way_and_half_close() -> None:
    size = 2_000_000  # 0.8 s each way at 20 Mbit/s
    up = os.urandom(size)
    down = os.urandom(size)
    arrived: list[float] = []

    def sink_then_send(conn: socket.socket) -> None:
        digest, got = hashlib.sha256(), 0
        while data := conn.recv(65536):
            digest.update(data)
            got += len(data)
        arrived.append(time.monotonic())
        assert got == size and digest.digest() == hashlib.sha256(up).digest()
        conn.sendall(down)

    with serving(sink_then_send) as port:
        args = ("--delay-ms", "10", "--rate-mbit", "20", "--buffer-kib", "64")
        with wan(port, *args) as (p, stats):
            with socket.create_connection(("127.0.0.1", p), timeout=20) as sock:
                t0 = time.monotonic()
                sock.sendall(up)
                sock.shutdown(socket.SHUT_WR)  # the server's read ends: half-close passed on
                received = bytearray()
                while data := sock.recv(65536):
                    received += data
                t1 = time.monotonic()
    assert bytes(received) == down
    expected = size / (20e6 / 8)
    up_seconds = arrived[0] - t0
    down_seconds = t1 - arrived[0]
    # The rate is a cap: never much faster; slower only by machine noise (loose).
    assert 0.9 * expected <= up_seconds <= 2.5 * expected, up_seconds
    assert 0.9 * expected <= down_seconds <= 2.5 * expected, down_seconds
    assert stats["fwd_bytes"] == size and stats["rev_bytes"] == size
    assert 0 < stats["fwd_max_queued"] <= 64 * 1024, stats
