"""The demo upstream app over real loopback sockets: h11 and curl clients, WebSockets, the CLI."""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import h11
import pytest
import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunneld.demoapp import CHUNK_SIZE, pattern, pattern_sha256, serve_app

REPO = Path(__file__).resolve().parent.parent
CURL = "/usr/bin/curl"
MiB = 1024 * 1024


class Client:
    """A raw h11 client on one connection (keep-alive)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, *events: object) -> None:
        for event in events:
            data = self.conn.send(event)  # type: ignore[call-overload]
            if data:
                await self.stream.send_all(data)

    async def next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(bytes(await self.stream.receive_some(256 * 1024)))

    async def start(
        self, method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> h11.Response:
        """Send a whole request and return the response head; the body follows via body()."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("Host", "127.0.0.1"), *headers]
        if body or method == "POST":
            all_headers.append(("Content-Length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            assert isinstance(event, h11.InformationalResponse), event

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            assert isinstance(event, h11.Data), event
            yield bytes(event.data)

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        response = await self.start(method, target, headers, body)
        return response, b"".join([chunk async for chunk in self.body()])

    async def aclose(self) -> None:
        await self.stream.aclose()


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((v for n, v in response.headers if n == name), None)


@pytest.fixture
async def port(nursery: trio.Nursery) -> int:
    _host, bound = await nursery.start(serve_app)
    return int(bound)


@pytest.fixture
async def client(port: int) -> AsyncIterator[Client]:
    c = await Client.connect(port)
    yield c
    await c.aclose()


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(15):
        return await trio.run_process(
            [CURL, "-sS", *args], capture_stdout=True, capture_stderr=True
        )


# --- pattern -----------------------------------------------------------------------


def test_pattern_is_deterministic_chunked_and_seeded() -> None:
    n = 3 * MiB + 12345
    chunks = list(pattern(n, seed=7))
    data = b"".join(chunks)
    assert len(data) == n
    assert all(0 < len(c) <= CHUNK_SIZE for c in chunks)
    assert data == b"".join(pattern(n, seed=7))
    assert data[:1000] == b"".join(pattern(1000, seed=7))  # a prefix is the shorter body
    assert data != b"".join(pattern(n, seed=8))
    assert hashlib.sha256(data).hexdigest() == pattern_sha256(n, seed=7)
    # not a repetition of one MiB: a proxy that drops or repeats a MiB changes the hash
    assert data[: 2 * CHUNK_SIZE] != data[MiB : MiB + 2 * CHUNK_SIZE]


# --- HTTP routes -------------------------------------------------------------------


async def test_index_shows_forwarded_or_peer_address_and_counter_socket(client: Client) -> None:
    response, body = await client.request("GET", "/")
    assert response.status_code == 200
    assert header(response, b"content-type") == b"text/html; charset=utf-8"
    assert b"<title>tunneld demo</title>" in body
    assert b"127.0.0.1" in body
    assert b"/ws/counter" in body

    response, body = await client.request(
        "GET", "/", headers=[("X-Forwarded-For", "203.0.113.9<b>")]
    )
    assert b"203.0.113.9&lt;b&gt;" in body  # shown, and escaped


async def test_headers_echoes_request_in_order(client: Client) -> None:
    response, body = await client.request(
        "GET", "/headers?a=1", headers=[("X-Zeta", "1"), ("x-alpha", "two words")]
    )
    assert response.status_code == 200
    info = json.loads(body)
    assert info["method"] == "GET"
    assert info["path"] == "/headers"
    assert info["target"] == "/headers?a=1"
    assert info["headers"] == [["Host", "127.0.0.1"], ["X-Zeta", "1"], ["x-alpha", "two words"]]
    local_port = client.stream.socket.getsockname()[1]  # type: ignore[attr-defined]
    assert info["peer"] == f"127.0.0.1:{local_port}"


async def test_ten_requests_on_one_keepalive_connection(client: Client) -> None:
    targets = ["/small", "/headers", "/status/401", "/nope", "/bytes?n=100", "/small"] + [
        "/small"
    ] * 4
    statuses = []
    for target in targets:
        response, body = await client.request("GET", target)
        statuses.append(response.status_code)
        if target == "/small":
            assert body == b"hello tunnel\n"
            assert header(response, b"content-length") == b"13"
    assert statuses == [200, 200, 401, 404, 200, 200, 200, 200, 200, 200]


async def test_status_route_and_errors(client: Client) -> None:
    response, body = await client.request("GET", "/status/401")
    assert (response.status_code, response.reason, body) == (
        401,
        b"Unauthorized",
        b"401 Unauthorized\n",
    )
    response, body = await client.request("GET", "/status/204")
    assert (response.status_code, body, header(response, b"content-length")) == (204, b"", None)
    for bad in ("/status/99", "/status/abc", "/status/1000"):
        response, _ = await client.request("GET", bad)
        assert response.status_code == 400
    response, _ = await client.request("GET", "/missing")
    assert response.status_code == 404
    response, _ = await client.request("POST", "/small", body=b"x")
    assert response.status_code == 405
    assert header(response, b"allow") == b"GET, HEAD"
    response, _ = await client.request("GET", "/upload")
    assert response.status_code == 405
    # still the same, healthy connection after all those answers
    _, body = await client.request("GET", "/small")
    assert body == b"hello tunnel\n"


async def test_bad_parameters_answer_400_and_keep_the_connection(client: Client) -> None:
    for target in (
        "/bytes",
        "/bytes?n=-1",
        "/bytes?n=x",
        f"/bytes?n={8 * 1024**3 + 1}",
        "/slow?delay=abc",
        "/slow?delay=-1",
        "/ws/echo",
    ):
        response, body = await client.request("GET", target)
        assert response.status_code == 400, target
        assert body
    _, body = await client.request("GET", "/small")
    assert body == b"hello tunnel\n"


async def test_head_bytes_has_length_but_no_body(client: Client) -> None:
    response, body = await client.request("HEAD", "/bytes?n=5000000")
    assert (response.status_code, header(response, b"content-length"), body) == (
        200,
        b"5000000",
        b"",
    )


async def test_malformed_request_gets_400_and_close(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in received.lower()


async def test_oversized_head_gets_431(client: Client) -> None:
    response, _ = await client.request("GET", "/small", headers=[("X-Big", "a" * 100_000)])
    assert response.status_code == 431


async def test_slow_waits(client: Client) -> None:
    start = trio.current_time()
    response, _ = await client.request("GET", "/slow?delay=0.3")
    assert response.status_code == 200
    assert trio.current_time() - start >= 0.3


async def test_64mib_download_matches_sha_route_and_pattern(client: Client) -> None:
    n, seed = 64 * MiB + 3, 11
    response = await client.start("GET", f"/bytes?n={n}&seed={seed}")
    assert header(response, b"content-length") == str(n).encode()
    digest, size = hashlib.sha256(), 0
    async for chunk in client.body():
        digest.update(chunk)
        size += len(chunk)
    assert size == n
    _, expected = await client.request("GET", f"/bytes-sha256?n={n}&seed={seed}")
    assert expected.decode().strip() == digest.hexdigest() == pattern_sha256(n, seed)
    reference = hashlib.sha256()
    for chunk in pattern(n, seed):
        reference.update(chunk)
    assert reference.hexdigest() == digest.hexdigest()


async def test_20mib_chunked_upload_hash(client: Client) -> None:
    payload = b"".join(pattern(20 * MiB + 1, seed=3))
    request = h11.Request(
        method="POST",
        target="/upload",
        headers=[("Host", "127.0.0.1"), ("Transfer-Encoding", "chunked")],
    )
    await client.send(request)
    view = memoryview(payload)
    for offset in range(0, len(payload), 1_000_003):  # odd chunk sizes
        await client.send(h11.Data(data=view[offset : offset + 1_000_003]))  # type: ignore[arg-type]
    await client.send(h11.EndOfMessage())
    response = await client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    body = b"".join([chunk async for chunk in client.body()])
    assert json.loads(body) == {
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


async def test_curl_upload_with_expect_continue_and_download(port: int, tmp_path: Path) -> None:
    upload = tmp_path / "up.bin"
    upload.write_bytes(os.urandom(3 * MiB))
    done = await curl(
        "-v",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{upload}",
        f"http://127.0.0.1:{port}/upload",
    )
    # answered at once, so curl does not sit out its 1 s expect timeout
    assert b"< HTTP/1.1 100 Continue" in done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"bytes": 3 * MiB, "sha256": hashlib.sha256(upload.read_bytes()).hexdigest()}

    done = await curl(f"http://127.0.0.1:{port}/bytes?n=100000&seed=2")
    assert done.stdout == b"".join(pattern(100000, seed=2))


# --- WebSockets --------------------------------------------------------------------


async def test_websocket_echo_text_and_1mib_binary(port: int) -> None:
    url = f"ws://127.0.0.1:{port}/ws/echo"
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(url, max_message_size=16 * MiB) as ws:
            await ws.send_message("héllo tunnel")
            assert await ws.get_message() == "héllo tunnel"
            blob = b"".join(pattern(MiB, seed=4))
            await ws.send_message(blob)
            assert await ws.get_message() == blob
            await ws.send_message(b"")
            assert await ws.get_message() == b""


async def test_websocket_echo_rejects_message_over_16mib(port: int) -> None:
    url = f"ws://127.0.0.1:{port}/ws/echo"
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(url, max_message_size=32 * MiB) as ws:
            await ws.send_message(bytes(16 * MiB + 1))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1009


async def test_websocket_counter_increases(port: int) -> None:
    url = f"ws://127.0.0.1:{port}/ws/counter"
    with trio.fail_after(5):
        async with trio_websocket.open_websocket_url(url) as ws:
            first = int(await ws.get_message())
            second = int(await ws.get_message())
    assert second == first + 1


# --- TLS ---------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "app.crt", tmp_path / "app.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_serving(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    _host, port = await nursery.start(functools.partial(serve_app, ssl_context=context))
    base = f"https://127.0.0.1:{port}"
    done = await curl("--cacert", str(cert_file), f"{base}/small", f"{base}/bytes?n=300000")
    assert done.stdout == b"hello tunnel\n" + b"".join(pattern(300000))


# --- CLI ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


async def test_cli_writes_port_file_serves_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    command = [
        sys.executable,
        "-m",
        "tunneld.demoapp",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    proc = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, cwd=REPO, env=_env())
    try:
        with trio.fail_after(10):
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "exited before listening"
                line += chunk
            assert line.startswith(b"listening on http://127.0.0.1:")
            port = int(line.rsplit(b":", 1)[1])
            assert port_file.read_text().strip() == str(port)  # noqa: ASYNC240 - tiny file
            c = await Client.connect(port)
            _, body = await c.request("GET", "/small")
            assert body == b"hello tunnel\n"
            await c.aclose()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
    assert [p.name for p in tmp_path.iterdir()] == ["port"]  # noqa: ASYNC240 - no temp file left


async def test_cli_bad_certificate_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    command = [
        sys.executable,
        "-m",
        "tunneld.demoapp",
        "--tls-cert",
        str(missing),
        "--tls-key",
        str(missing),
    ]
    with trio.fail_after(10):
        done = await trio.run_process(
            command, capture_stderr=True, check=False, cwd=REPO, env=_env()
        )
    assert done.returncode == 2
    assert b"cannot load the TLS certificate" in done.stderr
    assert b"Traceback" not in done.stderr
