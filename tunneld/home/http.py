"""Sans-IO pieces of the reverse proxy: header rewriting, smuggling checks, error pages.

Nothing here does I/O; `proxy.py` moves the bytes. h11 parses and frames both
sides; these functions decide what crosses from one side to the other.
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable

import h11

__all__ = [
    "Headers",
    "error_response",
    "forwarded_chain",
    "forwarded_value",
    "head_problem",
    "is_upgrade",
    "request_body_framing",
    "response_headers",
    "upstream_request_headers",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1: connection-specific headers never cross a proxy. Transfer-Encoding
# is re-framed by h11 on each side; Upgrade crosses only on an upgrade exchange.
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

_HEAD_END = re.compile(rb"\n\r?\n")
_OBS_FOLD = re.compile(rb"\n[ \t]")
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


def head_problem(
    buffer: bytes | bytearray, max_size: int, start: int = 0
) -> tuple[int, str] | None:
    """(status, reason) when the request head at the start of `buffer` must be refused.

    431 when the head is (or already grows) longer than `max_size`: h11's own
    limit only counts incomplete heads, so a big head arriving in one read would
    pass it. 400 for what h11 accepts but a proxy must not forward, because the
    upstream may read it differently (request smuggling): obs-fold continuation
    lines (h11 unfolds them), a repeated or comma-listed Content-Length (h11
    merges equal ones), Content-Length together with Transfer-Encoding (h11 lets
    chunked win), and a second Host (RFC 9112 3.2). None while the head is
    incomplete and small enough; `start` skips bytes already searched for its end.
    """
    end = _HEAD_END.search(buffer, max(0, start - 2))
    if (end.end() if end is not None else len(buffer)) > max_size:
        return 431, f"request head larger than {max_size} bytes"
    if end is None:
        return None
    head = bytes(buffer[: end.start() + 1])
    if _OBS_FOLD.search(head):
        return 400, "obsolete line folding in the request head"
    lengths = encodings = hosts = 0
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.lower()
        if name == b"content-length":
            lengths += 1 + value.count(b",")
        elif name == b"transfer-encoding":
            encodings += 1
        elif name == b"host":
            hosts += 1
    if lengths > 1:
        return 400, "more than one Content-Length"
    if lengths and encodings:
        return 400, "both Content-Length and Transfer-Encoding"
    if hosts > 1:
        return 400, "more than one Host"
    return None


def request_body_framing(request: h11.Request) -> tuple[bool, int | None]:
    """(chunked, content_length) of a request h11 accepted (so at most one of each)."""
    chunked = False
    length: int | None = None
    for name, value in request.headers:
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            length = int(value)
    return chunked, length


def is_upgrade(request: h11.Request) -> bool:
    """A protocol upgrade request (WebSocket): `Upgrade` named in `Connection`."""
    return b"upgrade" in _connection_tokens(request.headers) and any(
        name == b"upgrade" for name, _ in request.headers
    )


def forwarded_chain(request: h11.Request) -> list[str]:
    """The forwarded chain a (trusted) peer sent: X-Forwarded-For, else Forwarded for=."""
    xff = [v for n, v in request.headers if n == b"x-forwarded-for"]
    if xff:
        return [p.strip().decode("latin-1") for v in xff for p in v.split(b",") if p.strip()]
    chain: list[str] = []
    for name, value in request.headers:
        if name != b"forwarded":
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
    request: h11.Request, client_ip: str, host: bytes, *, chunked: bool, upgrade: bool
) -> Headers:
    """The request's headers as the upstream must see them.

    Hop-by-hop headers and every client-sent forwarding header are dropped, then
    exactly one true value each is added: X-Forwarded-For (a bare address),
    X-Forwarded-Proto, X-Forwarded-Host and Forwarded. `host` is the Host header
    (or the SNI when the client sent none, which the upstream then gets as Host).
    """
    named = _connection_tokens(request.headers)
    out: Headers = []
    has_host = False
    for raw_name, value in request.headers.raw_items():
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
        upgrade_value = b", ".join(v for n, v in request.headers if n == b"upgrade")
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


def response_headers(response: h11.Response | h11.InformationalResponse) -> Headers:
    """The upstream response's headers as the client must see them.

    A 101 keeps `Upgrade` and says `Connection: upgrade`. When the upstream sent
    Transfer-Encoding, its Content-Length (if any) was ignored by h11 and must
    not reach the client either: h11 re-frames the body for the client.
    """
    named = _connection_tokens(response.headers)
    switching = response.status_code == 101
    chunked = any(n == b"transfer-encoding" for n, _ in response.headers)
    out: Headers = []
    for raw_name, value in response.headers.raw_items():
        name = raw_name.lower()
        if switching and name == b"upgrade":
            out.append((raw_name, value))
            continue
        if name in _HOP_BY_HOP or name in named or name.startswith(b"proxy-"):
            continue
        if chunked and name == b"content-length":
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
    502: "The home server's application is not reachable right now.",
    504: "The home server's application did not answer in time.",
}


def reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_response(status: int) -> tuple[h11.Response, bytes]:
    """A small HTML error page that closes the connection."""
    phrase = reason(status).decode("ascii")
    message = _MESSAGES.get(status, "")
    body = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{status} {phrase}</title>'
        f"</head>\n<body><h1>{status} {phrase}</h1><p>{message}</p></body></html>\n"
    ).encode()
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    ]
    return h11.Response(status_code=status, headers=headers, reason=reason(status)), body
