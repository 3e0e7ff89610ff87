"""The ClientHello parser: real OpenSSL ClientHellos, hand-built edge cases, fuzzing."""

from __future__ import annotations

import functools
import ssl
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.hostnames import hostname_key
from tunneld.wire.clienthello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    Status,
    parse_client_hello,
    unrecognized_name_alert,
)

# --- building ClientHellos ---------------------------------------------------


@functools.cache
def real_hello(sni: str | None, alpn: tuple[str, ...] = (), *, tls12_only: bool = False) -> bytes:
    """The bytes OpenSSL sends first, as a client with these settings."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if sni is None:
        ctx.check_hostname = False
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    data = outgoing.read()
    assert data[0] == 22 and int.from_bytes(data[3:5], "big") == len(data) - 5  # one record
    return data


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + u16(len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(u8(name_type) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn_ext(*protocols: bytes) -> bytes:
    names = b"".join(u8(len(p)) + p for p in protocols)
    return ext(16, u16(len(names)) + names)


def body(
    extensions: bytes | None = b"",
    *,
    session_id: bytes = b"",
    ciphers: bytes = b"\x13\x01",
    compression: bytes = b"\x00",
) -> bytes:
    out = b"\x03\x03" + bytes(32) + u8(len(session_id)) + session_id
    out += u16(len(ciphers)) + ciphers + u8(len(compression)) + compression
    if extensions is not None:
        out += u16(len(extensions)) + extensions
    return out


def handshake(payload: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + len(payload).to_bytes(3, "big") + payload


def records(message: bytes, sizes: list[int] | None = None, version: bytes = b"\x03\x01") -> bytes:
    """Frame a handshake message into records whose fragments have these sizes."""
    sizes = sizes or [len(message)]
    out, pos = b"", 0
    for size in sizes:
        fragment = message[pos : pos + size]
        out += b"\x16" + version + u16(len(fragment)) + fragment
        pos += size
    assert pos >= len(message)
    return out


def message_of(hello: bytes) -> bytes:
    """The handshake message inside a single-record ClientHello."""
    return hello[5:]


def parse_ok(data: bytes, **kwargs: int) -> ClientHello:
    result = parse_client_hello(data, **kwargs)
    assert isinstance(result, ClientHello), result
    return result


# --- real ClientHellos from OpenSSL ------------------------------------------

REAL_CASES = [
    pytest.param("home.example.com", (), False, id="sni"),
    pytest.param(None, (), False, id="no-sni"),
    pytest.param("home.example.com", ("acme-tls/1",), False, id="acme-alpn"),
    pytest.param("home.example.com", ("h2", "http/1.1"), False, id="h2-alpn"),
    pytest.param("home.example.com", ("h2", "http/1.1"), True, id="tls12-only"),
    pytest.param(None, ("acme-tls/1",), True, id="tls12-no-sni"),
]


@pytest.mark.parametrize(("sni", "alpn", "tls12"), REAL_CASES)
def test_real_client_hello(sni: str | None, alpn: tuple[str, ...], tls12: bool) -> None:
    data = real_hello(sni, alpn, tls12_only=tls12)
    hello = parse_ok(data)
    assert hello == ClientHello(sni=sni, alpn=alpn, length=len(data), tls_version=(3, 1))


def test_bytes_after_the_client_hello_are_not_consumed() -> None:
    data = real_hello("home.example.com", ("h2",))
    hello = parse_ok(data + b"\x17\x03\x03\x00\x05early")
    assert hello.length == len(data) and hello.sni == "home.example.com"


def test_bytearray_and_memoryview_inputs() -> None:
    data = real_hello("home.example.com", ("h2",))
    expected = parse_ok(data)
    assert parse_client_hello(bytearray(data)) == expected
    assert parse_client_hello(memoryview(data)) == expected
    padded = memoryview(b"xx" + data + b"yy")[2:-2]
    assert parse_client_hello(padded) == expected
    strided = memoryview(bytes(b for b in data for _ in (0, 1)))[::2]
    assert parse_client_hello(strided) == expected


def test_sni_is_normalized() -> None:
    data = real_hello("Home.Example.COM.")
    assert b"Home.Example.COM." in data  # OpenSSL sends it as given
    assert parse_ok(data).sni == "home.example.com"


def test_idna_sni_stays_an_a_label() -> None:
    assert parse_ok(real_hello("bücher.example")).sni == "xn--bcher-kva.example"


@pytest.mark.parametrize("split", [1, 5, 6, 9, 10, 100, -1])
def test_byte_by_byte_and_tcp_splits(split: int) -> None:
    data = real_hello("home.example.com", ("acme-tls/1",))
    split %= len(data)
    assert parse_client_hello(data[:split]) is Status.NEED_MORE
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) is Status.NEED_MORE, end
    assert parse_ok(data).alpn == ("acme-tls/1",)


def test_client_hello_split_across_three_records() -> None:
    data = real_hello("home.example.com", ("h2", "http/1.1"))
    message = message_of(data)
    framed = records(message, [1, 3, len(message) - 4])  # header itself straddles records
    for end in range(len(framed)):
        assert parse_client_hello(framed[:end]) is Status.NEED_MORE, end
    hello = parse_ok(framed)
    assert hello == ClientHello("home.example.com", ("h2", "http/1.1"), len(framed), (3, 1))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_record_split_gives_the_same_client_hello(data: st.DataObject) -> None:
    raw = real_hello("home.example.com", ("h2", "http/1.1"))
    message = message_of(raw)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(message) - 1), max_size=6)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    framed = records(message, sizes, version=b"\x03\x03")
    tcp_cut = data.draw(st.integers(0, len(framed) - 1))
    assert parse_client_hello(framed[:tcp_cut]) is Status.NEED_MORE
    hello = parse_ok(framed)
    assert hello == ClientHello("home.example.com", ("h2", "http/1.1"), len(framed), (3, 3))


# --- NOT_TLS ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"G",
        b"\x80\x2e\x01\x03\x01",  # SSLv2-compatible ClientHello
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert, not a handshake
        b"\x16\x02",  # major version not 3
        b"\x16\x03\x09",  # unknown minor version
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ],
)
def test_not_tls(data: bytes) -> None:
    assert parse_client_hello(data) is Status.NOT_TLS


def test_empty_input_needs_more() -> None:
    assert parse_client_hello(b"") is Status.NEED_MORE


# --- TOO_LARGE -----------------------------------------------------------------


def test_too_large_with_small_max_size() -> None:
    data = real_hello("home.example.com")
    assert parse_client_hello(data, max_size=100) is Status.TOO_LARGE
    assert parse_client_hello(data[:5], max_size=100) is Status.TOO_LARGE  # from the header alone
    assert parse_client_hello(data, max_size=len(data) - 1) is Status.TOO_LARGE
    assert parse_ok(data, max_size=len(data)).length == len(data)


def test_too_large_as_soon_as_the_handshake_length_is_known() -> None:
    # A 1 MiB ClientHello announced in small records: refused before buffering it.
    start = b"\x16\x03\x01\x00\x04" + b"\x01" + (2**20).to_bytes(3, "big")
    assert parse_client_hello(start) is Status.TOO_LARGE
    # 16 KiB + 1 of handshake needs two records: just over the default bound.
    big = handshake(body(ext(21, bytes(MAX_CLIENT_HELLO - 4 - len(body()) - 4 - 9))))
    framed = records(big, [2**14, len(big) - 2**14])
    assert len(framed) == MAX_CLIENT_HELLO + 1
    assert parse_client_hello(framed) is Status.TOO_LARGE
    assert parse_ok(framed, max_size=len(framed)).length == len(framed)


def test_default_bound_admits_a_full_16k_client_hello() -> None:
    message = handshake(body(ext(21, bytes(2**14 - 4 - len(body()) - 4))))
    assert len(message) == 2**14
    framed = records(message, [len(message) // 3, len(message) // 3, len(message)])
    assert parse_ok(framed).length == len(framed) <= MAX_CLIENT_HELLO


def test_too_large_when_tiny_records_add_up() -> None:
    message = handshake(body(sni_ext(b"home.example.com")))
    framed = records(message, [1] * len(message))
    assert parse_ok(framed).sni == "home.example.com"
    assert parse_client_hello(framed, max_size=len(framed) - 1) is Status.TOO_LARGE


# --- MALFORMED -----------------------------------------------------------------


def test_corrupted_lengths_in_a_real_client_hello() -> None:
    data = bytearray(real_hello("home.example.com", ("h2",)))
    shorter = bytearray(data)
    shorter[8] -= 1  # handshake length one less than the record holds
    assert parse_client_hello(shorter) is Status.MALFORMED
    zero_record = bytearray(data[:5])
    zero_record[3:5] = b"\x00\x00"
    assert parse_client_hello(zero_record) is Status.MALFORMED
    huge_record = bytearray(data)
    huge_record[3:5] = u16(2**14 + 1)
    assert parse_client_hello(huge_record) is Status.MALFORMED
    # handshake length one more: waits for another record, then an alert arrives
    longer = bytearray(data)
    longer[8] += 1
    assert parse_client_hello(longer) is Status.NEED_MORE
    assert parse_client_hello(longer + unrecognized_name_alert()) is Status.MALFORMED


def test_wrong_handshake_type() -> None:
    server_hello = records(handshake(body(), msg_type=2))
    assert parse_client_hello(server_hello[:6]) is Status.MALFORMED  # known from its first byte
    assert parse_client_hello(server_hello) is Status.MALFORMED


def test_non_handshake_record_interleaved() -> None:
    message = handshake(body(sni_ext(b"home.example.com")))
    framed = records(message, [10, len(message)])
    first, rest = framed[:15], framed[15:]
    ccs = b"\x14\x03\x03\x00\x01\x01"
    assert parse_client_hello(first + ccs[:1]) is Status.MALFORMED
    assert parse_client_hello(first + ccs + rest) is Status.MALFORMED


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(body(sni_ext(b"a.example"))[:-1], id="extension-cut-short"),
        pytest.param(body(sni_ext(b"a.example")) + b"\x00", id="bytes-after-extensions"),
        pytest.param(body(ext(0, b"\x00\x06\x00\x00\x02ab")), id="bad-server-name-list-length"),
        pytest.param(body(ext(16, b"\x00\x03\x05h2")), id="bad-alpn-name-length"),
        pytest.param(body(alpn_ext(b"h2", b"")), id="empty-alpn-name"),
        pytest.param(body(ext(16, b"\x00\x00")), id="empty-alpn-list"),
        pytest.param(body(ext(0, b"\x00\x00")), id="empty-server-name-list"),
        pytest.param(body(sni_ext(b"")), id="empty-host-name"),
        pytest.param(body(sni_ext("bücher.de".encode())), id="non-ascii-host-name"),
        pytest.param(body(sni_ext(b"a..example")), id="empty-label"),
        pytest.param(body(sni_ext(b".")), id="only-a-dot"),
        pytest.param(body(sni_ext(b"a.example", b"b.example")), id="two-host-names"),
        pytest.param(body(sni_ext(b"a.example") + sni_ext(b"a.example")), id="duplicate-extension"),
        pytest.param(body(session_id=bytes(33)), id="session-id-too-long"),
        pytest.param(body(ciphers=b""), id="no-cipher-suites"),
        pytest.param(body(ciphers=b"\x13\x01\x13"), id="odd-cipher-suites"),
        pytest.param(body(compression=b""), id="no-compression-method"),
        pytest.param(body()[:20], id="truncated-random"),
    ],
)
def test_malformed_client_hello_bodies(payload: bytes) -> None:
    assert parse_client_hello(records(handshake(payload))) is Status.MALFORMED


# --- hand-built edge cases that parse -------------------------------------------


def test_hand_built_client_hellos() -> None:
    no_extensions = parse_ok(records(handshake(body(None))))
    assert (no_extensions.sni, no_extensions.alpn) == (None, ())
    other_name_type = body(sni_ext(b"\xff\xfe", name_type=7) + alpn_ext(b"\x0a\x0a", b"h2"))
    hello = parse_ok(records(handshake(other_name_type), version=b"\x03\x03"))
    assert hello.sni is None
    assert hello.alpn == ("\x0a\x0a", "h2")  # GREASE survives, one-to-one via latin-1
    assert hello.tls_version == (3, 3)
    underscore = parse_ok(records(handshake(body(sni_ext(b"My_Host.Example.")))))
    assert underscore.sni == "my_host.example"


# --- helpers and the sans-IO contract ----------------------------------------------


def test_unrecognized_name_alert() -> None:
    assert unrecognized_name_alert() == b"\x15\x03\x03\x00\x02\x02\x70"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Home.Example.COM.", "home.example.com"),
        ("home.example.com", "home.example.com"),
        ("a.example..", "a.example."),  # only one dot is stripped
        ("", ""),
    ],
)
def test_normalize_hostname(name: str, expected: str) -> None:
    assert hostname_key(name) == expected


def test_parser_imports_no_io() -> None:
    code = (
        "import sys, tunneld.wire.clienthello;"
        "print(sorted({'trio', 'socket', 'ssl'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- fuzzing -----------------------------------------------------------------------

_RESULT_TYPES = (ClientHello, Status)


def assert_prefix_monotonic(data: bytes) -> ClientHello | Status:
    """Growing prefixes give NEED_MORE, then one answer that never changes."""
    final = parse_client_hello(data)
    assert isinstance(final, _RESULT_TYPES)
    settled = False
    for end in range(len(data)):
        result = parse_client_hello(data[:end])
        if settled or result is not Status.NEED_MORE:
            settled = True
            assert result == final, (end, result, final)
    return final


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), _RESULT_TYPES)
    assert isinstance(parse_client_hello(b"\x16\x03\x01" + data, max_size=300), _RESULT_TYPES)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([("home.example.com", ("h2", "http/1.1")), (None, ("acme-tls/1",))]),
    st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6),
    st.integers(0, 2**16),
    st.binary(max_size=8),
)
def test_mutated_real_client_hellos_never_raise(
    settings_: tuple[str | None, tuple[str, ...]],
    patches: list[tuple[int, int]],
    where: int,
    inserted: bytes,
) -> None:
    data = bytearray(real_hello(*settings_))
    for index, value in patches:
        data[index % len(data)] = value
    at = where % len(data)
    data[at:at] = inserted
    assert_prefix_monotonic(bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_mutated_extension_lists_never_raise(data: st.DataObject) -> None:
    # Mutations aimed at the extensions, where the length fields nest deepest.
    payload = bytearray(body(sni_ext(b"home.example.com") + alpn_ext(b"h2", b"http/1.1")))
    start = len(body(None))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(start, len(payload) - 1))
        payload[index] = data.draw(st.integers(0, 255))
    assert_prefix_monotonic(records(handshake(bytes(payload))))
