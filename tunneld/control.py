"""The control socket: HTTP/1.1 (h11) over a unix socket, server and client.

The daemon and the relay serve `GET /v1/status`, `GET /metrics` and the ban
endpoints here; `tunneld status` and `tunneld bans` are the clients.

Access control, in two layers:

* The socket file: created private (bind under umask 0o177), then chmod'ed to
  `mode` (0600 or 0660) before listen(), so there is no moment where anyone
  else could connect. Its parent directory is created 0755 if missing: the
  socket file is the gate, and with mode 0660 the group must be able to
  traverse the directory (systemd's RuntimeDirectory= also defaults to 0755).
* Peer credentials (SO_PEERCRED, Linux): a connection is served only for
  uid 0, the daemon's own uid, or -- when `mode` has group bits -- a member
  of the socket file's group. This keeps the promise of `mode` even if someone
  later chmods the file wider. Other peers get 403. Where SO_PEERCRED does not
  exist, the file mode alone decides.

I/O errors are translated once, at the boundary: the server never lets one
connection's failure reach the accept loop, and the client raises only
ControlError / NotRunningError.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from tunneld.errors import (
    AlreadyRunningError,
    ControlError,
    ControlPermissionError,
    NotRunningError,
)
from tunneld.httpio import next_event, send_response

__all__ = [
    "ControlRequest",
    "ControlResponse",
    "Handler",
    "Router",
    "get_json",
    "request",
    "serve_control",
]

log = logging.getLogger("tunneld.control")

MAX_REQUEST_BODY = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
IDLE_TIMEOUT = 10.0  # per request: reading it, and writing its answer
DIR_MODE = 0o755
# The daemon's and the relay's sockets: the owner and the owner's group (under systemd, the
# service's own group, `tunneld` or `tunneld-relay`), so `status` works for members of it.
SOCKET_MODE = 0o660
_RECV_SIZE = 64 * 1024
_DRAIN_BYTES = 256 * 1024  # read and dropped before closing after an early error
_DRAIN_SECONDS = 1.0


@dataclass(frozen=True)
class ControlRequest:
    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, str]  # the last value wins for a repeated key
    body: bytes


@dataclass(frozen=True)
class ControlResponse:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, obj: object, status: int = 200) -> ControlResponse:
        return cls(status, json.dumps(obj).encode() + b"\n")

    @classmethod
    def error(cls, status: int, message: str) -> ControlResponse:
        """The JSON error body every non-2xx answer carries: {"error": "..."}."""
        return cls.json({"error": message}, status)


Handler = Callable[[ControlRequest], Awaitable[ControlResponse]]


class Router:
    """Exact-path routing; itself a Handler. 404 for unknown paths, 405 for a wrong method."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        methods = self._routes.setdefault(path, {})
        if method.upper() in methods:
            raise ValueError(f"route {method.upper()} {path} is already registered")
        methods[method.upper()] = handler

    async def __call__(self, req: ControlRequest) -> ControlResponse:
        methods = self._routes.get(req.path)
        if methods is None:
            return ControlResponse.error(404, f"no such endpoint: {req.path}")
        handler = methods.get(req.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return ControlResponse.error(
                405, f"method {req.method} not allowed on {req.path} (allowed: {allowed})"
            )
        return await handler(req)


# ---------------------------------------------------------------- server


async def serve_control(
    socket_path: Path,
    handler: Handler,
    *,
    mode: int = 0o600,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on a unix socket until cancelled; the socket file is removed on exit.

    `task_status.started()` is called once the socket listens. Raises ControlError if the
    socket cannot be set up, e.g. when another process already listens on `socket_path`.
    """
    socket_path = Path(socket_path)
    _ensure_parent(socket_path.parent)
    await _remove_stale_socket(socket_path)
    sock, ident = _bind_private(socket_path, mode)
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            log.debug("control socket listening on %s", socket_path)
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: wait, do not die
                    log.warning("control socket %s: accept failed: %s", socket_path, exc)
                    await trio.sleep(0.1)
                    continue
                conn = _ServerConnection(stream, handler, socket_path, mode, ident, idle_timeout)
                nursery.start_soon(conn.run)
    finally:
        sock.close()
        _unlink_if_ours(socket_path, ident)


def _ensure_parent(directory: Path) -> None:
    # An existing directory is left as it is (systemd's RuntimeDirectory= may own it); a new
    # one gets DIR_MODE exactly, whatever the umask.
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(DIR_MODE)
    except OSError as exc:
        raise ControlError(f"cannot create {directory}: {exc.strerror or exc}") from None


async def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file nobody listens on; refuse if a live process answers."""
    if not _existing_socket(path):
        return
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(1.0):
            await probe.connect(str(path))
        # Connected, or still waiting on a full backlog: either way, a live listener.
        raise AlreadyRunningError(f"another process is already listening on {path}", str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale (or vanished meanwhile)
    except PermissionError:
        raise ControlError(f"permission denied on {path}: cannot tell if it is in use") from None
    finally:
        probe.close()
    log.info("removing stale control socket %s", path)
    _unlink(path, "stale socket")


def _existing_socket(path: Path) -> bool:
    # Plain syscalls on a local runtime directory: not worth a thread.
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ControlError(f"cannot inspect {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not removing it")
    return True


def _unlink(path: Path, what: str) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise ControlError(f"cannot remove {what} {path}: {exc.strerror or exc}") from None


def _bind_private(path: Path, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen with `mode` applied before listen(); returns the socket and (dev, ino).

    Bound synchronously: trio binds unix sockets in a thread, and the umask is process-wide,
    so no other task may run while it is narrowed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        st = path.lstat()
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock, (st.st_dev, st.st_ino)


def _unlink_if_ours(path: Path, ident: tuple[int, int]) -> None:
    # Never remove a socket another process has bound at the same path since.
    try:
        st = path.lstat()
        if (st.st_dev, st.st_ino) == ident:
            path.unlink()
    except OSError:
        pass


def peer_allowed(
    peer_uid: int, peer_gid: int, *, own_uid: int, mode: int, sock_gid: int | None
) -> bool:
    """Who may use the control socket: root, our own uid, and the socket's group if `mode`
    grants group access (primary group, or listed as a member in the group database)."""
    if peer_uid in (0, own_uid):
        return True
    if not mode & 0o060 or sock_gid is None:
        return False
    if peer_gid == sock_gid:
        return True
    try:
        user = pwd.getpwuid(peer_uid)
        return user.pw_gid == sock_gid or user.pw_name in grp.getgrgid(sock_gid).gr_mem
    except KeyError:
        return False


class _Close(Exception):
    """End this connection quietly (peer gone or idle)."""


class _Refuse(Exception):
    """Answer with an error status, then close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ServerConnection:
    def __init__(
        self,
        stream: trio.SocketStream,
        handler: Handler,
        path: Path,
        mode: int,
        ident: tuple[int, int],
        idle_timeout: float,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.path = path
        self.mode = mode
        self.ident = ident
        self.idle_timeout = idle_timeout
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def run(self) -> None:
        # The boundary: nothing raised for one connection may reach the accept loop.
        try:
            async with self.stream:
                await self._serve()
        except (_Close, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception as exc:  # a bug: logged with its traceback, the accept loop lives on
            log.exception("control connection on %s failed: %r", self.path, exc)

    async def _serve(self) -> None:
        refusal = self._check_peer()
        while True:
            try:
                req = await self._read_request()
            except _Refuse as exc:
                await self._send(ControlResponse.error(exc.status, exc.message), close=True)
                await self._drain()
                return
            if refusal is not None:
                await self._send(ControlResponse.error(403, refusal), close=True)
                return
            resp = await self._dispatch(req)
            await self._send(resp, close=False, head=req.method == "HEAD")
            if self.conn.our_state is h11.MUST_CLOSE:
                return
            self.conn.start_next_cycle()

    def _check_peer(self) -> str | None:
        if not hasattr(socket, "SO_PEERCRED"):
            return None
        fmt = "3i"
        raw = self.stream.socket.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)
        )
        _pid, uid, gid = struct.unpack(fmt, raw)
        try:
            st = self.path.lstat()
            sock_gid: int | None = st.st_gid if (st.st_dev, st.st_ino) == self.ident else None
        except OSError:
            sock_gid = None
        if peer_allowed(uid, gid, own_uid=os.geteuid(), mode=self.mode, sock_gid=sock_gid):
            return None
        log.warning("control socket %s: refused uid %d", self.path, uid)
        return f"uid {uid} may not use the control socket {self.path}"

    async def _read_request(self) -> ControlRequest:
        with trio.move_on_after(self.idle_timeout) as scope:
            try:
                return await self._read_request_inner()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                text = "request headers too large" if status == 431 else f"bad request: {exc}"
                raise _Refuse(status, text) from None
        # Idle between requests: just close. Stalled mid-request: say so.
        assert scope.cancelled_caught
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            raise _Close()
        raise _Refuse(408, f"request not received within {self.idle_timeout:g}s")

    async def _read_request_inner(self) -> ControlRequest:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            raise _Close()
        assert isinstance(event, h11.Request)
        # h11 bounds only an incomplete head; one large read can carry a complete oversized one.
        if len(event.target) + sum(len(n) + len(v) for n, v in event.headers) > MAX_HEADER_BYTES:
            raise _Refuse(431, "request headers too large")
        length = _content_length(event.headers)
        if length is not None and length > MAX_REQUEST_BODY:
            raise _Refuse(413, f"request body larger than {MAX_REQUEST_BODY} bytes")
        if self.conn.they_are_waiting_for_100_continue:
            await self.stream.send_all(
                self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.EndOfMessage):
                break
            assert isinstance(part, h11.Data)
            body += part.data
            if len(body) > MAX_REQUEST_BODY:
                raise _Refuse(413, f"request body larger than {MAX_REQUEST_BODY} bytes")
        split = urlsplit(event.target.decode("ascii"))
        return ControlRequest(
            method=event.method.decode("ascii").upper(),
            path=unquote(split.path) or "/",
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            body=bytes(body),
        )

    async def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        return await next_event(self.stream, self.conn, _RECV_SIZE)

    async def _dispatch(self, req: ControlRequest) -> ControlResponse:
        try:
            return await self.handler(req)
        except Exception as exc:  # a bug: logged with its traceback, the client gets a 500
            log.exception("control %s %s failed: %r", req.method, req.path, exc)
            return ControlResponse.error(500, "internal error (see the daemon's log)")

    async def _send(self, resp: ControlResponse, *, close: bool, head: bool = False) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _Close()  # too late to answer (should not happen)
        headers = [
            ("Content-Type", resp.content_type),
            ("Content-Length", str(len(resp.body))),
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(resp.status).phrase
        except ValueError:
            reason = ""
        with trio.fail_after(self.idle_timeout):
            await send_response(
                self.stream, self.conn, resp.status, headers, resp.body, head=head, reason=reason
            )

    async def _drain(self) -> None:
        # Closing a unix socket with unread input resets the peer, which could lose the
        # error answer we just sent; so stop writing and read a bounded amount first.
        try:
            await self.stream.send_eof()
            with trio.move_on_after(_DRAIN_SECONDS):
                total = 0
                while total < _DRAIN_BYTES:
                    chunk = await self.stream.receive_some(_RECV_SIZE)
                    if not chunk:
                        break
                    total += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


# ---------------------------------------------------------------- client


# The `timeout` parameters are the contract the CLI uses; they are applied with fail_after.
async def request(
    socket_path: Path,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    timeout: float = 5.0,  # noqa: ASYNC109
) -> tuple[int, bytes]:
    """One HTTP request on the control socket; returns (status, body).

    Raises NotRunningError if nothing listens on `socket_path`, ControlError otherwise.
    """
    try:
        with trio.fail_after(timeout):
            stream = await _connect(Path(socket_path))
            async with stream:
                return await _exchange(stream, socket_path, method, path, body)
    except trio.TooSlowError:
        raise ControlError(f"no answer from {socket_path} within {timeout:g}s") from None


async def get_json(socket_path: Path, path: str, *, timeout: float = 5.0) -> object:  # noqa: ASYNC109
    """GET `path` and decode its JSON body; ControlError on a non-2xx status or bad JSON."""
    status, data = await request(socket_path, "GET", path, timeout=timeout)
    if not 200 <= status < 300:
        raise ControlError(f"GET {path} on {socket_path}: {status} {_error_text(data)}")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ControlError(f"GET {path} on {socket_path}: bad JSON answer: {exc}") from None


async def _connect(path: Path) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunningError(f"not running: nothing listens on {path}") from None
    except PermissionError:
        raise ControlPermissionError(
            f"permission denied on {path}: {_access_advice(path)}"
        ) from None
    except OSError as exc:
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None


async def _exchange(
    stream: trio.SocketStream, socket_path: Path, method: str, path: str, body: bytes
) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    headers = [
        ("Host", "localhost"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if body:
        headers.append(("Content-Type", "application/json"))
    try:
        out = conn.send(h11.Request(method=method.upper(), target=path, headers=headers)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        status = 0
        answer = bytearray()
        while True:
            event = await next_event(stream, conn, _RECV_SIZE)
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer += event.data
                if len(answer) > MAX_RESPONSE_BYTES:
                    raise ControlError(
                        f"answer from {socket_path} larger than {MAX_RESPONSE_BYTES} bytes"
                    )
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(answer)
            elif isinstance(event, h11.ConnectionClosed):
                raise ControlError(f"{socket_path} closed the connection without an answer")
            # InformationalResponse (1xx): keep reading
    except h11.ProtocolError as exc:
        raise ControlError(f"bad answer from {socket_path}: {exc}") from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise ControlError(f"connection to {socket_path} broke: {exc}") from None


def _access_advice(path: Path) -> str:
    """Who may open `path`: root, its owner and, when its mode lets the group in, that group."""
    try:
        st = path.stat()
    except OSError:
        return "run as root (sudo)"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = f"gid {st.st_gid}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o060 == 0o060:
        return (
            f"it is {mode:04o} {owner}:{group}: run as root (sudo), as {owner}, or as a member "
            f"of group {group} (sudo usermod -aG {group} $USER, then log in again)"
        )
    return f"it is {mode:04o} {owner}:{group}: run as root (sudo) or as {owner}"


def _error_text(data: bytes) -> str:
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return str(obj["error"])
    return data[:200].decode("utf-8", "replace").strip() or "(empty answer)"
