"""TLSStream against trio's own SSLStream: as the daemon's server side for client
streams, and as the client side of its session to the relay.

No sockets: `memory_stream_pair` buffers without limit, `lockstep_stream_pair` makes
every send_all wait for the peer's receive_some (which is what exposes ordering
deadlocks). The server context is the daemon's own (`tunneld.home.certs.store.server_context`).
"""

from __future__ import annotations

import gc
import hashlib
import os
import ssl
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from tunneld.home.certs.store import server_context
from tunneld.pki import (
    generate_private_key,
    issue_certificate,
    make_ca,
    write_certificate,
    write_private_key,
)
from tunneld.transport.tls import TLSStream
from tunneld.wire.clienthello import ClientHello, parse_client_hello

HOST = "localhost"
TIMEOUT = 10
MiB = 1 << 20
VERSIONS = pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"]
)
VERSION_NAMES = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}

Client = trio.SSLStream[trio.abc.Stream]
MemoryStream = trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]


@dataclass(frozen=True)
class Certs:
    ca_pem: bytes
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    tmp = tmp_path_factory.mktemp("tls")
    ca_key, ca_pem = make_ca("tls test CA")
    key = generate_private_key()
    write_certificate(issue_certificate(ca_key, ca_pem, key, [HOST]), tmp / "cert.pem")
    write_private_key(key, tmp / "key.pem")
    return Certs(ca_pem, tmp / "cert.pem", tmp / "key.pem")


@pytest.fixture
def server_ctx(certs: Certs) -> ssl.SSLContext:
    return server_context(certs.cert, certs.key)


def client_context(ca_pem: bytes, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def memory_pair(
    certs: Certs, server_ctx: ssl.SSLContext, version: ssl.TLSVersion | None = None
) -> tuple[Client, TLSStream, MemoryStream, MemoryStream]:
    """(client, server, client transport, server transport) over unbounded memory streams."""
    client_t, server_t = trio.testing.memory_stream_pair()
    client = trio.SSLStream[trio.abc.Stream](
        client_t, client_context(certs.ca_pem, version), server_hostname=HOST
    )
    server = TLSStream(server_t, server_ctx, server_side=True)
    return client, server, client_t, server_t


async def handshake(client: Client, server: TLSStream) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = await stream.receive_some()
        assert data, f"EOF after {len(buf)} of {size} bytes"
        buf += data
    assert len(buf) == size
    return bytes(buf)


async def expect_broken(call: Callable[[], Awaitable[object]]) -> trio.BrokenResourceError:
    with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError) as info:
        await call()
    return info.value


def client_hello() -> bytes:
    """A real ClientHello, as a TLS client's first flight."""
    obj = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=HOST
    )
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- data ------------------------------------------------------------------------------------


@VERSIONS
@pytest.mark.parametrize("pair", ["memory", "lockstep"])
async def test_bulk_both_ways_concurrently(
    certs: Certs, server_ctx: ssl.SSLContext, version: ssl.TLSVersion, pair: str
) -> None:
    make = (
        trio.testing.memory_stream_pair if pair == "memory" else trio.testing.lockstep_stream_pair
    )
    client_t, server_t = make()
    client = trio.SSLStream[trio.abc.Stream](
        client_t, client_context(certs.ca_pem, version), server_hostname=HOST
    )
    server = TLSStream(server_t, server_ctx, server_side=True)
    up, down = os.urandom(4 * MiB), os.urandom(4 * MiB)
    got: dict[str, bytes] = {}

    async def send(stream: trio.abc.SendStream, data: bytes) -> None:
        for i in range(0, len(data), 100_000):  # not a multiple of the record size
            await stream.send_all(data[i : i + 100_000])

    async def receive(stream: trio.abc.ReceiveStream, name: str, size: int) -> None:
        digest, n = hashlib.sha256(), 0
        while n < size:
            data = await stream.receive_some()
            assert data, f"{name}: EOF after {n} bytes"
            digest.update(data)
            n += len(data)
        assert n == size
        got[name] = digest.digest()

    async def serve() -> None:
        await server.do_handshake()
        assert server.selected_alpn_protocol() == "http/1.1"
        assert server.version() == VERSION_NAMES[version]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, server, down)
            nursery.start_soon(receive, server, "server", len(up))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            # The client handshakes implicitly, in whichever of its tasks comes first.
            nursery.start_soon(send, client, up)
            nursery.start_soon(receive, client, "client", len(down))
    assert got == {"server": hashlib.sha256(up).digest(), "client": hashlib.sha256(down).digest()}
    assert client.selected_alpn_protocol() == "http/1.1"


async def test_many_small_writes(certs: Certs, server_ctx: ssl.SSLContext) -> None:
    client, server, _, _ = memory_pair(certs, server_ctx)
    await handshake(client, server)
    pieces = [os.urandom(1 + i % 50) for i in range(2000)]
    expected = b"".join(pieces)
    with trio.fail_after(TIMEOUT):
        for piece in pieces:
            await server.send_all(piece)
            await client.send_all(piece)
        assert await receive_exactly(client, len(expected)) == expected
        assert await receive_exactly(server, len(expected)) == expected


async def test_small_max_bytes_loses_nothing(certs: Certs, server_ctx: ssl.SSLContext) -> None:
    client, server, _, _ = memory_pair(certs, server_ctx)
    await handshake(client, server)
    payload = os.urandom(20_000)  # two records
    await client.send_all(payload)
    got = bytearray()
    with trio.fail_after(TIMEOUT):
        while len(got) < len(payload):
            data = await server.receive_some(10)
            assert 0 < len(data) <= 10
            got += data
    assert got == payload


@pytest.mark.parametrize("cut", ["whole", "first-10-bytes"])
async def test_prefix_is_the_client_hello_already_read(
    certs: Certs, server_ctx: ssl.SSLContext, cut: str
) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    client = trio.SSLStream[trio.abc.Stream](
        client_t, client_context(certs.ca_pem), server_hostname=HOST
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            # As the daemon does: read the ClientHello off the transport to route on it.
            if cut == "whole":
                first = bytearray()
                while not isinstance(parse_client_hello(first), ClientHello):
                    first += await server_t.receive_some()
            else:  # the rest stays on the transport for TLSStream to read
                first = bytearray(await server_t.receive_some(10))
                assert len(first) == 10
            server = TLSStream(server_t, server_ctx, server_side=True, prefix=bytes(first))
            await server.do_handshake()
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some() == b"pong"
    assert server.selected_alpn_protocol() == "http/1.1"


@pytest.mark.parametrize(
    "version",
    [
        pytest.param(ssl.TLSVersion.TLSv1_2, id="tls12"),
        pytest.param(ssl.TLSVersion.TLSv1_3, id="tls13"),
    ],
)
async def test_tls13_session_tickets_do_not_deadlock_a_client_that_sends_first(
    certs: Certs,
    server_ctx: ssl.SSLContext,
    version: ssl.TLSVersion,
    autojump_clock: trio.testing.MockClock,  # a deadlock fails at once, not after TIMEOUT
) -> None:
    # Lockstep: a server that wrote its session tickets right after the handshake would
    # wait for a client that is itself waiting to send its request (openssl/openssl#7948).
    client_t, server_t = trio.testing.lockstep_stream_pair()
    client = trio.SSLStream[trio.abc.Stream](
        client_t, client_context(certs.ca_pem, version), server_hostname=HOST
    )
    server = TLSStream(server_t, server_ctx, server_side=True)
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    response = b"HTTP/1.1 204 No Content\r\n\r\n"

    async def client_side() -> None:
        await client.do_handshake()
        await client.send_all(request)
        assert await receive_exactly(client, len(response)) == response

    async def server_side() -> None:
        await server.do_handshake()
        assert await receive_exactly(server, len(request)) == request
        await server.send_all(response)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            nursery.start_soon(server_side)
    assert client.session is not None and client.session.has_ticket  # the tickets did arrive


# -- ends ------------------------------------------------------------------------------------


@VERSIONS
async def test_peer_close_notify_reads_as_eof(
    certs: Certs, server_ctx: ssl.SSLContext, version: ssl.TLSVersion
) -> None:
    client, server, _, _ = memory_pair(certs, server_ctx, version)
    await handshake(client, server)
    await client.send_all(b"last words")
    with trio.fail_after(TIMEOUT):
        await client.aclose()
        assert await receive_exactly(server, 10) == b"last words"
        assert await server.receive_some() == b""
        assert await server.receive_some() == b""


@pytest.mark.parametrize("when", ["handshake", "data"])
async def test_transport_eof_without_close_notify_is_broken(
    certs: Certs, server_ctx: ssl.SSLContext, when: str
) -> None:
    client, server, client_t, _ = memory_pair(certs, server_ctx)
    if when == "handshake":
        await client_t.send_all(client_hello())
        await client_t.send_stream.aclose()
        exc = await expect_broken(server.do_handshake)
    else:
        await handshake(client, server)
        await client.send_all(b"partial")
        await client_t.send_stream.aclose()  # a truncation attack looks just like this
        assert await server.receive_some() == b"partial"
        exc = await expect_broken(server.receive_some)
    assert isinstance(exc.__cause__, ssl.SSLError)
    later = await expect_broken(server.receive_some)  # and it stays broken, saying why
    assert isinstance(later.__cause__, ssl.SSLError)
    assert str(later.__cause__) == str(exc.__cause__)
    await expect_broken(lambda: server.send_all(b"x"))


@pytest.mark.parametrize("where", ["transport", "prefix"])
async def test_garbage_instead_of_client_hello(
    certs: Certs, server_ctx: ssl.SSLContext, where: str
) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    garbage = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    server = TLSStream(
        server_t, server_ctx, server_side=True, prefix=garbage if where == "prefix" else b""
    )
    if where == "transport":
        await client_t.send_all(garbage)
    exc = await expect_broken(server.do_handshake)
    assert isinstance(exc.__cause__, ssl.SSLError)


async def browser_handshake(transport: trio.abc.Stream, ctx: ssl.SSLContext) -> None:
    """A client handshake that, unlike trio.SSLStream, sends its alert before failing."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    while True:
        try:
            obj.do_handshake()
            return
        except ssl.SSLWantReadError:
            await transport.send_all(outgoing.read())
            incoming.write(await transport.receive_some())
        except ssl.SSLError:
            await transport.send_all(outgoing.read())
            raise


@VERSIONS
@pytest.mark.parametrize("client_ends", ["with-alert", "with-eof"])
async def test_client_that_does_not_trust_the_certificate(
    certs: Certs, server_ctx: ssl.SSLContext, version: ssl.TLSVersion, client_ends: str
) -> None:
    _, other_ca = make_ca("some other CA")
    ctx = client_context(other_ca, version)
    client_t, server_t = trio.testing.memory_stream_pair()
    server = TLSStream(server_t, server_ctx, server_side=True)
    failed: list[trio.BrokenResourceError] = []

    async def serve() -> None:
        failed.append(await expect_broken(server.do_handshake))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            if client_ends == "with-alert":  # as OpenSSL-based clients do
                with pytest.raises(ssl.SSLCertVerificationError):
                    await browser_handshake(client_t, ctx)
            else:  # trio.SSLStream sends no alert; the peer then closes the connection
                client = trio.SSLStream[trio.abc.Stream](client_t, ctx, server_hostname=HOST)
                with pytest.raises(trio.BrokenResourceError) as info:
                    await client.do_handshake()
                assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
                await client.aclose()
    # The server fails on what the client did, not on a timeout.
    cause = failed[0].__cause__
    assert isinstance(cause, ssl.SSLError), cause
    if client_ends == "with-alert":
        assert "ALERT" in str(cause.reason), cause


async def test_server_refusal_sends_an_alert(certs: Certs, server_ctx: ssl.SSLContext) -> None:
    # An RSA-only cipher list against the EC certificate: no shared cipher.
    ctx = client_context(certs.ca_pem, ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    client_t, server_t = trio.testing.memory_stream_pair()
    client = trio.SSLStream[trio.abc.Stream](client_t, ctx, server_hostname=HOST)
    server = TLSStream(server_t, server_ctx, server_side=True)
    errors: dict[str, trio.BrokenResourceError] = {}

    async def run(name: str, call: Callable[[], Awaitable[object]]) -> None:
        errors[name] = await expect_broken(call)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "client", client.do_handshake)
        nursery.start_soon(run, "server", server.do_handshake)
    cause = errors["client"].__cause__
    assert isinstance(cause, ssl.SSLError) and "ALERT" in str(cause.reason), cause


@VERSIONS
async def test_server_aclose(
    certs: Certs, server_ctx: ssl.SSLContext, version: ssl.TLSVersion
) -> None:
    client, server, _, server_t = memory_pair(certs, server_ctx, version)
    await handshake(client, server)
    await server.send_all(b"bye")
    with trio.fail_after(TIMEOUT):
        await server.aclose()
        await server.aclose()  # idempotent
        assert await receive_exactly(client, 3) == b"bye"
        assert await client.receive_some() == b""  # close_notify, not a truncation
    with pytest.raises(trio.ClosedResourceError):
        await server_t.send_all(b"x")  # the transport was closed too
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await server.do_handshake()


# -- concurrency -----------------------------------------------------------------------------


async def test_two_receivers_are_busy(certs: Certs, server_ctx: ssl.SSLContext) -> None:
    client, server, _, _ = memory_pair(certs, server_ctx)
    await handshake(client, server)
    got: list[bytes] = []

    async def receive() -> None:
        got.append(await server.receive_some())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            await client.send_all(b"for the first")
    assert got == [b"for the first"]


async def test_two_senders_are_busy_and_a_receiver_is_not(
    certs: Certs, server_ctx: ssl.SSLContext
) -> None:
    client, server, _, server_t = memory_pair(certs, server_ctx)
    await handshake(client, server)
    # Hold the server's transport inside send_all until released.
    release = trio.Event()
    pump = server_t.send_stream.send_all_hook

    async def held() -> None:
        await release.wait()
        if pump is not None:
            await pump()

    server_t.send_stream.send_all_hook = held
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"first")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.send_all(b"second")
            # One task may receive while another is stuck sending.
            await client.send_all(b"meanwhile")
            assert await server.receive_some() == b"meanwhile"
            release.set()
        assert await receive_exactly(client, 5) == b"first"


async def test_send_and_receive_before_the_handshake(
    certs: Certs, server_ctx: ssl.SSLContext
) -> None:
    # trio.SSLStream lets a receiving and a sending task share the implicit handshake.
    client, server, _, _ = memory_pair(certs, server_ctx)
    got: list[bytes] = []

    async def receive() -> None:
        got.append(await receive_exactly(server, 4))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(server.send_all, b"pong")
            await client.send_all(b"ping")
            assert await receive_exactly(client, 4) == b"pong"
    assert got == [b"ping"]


@pytest.mark.parametrize(
    ("pending", "racing"),
    [(0, False), (3, False), (3, True), (None, True)],
    ids=["idle", "part-of-a-record", "part-arrives-with-the-cancel", "all-arrives-with-the-cancel"],
)
async def test_cancelled_receive_loses_nothing(
    certs: Certs, server_ctx: ssl.SSLContext, pending: int | None, racing: bool
) -> None:
    client, server, client_t, server_t = memory_pair(certs, server_ctx)
    await handshake(client, server)
    client_t.send_stream.send_all_hook = None  # the test moves the client's bytes by hand

    def deliver(max_bytes: int | None = None) -> None:
        trio.testing.memory_stream_pump(
            client_t.send_stream, server_t.receive_stream, max_bytes=max_bytes
        )

    message = b"hello world"
    await client.send_all(message)
    got = bytearray()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def receive() -> None:
                with scope:
                    got.extend(await server.receive_some())

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            if pending != 0:
                deliver(pending)
                if not racing:  # let the receiver take the bytes and wait again
                    await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # racing: the waiting receiver is woken by data and cancel at once
        if not racing:
            assert scope.cancelled_caught and not got
        deliver()
        while len(got) < len(message):
            got += await server.receive_some()
    assert got == message


# -- the client side (the daemon's session to the relay) -----------------------------------


def client_pair(
    certs: Certs, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = HOST
) -> tuple[TLSStream, Client]:
    """TLSStream as the client, trio's SSLStream as the server."""
    client_t, server_t = trio.testing.memory_stream_pair()
    client = TLSStream(client_t, client_ctx, server_side=False, server_hostname=hostname)
    server = trio.SSLStream[trio.abc.Stream](server_t, server_ctx, server_side=True)
    return client, server


@VERSIONS
async def test_as_a_client_it_verifies_and_carries_data(
    certs: Certs, server_ctx: ssl.SSLContext, version: ssl.TLSVersion
) -> None:
    client, server = client_pair(certs, server_ctx, client_context(certs.ca_pem, version))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        await client.send_all(b"hello relay")
        assert await receive_exactly(server, 11) == b"hello relay"
        await server.send_all(b"welcome")
        assert await receive_exactly(client, 7) == b"welcome"
    assert client.version() == VERSION_NAMES[version]


@pytest.mark.parametrize("case", ["untrusted", "wrong-name"])
async def test_as_a_client_it_refuses_a_certificate_it_cannot_verify(
    certs: Certs, server_ctx: ssl.SSLContext, case: str
) -> None:
    if case == "untrusted":
        _, other_ca = make_ca("some other CA")
        client, server = client_pair(certs, server_ctx, client_context(other_ca))
    else:
        client, server = client_pair(
            certs, server_ctx, client_context(certs.ca_pem), hostname="relay.example.com"
        )
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            with trio.move_on_after(TIMEOUT):
                try:
                    await server.do_handshake()
                except trio.BrokenResourceError:
                    pass  # the client's alert

        nursery.start_soon(serve)
        error = await expect_broken(client.do_handshake)
    # What `tunneld status` shows as last_error comes from this cause.
    assert isinstance(error.__cause__, ssl.SSLCertVerificationError), error.__cause__
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"never")


@pytest.mark.parametrize("when", ["handshake", "data"])
async def test_a_broken_stream_is_freed_without_the_cycle_collector(
    certs: Certs, server_ctx: ssl.SSLContext, when: str
) -> None:
    """Most clients vanish without close_notify. The error a TLSStream keeps must not hold
    the stream in a reference cycle (its traceback's frames refer back to it): each one
    would keep its SSL object and buffers until a full collection, a long pause under load."""
    client, server, client_t, _ = memory_pair(certs, server_ctx)
    if when == "handshake":
        await client_t.send_all(client_hello())
    else:
        await handshake(client, server)
    await client_t.send_stream.aclose()
    # Not pytest.raises: its ExceptionInfo and the frames it keeps would hold `server`.
    for _ in range(2):  # the error it breaks with, then the one it keeps raising
        try:
            with trio.fail_after(TIMEOUT):
                await (server.receive_some() if when == "data" else server.do_handshake())
        except trio.BrokenResourceError:
            pass
        else:
            raise AssertionError("the stream did not break")
    gone = weakref.ref(server)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del server
        assert gone() is None, "a broken TLSStream outlived its last reference"
    finally:
        if enabled:
            gc.enable()


def test_the_kept_error_says_why_without_holding_frames() -> None:
    from tunneld.transport.tls import _kept

    def raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
        try:
            raise exc from cause
        except BaseException as caught:  # noqa: BLE001 - any exception, as TLSStream keeps
            return caught

    error = raised(trio.BrokenResourceError("reset"), raised(ConnectionResetError(104, "peer")))
    kept = _kept(error)
    assert type(kept) is trio.BrokenResourceError and str(kept) == "reset"
    assert kept.__traceback__ is None and error.__traceback__ is not None
    assert isinstance(kept.__cause__, ConnectionResetError) and kept.__cause__.errno == 104
    assert kept.__cause__.__traceback__ is None
    group = _kept(raised(ExceptionGroup("both", [OSError("a"), OSError("b")])))
    assert isinstance(group, trio.BrokenResourceError) and "both" in str(group)
