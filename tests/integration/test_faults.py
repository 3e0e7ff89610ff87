"""Network faults between daemon and relay (tests/faultproxy.py), and a rolling relay restart.

test_resilience.py covers a plain stall, a reset during a download and a restart
with one download; these add delay and throttle, a stall and a clean cut (FIN)
in the middle of transfers both ways, 100 reset/reconnect cycles checked for
task and memory leaks, and a restart with 50 WebSockets and a probe.
`pytest -s` prints the figures.
"""

from __future__ import annotations

import hashlib
import json
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from tests.integration.harness import HOME_HOST, World, split_response, wait_for
from tunneld.control import get_json
from tunneld.demoapp import pattern, pattern_sha256

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CLIENT = "127.0.0.2"  # client traffic; the tunnel itself comes from 127.0.0.1


# -- transfers -------------------------------------------------------------------


@dataclass
class Result:
    """How one transfer ended. `error` set means the client saw a failure."""

    error: str | None = None
    status: int = 0
    length: int = 0  # response body bytes
    sha256: str = ""
    body: bytes = b""  # the response body when small (upload answers)
    seconds: float = 0.0


class Transfer:
    """A download or upload in a thread; `moving` is set once `threshold` bytes passed."""

    def __init__(self, target: Callable[[Transfer], None], threshold: int = 2 * MiB) -> None:
        self.threshold = threshold
        self.progress = 0  # body bytes so far
        self.moving = threading.Event()
        self.result = Result()
        self._target = target
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        try:
            self._target(self)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.result.error = repr(exc)
        self.result.seconds = time.monotonic() - start
        self.moving.set()  # never leave a waiter hanging

    def wait_moving(self, timeout: float = 30) -> None:
        assert self.moving.wait(timeout), "transfer never got going"
        assert self.result.error is None and self.result.status == 0, self.result

    def join(self, timeout: float = 60) -> Result:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"transfer hung (no end within {timeout}s)"
        return self.result


def _read_response(conn: ssl.SSLSocket, t: Transfer, keep: bool, rate: float | None = None) -> None:
    """Read one Connection: close response into t.result, hashing the body; with
    `rate`, at most that many body bytes per second (a client that reads slowly)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            raise ConnectionError(f"closed before the response head: {buf[:100]!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status, _, _ = split_response(head + b"\r\n\r\n")
    digest = hashlib.sha256()
    got = 0
    body = bytearray()
    data = rest
    start = time.monotonic()
    while True:
        digest.update(data)
        got += len(data)
        t.progress = got
        if keep:
            body += data
        if got >= t.threshold:
            t.moving.set()
        if rate is not None:
            time.sleep(max(0.0, start + got / rate - time.monotonic()))
        try:
            data = conn.recv(262144)
        except ssl.SSLZeroReturnError:  # TLS close_notify: a clean end
            break
        if not data:
            break
    t.result.status, t.result.length, t.result.sha256 = status, got, digest.hexdigest()
    t.result.body = bytes(body)


def download(
    world: World, n: int, seed: int, timeout: float = 60, rate: float | None = None
) -> Transfer:
    def run(t: Transfer) -> None:
        with world.connect(CLIENT, timeout=timeout) as conn:
            conn.sendall(
                f"GET /bytes?n={n}&seed={seed} HTTP/1.1\r\nHost: {HOME_HOST}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            _read_response(conn, t, keep=False, rate=rate)

    return Transfer(run)


def upload(world: World, n: int, seed: int, timeout: float = 60) -> Transfer:
    def run(t: Transfer) -> None:
        with world.connect(CLIENT, timeout=timeout) as conn:
            conn.sendall(
                f"POST /upload HTTP/1.1\r\nHost: {HOME_HOST}\r\nContent-Length: {n}\r\n"
                "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode()
            )
            sent = 0
            for chunk in pattern(n, seed):
                conn.sendall(chunk)
                sent += len(chunk)
                t.progress = sent
                if sent >= t.threshold:
                    t.moving.set()
            _read_response(conn, t, keep=True)

    return Transfer(run)


def assert_download_intact(r: Result, n: int, seed: int) -> None:
    assert r.error is None, r
    assert (r.status, r.length, r.sha256) == (200, n, pattern_sha256(n, seed)), r


def assert_upload_intact(r: Result, n: int, seed: int) -> None:
    assert r.error is None and r.status == 200, r
    assert json.loads(r.body) == {"bytes": n, "sha256": pattern_sha256(n, seed)}, r


def assert_failed(r: Result, what: str) -> None:
    """The client must see an error: never a 2xx that ended cleanly (short or not)."""
    assert r.error is not None, f"{what}: the client saw a clean end, not an error: {r}"


# -- status, process figures -------------------------------------------------------


def control_status(world: World, which: str) -> dict[str, Any]:
    """Status straight from the control socket: a `tunneld status` process per poll
    would cost more than a reconnect cycle."""
    sock = world.root / "run" / f"{which}.sock"
    value = trio.run(get_json, sock, "/v1/status")
    assert isinstance(value, dict)
    return value


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def get_small(world: World, source: str = CLIENT, timeout: float = 10) -> int:
    return split_response(world.http_get("/small", source=source, timeout=timeout))[0]


def proxied_world(world: World, **relay: Any) -> World:
    world.start_app()
    world.start_relay()
    world.start_fault_proxy()
    world.start_home(relay=relay)
    return world


# -- tests -----------------------------------------------------------------------


def test_delayed_and_throttled_link_carries_transfers_intact(world: World) -> None:
    proxied_world(world)
    session = control_status(world, "home")["session_id"]

    world.fault("delay 25")  # 50 ms more round trip
    n = 8 * MiB
    down, up = download(world, n, seed=11), upload(world, n, seed=12)
    assert_download_intact(down.join(), n, 11)
    assert_upload_intact(up.join(), n, 12)
    wait_for(lambda: (control_status(world, "home")["rtt_ms"] or 0) >= 50, what="ping sees delay")
    rtt = control_status(world, "home")["rtt_ms"]
    print(
        f"\ndelay 25 ms each way: {n // MiB} MiB down {down.result.seconds:.1f}s,"
        f" up {up.result.seconds:.1f}s, ping rtt {rtt} ms"
    )

    rate = 2_000_000
    world.fault("pass")
    world.fault(f"throttle {rate}")
    n = 3 * MiB
    down, up = download(world, n, seed=13), upload(world, n, seed=14)
    assert_download_intact(down.join(), n, 13)
    assert_upload_intact(up.join(), n, 14)
    # The throttle really held the link (else this test proves nothing).
    assert down.result.seconds > 0.7 * n / rate and up.result.seconds > 0.7 * n / rate
    print(
        f"throttle {rate} B/s: {n // MiB} MiB down {down.result.seconds:.1f}s,"
        f" up {up.result.seconds:.1f}s"
    )
    assert get_small(world) == 200
    # Slow is not dead: pings got through, the session was never replaced.
    assert control_status(world, "home")["session_id"] == session


def test_stall_during_transfers_fails_them_and_the_session_recovers(world: World) -> None:
    proxied_world(world)
    first = control_status(world, "home")["session_id"]
    down, up = download(world, 512 * MiB, seed=21), upload(world, 512 * MiB, seed=22)
    down.wait_moving()
    up.wait_moving()
    world.fault("stall")
    start = time.monotonic()
    wait_for(
        lambda: control_status(world, "home")["state"] != "connected",
        timeout=15,
        what="ping notices the stall",
    )
    noticed = time.monotonic() - start
    # ping_interval 1 s + ping_timeout 2 s, with slack for a busy machine.
    assert noticed < 9, noticed
    # The relay gives up on the silent session too (3 ping intervals) and resets
    # the clients' connections: an error each, never a clean short end.
    assert_failed(down.join(30), "stalled download")
    assert_failed(up.join(30), "stalled upload")
    failed_after = time.monotonic() - start
    world.fault("resume")
    resumed = time.monotonic()
    wait_for(
        lambda: control_status(world, "home")["session_id"] not in (None, first),
        timeout=20,
        what="reconnect after the stall",
    )
    back = time.monotonic() - resumed
    # backoff_max 1 s + connect_timeout 3 s (an attempt may have begun in the stall).
    assert back < 12, back
    assert get_small(world) == 200
    print(
        f"\nstall: dead session noticed in {noticed:.1f}s, both clients failed after"
        f" {failed_after:.1f}s, reconnected {back:.1f}s after resume"
    )


def test_clean_cut_mid_transfer_is_an_error_not_a_short_success(world: World) -> None:
    proxied_world(world)
    first = control_status(world, "home")["session_id"]
    down, up = download(world, 512 * MiB, seed=31), upload(world, 512 * MiB, seed=32)
    down.wait_moving()
    up.wait_moving()
    assert world.fault("cut").split()[-1] != "0"  # FIN both ways, no reset
    assert_failed(down.join(30), "cut download")
    assert_failed(up.join(30), "cut upload")
    wait_for(
        lambda: control_status(world, "home")["session_id"] not in (None, first),
        timeout=20,
        what="reconnect after the cut",
    )
    assert get_small(world) == 200
    n = 4 * MiB
    assert_download_intact(download(world, n, seed=33).join(), n, 33)
    print(f"\ncut (FIN): download failed with {down.result.error}, upload with {up.result.error}")


def test_100_reset_cycles_leak_no_tasks_or_memory(world: World) -> None:
    # Fast retries: the cycles measure leaks, not backoff.
    proxied_world(world, backoff_initial="0.05s", backoff_max="0.2s")
    home_pid, relay_pid = world.home.popen.pid, world.relay.popen.pid

    def cycle() -> None:
        before = control_status(world, "home")["session_id"]
        world.fault("reset")
        wait_for(
            lambda: (
                (s := control_status(world, "home"))["state"] == "connected"
                and s["session_id"] not in (None, before)
            ),
            timeout=15,
            interval=0.02,
            what="reconnect after reset",
        )
        assert get_small(world) == 200

    def figures() -> tuple[int, int, int, int]:
        return (
            control_status(world, "home")["tasks"],
            control_status(world, "relay")["tasks"],
            rss_kib(home_pid),
            rss_kib(relay_pid),
        )

    for _ in range(5):  # warm up: first-use caches and imports are not leaks
        cycle()
    time.sleep(0.5)
    home_tasks, relay_tasks, home_rss, relay_rss = figures()
    start = time.monotonic()
    for _ in range(100):
        cycle()
    elapsed = time.monotonic() - start
    slack = 5  # a ping or status task that happens to be running

    # Tasks of the last dead session end within a moment.
    def settled() -> tuple[int, int, int, int] | None:
        now = figures()
        ok = now[0] <= home_tasks + slack and now[1] <= relay_tasks + slack
        return now if ok else None

    try:
        after = wait_for(settled, timeout=10, interval=0.2, what="task counts back")
    finally:
        now = figures()
        print(
            f"\n100 reset cycles in {elapsed:.1f}s:"
            f" daemon tasks {home_tasks} -> {now[0]}, relay tasks {relay_tasks} -> {now[1]},"
            f" daemon RSS {home_rss / 1024:.1f} -> {now[2] / 1024:.1f} MiB,"
            f" relay RSS {relay_rss / 1024:.1f} -> {now[3] / 1024:.1f} MiB"
        )
    assert control_status(world, "home")["reconnects"] >= 105
    assert after[2] - home_rss < 20 * 1024 and after[3] - relay_rss < 20 * 1024, after


# -- rolling restart ---------------------------------------------------------------


class EchoSocket:
    """A minimal WebSocket client (wsproto over a blocking TLS socket) on /ws/echo."""

    def __init__(self, world: World, source: str) -> None:
        self.sock = world.connect(source, timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=HOME_HOST, target="/ws/echo")))
        assert isinstance(next(self._events()), AcceptConnection)

    def _events(self) -> Iterator[Any]:
        while True:
            yield from self.ws.events()
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed without a WebSocket close")
            self.ws.receive_data(data)

    def echo(self, text: str) -> str:
        """Send `text`, return the echo; raises if the connection ended."""
        self.sock.sendall(self.ws.send(TextMessage(data=text)))
        got = ""
        for event in self._events():
            if isinstance(event, CloseConnection):
                raise ConnectionError(f"WebSocket closed: {event.code}")
            if isinstance(event, TextMessage):
                got += str(event.data)
                if event.message_finished:
                    return got
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.sock.close()


class Probe:
    """GET /small every ~100 ms from its own address; records (time, outcome), the
    outcome "ok", "refused" (no relay listening) or "failed" (anything else)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.samples: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                ok = get_small(self.world, source="127.0.0.7", timeout=3) == 200
                outcome = "ok" if ok else "failed"
            except ConnectionRefusedError:
                outcome = "refused"
            except (OSError, ssl.SSLError, ValueError, IndexError):
                outcome = "failed"
            self.samples.append((t, outcome))
            self._stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def failures(self) -> int:
        return sum(outcome != "ok" for _, outcome in self.samples)

    def longest_outage(self, listening: bool = False) -> float:
        """Seconds from the first failure of a run to the next success; with
        `listening`, counted only from the last refusal (no relay) of the run on."""
        worst, first_fail = 0.0, None
        for t, outcome in self.samples:
            if outcome == "ok":
                if first_fail is not None:
                    worst, first_fail = max(worst, t - first_fail), None
            elif outcome == "refused" and listening:
                first_fail = None
            elif first_fail is None:
                first_fail = t
        assert first_fail is None, f"new connections still failing at the end: {self.samples}"
        return worst


def test_rolling_relay_restart_keeps_service(world: World) -> None:
    # Both sides. The download is paced by its reader (about 8 s in all) so it is
    # surely still running at SIGTERM; what is left of it must then get through the
    # draining session within the drain, i.e. at ~1 MiB/s, on any machine.
    drain = 20
    world.start_app()
    world.start_relay(drain_timeout=f"{drain}s")
    world.start_home(relay={"drain_timeout": f"{drain}s"})
    port, old = world.relay_port, world.relay
    first = control_status(world, "home")["session_id"]
    sockets = [EchoSocket(world, f"127.0.0.{3 + i % 4}") for i in range(50)]
    assert all(s.echo(f"hello {i}") == f"hello {i}" for i, s in enumerate(sockets))
    n = 24 * MiB
    down = download(world, n, seed=41, timeout=60, rate=3 * MiB)
    down.wait_moving()
    probe = Probe(world)
    time.sleep(0.5)
    old.popen.send_signal(signal.SIGTERM)  # GOAWAY to the daemon, listener closed
    sigterm = time.monotonic()
    at_sigterm = down.progress
    # More than any buffering between daemon and client holds: the rest must cross
    # the draining session.
    assert at_sigterm < n // 2, f"only {n - at_sigterm} bytes left at SIGTERM"
    world.start_relay(port=port, drain_timeout=f"{drain}s")
    relay_start = time.monotonic() - sigterm
    wait_for(
        lambda: control_status(world, "home")["session_id"] not in (None, first),
        timeout=20,
        what="a session on the new relay",
    )
    time.sleep(1)
    probe.stop()
    outage = probe.longest_outage()
    # Once the new relay listens, clients fail (unknown name) only until the daemon
    # reaches it: backoff_max 1 s + connect_timeout 3 s, with slack.
    reconnect = probe.longest_outage(listening=True)
    assert reconnect < 1 + 3 + 4, probe.samples
    # Before, nothing listens on the port: the time the new relay takes to start.
    assert outage < relay_start + reconnect + 2, (outage, relay_start, probe.samples)
    # Open WebSockets live on the old, draining session: still working now.
    alive = sum(s.echo("still there") == "still there" for s in sockets)
    assert alive == 50
    result = down.join(drain + 10)
    assert_download_intact(result, n, 41)
    # Once the drain timeout ends the old session, its WebSockets are cut, each
    # with an error its client can see (and reconnect on), never left hanging.
    assert old.popen.wait(drain + 15) == 0
    endings: set[str] = set()
    for s in sockets:
        s.sock.settimeout(10)
        try:
            s.echo("after drain")
        except (OSError, ssl.SSLError) as exc:  # TimeoutError (a hang) is an OSError too
            assert not isinstance(exc, TimeoutError), "a WebSocket left hanging"
            endings.add(type(exc).__name__)
        else:
            endings.add("still open")
        s.close()
    assert "still open" not in endings, endings
    assert get_small(world) == 200
    fresh = EchoSocket(world, "127.0.0.3")
    assert fresh.echo("new session") == "new session"
    fresh.close()
    print(
        f"\nrolling restart: relay up {relay_start:.1f}s after SIGTERM, longest probe"
        f" outage {outage:.2f}s (of which listening, not yet reconnected: {reconnect:.2f}s)"
        f" over {len(probe.samples)} probes ({probe.failures()} failed),"
        f" {n // MiB} MiB download ({at_sigterm // MiB} MiB at SIGTERM) intact in"
        f" {result.seconds:.1f}s,"
        f" 50/50 WebSockets worked during the drain, all cut when it ended ({endings})"
    )
