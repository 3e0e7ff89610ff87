"""The relay's own certificate from ACME (issue 20), against Pebble as the home's is.

TLS-ALPN-01: Pebble connects to the relay's own port for `relay.test` (its DNS,
pebble-challtestsrv, answers 127.0.0.1 for every name) with ALPN `acme-tls/1`; the
relay answers with the challenge certificate. HTTP-01: Pebble fetches
`/.well-known/acme-challenge/TOKEN` from the relay's `http_listen`. Renewal swaps the
context for new connections while a home session and a client connection stay up.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import RELAY_HOST, World, iter_recv, tunneld, wait_for
from tests.integration.test_acme import Pebble, free_port
from tests.integration.test_acme import pytestmark as acme_marks

pytestmark = acme_marks


@pytest.fixture
def pebble_world(tmp_path: Path) -> Iterator[tuple[World, Pebble]]:
    world = World(tmp_path / "w")
    world.relay_port = free_port()  # Pebble's tlsPort is fixed in its config
    pebble = Pebble(world, http_port=free_port())
    try:
        pebble.start()
        yield world, pebble
    finally:
        for proc in world.procs:
            if proc.name == "home":
                proc.stop(signal.SIGKILL)
        world.stop_all()


def relay_acme(world: World, pebble: Pebble, **overrides: Any) -> dict[str, Any]:
    return {
        # No files yet: the relay starts self-signed, then orders.
        "certificate": str(world.root / "relay-state" / "certificate.pem"),
        "private_key": str(world.root / "relay-state" / "private_key.pem"),
        "acme": {
            "enabled": True,
            "agree_tos": True,
            "directory": pebble.directory,
            "ca_file": str(pebble.ca_file),
            "email": "ops@relay.test",
            "retry_initial": "1s",
            "retry_max": "2s",
            "check_interval": "1h",
            "jitter": "0s",
            "state_directory": str(world.root / "relay-state"),
            **overrides,
        },
    }


def relay_certificate(world: World) -> dict[str, Any]:
    status = world.status(world.relay_config, world.relay)
    assert status is not None
    cert = status["certificate"]
    assert isinstance(cert, dict)
    return cert


def wait_pebble_issued(world: World, not_sha: str | None = None) -> dict[str, Any]:
    def issued() -> dict[str, Any] | None:
        cert = relay_certificate(world)
        if "Pebble" in cert["issuer"] and cert["sha256"] != not_sha:
            return cert
        return None

    result: dict[str, Any] = wait_for(issued, timeout=60, interval=0.2, what="relay certificate")
    return result


def verified_healthz(world: World, root: Path) -> tuple[str, bytes]:
    """GET /healthz on the relay's own name, verified against Pebble's root."""
    ctx = ssl.create_default_context(cafile=str(root))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", world.relay_port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=RELAY_HOST) as conn:
        der = conn.getpeercert(binary_form=True) or b""
        conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {RELAY_HOST}\r\n\r\n".encode())
        body = b"".join(iter_recv(conn))

    return hashlib.sha256(der).hexdigest(), body


def test_relay_certificate_by_tls_alpn_01_renewed_without_dropping_sessions(
    pebble_world: tuple[World, Pebble],
) -> None:
    world, pebble = pebble_world
    # renew_before beyond Pebble's certificate lifetime: every check renews (each 3 s).
    world.start_relay(
        world.relay_port, **relay_acme(world, pebble, renew_before="36500d", check_interval="3s")
    )
    first = wait_pebble_issued(world)
    assert first["sans"] == [RELAY_HOST]
    assert first["renewal"]["state"] in ("idle", "ordering")
    root = pebble.root_file()
    sha, body = verified_healthz(world, root)
    assert body.startswith(b"HTTP/1.1 200") and body.endswith(b"ok\n")
    # `cert show` reads the relay's file.
    shown = tunneld("cert", "show", "-c", str(world.relay_config), "--json", check=True)
    facts = json.loads(shown.stdout)
    assert "Pebble" in facts["issuer"] and facts["sans"] == [RELAY_HOST]
    assert facts["path"] == str(world.root / "relay-state" / "certificate.pem")

    # A home connects, trusting Pebble's root; a client connection stays open through
    # the swaps below.
    world.start_app()
    world.ca_file = root
    world.start_home()
    session = world.home_status()["session_id"]
    client = world.connect()
    request = b"GET / HTTP/1.1\r\nHost: home.test\r\n\r\n"
    client.sendall(request)
    assert client.recv(65536).startswith(b"HTTP/1.1 200")

    # Two renewals later: new connections see a new certificate; the session and the
    # open client connection are the same ones.
    second = wait_pebble_issued(world, not_sha=first["sha256"])
    third = wait_pebble_issued(world, not_sha=second["sha256"])
    sha3, _ = verified_healthz(world, root)
    assert sha3 != sha
    assert sha3 in (third["sha256"], relay_certificate(world)["sha256"])
    client.sendall(request)
    assert client.recv(65536).startswith(b"HTTP/1.1 200")
    client.close()
    status = world.home_status()
    assert status["state"] == "connected" and status["session_id"] == session
    assert "Traceback" not in world.relay.log()


def test_relay_certificate_by_http_01_on_http_listen(pebble_world: tuple[World, Pebble]) -> None:
    world, pebble = pebble_world
    world.start_relay(
        world.relay_port,
        http_listen=[f"127.0.0.1:{pebble.http_port}"],
        **relay_acme(world, pebble, challenge="http-01"),
    )
    cert = wait_pebble_issued(world)
    assert cert["sans"] == [RELAY_HOST]
    _, body = verified_healthz(world, pebble.root_file())
    assert body.startswith(b"HTTP/1.1 200")
    assert "answering the ACME http-01 challenge" in world.relay.log()
    # A changed [relay.acme] key needs a restart: SIGHUP says so and keeps the running one.
    world.write_relay_config(
        world.relay_port,
        http_listen=[f"127.0.0.1:{pebble.http_port}"],
        **relay_acme(world, pebble, challenge="http-01", email="other@relay.test"),
    )
    world.relay.popen.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            "[relay.acme] email"
            in (world.status(world.relay_config, world.relay) or {})["config"]["needs_restart"]
        ),
        what="reload naming [relay.acme] email",
    )
    # Other plain-HTTP requests still get the redirect.
    with socket.create_connection(("127.0.0.1", pebble.http_port), timeout=10) as conn:
        conn.sendall(b"GET /x HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        assert b"".join(iter_recv(conn)).startswith(b"HTTP/1.1 308")


def test_relay_acme_config_errors_are_one_line(tmp_path: Path) -> None:
    world = World(tmp_path / "w")
    world.write_relay_config(acme={"enabled": True, "challenge": "http-01"})
    result = tunneld("check-config", "-c", str(world.relay_config))
    assert result.returncode == 2 and "[relay.acme] challenge" in result.stderr, result.stderr
    assert "http_listen" in result.stderr
    world.write_relay_config(acme={"enabled": True, "bogus": 1})
    result = tunneld("check-config", "-c", str(world.relay_config))
    assert result.returncode == 2 and "[relay.acme] bogus" in result.stderr


def test_relay_doctor_follows_relay_acme(pebble_world: tuple[World, Pebble]) -> None:
    from tests.integration.test_doctor import doctor

    world, pebble = pebble_world
    here = f"{RELAY_HOST}:127.0.0.1"
    # Terms not agreed: the relay serves its self-signed certificate, and doctor says why.
    world.start_relay(world.relay_port, **relay_acme(world, pebble, agree_tos=False))
    r = doctor(world.relay_config, here)
    assert r.level("certificate") == "warn" and "self-signed" in r.line("certificate")[1], r.out
    assert "agree_tos = true" in r.line("certificate")[2]
    assert r.level("public") == "FAIL"  # nobody trusts it
    world.relay.stop()
    # Agreed: issued, and every check passes for a home trusting Pebble's root.
    world.start_relay(world.relay_port, **relay_acme(world, pebble))
    wait_pebble_issued(world)
    r = doctor(world.relay_config, here, env={"SSL_CERT_FILE": str(pebble.root_file())})
    assert r.code == 0, r.out
