"""The reverse proxy end to end: real relay + daemon + demo app, curl and a WebSocket client.

One world for the module (starting processes is the slow part); the test that
stops the app restarts it on the same port before it returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from tests.integration.harness import (
    HOME_HOST,
    PY,
    World,
    iter_recv,
    split_response,
    wait_for,
)
from tunneld.demoapp import pattern, pattern_sha256

pytestmark = pytest.mark.integration

CURL = "/usr/bin/curl"
MiB = 1024 * 1024
TRUSTED_PROXY = "127.0.0.5"
RESPONSE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("proxy") / "w")
    try:
        w.start_app()
        w.start_relay()
        w.start_home(
            upstream={"response_timeout": f"{RESPONSE_TIMEOUT:g}s", "max_header_size": 16384},
            watchdog={"trusted_proxies": [f"{TRUSTED_PROXY}/32"]},
        )
        yield w
    finally:
        w.stop_all()


def url(world: World, path: str) -> str:
    return f"https://{HOME_HOST}:{world.relay_port}{path}"


def curl(
    world: World, *args: str, source: str = "127.0.0.1", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            CURL,
            "-sS",
            "--resolve",
            f"{HOME_HOST}:{world.relay_port}:127.0.0.1",
            "--cacert",
            str(world.home_cert()),
            "--interface",
            source,
            *args,
        ],
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def echoed(world: World, *args: str, source: str = "127.0.0.1") -> dict[str, Any]:
    result = curl(world, *args, url(world, "/headers"), source=source)
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in echo["headers"] if n.lower() == name]


SPOOFED = [
    "X-Forwarded-For: 6.6.6.6",
    "X-Forwarded-Proto: http",
    "X-Forwarded-Host: evil.test",
    "X-Real-IP: 6.6.6.6",
    "Forwarded: for=6.6.6.6;proto=http",
]


def test_forwarded_headers_name_each_source_address_once(world: World) -> None:
    host = f"{HOME_HOST}:{world.relay_port}"
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        spoof = [a for h in SPOOFED for a in ("-H", h)]
        echo = echoed(world, *spoof, source=source)
        # What Home Assistant insists on: one bare address, one proto, a non-empty host.
        assert values(echo, "x-forwarded-for") == [source]
        assert values(echo, "x-forwarded-proto") == ["https"]
        assert values(echo, "x-forwarded-host") == [host]
        assert values(echo, "forwarded") == [f'for={source};proto=https;host="{host}"']
        assert values(echo, "x-real-ip") == []
        assert "6.6.6.6" not in json.dumps(echo) and "evil" not in json.dumps(echo)


def test_trusted_proxy_forwards_its_client(world: World) -> None:
    echo = echoed(world, "-H", "X-Forwarded-For: 203.0.113.9", source=TRUSTED_PROXY)
    assert values(echo, "x-forwarded-for") == ["203.0.113.9"]
    echo = echoed(world, "-H", "X-Forwarded-For: 203.0.113.9", source="127.0.0.6")
    assert values(echo, "x-forwarded-for") == ["127.0.0.6"]


def test_keep_alive_reuses_client_and_upstream_connections(world: World) -> None:
    target = url(world, "/headers")
    result = curl(
        world,
        *[a for _ in range(3) for a in (target, "-w", "\n%{num_connects}\n")],
    )
    assert result.returncode == 0, result.stderr
    lines = [x for x in result.stdout.decode().split("\n") if x.strip()]
    bodies, connects = [json.loads(x) for x in lines[0::2]], lines[1::2]
    assert connects == ["1", "0", "0"]  # one TLS connection through the tunnel
    assert len({b["peer"] for b in bodies}) == 1  # one upstream connection, from the pool


def test_64_mib_download_and_upload_intact(world: World, tmp_path: Path) -> None:
    n = 64 * MiB
    out = tmp_path / "down.bin"
    result = curl(world, "-o", str(out), url(world, f"/bytes?n={n}&seed=5"), timeout=180)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size == n
    assert _file_sha(out) == pattern_sha256(n, 5)

    src = tmp_path / "up.bin"
    with src.open("wb") as f:
        for chunk in pattern(n, 9):
            f.write(chunk)
    result = curl(world, "--data-binary", f"@{src}", url(world, "/upload"), timeout=180)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"bytes": n, "sha256": pattern_sha256(n, 9)}
    # Chunked (no Content-Length), with Expect: 100-continue as curl sends it.
    with src.open("r+b") as f:
        f.truncate(8 * MiB)
    result = curl(
        world,
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{src}",
        url(world, "/upload"),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"bytes": 8 * MiB, "sha256": pattern_sha256(8 * MiB, 9)}
    os.unlink(src)


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


async def test_websocket_echo_of_1000_messages(world: World) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", world.relay_port)
    stream = trio.SSLStream(tcp, world.client_context(), server_hostname=HOME_HOST)
    big = bytes(pattern(MiB, 3).__next__()) * 16  # 1 MiB
    messages: list[str | bytes] = [f"message {i}" for i in range(999)]
    messages.insert(500, big)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, HOME_HOST, "/ws/echo", max_message_size=4 * MiB
            )

            async def send_all() -> None:
                for message in messages:
                    await ws.send_message(message)

            nursery.start_soon(send_all)
            for message in messages:
                assert await ws.get_message() == message
            await ws.aclose()
            nursery.cancel_scope.cancel()


def _raw_exchange(world: World, data: bytes, source: str = "127.0.0.2") -> bytes:
    with world.connect(source) as conn:
        conn.sendall(data)
        return b"".join(iter_recv(conn))


def test_malformed_and_smuggling_requests_get_400(world: World) -> None:
    for head in (
        b"GET / HTTP/1.1\r\nHost: home.test\r\nX-A: a\r\n folded\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: home.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: home.test\r\nContent-Length: 5\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        b"NOT HTTP AT ALL\r\n\r\n",
    ):
        status, headers, body = split_response(_raw_exchange(world, head))
        assert status == 400, head
        assert headers["content-type"].startswith("text/html")
        assert b"400 Bad Request" in body
    log = world.home.log()
    assert "400 for 127.0.0.2" in log
    assert "Traceback" not in log


def test_headers_too_large_get_431(world: World) -> None:
    result = curl(
        world,
        "-H",
        "X-Big: " + "a" * 20000,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        url(world, "/headers"),
    )
    assert result.stdout == b"431"


def test_slow_upstream_gets_504(world: World) -> None:
    start = time.monotonic()
    result = curl(world, "-w", "%{http_code}", "-o", "/dev/null", url(world, "/slow?delay=20"))
    elapsed = time.monotonic() - start
    assert result.stdout == b"504"
    assert RESPONSE_TIMEOUT <= elapsed < RESPONSE_TIMEOUT + 5
    assert "504 for 127.0.0.1" in world.home.log()


def test_stopped_app_gets_502_then_service_resumes(world: World) -> None:
    # Warm the pool first, so the dead pooled connection is exercised too.
    assert values(echoed(world), "x-forwarded-for") == ["127.0.0.1"]
    port = world.app_port
    world.app.stop()
    result = curl(world, "-i", url(world, "/headers"))
    assert result.stdout.startswith(b"HTTP/1.1 502"), result.stdout[:200]
    assert b"502 Bad Gateway" in result.stdout
    assert "502 for 127.0.0.1" in world.home.log()
    # Other streams and the daemon are unaffected: the app comes back, so does service.
    port_file = world.root / "app2.port"
    world.app = world.spawn(
        "app2",
        [PY, "-m", "tunneld.demoapp", "--port", str(port), "--port-file", str(port_file)],
    )
    wait_for(port_file.exists, what="app restarted")
    assert values(echoed(world), "x-forwarded-for") == ["127.0.0.1"]
    assert world.home_status()["state"] == "connected"
    assert "Traceback" not in world.home.log()
