"""ACME end to end: Pebble issues the home certificate through the real tunnel.

Pebble validates TLS-ALPN-01 by connecting to its `tlsPort`, here the relay's port,
for names that `pebble-challtestsrv` (its DNS) resolves to 127.0.0.1: the relay
routes the validation by SNI to the daemon, which answers with the challenge
certificate. Pebble's ports are fixed in its config, so the relay starts first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
from tunneld.demoapp import pattern
from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)

pytestmark = [
    pytest.mark.integration,
    # CI installs pebble (scripts/test.sh): there a missing binary is a failure.
    pytest.mark.skipif(
        (shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None)
        and not os.environ.get("CI"),
        reason="needs Debian's pebble package (apt-get install pebble)",
    ),
]

EXTRA_HOST = "extra.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pebble:
    """Pebble + pebble-challtestsrv on loopback, for one world."""

    world: World
    http_port: int = 0  # where Pebble validates http-01 (0: a free port nobody uses)

    def start(self) -> None:
        root = self.world.root / "pebble"
        root.mkdir()
        # Pebble's own HTTPS (directory and management API) gets a certificate from
        # a CA of ours: that CA is the daemon's `[acme] ca_file`.
        ca_key, ca_pem = make_ca("pebble front-end test CA")
        self.ca_file = root / "ca.pem"
        write_certificate(ca_pem, self.ca_file)
        key = generate_private_key()
        write_private_key(key, root / "key.pem")
        write_certificate(
            issue_certificate(ca_key, ca_pem, key, ["localhost", "127.0.0.1"]), root / "cert.pem"
        )
        self.port, self.mgmt_port = free_port(), free_port()
        self.dns_port, self.chall_port = free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                "certificate": str(root / "cert.pem"),
                "privateKey": str(root / "key.pem"),
                "httpPort": self.http_port or free_port(),
                "tlsPort": self.world.relay_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (root / "pebble.json").write_text(json.dumps(config))
        self.world.spawn(
            "challtestsrv",
            [
                "pebble-challtestsrv",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                f"127.0.0.1:{self.dns_port}",
                "-management",
                f"127.0.0.1:{self.chall_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ],
        )
        self.world.spawn(
            "pebble",
            [
                "pebble",
                "-config",
                str(root / "pebble.json"),
                "-dnsserver",
                f"127.0.0.1:{self.dns_port}",
            ],
            # No validation delay, no bad-nonce games, and every order validated afresh.
            env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"},
        )
        wait_for(self._answers, what="pebble directory")

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
            data: bytes = response.read()
            return data

    def _answers(self) -> bool:
        try:
            self._get(self.directory)
        except OSError:
            return False
        return True

    def root_file(self) -> Path:
        """Pebble's issuing root (random per run), fetched from its management API."""
        path = self.world.root / "pebble" / "root.pem"
        path.write_bytes(self._get(f"https://127.0.0.1:{self.mgmt_port}/roots/0"))
        return path

    def set_default_ipv4(self, ip: str) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.chall_port}/set-default-ipv4",
            data=json.dumps({"ip": ip}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200


@pytest.fixture
def acme_world(tmp_path: Path) -> Iterator[tuple[World, Pebble]]:
    world = World(tmp_path / "w")
    try:
        world.start_app()
        world.start_relay()
        pebble = Pebble(world)
        pebble.start()
        yield world, pebble
    finally:
        # Graceful shutdown is tested elsewhere; here it would only add seconds.
        for proc in world.procs:
            if proc.name == "home":
                proc.stop(signal.SIGKILL)
        world.stop_all()


def acme_section(pebble: Pebble, **overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "agree_tos": True,
        "directory": pebble.directory,
        "ca_file": str(pebble.ca_file),
        "email": "admin@home.test",
        "retry_initial": "1s",
        "retry_max": "2s",
        "check_interval": "1h",
        "jitter": "0s",
        **overrides,
    }


def certificate(world: World) -> dict[str, Any]:
    cert = world.home_status()["certificate"]
    assert isinstance(cert, dict)
    return cert


def wait_issued(world: World, not_sha: str | None = None, timeout: float = 30) -> dict[str, Any]:
    """The status certificate once it is ACME-issued (and not `not_sha`)."""

    def issued() -> dict[str, Any] | None:
        cert = certificate(world)
        if cert["self_signed"] or cert["sha256"] == not_sha:
            return None
        return cert

    result: dict[str, Any] = wait_for(issued, timeout=timeout, interval=0.2, what="certificate")
    return result


def verified_connection(world: World, cafile: Path, sni: str = HOME_HOST) -> ssl.SSLSocket:
    """A TLS connection through the relay that verifies the chain against `cafile`."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", world.relay_port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname=sni)


def peer_sha256(conn: ssl.SSLSocket) -> str:
    der = conn.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def get(conn: ssl.SSLSocket, path: str, host: str = HOME_HOST) -> tuple[int, bytes]:
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    status, _, body = split_response(b"".join(iter_recv(conn)))
    return status, body


def test_certificate_issued_through_the_tunnel(acme_world: tuple[World, Pebble]) -> None:
    world, pebble = acme_world
    world.start_home(acme=acme_section(pebble))
    cert = wait_issued(world)
    assert cert["sans"] == [HOME_HOST]
    assert "Pebble" in cert["issuer"]
    assert world.home_status()["warnings"] == []

    # Clients that trust only Pebble's root verify the chain and see that certificate.
    root = pebble.root_file()
    with verified_connection(world, root) as conn:
        assert peer_sha256(conn) == cert["sha256"]
        assert get(conn, "/small") == (200, b"hello tunnel\n")

    # `cert show` reads the same certificate from the state directory.
    shown = json.loads(tunneld("cert", "show", "-c", str(world.home_config), "--json").stdout)
    assert (shown["sha256"], shown["sans"]) == (cert["sha256"], [HOME_HOST])
    assert 1 < shown["days_left"] and not shown["self_signed"]
    human = tunneld("cert", "show", "-c", str(world.home_config)).stdout
    assert cert["sha256"][:2].upper() + ":" + cert["sha256"][2:4].upper() in human

    state = world.root / "state"
    for secret in ("acme_account.key", "private_key.pem"):
        assert stat.S_IMODE((state / secret).stat().st_mode) == 0o600
    account_key = (state / "acme_account.key").read_bytes()
    log = world.home.log()
    assert "PRIVATE KEY" not in log and "answering the ACME tls-alpn-01 challenge" in log

    # A hostname added to the config (and the token) gets a new certificate at the next
    # start, from the same account.
    world.home.stop()
    token = world.issue_token(HOME_HOST, EXTRA_HOST)
    world.start_home(
        token=token, tls={"hostnames": [HOME_HOST, EXTRA_HOST]}, acme=acme_section(pebble)
    )
    both = wait_issued(world, not_sha=cert["sha256"])
    assert sorted(both["sans"]) == [EXTRA_HOST, HOME_HOST]
    for name in (HOME_HOST, EXTRA_HOST):
        with verified_connection(world, root, sni=name) as conn:
            assert peer_sha256(conn) == both["sha256"]
    assert (state / "acme_account.key").read_bytes() == account_key


def test_renewal_swaps_the_certificate_under_a_running_download(
    acme_world: tuple[World, Pebble],
) -> None:
    world, pebble = acme_world
    # Pebble's certificates live five years: renew_before beyond that makes every
    # certificate due, so the daemon renews each check_interval.
    world.start_home(acme=acme_section(pebble, renew_before="3650d", check_interval="3s"))
    first = wait_issued(world)
    before = world.home_status()
    root = pebble.root_file()

    n = 16 * 1024 * 1024
    with verified_connection(world, root) as download:
        assert peer_sha256(download) == first["sha256"]
        download.sendall(
            f"GET /bytes?n={n}&seed=5 HTTP/1.1\r\nHost: {HOME_HOST}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = bytearray(download.recv(65536))
        # Stop reading: flow control holds the stream open while the renewal happens.
        second = wait_issued(world, not_sha=first["sha256"])
        with verified_connection(world, root) as fresh:
            seen = peer_sha256(fresh)
            assert get(fresh, "/small") == (200, b"hello tunnel\n")
        assert seen != first["sha256"]
        assert seen in {second["sha256"], certificate(world)["sha256"]}
        for chunk in iter_recv(download):
            received += chunk
    status, _, body = split_response(bytes(received))
    expected = hashlib.sha256()
    for piece in pattern(n, 5):
        expected.update(piece)
    assert status == 200 and len(body) == n
    assert hashlib.sha256(body).hexdigest() == expected.hexdigest()

    after = world.home_status()
    assert after["session_id"] == before["session_id"]
    assert after["reconnects"] == before["reconnects"]
    assert "renewing every check_interval" in world.home.log()


def test_failed_order_retries_and_recovers(acme_world: tuple[World, Pebble]) -> None:
    world, pebble = acme_world
    pebble.set_default_ipv4("")  # the CA cannot resolve the hostname: validation fails
    world.start_home(acme=acme_section(pebble))

    def failing() -> dict[str, Any] | None:
        status = world.home_status()
        renewal = status["certificate"]["renewal"]
        return status if renewal["failures"] >= 2 else None

    status = wait_for(failing, timeout=30, interval=0.2, what="two failed orders")
    assert status["state"] == "connected"
    assert status["certificate"]["self_signed"]
    assert HOME_HOST in status["certificate"]["renewal"]["last_error"]
    assert any("no ACME certificate yet" in w for w in status["warnings"])
    human = tunneld("status", "-c", str(world.home_config)).stdout
    assert "WARNING" in human and "renewal is failing" in human

    pebble.set_default_ipv4("127.0.0.1")
    cert = wait_issued(world)
    status = world.home_status()
    assert status["warnings"] == []
    assert status["certificate"]["renewal"]["failures"] == 0
    with verified_connection(world, pebble.root_file()) as conn:
        assert peer_sha256(conn) == cert["sha256"]
    assert "certificate order failed" in world.home.log()
