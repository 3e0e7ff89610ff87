"""Differential HTTP/1.1 framing: tunneld's RequestReader against aiohttp and h11.

The same request stream goes to several parsers, in the manner of the HTTP Garden:

- `forward(raw)` runs tunneld's `RequestReader` on the client's bytes and builds
  what the proxy sends upstream for them (the same header rewriting and body
  framing functions `proxy.py` uses), message by message.
- `parse_aiohttp(data, cls)` and `parse_h11(data)` parse a byte stream as a
  server does: aiohttp's request parser (the C one, `_http_parser`, and the
  pure-Python `HttpRequestParserPy`) with Home Assistant's limits, and h11.
- `check(raw)` compares them twice. Upstream: what tunneld forwards must be
  framed by every upstream parser exactly as tunneld framed it (message count,
  method, target, Host, header list, body, completeness); any other outcome is
  a *finding*. Raw: tunneld and h11 on the client's own bytes; each difference
  must match a documented rule (`RAW_RULES`, the table in
  docs/http-differential.md) or it is *unexplained*.

`cases(seed, n)` generates the streams: the classic smuggling seeds, then
grammar-built requests with mutations. Everything is deterministic per seed.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import h11
from aiohttp import http_parser
from aiohttp.base_protocol import BaseProtocol

from tunneld.errors import LocalHttpError, RemoteHttpError
from tunneld.home.proxy.http import is_upgrade, upstream_request_headers
from tunneld.home.proxy.http1 import (
    CHUNKED_END,
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Request,
    RequestReader,
    frame_chunk,
    frame_request_head,
)

try:  # the compiled parser; absent only when aiohttp was built without extensions
    from aiohttp._http_parser import HttpRequestParser as HttpRequestParserC
except ImportError:  # pragma: no cover
    HttpRequestParserC = None

# Home Assistant's server (homeassistant/components/http/__init__.py): handler_args
# max_line_size = max_field_size = MAX_LINE_SIZE = 24570; aiohttp's default 128 headers.
HA_MAX_LINE_SIZE = 24570
HA_MAX_HEADERS = 128
MAX_HEAD = 16 * 1024  # tunneld's [upstream] max_header_size default
CLIENT_IP = "127.0.0.7"
SNI = b"ha.example.test"

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass
class Msg:
    """One message as a parser framed it."""

    method: bytes
    target: bytes
    headers: Headers  # (lower-cased name, value), in order
    body: bytes = b""
    complete: bool = False

    @property
    def hosts(self) -> list[bytes]:
        return [v for n, v in self.headers if n == b"host"]

    def key(self) -> tuple[object, ...]:
        return (self.method, self.target, self.headers, self.body, self.complete)


@dataclass
class Parsed:
    messages: list[Msg] = field(default_factory=list)
    error: str | None = None  # why the parser refused the stream (after `messages`)


@dataclass
class Forwarded(Parsed):
    # What tunneld sends upstream, one item per request: the proxy sends a request and
    # waits for its response before it reads the next, all on one kept connection.
    segments: list[bytes] = field(default_factory=list)

    @property
    def upstream(self) -> bytes:
        return b"".join(self.segments)


def _lower(headers: Headers) -> Headers:
    return tuple((n.lower(), v) for n, v in headers)


# -- tunneld ----------------------------------------------------------------------
def read(raw: bytes, pieces: int = 1) -> Parsed:
    """tunneld's RequestReader alone on the client's bytes, then the client's close
    (the reader's contract: one message at a time, stopping after one that does not
    keep the connection)."""
    return _run(raw, pieces, forward=False, eof=True)


def forward(raw: bytes, pieces: int = 1) -> Forwarded:
    """What the proxy forwards for `raw` (as proxy.py: CONNECT refused, headers
    rewritten, chunked bodies re-chunked), with every message on one upstream
    connection (the kept-connection case, where a framing gap would smuggle)."""
    return _run(raw, pieces, forward=True)


def _run(raw: bytes, pieces: int, *, forward: bool, eof: bool = False) -> Forwarded:
    reader = RequestReader(MAX_HEAD)
    out = Forwarded()
    step = max(1, -(-len(raw) // pieces))
    chunks = [raw[i : i + step] for i in range(0, len(raw), step)] + [b""] * eof
    msg: Msg | None = None
    chunked = False
    while True:
        try:
            event = reader.next_event()
        except RemoteHttpError as exc:
            out.error = str(exc)
            break
        if event is NEED_DATA:
            if not chunks:
                break  # the client is still sending: what came so far is all there is
            reader.receive_data(chunks.pop(0))
            continue
        if event is PAUSED:
            if not reader.keep_alive:
                break
            reader.start_next_cycle()
            continue
        if isinstance(event, ConnectionClosed):
            break
        if isinstance(event, Request):
            chunked = reader.body_framing == "chunked"
            headers: Headers = event.headers
            if forward:
                if event.method == b"CONNECT":
                    out.error = "CONNECT (405)"
                    break
                host = next((v for n, v in event.headers if n.lower() == b"host"), b"") or SNI
                rewritten = upstream_request_headers(
                    event, CLIENT_IP, host, chunked=chunked, upgrade=is_upgrade(event)
                )
                try:
                    out.segments.append(frame_request_head(event.method, event.target, rewritten))
                except LocalHttpError as exc:
                    out.error = f"cannot forward: {exc}"
                    break
                headers = tuple(rewritten)
            msg = Msg(event.method, event.target, _lower(headers))
            out.messages.append(msg)
        elif isinstance(event, Data):
            assert msg is not None
            msg.body += event.data
            if forward:
                out.segments[-1] += b"".join(frame_chunk(event.data)) if chunked else event.data
        elif isinstance(event, EndOfMessage):
            assert msg is not None
            msg.complete = True
            if forward and chunked:
                out.segments[-1] += CHUNKED_END
    return out


# -- aiohttp -----------------------------------------------------------------------
_LOOP = asyncio.new_event_loop()  # never run: parsers and StreamReaders only need one


class _Protocol(BaseProtocol):
    pass


def parse_aiohttp(segments: list[bytes], cls: type) -> Parsed:
    """tunneld's upstream bytes through aiohttp's request parser as its web server
    feeds them: one request at a time, and a request that asked for an upgrade and
    got an ordinary answer is followed by the rest of the bytes as HTTP again."""
    parser = cls(
        _Protocol(_LOOP),
        _LOOP,
        2**16,
        max_line_size=HA_MAX_LINE_SIZE,
        max_field_size=HA_MAX_LINE_SIZE,
        max_headers=HA_MAX_HEADERS,
    )
    out = Parsed()
    for segment in segments:
        pending = segment
        for _ in range(100):
            try:
                messages, upgraded, tail = parser.feed_data(pending)
            except Exception as exc:  # aiohttp.http_exceptions.HttpProcessingError & co
                out.error = f"{type(exc).__name__}: {_last_line(exc)}"
                return out
            for message, payload in messages:
                body = b"".join(bytes(b) for b in getattr(payload, "_buffer", ()))
                out.messages.append(
                    Msg(
                        message.method.encode("utf-8", "surrogateescape"),
                        message.path.encode("utf-8", "surrogateescape"),
                        _lower(message.raw_headers),
                        body,
                        payload.is_eof() and payload.exception() is None,
                    )
                )
                if message.should_close:
                    return out
            if not upgraded:
                break
            parser.set_upgraded(False)  # the app answered without switching
            if not tail:
                break
            pending = tail
    return out


def _last_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " / ".join(lines[:2])


# -- h11 ---------------------------------------------------------------------------
def parse_h11(data: bytes | list[bytes], *, eof: bool = False) -> Parsed:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data if isinstance(data, bytes) else b"".join(data))
    if eof:
        conn.receive_data(b"")
    out = Parsed()
    msg: Msg | None = None
    for _ in range(100_000):
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            out.error = str(exc)
            return out
        if isinstance(event, h11.Request):
            msg = Msg(event.method, event.target, _lower(tuple(event.headers.raw_items())))
            out.messages.append(msg)
        elif isinstance(event, h11.Data):
            assert msg is not None
            msg.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert msg is not None
            msg.complete = True
            if conn.our_state is h11.SEND_RESPONSE:
                status = 405 if msg.method == b"CONNECT" else 200  # a 2xx would switch
                conn.send(h11.Response(status_code=status, headers=[(b"Content-Length", b"0")]))
                conn.send(h11.EndOfMessage())
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            elif conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
                return out
        elif event is h11.PAUSED:
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return out
        else:  # NEED_DATA, ConnectionClosed
            return out
    raise AssertionError("h11 did not stop")


# -- comparison --------------------------------------------------------------------
Parser = Callable[[list[bytes]], Parsed]


def upstream_parsers() -> dict[str, Parser]:
    parsers: dict[str, Parser] = {}
    if HttpRequestParserC is not None:
        parsers["aiohttp-c"] = lambda d: parse_aiohttp(d, HttpRequestParserC)
    parsers["aiohttp-py"] = lambda d: parse_aiohttp(d, http_parser.HttpRequestParserPy)
    parsers["h11"] = parse_h11
    return parsers


def versions() -> str:
    c = "C extension" if HttpRequestParserC is not None else "NO C extension"
    return f"aiohttp {aiohttp.__version__} ({c} + pure Python), h11 {h11.__version__}"


@dataclass(frozen=True)
class UpstreamRule:
    """A message tunneld forwards that an upstream parser refuses as a whole: the
    upstream answers 400 and closes, so nothing after it is framed at all."""

    id: str
    parser: str
    says: str

    def matches(self, parser: str, why: str) -> bool:
        return parser == self.parser and why.startswith(REFUSED) and self.says in why


REFUSED = "refused what tunneld forwarded: "
# Each id is a row of the second table in docs/http-differential.md.
UPSTREAM_RULES: tuple[UpstreamRule, ...] = (
    UpstreamRule("llhttp-methods", "aiohttp-c", "BadHttpMethod: "),
)


def upstream_difference(fwd: Forwarded, theirs: Parsed) -> str | None:
    """Why `theirs` (an upstream parser on tunneld's upstream bytes) frames them
    otherwise than tunneld did, or None when it agrees."""
    ours = fwd.messages
    if theirs.error is not None:
        return REFUSED + theirs.error
    if len(theirs.messages) != len(ours):
        return f"{len(theirs.messages)} messages where tunneld forwarded {len(ours)}"
    for i, (a, b) in enumerate(zip(ours, theirs.messages, strict=True)):
        for name in ("method", "target", "hosts", "headers", "body", "complete"):
            if getattr(a, name) != getattr(b, name):
                return f"message {i}: {name} {getattr(b, name)!r} != {getattr(a, name)!r}"
    return None


@dataclass(frozen=True)
class RawRule:
    """A documented difference between tunneld and h11 on a client's own bytes: the
    side that refuses a message the other takes, and the words of its refusal."""

    id: str
    refuses: str  # "tunneld" or "h11"
    says: tuple[str, ...]  # any of these in the refusing side's error

    def matches(self, side: str, error: str) -> bool:
        return side == self.refuses and any(words in error for words in self.says)


# Each id is a row of the table in docs/http-differential.md (a test checks both ways).
RAW_RULES: tuple[RawRule, ...] = (
    RawRule("obs-fold", "tunneld", ("obs-fold",)),
    RawRule("bare-cr", "tunneld", ("bare CR",)),
    RawRule("version", "tunneld", ("is not supported",)),
    RawRule("content-length-list", "tunneld", ("malformed Content-Length",)),
    RawRule("content-length-repeated", "tunneld", ("more than one Content-Length",)),
    RawRule("te-and-cl", "tunneld", ("both Content-Length and Transfer-Encoding",)),
    RawRule("te-http10", "tunneld", ("Transfer-Encoding in an HTTP/1.0 request",)),
    RawRule("chunk-size-digits", "tunneld", ("more than 15 hex digits",)),
    RawRule("chunk-line-lf", "tunneld", ("chunk-size line ended by a bare LF",)),
    RawRule("control-char", "tunneld", ("control character in a header",)),
    RawRule("chunk-ext-chars", "tunneld", ("control character in a chunk extension",)),
    RawRule("head-body", "tunneld", ("a HEAD request with a body",)),
    RawRule("upgrade-body", "tunneld", ("an upgrade request with a body",)),
    RawRule("method-case", "tunneld", ("must be upper case",)),
    RawRule("target-form", "tunneld", ("malformed request target",)),
    RawRule("singleton-field", "tunneld", ("more than one ",)),
    RawRule("chunk-ext-space", "h11", ("illegal chunk header",)),
    RawRule("empty-lines", "h11", ("no request line received",)),
)


def _raw_key(m: Msg) -> tuple[object, ...]:
    # h11 lower-cases Transfer-Encoding's value: a representation, not a difference.
    headers = tuple((n, v.lower() if n == b"transfer-encoding" else v) for n, v in m.headers)
    return (m.method, m.target, headers, m.body, m.complete)


def raw_verdict(ours: Parsed, h: Parsed) -> tuple[str, str] | None:
    """None when tunneld and h11 agree on the client's bytes; else (side, error) for
    the side that refused a message the other took, or ("both", why) for a message
    both accepted and framed differently (never explained)."""
    a = [_raw_key(m) for m in ours.messages]
    b = [_raw_key(m) for m in h.messages]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1

    def stopped(p: Parsed) -> bool:
        return p.error is not None and (
            len(p.messages) == n or (len(p.messages) == n + 1 and not p.messages[n].complete)
        )

    ours_stop, h_stop = stopped(ours), stopped(h)
    if ours_stop and h_stop:
        return None  # both refused the same message (their reasons may differ)
    if ours_stop:
        return ("tunneld", ours.error or "")
    if h_stop:
        return ("h11", h.error or "")
    if a == b and (ours.error is None) == (h.error is None):
        return None
    return ("both", f"framed differently from message {n}")


def explain_raw(verdict: tuple[str, str]) -> str | None:
    """The id of the rule that explains a raw difference; None when there is none."""
    side, error = verdict
    return next((rule.id for rule in RAW_RULES if rule.matches(side, error)), None)


@dataclass
class Report:
    cases: int = 0
    accepted: int = 0  # streams tunneld forwarded at least one message of
    messages: int = 0  # messages tunneld forwarded, all cases
    findings: list[tuple[str, bytes, str]] = field(default_factory=list)  # parser, raw, why
    explained: dict[str, int] = field(default_factory=dict)  # raw rule id -> count
    refused_upstream: dict[str, int] = field(default_factory=dict)  # upstream rule id -> count
    unexplained: list[tuple[bytes, tuple[str, str]]] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # tunneld's reasons -> count

    def summary(self) -> str:
        return (
            f"{self.cases} cases ({self.accepted} forwarded, {self.messages} messages): "
            f"{len(self.findings)} upstream findings, {sum(self.refused_upstream.values())} "
            f"documented upstream refusals {dict(sorted(self.refused_upstream.items()))}, "
            f"{sum(self.explained.values())} documented raw differences "
            f"{dict(sorted(self.explained.items()))}, {len(self.unexplained)} unexplained"
        )


def check(raw: bytes, report: Report, parsers: dict[str, Parser]) -> None:
    report.cases += 1
    fwd = forward(raw)
    if fwd.messages:
        report.accepted += 1
        report.messages += len(fwd.messages)
    if fwd.error is not None:
        reason = re.sub(r"\d+", "N", fwd.error)
        report.refusals[reason] = report.refusals.get(reason, 0) + 1
    for name, parse in parsers.items():
        why = upstream_difference(fwd, parse(fwd.segments))
        if why is None:
            continue
        rule = next((r.id for r in UPSTREAM_RULES if r.matches(name, why)), None)
        if rule is None:
            report.findings.append((name, raw, why))
        else:
            report.refused_upstream[rule] = report.refused_upstream.get(rule, 0) + 1
    verdict = raw_verdict(read(raw), parse_h11(raw, eof=True))
    if verdict is not None:
        rule = explain_raw(verdict)
        if rule is None:
            report.unexplained.append((raw, verdict))
        else:
            report.explained[rule] = report.explained.get(rule, 0) + 1


# -- the cases -----------------------------------------------------------------------
def _req(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("utf-8") + body


H = "Host: ha.example.test\n"

# The classic request-smuggling families, each a whole client stream.
SEEDS: tuple[bytes, ...] = (
    _req("GET / HTTP/1.1\n" + H + "\n"),
    _req("GET / HTTP/1.1\n" + H + "\nGET /2 HTTP/1.1\n" + H + "\n"),  # pipelining
    _req(
        "POST / HTTP/1.1\n" + H + "Content-Length: 5\n\n",
        b"helloGET /2 HTTP/1.1\r\n" + H.encode().replace(b"\n", b"\r\n") + b"\r\n",
    ),
    # CL.TE and TE.CL
    _req(
        "POST / HTTP/1.1\n" + H + "Content-Length: 6\nTransfer-Encoding: chunked\n\n", b"0\r\n\r\nG"
    ),
    _req(
        "POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\nContent-Length: 4\n\n",
        b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
    ),
    # TE.TE obfuscations
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: xchunked\n\n", b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding : chunked\n\n", b"0\r\n\r\n"),
    _req(
        "POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\nTransfer-encoding: x\n\n",
        b"0\r\n\r\n",
    ),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding:\tchunked\n\n", b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked, identity\n\n", b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: identity, chunked\n\n", b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: CHUNKED\n\n", b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + 'Transfer-Encoding: "chunked"\n\n', b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"0\r\n\r\n").replace(
        b"chunked", b"chunk\xe9d"
    ),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding\n : chunked\n\n", b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "X: y\n Transfer-Encoding: chunked\n\n", b"0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"0\r\n\r\n").replace(
        b"Transfer", b" Transfer"
    ),
    _req("POST / HTTP/1.0\n" + H + "Transfer-Encoding: chunked\n\n", b"0\r\n\r\n"),
    # Content-Length oddities
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 3\nContent-Length: 3\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 3\nContent-Length: 4\n\n", b"abcd"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 3, 3\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: +3\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: -1\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 0x3\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 3 \n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 03\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 3_0\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: \u0663\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length: 99999999999999999999\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content-Length : 3\n\n", b"abc"),
    _req("POST / HTTP/1.1\n" + H + "Content_Length: 3\n\n", b"abc"),
    _req(
        "GET / HTTP/1.1\n" + H + "Content-Length: 30\n\n", b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    # chunk-size tricks
    _req(
        "POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3;ext=1\r\nabc\r\n0\r\n\r\n"
    ),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3;\nabc\r\n0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3\nabc\r\n0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3 \r\nabc\r\n0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b" 3\r\nabc\r\n0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"0x3\r\nabc\r\n0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"+3\r\nabc\r\n0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"0003\r\nabc\r\n0\r\n\r\n"),
    _req(
        "POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n",
        b"10000000000000003\r\nabc\r\n0\r\n\r\n",
    ),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3\r\nabcX\r\n0\r\n\r\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3\r\nabc\n0\r\n\r\n"),
    _req(
        "POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3\r\nabc\r\n0\r\nX: y\r\n\r\n"
    ),
    _req(
        "POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n",
        b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n",
    ),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3\r\nabc\r\n0\n\n"),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3\r\nabc\r\n0;x\r\n\r\n"),
    _req(
        "POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n",
        b"3\r\nabc\r\n0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    _req("POST / HTTP/1.1\n" + H + "Transfer-Encoding: chunked\n\n", b"3\rabc\r\n0\r\n\r\n"),
    # bare LF and CR
    b"GET / HTTP/1.1\nHost: ha.example.test\n\n",
    b"GET / HTTP/1.1\r\nHost: ha.example.test\n\r\n",
    b"GET / HTTP/1.1\rHost: ha.example.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: ha.example.test\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: ha.example.test\r\n\n",
    b"\r\nGET / HTTP/1.1\r\nHost: ha.example.test\r\n\r\n",
    b"\nGET / HTTP/1.1\r\nHost: ha.example.test\r\n\r\n",
    # obs-fold and whitespace around names
    _req("GET / HTTP/1.1\n" + H + "X: a\n b\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X: a\n\tb\n\n"),
    _req("GET / HTTP/1.1\n" + H + " X: a\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X : a\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X\t: a\n\n"),
    _req("GET / HTTP/1.1\n" + H + ": a\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X a: b\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X:a\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X: \x00\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X: \x7f\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X: \x0b\n\n"),
    _req("GET / HTTP/1.1\n" + H + "X: a  \n\n"),
    # targets: absolute form, odd forms
    _req("GET http://ha.example.test/ HTTP/1.1\n" + H + "\n"),
    _req("GET http://evil.test/ HTTP/1.1\n" + H + "\n"),
    _req("GET https://evil.test:8443/x?y HTTP/1.1\n" + H + "\n"),
    _req("GET //evil.test/x HTTP/1.1\n" + H + "\n"),
    _req("OPTIONS * HTTP/1.1\n" + H + "\n"),
    _req("GET * HTTP/1.1\n" + H + "\n"),
    _req("GET /a#frag HTTP/1.1\n" + H + "\n"),
    _req("GET /a b HTTP/1.1\n" + H + "\n"),
    _req("GET /\x80 HTTP/1.1\n" + H + "\n"),
    _req("CONNECT ha.example.test:443 HTTP/1.1\n" + H + "\n"),
    _req("GET ha.example.test:443 HTTP/1.1\n" + H + "\n"),
    _req("get / HTTP/1.1\n" + H + "\n"),
    _req("FOO / HTTP/1.1\n" + H + "\n"),
    _req("GET / HTTP/1.1\n" + H + "\n").replace(b"GET ", b"GET  "),
    _req("GET / http/1.1\n" + H + "\n"),
    _req("GET / HTTP/1.2\n" + H + "\n"),
    _req("GET / HTTP/2.0\n" + H + "\n"),
    _req("GET / HTTP/0.9\n" + H + "\n"),
    _req("GET / HTTP/1.1 \n" + H + "\n"),
    _req("GET /\n\n"),
    # Host variants
    _req("GET / HTTP/1.1\n\n"),
    _req("GET / HTTP/1.0\n\n"),
    _req("GET / HTTP/1.1\nHost:\n\n"),
    _req("GET / HTTP/1.1\nHost: a\nHost: b\n\n"),
    _req("GET / HTTP/1.1\nHost: a\nhost: a\n\n"),
    _req("GET / HTTP/1.1\nHost: a b\n\n"),
    _req("GET / HTTP/1.1\nHost: evil.test:443@ha.example.test\n\n"),
    _req("GET / HTTP/1.1\nHost : a\n\n"),
    _req("GET / HTTP/1.1\nHost: a, b\n\n"),
    _req(
        "GET / HTTP/1.1\nX-Forwarded-For: 1.2.3.4\nX-Forwarded-Host: evil\nForwarded: for=1.2.3.4\n"
        + H
        + "\n"
    ),
    # connection management, upgrade
    _req("GET / HTTP/1.1\n" + H + "Connection: close\n\nGET /2 HTTP/1.1\n" + H + "\n"),
    _req("GET / HTTP/1.0\n" + H + "Connection: keep-alive\n\nGET /2 HTTP/1.1\n" + H + "\n"),
    _req(
        "GET / HTTP/1.1\n"
        + H
        + "Connection: Upgrade\nUpgrade: websocket\n\nGET /2 HTTP/1.1\n"
        + H
        + "\n"
    ),
    _req(
        "POST / HTTP/1.1\n" + H + "Connection: Upgrade\nUpgrade: websocket\nContent-Length: 4\n\n",
        b"abcdGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    _req(
        "POST / HTTP/1.1\n"
        + H
        + "Connection: Upgrade\nUpgrade: websocket\nTransfer-Encoding: chunked\n\n",
        b"4\r\nabcd\r\n0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    _req(
        "GET / HTTP/1.1\n" + H + "Connection: Upgrade\nUpgrade: h2c\n\nGET /2 HTTP/1.1\n" + H + "\n"
    ),
    _req("GET / HTTP/1.1\n" + H + "Connection: content-length\nContent-Length: 3\n\n", b"abc"),
    _req("GET / HTTP/1.1\n" + H + "Connection: host\n\n"),
    _req(
        "GET / HTTP/1.1\n" + H + "Connection: transfer-encoding\nTransfer-Encoding: chunked\n\n",
        b"0\r\n\r\n",
    ),
    _req("GET / HTTP/1.1\n" + H + "Expect: 100-continue\nContent-Length: 3\n\n", b"abc"),
)

_METHODS = ("GET",) * 6 + ("POST",) * 6 + ("PUT", "HEAD", "HEAD", "DELETE", "OPTIONS", "PATCH")
_METHODS += ("PROPFIND", "FOO", "get", "head", "Head", "connect")
_TARGETS = (
    "/",
    "/",
    "/api/states",
    "/api/states",
    "/a?b=c",
    "/a?b=c",
    "/%2e%2e/x",
    "http://ha.example.test/x",
    "http://evil.test/",
    "*",
    "//x",
    "/a#b",
    "/\xff",
)
_VERSIONS = ("HTTP/1.1",) * 16 + ("HTTP/1.0", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0")
_HOSTS = ("ha.example.test",) * 6 + (
    "ha.example.test:443",
    "evil.test",
    "",
    "a b",
    "[::1]:8123",
    "x@y",
)
_NAMES = (
    "User-Agent",
    "Accept",
    "X-Custom",
    "Cookie",
    "Authorization",
    "X-Forwarded-For",
    "Forwarded",
    "Expect",
    "Trailer",
    "TE",
    "Keep-Alive",
    "Proxy-Connection",
    "Upgrade",
)
_TE = (
    "chunked",
    "Chunked",
    "chunked ",
    " chunked",
    "chunked, chunked",
    "gzip, chunked",
    "chunked;q=1",
    "identity",
    "xchunked",
    "chunked\x0b",
    "chunk",
)
_CL_FORMAT = ("{n}",) * 10 + ("0{n}", "+{n}", "{n} ", " {n}", "{n},{n}", "{n}, {n}", "{m}")
_INTERESTING = (
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b":",
    b",",
    b";",
    b"0",
    b"a",
    b"\x00",
    b"\x0b",
    b"\x0c",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\r\n ",
    b"\r\n\r\n",
    b"-",
    b"_",
)


def _chunked_body(rng: random.Random, body: bytes) -> bytes:
    parts = []
    rest = body
    while rest:
        n = rng.randint(1, len(rest))
        size = rng.choice(("{:x}", "{:X}", "{:04x}", "{:x};e=1", "{:x} ", "{:x};", "{:x}\t;x"))
        eol = rng.choice(("\r\n",) * 8 + ("\n", "\r"))
        parts.append(size.format(n).encode() + eol.encode() + rest[:n] + b"\r\n")
        rest = rest[n:]
    last = rng.choice(
        (b"0\r\n\r\n",) * 6 + (b"0\r\nX-T: 1\r\n\r\n", b"0\n\n", b"00\r\n\r\n", b"0;z\r\n\r\n")
    )
    return b"".join(parts) + last


def _request(rng: random.Random) -> bytes:
    method = rng.choice(_METHODS)
    version = rng.choice(_VERSIONS)
    lines = [f"{method} {rng.choice(_TARGETS)} {version}"]
    headers: list[str] = []
    hosts = rng.choice((1,) * 10 + (0, 2))
    for _ in range(hosts):
        headers.append(f"{rng.choice(('Host', 'host', 'HOST'))}: {rng.choice(_HOSTS)}")
    for _ in range(rng.randint(0, 3)):
        headers.append(
            f"{rng.choice(_NAMES)}: {rng.choice(('1', 'close', 'websocket', 'x, y', '1.2.3.4'))}"
        )
    body = bytes(rng.choice(b"abcdefGET /\r\n0") for _ in range(rng.choice((0, 0, 1, 3, 10, 40))))
    framing = rng.choice(("none",) * 4 + ("cl",) * 4 + ("te",) * 4 + ("both", "te2", "cl2"))
    if framing in ("cl", "both", "cl2"):
        fmt = rng.choice(_CL_FORMAT)
        headers.append(
            "Content-Length: " + fmt.format(n=len(body), m=max(0, len(body) + rng.randint(-3, 3)))
        )
    if framing == "cl2":
        headers.append(f"Content-Length: {len(body) + rng.choice((0, 1))}")
    if framing in ("te", "both", "te2"):
        headers.append(f"Transfer-Encoding: {rng.choice(_TE) if rng.random() < 0.2 else 'chunked'}")
    if framing == "te2":
        headers.append(f"Transfer-Encoding: {rng.choice(_TE)}")
    if rng.random() < 0.2:
        headers.append(
            f"Connection: {rng.choice(('close', 'keep-alive', 'Upgrade', 'upgrade, close', 'te'))}"
        )
    rng.shuffle(headers)
    eol = "\r\n" if rng.random() < 0.9 else "\n"
    head = (eol.join(lines + headers) + eol + eol).encode("latin-1")
    if framing in ("te", "both", "te2"):
        return head + _chunked_body(rng, body)
    return head + (body if framing != "none" else b"")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        at = rng.randint(0, len(buf))
        if op < 0.45:
            buf[at:at] = rng.choice(_INTERESTING)
        elif op < 0.7 and buf:
            del buf[min(at, len(buf) - 1)]
        elif op < 0.85 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        else:  # duplicate a line
            lines = bytes(buf).split(b"\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            buf = bytearray(b"\n".join(lines))
    return bytes(buf)


def cases(seed: int, n: int) -> Iterator[bytes]:
    """The seeds, each also mutated; then `n` generated streams of 1-3 requests,
    a quarter of them mutated."""
    rng = random.Random(seed)
    yield from SEEDS
    for raw in SEEDS:
        yield _mutate(rng, raw)
    for _ in range(n):
        raw = b"".join(_request(rng) for _ in range(rng.choice((1, 1, 2, 3))))
        yield _mutate(rng, raw) if rng.random() < 0.25 else raw


def run(seed: int, n: int, parsers: dict[str, Parser] | None = None) -> Report:
    report = Report()
    parsers = parsers if parsers is not None else upstream_parsers()
    for raw in cases(seed, n):
        check(raw, report, parsers)
    return report
