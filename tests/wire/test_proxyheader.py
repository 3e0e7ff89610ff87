"""The PROXY protocol reader and writer (v1 and v2), fed like the relay feeds it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.netaddr import normalize_ip
from tunneld.wire.clienthello import parse_client_hello
from tunneld.wire.dataconn import preamble
from tunneld.wire.proxyheader import (
    NEED_DATA,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    encode_v1,
    encode_v2,
    starts_like_proxy,
)

HELLO = b"\x16\x03\x01\x00\x05hello"  # what follows the header: the client's own bytes


def read(data: bytes, chunk: int | None = None) -> tuple[ProxyHeader, bytes]:
    reader = ProxyHeaderReader()
    step = chunk or len(data) or 1
    event: object = NEED_DATA
    for i in range(0, len(data), step):
        reader.receive_data(data[i : i + step])
        event = reader.next_event()
        if event is not NEED_DATA:
            break
    assert isinstance(event, ProxyHeader), event
    # The bytes after the header, whatever arrived with it.
    return event, reader.trailing_data + data[i + step :]


def fails(data: bytes) -> str:
    reader = ProxyHeaderReader()
    reader.receive_data(data)
    with pytest.raises(ProxyHeaderError) as info:
        reader.next_event()
    return str(info.value)


# -- version 1 ----------------------------------------------------------------------


def test_v1_tcp4_names_the_client_and_leaves_its_bytes() -> None:
    header, rest = read(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n" + HELLO)
    assert header.version == 1
    assert header.source == ("203.0.113.7", 51234)
    assert header.destination == ("192.0.2.1", 443)
    assert rest == HELLO


def test_v1_tcp6_and_unknown() -> None:
    header, _ = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n")
    assert header.source == ("2001:db8::7", 40000)
    header, rest = read(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n" + HELLO)
    assert header.source is None and rest == HELLO


def test_v1_byte_by_byte_is_the_same_as_at_once() -> None:
    data = b"PROXY TCP4 10.1.2.3 10.0.0.1 1 65535\r\n" + HELLO
    assert read(data, chunk=1) == read(data)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"PROXY TCP4 10.1.2.3 10.0.0.1 1\r\n", "malformed"),
        (b"PROXY TCP5 10.1.2.3 10.0.0.1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 10.1.2.3  10.0.0.1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", "not TCP4"),
        (b"PROXY TCP4 10.1.2.300 10.0.0.1 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 10.1.2.3 10.0.0.1 01 2\r\n", "not a port"),
        (b"PROXY TCP4 10.1.2.3 10.0.0.1 -1 2\r\n", "not a port"),
        (b"PROXY TCP4 10.1.2.3 10.0.0.1 1 65536\r\n", "over 65535"),
        (b"PROXY TCP4 10.1.2.3 10.0.0.1 1 2\n", "CRLF"),
        (b"PROXY TCP4 \xff\r\n", "ASCII"),
        (b"PROXY " + b"A" * V1_MAX, "longer than 107"),
        (b"PROXZ TCP4", "not a PROXY"),
        (b"\x16\x03\x01", "not a PROXY"),
    ],
)
def test_v1_bad_lines_say_why(line: bytes, why: str) -> None:
    assert why in fails(line)


def test_v1_a_wrong_byte_fails_before_the_line_ends() -> None:
    assert "not a PROXY" in fails(b"PROXX")


# -- version 2 ----------------------------------------------------------------------


def test_v2_ipv4_round_trip_with_tlvs() -> None:
    tlvs = ((0x01, b"h2"), (0xEA, b"vpce-0123"))
    data = encode_v2(("198.51.100.9", 61000), ("192.0.2.1", 443), tlvs) + HELLO
    header, rest = read(data)
    assert header == ProxyHeader(
        2, ("198.51.100.9", 61000), ("192.0.2.1", 443), tlvs, len(data) - len(HELLO)
    )
    assert rest == HELLO
    assert read(data, chunk=1) == read(data)


def test_v2_ipv6_and_mixed_families() -> None:
    header, _ = read(encode_v2(("2001:db8::9", 1), ("2001:db8::1", 443)))
    assert header.source == ("2001:db8::9", 1)
    header, _ = read(encode_v2(("198.51.100.9", 2), ("2001:db8::1", 443)))
    assert header.source is not None
    assert normalize_ip(header.source[0]) == "198.51.100.9"  # as the relay reads it


def test_v2_local_names_no_client_and_its_addresses_are_ignored() -> None:
    header, rest = read(encode_v2(None, None) + HELLO)
    assert header.source is None and rest == HELLO
    local_inet = head(0x20, 0x11, 3) + b"abc"  # LOCAL: whatever the body holds
    assert read(local_inet + HELLO) == (ProxyHeader(2, None, None, (), 19), HELLO)


def test_v2_unix_and_unspec_name_no_client() -> None:
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + b"\0" * 216
    assert read(unix)[0].source is None
    unspec = V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
    assert read(unspec)[0].source is None


def head(ver_cmd: int, fam: int, length: int) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", length)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (head(0x11, 0x11, 12), "version 1"),
        (head(0x2F, 0x11, 12), "unknown command"),
        (head(0x21, 0x51, 12), "unknown address family"),
        (head(0x21, 0x12, 12), "datagram"),
        (head(0x21, 0x11, 4) + b"\0" * 4, "too short for its addresses"),
        (head(0x21, 0x11, 14) + b"\0" * 14, "TLV cut short"),
        (head(0x21, 0x11, 16) + b"\0" * 12 + b"\x01\x00\x09x", "longer than the header"),
        (head(0x21, 0x11, 65535), "over the limit"),
        (V2_SIGNATURE[:5] + b"X", "not a PROXY"),
    ],
)
def test_v2_bad_headers_say_why(data: bytes, why: str) -> None:
    assert why in fails(data)


def test_v2_oversized_header_fails_before_its_body_arrives() -> None:
    """The limit is checked on the length field: the reader buffers nothing more."""
    reader = ProxyHeaderReader(max_size=512)
    reader.receive_data(head(0x21, 0x11, 600))
    with pytest.raises(ProxyHeaderError, match="over the limit of 512"):
        reader.next_event()


def test_v2_waits_for_the_whole_header() -> None:
    data = encode_v2(("198.51.100.9", 61000), ("192.0.2.1", 443))
    reader = ProxyHeaderReader()
    reader.receive_data(data[:-1])
    assert reader.next_event() is NEED_DATA
    assert reader.trailing_data == b""
    reader.receive_data(data[-1:])
    assert isinstance(reader.next_event(), ProxyHeader)


# -- telling it apart -----------------------------------------------------------------


def test_the_first_byte_tells_a_header_from_tls_and_a_data_connection() -> None:
    assert starts_like_proxy(b"P") and starts_like_proxy(b"\r")
    assert starts_like_proxy(encode_v1(("10.0.0.1", 1), ("10.0.0.2", 2)))
    assert starts_like_proxy(encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2)))
    assert not starts_like_proxy(HELLO)
    assert not starts_like_proxy(preamble(bytes(16)))
    assert not starts_like_proxy(b"GET / HTTP/1.1\r\n")
    assert not starts_like_proxy(b"")
    # And the ClientHello parser never takes a header for TLS.
    assert parse_client_hello(encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2))).name == "NOT_TLS"


def test_encode_v1_round_trips() -> None:
    line = encode_v1(("2001:db8::9", 5), ("2001:db8::1", 443))
    assert line == b"PROXY TCP6 2001:db8::9 2001:db8::1 5 443\r\n"
    assert read(line)[0].source == ("2001:db8::9", 5)
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_any_input_is_a_header_need_data_or_a_clear_error(data: bytes, chunk: int) -> None:
    """Never another exception, and the answer does not depend on how bytes arrive."""
    outcomes = []
    for step in (len(data) or 1, chunk):
        reader = ProxyHeaderReader()
        outcome: object = NEED_DATA
        for i in range(0, len(data), step):
            reader.receive_data(data[i : i + step])
            try:
                outcome = reader.next_event()
            except ProxyHeaderError:
                outcome = "error"
                break
            if outcome is not NEED_DATA:
                outcome = (outcome, reader.trailing_data + data[i + step :])
                break
        outcomes.append(outcome)
    assert outcomes[0] == outcomes[1]


@given(
    st.ip_addresses(v=4).map(str),
    st.integers(0, 65535),
    st.binary(max_size=50),
    st.integers(min_value=1, max_value=40),
)
def test_v2_round_trips_any_ipv4_client(ip: str, port: int, tail: bytes, chunk: int) -> None:
    data = encode_v2((ip, port), ("192.0.2.1", 443)) + tail
    header, rest = read(data, chunk)
    assert header.source == (ip, port) and rest == tail
