"""tunneld.home.proxy.http1 without sockets: two peers in memory, as h11's own tests do.

The client side frames with `frame_*` (or writes raw bytes, for what a hostile
client sends); the other side is a `RequestReader` / `ResponseReader` fed those
bytes whole, split, or byte by byte. Every rejection is a RemoteHttpError whose
status_hint is what the proxy answers with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.errors import LocalHttpError, RemoteHttpError
from tunneld.home.proxy.http1 import (
    CHUNKED_END,
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Headers,
    Request,
    RequestReader,
    Response,
    ResponseReader,
    Sentinel,
    frame_chunk,
    frame_request_head,
    frame_response_head,
)

Reader = RequestReader | ResponseReader
Item = Event | Sentinel

MAX = 16 * 1024
END = EndOfMessage()
CLOSED = ConnectionClosed()


# -- helpers -------------------------------------------------------------------
def drain(reader: Reader) -> list[Item]:
    """Events up to and including the first NEED_DATA, PAUSED or ConnectionClosed."""
    out: list[Item] = []
    while True:
        event = reader.next_event()
        out.append(event)
        if event is NEED_DATA or event is PAUSED or isinstance(event, ConnectionClosed):
            return out


def feed(reader: Reader, *pieces: bytes) -> list[Item]:
    """Each piece in turn, draining while the reader wants data; only a final NEED_DATA shows.

    Once PAUSED (or closed), later pieces are only received: they wait their turn.
    """
    out: list[Item] = []
    for piece in pieces:
        reader.receive_data(piece)
        if out and out[-1] is not NEED_DATA:
            continue
        if out:
            out.pop()
        out += drain(reader)
    return out


def merged(events: Iterable[Item]) -> list[Item]:
    """Adjacent Data joined: how a body is split is the transport's business."""
    out: list[Item] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def run(reader: Reader, pieces: Sequence[bytes], limit: int = 1000) -> list[Event]:
    """Drive `reader` the way the proxy does: pieces then EOF, next cycle on PAUSED.

    Stops at ConnectionClosed, at a PAUSED that is not `done` (after a 101), or
    after `limit` steps. NEED_DATA after EOF would make the proxy wait forever.
    """
    todo = [p for p in pieces if p] + [b""]
    out: list[Event] = []
    for _ in range(limit):
        event = reader.next_event()
        if event is NEED_DATA:
            assert todo, "NEED_DATA after EOF"
            reader.receive_data(todo.pop(0))
        elif event is PAUSED:
            if not reader.done:
                break
            reader.start_next_cycle()
        else:
            assert not isinstance(event, Sentinel)
            assert event != Data(b""), "an empty Data would frame as the last chunk"
            out.append(event)
            if isinstance(event, ConnectionClosed):
                break
    return out


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def request_error(*pieces: bytes, max_head_size: int = MAX) -> RemoteHttpError:
    reader = RequestReader(max_head_size)
    with pytest.raises(RemoteHttpError) as info:
        feed(reader, *pieces)
    # The reader stays failed: the proxy cannot read past garbage.
    with pytest.raises(RemoteHttpError):
        reader.next_event()
    return info.value


def response_error(*pieces: bytes) -> RemoteHttpError:
    with pytest.raises(RemoteHttpError) as info:
        feed(ResponseReader(MAX), *pieces)
    return info.value


GET = b"GET /x?y=1 HTTP/1.1\r\nHost: example.com\r\n\r\n"


# -- requests ------------------------------------------------------------------
def test_get_parses_to_request_end_of_message_then_paused() -> None:
    reader = RequestReader(MAX)
    assert reader.idle and not reader.done
    head = (
        b"GET /index.html?q=1 HTTP/1.1\r\n"
        b"Host:example.com\r\n"
        b"user-AGENT: \t curl/8.0 \t\r\n"
        b"X-Empty:\r\n"
        b"X-Inner:  a  b  \r\n"
        b"\r\n"
    )
    assert feed(reader, head) == [
        Request(
            b"GET",
            b"/index.html?q=1",
            (
                (b"Host", b"example.com"),
                (b"user-AGENT", b"curl/8.0"),  # name as sent, OWS stripped both sides
                (b"X-Empty", b""),
                (b"X-Inner", b"a  b"),  # inner whitespace kept
            ),
            b"1.1",
        ),
        END,
        PAUSED,
    ]
    assert reader.done and not reader.idle
    assert reader.next_event() is PAUSED  # stays paused until told
    reader.start_next_cycle()
    assert reader.idle and not reader.done
    assert reader.next_event() is NEED_DATA


def test_start_next_cycle_only_after_a_message_ended() -> None:
    reader = RequestReader(MAX)
    with pytest.raises(LocalHttpError):
        reader.start_next_cycle()
    feed(reader, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nab")
    with pytest.raises(LocalHttpError):  # mid-body
        reader.start_next_cycle()


def test_pipelined_requests_come_one_at_a_time() -> None:
    reader = RequestReader(MAX)
    second = b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
    third = b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"
    events = feed(reader, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n" + second + third)
    assert events == [Request(b"GET", b"/a", ((b"Host", b"a"),)), END, PAUSED]
    assert reader.trailing_data == (second + third, False)  # nothing of them consumed
    reader.start_next_cycle()
    assert not reader.idle  # the next request is already buffered
    assert drain(reader) == [
        Request(b"POST", b"/b", ((b"Host", b"a"), (b"Content-Length", b"2"))),
        Data(b"hi"),
        END,
        PAUSED,
    ]
    assert reader.trailing_data == (third, False)
    reader.start_next_cycle()
    assert drain(reader) == [Request(b"GET", b"/c", ((b"Host", b"a"),)), END, PAUSED]
    reader.start_next_cycle()
    assert reader.idle


def test_leading_empty_lines_are_skipped() -> None:
    reader = RequestReader(MAX)
    # RFC 9112 2.2: CRLFs before a request (some clients send one after a POST body).
    events = feed(reader, b"\r\n\r\n", b"\r", b"\n" + GET + b"\r\n" + GET)
    assert events == [Request(b"GET", b"/x?y=1", ((b"Host", b"example.com"),)), END, PAUSED]
    reader.start_next_cycle()
    assert drain(reader)[0] == Request(b"GET", b"/x?y=1", ((b"Host", b"example.com"),))


def test_connection_closed_at_eof_between_messages() -> None:
    reader = RequestReader(MAX)
    assert feed(reader, b"") == [CLOSED]
    assert reader.next_event() == CLOSED  # and again
    assert reader.trailing_data == (b"", True)
    assert not reader.idle  # the peer is gone: nothing more will come

    reader = RequestReader(MAX)
    feed(reader, GET + b"\r\n")
    reader.start_next_cycle()
    assert feed(reader, b"") == [CLOSED]  # empty lines before EOF are not a message


def test_eof_after_close_cannot_take_more_data() -> None:
    reader = RequestReader(MAX)
    reader.receive_data(b"")
    with pytest.raises(LocalHttpError):
        reader.receive_data(b"GET")


@pytest.mark.parametrize(
    "pieces",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n", b""),
        (b"G", b""),
        (b"\r\nGET", b""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nabc", b""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", b""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", b""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde", b""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5", b""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y", b""),
    ],
    ids=["head", "one-byte", "after-empty-line", "cl-body", "cl-none", "chunk-data",
         "chunk-crlf", "chunk-size", "trailers"],
)  # fmt: skip
def test_eof_mid_message_is_a_remote_error(pieces: tuple[bytes, ...]) -> None:
    # A cut request must never reach the upstream as if complete.
    assert request_error(*pieces).status_hint == 400


# -- bodies --------------------------------------------------------------------
def test_content_length_body_split_across_many_receives() -> None:
    body = bytes(range(256)) * 4
    data = b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n" + body + GET
    reader = RequestReader(MAX)
    events = feed(reader, *(data[i : i + 7] for i in range(0, len(data), 7)))
    assert all(len(e.data) <= 7 for e in events if isinstance(e, Data))
    assert merged(events) == [
        Request(b"PUT", b"/f", ((b"Host", b"a"), (b"Content-Length", b"1024"))),
        Data(body),
        END,
        PAUSED,
    ]
    assert reader.trailing_data[0] == GET  # exactly Content-Length bytes taken


def test_content_length_zero_has_no_body() -> None:
    reader = RequestReader(MAX)
    events = feed(reader, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n" + GET)
    assert events[1:] == [END, PAUSED]
    assert reader.trailing_data[0] == GET


CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_BODY = (
    b"5;name=value\r\nhello\r\n"
    b'6 ; ext ; other="quoted"\r\n world\r\n'
    b"A\r\n0123456789\r\n"
    b"0\r\nX-Checksum: abc\r\nX-Other:  1\r\n\r\n"
)


def test_chunked_with_extensions_and_trailers() -> None:
    reader = RequestReader(MAX)
    events = feed(reader, CHUNKED_HEAD + CHUNKED_BODY + GET)
    assert merged(events) == [
        Request(b"POST", b"/up", ((b"Host", b"a"), (b"Transfer-Encoding", b"chunked"))),
        Data(b"hello world0123456789"),
        END,  # the trailers are checked and dropped
        PAUSED,
    ]
    assert reader.trailing_data[0] == GET


def test_chunked_byte_by_byte() -> None:
    reader = RequestReader(MAX)
    data = CHUNKED_HEAD + CHUNKED_BODY + GET
    events = feed(reader, *(data[i : i + 1] for i in range(len(data))))
    assert merged(events)[1:] == [Data(b"hello world0123456789"), END, PAUSED]
    assert reader.trailing_data[0] == GET


def test_chunked_without_trailers_ends_at_the_empty_line() -> None:
    reader = RequestReader(MAX)
    events = feed(reader, CHUNKED_HEAD + b"3\r\nabc\r\n", b"0\r\n", b"\r", b"\n")
    assert events[1:] == [Data(b"abc"), END, PAUSED]
    assert reader.trailing_data == (b"", False)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n",  # not hex
        b"\r\n",  # empty
        b"-1\r\n",
        b"0x5\r\n",
        b"1 2\r\n",  # two sizes
        b"5\r",  # bare CR: the line runs on into the data
        b"5\r\r\n",
        b"5;a\rb\r\n",  # bare CR in an extension
        b"1" * 16 + b"\r\n",  # 16 hex digits: a size no body has
        b"5;\x00\r\n",  # NUL in an extension
    ],
)
def test_malformed_chunk_size_line(body: bytes) -> None:
    assert request_error(CHUNKED_HEAD + body + b"hello\r\n0\r\n\r\n").status_hint == 400


# RFC 9112 2.2: a bare LF ends a trailer line. Not a chunk-size line: "5c;\n" is a
# framing that parsers have read differently, so it is refused (the CRLF after chunk
# data is not a line either, and stays strict).
LF_TRAILERS_BODY = (
    b"5;name=value\r\nhello\r\n"
    b'6 ; ext ; other="quoted"\r\n world\r\n'
    b"A\r\n0123456789\r\n"
    b"0\r\nX-Checksum: abc\r\nX-Other:  1\n\n"
)


@pytest.mark.parametrize(
    "body",
    [
        LF_TRAILERS_BODY,
        b"15\r\nhello world0123456789\r\n0\r\n\n",
        b"15\r\nhello world0123456789\r\n0\r\nX: y\n\r\n",
    ],
)
def test_bare_lf_in_trailers(body: bytes) -> None:
    expected = feed(RequestReader(MAX), CHUNKED_HEAD + CHUNKED_BODY + GET)
    data = CHUNKED_HEAD + body + GET
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        reader = RequestReader(MAX)
        assert merged(feed(reader, *pieces)) == merged(expected)
        assert reader.trailing_data[0] == GET  # the next request starts where it should


@pytest.mark.parametrize("line", [b"5c;\n", b"5\n", b"0\n\r\n", b"5;a=b\n"])
def test_bare_lf_in_a_chunk_size_line_is_refused(line: bytes) -> None:
    assert request_error(CHUNKED_HEAD + line + b"hello\r\n0\r\n\r\n").status_hint == 400


def test_chunk_data_not_followed_by_crlf() -> None:
    request_error(CHUNKED_HEAD + b"5\r\nhelloXX0\r\n\r\n")
    request_error(CHUNKED_HEAD + b"5\r\nhello\n0\r\n\r\n")
    request_error(CHUNKED_HEAD + b"5\r\nhello\rX0\r\n\r\n")
    # A chunk longer than its size line says: the smuggled rest is not a new request.
    request_error(CHUNKED_HEAD + b"3\r\nhelloGET / HTTP/1.1\r\n\r\n")


def test_chunk_size_line_is_bounded() -> None:
    long_line = b"1;" + b"x" * 2000 + b"\r\na\r\n0\r\n\r\n"
    request_error(CHUNKED_HEAD + long_line)
    # Trickled without a CRLF, it fails once the bound is passed, not at EOF.
    reader = RequestReader(MAX)
    feed(reader, CHUNKED_HEAD + b"1;")
    with pytest.raises(RemoteHttpError):
        for _ in range(1100):
            reader.receive_data(b"x")
            reader.next_event()
    # A long but bounded extension is fine.
    ok = RequestReader(MAX)
    events = feed(ok, CHUNKED_HEAD + b"1;" + b"x" * 900 + b"\r\na\r\n0\r\n\r\n")
    assert events[1:] == [Data(b"a"), END, PAUSED]


# -- strictness ----------------------------------------------------------------
def head(*lines: bytes, start: bytes = b"GET / HTTP/1.1") -> bytes:
    return b"\r\n".join((start, *lines)) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        # A bare CR is not a line ending (a peer that took it for one would see other lines).
        (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\rHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\rX: b\n\n", 400),  # also among bare-LF lines
        (head(b"Host: a", b"X: a\rb"), 400),
        (head(b"Host : a"), 400),  # whitespace before the colon
        (head(b"Host: a", b"X-A\t: b"), 400),
        (head(b"Host: a", b" X: b"), 400),  # a line starting with whitespace
        (head(b"Host: a", b"X: b", b"  c"), 400),  # obs-fold
        (head(b"Host: a", b"X: b", b"\tc"), 400),
        (head(b"Host: a", b"NoColon"), 400),
        (head(b"Host: a", b": empty-name"), 400),
        (head(b"Host: a", b"X(y): b"), 400),  # not a token
        (head(b"Host: a", b"Content-Length: 1", b"Content-Length: 1"), 400),
        (head(b"Host: a", b"Content-Length: 1, 1"), 400),
        (head(b"Host: a", b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
        (head(b"Host: a", b"Transfer-Encoding: chunked", b"Content-Length: 5"), 400),
        (head(b"Host: a", b"Content-Length: abc"), 400),
        (head(b"Host: a", b"Content-Length: +5"), 400),
        (head(b"Host: a", b"Content-Length: -1"), 400),
        (head(b"Host: a", b"Content-Length: 0x10"), 400),
        (head(b"Host: a", b"Content-Length: 1 2"), 400),
        (head(b"Host: a", b"Content-Length:"), 400),
        (head(b"Host: a", "Content-Length: ٣".encode()), 400),  # a non-ASCII digit
        (head(b"Host: a", b"Content-Length: " + b"1" * 19), 400),
        (head(b"Host: a", b"Content-Length: " + b"0" * 19), 400),
        (head(b"Host: a", b"Transfer-Encoding: gzip"), 501),
        (head(b"Host: a", b"Transfer-Encoding: gzip, chunked"), 501),
        (head(b"Host: a", b"Transfer-Encoding: chunked, chunked"), 501),
        (head(b"Host: a", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"), 501),
        (head(b"Host: a", b"Transfer-Encoding: identity"), 501),
        (head(b"Host: a", b"Transfer-Encoding:"), 501),
        (head(b"Host: a", b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.0"), 400),
        (head(b"X: y"), 400),  # no Host in HTTP/1.1
        (head(b"Host: a", b"host: b"), 400),
        (head(b"Host: a", start=b"GET / HTTP/2.0"), 505),
        (head(b"Host: a", start=b"GET / HTTP/1.2"), 505),
        (head(b"Host: a", start=b"GET / HTTP/0.9"), 505),
        (head(b"Host: a", start=b"GET / HTTP/11"), 400),
        (head(b"Host: a", start=b"GET / http/1.1"), 400),
        (head(b"Host: a", start=b"GET  / HTTP/1.1"), 400),
        (head(b"Host: a", start=b"GET /"), 400),
        (head(b"Host: a", start=b"G(T / HTTP/1.1"), 400),
        (head(b"Host: a", start=b"GET /a\x00b HTTP/1.1"), 400),
        (head(b"Host: a", b"X: a\x00b"), 400),
        (head(b"Host: a", b"X: a\x01"), 400),
        (head(b"Host: a", b"X: \x1bb"), 400),
        (head(b"Host: a", b"X: a\x7fb"), 400),
        (head(b"Host: a\x00"), 400),
    ],
)
def test_strict_request_heads(data: bytes, status: int) -> None:
    assert request_error(data).status_hint == status


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: a\nContent-Length: 3\n\n",
        b"GET / HTTP/1.1\nHost: a\r\nContent-Length: 3\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nContent-Length: 3\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\n\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\n\r\n",
    ],
)
def test_bare_lf_ends_a_head_line(data: bytes) -> None:
    # RFC 9112 2.2 lets a recipient take a bare LF for CRLF; the head is re-framed with
    # CRLF, so the upstream cannot see other lines. The body is exactly the 3 bytes after.
    body = b"\r\nx"  # starts like a line ending: it must not be taken as part of the head
    expected = [
        Request(b"GET", b"/", ((b"Host", b"a"), (b"Content-Length", b"3"))),
        Data(body),
        END,
        PAUSED,
    ]
    wire = data + body + GET
    for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        reader = RequestReader(MAX)
        assert merged(feed(reader, *pieces)) == expected
        assert reader.trailing_data == (GET, False)


@pytest.mark.parametrize(
    "data",
    [
        head(b"Host: a", start=b"GET / HTTP/1.0"),
        head(start=b"GET / HTTP/1.0"),  # HTTP/1.0 without Host is fine
        head(b"Host: a", b"Transfer-Encoding: Chunked") + b"0\r\n\r\n",  # case-insensitive
        head(b"Host: a", b"Transfer-Encoding:  chunked ") + b"0\r\n\r\n",
        head(b"Host: a", b"Content-Length: 000"),
        head(b"Host: a", b"X: caf\xc3\xa9\x80\xff"),  # obs-text is allowed in values
        head(b"Host: a", b"X: a\tb"),
        head(b"hOsT: a", start=b"OPTIONS * HTTP/1.1"),
        head(b"Host: a", start=b"CONNECT a:443 HTTP/1.1"),
    ],
)
def test_lenient_where_the_rfc_allows(data: bytes) -> None:
    reader = RequestReader(MAX)
    events = feed(reader, data)
    assert isinstance(events[0], Request)
    assert events[-2:] == [END, PAUSED]


def test_longest_content_length_accepted() -> None:
    reader = RequestReader(MAX)
    events = feed(reader, head(b"Host: a", b"Content-Length: " + b"9" * 18) + b"abc")
    assert events[1:] == [Data(b"abc"), NEED_DATA]
    assert reader.has_body


def test_head_size_limit_is_exact() -> None:
    limit = 256
    base = head(b"Host: a", b"X: ")
    fits = head(b"Host: a", b"X: " + b"v" * (limit - len(base)))
    assert len(fits) == limit
    assert isinstance(feed(RequestReader(limit), fits)[0], Request)
    too_big = fits[:-4] + b"v\r\n\r\n"
    assert request_error(too_big, max_head_size=limit).status_hint == 431


def test_head_over_the_limit_in_one_piece() -> None:
    data = head(b"Host: a", b"X: " + b"v" * 2000)
    assert request_error(data, max_head_size=1024).status_hint == 431
    # Also when the head never ends: the buffer must not grow without bound.
    for endless in (
        b"GET / HTTP/1.1\r\nX: " + b"v" * 2000,
        b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * 400,
    ):
        assert request_error(endless, max_head_size=1024).status_hint == 431


def test_head_over_the_limit_trickled() -> None:
    reader = RequestReader(1024)
    reader.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert reader.next_event() is NEED_DATA
    with pytest.raises(RemoteHttpError) as info:
        for _ in range(1024):
            reader.receive_data(b"X: v\r\n")  # never the empty line
            assert reader.next_event() is NEED_DATA
    assert info.value.status_hint == 431
    assert len(reader.trailing_data[0]) <= 1024 + 6


def test_trailers_over_the_limit_trickled() -> None:
    reader = RequestReader(1024)
    feed(reader, CHUNKED_HEAD + b"1\r\na\r\n0\r\n")
    with pytest.raises(RemoteHttpError) as info:
        for _ in range(1024):
            reader.receive_data(b"X: v\r\n")
            assert reader.next_event() is NEED_DATA
    assert info.value.status_hint == 431


def test_trailers_over_the_limit_in_one_piece() -> None:
    trailers = b"0\r\n" + b"X: v\r\n" * 400 + b"\r\n"
    assert request_error(CHUNKED_HEAD + trailers, max_head_size=1024).status_hint == 431


@pytest.mark.parametrize(
    "trailers",
    [
        b"X : v\r\n\r\n",
        b"X: v\rY: w\r\n\r\n",  # bare CR
        b"X: v\r\r\n\r\n",
        b"\rX: v\r\n\r\n",
        b"X: v\rY: w\n\n",
        b" X: v\r\n\r\n",
        b"X: \x00\r\n\r\n",
        b"NoColon\r\n\r\n",
    ],
)
def test_malformed_trailers(trailers: bytes) -> None:
    request_error(CHUNKED_HEAD + b"0\r\n" + trailers)


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (head(b"Host: a"), True),
        (head(b"Host: a", b"Connection: keep-alive"), True),
        (head(b"Host: a", b"Connection: close"), False),
        (head(b"Host: a", b"Connection: Upgrade, CLOSE"), False),
        (head(b"Host: a", b"Connection: keep-alive", b"Connection: close"), False),
        (head(b"Host: a", b"Connection: closed"), True),  # a token, not a substring
        (head(b"Host: a", start=b"GET / HTTP/1.0"), False),
        (head(b"Host: a", b"Connection: keep-alive", start=b"GET / HTTP/1.0"), False),
    ],
)
def test_request_keep_alive(data: bytes, keep_alive: bool) -> None:
    reader = RequestReader(MAX)
    feed(reader, data)
    assert reader.keep_alive is keep_alive


def test_keep_alive_follows_each_request() -> None:
    reader = RequestReader(MAX)
    feed(reader, head(b"Host: a", b"Connection: close") + GET)
    assert not reader.keep_alive
    reader.start_next_cycle()
    drain(reader)
    assert reader.keep_alive


# -- responses -----------------------------------------------------------------
def response(status: bytes, *lines: bytes, version: bytes = b"1.1") -> bytes:
    return head(*lines, start=b"HTTP/" + version + b" " + status)


NEXT = response(b"200 OK", b"Content-Length: 4") + b"next"


def test_response_with_content_length() -> None:
    reader = ResponseReader(MAX)
    reader.receive_data(response(b"200 OK", b"Content-Length: 5", b"Server: x") + b"hel")
    first = reader.next_event()
    assert first == Response(200, ((b"Content-Length", b"5"), (b"Server", b"x")), b"OK")
    assert reader.body_framing == "length" and reader.has_body
    assert reader.next_event() == Data(b"hel")
    assert feed(reader, b"lo" + NEXT) == [Data(b"lo"), END, PAUSED]
    assert reader.keep_alive and reader.done
    assert reader.trailing_data == (NEXT, False)
    reader.start_next_cycle()
    assert merged(drain(reader))[1:] == [Data(b"next"), END, PAUSED]


def test_response_chunked() -> None:
    reader = ResponseReader(MAX)
    data = response(b"200 OK", b"Transfer-Encoding: chunked") + b"3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n"
    events = feed(reader, *(data[i : i + 3] for i in range(0, len(data), 3)))
    assert reader.body_framing == "chunked"
    assert merged(events)[1:] == [Data(b"abc"), END, PAUSED]
    assert reader.keep_alive


def test_response_delimited_by_close() -> None:
    reader = ResponseReader(MAX)
    events = feed(reader, response(b"200 OK", b"X: y") + b"some", b" body", b"")
    assert reader.body_framing == "close"
    assert merged(events)[1:] == [Data(b"some body"), END, PAUSED]
    assert not reader.keep_alive  # the connection is used up
    reader.start_next_cycle()
    assert reader.next_event() == CLOSED


def test_close_delimited_body_waits_for_eof() -> None:
    reader = ResponseReader(MAX)
    events = feed(reader, response(b"200 OK") + b"abc")
    assert events[1:] == [Data(b"abc"), NEED_DATA]
    assert not reader.done and reader.has_body


@pytest.mark.parametrize(
    ("method", "status"),
    [(b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified")],
)
@pytest.mark.parametrize(
    "framing", [b"Content-Length: 100", b"Transfer-Encoding: chunked", b"X-None: 1"]
)
def test_responses_without_a_body(method: bytes, status: bytes, framing: bytes) -> None:
    reader = ResponseReader(MAX)
    reader.expect(method)
    events = feed(reader, response(status, framing) + NEXT)
    assert isinstance(events[0], Response)
    assert events[1:] == [END, PAUSED]
    assert not reader.has_body and reader.keep_alive
    assert reader.trailing_data == (NEXT, False)  # the next response is not taken as a body
    reader.start_next_cycle()
    reader.expect(b"GET")
    assert merged(drain(reader))[1:] == [Data(b"next"), END, PAUSED]


def test_informational_then_final_response_on_the_same_cycle() -> None:
    reader = ResponseReader(MAX)
    events = feed(reader, response(b"100 Continue"), response(b"103 Early Hints", b"Link: </a>"))
    assert events == [
        Response(100, (), b"Continue"),
        Response(103, ((b"Link", b"</a>"),), b"Early Hints"),
        NEED_DATA,
    ]
    assert not reader.done
    with pytest.raises(LocalHttpError):  # no cycle to end yet
        reader.start_next_cycle()
    events = feed(reader, NEXT)
    final = Response(200, ((b"Content-Length", b"4"),), b"OK")
    assert merged(events) == [final, Data(b"next"), END, PAUSED]


def test_not_idle_while_a_final_response_is_owed() -> None:
    # upstream.py pools a connection on `idle`: never while its response is still to come.
    reader = ResponseReader(MAX)
    assert reader.idle
    reader.expect(b"GET")
    assert not reader.idle
    assert feed(reader, response(b"100 Continue")) == [Response(100, (), b"Continue"), NEED_DATA]
    assert not reader.idle
    feed(reader, response(b"200 OK", b"Content-Length: 0"))
    reader.start_next_cycle()
    assert reader.idle


def test_switching_protocols_pauses_with_the_rest_as_trailing_data() -> None:
    reader = ResponseReader(MAX)
    frame = b"\x81\x05hello"  # a WebSocket frame right behind the head
    events = feed(reader, response(b"101 Switching Protocols", b"Upgrade: websocket") + frame)
    assert events == [
        Response(101, ((b"Upgrade", b"websocket"),), b"Switching Protocols"),
        PAUSED,
    ]
    assert reader.next_event() is PAUSED
    assert reader.trailing_data == (frame, False)
    assert not reader.done
    with pytest.raises(LocalHttpError):  # what follows is not HTTP
        reader.start_next_cycle()
    reader.receive_data(b"more")
    assert reader.trailing_data == (frame + b"more", False)


@pytest.mark.parametrize(
    "lines",
    [
        (b"Content-Length: 3, 3",),
        (b"Content-Length: 3", b"Content-Length: 3"),
        (b"Content-Length: 3,3", b"Content-Length:  3 "),
    ],
)
def test_equal_repeated_content_lengths_are_one(lines: tuple[bytes, ...]) -> None:
    reader = ResponseReader(MAX)
    events = feed(reader, response(b"200 OK", *lines) + b"abc" + NEXT)
    assert events[1:] == [Data(b"abc"), END, PAUSED]
    assert reader.trailing_data[0] == NEXT


@pytest.mark.parametrize(
    "lines",
    [
        (b"Content-Length: 3, 4",),
        (b"Content-Length: 3", b"Content-Length: 4"),
    ],
)
def test_conflicting_content_lengths_are_rejected(lines: tuple[bytes, ...]) -> None:
    assert response_error(response(b"200 OK", *lines) + b"abcd").status_hint == 502


@pytest.mark.parametrize(
    "lines", [(b"Content-Length: x",), (b"Content-Length: 3,",), (b"Content-Length: " + b"1" * 19,)]
)
def test_malformed_response_content_length(lines: tuple[bytes, ...]) -> None:
    assert response_error(response(b"200 OK", *lines)).status_hint == 502


def test_transfer_encoding_overrides_content_length_in_responses() -> None:
    reader = ResponseReader(MAX)
    data = response(b"200 OK", b"Content-Length: 100", b"Transfer-Encoding: chunked")
    events = feed(reader, data + b"2\r\nab\r\n0\r\n\r\n" + NEXT)
    assert reader.body_framing == "chunked"
    assert events[1:] == [Data(b"ab"), END, PAUSED]
    assert reader.trailing_data[0] == NEXT


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chunked, gzip"])
def test_response_transfer_coding_other_than_chunked_is_bad_gateway(coding: bytes) -> None:
    # Re-chunked without its header the body would be corrupt: refused, as h11 did.
    data = response(b"200 OK", b"Transfer-Encoding: " + coding) + b"2\r\nzz\r\n0\r\n\r\n"
    assert response_error(data).status_hint == 502


def test_response_content_length_is_taken_once() -> None:
    reader = ResponseReader(MAX)
    feed(reader, response(b"200 OK", b"Content-Length: 2", b"Content-Length: 2, 2") + b"ok")
    assert reader.content_length == 2
    reader.start_next_cycle()
    reader.expect(b"GET")
    chunked = response(b"200 OK", b"Transfer-Encoding: chunked", b"Content-Length: 9")
    feed(reader, chunked + CHUNKED_END)
    assert reader.content_length is None  # Transfer-Encoding wins: no length to pass on


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (response(b"200 OK", b"Content-Length: 0"), True),
        (response(b"200 OK", b"Content-Length: 0", b"Connection: close"), False),
        (response(b"200 OK", b"Content-Length: 0", b"connection: Keep-Alive, Close"), False),
        (response(b"200 OK", b"Content-Length: 0", version=b"1.0"), False),
        (response(b"204 No Content", version=b"1.0"), False),
    ],
)
def test_response_keep_alive(data: bytes, keep_alive: bool) -> None:
    reader = ResponseReader(MAX)
    assert feed(reader, data)[-2:] == [END, PAUSED]
    assert reader.keep_alive is keep_alive


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"HTTP/1.1 200\r\n\r\n", Response(200, (), b"")),
        (b"HTTP/1.1 200 \r\n\r\n", Response(200, (), b"")),
        (b"HTTP/1.0 404 Not  Found\r\n\r\n", Response(404, (), b"Not  Found", b"1.0")),
        (b"HTTP/1.1 599 \xe2\x9c\x93\r\n\r\n", Response(599, (), b"\xe2\x9c\x93")),
    ],
)
def test_status_lines(data: bytes, expected: Response) -> None:
    reader = ResponseReader(MAX)
    reader.receive_data(data)
    assert reader.next_event() == expected


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\rK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\rX: y\r\n\r\n",  # bare CR
        b"HTTP/1.1 200 OK\nX: y\rZ: w\n\n",
        b"HTTP/1.1 099 Odd\r\n\r\n",  # not a 1xx
        b"HTTP/1.1 000 Zero\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
    ],
)
def test_malformed_response_heads_are_bad_gateway(data: bytes) -> None:
    assert response_error(data).status_hint == 502


def test_bare_lf_in_a_response_head() -> None:
    crlf = response(b"200 OK", b"Content-Length: 2", b"X: y") + b"\nz" + NEXT
    lf = b"HTTP/1.1 200 OK\nContent-Length: 2\r\nX: y\n\n\nz" + NEXT
    expected = feed(ResponseReader(MAX), crlf)
    assert expected[1:] == [Data(b"\nz"), END, PAUSED]
    assert feed(ResponseReader(MAX), lf) == expected
    informational = feed(ResponseReader(MAX), b"HTTP/1.1 100 Continue\n\n" + lf)
    assert informational == [Response(100, (), b"Continue"), *expected]


def test_response_head_limit() -> None:
    reader = ResponseReader(256)
    with pytest.raises(RemoteHttpError) as info:
        feed(reader, response(b"200 OK", b"X: " + b"v" * 300))
    assert info.value.status_hint == 431


def test_response_cut_mid_body() -> None:
    response_error(response(b"200 OK", b"Content-Length: 5") + b"abc", b"")
    response_error(response(b"200 OK", b"Transfer-Encoding: chunked") + b"5\r\nabc", b"")


def test_expect_applies_until_changed() -> None:
    reader = ResponseReader(MAX)
    reader.expect(b"HEAD")
    data = response(b"200 OK", b"Content-Length: 3")
    assert feed(reader, data + data)[1:] == [END, PAUSED]
    reader.start_next_cycle()
    reader.expect(b"GET")
    assert feed(reader, b"abc")[1:] == [Data(b"abc"), END, PAUSED]


# -- state properties ----------------------------------------------------------
def test_idle_done_has_body_and_trailing_data_through_a_cycle() -> None:
    reader = RequestReader(MAX)
    assert (reader.idle, reader.done, reader.has_body) == (True, False, False)
    assert reader.trailing_data == (b"", False)
    reader.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    assert not reader.idle  # bytes of a request are in
    assert reader.trailing_data[0].startswith(b"POST")
    assert isinstance(reader.next_event(), Request)
    assert (reader.idle, reader.done, reader.has_body) == (False, False, True)
    assert reader.trailing_data == (b"ab", False)
    assert reader.next_event() == Data(b"ab")
    assert reader.trailing_data == (b"", False)
    reader.receive_data(b"cd")
    reader.receive_data(b"")
    assert reader.next_event() == Data(b"cd")
    assert reader.next_event() == END
    assert (reader.idle, reader.done, reader.has_body) == (False, True, False)
    assert reader.trailing_data == (b"", True)
    reader.start_next_cycle()
    assert not reader.idle  # EOF: nothing can come
    assert reader.next_event() == CLOSED
    assert not reader.done


# -- framing -------------------------------------------------------------------
def test_frame_request_head_round_trip() -> None:
    headers: Headers = ((b"Host", b"example.com"), (b"x-Mixed", b"a, b"), (b"X-Empty", b""))
    data = frame_request_head(b"DELETE", b"/a/b?c=%20", headers)
    assert data == (
        b"DELETE /a/b?c=%20 HTTP/1.1\r\nHost: example.com\r\nx-Mixed: a, b\r\nX-Empty: \r\n\r\n"
    )
    reader = RequestReader(MAX)
    assert feed(reader, data) == [Request(b"DELETE", b"/a/b?c=%20", headers), END, PAUSED]


def test_frame_chunked_request_round_trip() -> None:
    headers = [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]
    chunks = [b"x" * 300, b"y", bytes(range(256))]
    wire = frame_request_head(b"POST", b"/up", headers)
    for chunk in chunks:
        wire += b"".join(frame_chunk(chunk))
    wire += CHUNKED_END
    reader = RequestReader(MAX)
    assert merged(feed(reader, wire)) == [
        Request(b"POST", b"/up", tuple(headers)),
        Data(b"".join(chunks)),
        END,
        PAUSED,
    ]
    assert reader.trailing_data == (b"", False)


def test_frame_response_round_trip() -> None:
    headers = [(b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"chunked")]
    wire = frame_response_head(404, b"Not Found", headers)
    wire += b"".join(frame_chunk(b"nope")) + CHUNKED_END
    reader = ResponseReader(MAX)
    assert merged(feed(reader, wire)) == [
        Response(404, tuple(headers), b"Not Found"),
        Data(b"nope"),
        END,
        PAUSED,
    ]
    info = frame_response_head(100, b"Continue", [])
    assert info == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert feed(ResponseReader(MAX), info) == [Response(100, (), b"Continue"), NEED_DATA]


def test_frame_chunk() -> None:
    assert frame_chunk(b"hello") == (b"5\r\n", b"hello", b"\r\n")
    assert frame_chunk(b"x" * 255)[0] == b"ff\r\n"
    assert CHUNKED_END == b"0\r\n\r\n"
    with pytest.raises(LocalHttpError):  # b"0\r\n\r\n" would end the body early
        frame_chunk(b"")


@pytest.mark.parametrize(
    "headers",
    [
        [(b"X", b"a\rb")],
        [(b"X", b"a\nb")],
        [(b"X", b"a\r\nEvil: injected")],  # would be two well-formed lines
        [(b"X", b"a\r\n\r\nGET /smuggled HTTP/1.1")],
        [(b"X", b"a\x00b")],
        [(b"Bad Name", b"v")],
        [(b"", b"v")],
        [(b"X\r\nY", b"v")],
        [(b"Host", b"ok"), (b"X", b"\n")],
    ],
)
def test_framing_refuses_bad_headers(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(LocalHttpError):
        frame_request_head(b"GET", b"/", headers)
    with pytest.raises(LocalHttpError):
        frame_response_head(200, b"OK", headers)


@pytest.mark.parametrize("name", [b"X-Forwarded-For:1.2.3.4", b"Host:", b"X Y", b"X\t"])
def test_framing_refuses_a_colon_or_space_in_a_name(name: bytes) -> None:
    # b"Host:evil: x" is a well-formed line, read back as another header than meant.
    with pytest.raises(LocalHttpError):
        frame_request_head(b"GET", b"/", [(b"Host", b"a"), (name, b"x")])
    with pytest.raises(LocalHttpError):
        frame_response_head(200, b"OK", [(name, b"x")])


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"", b"/"),
        (b"GE T", b"/"),
        (b"GET\r\n", b"/"),
        (b"G(T", b"/"),
        (b"GET", b""),
        (b"GET", b"/a b"),
        (b"GET", b"/\r\nHost: evil"),
        (b"GET", b"/ HTTP/1.1\r\nHost: a\r\n\r\nGET /smuggled"),
        (b"GET", b"/\x00"),
    ],
)
def test_framing_refuses_bad_request_lines(method: bytes, target: bytes) -> None:
    with pytest.raises(LocalHttpError):
        frame_request_head(method, target, [(b"Host", b"a")])


@pytest.mark.parametrize(
    ("status", "reason"),
    [(200, b"O\rK"), (200, b"OK\n"), (200, b"OK\r\nX: y"), (99, b"Low"), (1000, b"High")],
)
def test_framing_refuses_bad_status_lines(status: int, reason: bytes) -> None:
    with pytest.raises(LocalHttpError):
        frame_response_head(status, reason, [])


@pytest.mark.parametrize("reason", [b"O\x00K", b"\x1b[31m", b"OK\x7f"])
def test_framing_refuses_control_characters_in_a_reason(reason: bytes) -> None:
    with pytest.raises(LocalHttpError):
        frame_response_head(200, reason, [])


# -- properties ----------------------------------------------------------------
_TCHAR = b"!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
_VCHAR = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]

tokens = st.lists(st.sampled_from(_TCHAR), min_size=1, max_size=8).map(bytes)
values = st.lists(st.sampled_from(_VCHAR), max_size=16).map(lambda v: bytes(v).strip(b" \t"))
targets = st.lists(st.integers(0x21, 0x7E), max_size=16).map(lambda t: b"/" + bytes(t))


def some_bare_lf(draw: st.DrawFn, lines: bytes) -> bytes:
    """`lines` with each CRLF sent as CRLF or as a bare LF (RFC 9112 2.2: the same)."""
    first, *rest = lines.split(b"\r\n")
    return first + b"".join(draw(st.sampled_from([b"\r\n", b"\n"])) + line for line in rest)


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[Event], bytes]:
    """One request as the expected events and its wire bytes (framed by http1 itself,
    some line endings then sent as bare LF)."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]) | tokens)
    target = draw(targets)
    extra = draw(st.lists(st.tuples(tokens.map(lambda n: b"X-" + n), values), max_size=4))
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"".join(chunks)
    headers = [(b"Host", b"example.com"), *extra]
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
    else:
        body = b""
    framed = frame_request_head(method, target, headers)
    wire = draw(st.sampled_from([b"", b"\r\n"])) + some_bare_lf(draw, framed)
    if framing == "chunked":
        for chunk in chunks:
            size, data, crlf = frame_chunk(chunk)
            if draw(st.booleans()):
                size = size[:-2] + b" ;ext=1\r\n"
            wire += size + data + crlf  # chunk-size lines keep their CRLF
        trailers = draw(st.sampled_from([b"\r\n", b"X-Trailer: t\r\n\r\n"]))
        wire += b"0\r\n" + some_bare_lf(draw, trailers)
    else:
        wire += body
    events: list[Event] = [Request(method, target, tuple(headers))]
    if body:
        events.append(Data(body))
    events.append(END)
    return events, wire


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[Event], bytes]:
    messages = draw(st.lists(requests(), min_size=1, max_size=3))
    events = [e for evs, _ in messages for e in evs] + [CLOSED]
    return events, b"".join(wire for _, wire in messages)


@settings(deadline=None, max_examples=150)
@given(pipelines(), st.data())
def test_any_split_gives_the_same_events(
    pipeline: tuple[list[Event], bytes], data: st.DataObject
) -> None:
    expected, wire = pipeline
    whole = run(RequestReader(MAX), [wire])
    assert merged(whole) == expected
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts")
    assert merged(run(RequestReader(MAX), split(wire, cuts))) == expected
    # The worst case: one byte at a time.
    assert merged(run(RequestReader(MAX), [wire[i : i + 1] for i in range(len(wire))])) == expected


_NASTY = [b"\r", b"\n", b"\r\n", b":", b" ", b"\t", b";", b"0", b"f", b"\x00", b"\xff", b","]


@st.composite
def mutated(draw: st.DrawFn, wires: st.SearchStrategy[bytes]) -> bytes:
    """A valid stream with a few bytes replaced, inserted or deleted."""
    wire = bytearray(draw(wires))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(wire)))
        piece = draw(st.sampled_from(_NASTY) | st.binary(min_size=1, max_size=3))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        if op == "insert":
            wire[at:at] = piece
        elif op == "replace":
            wire[at : at + len(piece)] = piece
        else:
            del wire[at : at + draw(st.integers(1, 4))]
    return bytes(wire)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([100, 101, 200, 204, 304, 404]))
    framing = draw(st.sampled_from([b"Content-Length", b"Transfer-Encoding", None]))
    body = draw(st.binary(max_size=30))
    headers = [(b"Connection", b"close")] if draw(st.booleans()) else []
    if framing == b"Content-Length":
        headers.append((framing, b"%d" % len(body)))
    elif framing == b"Transfer-Encoding":
        headers.append((framing, b"chunked"))
        body = (b"".join(frame_chunk(body)) if body else b"") + CHUNKED_END
    return frame_response_head(status, b"Reason", headers) + body


def hostile(valid: st.SearchStrategy[bytes], prefix: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: prefix + b),
        mutated(valid),
    )


def only_remote_errors(reader: Reader, wire: bytes, cuts: list[int]) -> None:
    try:
        run(reader, split(wire, cuts))
    except RemoteHttpError:
        with pytest.raises(RemoteHttpError):  # and again, never a different failure
            reader.next_event()


@settings(deadline=None, max_examples=300)
@given(
    hostile(pipelines().map(lambda p: p[1]), b"GET / HTTP/1.1\r\nHost: a\r\n"),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_request_reader_only_raises_remote_errors(wire: bytes, cuts: list[int]) -> None:
    only_remote_errors(RequestReader(256), wire, cuts)


@settings(deadline=None, max_examples=300)
@given(
    hostile(st.lists(responses(), min_size=1, max_size=3).map(b"".join), b"HTTP/1.1 200 OK\r\n"),
    st.lists(st.integers(0, 400), max_size=8),
    st.sampled_from([b"GET", b"HEAD"]),
)
def test_response_reader_only_raises_remote_errors(
    wire: bytes, cuts: list[int], method: bytes
) -> None:
    reader = ResponseReader(256)
    reader.expect(method)
    only_remote_errors(reader, wire, cuts)
