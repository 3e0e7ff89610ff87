"""Upstream faults end to end: relay + daemon + a misbehaving upstream (tests/badupstream.py).

test_proxy.py covers a stopped app (502) and a slow one (504) once each; here the
upstream goes down, hangs and comes back under a steady stream of requests, cuts
responses in every framing, answers with garbage, smuggles a second response
behind a first, and refuses to read a big upload. The client must always see an
honest answer (the response, a 502/504 page, or a broken connection), promptly,
and the daemon must keep serving everyone else with bounded memory.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from tests import badupstream
from tests.badupstream import CUT_BODY, CUT_SENT, answered_ok
from tests.integration.harness import World
from tests.loadclient import BROKEN, HttpClient, Reply, RssSampler, client_context, open_tls
from tunneld.demoapp import pattern

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CONNECT_TIMEOUT = 2.0
RESPONSE_TIMEOUT = 3.0
# "Quickly": far under any browser timeout, and well over what loopback needs.
PROMPT = 5.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = badupstream.start_world(
        tmp_path_factory.mktemp("upstream") / "w",
        connect_timeout=f"{CONNECT_TIMEOUT:g}s",
        response_timeout=f"{RESPONSE_TIMEOUT:g}s",
    )
    try:
        yield w
    finally:
        w.stop_all()


async def get(world: World, target: str, source: str = "127.0.0.1") -> Reply:
    """One request on a new connection, bounded."""
    with trio.fail_after(30):
        stream = await open_tls(world.relay_port, client_context(str(world.home_cert())), source)
        try:
            return await HttpClient(stream).request(target)
        finally:
            await trio.aclose_forcefully(stream)


# -- down, hung, restarting ------------------------------------------------------------

DOWN_REQUESTS = 5  # answered while the app is down (each one a 502)


@dataclass
class Outcome:
    phase: str
    status: int
    good: bool  # a complete, correct 200, or a 502 page
    seconds: float


async def test_upstream_down_hung_and_restarting_under_steady_requests(world: World) -> None:
    """Every request during an upstream restart gets its answer or a prompt 502 page."""
    home_pid, session = world.home.popen.pid, world.home_status()["session_id"]
    ctx = client_context(str(world.home_cert()))
    kept = HttpClient(await open_tls(world.relay_port, ctx))
    assert answered_ok(await kept.request("/ok?warm"), "/ok?warm")  # a pooled, kept connection
    phase = "up"
    outcomes: list[Outcome] = []

    async def steady() -> None:
        n = 0
        while True:
            n += 1
            target = f"/ok?n={n}"
            start, started_in = time.monotonic(), phase
            reply = await get(world, target, "127.0.0.2")
            good = answered_ok(reply, target) or (
                reply.status == 502 and b"502 Bad Gateway" in reply.body
            )
            outcomes.append(Outcome(started_in, reply.status, good, time.monotonic() - start))
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(steady)
        await trio.sleep(1)
        port = world.app_port
        world.app.stop()
        phase = "down"  # connection refused
        start = time.monotonic()
        reply = await kept.request("/ok?after")  # the kept connection died with the app
        assert reply.status == 502 and time.monotonic() - start < PROMPT
        # Down long enough for several fresh requests to be answered, however slowly.
        with trio.fail_after(60):
            while sum(o.phase == "down" for o in outcomes) < DOWN_REQUESTS:  # noqa: ASYNC110
                await trio.sleep(0.05)

        # Hung: something listens on the port but never accepts (its queue is full),
        # so connecting hangs until connect_timeout.
        phase = "hung"
        with socket.socket() as hung:
            hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hung.bind(("127.0.0.1", port))
            hung.listen(0)
            fillers = [socket.socket() for _ in range(2)]
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            start = time.monotonic()
            reply = await get(world, "/ok?hung")
            assert reply.status == 502, reply
            assert CONNECT_TIMEOUT - 0.5 < time.monotonic() - start < CONNECT_TIMEOUT + PROMPT
            for filler in fillers:
                filler.close()
        phase = "restarting"
        world.app = await trio.to_thread.run_sync(badupstream.start, world, port, "badupstream2")
        phase = "up again"
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()

    assert answered_ok(await get(world, "/ok?back"), "/ok?back")
    await trio.aclose_forcefully(kept.stream)
    by_phase: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_phase.setdefault(outcome.phase, []).append(outcome)
    summary = {p: (len(o), sum(x.status == 200 for x in o)) for p, o in by_phase.items()}
    print(f"\nrestart: (requests, 200s) by phase {summary}")
    bad = [o for o in outcomes if not o.good]
    assert bad == [], bad
    # "down" is refused at once; "hung" costs connect_timeout; nothing waits longer.
    assert max(o.seconds for o in outcomes) < CONNECT_TIMEOUT + PROMPT
    assert all(o.status == 502 for o in by_phase["down"])
    assert len(by_phase["down"]) >= DOWN_REQUESTS
    assert max(o.seconds for o in by_phase["down"]) < PROMPT
    assert all(o.status == 200 for o in by_phase["up again"])
    assert by_phase["up again"] and by_phase["up"]
    # Served throughout by the same daemon and session.
    status = await trio.to_thread.run_sync(world.home_status)
    assert status["session_id"] == session and world.home.popen.pid == home_pid


# -- broken answers ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_response_cut_by_the_upstream_never_looks_complete(
    world: World, framing: str, how: str
) -> None:
    mark = log_mark(world)
    start = time.monotonic()
    reply = await get(world, f"/close-mid?framing={framing}&how={how}")
    assert time.monotonic() - start < PROMPT
    # The head and part of the body may have gone out; the end never does.
    assert not reply.complete and reply.error, reply
    assert reply.status in (0, 200) and len(reply.body) <= CUT_SENT < CUT_BODY
    if reply.status == 200 and framing == "length":
        assert reply.headers[b"content-length"] == b"%d" % CUT_BODY
    assert answered_ok(await get(world, "/ok?after-cut"), "/ok?after-cut")
    await wait_logged(world, mark, b"upstream broke off a response")


def log_mark(world: World) -> int:
    """Where the daemon's log ends now: later checks look only past it."""
    return world.home.log_path.stat().st_size


async def wait_logged(world: World, mark: int, line: bytes) -> None:
    """Wait (bounded) for the daemon to log `line` after `mark`; it may trail the reply."""
    with trio.fail_after(PROMPT):
        while line not in world.home.log_path.read_bytes()[mark:]:  # noqa: ASYNC110
            await trio.sleep(0.05)


# Bytes past a response's end stay in h11's buffer: the connection must not be reused.
@pytest.mark.parametrize("next_on", ["same connection", "another client"])
async def test_second_response_smuggled_behind_the_first_reaches_nobody(
    world: World, next_on: str
) -> None:
    """An upstream answers with more bytes than its Content-Length (a response desync,
    as a body sent to a HEAD request would be): the extra bytes are nobody's answer."""
    ctx = client_context(str(world.home_cert()))
    client = HttpClient(await open_tls(world.relay_port, ctx, "127.0.0.4"))
    # With "Connection: close" the daemon puts the upstream connection back in the pool.
    close = [("connection", "close")] if next_on == "another client" else []
    first = await client.request("/overlong", headers=close)
    assert (first.status, first.body, first.complete) == (200, b"hello", True)
    if next_on == "another client":
        await trio.aclose_forcefully(client.stream)
        client = HttpClient(await open_tls(world.relay_port, ctx, "127.0.0.5"))
    for i in range(3):
        target = f"/ok?after={i}"
        reply = await client.request(target)
        assert answered_ok(reply, target), reply
    await trio.aclose_forcefully(client.stream)


@pytest.mark.parametrize("target", ["/garbage", "/huge-head"])
async def test_garbage_or_endless_response_head_gets_a_prompt_502(
    world: World, target: str
) -> None:
    start = time.monotonic()
    reply = await get(world, target)
    assert time.monotonic() - start < PROMPT
    assert reply.status == 502 and b"502 Bad Gateway" in reply.body
    assert answered_ok(await get(world, "/ok?after"), "/ok?after")


async def test_response_head_trickled_byte_by_byte_gets_504_on_time(world: World) -> None:
    # Every byte is progress, but the deadline is for the whole head.
    start = time.monotonic()
    reply = await get(world, "/trickle-head?interval=0.1")
    elapsed = time.monotonic() - start
    assert reply.status == 504 and b"504 Gateway Timeout" in reply.body
    assert RESPONSE_TIMEOUT - 0.5 < elapsed < RESPONSE_TIMEOUT + PROMPT


# -- an upstream that does not read the request body -------------------------------------


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/no-read", 504),  # never reads, never answers
        ("/reject-body", 413),  # answers at once, never reads
    ],
)
async def test_upstream_not_reading_a_256_mib_upload_costs_bounded_memory(
    world: World, target: str, status: int
) -> None:
    size = 256 * MiB
    client = HttpClient(
        await open_tls(world.relay_port, client_context(str(world.home_cert())), "127.0.0.3")
    )
    sent = 0
    upload_ended = trio.Event()
    replies: list[Reply] = []
    replied = trio.Event()

    async def upload() -> None:
        nonlocal sent
        try:
            await client.start(target, "POST", length=size)
            for chunk in pattern(size, 1):
                await client.send_body(chunk)
                sent += len(chunk)
        except BROKEN:
            pass  # the daemon ended the connection: expected once it gave up
        upload_ended.set()

    async def read_reply() -> None:
        replies.append(await client.reply())
        replied.set()

    pids = {"daemon": world.home.popen.pid, "relay": world.relay.popen.pid}
    start = time.monotonic()
    with RssSampler(pids) as rss, trio.fail_after(RESPONSE_TIMEOUT + 30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            nursery.start_soon(read_reply)
            # Wait until the upload is stuck (no progress for 0.5 s) or over.
            seen, still = -1, 0
            while still < 5 and not replies and not upload_ended.is_set():
                await trio.sleep(0.1)
                seen, still = sent, (still + 1 if sent == seen else 0)
            stuck_at = sent
            # Meanwhile everyone else is served.
            other = await get(world, "/ok?meanwhile")
            assert answered_ok(other, "/ok?meanwhile"), other
            await replied.wait()
            nursery.cancel_scope.cancel()
    elapsed = time.monotonic() - start
    await trio.aclose_forcefully(client.stream)
    reply = replies[0]
    growth = {k: (rss.peak[k] - rss.base[k]) / MiB for k in pids}
    print(
        f"\n{target}: stuck after {stuck_at / MiB:.1f} MiB of {size // MiB} MiB, "
        f"{reply.status} after {elapsed:.1f}s, VmRSS growth MiB {growth}"
    )
    assert reply.status == status and reply.complete, reply
    assert sent < size // 4  # flow control stopped the client early
    assert growth["daemon"] < 32 and growth["relay"] < 32
    if status == 504:
        assert RESPONSE_TIMEOUT - 0.5 < elapsed < RESPONSE_TIMEOUT + 2 * PROMPT
    else:
        assert elapsed < 2 * PROMPT
    assert answered_ok(await get(world, "/ok?after"), "/ok?after")
    assert "Traceback" not in world.home.log()
