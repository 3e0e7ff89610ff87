"""Hostile HTTP end to end: smuggling, CR/LF injection, oversized heads, slowloris.

Real relay + daemon, and a recording upstream (tests/badupstream.py) that proves
what reached it. tests/home/test_proxy.py and test_proxy.py already cover CL+TE,
a repeated equal Content-Length, obs-fold in a plain header, garbage, a second
Host and one big header; this adds the other smuggling spellings, injection, more
431 shapes and slowloris with real timers. Each attack is refused (a 4xx/501
page or a closed connection) within the configured timeouts, never reaches the
upstream as a request, and a monitor client keeps getting its own answers meanwhile.
"""

from __future__ import annotations

import itertools
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

from tests import badupstream
from tests.badupstream import answered_ok
from tests.integration.harness import HOME_HOST, World, client_hello
from tests.loadclient import BROKEN, HttpClient, Reply, client_context, open_tls, raw_exchange

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 2.0
CLIENT_HELLO_TIMEOUT = 3.0  # FAST_RELAY in the harness
HANDSHAKE_TIMEOUT = 3.0  # [tls] handshake_timeout in the harness
MAX_HEADER_SIZE = 8192
PROMPT = 5.0  # slack over a configured timeout; generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = badupstream.start_world(
        tmp_path_factory.mktemp("hostile") / "w",
        header_timeout=f"{HEADER_TIMEOUT:g}s",
        max_header_size=MAX_HEADER_SIZE,
    )
    try:
        yield w
    finally:
        w.stop_all()


def context(world: World) -> ssl.SSLContext:
    return client_context(str(world.home_cert()))


_bystanders = itertools.count()


async def normal_get(world: World, target: str) -> None:
    """A client minding its own business: served promptly, its own answer.

    Each from its own address, so the relay's per-address connection rate (20/s)
    never refuses a bystander however fast the cases run."""
    start = time.monotonic()
    address = f"127.0.9.{next(_bystanders) % 250 + 1}"
    with trio.fail_after(30):
        stream = await open_tls(world.relay_port, context(world), address)
        try:
            reply = await HttpClient(stream).request(target)
        finally:
            await trio.aclose_forcefully(stream)
    assert answered_ok(reply, target), reply
    assert time.monotonic() - start < PROMPT


@asynccontextmanager
async def monitor(world: World) -> AsyncIterator[list[float]]:
    """Keep-alive GETs on one connection during the block; yields their latencies.

    Every answer must be the answer to that request: a smuggled request or a
    desynchronized upstream connection would show up here as someone else's.
    """
    latencies: list[float] = []
    client = HttpClient(await open_tls(world.relay_port, context(world), "127.0.0.8"))

    async def run() -> None:
        for n in range(100_000):
            target = f"/ok?monitor={n}"
            reply = await client.request(target)
            assert answered_ok(reply, target), reply
            latencies.append(reply.seconds)
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield latencies
        nursery.cancel_scope.cancel()
    await trio.aclose_forcefully(client.stream)
    assert latencies and max(latencies) < PROMPT


def upstream_targets(world: World) -> list[bytes]:
    return [r.target for r in badupstream.requests_received(world)]


def upstream_raw(world: World) -> bytes:
    return b"".join(badupstream.received(world).values())


def recording(world: World, markers: list[str]) -> tuple[bytes, list[bytes]]:
    """What the upstream received (raw, complete request targets), checked first to hold
    every marker GET sent after an attack: the positive control without which "not in
    the recording" would not mean "never reached the upstream"."""
    raw, targets = upstream_raw(world), upstream_targets(world)
    missing = [m for m in markers if f"GET {m} HTTP/1.1\r\n".encode() not in raw]
    missing += [m for m in markers if m.encode() not in targets]
    assert not missing, f"marker requests missing from the upstream recording: {missing}"
    return raw, targets


# -- request smuggling and CR/LF injection -----------------------------------------------


def smuggled(name: str) -> bytes:
    return f"GET /smuggled/{name} HTTP/1.1\r\nHost: {HOME_HOST}\r\n\r\n".encode()


def head(name: str, *lines: str, method: str = "POST", sep: str = "\r\n") -> bytes:
    start = f"{method} /attack/{name} HTTP/1.1"
    return sep.join([start, f"Host: {HOME_HOST}", *lines, "", ""]).encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _cases() -> list[tuple[str, bytes]]:
    """(name, raw request): each one a way for two parsers to disagree on framing."""
    s = smuggled("x")
    n = len(s)
    cases = {
        # TE.CL: a parser using Content-Length stops after "5c\r\n"; the rest is a request.
        "te-then-cl": head("te-then-cl", "Transfer-Encoding: chunked", "Content-Length: 4")
        + chunk(s)
        + b"0\r\n\r\n",
        "cl-differ": head("cl-differ", "Content-Length: 0", f"Content-Length: {n}") + s,
        "cl-list": head("cl-list", f"Content-Length: 0, {n}") + s,
        "te-folded": head("te-folded", f"Content-Length: {n}", "Transfer-Encoding:", " chunked")
        + s,
        "fold-hides-te": head(
            "fold-hides-te", f"Content-Length: {n}", "X-A: a", "\tTransfer-Encoding: chunked"
        )
        + b"0\r\n\r\n"
        + s,
        "xchunked": head("xchunked", "Transfer-Encoding: xchunked") + chunk(s) + b"0\r\n\r\n",
        "xchunked-cl": head("xchunked-cl", "Transfer-Encoding: xchunked", f"Content-Length: {n}")
        + s,
        "chunked-identity": head("chunked-identity", "Transfer-Encoding: chunked, identity") + s,
        "identity-chunked": head("identity-chunked", "Transfer-Encoding: identity, chunked")
        + chunk(s)
        + b"0\r\n\r\n",
        "te-twice": head("te-twice", "Transfer-Encoding: chunked", "Transfer-Encoding: identity")
        + b"0\r\n\r\n"
        + s,
        "te-space-colon": head(
            "te-space-colon", "Transfer-Encoding : chunked", f"Content-Length: {n}"
        )
        + b"0\r\n\r\n"
        + s,
        "cl-space-colon": head("cl-space-colon", f"Content-Length : {n}") + s,
        "cl-plus": head("cl-plus", f"Content-Length: +{n}") + s,
        "cl-hex": head("cl-hex", f"Content-Length: 0x{n:x}") + s,
        # A bare LF inside a header line: one parser sees two headers, another one.
        "lf-splits-te": head(
            "lf-splits-te", "X-A: a\nTransfer-Encoding: chunked", f"Content-Length: {n}"
        )
        + b"0\r\n\r\n"
        + s,
        "cr-in-value": head(
            "cr-in-value", "X-A: a\rTransfer-Encoding: chunked", f"Content-Length: {n}"
        )
        + b"0\r\n\r\n"
        + s,
        "nul-in-value": head("nul-in-value", "X-A: a\x00b", "Content-Length: 0"),
        # CR/LF in the request target: a second header line, or a second request line.
        "cr-in-target": head("cr-in-target\rX-Injected: 1", method="GET"),
        "lf-in-target": head("lf-in-target\nX-Injected: 1", method="GET"),
        "crlf-in-target": head("crlf-in-target\r\nX-Injected: 1", method="GET"),
        "space-in-target": head("space-in-target /x", method="GET"),
        # Where aiohttp (Home Assistant) frames otherwise (docs/http-differential.md):
        # no body on a HEAD or an upgrade request there, so the body would be a request.
        "head-body": head("head-body", f"Content-Length: {n}", method="HEAD") + s,
        "head-lower-body": head("head-lower-body", f"Content-Length: {n}", method="head") + s,
        "upgrade-body": head(
            "upgrade-body", "Connection: Upgrade", "Upgrade: websocket", f"Content-Length: {n}"
        )
        + s,
        "upgrade-chunked": head(
            "upgrade-chunked",
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Transfer-Encoding: chunked",
        )
        + chunk(s)
        + b"0\r\n\r\n",
        "user-agent-twice": head(
            "user-agent-twice", "User-Agent: a", "User-Agent: b", method="GET"
        ),
    }
    return list(cases.items())


# Refused while reading the body: the head already went upstream, then the upstream
# connection was reset, so the upstream never has a complete request.
BODY_CASES = {
    "bad-chunk-size": head("bad-chunk-size", "Transfer-Encoding: chunked")
    + b"0x5c\r\n"
    + smuggled("x"),
    "chunk-size-overflow": head("chunk-size-overflow", "Transfer-Encoding: chunked")
    + b"fffffffffffffffffffffffff0\r\n"
    + smuggled("x"),
    "chunk-ext-bare-lf": head("chunk-ext-bare-lf", "Transfer-Encoding: chunked")
    + b"5c;\n"
    + smuggled("x"),
}


def refused(reply: Reply) -> bool:
    """A 4xx (or 501: a transfer coding we do not do) page, or a closed connection."""
    if reply.status == 0:
        return bool(reply.error)
    return (400 <= reply.status < 500 or reply.status == 501) and b"<h1>" in reply.body


async def test_smuggling_and_injection_refused_and_never_reach_the_upstream(world: World) -> None:
    results: dict[str, int] = {}
    async with monitor(world) as latencies:
        for i, (name, data) in enumerate([*_cases(), *BODY_CASES.items()]):
            start = time.monotonic()
            with trio.fail_after(HEADER_TIMEOUT + PROMPT):
                reply, rest = await raw_exchange(
                    world.relay_port, context(world), data, f"127.0.5.{i + 1}", b"POST"
                )
            results[name] = reply.status
            assert refused(reply), (name, reply)
            # Answered and closed: nothing after the page, the smuggled request unanswered.
            assert rest == b"", (name, rest[:200])
            assert time.monotonic() - start < PROMPT, name
            await normal_get(world, f"/ok?after={name}")
    print(f"\nsmuggling/injection: {len(results)} refused: {results}; monitor {len(latencies)} ok")
    await trio.sleep(0.5)  # the recording is written as bytes arrive
    raw, targets = recording(world, [f"/ok?after={name}" for name in results])
    assert b"/smuggled/x" not in raw
    assert b"X-Injected" not in raw
    for name, _ in _cases():
        assert f"/attack/{name.split()[0]}".encode() not in raw, name
    for name in BODY_CASES:
        assert f"/attack/{name}".encode() not in targets, name  # never a complete request


async def test_bare_lf_heads_are_reframed_so_nothing_is_smuggled(world: World) -> None:
    """h11 reads a bare LF as a line end (RFC 9112 2.2 allows it). What matters is that
    the upstream gets one request, re-framed with CRLF, the body as a body, and only
    the daemon's own X-Forwarded-For."""
    s = smuggled("bare-lf")
    cases = {
        "bare-lf": head("bare-lf", f"Content-Length: {len(s)}", "Connection: close", sep="\n") + s,
        "lf-xff": head(
            "lf-xff",
            "X-A: a\nX-Forwarded-For: 6.6.6.6",
            f"Content-Length: {len(s)}",
            "Connection: close",
        )
        + s,
    }
    async with monitor(world):
        for name, data in cases.items():
            with trio.fail_after(PROMPT):
                reply, rest = await raw_exchange(
                    world.relay_port, context(world), data, "127.0.6.1", b"POST"
                )
            assert reply.status in (200, 400), (name, reply)
            assert rest == b""
            await normal_get(world, f"/ok?after={name}")
    await trio.sleep(0.5)
    raw, targets = recording(world, [f"/ok?after={name}" for name in cases])
    got = [r for r in badupstream.requests_received(world) if r.target.startswith(b"/attack/")]
    got = [r for r in got if r.target in (b"/attack/bare-lf", b"/attack/lf-xff")]
    for request in got:
        assert request.body == s
        xff = [v for n, v in request.headers if n.lower() == b"x-forwarded-for"]
        assert xff == [b"127.0.6.1"]
    assert len(got) == 2
    # The smuggled bytes arrived as a body, never as a request of their own.
    assert not [t for t in targets if t.startswith(b"/smuggled/")]
    assert b"6.6.6.6" not in raw
    assert b"/attack/bare-lf HTTP/1.1\n" not in raw  # re-framed, not passed through
    print(f"\nbare LF: {sorted(r.target.decode() for r in got)} forwarded re-framed")


# -- oversized heads -----------------------------------------------------------------------


async def test_oversized_heads_get_431_without_waiting_for_their_end(world: World) -> None:
    many = head("many-headers", *[f"X-H{i}: v" for i in range(2000)], method="GET")
    long_target = head("long-target" + "a" * (2 * MAX_HEADER_SIZE), method="GET")
    async with monitor(world):
        for name, data in (("many-headers", many), ("long-target", long_target)):
            reply, _ = await raw_exchange(world.relay_port, context(world), data, "127.0.7.1")
            assert reply.status == 431, (name, reply)
            await normal_get(world, f"/ok?after={name}")
        # A head that keeps growing and never ends: refused once it passes the limit,
        # long before any end (the daemon buffers at most the limit).
        stream = await open_tls(world.relay_port, context(world), "127.0.7.2")
        client = HttpClient(stream)
        await client.send_raw(b"GET /attack/endless-head HTTP/1.1\r\nHost: home.test\r\n")
        sent = 0
        replies: list[Reply] = []
        with trio.fail_after(PROMPT):
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    replies.append(await client.reply())
                    nursery.cancel_scope.cancel()

                nursery.start_soon(read)
                try:
                    while sent < 64 * MAX_HEADER_SIZE:
                        await stream.send_all(b"X-Pad: " + b"a" * 1000 + b"\r\n")
                        sent += 1009
                        await trio.sleep(0.01)
                except BROKEN:
                    pass
                await trio.sleep_forever()
        await trio.aclose_forcefully(stream)
        assert replies[0].status == 431, replies[0]
        assert sent < 16 * MAX_HEADER_SIZE
        await normal_get(world, "/ok?after=endless-head")
    await trio.sleep(0.5)  # the recording is written as bytes arrive
    names = ["many-headers", "long-target", "endless-head"]
    raw, _ = recording(world, [f"/ok?after={name}" for name in names])
    for name in names:
        assert f"/attack/{name}".encode() not in raw


# -- slowloris -----------------------------------------------------------------------------


async def _wait_cut(stream: trio.abc.Stream, data: bytes, interval: float) -> float:
    """Trickle `data` a byte per `interval`, reading meanwhile; seconds until the peer
    ended the connection (EOF or reset). Whatever it sends back is read and dropped."""
    start = time.monotonic()
    pending = iter(data)
    try:
        while True:
            with trio.move_on_after(interval):
                if not await stream.receive_some(65536):
                    break
                continue
            byte = next(pending, None)
            if byte is not None:
                await stream.send_all(bytes([byte]))
    except BROKEN:
        pass
    return time.monotonic() - start


async def test_slowloris_at_the_relay_trickled_client_hello_is_cut_on_time(
    world: World,
) -> None:
    hello = client_hello(HOME_HOST)[:-1]  # never complete, even at the end
    before = (await trio.to_thread.run_sync(world.home_status))["streams"]["total"]
    cut: list[float] = []

    async def loris(i: int) -> None:
        source = f"127.0.8.{i % 3 + 1}"
        tcp = await trio.open_tcp_stream("127.0.0.1", world.relay_port, local_address=source)
        with trio.fail_after(CLIENT_HELLO_TIMEOUT + 2 * PROMPT):
            cut.append(await _wait_cut(tcp, hello, 0.1))
        await trio.aclose_forcefully(tcp)

    gets = 0
    async with monitor(world), trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(loris, i)
        while len(cut) < 30:  # others keep connecting and being served meanwhile
            await normal_get(world, f"/ok?during-relay-loris={gets}")
            gets += 1
            await trio.sleep(0.3)
    print(f"\nrelay slowloris: 30 cut after {min(cut):.1f}-{max(cut):.1f}s; {gets} GETs served")
    assert len(cut) == 30
    assert CLIENT_HELLO_TIMEOUT - 0.5 < min(cut) and max(cut) < CLIENT_HELLO_TIMEOUT + PROMPT
    # None of them ever became a stream at home: only the GETs (and the monitor) did.
    after = (await trio.to_thread.run_sync(world.home_status))["streams"]["total"]
    assert after - before == gets + 1


async def test_slowloris_at_home_trickled_head_gets_408_on_time(world: World) -> None:
    data = b"GET /attack/loris HTTP/1.1\r\nHost: home.test\r\nX-Pad: " + b"a" * 1000
    replies: list[tuple[Reply, float]] = []

    async def loris(i: int) -> None:
        stream = await open_tls(world.relay_port, context(world), f"127.0.9.{i % 4 + 1}")
        client = HttpClient(stream)
        await client.send_raw(b"")
        start = time.monotonic()
        with trio.fail_after(HEADER_TIMEOUT + 2 * PROMPT):
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    try:
                        for byte in data:
                            await stream.send_all(bytes([byte]))
                            await trio.sleep(0.1)
                    except BROKEN:
                        pass
                    await trio.sleep_forever()

                nursery.start_soon(trickle)
                reply = await client.reply()
                replies.append((reply, time.monotonic() - start))
                nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(stream)

    gets = 0
    async with monitor(world), trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(loris, i)
        while len(replies) < 20:
            await normal_get(world, f"/ok?during-home-loris={gets}")
            gets += 1
            await trio.sleep(0.3)
        await normal_get(world, "/ok?after=home-loris")
    times = [t for _, t in replies]
    print(
        f"\nhome slowloris: 20 answered 408 after {min(times):.1f}-{max(times):.1f}s; {gets} GETs"
    )
    for reply, _ in replies:
        assert reply.status == 408 and reply.complete, reply
    assert HEADER_TIMEOUT - 0.5 < min(times) and max(times) < HEADER_TIMEOUT + PROMPT
    await trio.sleep(0.5)  # the recording is written as bytes arrive
    markers = [f"/ok?during-home-loris={i}" for i in range(gets)] + ["/ok?after=home-loris"]
    raw, _ = recording(world, markers)
    assert b"/attack/loris" not in raw


async def test_stalled_tls_handshake_at_home_is_cut_on_time(world: World) -> None:
    """A complete ClientHello (so the relay routes it home), then silence."""
    hello = client_hello(HOME_HOST)
    cut: list[float] = []

    async def stall(i: int) -> None:
        source = f"127.0.10.{i % 2 + 1}"
        tcp = await trio.open_tcp_stream("127.0.0.1", world.relay_port, local_address=source)
        await tcp.send_all(hello)
        with trio.fail_after(HANDSHAKE_TIMEOUT + 2 * PROMPT):
            cut.append(await _wait_cut(tcp, b"", 0.1))
        await trio.aclose_forcefully(tcp)

    async with monitor(world), trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(stall, i)
        gets = 0
        while len(cut) < 10:
            await normal_get(world, f"/ok?during-handshake-stall={gets}")
            gets += 1
            await trio.sleep(0.3)
    print(f"\nstalled handshakes: 10 cut after {min(cut):.1f}-{max(cut):.1f}s; {gets} GETs")
    assert HANDSHAKE_TIMEOUT - 0.5 < min(cut) and max(cut) < HANDSHAKE_TIMEOUT + PROMPT
