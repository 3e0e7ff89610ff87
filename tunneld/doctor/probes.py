"""The network probes `tunneld doctor` makes: resolve, connect, TLS, one HTTP request.

Blocking and bounded: the doctor is a short command that runs its checks one after
another, each with its own timeout, so plain sockets are the simplest correct tool.
Nothing here logs or returns a secret: headers passed in (a token) are only sent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import h11
import trio

from tunneld.errors import ControlError, NotRunningError
from tunneld.hostnames import hostname_key

__all__ = [
    "running_status",
    "HttpAnswer",
    "Resolver",
    "TlsPeer",
    "http_request",
    "is_lan_address",
    "open_tcp",
    "open_tls",
]

TIMEOUT = 5.0
MAX_BODY = 64 * 1024

# Addresses that belong to a home network, not to the internet: a name resolving here to
# one of these is split DNS or a mistake (DNS pointing at the router's LAN side).
_LAN_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
    )
)


def is_lan_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in _LAN_NETWORKS)


@dataclass
class Resolver:
    """getaddrinfo, with `--resolve NAME:ADDRESS` overrides (curl's idea): check a setup
    before its DNS records exist, or see what another resolver would answer."""

    overrides: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, entries: Sequence[str]) -> Resolver:
        """`NAME:ADDRESS` entries (repeat a name for several addresses); ValueError."""
        out: dict[str, list[str]] = {}
        for entry in entries:
            name, sep, address = entry.partition(":")
            address = address.strip().strip("[]")
            if not sep or not name.strip() or not address:
                raise ValueError(f"--resolve: expected NAME:ADDRESS, got {entry!r}")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"--resolve: {address!r} is not an IP address") from None
            out.setdefault(hostname_key(name), []).append(address)
        return cls(out)

    def resolve(self, name: str) -> list[str]:
        """The addresses of `name` (an IP address resolves to itself); OSError if none."""
        try:
            ipaddress.ip_address(name)
            return [name]
        except ValueError:
            pass
        key = hostname_key(name)
        if key in self.overrides:
            return list(self.overrides[key])
        infos = socket.getaddrinfo(key, None, type=socket.SOCK_STREAM)
        seen: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in seen:
                seen.append(address)
        return seen


def open_tcp(address: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout)


@dataclass
class TlsPeer:
    sock: ssl.SSLSocket
    sha256: str  # the leaf certificate's fingerprint, lowercase hex
    alpn: str | None


def open_tls(
    address: str,
    port: int,
    server_name: str,
    context: ssl.SSLContext,
    timeout: float = TIMEOUT,
) -> TlsPeer:
    """TCP + TLS handshake; raises OSError / ssl.SSLError (ssl.SSLCertVerificationError
    when the certificate does not verify)."""
    raw = open_tcp(address, port, timeout)
    try:
        sock = context.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise
    der = sock.getpeercert(binary_form=True) or b""
    return TlsPeer(sock, hashlib.sha256(der).hexdigest(), sock.selected_alpn_protocol())


def insecure_context(alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """For looking only (a fingerprint, a Date header): never send a secret over it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    return ctx


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    received_at: float

    def date(self) -> float | None:
        """The Date header as a Unix time, or None."""
        text = self.headers.get("date")
        if not text:
            return None
        try:
            return parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError):
            return None


def http_request(
    sock: socket.socket,
    host: str,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    method: str = "GET",
    timeout: float = TIMEOUT,
    connection: str = "close",
) -> HttpAnswer:
    """One request (`Connection: close`, or `Upgrade` for a handshake); the answer's head
    and up to MAX_BODY of its body (a 101 answer has no body). Raises OSError or
    h11.ProtocolError."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method=method,
        target=target,
        headers=[("Host", host), ("Connection", connection), *headers],
    )
    sock.settimeout(timeout)
    sock.sendall((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    deadline = time.monotonic() + timeout
    answer: HttpAnswer | None = None
    body = bytearray()
    while time.monotonic() < deadline:
        try:
            event = conn.next_event()
        except h11.ProtocolError as exc:
            raise ValueError(f"not an HTTP answer ({exc})") from None
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            conn.receive_data(data)
            if not data and answer is not None:
                break
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            return HttpAnswer(101, _headers(event.headers), b"", time.time())
        if isinstance(event, h11.Response):
            answer = HttpAnswer(event.status_code, _headers(event.headers), b"", time.time())
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) >= MAX_BODY:
                break
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if answer is None:
        raise TimeoutError("no HTTP answer in time")
    answer.body = bytes(body[:MAX_BODY])
    return answer


def _headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def describe(exc: BaseException) -> str:
    """One short line for a probe failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate does not verify: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"does not resolve ({exc.strerror})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def colon(sha256: str) -> str:
    up = sha256.upper()
    return ":".join(up[i : i + 2] for i in range(0, len(up), 2))


def running_status(control_socket: Path) -> dict[str, Any] | None | str:
    """A running process's status from its control socket: None when it does not run,
    or why it cannot be read."""
    from tunneld.control import get_json

    try:
        status = trio.run(get_json, control_socket, "/v1/status")
    except NotRunningError:
        return None
    except (ControlError, OSError) as exc:
        return str(exc)
    return status if isinstance(status, dict) else "a bad status answer"
