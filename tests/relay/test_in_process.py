"""The relay, the home daemon and the upstream app in one trio process, on loopback.

`Relay`, `Connector`, `Daemon` and `StreamHandler` are the real objects, started
with `nursery.start` as the CLI starts them; only the processes are left out, so a
failure points at a line rather than at a log file. Clients are real TLS clients
on real sockets.
"""

from __future__ import annotations

import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import trio
import trio.testing

from tests.integration.harness import FAST_HOME, FAST_RELAY, HOME_HOST, RELAY_HOST
from tunneld.config import HomeConfig, RelayConfig, load_config
from tunneld.demoapp import serve_app
from tunneld.home.daemon import Daemon
from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)
from tunneld.relay.server import Relay
from tunneld.tokens import generate_keypair, issue_token, load_private_key


@dataclass
class InProcess:
    relay: Relay
    daemon: Daemon
    relay_port: int


def _relay_config(root: Path, sockets: Path) -> RelayConfig:
    ca_key, ca_pem = make_ca("tunneld test CA")
    write_certificate(ca_pem, root / "ca.pem")
    key = generate_private_key()
    write_private_key(key, root / "relay.key")
    write_certificate(issue_certificate(ca_key, ca_pem, key, [RELAY_HOST]), root / "relay.crt")
    generate_keypair(root / "token.key", root / "token.pub")
    relay = {
        "hostname": RELAY_HOST,
        "listen": ["127.0.0.1:0"],
        "certificate": "relay.crt",
        "private_key": "relay.key",
        "token_public_key": "token.pub",
        "control_socket": str(sockets / "relay.sock"),
        **FAST_RELAY,
    }
    (root / "relay.toml").write_text(tomli_w.dumps({"relay": relay}))
    config = load_config(root / "relay.toml")
    assert isinstance(config, RelayConfig)
    return config


def _home_config(root: Path, sockets: Path, relay_port: int, app_port: int) -> HomeConfig:
    token = issue_token(
        load_private_key(root / "token.key"), hostnames=[HOME_HOST], subject="home", ttl=3600
    )
    home = {
        "relay": {
            "url": f"wss://{RELAY_HOST}:{relay_port}/v1/tunnel",
            "token": token,
            "ca_file": str(root / "ca.pem"),
            "connect_to": "127.0.0.1",
            **FAST_HOME,
        },
        "tls": {"hostnames": [HOME_HOST]},
        "acme": {"enabled": False},
        "upstream": {"url": f"http://127.0.0.1:{app_port}"},
        "daemon": {
            "state_directory": str(root / "state"),
            "control_socket": str(sockets / "home.sock"),
        },
    }
    (root / "tunneld.toml").write_text(tomli_w.dumps(home))
    config = load_config(root / "tunneld.toml")
    assert isinstance(config, HomeConfig)
    return config


@asynccontextmanager
async def in_process(root: Path) -> AsyncIterator[InProcess]:
    # Unix socket paths are short (108 bytes): not under pytest's long tmp_path.
    with tempfile.TemporaryDirectory(prefix="td-") as short:
        sockets = Path(short)
        async with trio.open_nursery() as nursery:
            _, app_port = await nursery.start(serve_app)
            relay = Relay(_relay_config(root, sockets))
            await nursery.start(relay.run)
            relay_port = relay.listening[0][1]
            daemon = Daemon(_home_config(root, sockets, relay_port, app_port))
            await nursery.start(daemon.run)
            await daemon.connector.connected.wait()
            await trio.testing.wait_all_tasks_blocked(0.01)  # the relay's side registers it
            yield InProcess(relay, daemon, relay_port)
            daemon.stop()
            relay.stop()
            nursery.cancel_scope.cancel()  # the app serves until cancelled


def _client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the home's bootstrap certificate is self-signed
    return ctx


async def _get(port: int, sni: str, target: str) -> bytes:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, _client_context(), server_hostname=sni, https_compatible=True)
    async with tls:
        await tls.send_all(
            f"GET {target} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        for _ in range(10_000):  # bounded: a reply is a few reads
            data = await tls.receive_some(65536)
            if not data:
                break
            answer += data
    return answer


async def test_a_request_crosses_relay_session_and_proxy(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with in_process(tmp_path) as world:
            assert world.relay.registry.lookup(HOME_HOST) is not None
            assert world.daemon.is_connected()
            answer = await _get(world.relay_port, HOME_HOST, "/headers")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            seen = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
            assert seen["x-forwarded-for"] == "127.0.0.1"  # the client's address, via OPEN
            assert seen["x-forwarded-proto"] == "https"
            streams = world.daemon.streams.statistics()
            assert streams.total >= 1 and streams.tls_failed == 0
            assert world.relay.stats.routed_total >= 1


async def test_an_unknown_name_gets_the_tls_alert_and_nothing_reaches_the_home(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with in_process(tmp_path) as world:
            before = world.daemon.streams.statistics().total
            tcp = await trio.open_tcp_stream("127.0.0.1", world.relay_port)
            tls = trio.SSLStream(tcp, _client_context(), server_hostname="other.test")
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                assert "UNRECOGNIZED_NAME" in repr(exc.__cause__).upper()
            else:
                raise AssertionError("the handshake should have failed")
            finally:
                await tcp.aclose()
            assert world.relay.stats.refused["unknown_name"] == 1
            assert world.daemon.streams.statistics().total == before


async def test_stopping_the_relay_sends_goaway_and_the_home_goes_back_to_connecting(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with in_process(tmp_path) as world:
            session = world.daemon.connector.state.sessions[-1]
            world.relay.stop()
            await session.finished.wait()
            assert session.going_away  # the relay said GOAWAY before closing
