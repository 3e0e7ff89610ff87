"""Data connections end to end (PROTOCOL.md 11): real relay, daemon and app, curl.

A client's bytes cross the relay on a data connection the home opened (the relay
passes them in the kernel); the session keeps the client's address, the stream's
credit and its end. Without data connections on either side, DATA frames as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from typing import Any

import pytest

from tests.integration.harness import World, split_response, wait_for
from tunneld.demoapp import pattern
from tunneld.wire.dataconn import preamble
from tunneld.wire.events import TICKET_SIZE

pytestmark = pytest.mark.integration

CURL = "/usr/bin/curl"
MIB = 1024 * 1024


def curl(world: World, *args: str, source: str = "127.0.0.2") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            CURL,
            "-sS",
            "--resolve",
            f"home.test:{world.relay_port}:127.0.0.1",
            "--cacert",
            str(world.home_cert()),
            "--interface",
            source,
            *args,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )


def url(world: World, path: str) -> str:
    return f"https://home.test:{world.relay_port}{path}"


def relay_session(world: World) -> dict[str, Any]:
    status = world.status(world.relay_config)
    assert status is not None and status["sessions"]
    session: dict[str, Any] = status["sessions"][-1]
    return session


def sha_of_pattern(n: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern(n, 0):
        digest.update(chunk)
    return digest.hexdigest()


def pool_ready(world: World) -> bool:
    pool = relay_session(world)["data_connections"]
    return pool is not None and pool["idle"] >= 1


def test_bytes_take_the_data_connections_and_arrive_whole(running: World) -> None:
    wait_for(lambda: pool_ready(running), what="idle data connections at the relay")
    home = running.home_status()["data_connections"]
    assert home is not None and home["ready"] >= 1

    down = curl(running, "-o", "-", url(running, f"/bytes?n={16 * MIB}"))
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256(down.stdout).hexdigest() == sha_of_pattern(16 * MIB)

    body = os.urandom(3 * MIB)
    up = subprocess.run(
        [
            CURL,
            "-sS",
            "--resolve",
            f"home.test:{running.relay_port}:127.0.0.1",
            "--cacert",
            str(running.home_cert()),
            "--interface",
            "127.0.0.3",
            "--data-binary",
            "@-",
            url(running, "/upload"),
        ],
        input=body,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    # The home still learns each client's own address: it travels on the session.
    seen = json.loads(curl(running, url(running, "/headers"), source="127.0.0.4").stdout)
    assert [v for n, v in seen["headers"] if n.lower() == "x-forwarded-for"] == ["127.0.0.4"]

    pool = relay_session(running)["data_connections"]
    assert pool["used_total"] >= 3  # three clients, each on a data connection of its own
    # and each one used was replaced: the pool is back to its size
    wait_for(lambda: relay_session(running)["data_connections"]["idle"] == 8, what="refill")


def test_a_connection_with_a_ticket_it_was_never_given_is_refused(running: World) -> None:
    wait_for(lambda: pool_ready(running), what="idle data connections at the relay")
    before = relay_session(running)["data_connections"]["idle"]
    for line in (preamble(os.urandom(TICKET_SIZE)), b"TUNNELD-DATA/1 not-hex-at-all\n"):
        with socket.create_connection(("127.0.0.1", running.relay_port), timeout=10) as sock:
            sock.sendall(line)
            sock.settimeout(10)
            try:
                assert sock.recv(100) == b""  # closed (or reset) without a byte
            except ConnectionResetError:
                pass
    status = running.status(running.relay_config)
    assert status is not None
    assert status["connections"]["refused"]["data_ticket"] == 2
    assert relay_session(running)["data_connections"]["idle"] == before
    assert split_response(running.http_get("/small"))[0] == 200


@pytest.mark.parametrize("side", ["home", "relay"])
def test_without_data_connections_on_either_side_bytes_go_in_the_session(
    world: World, side: str
) -> None:
    """What a daemon or relay from before data connections does: it never offers them."""
    world.start_app()
    world.start_relay(**({"data_connections": 0} if side == "relay" else {}))
    world.start_home(**({"daemon": {"data_connections": 0}} if side == "home" else {}))
    down = curl(world, "-o", "-", url(world, f"/bytes?n={4 * MIB}"))
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256(down.stdout).hexdigest() == sha_of_pattern(4 * MIB)
    assert relay_session(world)["data_connections"] is None
    assert world.home_status()["data_connections"] is None
    assert relay_session(world)["streams"]["total"] >= 1


def test_a_client_that_vanishes_mid_download_ends_its_stream_at_home(running: World) -> None:
    wait_for(lambda: pool_ready(running), what="idle data connections at the relay")
    with running.connect(source="127.0.0.5") as conn:
        conn.sendall(b"GET /bytes?n=200000000 HTTP/1.1\r\nHost: home.test\r\n\r\n")
        assert conn.recv(65536)
    # The socket is gone (RST at close: unread data): the relay resets, the home ends it.
    wait_for(
        lambda: running.home_status()["streams"]["active"] == 0,
        what="the home to end the stream",
    )
    wait_for(lambda: running.home_status()["data_connections"]["in_use"] == 0, what="release")
    assert split_response(running.http_get("/small"))[0] == 200
