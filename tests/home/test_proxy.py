"""The reverse proxy driven with scripted byte streams: memory streams both sides.

The client is a raw h11 client (or raw bytes); the upstream is a scripted fake
whose connections are memory streams handed to `UpstreamPool(connect=...)`.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.lowlevel
import trio.testing

from tunneld.config import UpstreamSection, WatchdogSection
from tunneld.demoapp import serve_app
from tunneld.home.proxy.core import Proxy
from tunneld.home.proxy.http import response_headers, upstream_request_headers
from tunneld.home.proxy.http1 import Request, Response
from tunneld.home.proxy.upstream import UpstreamPool
from tunneld.home.watchdog.core import Watchdog
from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)
from tunneld.wire.events import ResetCode

HOST = "home.test"
CLIENT_IP = "198.51.100.7"
Handler = Callable[[trio.abc.Stream], Awaitable[None]]


# -- the scripted upstream ---------------------------------------------------------


class Upstream:
    """An h11 server on one memory stream, for handlers that speak HTTP."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(bytes(await self.stream.receive_some(65536)))

    async def request(self) -> tuple[h11.Request, bytes] | None:
        event = await self.next_event()
        if not isinstance(event, h11.Request):
            return None
        body = bytearray()
        while True:
            ev = await self.next_event()
            if isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return event, bytes(body)

    async def send(self, *events: Any) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def respond(
        self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        hs = [("content-length", str(len(body))), *headers]
        await self.send(h11.Response(status_code=status, headers=hs), h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    def next_cycle(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


def described(request: h11.Request, body: bytes) -> bytes:
    return json.dumps(
        {
            "method": request.method.decode(),
            "target": request.target.decode(),
            "headers": [[n.decode(), v.decode()] for n, v in request.headers.raw_items()],
            "body": len(body),
        }
    ).encode()


async def echo_app(stream: trio.abc.Stream) -> None:
    """Answers every request with a JSON description of what arrived."""
    up = Upstream(stream)
    try:
        while True:
            got = await up.request()
            if got is None:
                return
            await up.respond(200, described(*got), [("content-type", "application/json")])
            if not up.next_cycle():
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        pass


@dataclass
class Env:
    client: trio.abc.Stream
    proxy: Proxy
    connections: int = 0
    result: int | None = -1
    done: trio.Event = field(default_factory=trio.Event)
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    async def send(self, *events: Any) -> None:
        for event in events:
            data = self.h11.send(event)
            if data:
                await self.client.send_all(data)

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(bytes(await self.client.receive_some(65536)))

    async def response(self) -> tuple[Any, bytes]:
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(event)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return head, bytes(body)

    async def get(
        self, target: str = "/headers", headers: Iterable[tuple[str, str]] = (), method: str = "GET"
    ) -> tuple[Any, bytes]:
        hs = [("host", HOST), *headers]
        await self.send(h11.Request(method=method, target=target, headers=hs), h11.EndOfMessage())
        return await self.response()

    async def echoed(
        self, target: str = "/headers", headers: Iterable[tuple[str, str]] = ()
    ) -> Any:
        response, body = await self.get(target, headers)
        assert response.status_code == 200, body
        return json.loads(body)

    async def raw(self, data: bytes) -> bytes:
        """Send raw bytes, return everything until the proxy closes the connection."""
        await self.client.send_all(data)
        return await self.read_to_end()

    async def read_to_end(self, within: float = 30) -> bytes:
        out = bytearray()
        with trio.fail_after(within):
            while True:
                data = await self.client.receive_some(65536)
                if not data:
                    return bytes(out)
                out += data


@asynccontextmanager
async def running(
    handler: Handler = echo_app,
    *,
    client_ip: str = CLIENT_IP,
    trusted: tuple[str, ...] = (),
    refuse: bool = False,
    **upstream: Any,
) -> AsyncIterator[Env]:
    import ipaddress

    config = UpstreamSection(url="http://upstream.test:8123", **upstream)
    watchdog = Watchdog(
        WatchdogSection(trusted_proxies=tuple(ipaddress.ip_network(n) for n in trusted))
    )
    async with trio.open_nursery() as nursery:
        env: Env

        async def connect() -> trio.abc.Stream:
            if refuse:
                raise OSError(111, "Connection refused")
            env.connections += 1
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(handler, theirs)
            return ours

        proxy = Proxy(config, watchdog, UpstreamPool(config, connect=connect))
        client_end, server_end = trio.testing.memory_stream_pair()
        env = Env(client_end, proxy)

        async def serve() -> None:
            env.result = await proxy.serve(server_end, client_ip, HOST)
            await server_end.aclose()  # what streams.py does (a reset is an EOF here)
            env.done.set()

        nursery.start_soon(serve)
        yield env
        nursery.cancel_scope.cancel()


def headers_of(echo: Any) -> list[tuple[str, str]]:
    return [(n.lower(), v) for n, v in echo["headers"]]


def values(echo: Any, name: str) -> list[str]:
    return [v for n, v in headers_of(echo) if n == name]


# -- forwarded headers -------------------------------------------------------------


async def test_one_true_value_of_each_forwarded_header() -> None:
    async with running() as env:
        echo = await env.echoed()
    assert values(echo, "x-forwarded-for") == [CLIENT_IP]
    assert values(echo, "x-forwarded-proto") == ["https"]
    assert values(echo, "x-forwarded-host") == [HOST]
    assert values(echo, "forwarded") == [f"for={CLIENT_IP};proto=https;host={HOST}"]
    assert values(echo, "host") == [HOST]


async def test_spoofed_forwarding_headers_are_removed_in_every_spelling() -> None:
    spoofed = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("x-forwarded-for", "7.7.7.7, 8.8.8.8"),
        ("X_Forwarded_For", "9.9.9.9"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Forwarded-Port", "80"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("True-Client-IP", "6.6.6.6"),
        ("X-Keep", "yes"),
    ]
    async with running() as env:
        echo = await env.echoed(headers=spoofed)
    names = [n for n, _ in headers_of(echo)]
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"):
        assert names.count(name) == 1, name
    assert "x_forwarded_for" not in names
    assert "x-forwarded-port" not in names and "x-real-ip" not in names
    assert "true-client-ip" not in names
    assert values(echo, "x-forwarded-for") == [CLIENT_IP]
    assert values(echo, "x-forwarded-host") == [HOST]
    assert values(echo, "x-keep") == ["yes"]
    assert "6.6.6.6" not in json.dumps(echo)


async def test_ipv6_client_bare_in_xff_and_bracketed_in_forwarded() -> None:
    async with running(client_ip="2001:db8::7") as env:
        echo = await env.echoed()
    assert values(echo, "x-forwarded-for") == ["2001:db8::7"]
    assert values(echo, "forwarded") == [f'for="[2001:db8::7]";proto=https;host={HOST}']


async def test_ipv4_mapped_client_is_forwarded_as_ipv4() -> None:
    async with running(client_ip="::ffff:203.0.113.9") as env:
        echo = await env.echoed()
    assert values(echo, "x-forwarded-for") == ["203.0.113.9"]


async def test_trusted_proxy_chain_names_the_client_untrusted_is_ignored() -> None:
    chain = [("X-Forwarded-For", "203.0.113.9, 10.1.1.1")]
    async with running(client_ip="10.0.0.5", trusted=("10.0.0.0/8",)) as env:
        assert values(await env.echoed(headers=chain), "x-forwarded-for") == ["203.0.113.9"]
        # A request without a chain from the proxy: the proxy itself is the client.
        assert values(await env.echoed(), "x-forwarded-for") == ["10.0.0.5"]
    async with running(client_ip="192.0.2.5", trusted=("10.0.0.0/8",)) as env:
        assert values(await env.echoed(headers=chain), "x-forwarded-for") == ["192.0.2.5"]


async def test_hop_by_hop_headers_removed_both_ways() -> None:
    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        got = await up.request()
        assert got is not None
        extra = [
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("x-visible", "yes"),
        ]
        await up.respond(200, described(*got), extra)

    sent = [
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "hop"),
        ("Keep-Alive", "timeout=9"),
        ("TE", "trailers"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Authorization", "Bearer t"),
    ]
    async with running(app) as env:
        response, body = await env.get(headers=sent)
        names = {n.lower() for n, _ in response.headers}
        assert b"x-secret" not in names and b"keep-alive" not in names
        assert b"proxy-authenticate" not in names and b"connection" not in names
        assert (b"x-visible", b"yes") in list(response.headers)
        # The upstream closed its connection; the client's connection stays usable.
        assert (await env.echoed())["method"] == "GET"
        assert env.connections == 2
    echo = json.loads(body)
    names_up = [n for n, _ in headers_of(echo)]
    for hop in ("connection", "x-private", "keep-alive", "te", "proxy-authorization"):
        assert hop not in names_up, hop
    assert values(echo, "authorization") == ["Bearer t"]


async def test_http10_request_without_host_gets_the_sni() -> None:
    async with running() as env:
        raw = await env.raw(b"GET /headers HTTP/1.0\r\n\r\n")
    body = raw.partition(b"\r\n\r\n")[2]
    echo = json.loads(body)
    assert values(echo, "host") == [HOST]
    assert values(echo, "x-forwarded-host") == [HOST]


# -- keep-alive, pipelining, bodies ----------------------------------------------------


async def test_keep_alive_reuses_one_upstream_connection() -> None:
    async with running() as env:
        for i in range(5):
            assert (await env.echoed(f"/n/{i}"))["target"] == f"/n/{i}"
        assert env.connections == 1


def parse_responses(raw: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of responses (to GETs) into (status, body) pairs."""
    out = []
    while raw:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "h")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(raw)
        conn.receive_data(b"")
        response: Any = conn.next_event()
        body = b""
        while True:
            event: Any = conn.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            body += event.data
        out.append((response.status_code, body))
        raw = conn.trailing_data[0]
    return out


async def test_pipelined_requests_answered_in_order() -> None:
    requests = [f"GET /p/{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() for i in range(4)]
    requests[-1] = requests[-1].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    async with running() as env:
        raw = await env.raw(b"".join(requests))
        assert env.connections == 1
    responses = parse_responses(raw)
    assert [json.loads(body)["target"] for _, body in responses] == [f"/p/{i}" for i in range(4)]


async def test_chunked_and_length_uploads_stream_without_buffering_whole() -> None:
    first_arrived = trio.Event()
    seen: list[tuple[bool, int]] = []

    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        while True:
            event = await up.next_event()
            if not isinstance(event, h11.Request):
                return
            chunked = any(n == b"transfer-encoding" for n, _ in event.headers)
            size = 0
            while True:
                ev = await up.next_event()
                if isinstance(ev, h11.Data):
                    size += len(ev.data)
                    first_arrived.set()
                elif isinstance(ev, h11.EndOfMessage):
                    break
            seen.append((chunked, size))
            await up.respond(200, b"%d" % size)
            up.next_cycle()

    part = b"x" * 100_000
    async with running(app) as env:
        await env.send(
            h11.Request(
                method="POST",
                target="/upload",
                headers=[("host", HOST), ("transfer-encoding", "chunked")],
            ),
            h11.Data(data=part),
        )
        with trio.fail_after(5):
            await first_arrived.wait()  # the upstream has data before the client sent it all
        await env.send(h11.Data(data=part), h11.EndOfMessage())
        response, body = await env.response()
        assert (response.status_code, body) == (200, b"200000")
        first_arrived = trio.Event()
        await env.send(
            h11.Request(
                method="POST",
                target="/upload",
                headers=[("host", HOST), ("content-length", "200000")],
            ),
            h11.Data(data=part),
        )
        with trio.fail_after(5):
            await first_arrived.wait()
        await env.send(h11.Data(data=part), h11.EndOfMessage())
        response, body = await env.response()
        assert (response.status_code, body) == (200, b"200000")
    assert seen == [(True, 200000), (False, 200000)]


async def test_download_streams_chunk_by_chunk() -> None:
    gate = trio.Event()

    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        await up.request()
        await up.send(
            h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]),
            h11.Data(data=b"a" * 50_000),
        )
        await gate.wait()
        await up.send(h11.Data(data=b"b" * 50_000), h11.EndOfMessage())

    async with running(app) as env:
        await env.send(
            h11.Request(method="GET", target="/", headers=[("host", HOST)]), h11.EndOfMessage()
        )
        assert isinstance(await env.next_event(), h11.Response)
        got = bytearray()
        with trio.fail_after(5):
            while len(got) < 50_000:
                event = await env.next_event()
                got += event.data
        gate.set()
        while True:
            event = await env.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            got += event.data
    assert got == b"a" * 50_000 + b"b" * 50_000


async def test_expect_100_continue_is_relayed() -> None:
    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        event = await up.next_event()
        assert isinstance(event, h11.Request)
        await up.send(h11.InformationalResponse(status_code=100, headers=[]))
        size = 0
        while not isinstance(ev := await up.next_event(), h11.EndOfMessage):
            size += len(ev.data)
        await up.respond(201, b"%d" % size)

    async with running(app) as env:
        await env.send(
            h11.Request(
                method="PUT",
                target="/x",
                headers=[("host", HOST), ("content-length", "5"), ("expect", "100-continue")],
            )
        )
        with trio.fail_after(5):
            informational = await env.next_event()
        assert isinstance(informational, h11.InformationalResponse)
        assert informational.status_code == 100
        await env.send(h11.Data(data=b"12345"), h11.EndOfMessage())
        response, body = await env.response()
    assert (response.status_code, body) == (201, b"5")


async def test_head_204_304_have_no_body_and_keep_the_connection() -> None:
    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        while (got := await up.request()) is not None:
            request = got[0]
            if request.target == b"/none":
                await up.send(h11.Response(status_code=204, headers=[]), h11.EndOfMessage())
            elif request.target == b"/same":
                await up.send(h11.Response(status_code=304, headers=[]), h11.EndOfMessage())
            else:  # HEAD: h11 sends no body for it
                await up.send(
                    h11.Response(status_code=200, headers=[("content-length", "1234")]),
                    h11.EndOfMessage(),
                )
            up.next_cycle()

    async with running(app) as env:
        response, body = await env.get("/big", method="HEAD")
        assert response.status_code == 200 and body == b""
        assert (b"content-length", b"1234") in list(response.headers)
        for target, status in (("/none", 204), ("/same", 304)):
            response, body = await env.get(target)
            assert (response.status_code, body) == (status, b"")
        assert env.connections == 1


# -- upgrades --------------------------------------------------------------------------


async def test_upgrade_switches_to_a_splice_with_leftover_bytes_both_ways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        got = await up.request()
        assert got is not None
        request = got[0]
        assert (b"upgrade", b"websocket") in list(request.headers)
        assert (b"connection", b"upgrade") in list(request.headers)
        switch = up.conn.send(
            h11.InformationalResponse(
                status_code=101, headers=[("upgrade", "websocket"), ("connection", "upgrade")]
            )
        )
        await stream.send_all(switch + b"hello")  # bytes right behind the 101
        rest = up.conn.trailing_data[0]
        while True:
            data = rest or await stream.receive_some(65536)
            rest = b""
            if not data:
                await stream.send_eof()  # type: ignore[attr-defined]
                return
            await stream.send_all(data.upper())

    async with running(app, idle_timeout=5) as env:
        request = env.h11.send(
            h11.Request(
                method="GET",
                target="/ws",
                headers=[("host", HOST), ("upgrade", "websocket"), ("connection", "Upgrade")],
            )
        )
        await env.client.send_all(request + b"early")  # bytes right behind the request
        event = await env.next_event()
        assert isinstance(event, h11.InformationalResponse) and event.status_code == 101
        assert (b"upgrade", b"websocket") in list(event.headers)
        got = bytearray(env.h11.trailing_data[0])
        while len(got) < len(b"helloEARLY"):
            got += await env.client.receive_some(65536)
        assert got == b"helloEARLY"
        await trio.sleep(3600)  # far past every proxy timeout: a WebSocket may idle
        await env.client.send_all(b"still here")
        assert await env.client.receive_some(65536) == b"STILL HERE"
        await env.client.send_eof()  # type: ignore[attr-defined]
        assert await env.client.receive_some(65536) == b""
        await env.done.wait()
    assert env.result is None


# -- errors ------------------------------------------------------------------------------


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nHost: other\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /\x80 HTTP/1.1\r\nHost: h\r\n\r\n",  # a target byte outside ASCII
    ],
)
async def test_malformed_and_smuggling_requests_get_400_and_never_reach_upstream(
    head: bytes,
) -> None:
    async with running() as env:
        raw = await env.raw(head + b"abc")
        await env.done.wait()
        assert env.connections == 0
    assert status_of(raw) == 400
    assert b"<h1>400 Bad Request</h1>" in raw
    assert env.result is None  # answered, then closed cleanly


async def test_a_bad_request_after_a_good_one_still_gets_its_error_page() -> None:
    async with running() as env:
        raw = await env.raw(
            b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n"
        )
        await env.done.wait()
    first, _, rest = raw.partition(b"HTTP/1.1 400 ")
    assert status_of(first) == 200 and b'"target": "/one"' in first
    assert b"<h1>400 Bad Request</h1>" in rest
    assert env.result is None  # answered, then closed cleanly: never a reset


def raw_app(response: bytes) -> Handler:
    """An upstream that answers every request with `response`, as bytes."""

    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        while await up.request() is not None:
            await stream.send_all(response)

    return app


async def test_repeated_upstream_content_length_reaches_the_client_once() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok"
    async with running(raw_app(answer)) as env:
        await env.client.send_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        with trio.fail_after(10):
            raw = b""
            while not raw.endswith(b"ok"):
                raw += await env.client.receive_some(65536)
    assert raw.lower().count(b"content-length") == 1
    assert b"Content-Length: 2\r\n" in raw


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked"])
async def test_upstream_transfer_coding_other_than_chunked_gets_502(coding: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n2\r\nzz\r\n0\r\n\r\n"
    async with running(raw_app(answer)) as env:
        response, body = await env.get("/")
    assert response.status_code == 502  # never a 200 with a body still encoded


async def test_headers_too_large_get_431() -> None:
    async with running(max_header_size=2048) as env:
        raw = await env.raw(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        assert env.connections == 0
    assert status_of(raw) == 431


async def test_upstream_unreachable_gets_502_page(caplog: pytest.LogCaptureFixture) -> None:
    async with running(refuse=True) as env:
        response, body = await env.get()
        await env.done.wait()
    assert response.status_code == 502
    assert b"<h1>502 Bad Gateway</h1>" in body
    assert (b"connection", b"close") in list(response.headers)
    assert any(CLIENT_IP in r.getMessage() and "502" in r.getMessage() for r in caplog.records)
    assert "Traceback" not in caplog.text


async def test_slow_upstream_gets_504(autojump_clock: trio.testing.MockClock) -> None:
    async def app(stream: trio.abc.Stream) -> None:
        await Upstream(stream).request()
        await trio.sleep_forever()

    async with running(app, response_timeout=30) as env:
        start = trio.current_time()
        response, body = await env.get("/slow")
        elapsed = trio.current_time() - start
    assert response.status_code == 504
    assert 30 <= elapsed < 31


async def test_slowloris_head_gets_408_and_idle_connection_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(header_timeout=10, idle_timeout=100) as env:
        await env.client.send_all(b"GET / HTTP/1.1\r\nHost: h\r\n")
        raw = await env.read_to_end()
    assert status_of(raw) == 408
    async with running(header_timeout=10, idle_timeout=100) as env:
        await env.echoed()
        start = trio.current_time()
        assert await env.read_to_end(200) == b""  # idle keep-alive: closed without a word
        assert 100 <= trio.current_time() - start < 101
        assert env.result is None


async def test_upstream_dying_mid_body_never_looks_complete() -> None:
    for framing in ([("content-length", "100000")], [("transfer-encoding", "chunked")]):

        async def app(stream: trio.abc.Stream, framing: Any = framing) -> None:
            up = Upstream(stream)
            await up.request()
            await up.send(h11.Response(status_code=200, headers=framing), h11.Data(data=b"x" * 10))
            await stream.aclose()

        async with running(app) as env:
            await env.send(
                h11.Request(method="GET", target="/", headers=[("host", HOST)]),
                h11.EndOfMessage(),
            )
            assert isinstance(await env.next_event(), h11.Response)
            with pytest.raises(h11.RemoteProtocolError):
                while not isinstance(await env.next_event(), h11.EndOfMessage):
                    pass
            await env.done.wait()
        assert env.result == ResetCode.UPSTREAM_FAILED
        assert env.proxy.upstream_failed == 1


async def test_upstream_closing_before_answering_gets_502() -> None:
    async def app(stream: trio.abc.Stream) -> None:
        await Upstream(stream).request()
        await stream.aclose()

    async with running(app) as env:
        response, _ = await env.get()
    assert response.status_code == 502


async def test_dead_pooled_connection_is_retried_on_a_new_one() -> None:
    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        got = await up.request()
        assert got is not None
        await up.respond(200, described(*got))
        await stream.aclose()  # closes its idle keep-alive connection, as servers do

    async with running(app) as env:
        await env.echoed("/one")
        await trio.sleep(0.01)
        assert (await env.echoed("/two"))["target"] == "/two"
        assert env.connections == 2


async def test_client_leaving_mid_response_closes_the_upstream() -> None:
    upstream_saw_close = trio.Event()

    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        await up.request()
        await up.send(h11.Response(status_code=200, headers=[("content-length", "10000000")]))
        try:
            with trio.fail_after(10):
                while True:
                    await up.send(h11.Data(data=b"x" * 65536))
                    await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            upstream_saw_close.set()

    async with running(app) as env:
        await env.send(
            h11.Request(method="GET", target="/", headers=[("host", HOST)]), h11.EndOfMessage()
        )
        await env.client.receive_some(65536)
        await env.client.aclose()
        with trio.fail_after(5):
            await upstream_saw_close.wait()
            await env.done.wait()
    assert env.result == ResetCode.CANCEL


async def test_bytes_past_a_response_never_answer_the_next_request() -> None:
    """An upstream that sends more than its Content-Length (or a body to HEAD): the
    stray bytes must not become the answer to the next request on that connection."""

    tainted = 0

    async def app(stream: trio.abc.Stream) -> None:
        nonlocal tainted
        if tainted:
            await echo_app(stream)  # later connections answer honestly
            return
        tainted += 1
        up = Upstream(stream)
        got = await up.request()
        assert got is not None
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"
            b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON"
        )
        await echo_app(stream)

    async with running(app) as env:
        response, body = await env.get("/one")
        assert (response.status_code, body) == (200, b"first")
        echo = await env.echoed("/two")
        assert echo["target"] == "/two"
        assert env.connections == 2  # the tainted connection was dropped, not reused


class _ResetOnEof(trio.abc.Stream):
    """The proxy's view of a client that vanished: TLS sees a cut, not a close_notify."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if not data:
            raise trio.BrokenResourceError("client connection reset")
        return bytes(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_slow_answer_to_a_get_arrives_and_a_vanished_client_is_noticed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Answers past the quick path (a long poll) still arrive; a client that vanishes
    while the upstream is silent frees the upstream connection at once."""
    released = trio.Event()

    async def app(stream: trio.abc.Stream) -> None:
        up = Upstream(stream)
        got = await up.request()
        assert got is not None
        if got[0].target == b"/slow":
            await trio.sleep(20)
            await up.respond(200, b"late")
            up.next_cycle()
            got = await up.request()
        try:
            await stream.receive_some(10)  # the long poll: silent until the client leaves
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        released.set()

    async with running(app, response_timeout=60) as env:
        response, body = await env.get("/slow")
        assert (response.status_code, body) == (200, b"late")
    config = UpstreamSection(url="http://upstream.test:8123", response_timeout=600)
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(app, theirs)
            return ours

        proxy = Proxy(config, Watchdog(WatchdogSection()), UpstreamPool(config, connect=connect))
        client, server = trio.testing.memory_stream_pair()
        results: list[int | None] = []
        served = trio.Event()

        async def serve() -> None:
            results.append(await proxy.serve(_ResetOnEof(server), CLIENT_IP, HOST))
            served.set()

        nursery.start_soon(serve)
        await client.send_all(b"GET /poll HTTP/1.1\r\nHost: home.test\r\n\r\n")
        await trio.sleep(30)  # long past the quick path: the watcher is on duty
        start = trio.current_time()
        await client.aclose()
        with trio.fail_after(5):
            await released.wait()
        assert trio.current_time() - start < 1
        with trio.fail_after(5):
            await served.wait()
        assert results == [ResetCode.CANCEL]
        nursery.cancel_scope.cancel()


# -- the sans-IO helpers ----------------------------------------------------------------


def test_connection_cannot_strip_the_framing_headers() -> None:
    request = Request(
        b"POST",
        b"/",
        ((b"Host", b"h"), (b"Content-Length", b"3"), (b"Connection", b"content-length, host")),
    )
    out = dict(upstream_request_headers(request, "192.0.2.1", b"h", chunked=False, upgrade=False))
    assert out[b"Content-Length"] == b"3" and out[b"Host"] == b"h"


def test_content_length_dropped_when_upstream_used_chunked() -> None:
    response = Response(200, ((b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")))
    assert response_headers(response) == []


# -- an https:// upstream (the real demo app over loopback TLS) ------------------------


@pytest.fixture
def tls_app_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca_key, ca_pem = make_ca("upstream test CA")
    key = generate_private_key()
    write_certificate(ca_pem, tmp_path / "ca.pem")
    write_certificate(issue_certificate(ca_key, ca_pem, key, ["localhost"]), tmp_path / "app.pem")
    write_private_key(key, tmp_path / "app.key")
    return tmp_path / "ca.pem", tmp_path / "app.pem", tmp_path / "app.key"


@pytest.mark.parametrize(
    ("settings", "status"),
    [
        ({"ca_file": "ca"}, 200),  # self-signed upstream, its CA configured
        ({"verify": False}, 200),  # self-signed upstream, not verified
        ({}, 502),  # system CAs do not know it: refused, answered 502
    ],
)
async def test_https_upstream(
    tls_app_files: tuple[Path, Path, Path], settings: dict[str, Any], status: int
) -> None:
    ca, cert, key = tls_app_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    if settings.get("ca_file"):
        settings = {**settings, "ca_file": ca}
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(functools.partial(serve_app, "127.0.0.1", 0, ssl_context=ctx))
        config = UpstreamSection(url=f"https://localhost:{port}", connect_timeout=5, **settings)
        proxy = Proxy(config, Watchdog(WatchdogSection()))
        client, server = trio.testing.memory_stream_pair()
        env = Env(client, proxy)
        nursery.start_soon(proxy.serve, server, CLIENT_IP, HOST)
        with trio.fail_after(10):
            for _ in range(2 if status == 200 else 1):
                response, body = await env.get()
                assert response.status_code == status, body
        if status == 200:
            assert values(json.loads(body), "x-forwarded-for") == [CLIENT_IP]
            assert proxy.pool.opened == 1  # the TLS connection was reused
        await proxy.aclose()
        nursery.cancel_scope.cancel()
