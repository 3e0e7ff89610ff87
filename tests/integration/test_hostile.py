"""Hostile input against a real relay: garbage on its public port and on /v1/tunnel, and
a rogue daemon that completes the real handshake with a valid token, then breaks the rules.

Every attack must end with that connection or session closed, within a bound, and
leave everything else alone: the daemon session for home.test running next to the
attacks keeps its session (same id) and keeps serving requests.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.harness import (
    FAST_RELAY,
    HOME_HOST,
    RawSession,
    World,
    client_hello,
    iter_recv,
    open_raw_session,
    relay_endpoint,
    split_response,
    tunnel_headers,
    tunnel_upgrade,
    wait_for,
)
from tunneld.control import get_json
from tunneld.demoapp import pattern_sha256
from tunneld.wire.events import Data, Eof, Hello, Open, Ping, Pong, Reset, Welcome, Window
from tunneld.wire.frames import MAX_FRAME_SIZE, MAX_WINDOW, FrameDecoder, encode

pytestmark = pytest.mark.integration

ROGUE_HOST = "rogue.test"
RELAY_STREAM_LIMIT = 4  # [relay] max_streams_per_session for this module's relay
HELLO_TIMEOUT = float(FAST_RELAY["client_hello_timeout"].rstrip("s"))
# The relay drops a session silent for 3 ping intervals: long enough here that a rogue
# which never pings outlives each test (the daemon pings every second anyway).
PING_INTERVAL = 4.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One relay, daemon and app shared by every attack: they must all survive them."""
    w = World(tmp_path_factory.mktemp("hostile") / "w")
    try:
        w.start_app()
        w.start_relay(
            max_streams_per_session=RELAY_STREAM_LIMIT, ping_interval=f"{PING_INTERVAL:g}s"
        )
        w.start_home()
        yield w
    finally:
        w.stop_all()


@pytest.fixture(scope="module")
def token(world: World) -> str:
    """A valid token for rogue.test: the attacker is an authenticated daemon."""
    return world.issue_token(ROGUE_HOST)


@pytest.fixture
def home_session(world: World) -> Iterator[str]:
    """The daemon's session id; afterwards, the same session must still serve requests."""
    session_id = str(home_status(world)["session_id"])
    yield session_id
    assert_unaffected(world, session_id)


def assert_unaffected(world: World, session_id: str) -> None:
    assert world.relay.alive() and world.home.alive()
    status, _, body = split_response(world.http_get("/small"))
    assert (status, body) == (200, b"hello tunnel\n")
    home = home_status(world)
    assert home["state"] == "connected" and home["session_id"] == session_id
    sessions = {s["id"]: s["hostnames"] for s in relay_status(world)["sessions"]}
    assert sessions.get(session_id) == [HOME_HOST]


def _control_status(sock: Path) -> dict[str, Any]:
    # Straight to the control socket: `tunneld status` in a subprocess costs ~0.5 s a call.
    status = trio.run(partial(get_json, sock, "/v1/status", timeout=10))
    assert isinstance(status, dict)
    return status


def relay_status(world: World) -> dict[str, Any]:
    return _control_status(world.root / "run" / "relay.sock")


def home_status(world: World) -> dict[str, Any]:
    return _control_status(world.root / "run" / "home.sock")


def refused(world: World, reason: str) -> int:
    return int(relay_status(world)["connections"]["refused"].get(reason, 0))


def relay_log_since(world: World, mark: int) -> str:
    return world.relay.log()[mark:]


def log_mark(world: World) -> int:
    return len(world.relay.log())


def wait_log(world: World, mark: int, text: str) -> None:
    """`text` appears in the relay log after `mark` (log lines may trail the close)."""
    wait_for(lambda: text in relay_log_since(world, mark), timeout=5, what=f"relay log: {text}")


def ended(sock: socket.socket, timeout: float = 10) -> tuple[str, float, bytes]:
    """Read until the peer ends the connection: ("eof"|"reset"|"timeout", seconds, bytes)."""
    start = time.monotonic()
    got = b""
    sock.settimeout(timeout)
    try:
        while len(got) < 1 << 20:
            data = sock.recv(65536)
            if not data:
                return "eof", time.monotonic() - start, got
            got += data
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        return "eof", time.monotonic() - start, got
    except TimeoutError:
        return "timeout", time.monotonic() - start, got
    except (ConnectionError, ssl.SSLError):
        return "reset", time.monotonic() - start, got
    finally:
        sock.close()
    return "timeout", time.monotonic() - start, got


def public(world: World, source: str) -> socket.socket:
    """A plain TCP connection to the relay's public port."""
    return socket.create_connection(
        ("127.0.0.1", world.relay_port), timeout=10, source_address=(source, 0)
    )


def rogue(world: World, token: str, source: str, **kwargs: Any) -> RawSession:
    return open_raw_session(world, token, (ROGUE_HOST,), source=source, **kwargs)


def client_of(world: World, session: RawSession, source: str) -> tuple[socket.socket, int]:
    """A client for rogue.test: its socket and the stream id the rogue got in OPEN."""
    sock = public(world, source)
    sock.sendall(client_hello(ROGUE_HOST))
    opened = session.next_event()
    assert isinstance(opened, Open) and opened.sni == ROGUE_HOST, opened
    first = session.next_event()
    assert isinstance(first, Data) and first.stream_id == opened.stream_id  # the ClientHello
    return sock, opened.stream_id


def assert_rogue_gone(world: World, session: RawSession, events: list[Any]) -> None:
    """The rogue's session is over: no OPEN came first, and its hostname is routed no more."""
    assert not any(isinstance(e, Open) for e in events), events
    wait_for(
        lambda: ROGUE_HOST not in relay_status(world)["hostnames"],
        timeout=10,
        what="the rogue session to leave the relay's routing table",
    )
    session.close()


# --- garbage on the public TLS port -----------------------------------------------------

REAL_HELLO = client_hello(HOME_HOST)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        pytest.param(b"\x15" + random.Random(7).randbytes(65535), "not tls", id="random-bytes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: home.test\r\n\r\n", "not tls", id="http"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", "not tls", id="ssh"),
        pytest.param(b"\x80\x2e\x01\x03\x01" + bytes(46), "not tls", id="sslv2-hello"),
        pytest.param(b"\x16\x03\x01\xff\xff" + bytes(100), "malformed", id="huge-record"),
        pytest.param(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "too large", id="16mib-hello"),
        pytest.param(
            b"\x16\x03\x01\x00\x0a" + REAL_HELLO[5:15] + b"\x15\x03\x03\x00\x02\x02\x28",
            "malformed",
            id="alert-inside-hello",
        ),
    ],
)
def test_garbage_on_the_public_port_is_dropped(
    world: World, home_session: str, payload: bytes, why: str
) -> None:
    source = f"127.0.0.{20 + len(payload) % 200}"
    mark, before = log_mark(world), refused(world, "client_hello")
    sock = public(world, source)
    try:
        sock.sendall(payload)
    except ConnectionError:
        pass  # closed while we still wrote: the relay refused from the first bytes
    how, seconds, answer = ended(sock)
    assert how in ("eof", "reset") and seconds < 5, (how, seconds)
    assert answer == b""  # nothing is echoed or answered on the TLS port
    assert refused(world, "client_hello") == before + 1
    wait_log(world, mark, f"dropped {source}: {why}")


def test_truncated_client_hello_then_silence_is_closed_after_the_timeout(
    world: World, home_session: str
) -> None:
    before = refused(world, "client_hello")
    streams = home_status(world)["streams"]["total"]
    sock = public(world, "127.0.0.30")
    sock.sendall(REAL_HELLO[:60])
    how, seconds, answer = ended(sock, timeout=5 * HELLO_TIMEOUT)
    assert how in ("eof", "reset") and answer == b""
    assert HELLO_TIMEOUT - 0.5 <= seconds <= 4 * HELLO_TIMEOUT, seconds
    assert refused(world, "client_hello") == before + 1
    assert home_status(world)["streams"]["total"] == streams  # never routed


def test_client_hello_then_garbage_ends_at_the_home(world: World, home_session: str) -> None:
    # Routed by its valid SNI; the daemon's TLS refuses the garbage that follows.
    sock = public(world, "127.0.0.31")
    sock.sendall(REAL_HELLO + b"\x17\x03\x03\x40\x00" + os.urandom(16384))
    how, seconds, _ = ended(sock, timeout=15)
    assert how in ("eof", "reset") and seconds < 10, (how, seconds)


# --- garbage on the tunnel endpoint -------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"\x00\x01\x02 not http\r\n\r\n", None, id="not-http"),
        pytest.param(b"GET /v1/tunnel HTTP/1.1\r\nHost: relay.test\r\n\r\n", 401, id="no-token"),
        pytest.param(
            b"GET /v1/tunnel HTTP/1.1\r\nHost: relay.test\r\nX: " + b"a" * 65536 + b"\r\n\r\n",
            None,
            id="64k-header",
        ),
        pytest.param(
            b"GET /v1/tunnel HTTP/1.1\r\nHost: relay.test\r\n", None, id="head-then-silence"
        ),
        pytest.param(
            b"POST /v1/tunnel HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 99999999\r\n\r\n",
            401,
            id="post",
        ),
        pytest.param(b"GET /nowhere HTTP/1.1\r\nHost: relay.test\r\n\r\n", 404, id="other-path"),
    ],
)
def test_garbage_requests_on_the_tunnel_endpoint(
    world: World, home_session: str, request_bytes: bytes, status: int | None
) -> None:
    sock = relay_endpoint(world, source="127.0.0.40")
    try:
        sock.sendall(request_bytes)
    except (ConnectionError, ssl.SSLError):
        pass  # refused while we still wrote
    how, seconds, answer = ended(sock, timeout=5 * HELLO_TIMEOUT)
    assert how in ("eof", "reset") and seconds <= 2 * HELLO_TIMEOUT, (how, seconds)
    if status is None:
        assert answer == b""
    else:
        assert split_response(answer)[0] == status


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        pytest.param([], 400, id="no-upgrade-headers"),
        pytest.param([("Sec-WebSocket-Version", "8")], 426, id="websocket-version-8"),
    ],
)
def test_bad_upgrade_headers_with_a_valid_token(
    world: World, home_session: str, token: str, extra: list[tuple[str, str]], status: int
) -> None:
    if not extra:
        sock = relay_endpoint(world, source="127.0.0.41")
        lines = ["GET /v1/tunnel HTTP/1.1", "Host: relay.test"]
        lines += [f"{k}: {v}" for k, v in tunnel_headers(token, (ROGUE_HOST,))]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        how, _, answer = ended(sock)
        got = split_response(answer)[0]
    else:
        up = tunnel_upgrade(
            world, tunnel_headers(token, (ROGUE_HOST,)) + extra, raw=False, source="127.0.0.41"
        )
        got = up.status
        how, _, _ = ended(up.sock)
    assert got == status and how in ("eof", "reset")
    assert ROGUE_HOST not in relay_status(world)["hostnames"]


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client WebSocket frame (RFC 6455)."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


HELLO = encode(Hello("0.1.0", (ROGUE_HOST,), 262144, 100))


@pytest.mark.parametrize(
    ("raw", "after", "why"),
    [
        pytest.param(True, b"\xff" + bytes(200), "unknown frame type 0xff", id="raw-garbage"),
        pytest.param(
            True, encode(Ping(bytes(8))), "received PING, expected HELLO", id="raw-no-hello"
        ),
        pytest.param(False, b"\xff" * 2000, "failed its handshake", id="ws-reserved-bits"),
        pytest.param(False, _ws_frame(0x1, b"hi"), "text WebSocket message", id="ws-text"),
        pytest.param(
            False,
            _ws_frame(0x2, HELLO) + _ws_frame(0x2, b"\xee" * 20),
            "unknown frame type 0xee",
            id="ws-hello-garbage",
        ),
        pytest.param(True, b"", "failed its handshake", id="raw-silence"),
    ],
)
def test_valid_upgrade_then_garbage_closes_the_connection(
    world: World, home_session: str, token: str, raw: bool, after: bytes, why: str
) -> None:
    mark = log_mark(world)
    up = tunnel_upgrade(world, tunnel_headers(token, (ROGUE_HOST,)), raw=raw, source="127.0.0.42")
    assert up.status == 101
    if after:
        up.sock.sendall(after)
    how, seconds, _ = ended(up.sock, timeout=5 * HELLO_TIMEOUT)
    assert how in ("eof", "reset") and seconds <= 2 * HELLO_TIMEOUT, (how, seconds)
    wait_log(world, mark, why)
    wait_for(lambda: ROGUE_HOST not in relay_status(world)["hostnames"], timeout=10)


# --- a rogue session: valid token, real handshake, then broken rules -----------------------------


def test_frames_sent_with_the_hello_are_handled_at_once(
    world: World, home_session: str, token: str
) -> None:
    up = tunnel_upgrade(world, tunnel_headers(token, (ROGUE_HOST,)), source="127.0.0.43")
    assert up.status == 101
    session = RawSession(up.sock, None, FrameDecoder())
    session.send(Hello("0.1.0", (ROGUE_HOST,), 262144, 100), Ping(b"pingpong"))
    try:
        assert isinstance(session.next_event(), Welcome)
        assert session.next_event(timeout=2) == Pong(b"pingpong")
    finally:
        session.close()


def test_welcome_states_the_documented_limits(world: World, home_session: str, token: str) -> None:
    session = rogue(world, token, "127.0.0.50")
    try:
        assert isinstance(session.welcome, Welcome)
        assert session.welcome.hostnames == (ROGUE_HOST,)
        assert session.welcome.window == 262144  # [relay] stream_window default
        assert session.welcome.ping_interval == PING_INTERVAL
        assert ROGUE_HOST in relay_status(world)["hostnames"]
    finally:
        session.close()


def test_frames_for_streams_it_does_not_own(world: World, home_session: str, token: str) -> None:
    # A download holds a live stream on the daemon's session while the rogue names stream
    # ids on its own: ids belong to a session, so nothing reaches the download.
    n = 8 * 1024 * 1024
    with world.connect(source="127.0.0.51", timeout=30) as conn:
        conn.sendall(
            f"GET /bytes?n={n}&seed=5 HTTP/1.1\r\nHost: {HOME_HOST}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = conn.recv(65536)
        for index, frame in enumerate([Data(1, b"x"), Window(2, 1), Eof(3), Reset(7)]):
            mark = log_mark(world)
            session = rogue(world, token, f"127.0.0.{52 + index}")
            session.send(frame)
            events = session.wait_closed()
            assert_rogue_gone(world, session, events)
            wait_log(world, mark, "never opened")
        received += b"".join(iter_recv(conn))
    status, _, body = split_response(received)
    assert status == 200 and hashlib.sha256(body).hexdigest() == pattern_sha256(n, 5)


def test_oversize_frame_header_closes_at_once(world: World, home_session: str, token: str) -> None:
    mark = log_mark(world)
    session = rogue(world, token, "127.0.0.56")
    start = time.monotonic()
    # Only the header: the relay must not wait for (or buffer) a payload over its limit.
    session.send_raw(struct.pack("!BBII", 0x04, 0, 1, MAX_FRAME_SIZE + 1))
    events = session.wait_closed()
    assert time.monotonic() - start < 5
    assert_rogue_gone(world, session, events)
    wait_log(world, mark, f"exceeds {MAX_FRAME_SIZE}")


@pytest.mark.parametrize("attack", ["window-overflow", "data-beyond-window", "data-after-eof"])
def test_flow_violations_close_the_session_and_reset_its_clients(
    world: World, home_session: str, token: str, attack: str
) -> None:
    mark = log_mark(world)
    session = rogue(world, token, "127.0.0.57")
    client, sid = client_of(world, session, "127.0.0.58")
    if attack == "window-overflow":
        session.send(Window(sid, MAX_WINDOW))  # credit 262144 + 2^31-1 > 2^31-1
        why = f"raises its credit over {MAX_WINDOW}"
    elif attack == "data-beyond-window":
        session.send(Data(sid, bytes(session.welcome.window + 1)))
        why = "exceeds the window"
    else:
        session.send(Eof(sid), Data(sid, b"more"))
        why = "after its EOF"
    events = session.wait_closed()
    assert_rogue_gone(world, session, events)
    wait_log(world, mark, why)
    how, _, _ = ended(client)
    if attack != "data-after-eof":  # (there the rogue's EOF legitimately ended one direction)
        # The client whose stream rode on the dead session sees an abort, never a clean end.
        assert how == "reset", how


def test_open_flood_from_the_home_side_closes_the_session(
    world: World, home_session: str, token: str
) -> None:
    mark = log_mark(world)
    session = rogue(world, token, "127.0.0.59")
    flood = b"".join(encode(Open(i, "192.0.2.1", 1, ROGUE_HOST)) for i in range(1, 10_001))
    try:
        session.send_raw(flood)
    except (ConnectionError, ssl.SSLError):
        pass  # closed after the first one, while the rest was still being written
    events = session.wait_closed()
    assert_rogue_gone(world, session, events)
    wait_log(world, mark, "the home may not send OPEN")


def test_clients_beyond_the_homes_max_streams_are_refused(
    world: World, home_session: str, token: str
) -> None:
    # The home's HELLO max_streams is a hard limit for the relay (PROTOCOL.md 4).
    session = rogue(world, token, "127.0.0.60", max_streams=2)
    try:
        before = refused(world, "session_limit")
        kept = [client_of(world, session, "127.0.0.61") for _ in range(2)]
        extra = []
        for _ in range(4):
            sock = public(world, "127.0.0.62")
            sock.sendall(client_hello(ROGUE_HOST))
            extra.append(sock)
        for sock in extra:
            how, _, _ = ended(sock)
            assert how == "reset", how
        assert refused(world, "session_limit") == before + 4
        # Ending one stream frees its slot for the next client; frames still in flight for
        # it afterwards are ignored, not a violation (PROTOCOL.md 4).
        gone = kept[0][1]
        session.send(Reset(gone), Data(gone, b"late"), Window(gone, 1), Eof(gone))
        assert ended(kept[0][0])[0] == "reset"
        _, sid = client_of(world, session, "127.0.0.63")
        assert sid > kept[1][1]  # ids keep growing, gaps allowed
        assert ROGUE_HOST in relay_status(world)["hostnames"]  # it broke no rule
    finally:
        session.close()


def test_relay_caps_streams_per_session_at_its_own_limit(
    world: World, home_session: str, token: str
) -> None:
    session = rogue(world, token, "127.0.0.64", max_streams=1000)
    clients: list[socket.socket] = []
    try:
        for _ in range(RELAY_STREAM_LIMIT):
            clients.append(client_of(world, session, "127.0.0.65")[0])
        before = relay_status(world)["connections"]
        sock = public(world, "127.0.0.66")
        clients.append(sock)
        sock.sendall(client_hello(ROGUE_HOST))

        def decided() -> dict[str, Any] | None:
            now = relay_status(world)["connections"]
            limit = now["refused"].get("session_limit", 0)
            old = before["refused"].get("session_limit", 0)
            return now if now["routed"] + limit > before["routed"] + old else None

        now = wait_for(decided, timeout=10, what="the relay to route or refuse the client")
        assert now["routed"] == before["routed"], "routed past max_streams_per_session"
        assert ended(sock, timeout=5)[0] == "reset"
    finally:
        session.close()
        for sock in clients:
            sock.close()


def test_ping_flood_ends_only_that_session(world: World, home_session: str, token: str) -> None:
    mark = log_mark(world)
    session = rogue(world, token, "127.0.0.67")
    # 1,000 PINGs (17 KB) arrive in one read: the relay has read everything when it
    # closes, so its close is a FIN that leaves the GOAWAY readable (unread input
    # would make the kernel send RST, and the client could lose the GOAWAY).
    n = 1_000
    session.send_raw(b"".join(encode(Ping(struct.pack("!Q", i))) for i in range(n)))
    events = session.wait_closed()
    pongs = [e for e in events if isinstance(e, Pong)]
    # The allowed burst is answered, in order; then GOAWAY PROTOCOL_ERROR and close.
    assert 0 < len(pongs) < n
    assert pongs == [Pong(struct.pack("!Q", i)) for i in range(len(pongs))]
    assert [getattr(e, "code", None) for e in events[len(pongs) :]] == [1], events[-3:]
    assert_rogue_gone(world, session, events)
    wait_log(world, mark, "closed: protocol error: PING flood")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_ping_flood_without_reading_is_bounded(world: World, home_session: str, token: str) -> None:
    """A session that floods PINGs and never reads its PONGs is cut off, and the relay's
    memory stays flat. Unbounded, 64 MiB of PINGs would queue 64 MiB of PONGs (and about
    4x that in Python objects)."""
    session = rogue(world, token, "127.0.0.68")
    pid = world.relay.popen.pid
    before = _rss_mib(pid)
    burst = b"".join(encode(Ping(struct.pack("!Q", i))) for i in range(10_000))
    sent = 0
    session.sock.settimeout(2)
    try:
        while sent < 64 * 1024 * 1024:
            session.send_raw(burst)  # fails once the relay has closed the connection
            sent += len(burst)
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    grown = _rss_mib(pid) - before
    assert sent < 64 * 1024 * 1024, "the relay read every PING of a peer that never reads"
    assert grown < 16, f"relay grew {grown:.0f} MiB for {sent / 2**20:.0f} MiB of unread PINGs"
    wait_for(
        lambda: ROGUE_HOST not in relay_status(world)["hostnames"],
        timeout=10,
        what="the flooding session to be closed",
    )
    session.close()


def test_protocol_violation_is_answered_with_goaway_and_logged_as_such(
    world: World, home_session: str, token: str
) -> None:
    mark = log_mark(world)
    session = rogue(world, token, "127.0.0.69")
    session.send(Data(9, b"x"))
    events = session.wait_closed()
    codes = [getattr(e, "code", None) for e in events]
    assert codes == [1], events  # GOAWAY PROTOCOL_ERROR
    wait_log(world, mark, "closed: protocol error: DATA for stream 9, never opened")
    wait_log(world, mark, "ended (protocol error")
    assert "ERROR" not in relay_log_since(world, mark)
