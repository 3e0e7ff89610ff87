"""`[relay] proxy_protocol`: a load balancer's PROXY header names the client, end to end.

Real relay, daemon and demo app. The "load balancer" is this test: it connects
from 127.0.0.2 (trusted) or 127.0.0.3 (not), writes a PROXY v1/v2 header naming
a documentation address, then speaks TLS to the home through the same socket.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.harness import (
    HOME_HOST,
    World,
    iter_recv,
    split_response,
    tunneld,
    wait_for,
)
from tunneld.wire.proxyheader import encode_v1, encode_v2

pytestmark = pytest.mark.integration

BALANCER, STRANGER = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("proxyproto") / "w")
    w.relay_overrides = {"proxy_protocol": [f"{BALANCER}/32"]}
    try:
        w.start_app()
        w.start_relay()
        w.start_home()
        yield w
    finally:
        w.stop_all()


def through_balancer(
    world: World, header: bytes, source: str = BALANCER, path: str = "/headers"
) -> bytes:
    """One GET through the relay from `source`, `header` first; the raw response."""
    raw = socket.create_connection(
        ("127.0.0.1", world.relay_port), timeout=10, source_address=(source, 0)
    )
    raw.sendall(header)
    with world.client_context().wrap_socket(
        raw, server_hostname=HOME_HOST, suppress_ragged_eofs=False
    ) as conn:
        conn.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {HOME_HOST}\r\nConnection: close\r\n\r\n".encode()
        )
        return b"".join(iter_recv(conn))


def forwarded_for(response: bytes) -> str:
    status, _, body = split_response(response)
    assert status == 200, response[:200]
    headers = dict(json.loads(body)["headers"])
    return str(headers["X-Forwarded-For"])


def relay_status(world: World) -> dict[str, Any]:
    status = world.status(world.relay_config, world.relay)
    assert status is not None
    return status


def refusals(world: World, reason: str) -> int:
    return int(relay_status(world)["connections"]["refused"].get(reason, 0))


def refused(world: World, header: bytes, source: str) -> bool:
    try:
        through_balancer(world, header, source)
    except (ssl.SSLError, OSError):
        return True
    return False


def test_v2_from_the_trusted_balancer_names_the_client_the_app_sees(world: World) -> None:
    header = encode_v2(("203.0.113.7", 50123), ("127.0.0.1", world.relay_port))
    assert forwarded_for(through_balancer(world, header)) == "203.0.113.7"
    header = encode_v2(("2001:db8::7", 50123), ("::1", world.relay_port))
    assert forwarded_for(through_balancer(world, header)) == "2001:db8::7"


def test_v1_from_the_trusted_balancer_too(world: World) -> None:
    header = encode_v1(("198.51.100.4", 40000), ("127.0.0.1", world.relay_port))
    assert forwarded_for(through_balancer(world, header)) == "198.51.100.4"


def test_the_balancer_without_a_header_or_with_local_is_itself_the_client(world: World) -> None:
    assert forwarded_for(through_balancer(world, b"")) == BALANCER
    assert forwarded_for(through_balancer(world, encode_v2(None, None))) == BALANCER


def test_a_header_from_any_other_peer_is_refused(world: World) -> None:
    before = refusals(world, "proxy_untrusted")
    header = encode_v2(("203.0.113.8", 1), ("127.0.0.1", world.relay_port))
    assert refused(world, header, STRANGER)
    assert refused(world, encode_v1(("203.0.113.8", 1), ("127.0.0.1", 443)), STRANGER)
    assert refusals(world, "proxy_untrusted") == before + 2
    # The stranger without a header is an ordinary client.
    assert forwarded_for(through_balancer(world, b"", STRANGER)) == STRANGER
    assert "PROXY header from an untrusted peer" in world.relay.log()


def test_a_bad_header_from_the_balancer_is_refused(world: World) -> None:
    before = refusals(world, "proxy_header")
    assert refused(world, b"PROXY TCP4 203.0.113.300 127.0.0.1 1 443\r\n", BALANCER)
    assert refusals(world, "proxy_header") == before + 1
    assert "is not an IP address" in world.relay.log()


def test_bans_apply_to_the_address_the_header_names(world: World) -> None:
    banned, other = "203.0.113.66", "203.0.113.67"
    added = tunneld("bans", "add", banned, "--duration", "1h", "-c", str(world.home_config))
    assert added.returncode == 0, added.stderr
    wait_for(lambda: relay_status(world)["sessions"][0]["bans"] >= 1, what="the ban at the relay")
    before = refusals(world, "banned")
    port = world.relay_port
    assert refused(world, encode_v2((banned, 1), ("127.0.0.1", port)), BALANCER)
    assert refusals(world, "banned") == before + 1
    # The balancer itself, and other clients behind it, are not banned.
    assert forwarded_for(through_balancer(world, encode_v2((other, 1), ("127.0.0.1", port)))) == (
        other
    )
    assert forwarded_for(through_balancer(world, b"")) == BALANCER


def test_check_config_names_a_bad_network(world: World) -> None:
    text = world.relay_config.read_text().replace(f'"{BALANCER}/32"', '"10.0.0.1/8"')
    bad = world.root / "bad-relay.toml"
    bad.write_text(text)
    result = tunneld("check-config", "-c", str(bad))
    assert result.returncode == 2
    assert "[relay] proxy_protocol:" in result.stderr and "host bits set" in result.stderr
