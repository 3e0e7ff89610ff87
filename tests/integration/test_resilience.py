"""Session lifecycle end to end: liveness, GOAWAY drains, replacement, shutdown."""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import threading
import time

import pytest

from tests.integration.harness import (
    HOME_HOST,
    World,
    iter_recv,
    split_response,
    wait_for,
)
from tunneld.demoapp import pattern_sha256

pytestmark = pytest.mark.integration


def test_stalled_link_is_detected_by_ping_and_recovers(world: World) -> None:
    world.start_app()
    world.start_relay()
    proxy = world.start_fault_proxy()
    world.start_home()
    first = world.home_status()["session_id"]
    proxy.popen.send_signal(signal.SIGUSR1)  # blackhole, nothing closed
    start = time.monotonic()
    wait_for(lambda: world.home_status()["state"] != "connected", timeout=15, what="dead link")
    # ping_interval 1s + ping_timeout 2s: well under the 60 s NAT bound.
    assert time.monotonic() - start < 8
    assert "ping" in (world.home_status()["last_error"] or "")
    proxy.popen.send_signal(signal.SIGUSR2)
    wait_for(lambda: world.home_status()["state"] == "connected", timeout=20, what="reconnect")
    assert world.home_status()["session_id"] != first
    assert split_response(world.http_get("/small"))[0] == 200


def test_cut_link_resets_open_streams_never_truncates(world: World) -> None:
    world.start_app()
    world.start_relay()
    proxy = world.start_fault_proxy()
    world.start_home()
    n = 512 * 1024 * 1024
    outcome: dict[str, object] = {}

    def download() -> None:
        got = 0
        try:
            with world.connect(timeout=30) as conn:
                conn.sendall(
                    f"GET /bytes?n={n} HTTP/1.1\r\nHost: {HOME_HOST}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                for chunk in iter_recv(conn):
                    got += len(chunk)
                    if got > 4 * 1024 * 1024:
                        outcome.setdefault("flowing", True)
            outcome["result"] = ("eof", got)
        except (OSError, ssl.SSLError) as exc:
            outcome["result"] = ("error", repr(exc))

    thread = threading.Thread(target=download)
    thread.start()
    wait_for(lambda: outcome.get("flowing"), timeout=30, what="download flowing")
    proxy.popen.send_signal(signal.SIGHUP)  # cut the tunnel with a reset
    thread.join(30)
    assert not thread.is_alive()
    kind, _ = outcome["result"]  # type: ignore[misc]
    assert kind == "error", f"a cut download must fail, got {outcome['result']}"
    wait_for(lambda: world.home_status()["state"] == "connected", timeout=20, what="reconnect")
    assert split_response(world.http_get("/small"))[0] == 200


def test_relay_restart_with_goaway_finishes_the_download(world: World) -> None:
    world.start_app()
    world.start_relay(drain_timeout="60s")
    world.start_home(relay={"drain_timeout": "60s"})
    port = world.relay_port
    first = world.home_status()["session_id"]
    n = 400 * 1024 * 1024
    outcome: dict[str, object] = {}

    def download() -> None:
        digest = hashlib.sha256()
        head = b""
        got = 0
        try:
            with world.connect(timeout=60) as conn:
                conn.sendall(
                    f"GET /bytes?n={n}&seed=5 HTTP/1.1\r\nHost: {HOME_HOST}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                in_head = True
                for chunk in iter_recv(conn):
                    if in_head:
                        head += chunk
                        if b"\r\n\r\n" not in head:
                            continue
                        in_head = False
                        head, _, chunk = head.partition(b"\r\n\r\n")
                    digest.update(chunk)
                    got += len(chunk)
                    if got > 4 * 1024 * 1024:
                        outcome.setdefault("flowing", True)
            outcome["result"] = digest.hexdigest()
        except (OSError, ssl.SSLError) as exc:
            outcome["result"] = repr(exc)

    thread = threading.Thread(target=download)
    thread.start()
    wait_for(
        lambda: outcome.get("flowing") or outcome.get("result"), timeout=30, what="download flowing"
    )
    assert outcome.get("flowing"), outcome
    old = world.relay
    old.popen.send_signal(signal.SIGTERM)  # GOAWAY to the daemon, listener closed
    wait_for(lambda: "GOAWAY" in world.home.log(), timeout=10, what="GOAWAY at home")
    new = world.start_relay(port=port, drain_timeout="60s")
    # New connections go through the new relay's new session at once.
    wait_for(
        lambda: world.home_status()["session_id"] not in (None, first),
        timeout=20,
        what="new session",
    )
    assert split_response(world.http_get("/small"))[0] == 200
    thread.join(120)
    assert not thread.is_alive()
    # The download left through the draining session and finished intact.
    assert outcome["result"] == pattern_sha256(n, 5)
    assert old.popen.wait(30) == 0
    assert new.alive()


def test_newer_session_replaces_older_one(world: World) -> None:
    world.start_all()
    first_home = world.home
    # A second daemon with the same token and hostname (its own state and socket).
    second = World.__new__(World)
    second.__dict__.update(world.__dict__)
    second.procs = []
    second.home_config = world.root / "second.toml"
    second.home_overrides = {
        "daemon": {
            "state_directory": str(world.root / "state2"),
            "control_socket": str(world.root / "run" / "second.sock"),
        },
        "relay": {"backoff_initial": "5s", "backoff_max": "10s"},
        # The same certificate, as a copied installation would have.
        "tls": {
            "certificate": str(world.home_cert()),
            "private_key": str(world.root / "state" / "private_key.pem"),
        },
    }
    try:
        # Not waited for as "connected": the first daemon soon takes over again (its
        # backoff is short) and a status poll may well miss the second's moment.
        second.start_home(wait_connected=False)
        wait_for(
            lambda: "replaced by another session" in first_home.log(),
            timeout=15,
            what="first told it was replaced",
        )
        assert "replaced by another session" in world.relay.log()
        # New clients reach the newer session.
        assert split_response(world.http_get("/small"))[0] == 200
        relay_status = world.status(world.relay_config)
        assert relay_status is not None
        assert any(not s["going_away"] for s in relay_status["sessions"])
    finally:
        second.stop_all()


def test_plain_http_is_redirected_to_https(world: World) -> None:
    world.start_app()
    # Find a free port for the redirect listener (status lists only TLS ports).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    world.start_relay(http_listen=[f"127.0.0.1:{http_port}"])
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as conn:
        conn.sendall(b"GET /lovelace?x=1 HTTP/1.1\r\nHost: home.test\r\n\r\n")
        status, headers, _ = split_response(b"".join(iter_recv(conn)))
    assert status == 308
    assert headers["location"] == "https://home.test/lovelace?x=1"


def test_relay_listens_on_ipv4_and_ipv6(world: World) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    world.start_app()
    world.relay_overrides = {"listen": ["127.0.0.1:0", "[::1]:0"]}
    world.start_relay()
    world.start_home()
    status = world.status(world.relay_config)
    assert status is not None
    v6 = [a for a in status["listen"] if a.startswith("::1")]
    assert v6
    port = int(v6[0].rsplit(":", 1)[1])
    ctx = world.client_context()
    raw = socket.create_connection(("::1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=HOME_HOST) as conn:
        conn.sendall(b"GET /headers HTTP/1.1\r\nHost: home.test\r\nConnection: close\r\n\r\n")
        code, _, body = split_response(b"".join(iter_recv(conn)))
    assert code == 200 and b"/headers" in body


def test_daemon_and_relay_exit_cleanly_on_sigterm(world: World) -> None:
    world.start_all()
    assert world.home.stop(signal.SIGTERM) == 0
    wait_for(lambda: not world.status(world.relay_config)["sessions"], what="session gone")  # type: ignore[index]
    assert world.relay.stop(signal.SIGTERM) == 0
    assert "Traceback" not in world.home.log()
    assert "Traceback" not in world.relay.log()


def test_relay_refuses_non_tls_and_oversized_hello_without_harm(world: World) -> None:
    world.start_all()
    with socket.create_connection(("127.0.0.1", world.relay_port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: home.test\r\n\r\n")
        assert conn.recv(100) == b""
    with socket.create_connection(("127.0.0.1", world.relay_port), timeout=10) as conn:
        # A handshake record announcing far more than the ClientHello bound.
        conn.sendall(b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + b"\0" * 1000)
        try:
            assert conn.recv(100) == b""
        except ConnectionResetError:
            pass
    assert split_response(world.http_get("/small"))[0] == 200
