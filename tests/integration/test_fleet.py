"""`[fleet]`: relays sharing a registry on a real redis-server (README "Fleet").

Two relays, relay-a and relay-b, each in its own World (own certificate, own
port), verify the same token key and share one redis-server on a free loopback
port. Sessions are real handshakes driven from the test (RawSession), or a
real `tunneld run` where clients must get through.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.harness import (
    HOME_HOST,
    RawSession,
    World,
    client_hello,
    iter_recv,
    open_raw_session,
    split_response,
    tunnel_headers,
    tunnel_upgrade,
    tunneld,
    wait_for,
)
from tests.redisserver import RedisServer, free_port
from tunneld.tokens import decode_claims_unverified
from tunneld.wire.events import GoAway, ResetCode
from tunneld.wire.fleetforward import seal
from tunneld.wire.proxyheader import encode_v2

pytestmark = pytest.mark.integration

LEASE = 3.0  # [fleet] lease_ttl in these tests, seconds
CALM = {"ping_interval": "5s"}  # raw sessions send no PONGs: 15 s before liveness ends them


SECRET = "5f" * 32


def fleet_world(root: Path, node: str, redis_url: str, keys_from: World | None = None) -> World:
    w = World(root / node)
    if keys_from is not None:  # one token key for the fleet
        for name in ("token.key", "token.pub"):
            shutil.copy(keys_from.root / name, w.root / name)
    w.relay_overrides = dict(CALM)
    secret = w.root / "fleet.key"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    forward = f"127.0.0.1:{free_port()}"
    w.relay_tables = {
        "fleet": {
            "redis_url": redis_url,
            "node_id": node,
            "lease_ttl": f"{LEASE:g}s",
            "advertise": forward,
            "forward_listen": forward,
            "secret_file": "fleet.key",
        }
    }
    return w


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[World, World]]:
    a = fleet_world(tmp_path, "relay-a", redis_server.url)
    b = fleet_world(tmp_path, "relay-b", redis_server.url, keys_from=a)
    try:
        a.start_relay()
        b.start_relay()
        yield a, b
    finally:
        b.stop_all()
        a.stop_all()


def store(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=3)


def holder(server: RedisServer, hostname: str = HOME_HOST) -> str | None:
    """The node holding `hostname` in the registry, or None."""
    value = store(server).get(f"tunneld:host:{hostname}")
    return value.split(" ")[0] if isinstance(value, str) else None


def fleet_status(world: World) -> dict[str, Any]:
    status = world.status(world.relay_config, world.relay)
    assert status is not None and status["fleet"] is not None
    return dict(status["fleet"])


def session(world: World, token: str) -> RawSession:
    return open_raw_session(world, token, (HOME_HOST,))


def test_claims_are_leased_and_the_newest_session_wins_across_relays(
    fleet: tuple[World, World], redis_server: RedisServer
) -> None:
    a, b = fleet
    token = a.issue_token()
    first = session(a, token)
    wait_for(lambda: holder(redis_server) == "relay-a", what="relay-a's claim")
    assert store(redis_server).pttl(f"tunneld:host:{HOME_HOST}") <= LEASE * 1000
    assert fleet_status(a)["claims"] == [HOME_HOST]

    second = session(b, token)  # the same home, reconnected through relay-b
    wait_for(lambda: holder(redis_server) == "relay-b", what="relay-b's claim")
    event = first.next_event(timeout=LEASE + 5)
    assert isinstance(event, GoAway) and event.code == ResetCode.REPLACED
    wait_for(lambda: fleet_status(a)["claims"] == [], what="relay-a letting go")
    assert "replaced by another session (session" in a.relay.log()
    assert "on relay-b) for home.test" in a.relay.log()
    # relay-b's renewals keep its claim past several leases; relay-a never takes it back.
    wait_for(lambda: fleet_status(b)["connected"], what="relay-b connected")
    first.close()
    until = time.monotonic() + 2 * LEASE
    while time.monotonic() < until:
        assert holder(redis_server) == "relay-b"
        time.sleep(0.2)
    second.close()
    # A session that ends lets go of its claim at once.
    wait_for(lambda: holder(redis_server) is None, timeout=LEASE, what="the release")


def test_a_relay_killed_with_9_loses_its_claims_within_lease_ttl(
    fleet: tuple[World, World], redis_server: RedisServer
) -> None:
    a, b = fleet
    s = session(b, a.issue_token())
    wait_for(lambda: holder(redis_server) == "relay-b", what="relay-b's claim")
    b.relay.stop(signal.SIGKILL)
    s.close()
    # No release from a dead relay: the lease ends by itself.
    wait_for(lambda: holder(redis_server) is None, timeout=LEASE + 2, what="the lease to end")
    assert store(redis_server).get("tunneld:node:relay-b") is None
    assert store(redis_server).get("tunneld:node:relay-a") is not None


def test_redis_away_and_back_loses_no_session_and_repairs_the_registry(
    fleet: tuple[World, World], redis_server: RedisServer
) -> None:
    a, _ = fleet
    a.start_app()
    a.start_home(token=a.issue_token())
    wait_for(lambda: holder(redis_server) == "relay-a", what="relay-a's claim")

    redis_server.stop()
    wait_for(lambda: not fleet_status(a)["connected"], timeout=LEASE + 5, what="the outage seen")
    # Serving goes on: the session is kept and clients get through.
    assert split_response(a.http_get("/small"))[0] == 200
    assert a.home_status()["state"] == "connected"

    redis_server.start()  # the same port, empty (no persistence): everything is gone
    wait_for(lambda: holder(redis_server) == "relay-a", timeout=LEASE + 5, what="the repair")
    status = fleet_status(a)
    assert status["connected"] and status["repairs"] == 1 and status["claims"] == [HOME_HOST]
    assert "registry repaired" in a.relay.log()
    assert split_response(a.http_get("/small"))[0] == 200
    sessions = a.status(a.relay_config, a.relay)["sessions"]  # type: ignore[index]
    assert len(sessions) == 1 and not sessions[0]["going_away"]


def test_a_token_revoked_on_one_relay_is_refused_and_closed_on_every_relay(
    fleet: tuple[World, World], redis_server: RedisServer
) -> None:
    a, b = fleet
    token = a.issue_token()
    on_b = session(b, token)
    wait_for(lambda: holder(redis_server) == "relay-b", what="relay-b's claim")
    revoked = decode_claims_unverified(token).token_id
    a.write_relay_config(port=a.relay_port, revoked_tokens=[revoked])
    a.relay.popen.send_signal(signal.SIGHUP)
    # relay-b closes the session it holds, and refuses the token from then on.
    on_b.wait_closed(timeout=LEASE + 10)
    wait_for(lambda: fleet_status(b)["revoked"] >= 1, what="relay-b reading the revocation")
    assert f"its token {revoked} is revoked in the fleet" in b.relay.log()
    again = tunnel_upgrade(b, tunnel_headers(token, (HOME_HOST,)))
    assert (again.status, again.reason()) == (401, "revoked")


def get_through(relay: World, home: World, source: str) -> tuple[int, dict[str, str], bytes]:
    """GET /headers for the home of `home`, through the public port of `relay`."""
    raw = socket.create_connection(
        ("127.0.0.1", relay.relay_port), timeout=10, source_address=(source, 0)
    )
    with home.client_context().wrap_socket(
        raw, server_hostname=HOME_HOST, suppress_ragged_eofs=False
    ) as conn:
        conn.sendall(
            f"GET /headers HTTP/1.1\r\nHost: {HOME_HOST}\r\nConnection: close\r\n\r\n".encode()
        )
        return split_response(b"".join(iter_recv(conn)))


def test_a_client_of_relay_a_reaches_the_home_on_relay_b_with_its_own_address(
    fleet: tuple[World, World], redis_server: RedisServer
) -> None:
    a, b = fleet
    b.start_app()
    b.start_home(token=a.issue_token())
    wait_for(lambda: holder(redis_server) == "relay-b", what="relay-b's claim")
    for relay, source in ((a, "127.0.0.4"), (b, "127.0.0.5"), (a, "127.0.0.6")):
        status, _, body = get_through(relay, b, source)
        assert status == 200
        headers = dict(json.loads(body)["headers"])
        assert headers["X-Forwarded-For"] == source  # the client, not relay-a
    assert fleet_status(a)["forwarded"] == 2
    assert fleet_status(b)["forwarded"] == 0
    assert "forwarding 127.0.0.4 for home.test to relay-b" in a.relay.log()
    # relay-b's home saw three streams, all from their true clients.
    assert b.home_status()["streams"]["total"] >= 3

    # A ban made at the home stops its client at relay-a too, before anything is forwarded.
    banned = "127.0.0.7"
    added = tunneld("bans", "add", banned, "--duration", "1h", "-c", str(b.home_config))
    assert added.returncode == 0, added.stderr

    def refused_at_a() -> bool:
        try:
            get_through(a, b, banned)
        except (ssl.SSLError, OSError):
            return True
        return False

    def refusals() -> int:
        status = a.status(a.relay_config, a.relay)
        assert status is not None
        return int(status["connections"]["refused"].get("banned", 0))

    wait_for(refused_at_a, what="the ban at relay-a")
    before, streams = refusals(), b.home_status()["streams"]["total"]
    assert refused_at_a()
    assert refusals() == before + 1
    assert b.home_status()["streams"]["total"] == streams  # the home never saw it
    assert get_through(a, b, "127.0.0.4")[0] == 200


def test_the_forward_port_takes_only_authenticated_fresh_headers(
    fleet: tuple[World, World], redis_server: RedisServer
) -> None:
    _, b = fleet
    host, port = b.relay_tables["fleet"]["forward_listen"].rsplit(":", 1)
    now = int(time.time() * 1000)
    client = ("203.0.113.9", 1234)
    good = seal(bytes.fromhex(SECRET), "relay-a", now, bytes(16), client, (host, 1), HOME_HOST)
    forged = seal(b"x" * 32, "relay-a", now, bytes(range(16)), client, (host, 1), HOME_HOST)
    stale = seal(bytes.fromhex(SECRET), "relay-a", now - 120_000, b"s" * 16, client, (host, 1), "h")
    plain = encode_v2(client, (host, 1))

    def answer(header: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(header + client_hello(HOME_HOST))
            try:
                return b"".join(iter_recv(conn))
            except ConnectionResetError:
                return b"reset"

    assert answer(good) != b"reset"  # authenticated: routed (no session: an alert)
    for header in (good, forged, stale, plain, b"GET / HTTP/1.1\r\n\r\n"):
        assert answer(header) in (b"reset", b"")
    status = b.status(b.relay_config, b.relay)
    assert status is not None
    assert status["connections"]["refused"]["forward_auth"] == 5
    log = b.relay.log()
    for why in ("nonce seen before", "bad MAC", "from this relay's clock", "no fleet TLV"):
        assert why in log


def test_a_bad_fleet_secret_stops_the_relay_with_a_clear_error(tmp_path: Path) -> None:
    w = fleet_world(tmp_path, "relay-x", "redis://127.0.0.1:1/0")
    (w.root / "fleet.key").write_text("not-hex-but-a-secret\n")
    w.write_relay_config()
    result = subprocess.run(
        [sys.executable, "-m", "tunneld", "relay", "-c", str(w.relay_config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "[fleet] secret_file: expected at least 64 hex digits" in result.stderr
    assert "not-hex-but-a-secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
