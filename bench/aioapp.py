"""The aiohttp app of the SniTun comparison, and SniTun's two ends, as Home Assistant runs
them. Runs in the SniTun venv (Python 3.13, snitun 0.47.0, aiohttp; bench/snitunenv.py
makes it), so it imports nothing from tunneld:

    python bench/aioapp.py plain  --port-file F              # tunneld's upstream (HTTP)
    python bench/aioapp.py direct --port-file F --cert C --key K   # TLS by aiohttp itself
    python bench/aioapp.py server --port-file F --fernet-key KEY   # SniTunServerSingle
    python bench/aioapp.py home --server HOST:PORT --token-file T --cert C --key K

`home` is the app with `SniTunClientAioHttp` (a `ClientPeer` and a `TransportConnector`
over the app's runner): TLS is terminated by the app's process on SniTun's channels, with
Home Assistant's server context (hass_nabucasa.utils.server_context_modern). The token
file is JSON from `make_token` (the Fernet token and the AES key/IV, SniTun's own setup).

The app serves what bench/client.py asks for: /small, /bytes?n=N (the pattern of
tunneld.demoapp, reimplemented identically: the harness checks /bytes-sha256 against
it), /bytes-sha256?n=N and /ws/echo.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

CHUNK_SIZE = 64 * 1024  # tunneld.demoapp's
PATTERN_PERIOD = 1024 * 1024 - 1
_BLOCK = random.Random(0).randbytes(PATTERN_PERIOD)
PATTERN = _BLOCK + _BLOCK[:CHUNK_SIZE]
SMALL = b"hello tunnel\n"
MAX_BYTES = 8 * 1024**3


def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    period = memoryview(PATTERN)[:PATTERN_PERIOD]
    full, rest = divmod(n, PATTERN_PERIOD)
    for _ in range(full):
        digest.update(period)
    digest.update(period[:rest])
    return digest.hexdigest()


def _n(request: web.Request) -> int:
    n = int(request.query.get("n", "0"))
    if not 0 <= n <= MAX_BYTES:
        raise web.HTTPBadRequest(text="n out of range")
    return n


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL, content_type="text/plain")


async def bulk(request: web.Request) -> web.StreamResponse:
    n = _n(request)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = n
    await response.prepare(request)
    offset = 0
    view = memoryview(PATTERN)
    while offset < n:
        start = offset % PATTERN_PERIOD
        size = min(CHUNK_SIZE, n - offset)
        await response.write(view[start : start + size])
        offset += size
    await response.write_eof()
    return response


async def bulk_sha256(request: web.Request) -> web.Response:
    return web.Response(text=pattern_sha256(_n(request)) + "\n")


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/bytes", bulk)
    app.router.add_get("/bytes-sha256", bulk_sha256)
    app.router.add_get("/ws/echo", ws_echo)
    return app


def server_context_modern(cert: str, key: str) -> ssl.SSLContext:
    """hass_nabucasa.utils.server_context_modern, with the bench's P-256 certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # its OP_NO_TLSv1, OP_NO_TLSv1_1
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    context.set_ciphers(
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"
        "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256",
    )
    context.load_cert_chain(cert, key)
    return context


def bound_socket() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    sock.setblocking(False)
    return sock


def write_port(path: str, sock: socket.socket) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(str(sock.getsockname()[1]))
    tmp.replace(path)


def mark_ready(path: str) -> None:
    Path(path).write_text("connected")


def make_token(fernet_key: str, hostname: str) -> dict[str, str]:
    """What Nabuca Casa's backend hands Home Assistant: a Fernet token for the server and
    the AES key/IV inside it (snitun.utils.server.generate_client_token)."""
    from datetime import timedelta

    from snitun.utils.aes import generate_aes_keyset
    from snitun.utils.server import generate_client_token

    aes_key, aes_iv = generate_aes_keyset()
    token = generate_client_token([fernet_key], timedelta(days=1), hostname, aes_key, aes_iv)
    return {"fernet": token.decode(), "aes_key": aes_key.hex(), "aes_iv": aes_iv.hex()}


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve_app(args: argparse.Namespace, tls: bool) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    sock = bound_socket()
    context = server_context_modern(args.cert, args.key) if tls else None
    site = web.SockSite(runner, sock, ssl_context=context)
    await site.start()
    write_port(args.port_file, sock)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()


async def serve_snitun(args: argparse.Namespace) -> None:
    from snitun.server.run import SniTunServerSingle

    class Server(SniTunServerSingle):
        """SniTunServerSingle on a socket bound to port 0 (it turns port 0 into 443)."""

        async def start(self) -> None:
            self.sock = bound_socket()
            self._server = await asyncio.start_server(self._handler, sock=self.sock)

    server = Server([args.fernet_key])
    await server.start()
    write_port(args.port_file, server.sock)
    try:
        await wait_for_signal()
    finally:
        await server.stop()


async def serve_home(args: argparse.Namespace) -> None:
    from snitun.utils import PROTOCOL_VERSION
    from snitun.utils.aiohttp_client import SniTunClientAioHttp

    token: dict[str, Any] = args.token
    host, _, port = args.server.rpartition(":")
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    snitun = SniTunClientAioHttp(
        runner, server_context_modern(args.cert, args.key), host, int(port)
    )
    await snitun.start()
    await snitun.connect(
        token["fernet"].encode(),
        bytes.fromhex(token["aes_key"]),
        bytes.fromhex(token["aes_iv"]),
        throttling=None,  # the server side runs unthrottled too (SniTunServerSingle's default)
        # The server's protocol version, which must match the token's (generate_client_token
        # writes the latest, 2: channel pause/resume flow control, encrypted NEW). Home
        # Assistant leaves it to the default (0), which only works with tokens saying 0.
        protocol_version=PROTOCOL_VERSION,
    )
    mark_ready(args.port_file)  # the ready file: the session is up
    stopped = asyncio.ensure_future(wait_for_signal())
    closed = asyncio.ensure_future(snitun.wait())
    try:
        await asyncio.wait([stopped, closed], return_when=asyncio.FIRST_COMPLETED)
        if closed.done():
            print("SniTun connection closed", file=sys.stderr, flush=True)
    finally:
        stopped.cancel()
        await snitun.stop()
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/aioapp.py")
    parser.add_argument("role", choices=("plain", "direct", "server", "home", "token"))
    parser.add_argument("--port-file", default="")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--fernet-key", default="")
    parser.add_argument("--hostname", default="")
    parser.add_argument("--server", default="")
    parser.add_argument("--token-file", default="")
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("AIOAPP_LOG", "WARNING"), stream=sys.stderr)
    if args.role == "token":  # a Fernet key and a client token, as JSON on stdout
        from cryptography.fernet import Fernet

        key = Fernet.generate_key().decode()
        print(json.dumps({"fernet_key": key, **make_token(key, args.hostname)}))
        return 0
    if args.token_file:
        args.token = json.loads(Path(args.token_file).read_text())
    roles = {
        "plain": lambda: serve_app(args, tls=False),
        "direct": lambda: serve_app(args, tls=True),
        "server": lambda: serve_snitun(args),
        "home": lambda: serve_home(args),
    }
    asyncio.run(roles[args.role]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
