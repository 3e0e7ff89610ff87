"""Sans-IO pieces of the reverse proxy: header rewriting, smuggling checks, error pages.

Nothing here does I/O; `proxy.py` moves the bytes. `http1.py` parses and frames
both sides (and refuses smuggling shapes); these functions decide what crosses
from one side to the other.
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable

from tunneld.home.proxy.http1 import Request, Response

__all__ = [
    "HeaderList",
    "error_response",
    "forwarded_chain",
    "forwarded_value",
    "is_upgrade",
    "response_headers",
    "upstream_request_headers",
]

HeaderList = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1: connection-specific headers never cross a proxy. Transfer-Encoding
# is re-framed by the proxy on each side; Upgrade crosses only on an upgrade exchange.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Headers that claim to say who the client is. Matched after lower-casing and
# turning "_" into "-": several servers (CGI/WSGI style, some frameworks) read
# X_Forwarded_For as X-Forwarded-For, so that spelling must go too.
_FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-original-forwarded-for",
    }
)
_FORWARDING_PREFIX = b"x-forwarded-"

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _norm(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


def _is_forwarding(name: bytes) -> bool:
    name = _norm(name)
    return name in _FORWARDING or name.startswith(_FORWARDING_PREFIX)


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names `Connection` marks hop-by-hop; never the ones that frame the message."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens - _NEVER_NAMED


_NEVER_NAMED = frozenset({b"", b"content-length", b"host"})


def is_upgrade(request: Request) -> bool:
    """A protocol upgrade request (WebSocket): `Upgrade` named in `Connection`."""
    return b"upgrade" in _connection_tokens(request.headers) and any(
        name.lower() == b"upgrade" for name, _ in request.headers
    )


def forwarded_chain(request: Request) -> list[str]:
    """The forwarded chain a (trusted) peer sent: X-Forwarded-For, else Forwarded for=."""
    xff = [v for n, v in request.headers if n.lower() == b"x-forwarded-for"]
    if xff:
        return [p.strip().decode("latin-1") for v in xff for p in v.split(b",") if p.strip()]
    chain: list[str] = []
    for name, value in request.headers:
        if name.lower() != b"forwarded":
            continue
        for element in value.split(b","):
            for pair in element.split(b";"):
                key, eq, node = pair.partition(b"=")
                if eq and key.strip().lower() == b"for":
                    chain.append(node.strip().decode("latin-1"))
    return chain


def _quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def forwarded_value(client_ip: str, host: bytes) -> bytes:
    """RFC 7239 `Forwarded`: for=<ip>;proto=https;host=<host>, IPv6 quoted and bracketed."""
    node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    host_value = host if _TOKEN.fullmatch(host) else _quoted(host)
    return b"for=" + node.encode("ascii") + b";proto=https;host=" + host_value


def upstream_request_headers(
    request: Request, client_ip: str, host: bytes, *, chunked: bool, upgrade: bool
) -> HeaderList:
    """The request's headers as the upstream must see them.

    Hop-by-hop headers and every client-sent forwarding header are dropped, then
    exactly one true value each is added: X-Forwarded-For (a bare address),
    X-Forwarded-Proto, X-Forwarded-Host and Forwarded. `host` is the Host header
    (or the SNI when the client sent none, which the upstream then gets as Host).
    """
    named = _connection_tokens(request.headers)
    out: HeaderList = []
    has_host = False
    for raw_name, value in request.headers:
        name = raw_name.lower()
        if name in _HOP_BY_HOP or name in named or name.startswith(b"proxy-"):
            continue
        if _is_forwarding(name):
            continue
        if name == b"host":
            has_host = True
        out.append((raw_name, value))
    if not has_host:
        out.append((b"Host", host))
    if upgrade:
        upgrade_value = b", ".join(v for n, v in request.headers if n.lower() == b"upgrade")
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", upgrade_value))
    if chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    ip = client_ip.encode("ascii")
    out.append((b"X-Forwarded-For", ip))
    out.append((b"X-Forwarded-Proto", b"https"))
    out.append((b"X-Forwarded-Host", host))
    out.append((b"Forwarded", forwarded_value(client_ip, host)))
    return out


def response_headers(response: Response) -> HeaderList:
    """The upstream response's headers as the client must see them.

    A 101 keeps `Upgrade` and says `Connection: upgrade`. Content-Length never
    passes as sent (it may be repeated, listed, or overridden by Transfer-Encoding):
    the proxy frames the body for the client and adds the one length it read.
    """
    named = _connection_tokens(response.headers)
    switching = response.status_code == 101
    out: HeaderList = []
    for raw_name, value in response.headers:
        name = raw_name.lower()
        if switching and name == b"upgrade":
            out.append((raw_name, value))
            continue
        if name in _HOP_BY_HOP or name in named or name.startswith(b"proxy-"):
            continue
        if name == b"content-length":
            continue
        out.append((raw_name, value))
    if switching:
        out.append((b"Connection", b"upgrade"))
    return out


_MESSAGES = {
    400: "The request was malformed.",
    405: "This method is not supported here.",
    408: "The request took too long to arrive.",
    431: "The request headers are too large.",
    501: "This transfer coding is not supported.",
    505: "This HTTP version is not supported.",
    502: "The home server's application is not reachable right now.",
    504: "The home server's application did not answer in time.",
}


def reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_response(status: int) -> tuple[Response, bytes]:
    """A small HTML error page that closes the connection."""
    phrase = reason(status).decode("ascii")
    message = _MESSAGES.get(status, "")
    body = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{status} {phrase}</title>'
        f"</head>\n<body><h1>{status} {phrase}</h1><p>{message}</p></body></html>\n"
    ).encode()
    headers = (
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    )
    return Response(status, headers, reason(status)), body
