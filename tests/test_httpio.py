"""httpio: the one h11 reader and whole-response writer, over real trio streams."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from tunneld.httpio import next_event, send_response


async def test_reads_a_head_split_across_reads_and_keeps_the_raw_bytes() -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.SERVER)
    raw = bytearray()
    head = b"GET /healthz HTTP/1.1\r\nHost: relay.example\r\n\r\n"
    async with trio.open_nursery() as nursery:

        async def send_in_pieces() -> None:
            for i in range(0, len(head), 7):
                await client.send_all(head[i : i + 7])

        nursery.start_soon(send_in_pieces)
        with trio.fail_after(5):
            event = await next_event(server, conn, 7, raw=raw)
    assert isinstance(event, h11.Request) and event.target == b"/healthz"
    assert bytes(raw) == head


async def test_end_of_stream_raises_the_callers_error_or_tells_h11() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\n")
    await client.send_eof()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match="closed"):
        await next_event(
            server,
            h11.Connection(h11.SERVER),
            1024,
            on_eof=lambda: trio.BrokenResourceError("closed before a request"),
        )

    client, server = trio.testing.memory_stream_pair()
    await client.send_eof()
    with trio.fail_after(5):
        event = await next_event(server, h11.Connection(h11.SERVER), 1024)
    assert isinstance(event, h11.ConnectionClosed)


@pytest.mark.parametrize(("method", "with_body"), [(b"GET", True), (b"HEAD", False)])
async def test_send_response_is_one_whole_message(method: bytes, with_body: bool) -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.SERVER)
    await client.send_all(method + b" /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        await next_event(server, conn, 1024)
        body = b"hello\n"
        headers = [("Content-Length", str(len(body))), ("Connection", "close")]
        await send_response(server, conn, 200, headers, body, head=method == b"HEAD")
        await server.send_eof()
        reader = h11.Connection(h11.CLIENT)
        reader.send(h11.Request(method=method, target="/metrics", headers=[("Host", "x")]))
        got = b""
        while True:
            event = await next_event(client, reader, 1024)
            if isinstance(event, h11.Response):
                assert event.status_code == 200
            elif isinstance(event, h11.Data):
                got += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
    assert got == (body if with_body else b"")
