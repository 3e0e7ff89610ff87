"""End to end: real relay + daemon + upstream processes, real TLS clients."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import threading
import time

import pytest

from tests.integration.harness import (
    HOME_HOST,
    RELAY_HOST,
    World,
    iter_recv,
    split_response,
    tunneld,
    wait_for,
)
from tunneld.demoapp import pattern

pytestmark = pytest.mark.integration


def _sha(n: int, seed: int = 0) -> str:
    h = hashlib.sha256()
    for chunk in pattern(n, seed):
        h.update(chunk)
    return h.hexdigest()


def test_request_reaches_upstream_through_the_tunnel(running: World) -> None:
    status, _, body = split_response(running.http_get("/small"))
    assert status == 200
    assert body == b"hello tunnel\n"
    st = running.home_status()
    assert st["state"] == "connected"
    assert st["hostnames"] == [HOME_HOST]
    assert st["streams"]["total"] >= 1
    assert st["bytes"]["in"] > 0 and st["bytes"]["out"] > 0


def test_client_sees_the_home_certificate_not_the_relays(running: World) -> None:
    with running.connect() as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    home_fp = running.home_status()["certificate"]["sha256"]
    assert hashlib.sha256(der).hexdigest() == home_fp
    # A client trusting only the relay's CA must refuse: the relay never terminates home TLS.
    ctx = ssl.create_default_context(cafile=str(running.ca_file))
    raw = socket.create_connection(("127.0.0.1", running.relay_port), timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(raw, server_hostname=HOME_HOST)
    raw.close()


def test_unknown_sni_gets_unrecognized_name_alert(running: World) -> None:
    with pytest.raises(ssl.SSLError) as info:
        running.connect(sni="nobody.test")
    assert "UNRECOGNIZED_NAME" in str(info.value).upper()
    # No SNI at all is treated like an unknown name.
    raw = socket.create_connection(("127.0.0.1", running.relay_port), timeout=10)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw)
    raw.close()
    # The tunnel itself is unaffected.
    assert split_response(running.http_get("/small"))[0] == 200


def test_relay_health_endpoint_on_its_own_hostname(running: World) -> None:
    raw = socket.create_connection(("127.0.0.1", running.relay_port), timeout=10)
    ctx = ssl.create_default_context(cafile=str(running.ca_file))
    with ctx.wrap_socket(raw, server_hostname=RELAY_HOST) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        status, _, body = split_response(b"".join(iter_recv(conn)))
    assert (status, body) == (200, b"ok\n")


def test_large_download_and_upload_intact(running: World) -> None:
    n = 48 * 1024 * 1024
    raw = running.http_get(f"/bytes?n={n}&seed=7", timeout=120)
    status, headers, body = split_response(raw)
    assert status == 200 and len(body) == n
    assert hashlib.sha256(body).hexdigest() == _sha(n, 7)

    size = 32 * 1024 * 1024
    digest = hashlib.sha256()
    with running.connect(timeout=120) as conn:
        conn.sendall(
            f"POST /upload HTTP/1.1\r\nHost: {HOME_HOST}\r\nContent-Length: {size}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        for chunk in pattern(size, 3):
            digest.update(chunk)
            conn.sendall(chunk)
        status, _, body = split_response(b"".join(iter_recv(conn)))
    assert status == 200
    assert json.loads(body) == {"bytes": size, "sha256": digest.hexdigest()}


def test_many_concurrent_streams_from_several_addresses(running: World) -> None:
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        source = f"127.0.0.{2 + i % 5}"
        n = 200_000 + i * 1000
        try:
            status, _, body = split_response(running.http_get(f"/bytes?n={n}&seed={i}", source))
            ok = status == 200 and hashlib.sha256(body).hexdigest() == _sha(n, i)
        except OSError:
            ok = False
        with lock:
            results.append((source, ok))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 60
    assert all(ok for _, ok in results)
    assert {s for s, _ in results} == {f"127.0.0.{i}" for i in range(2, 7)}


def test_home_reconnects_after_relay_restart(running: World) -> None:
    port = running.relay_port
    running.relay.stop(signal.SIGKILL)
    wait_for(lambda: running.home_status()["state"] != "connected", what="home notices")
    st = running.home_status()
    assert st["last_error"]
    running.start_relay(port=port)
    wait_for(lambda: running.home_status()["state"] == "connected", timeout=20, what="reconnect")
    assert split_response(running.http_get("/small"))[0] == 200


def test_status_exit_codes(world: World) -> None:
    world.start_app()
    world.start_relay()
    world.write_home_config()
    result = tunneld("status", "-c", str(world.home_config))
    assert result.returncode == 3
    assert "not running" in result.stdout
    # Running but the relay refuses: exit 1.
    port = world.relay_port
    world.relay.stop()
    world.start_home(wait_connected=False)
    wait_for(lambda: world.status(world.home_config, world.home) is not None, what="status")
    result = tunneld("status", "-c", str(world.home_config))
    assert result.returncode == 1, result.stdout
    world.start_relay(port=port)
    wait_for(lambda: world.home_status()["state"] == "connected", timeout=20, what="connect")
    result = tunneld("status", "-c", str(world.home_config))
    assert result.returncode == 0
    assert "connected since" in result.stdout
    assert world.home.stop() == 0


@pytest.mark.parametrize(
    "case, reason",
    [
        ("bad_signature", "bad_signature"),
        ("expired", "expired"),
        ("hostname", "hostname_not_allowed"),
        ("revoked", "revoked"),
        ("blocked", "version_blocked"),
    ],
)
def test_token_refusals_are_shown_to_the_user(world: World, case: str, reason: str) -> None:
    world.start_app()
    world.start_relay()
    token = world.issue_token()
    if case == "bad_signature":
        # Signed by another key: a second relay key pair the relay does not trust.
        other = World(world.root / "other")
        other.start_relay()
        token = other.issue_token()
        other.stop_all()
    elif case == "expired":
        token = world.issue_token(ttl="1s")
        time.sleep(2.1)
    elif case == "hostname":
        world.home_overrides["tls"] = {"hostnames": [HOME_HOST, "other.test"]}
    elif case == "revoked":
        from tunneld.tokens import decode_claims_unverified

        jti = decode_claims_unverified(token).token_id
        world.relay.stop()
        world.start_relay(port=world.relay_port, revoked_tokens=[jti])
    elif case == "blocked":
        world.relay.stop()
        world.start_relay(port=world.relay_port, blocked_versions=["<999"])
    world.start_home(token=token, wait_connected=False)
    st = wait_for(
        lambda: (s := world.status(world.home_config, world.home)) and s["last_error"] and s,
        what="refusal in status",
    )
    assert reason in st["last_error"]
    assert st["state"] in {"connecting", "blocked"}
    if case == "blocked":
        assert st["state"] == "blocked"
    assert token not in json.dumps(st)
    assert token not in world.home.log()
    assert token not in world.relay.log()


def test_a_token_that_does_not_decode_stops_run_at_once(world: World) -> None:
    # Not a retry loop against the relay (issue 22): one line naming the key, exit 2.
    world.write_relay_config()
    world.write_home_config(token="tunneld1.not-a-token")
    result = tunneld("run", "-c", str(world.home_config), timeout=20)
    assert result.returncode == 2, result
    assert f"{world.home_config}: [relay] token: the token is not a tunneld token" in result.stderr
    assert "tunneld1.not-a-token" not in result.stderr


def test_plain_websocket_transport_when_the_relay_disables_raw(world: World) -> None:
    world.start_app()
    world.start_relay(raw_transport=False)
    world.start_home()
    assert "websocket transport" in world.relay.log()
    n = 8 * 1024 * 1024
    status, _, body = split_response(world.http_get(f"/bytes?n={n}&seed=2"))
    assert status == 200 and hashlib.sha256(body).hexdigest() == _sha(n, 2)


def test_raw_transport_is_the_default(running: World) -> None:
    assert "raw transport" in running.relay.log()
