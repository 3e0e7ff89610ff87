"""The control socket over real unix sockets: routing, limits, keep-alive, lifecycle, access."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from tunneld.control import (
    ControlRequest,
    ControlResponse,
    Router,
    get_json,
    peer_allowed,
    request,
    serve_control,
)
from tunneld.errors import ControlError, NotRunningError

STATUS = {"state": "connected", "streams": {"active": 1, "total": 7}}


async def status(req: ControlRequest) -> ControlResponse:
    return ControlResponse.json(STATUS)


async def echo(req: ControlRequest) -> ControlResponse:
    return ControlResponse.json(
        {"method": req.method, "path": req.path, "query": req.query, "body": req.body.decode()}
    )


async def boom(req: ControlRequest) -> ControlResponse:
    raise RuntimeError("secret detail")


async def not_json(req: ControlRequest) -> ControlResponse:
    return ControlResponse(200, b"# HELP x\n", content_type="text/plain; version=0.0.4")


async def hang(req: ControlRequest) -> ControlResponse:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


def make_router() -> Router:
    router = Router()
    router.add("GET", "/v1/status", status)
    router.add("POST", "/v1/echo", echo)
    router.add("GET", "/v1/boom", boom)
    router.add("GET", "/metrics", not_json)
    router.add("GET", "/v1/hang", hang)
    return router


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "control.sock"


async def start(
    nursery: trio.Nursery, path: Path, *, mode: int = 0o600, idle_timeout: float = 10.0
) -> None:
    await nursery.start(
        partial(serve_control, path, make_router(), mode=mode, idle_timeout=idle_timeout)
    )


class RawClient:
    """A hand-driven h11 client, to see exactly what the server does on one connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, target: str) -> tuple[int, bytes]:
        req = h11.Request(method="GET", target=target, headers=[("Host", "x")])
        await self.stream.send_all(self.conn.send(req) + self.conn.send(h11.EndOfMessage()))
        return await self.read_response()

    async def read_response(self) -> tuple[int, bytes]:
        status, body = 0, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body
            else:
                raise AssertionError(f"unexpected {event!r}")


async def raw_exchange(path: Path, data: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    async with await trio.open_unix_socket(path) as stream:
        await stream.send_all(data)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


async def test_get_json_roundtrip_and_request_fields(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        assert await get_json(sock_path, "/v1/status") == STATUS
        code, body = await request(sock_path, "POST", "/v1/echo?a=1&b=%20x&a=2", body=b"hi")
        assert code == 200
        assert json.loads(body) == {
            "method": "POST",
            "path": "/v1/echo",
            "query": {"a": "2", "b": " x"},
            "body": "hi",
        }
        code, body = await request(sock_path, "GET", "/metrics")
        assert (code, body) == (200, b"# HELP x\n")


async def test_keep_alive_three_requests_on_one_connection(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        async with await trio.open_unix_socket(sock_path) as stream:
            client = RawClient(stream)
            for _ in range(3):
                code, body = await client.get("/v1/status")
                assert code == 200 and b'"connected"' in body
                client.conn.start_next_cycle()


async def test_not_found_and_wrong_method_are_json_errors(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        code, body = await request(sock_path, "GET", "/nope")
        assert code == 404 and b'"error"' in body and b"/nope" in body
        code, body = await request(sock_path, "DELETE", "/v1/status")
        assert code == 405 and b"GET" in body
        with pytest.raises(ControlError, match="no such endpoint: /nope"):
            await get_json(sock_path, "/nope")


async def test_malformed_request_is_400(nursery: trio.Nursery, sock_path: Path) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        out = await raw_exchange(sock_path, b"NOT HTTP AT ALL\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ") and b'{"error": "bad request' in out
        # The server keeps serving.
        assert await get_json(sock_path, "/v1/status") == STATUS


async def test_too_large_body_is_413(nursery: trio.Nursery, sock_path: Path) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        declared = b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        out = await raw_exchange(sock_path, declared)
        assert out.startswith(b"HTTP/1.1 413 ") and b"65536" in out
        # Chunked: no length up front, the limit applies while reading. The server stops
        # parsing there, yet a client still sending the rest must get the answer, not a reset.
        chunk = b"x" * 40000
        chunked = (
            b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 5
        )
        out = await raw_exchange(sock_path, chunked + b"0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413 ")
        code, _ = await request(sock_path, "POST", "/v1/echo", body=b"y" * 65536)
        assert code == 200


async def test_huge_headers_are_431(nursery: trio.Nursery, sock_path: Path) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        out = await raw_exchange(
            sock_path, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
        )
        assert out.startswith(b"HTTP/1.1 431 ")


async def test_socket_mode_and_parent_directory(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(5):
        private = tmp_path / "a" / "b" / "private.sock"
        await start(nursery, private)
        assert stat.S_ISSOCK(private.stat().st_mode)
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert stat.S_IMODE(private.parent.stat().st_mode) == 0o755
        group = tmp_path / "group.sock"
        await start(nursery, group, mode=0o660)
        assert stat.S_IMODE(group.stat().st_mode) == 0o660


async def test_socket_file_removed_on_exit(sock_path: Path) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            await start(inner, sock_path)
            assert is_socket(sock_path)
            inner.cancel_scope.cancel()
        assert not is_socket(sock_path)
        with pytest.raises(NotRunningError):
            await request(sock_path, "GET", "/v1/status")


def is_socket(path: Path) -> bool:
    return path.is_socket()


def leave_stale_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nothing listens: what a killed daemon leaves behind


async def test_stale_socket_is_not_running_and_then_replaced(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    with trio.fail_after(5):
        leave_stale_socket(sock_path)
        with pytest.raises(NotRunningError, match=f"not running: nothing listens on {sock_path}"):
            await get_json(sock_path, "/v1/status")
        await start(nursery, sock_path)
        assert await get_json(sock_path, "/v1/status") == STATUS


async def test_missing_socket_is_not_running(tmp_path: Path) -> None:
    with trio.fail_after(5), pytest.raises(NotRunningError, match="nothing listens"):
        await get_json(tmp_path / "absent.sock", "/v1/status")


async def test_live_socket_is_refused_and_keeps_serving(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        with pytest.raises(ControlError, match="another process is already listening on"):
            await serve_control(sock_path, make_router())
        assert await get_json(sock_path, "/v1/status") == STATUS


async def test_regular_file_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with trio.fail_after(5), pytest.raises(ControlError, match="not a socket"):
        await serve_control(path, make_router())
    assert path.read_text() == "precious"


async def test_handler_exception_is_500_and_server_keeps_serving(
    nursery: trio.Nursery, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        with caplog.at_level(logging.ERROR, logger="tunneld.control"):
            code, body = await request(sock_path, "GET", "/v1/boom")
        assert code == 500 and b'"error"' in body
        assert b"secret detail" not in body and b"Traceback" not in body
        assert any("secret detail" in r.getMessage() for r in caplog.records)
        # A bug shows its cause: the record carries the traceback.
        assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)
        assert await get_json(sock_path, "/v1/status") == STATUS


async def test_idle_and_slow_clients_do_not_block_others(
    nursery: trio.Nursery, sock_path: Path
) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path, idle_timeout=0.5)
        idle = await trio.open_unix_socket(sock_path)
        slow = await trio.open_unix_socket(sock_path)
        await slow.send_all(b"GET /v1/status HTTP/1.1\r\nHo")
        with trio.fail_after(0.4):  # served while both others still hold their connections
            assert await get_json(sock_path, "/v1/status") == STATUS
        # After idle_timeout: the idle connection is closed quietly, the stalled one gets 408.
        assert await idle.receive_some(1000) == b""
        out = b""
        while chunk := await slow.receive_some(1000):
            out += chunk
        assert out.startswith(b"HTTP/1.1 408 ")
        await idle.aclose()
        await slow.aclose()


async def test_client_timeout_names_the_socket(nursery: trio.Nursery, sock_path: Path) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        with pytest.raises(ControlError, match=f"no answer from {sock_path} within 0.2s"):
            await request(sock_path, "GET", "/v1/hang", timeout=0.2)


async def test_get_json_rejects_bad_json(nursery: trio.Nursery, sock_path: Path) -> None:
    with trio.fail_after(5):
        await start(nursery, sock_path)
        with pytest.raises(ControlError, match="bad JSON"):
            await get_json(sock_path, "/metrics")


def test_peer_allowed_rules() -> None:
    me = 1000
    assert peer_allowed(0, 0, own_uid=me, mode=0o600, sock_gid=50)
    assert peer_allowed(me, 1000, own_uid=me, mode=0o600, sock_gid=50)
    assert not peer_allowed(1234, 50, own_uid=me, mode=0o600, sock_gid=50)
    assert peer_allowed(1234, 50, own_uid=me, mode=0o660, sock_gid=50)
    assert not peer_allowed(1234, 51, own_uid=me, mode=0o660, sock_gid=None)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # tmp_path is 0700; another user must be able to reach the socket here.
    path = Path(tempfile.mkdtemp(prefix="tunneld-control-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def connect_as(uid: int, path: Path) -> socket.socket:
    """Connect with another effective uid: SO_PEERCRED records the connecting euid."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.seteuid(uid)
    try:
        s.connect(str(path))
    finally:
        os.seteuid(0)
    return s


@pytest.mark.skipif(
    not hasattr(socket, "SO_PEERCRED") or os.geteuid() != 0, reason="needs Linux and root"
)
async def test_other_user_refused_even_if_socket_opened_up(
    nursery: trio.Nursery, shared_dir: Path
) -> None:
    path = shared_dir / "control.sock"
    with trio.fail_after(5):
        await start(nursery, path)
        path.chmod(0o666)  # someone widened the file: the peer check still holds
        stranger = trio.SocketStream(trio.socket.from_stdlib_socket(connect_as(65534, path)))
        async with stranger:
            code, body = await RawClient(stranger).get("/v1/status")
        assert code == 403 and b"uid 65534" in body
        assert await get_json(path, "/v1/status") == STATUS  # root still gets in
