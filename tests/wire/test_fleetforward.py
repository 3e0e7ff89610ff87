"""The fleet's forwarding header (PROTOCOL.md 13): sealed, read back, and every way it
is refused."""

from __future__ import annotations

import pytest

from tunneld.wire.fleetforward import (
    MAX_SKEW_MS,
    Forwarded,
    ForwardError,
    NonceCache,
    seal,
    verify,
)
from tunneld.wire.proxyheader import NEED_DATA, ProxyHeader, ProxyHeaderReader, encode_v2

SECRET = bytes(range(32))
NOW = 1_770_000_000_000
NONCE = b"n" * 16
CLIENT = ("203.0.113.9", 50000)
TO = ("10.0.0.12", 8443)


def read(data: bytes) -> tuple[ProxyHeader, bytes, bytes]:
    reader = ProxyHeaderReader()
    reader.receive_data(data)
    event = reader.next_event()
    assert event is not NEED_DATA and isinstance(event, ProxyHeader)
    return event, reader.header_bytes, reader.trailing_data


def sealed(**changes: object) -> bytes:
    args: dict[str, object] = {
        "secret": SECRET,
        "node_id": "relay-a",
        "now_ms": NOW,
        "nonce": NONCE,
        "source": CLIENT,
        "destination": TO,
        "sni": "home.example.com",
    }
    args.update(changes)
    return seal(**args)  # type: ignore[arg-type]


def test_a_sealed_header_verifies_and_names_the_client() -> None:
    header, raw, rest = read(sealed() + b"\x16\x03\x01")
    assert rest == b"\x16\x03\x01"
    assert verify(SECRET, header, raw, NOW + 1000) == Forwarded(
        "relay-a", "home.example.com", CLIENT, NOW, NONCE
    )
    # An IPv6 client too.
    header, raw, _ = read(sealed(source=("2001:db8::9", 1), destination=("fd00::12", 8443)))
    assert verify(SECRET, header, raw, NOW).source == ("2001:db8::9", 1)


@pytest.mark.parametrize(
    ("data", "secret", "now", "why"),
    [
        (sealed(), b"another fleet secret, 32 bytes!!", NOW, "bad MAC"),
        (sealed(), SECRET, NOW + MAX_SKEW_MS + 1, "from this relay's clock"),
        (sealed(), SECRET, NOW - MAX_SKEW_MS - 1, "from this relay's clock"),
        (encode_v2(CLIENT, TO), SECRET, NOW, "no fleet TLV"),
        (encode_v2(None, None), SECRET, NOW, "naming a client"),
        (encode_v2(CLIENT, TO, ((0xE0, b"\x01\x00short"),)), SECRET, NOW, "malformed"),
    ],
)
def test_refusals_say_why(data: bytes, secret: bytes, now: int, why: str) -> None:
    header, raw, _ = read(data)
    with pytest.raises(ForwardError, match=why):
        verify(secret, header, raw, now)


def test_any_changed_byte_breaks_the_mac() -> None:
    data = sealed()
    for i in range(16, len(data)):  # past the fixed part (which the reader checks)
        changed = bytearray(data)
        changed[i] ^= 0x01
        try:
            header, raw, _ = read(bytes(changed))
            verify(SECRET, header, raw, NOW)
        except (ForwardError, ValueError):
            continue
        raise AssertionError(f"byte {i} changed and still verified")


def test_a_nonce_is_good_once_within_the_window() -> None:
    cache = NonceCache(window_ms=1000, max_size=3)
    assert cache.fresh(b"a", 0) and not cache.fresh(b"a", 500)
    assert cache.fresh(b"a", 1500)  # forgotten after the window
    for n, at in ((b"b", 1600), (b"c", 1700), (b"d", 1800)):
        assert cache.fresh(n, at)
    assert cache.fresh(b"a", 1900)  # the oldest went first when full
