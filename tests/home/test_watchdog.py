"""The client-address decision: the relay's address unless it is a trusted proxy."""

from __future__ import annotations

import ipaddress

import pytest

from tunneld.config import WatchdogSection
from tunneld.home.watchdog import Watchdog, client_address, parse_node

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48"))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("203.0.113.9", "203.0.113.9"),
        (" 203.0.113.9 ", "203.0.113.9"),
        ("203.0.113.9:4711", "203.0.113.9"),
        ("2001:db8::7", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ('"[2001:db8::7]:443"', "2001:db8::7"),
        ("2001:DB8:0::7", "2001:db8::7"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("[::ffff:203.0.113.9]:80", "203.0.113.9"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("203.0.113.9:port", None),
        ("[2001:db8::7", None),
        ("[2001:db8::7]x", None),
        ("300.1.1.1", None),
    ],
)
def test_parse_node(entry: str, expected: str | None) -> None:
    assert parse_node(entry) == expected


def test_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    assert client_address("198.51.100.7", ["1.2.3.4"], TRUSTED) == "198.51.100.7"
    assert client_address("198.51.100.7", ["1.2.3.4"], ()) == "198.51.100.7"
    assert client_address("::ffff:198.51.100.7", [], ()) == "198.51.100.7"


def test_trusted_peer_rightmost_untrusted_hop_is_the_client() -> None:
    chain = ["6.6.6.6", "203.0.113.9", "10.2.3.4"]  # the client may spoof the left part
    assert client_address("10.0.0.1", chain, TRUSTED) == "203.0.113.9"
    assert client_address("2001:db8:1::5", ["[2001:db8:2::9]:1234"], TRUSTED) == "2001:db8:2::9"


def test_trusted_peer_without_a_usable_chain() -> None:
    # No chain: the proxy itself is the client.
    assert client_address("10.0.0.1", [], TRUSTED) == "10.0.0.1"
    # Garbage stops the walk at the last trusted hop rather than guessing past it.
    assert client_address("10.0.0.1", ["203.0.113.9", "garbage", "10.0.0.2"], TRUSTED) == (
        "10.0.0.2"
    )
    # Every hop trusted: the leftmost one.
    assert client_address("10.0.0.1", ["10.9.9.9", "10.0.0.2"], TRUSTED) == "10.9.9.9"


def test_watchdog_uses_the_configured_trusted_proxies() -> None:
    dog = Watchdog(WatchdogSection(trusted_proxies=TRUSTED))
    assert dog.trusts("10.1.2.3") and not dog.trusts("192.0.2.1")
    assert not dog.trusts("not an address")
    assert dog.client_address("10.1.2.3", ["192.0.2.1"]) == "192.0.2.1"
    plain = Watchdog(WatchdogSection())
    assert not plain.trusts("10.1.2.3")
    assert plain.client_address("10.1.2.3", ["192.0.2.1"]) == "10.1.2.3"
