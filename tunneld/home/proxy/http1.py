"""HTTP/1.1 for the reverse proxy: message parsing and framing, sans-IO in the h11 shape.

A `RequestReader` (the client side) or `ResponseReader` (the upstream side)
takes bytes with `receive_data` (b"" for EOF) and hands out events with
`next_event`: a head (`Request` / `Response`), `Data` pieces, `EndOfMessage`,
`ConnectionClosed`, or `NEED_DATA` / `PAUSED`. After a message ends the reader
pauses until `start_next_cycle()`, so pipelined bytes wait their turn; what it
has not parsed is `trailing_data` (the bytes after a 101, say). Framing is a
few functions that return bytes. Errors: `RemoteHttpError` for what the peer
sent (with a status hint), `LocalHttpError` for what we must not send.

Why not h11, the model for this shape: a proxy parses and re-frames every
message twice (client side and upstream side), and h11 spends ~280 us on that
for one small GET, more than the rest of the tunnel together (bench/RESULTS.md).
Here a head is checked against RFC 9112's grammar by one compiled expression
and split with bytes methods, ~20 us for the same work.

Strict on purpose, since request heads are hostile input. A bare LF ends a
line in a head or trailers (RFC 9112 2.2 allows it; the head is re-framed with
CRLF, so it cannot mean one thing here and another upstream), but not a
chunk-size line. Refused: a bare CR, whitespace before a colon, obs-fold, more
than one Content-Length or one of over 18 digits, Transfer-Encoding other than
exactly `chunked` (501) or beside Content-Length, a missing (HTTP/1.1) or
repeated Host, and what aiohttp (Home Assistant's server) would frame otherwise:
a body on a HEAD request or on an upgrade request, `head` or `connect` in
lower or mixed case, a target in none of RFC 9112's four forms, and a second
Content-Type, User-Agent or other field aiohttp takes once (see
docs/http-differential.md and tests/home/test_differential.py). Sizes are
bounded: the head and the trailers by `max_head_size`, a chunk-size line by 1 KiB.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from tunneld.errors import LocalHttpError, RemoteHttpError

__all__ = [
    "CHUNKED_END",
    "NEED_DATA",
    "PAUSED",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "Event",
    "Headers",
    "Request",
    "RequestReader",
    "Response",
    "ResponseReader",
    "Sentinel",
    "frame_chunk",
    "frame_request_head",
    "frame_response_head",
]

Headers = tuple[tuple[bytes, bytes], ...]  # (name as sent, value without OWS), in order


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"  # give `receive_data` more bytes
    PAUSED = "PAUSED"  # a message ended: `start_next_cycle()` before the next one


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes = b"1.1"


@dataclass(frozen=True, slots=True)
class Response:
    """A response head; 1xx ones (informational) come before the final one."""

    status_code: int
    headers: Headers
    reason: bytes = b""
    http_version: bytes = b"1.1"


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The message is complete (trailers, if any, are checked and dropped)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection between messages."""


Event = Request | Response | Data | EndOfMessage | ConnectionClosed

_END = EndOfMessage()
_CLOSED = ConnectionClosed()

# RFC 9112/9110 grammar. A field line's value is checked for allowed characters only
# (OWS is stripped after), which keeps the expression free of backtracking.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELD_LINES = re.compile(rb"(?:" + _TOKEN + rb":[\t \x21-\x7e\x80-\xff]*\r\n)*")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r\n")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?\r\n")
# A chunk-size line must end in CRLF: "5c;\n" is where parsers have disagreed on framing.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[\t ]*(?:;[\t \x21-\x7e\x80-\xff]*)?\r\n")
_HEAD_END = re.compile(rb"\n\r?\n")
_FRAMED_LINES = re.compile(rb"(?:" + _TOKEN + rb": [\t \x21-\x7e\x80-\xff]*\r\n)*")
_REASON = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
_MAX_CHUNK_LINE = 1024
_MAX_LENGTH_DIGITS = 18
_VERSIONS = (b"1.1", b"1.0")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a field or extension
_UPPER_ONLY = (b"HEAD", b"CONNECT")  # methods whose case variants are refused
# RFC 9112 3.2: origin-form, absolute-form, asterisk-form (OPTIONS), authority-form (CONNECT).
# An absolute-form target's scheme and authority as llhttp takes them (letters only in
# the scheme; RFC 3986's authority characters), then a path, query or nothing.
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z]+://[A-Za-z0-9._~%!$&'()*+,;=:@\[\]-]*(?:[/?#]|$)")
# Fields aiohttp refuses to see twice (http_parser.SINGLETON_HEADERS, besides the
# Host, Content-Length and Transfer-Encoding checked on their own).
_SINGLETONS = frozenset(
    {
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"max-forwards",
        b"server",
        b"user-agent",
    }
)

CHUNKED_END = b"0\r\n\r\n"


class _State(enum.Enum):
    HEAD = "head"  # waiting for (or reading) a message head
    BODY = "body"
    DONE = "done"  # message complete: paused until start_next_cycle()
    SWITCHED = "switched"  # after 101: the rest is another protocol's
    CLOSED = "closed"  # the peer closed between messages
    ERROR = "error"


class _Body(enum.Enum):
    LENGTH = "length"  # Content-Length (0 for no body)
    CHUNKED = "chunked"
    CLOSE = "close"  # until the connection closes (responses only)


class _Chunk(enum.Enum):
    SIZE = "size"
    DATA = "data"
    DATA_END = "data_end"  # the CRLF after a chunk's data
    TRAILERS = "trailers"


class _Reader:
    """What both readers share: buffering, body decoding, the message cycle."""

    def __init__(self, max_head_size: int) -> None:
        self.max_head_size = max_head_size
        self._buf = bytearray()
        self._eof = False
        self._state = _State.HEAD
        self._scanned = 0  # bytes of an incomplete head already searched for its end
        self._body = _Body.LENGTH
        self._remaining = 0  # LENGTH: bytes left; CHUNKED: bytes left in this chunk
        self._chunk = _Chunk.SIZE
        self.keep_alive = True  # the last message allows another one on this connection

    # -- public --------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means it closed its side."""
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalHttpError("data received after EOF")
        else:
            self._buf += data

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA, or PAUSED (raises RemoteHttpError, then again)."""
        state = self._state
        try:
            if state is _State.BODY:
                return self._next_body()
            if state is _State.HEAD:
                return self._next_head()
        except RemoteHttpError:
            self._state = _State.ERROR
            raise
        if state is _State.CLOSED:
            return _CLOSED
        if state is _State.ERROR:
            raise RemoteHttpError("the connection already failed")
        return PAUSED

    def start_next_cycle(self) -> None:
        """Read the next message (only after one ended: pipelined bytes stay buffered)."""
        if self._state is not _State.DONE:
            raise LocalHttpError(f"cannot start a new message in state {self._state.value}")
        self._state = _State.HEAD

    @property
    def has_body(self) -> bool:
        """The message whose head was just read has body bytes to come."""
        return self._state is _State.BODY and (
            self._body is not _Body.LENGTH or self._remaining > 0
        )

    @property
    def body_framing(self) -> str:
        """How the current body is delimited: length, chunked, or close (responses only)."""
        return self._body.value

    @property
    def done(self) -> bool:
        """The current message is complete."""
        return self._state is _State.DONE

    @property
    def idle(self) -> bool:
        """Between messages with nothing read of the next one."""
        return self._state is _State.HEAD and not self._buf and not self._eof

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """(bytes received but not parsed, whether the peer closed)."""
        return bytes(self._buf), self._eof

    # -- heads ---------------------------------------------------------------
    def _next_head(self) -> Event | Sentinel:
        buf = self._buf
        while buf.startswith(b"\r\n"):  # RFC 9112 2.2: empty lines before a message
            del buf[:2]
        found = _HEAD_END.search(buf, max(0, self._scanned - 2))
        if found is None:
            if len(buf) > self.max_head_size:
                raise RemoteHttpError(f"head larger than {self.max_head_size} bytes", 431)
            if self._eof:
                if buf:
                    raise RemoteHttpError("connection closed in the middle of a head")
                self._state = _State.CLOSED
                return _CLOSED
            self._scanned = len(buf)
            return NEED_DATA
        if found.end() > self.max_head_size:
            raise RemoteHttpError(f"head larger than {self.max_head_size} bytes", 431)
        head = _crlf(bytes(buf[: found.start() + 1]))
        del buf[: found.end()]
        self._scanned = 0
        return self._parse_head(head)

    def _parse_head(self, head: bytes) -> Event:
        raise NotImplementedError

    def _begin_body(self, body: _Body, length: int = 0) -> None:
        self._state = _State.BODY
        self._body = body
        self._remaining = length
        self._chunk = _Chunk.SIZE

    # -- bodies --------------------------------------------------------------
    def _next_body(self) -> Event | Sentinel:
        body = self._body
        if body is _Body.LENGTH:
            if self._remaining == 0:
                self._state = _State.DONE
                return _END
            if not self._buf:
                return self._starved()
            data = self._take(self._remaining)
            self._remaining -= len(data)
            return Data(data)
        if body is _Body.CHUNKED:
            return self._next_chunked()
        if self._buf:
            return Data(self._take(len(self._buf)))
        if self._eof:
            self._state = _State.DONE
            return _END
        return NEED_DATA

    def _starved(self) -> Sentinel:
        if self._eof:
            raise RemoteHttpError("connection closed in the middle of a body")
        return NEED_DATA

    def _take(self, most: int) -> bytes:
        buf = self._buf
        if most >= len(buf):
            data = bytes(buf)
            buf.clear()
            return data
        data = bytes(buf[:most])
        del buf[:most]
        return data

    def _next_chunked(self) -> Event | Sentinel:
        buf = self._buf
        while True:
            step = self._chunk
            if step is _Chunk.DATA:
                if not buf:
                    return self._starved()
                data = self._take(self._remaining)
                self._remaining -= len(data)
                if self._remaining == 0:
                    self._chunk = _Chunk.DATA_END
                return Data(data)
            if step is _Chunk.DATA_END:
                if len(buf) < 2:
                    return self._starved()
                if buf[:2] != b"\r\n":
                    raise RemoteHttpError("chunk data not followed by CRLF")
                del buf[:2]
                self._chunk = _Chunk.SIZE
            elif step is _Chunk.SIZE:
                end = buf.find(b"\n", 0, _MAX_CHUNK_LINE)
                if end < 0:
                    if len(buf) >= _MAX_CHUNK_LINE:
                        raise RemoteHttpError("chunk-size line too long")
                    return self._starved()
                match = _CHUNK_SIZE.fullmatch(buf, 0, end + 1)
                if match is None:
                    raise RemoteHttpError(_bad_chunk_line(bytes(buf[: end + 1])))
                size = int(match.group(1), 16)
                del buf[: end + 1]
                self._remaining = size
                self._chunk = _Chunk.DATA if size else _Chunk.TRAILERS
            else:
                return self._end_trailers()

    def _end_trailers(self) -> Event | Sentinel:
        buf = self._buf
        if buf.startswith(b"\r\n"):
            del buf[:2]
        elif buf.startswith(b"\n"):
            del buf[:1]
        else:
            found = _HEAD_END.search(buf, max(0, self._scanned - 2))  # dribbled: linear
            end = len(buf) if found is None else found.end()
            if end > self.max_head_size:
                raise RemoteHttpError("trailers too large", 431)
            if found is None:
                self._scanned = len(buf)
                return self._starved()
            self._scanned = 0
            if _FIELD_LINES.fullmatch(_crlf(bytes(buf[: found.start() + 1]))) is None:
                raise RemoteHttpError("malformed trailer line")
            del buf[:end]
        self._state = _State.DONE
        return _END


def _crlf(head: bytes) -> bytes:
    """`head` with every line ending CRLF (a bare LF becomes CRLF; a bare CR stays, to fail)."""
    if head.count(b"\n") == head.count(b"\r\n"):
        return head
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _fields(head: bytes, start: int) -> Headers:
    """The field lines of `head` from `start` (already checked by _FIELD_LINES)."""
    if start >= len(head):
        return ()
    out = []
    for line in head[start:-2].split(b"\r\n"):
        name, _, value = line.partition(b":")
        out.append((name, value.strip(b" \t")))
    return tuple(out)


def _bad_chunk_line(line: bytes) -> str:
    """Why a chunk-size line failed _CHUNK_SIZE (errors only)."""
    if _CHUNK_SIZE.fullmatch(line[:-1] + b"\r\n"):
        return "a chunk-size line ended by a bare LF"
    if re.match(rb"[0-9A-Fa-f]{16}", line):
        return "a chunk size of more than 15 hex digits"
    if re.match(rb"[0-9A-Fa-f]+[\t ]*;", line) and _CONTROL.search(line, 0, len(line) - 2):
        return "a control character in a chunk extension"
    return "malformed chunk-size line"


def _bad_field_line(head: bytes, start: int) -> str:
    """Why the field lines of `head` from `start` failed _FIELD_LINES (errors only)."""
    for line in head[start:-2].split(b"\r\n"):
        if _FIELD_LINES.fullmatch(line + b"\r\n"):
            continue
        if line[:1] in (b" ", b"\t"):
            return "obs-fold (a header line starting with whitespace)"
        name, colon, _ = line.partition(b":")
        if colon and name.rstrip(b" \t") != name and re.fullmatch(_TOKEN, name.strip(b" \t")):
            return "whitespace before a header's colon"
        if b"\r" in line:
            return "a bare CR in a header line"
        if _CONTROL.search(line):
            return "a control character in a header line"
        break
    return "malformed header line"


def _content_length(value: bytes) -> int:
    if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
        raise RemoteHttpError("malformed Content-Length")
    return int(value)


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",")]


class RequestReader(_Reader):
    """Reads requests from a client (hostile input: strict, bounded)."""

    def _parse_head(self, head: bytes) -> Event:
        line = _REQUEST_LINE.match(head)
        if line is None:
            raise RemoteHttpError("malformed request line")
        method, target, version = line.groups()
        if version not in _VERSIONS:
            raise RemoteHttpError(f"HTTP/{version.decode()} is not supported", 505)
        start = line.end()
        if _FIELD_LINES.fullmatch(head, start) is None:
            raise RemoteHttpError(_bad_field_line(head, start))
        headers = _fields(head, start)
        if not (
            target[:1] == b"/"
            or _ABSOLUTE_FORM.match(target)
            or (target == b"*" and method == b"OPTIONS")
            or method == b"CONNECT"  # authority-form: the proxy answers 405 itself
        ):
            raise RemoteHttpError("malformed request target")
        if method.upper() in _UPPER_ONLY and method not in _UPPER_ONLY:
            # aiohttp reads "head" as HEAD in places (no body) and llhttp refuses it.
            raise RemoteHttpError(f"method {method.upper().decode()} must be upper case")
        length: int | None = None
        codings: list[bytes] = []
        hosts = 0
        close = version != b"1.1"
        upgrade = False  # Connection names upgrade
        upgrade_header = False
        seen: set[bytes] = set()
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if length is not None:
                    raise RemoteHttpError("more than one Content-Length")
                length = _content_length(value)
            elif lower == b"transfer-encoding":
                codings += _tokens(value)
            elif lower == b"host":
                hosts += 1
            elif lower in _SINGLETONS:
                if lower in seen:
                    raise RemoteHttpError(f"more than one {name.decode()}")
                seen.add(lower)
            elif lower == b"connection":
                tokens = _tokens(value)
                close = close or b"close" in tokens
                upgrade = upgrade or b"upgrade" in tokens
            elif lower == b"upgrade":
                upgrade_header = True
        if hosts > 1:
            raise RemoteHttpError("more than one Host")
        if not hosts and version == b"1.1":
            raise RemoteHttpError("missing Host")
        if codings or length:
            # aiohttp frames neither body: a HEAD request has none there, and after an
            # upgrade request the bytes are the new protocol's (or the next request).
            if method == b"HEAD":
                raise RemoteHttpError("a HEAD request with a body")
            if upgrade and upgrade_header:
                raise RemoteHttpError("an upgrade request with a body")
        if codings:
            if length is not None:
                raise RemoteHttpError("both Content-Length and Transfer-Encoding")
            if version != b"1.1":
                raise RemoteHttpError("Transfer-Encoding in an HTTP/1.0 request")
            if codings != [b"chunked"]:
                raise RemoteHttpError("unsupported Transfer-Encoding", 501)
            self._begin_body(_Body.CHUNKED)
        else:
            self._begin_body(_Body.LENGTH, length or 0)
        self.keep_alive = not close
        return Request(method, target, headers, version)


class ResponseReader(_Reader):
    """Reads responses from the upstream app: trusted, but bounded and checked."""

    def __init__(self, max_head_size: int) -> None:
        super().__init__(max_head_size)
        self._method = b"GET"
        self._owed = False  # a request went out and its final response has not come
        self.content_length: int | None = None  # of the last final response, if it said

    def expect(self, method: bytes) -> None:
        """The method of the request whose response comes next (a HEAD's has no body)."""
        self._method = method
        self._owed = True

    @property
    def idle(self) -> bool:
        return super().idle and not self._owed

    def _parse_head(self, head: bytes) -> Event:
        line = _STATUS_LINE.match(head)
        if line is None:
            raise RemoteHttpError("malformed status line", 502)
        version = line.group(1)
        if version not in _VERSIONS:
            raise RemoteHttpError(f"HTTP/{version.decode()} is not supported", 502)
        start = line.end()
        if _FIELD_LINES.fullmatch(head, start) is None:
            raise RemoteHttpError("malformed header line", 502)
        headers = _fields(head, start)
        status = int(line.group(2))
        if status < 100:
            raise RemoteHttpError(f"status {status} does not exist", 502)
        response = Response(status, headers, line.group(3) or b"", version)
        if status < 200:
            if status == 101:
                self._state = _State.SWITCHED
            return response  # 1xx: the final response follows (the state stays HEAD)
        self._owed = False
        length: int | None = None
        codings: list[bytes] = []
        close = version != b"1.1"
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                for part in value.split(b","):  # equal repeated values are one length
                    try:
                        n = _content_length(part.strip(b" \t"))
                    except RemoteHttpError:
                        raise RemoteHttpError("malformed Content-Length", 502) from None
                    if length is not None and n != length:
                        raise RemoteHttpError("conflicting Content-Length values", 502)
                    length = n
            elif lower == b"transfer-encoding":
                codings += _tokens(value)
            elif lower == b"connection" and b"close" in _tokens(value):
                close = True
        if codings:  # RFC 9112 6.3: Transfer-Encoding overrides Content-Length
            length = None
        self.content_length = length
        if self._method == b"HEAD" or status in (204, 304):
            self._begin_body(_Body.LENGTH, 0)
        elif codings:
            # Decoding gzip & co. is not a proxy's job, and passing them on re-chunked
            # without their header would corrupt the body: refused, as h11 did.
            if codings != [b"chunked"]:
                raise RemoteHttpError("unsupported Transfer-Encoding", 502)
            self._begin_body(_Body.CHUNKED)
        elif length is not None:
            self._begin_body(_Body.LENGTH, length)
        else:
            self._begin_body(_Body.CLOSE)
        self.keep_alive = not close and self._body is not _Body.CLOSE
        return response


# -- framing -------------------------------------------------------------------
def _frame(start: bytes, headers: Headers | list[tuple[bytes, bytes]]) -> bytes:
    data = b"".join([start, *[b"%s: %s\r\n" % field for field in headers], b"\r\n"])
    # Every line is token ": " value (so a name holding a colon or space cannot pass
    # as another header), and no CR or LF hides in a value to start a line of its own.
    if (
        _FRAMED_LINES.fullmatch(data, len(start), len(data) - 2) is None
        or data.count(b"\n") != len(headers) + 2
    ):
        raise LocalHttpError("a header name or value cannot be sent as it is")
    return data


def frame_request_head(
    method: bytes, target: bytes, headers: Headers | list[tuple[bytes, bytes]]
) -> bytes:
    if _REQUEST_LINE.fullmatch(method + b" " + target + b" HTTP/1.1\r\n") is None:
        raise LocalHttpError("the request line cannot be sent as it is")
    return _frame(b"%s %s HTTP/1.1\r\n" % (method, target), headers)


def frame_response_head(
    status: int, reason: bytes, headers: Headers | list[tuple[bytes, bytes]]
) -> bytes:
    if _REASON.fullmatch(reason) is None or not 100 <= status <= 999:
        raise LocalHttpError("the status line cannot be sent as it is")
    return _frame(b"HTTP/1.1 %d %s\r\n" % (status, reason), headers)


def frame_chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body (never empty: that would end the body)."""
    if not data:
        raise LocalHttpError("an empty chunk would end the body")
    return b"%x\r\n" % len(data), data, b"\r\n"
