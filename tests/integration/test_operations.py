"""Operations end to end: status, metrics, SIGHUP reloads, and no secret in any output."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.integration.harness import (
    HOME_HOST,
    RELAY_HOST,
    World,
    iter_recv,
    split_response,
    tunneld,
    wait_for,
)
from tunneld.control import request
from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)
from tunneld.tokens import decode_claims_unverified

pytestmark = pytest.mark.integration

OTHER_HOST = "other.test"
MiB = 1024 * 1024


def control(socket_path: Path, path: str) -> tuple[int, bytes]:
    return trio.run(request, socket_path, "GET", path)


def socket_status(world: World, name: str) -> dict[str, Any]:
    code, body = control(world.root / "run" / name, "/v1/status")
    assert code == 200
    value = json.loads(body)
    assert isinstance(value, dict)
    return value


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(answer.read().decode())


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert m is not None, f"{name}{labels} not in metrics"
    return float(m.group(1))


def pem_body(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))


# -- status and metrics --------------------------------------------------------


def test_status_and_metrics_of_a_full_run_never_show_a_secret(world: World) -> None:
    world.start_app()
    world.start_relay(metrics_listen="127.0.0.1:0")
    token = world.issue_token(HOME_HOST, ttl="2d")  # under 14 days: a warning
    world.start_home(token, daemon={"metrics_listen": "127.0.0.1:0"})
    for _ in range(3):
        assert split_response(world.http_get("/small"))[0] == 200
    status, _, body = split_response(world.http_get(f"/bytes?n={MiB}"))
    assert (status, len(body)) == (200, MiB)
    st = wait_for(lambda: (s := world.home_status())["rtt_ms"] is not None and s, what="a ping RTT")

    assert st["state"] == "connected" and st["session_id"] and st["connected_since"]
    assert st["relay"].startswith("wss://relay.test:")
    assert st["hostnames"] == [HOME_HOST]
    check = st["upstream_check"]
    assert check["reachable"] is True and check["checked_at"] and check["error"] is None
    assert st["streams"]["total"] >= 4 and st["streams"]["websockets"] == 0
    assert st["bytes"]["in"] > 0 and st["bytes"]["out"] > MiB
    assert len(st["certificate"]["sha256"]) == 64 and st["bans"] == []
    assert st["last_error"] is None and st["version"]
    # Window tuning: the session's own PINGs measured the path; windows within the buffer.
    flow = st["flow"]
    assert flow["min_rtt_ms"] is not None and flow["min_rtt_ms"] >= 0
    assert 0 <= flow["windows_bytes"] <= flow["buffer_bytes"] == 64 << 20
    claims = decode_claims_unverified(token)
    assert st["token"]["id"] == claims.token_id and 1 < st["token"]["days_left"] <= 2
    assert any("token expires in" in w for w in st["warnings"])
    assert st["config"] == {
        "path": str(world.home_config),
        "loaded_at": st["config"]["loaded_at"],
        "reloads": 0,
        "last_error": None,
        "needs_restart": [],
    }
    assert "WARNING tunneld.health: the relay token expires in" in world.home.log()

    human = tunneld("status", "-c", str(world.home_config))
    assert human.returncode == 0, human.stderr
    for text in ("connected since", "reachable at", f"token       {claims.token_id}", "WARNING:"):
        assert text in human.stdout, text

    relay_st = world.status(world.relay_config, world.relay)
    assert relay_st is not None
    [session] = relay_st["sessions"]
    assert session["hostnames"] == [HOME_HOST] and session["id"] == st["session_id"]
    assert session["flow"]["min_rtt_ms"] is not None  # the relay pings too
    assert relay_st["hostnames"] == [HOME_HOST]
    assert relay_st["streams"]["total"] >= 4
    assert relay_st["certificate"]["sans"] == [RELAY_HOST]
    relay_human = tunneld("status", "-c", str(world.relay_config))
    assert relay_human.returncode == 0 and "sessions    1" in relay_human.stdout

    # Metrics: the control sockets and the TCP listeners serve the same families.
    outputs = [json.dumps(st), json.dumps(relay_st), human.stdout, relay_human.stdout]
    code, home_socket_metrics = control(world.root / "run" / "home.sock", "/metrics")
    assert code == 200
    home_tcp_metrics = scrape(st["metrics_listen"][0])
    relay_tcp_metrics = scrape(relay_st["metrics_listen"][0])
    code, relay_socket_metrics = control(world.root / "run" / "relay.sock", "/metrics")
    assert code == 200
    for text in (home_socket_metrics.decode(), home_tcp_metrics):
        assert metric(text, "tunneld_session_state", '{state="connected"}') == 1
        assert metric(text, "tunneld_streams_total") >= 4
        assert metric(text, "tunneld_upstream_up") == 1
        assert 86400 < metric(text, "tunneld_token_expiry_seconds") <= 2 * 86400
        assert metric(text, "tunneld_certificate_expiry_seconds") > 0
        assert metric(text, "tunneld_tunnel_bytes_total", '{direction="out"}') > MiB
    for text in (relay_socket_metrics.decode(), relay_tcp_metrics):
        assert metric(text, "tunneld_relay_sessions") == 1
        assert metric(text, "tunneld_relay_routed_total") >= 4
    outputs += [home_socket_metrics.decode(), home_tcp_metrics]
    outputs += [relay_socket_metrics.decode(), relay_tcp_metrics]
    outputs.append(tunneld("check-config", "-c", str(world.home_config)).stdout)

    world.stop_all()
    outputs += [world.home.log(), world.relay.log()]
    signature = token.rsplit(".", 1)[1]
    secrets = [token, signature]
    secrets += [pem_body(world.root / name) for name in ("relay.key", "token.key")]
    secrets.append(pem_body(world.root / "state" / "private_key.pem"))
    for output in outputs:
        for secret in secrets:
            assert secret not in output
            for line in textwrap_pem(secret):
                assert line not in output


def textwrap_pem(secret: str) -> list[str]:
    # A PEM body is printed in 64-character lines: no line of it may show up either.
    return [secret[i : i + 64] for i in range(0, len(secret), 64) if len(secret) > 64]


# -- SIGHUP at home ------------------------------------------------------------


class _Second(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = b"second upstream\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class WebSocketClient:
    def __init__(self, world: World) -> None:
        self.conn = world.connect(timeout=20)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.conn.sendall(self.ws.send(Request(host=HOME_HOST, target="/ws/echo")))
        assert isinstance(self._next(), AcceptConnection)

    def _next(self) -> object:
        while True:
            for event in self.ws.events():
                return event
            data = self.conn.recv(65536)
            assert data, "the WebSocket was closed"
            self.ws.receive_data(data)

    def echo(self, text: str) -> str:
        self.conn.sendall(self.ws.send(TextMessage(data=text)))
        event = self._next()
        assert isinstance(event, TextMessage), event
        return str(event.data)


def get_via(world: World, sni: str, path: str = "/small") -> tuple[int, bytes]:
    with world.connect(sni=sni) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        data = b"".join(iter_recv(conn))
    status, _, body = split_response(data)
    return status, body


def test_sighup_reloads_the_daemon_live_and_keeps_open_streams(world: World) -> None:
    second = ThreadingHTTPServer(("127.0.0.1", 0), _Second)
    threading.Thread(target=second.serve_forever, daemon=True).start()
    try:
        world.start_app()
        world.start_relay()
        token = world.issue_token(HOME_HOST, OTHER_HOST)  # the token allows both names
        world.home_overrides = {"relay": {"drain_timeout": "1s"}}
        world.start_home(token)
        first = world.home_status()["session_id"]

        ws = WebSocketClient(world)
        assert ws.echo("before") == "before"
        n = 32 * MiB
        download = world.connect(timeout=30)
        download.sendall(
            f"GET /bytes?n={n} HTTP/1.1\r\nHost: {HOME_HOST}\r\nConnection: close\r\n\r\n".encode()
        )
        got = bytearray(download.recv(MiB))
        assert world.home_status()["streams"]["websockets"] == 1

        world.write_home_config(
            token,
            tls={"hostnames": [HOME_HOST, OTHER_HOST]},
            upstream={"url": f"http://127.0.0.1:{second.server_address[1]}"},
            daemon={"log_level": "warning"},
        )
        world.home.popen.send_signal(signal.SIGHUP)
        st = wait_for(
            lambda: (s := world.home_status())["session_id"] not in (None, first) and s,
            what="a new session after the reload",
        )
        assert st["config"]["reloads"] == 1 and st["config"]["last_error"] is None
        assert st["hostnames"] == [HOME_HOST, OTHER_HOST]
        log = world.home.log()
        assert re.search(
            r"INFO tunneld.reload: reloaded .*: applied \[tls\] hostnames, "
            r"\[upstream\] url, \[daemon\] log_level",
            log,
        ), log
        mark = len(log)

        # Longer than drain_timeout: a reload's old session waits for all its streams.
        time.sleep(1.5)
        assert ws.echo("after the reload") == "after the reload"
        for chunk in iter_recv(download):
            got += chunk
        download.close()
        status, _, body = split_response(bytes(got))
        assert (status, len(body)) == (200, n)
        assert hashlib.sha256(body).hexdigest() == pattern_digest(n)

        # New requests: the new upstream, and the new hostname routes (new certificate too).
        assert get_via(world, HOME_HOST) == (200, b"second upstream\n")
        assert get_via(world, OTHER_HOST) == (200, b"second upstream\n")
        assert world.home_status()["upstream_check"]["url"].endswith(f":{second.server_address[1]}")
        # log_level = "warning": the requests above logged nothing.
        assert not re.search(r"^(INFO|DEBUG) ", world.home.log()[mark:], re.MULTILINE)
        ws.conn.close()
        # Its streams done, the old session goes: the relay holds only the new one.
        wait_for(
            lambda: (
                [s["id"] for s in socket_status(world, "relay.sock")["sessions"]]
                == [st["session_id"]]
            ),
            what="the old session closed",
        )

        # An invalid file: the running config stays, the reason is logged and shown.
        world.write_home_config(token, upstream={"url": "ftp://nowhere"})
        world.home.popen.send_signal(signal.SIGHUP)
        # `tunneld status -c` cannot read the broken file: ask the socket itself.
        st = wait_for(
            lambda: (s := socket_status(world, "home.sock"))["config"]["last_error"] and s,
            what="the failed reload in status",
        )
        assert "[upstream] url" in st["config"]["last_error"]
        assert any("the last reload failed" in w for w in st["warnings"])
        assert "ERROR tunneld.reload: reload failed" in world.home.log()
        assert st["state"] == "connected" and st["hostnames"] == [HOME_HOST, OTHER_HOST]
        assert get_via(world, OTHER_HOST) == (200, b"second upstream\n")

        # A key that needs a restart keeps its running value and says so.
        world.write_home_config(
            token,
            tls={"hostnames": [HOME_HOST, OTHER_HOST]},
            upstream={"url": f"http://127.0.0.1:{second.server_address[1]}"},
            daemon={"log_level": "warning", "metrics_listen": "127.0.0.1:0"},
        )
        world.home.popen.send_signal(signal.SIGHUP)
        st = wait_for(
            lambda: (s := world.home_status())["config"]["reloads"] == 2 and s,
            what="the second reload",
        )
        assert st["config"]["needs_restart"] == ["[daemon] metrics_listen"]
        assert st["metrics_listen"] == [] and st["config"]["last_error"] is None
        assert "not applied until a restart: [daemon] metrics_listen" in world.home.log()
    finally:
        second.shutdown()


def pattern_digest(n: int) -> str:
    from tunneld.demoapp import pattern_sha256

    return pattern_sha256(n)


# -- SIGHUP at the relay -------------------------------------------------------


def peer_sha256(world: World) -> str:
    ctx = ssl.create_default_context(cafile=str(world.ca_file))
    with socket.create_connection(("127.0.0.1", world.relay_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=RELAY_HOST) as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def test_sighup_reloads_the_relay_certificate_revocations_and_log_level(world: World) -> None:
    # The daemon trusts a second CA too, so the relay can switch to a certificate from it.
    ca2_key, ca2_pem = make_ca("second test CA")
    world.ca_file.write_bytes(world.ca_file.read_bytes() + ca2_pem)
    world.start_app()
    world.start_relay()
    token = world.issue_token()
    world.start_home(token)
    before = world.status(world.relay_config, world.relay)
    assert before is not None
    old_sha = before["certificate"]["sha256"]
    assert peer_sha256(world) == old_sha

    key = generate_private_key()
    write_private_key(key, world.root / "relay.key")
    write_certificate(
        issue_certificate(ca2_key, ca2_pem, key, [RELAY_HOST]), world.root / "relay.crt"
    )
    token_id = decode_claims_unverified(token).token_id
    world.write_relay_config(
        0,  # the running value: "127.0.0.1:0"
        log_level="warning",
        revoked_tokens=[token_id],
        http_listen=["127.0.0.1:0"],
    )
    world.relay.popen.send_signal(signal.SIGHUP)

    def reloaded() -> dict[str, Any] | None:
        st = world.status(world.relay_config, world.relay)
        return st if st and st["config"]["reloads"] == 1 else None

    st = wait_for(reloaded, what="the relay reload")
    assert st["certificate"]["sha256"] != old_sha
    assert peer_sha256(world) == st["certificate"]["sha256"]
    assert st["config"]["needs_restart"] == ["[relay] http_listen"]
    relay_log = world.relay.log()
    assert f"its token {token_id} is now revoked: closing" in relay_log
    # The revoked daemon reconnects through the new certificate and is refused.
    home = wait_for(
        lambda: "revoked" in ((s := world.home_status())["last_error"] or "") and s,
        what="the daemon refused as revoked",
    )
    assert home["state"] == "connecting"
    mark = len(world.relay.log())

    # An invalid relay config: the running one stays, and says why.
    world.write_relay_config(0, blocked_versions=["not a version"])
    world.relay.popen.send_signal(signal.SIGHUP)
    st = wait_for(
        lambda: socket_status(world, "relay.sock")["config"]["last_error"],
        what="the failed relay reload",
    )
    assert "[relay] blocked_versions" in st
    assert "ERROR tunneld.reload: reload failed" in world.relay.log()[mark:]

    # A new token and a daemon reload: connected again; log_level "warning" kept the relay quiet.
    world.write_relay_config(0, log_level="warning", revoked_tokens=[token_id])
    world.relay.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: reloaded_n(world, 2), what="the relay reload after the failed one")
    fresh = world.issue_token()
    world.write_home_config(fresh)
    world.home.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: world.home_status()["state"] == "connected", what="reconnected")
    assert split_response(world.http_get("/small"))[0] == 200
    quiet = world.relay.log()[mark:]
    assert not re.search(r"^(INFO|DEBUG) ", quiet, re.MULTILINE), quiet


def reloaded_n(world: World, n: int) -> bool:
    st = world.status(world.relay_config, world.relay)
    return st is not None and st["config"]["reloads"] == n
