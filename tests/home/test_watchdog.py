"""The watchdog: the client-address decision, admission, failed-login counting and bans."""

from __future__ import annotations

import dataclasses
import gzip
import ipaddress
import json
from typing import Any

import h11
import pytest
import trio
import trio.testing

from tunneld.config import UpstreamSection, WatchdogSection
from tunneld.demoapp import LOGIN_PASSWORD, LOGIN_USER, serve_app
from tunneld.home.proxy.core import Proxy
from tunneld.home.watchdog.bans import BanList
from tunneld.home.watchdog.core import (
    PEEK_BYTES,
    Watchdog,
    client_address,
    login_verdict,
    parse_node,
)
from tunneld.wire.events import BanEntry

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


# --- failed authentications and bans ------------------------------------------------


class Clock:
    """An injected wall clock the tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dog(clock: Clock, **settings: Any) -> Watchdog:
    config = dataclasses.replace(
        WatchdogSection(ban_threshold=3, ban_window=60.0, ban_duration=3600.0), **settings
    )
    return Watchdog(config, BanList(clock=clock), clock=clock)


def test_threshold_failures_within_the_window_ban_only_that_address() -> None:
    clock = Clock()
    wd = dog(clock)
    for _ in range(2):
        assert wd.failed("198.51.100.7", "HTTP 401") is None
    assert wd.failures("198.51.100.7") == 2
    assert wd.banned("198.51.100.7") is None
    ban = wd.failed("198.51.100.7", "HTTP 401")
    assert ban is not None and ban.ip == "198.51.100.7"
    assert ban.until == clock.now + 3600
    assert wd.banned("198.51.100.7") == ban
    assert wd.banned("198.51.100.8") is None
    assert wd.admit("198.51.100.7") == "banned"
    assert [e.ip for e in wd.ban_entries()] == ["198.51.100.7"]
    clock.now += 3600
    assert wd.banned("198.51.100.7") is None  # expired on time, even before the task prunes it


def test_failures_outside_the_window_are_forgotten() -> None:
    clock = Clock()
    wd = dog(clock)
    for _ in range(2):
        wd.failed("203.0.113.5", "x")
        clock.now += 31  # 62 s for the pair: the first leaves the 60 s window
    assert wd.failed("203.0.113.5", "x") is None
    assert wd.failures("203.0.113.5") == 2
    assert wd.failed("203.0.113.5", "x") is not None


def test_a_successful_login_resets_the_count() -> None:
    clock = Clock()
    wd = dog(clock)
    wd.failed("203.0.113.5", "x")
    wd.failed("203.0.113.5", "x")
    wd.succeeded("203.0.113.5")
    assert wd.failures("203.0.113.5") == 0
    assert wd.failed("203.0.113.5", "x") is None
    assert wd.failed("203.0.113.5", "x") is None
    assert wd.failed("203.0.113.5", "x") is not None


def test_zero_duration_bans_until_removed() -> None:
    clock = Clock()
    wd = dog(clock, ban_duration=0.0, ban_threshold=1)
    ban = wd.failed("203.0.113.5", "x")
    assert ban is not None and ban.until is None
    clock.now += 10 * 365 * 86400
    assert wd.banned("203.0.113.5") == ban
    assert [r.ip for r in wd.unban("203.0.113.5", "test")] == ["203.0.113.5"]
    assert wd.banned("203.0.113.5") is None


def test_never_ban_networks_are_never_banned() -> None:
    clock = Clock()
    wd = dog(clock, ban_threshold=1, never_ban=(ipaddress.ip_network("192.168.0.0/16"),))
    assert wd.failed("192.168.1.9", "x") is None
    assert wd.failures("192.168.1.9") == 0
    with pytest.raises(ValueError, match="never_ban"):
        wd.ban("192.168.1.9", None, "by hand")
    assert wd.ban("192.0.2.1", None, "by hand").ip == "192.0.2.1"


def test_ipv6_clients_are_banned_by_address_or_by_64() -> None:
    clock = Clock()
    exact = dog(clock, ban_threshold=1)
    exact.failed("2001:db8:1:2::5", "x")
    assert exact.banned("2001:db8:1:2::5") is not None
    assert exact.banned("2001:db8:1:2::6") is None

    wide = dog(clock, ban_threshold=2, ipv6_prefix=64)
    wide.failed("2001:db8:1:2::5", "x")
    ban = wide.failed("2001:db8:1:2:ffff::1", "x")  # same /64: failures add up
    assert ban is not None and ban.ip == "2001:db8:1:2::/64"
    assert wide.banned("2001:db8:1:2::77") == ban
    assert wide.banned("2001:db8:1:3::5") is None
    assert [e.ip for e in wide.ban_entries()] == ["2001:db8:1:2::"]  # PROTOCOL.md: a /64 ban
    assert [r.ip for r in wide.unban("2001:db8:1:2::77", "test")] == ["2001:db8:1:2::/64"]


def test_a_64_holding_a_never_ban_address_bans_only_the_address() -> None:
    clock = Clock()
    never = (ipaddress.ip_network("2001:db8:1:2::1/128"),)
    wd = dog(clock, ban_threshold=1, ipv6_prefix=64, never_ban=never)
    ban = wd.failed("2001:db8:1:2::5", "x")
    assert ban is not None and ban.ip == "2001:db8:1:2::5"
    assert wd.banned("2001:db8:1:2::1") is None


def test_admit_counts_streams_per_address() -> None:
    wd = dog(Clock(), max_streams_per_ip=2)
    assert wd.admit("192.0.2.1") is None
    assert wd.admit("192.0.2.1") is None
    assert wd.admit("192.0.2.1") == "over 2 streams per address"
    assert wd.admit("192.0.2.2") is None
    wd.release("192.0.2.1")
    assert wd.admit("192.0.2.1") is None
    for _ in range(2):
        wd.release("192.0.2.1")
    assert wd.streams_from("192.0.2.1") == 0


def test_statuses_count_as_failures() -> None:
    wd = dog(Clock(), ban_statuses=(401, 403))
    assert wd.observe("192.0.2.1", b"GET", b"/api/states?x=1", 401) is None
    assert wd.observe("192.0.2.1", b"GET", b"/api/", 403) is None
    assert wd.observe("192.0.2.1", b"GET", b"/api/", 404) is None
    assert wd.observe("192.0.2.1", b"GET", b"/api/", 200) is None
    assert wd.failures("192.0.2.1") == 2


def login_body(obj: object, gzip_it: bool = False) -> bytes:
    raw = json.dumps(obj).encode()
    return gzip.compress(raw) if gzip_it else raw


INVALID = {"type": "form", "flow_id": "f", "errors": {"base": "invalid_auth"}}
INVALID_CODE = {"type": "form", "flow_id": "f", "errors": {"base": "invalid_code"}}
FRESH_FORM = {"type": "form", "flow_id": "f", "errors": {}}
SUCCESS = {"type": "create_entry", "flow_id": "f", "result": "code"}


def answer(
    wd: Watchdog, body: bytes, *, target: bytes = b"/auth/login_flow/abc", **kw: Any
) -> None:
    peek = wd.observe("192.0.2.9", kw.get("method", b"POST"), target, 200, kw.get("headers", []))
    if peek is not None:
        for i in range(0, len(body), 5):  # any chunking
            peek.feed(body[i : i + 5])
        peek.finish()


def test_home_assistant_login_flow_failures_and_success() -> None:
    wd = dog(Clock(), ban_threshold=10)
    answer(wd, login_body(INVALID))
    answer(wd, login_body(INVALID_CODE))
    answer(wd, login_body(INVALID), target=b"/auth/login_flow/abc?x=1")
    assert wd.failures("192.0.2.9") == 3
    answer(wd, login_body(FRESH_FORM))  # a new form is not a failure
    answer(wd, login_body(INVALID), target=b"/auth/login_flow")  # creating a flow: no verdict
    answer(wd, login_body(INVALID), target=b"/auth/login_flow/abc/x")
    answer(wd, login_body(INVALID), method=b"GET")
    assert wd.failures("192.0.2.9") == 3
    gz = [(b"content-encoding", b"gzip")]
    answer(wd, login_body(INVALID, gzip_it=True), headers=gz)
    assert wd.failures("192.0.2.9") == 4
    answer(wd, login_body(INVALID), headers=[(b"content-encoding", b"br")])  # unreadable: skipped
    assert wd.failures("192.0.2.9") == 4
    answer(wd, login_body(SUCCESS))
    assert wd.failures("192.0.2.9") == 0


def test_login_flow_peek_is_bounded_and_generic_preset_ignores_it() -> None:
    wd = dog(Clock(), ban_threshold=10)
    big = {**INVALID, "padding": "x" * (PEEK_BYTES * 4)}
    answer(wd, login_body(big))  # cut at the peek size: no verdict, no unbounded buffer
    assert wd.failures("192.0.2.9") == 0
    peek = wd.observe("192.0.2.9", b"POST", b"/auth/login_flow/abc", 200)
    assert peek is not None
    peek.feed(b"x" * (PEEK_BYTES * 4))
    assert len(peek._buf) == PEEK_BYTES
    generic = dog(Clock(), preset="generic")
    assert generic.observe("192.0.2.9", b"POST", b"/auth/login_flow/abc", 200) is None


@pytest.mark.parametrize(
    ("body", "verdict"),
    [
        (b'{"type": "create_entry"}', True),
        (b'{"errors": {"base": "invalid_auth"}}', False),
        (b'{"errors": {"base": "unknown_error"}}', None),
        (b'{"errors": "invalid_auth"}', None),
        (b"[]", None),
        (b"not json", None),
        (b"", None),
    ],
)
def test_login_verdict(body: bytes, verdict: bool | None) -> None:
    assert login_verdict(body) is verdict


# --- time: bans expire on the trio clock ---------------------------------------------


async def test_bans_expire_on_time_and_listeners_hear_every_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    base = 1_700_000_000.0

    def clock() -> float:
        return base + trio.current_time()

    heard: list[tuple[tuple[BanEntry, ...], bool]] = []
    bans = BanList(clock=clock)
    bans.listeners.append(lambda entries, replace: heard.append((entries, replace)))
    wd = Watchdog(WatchdogSection(ban_threshold=1, ban_duration=30.0), bans, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(bans.run)
        wd.failed("192.0.2.1", "x")
        wd.ban("192.0.2.2", 90.0, "by hand")
        wd.ban("192.0.2.3", None, "forever")
        assert [r.ip for r in wd.ban_list()] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
        await trio.sleep(30.5)
        assert [r.ip for r in wd.ban_list()] == ["192.0.2.2", "192.0.2.3"]
        assert len(bans) == 2  # pruned, not only hidden
        await trio.sleep(60)
        assert [r.ip for r in wd.ban_list()] == ["192.0.2.3"]
        wd.unban("192.0.2.3", "test")
        assert wd.ban_list() == []
        nursery.cancel_scope.cancel()
    assert heard[:3] == [
        ((BanEntry("192.0.2.1", base + 30.0),), False),
        ((BanEntry("192.0.2.2", base + 90.0),), False),
        ((BanEntry("192.0.2.3", None),), False),
    ]
    assert heard[3:] == [((BanEntry("192.0.2.3", 0.0),), False)]  # expiries are not pushed


async def test_the_proxy_counts_failed_logins_from_upstream_answers() -> None:
    """The real demo app behind the real proxy: the login-flow peek and the per-request check."""
    clock = Clock()
    wd = dog(clock, ban_threshold=2)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_app, "127.0.0.1", 0)
        proxy = Proxy(UpstreamSection(url=f"http://127.0.0.1:{port}"), wd)

        async def exchange(*requests: tuple[str, str, bytes]) -> list[tuple[int, bytes]]:
            client, server = trio.testing.memory_stream_pair()
            answers: list[tuple[int, bytes]] = []
            async with trio.open_nursery() as inner:
                inner.start_soon(proxy.serve, server, "198.51.100.7", "home.test")
                conn = h11.Connection(h11.CLIENT)
                for method, target, body in requests:
                    headers = [("Host", "home.test"), ("Content-Length", str(len(body)))]
                    out = conn.send(h11.Request(method=method, target=target, headers=headers))
                    out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                    await client.send_all(out)
                    status, data = 0, b""
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(bytes(await client.receive_some(65536)))
                        elif isinstance(event, h11.Response):
                            status = event.status_code
                        elif isinstance(event, h11.Data):
                            data += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                    answers.append((status, data))
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        break
                    conn.start_next_cycle()
                await client.aclose()
            return answers

        wrong = json.dumps({"username": LOGIN_USER, "password": "nope"}).encode()
        right = json.dumps({"username": LOGIN_USER, "password": LOGIN_PASSWORD}).encode()
        step = "/auth/login_flow/abc"
        got = await exchange(("POST", step, wrong), ("POST", step, right))
        assert [s for s, _ in got] == [200, 200]
        assert json.loads(got[0][1])["errors"] == {"base": "invalid_auth"}
        assert wd.failures("198.51.100.7") == 0  # the good login reset it
        # Two failures on one keep-alive connection: the third request there is refused.
        got = await exchange(("POST", step, wrong), ("GET", "/status/401", b""), ("GET", "/", b""))
        assert [s for s, _ in got] == [200, 401, 403]
        assert wd.banned("198.51.100.7") is not None
        await proxy.aclose()
        nursery.cancel_scope.cancel()
