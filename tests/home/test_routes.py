"""Which Host a connection may carry (421 otherwise), and which route an SNI picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunneld.config import HomeConfig, HomeRelaySection, RouteSection, TlsSection
from tunneld.home.proxy.core import misdirected
from tunneld.home.routes import RouteTable
from tunneld.home.watchdog import Watchdog
from tunneld.home.watchdog.bans import BanList

NAMES = frozenset({"home.test", "cams.test"})


@pytest.mark.parametrize(
    ("host", "sni", "wrong"),
    [
        (b"home.test", b"home.test", False),
        (b"HOME.test.:443", b"home.test", False),
        (b"home.test", b"", False),  # no SNI (a LAN client by address): Host decides
        (b"cams.test", b"home.test", True),  # differs from the SNI
        (b"other.test", b"", True),  # names no route
        (b"192.168.1.10", b"", True),
        (b"[::1]:443", b"", True),
    ],
)
def test_misdirected(host: bytes, sni: bytes, wrong: bool) -> None:
    assert (misdirected(host, sni, NAMES) is not None) is wrong


def test_routes_share_one_ban_unless_they_opt_out(tmp_path: Path) -> None:
    config = HomeConfig(
        path=tmp_path / "t.toml",
        relay=HomeRelaySection(url="wss://relay.test/v1/tunnel", token="x"),
        tls=TlsSection(hostnames=("home.test", "cams.test", "nvr.test")),
        route=(
            RouteSection(hostname="cams.test", upstream="http://127.0.0.1:1", preset="generic"),
            RouteSection(hostname="nvr.test", upstream="http://127.0.0.1:2", share_bans=False),
        ),
    )
    shared = Watchdog(config.watchdog, BanList())
    table = RouteTable(config, shared)
    default, cams, nvr = (table.for_sni(n) for n in ("home.test", "cams.test", "nvr.test"))
    assert table.for_sni(None) is default and table.for_sni("x.test") is default
    assert default.hostnames == {"home.test"}
    assert cams.watchdog.config.preset == "generic"
    for _ in range(config.watchdog.ban_threshold):
        cams.watchdog.failed("198.51.100.7", "test")
    # Banned on every route that shares bans, not on the one that opted out.
    assert shared.banned("198.51.100.7") is not None
    assert default.watchdog.banned("198.51.100.7") is not None
    assert nvr.watchdog.banned("198.51.100.7") is None
    for _ in range(config.watchdog.ban_threshold):
        nvr.watchdog.failed("198.51.100.8", "test")
    assert nvr.watchdog.banned("198.51.100.8") is not None
    assert shared.banned("198.51.100.8") is None
