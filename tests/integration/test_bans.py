"""Per-client IP bans end to end: real relay, daemon and demo app; clients on 127.0.0.0/8.

Each test uses its own client addresses, since bans outlive a test. The last
tests restart and kill the daemon; each leaves it running again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.integration.harness import HOME_HOST, World, iter_recv, split_response, tunneld, wait_for
from tunneld.control import get_json, request
from tunneld.demoapp import LOGIN_PASSWORD, LOGIN_USER
from tunneld.errors import ControlError, NotRunningError
from tunneld.home.watchdog.bans import BanFile

pytestmark = pytest.mark.integration

WATCHDOG = {"ban_threshold": 3, "ban_window": "1m", "ban_duration": "1h"}
STEP = "/auth/login_flow/0123abcd"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("bans") / "w")
    w.home_overrides = {"watchdog": WATCHDOG}
    try:
        w.start_app()
        w.start_relay()
        w.start_home()
        yield w
    finally:
        w.stop_all()


# -- helpers ---------------------------------------------------------------------------


def get(world: World, path: str, source: str) -> int:
    return split_response(world.http_get(path, source, timeout=10))[0]


def login(world: World, source: str, password: str) -> dict[str, Any]:
    body = json.dumps({"username": LOGIN_USER, "password": password, "client_id": "x"}).encode()
    head = (
        f"POST {STEP} HTTP/1.1\r\nHost: {HOME_HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with world.connect(source, timeout=10) as conn:
        conn.sendall(head.encode() + body)
        status, _, data = split_response(b"".join(iter_recv(conn)))
    assert status == 200
    answer = json.loads(data)
    assert isinstance(answer, dict)
    return answer


def refused(world: World, source: str) -> bool:
    """True when a connection from `source` is cut before any answer."""
    try:
        return not get(world, "/small", source)
    except (OSError, ssl.SSLError):
        return True


def status(world: World, which: str) -> dict[str, Any]:
    """Straight from the control socket: a `tunneld status` process per look is slow."""
    answer = trio.run(get_json, world.root / "run" / f"{which}.sock", "/v1/status")
    assert isinstance(answer, dict)
    return answer


def home_bans(world: World) -> dict[str, str | None]:
    return {b["ip"]: b["until"] for b in status(world, "home")["bans"]}


def relay_has_every_ban(world: World) -> bool:
    """The relay's copy is as long as the home's list: every BAN frame has arrived."""
    sessions = status(world, "relay")["sessions"]
    return len(sessions) == 1 and sessions[0]["bans"] == len(home_bans(world))


def relay_refusals(world: World, reason: str) -> int:
    return int(status(world, "relay")["connections"]["refused"].get(reason, 0))


def bans(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return tunneld("bans", *args, "-c", str(world.home_config))


def assert_refused_at_the_relay(world: World, source: str) -> None:
    wait_for(lambda: relay_has_every_ban(world), what="the relay's ban list")
    total = status(world, "home")["streams"]["total"]
    before = relay_refusals(world, "banned")
    assert refused(world, source)
    assert relay_refusals(world, "banned") == before + 1
    assert status(world, "home")["streams"]["total"] == total  # the daemon never saw it


# -- tests -----------------------------------------------------------------------------


def test_failed_requests_ban_one_address_and_the_relay_refuses_it(world: World) -> None:
    bad, other = "127.0.0.21", "127.0.0.22"
    for _ in range(3):
        assert get(world, "/status/401", bad) == 401
    assert bad in home_bans(world)
    assert_refused_at_the_relay(world, bad)
    assert get(world, "/small", other) == 200
    assert f"banned {bad} (until " in world.home.log()
    assert "3 failed authentications within 1m (last: HTTP 401 for GET /status/401)" in (
        world.home.log()
    )
    human = tunneld("status", "-c", str(world.home_config)).stdout
    assert f"    {bad}  until " in human


def test_home_assistant_login_flow_and_a_good_login_resets_the_count(world: World) -> None:
    ip = "127.0.0.23"
    for _ in range(2):
        assert login(world, ip, "wrong")["errors"] == {"base": "invalid_auth"}
    assert login(world, ip, LOGIN_PASSWORD)["type"] == "create_entry"
    for _ in range(2):
        login(world, ip, "wrong")
    assert ip not in home_bans(world)  # 2 since the reset, not 4
    login(world, ip, "wrong")
    assert ip in home_bans(world)
    assert_refused_at_the_relay(world, ip)


def test_bans_commands_against_the_running_daemon_and_expiry(world: World) -> None:
    short, forever = "127.0.0.24", "127.0.0.25"
    added = bans(world, "add", short, "--duration", "2s")
    assert added.returncode == 0 and added.stdout.startswith(f"banned {short} (until ")
    assert refused(world, short)  # at once
    listed = json.loads(bans(world, "list", "--json").stdout)
    entry = next(b for b in listed if b["ip"] == short)
    assert entry["until"].endswith("Z") and entry["reason"] == "added with tunneld bans add"
    wait_for(lambda: not refused(world, short), timeout=10, what="the ban to expire")
    assert f"unbanned {short} (was until " in world.home.log()
    assert short not in home_bans(world)

    assert bans(world, "add", forever, "--duration", "0").returncode == 0
    assert home_bans(world)[forever] is None  # permanent: null
    assert_refused_at_the_relay(world, forever)
    text = bans(world, "list").stdout
    assert any(line.split()[:2] == [forever, "permanent"] for line in text.splitlines())
    removed = bans(world, "remove", forever)
    assert removed.returncode == 0 and removed.stdout.startswith(f"unbanned {forever}")
    assert get(world, "/small", forever) == 200
    again = bans(world, "remove", forever)
    assert again.returncode == 1 and "not banned" in again.stderr
    bad = bans(world, "add", "not-an-address")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr


def test_relay_limits_new_connections_per_address(world: World) -> None:
    flood, other = "127.0.0.30", "127.0.0.31"
    before = relay_refusals(world, "ip_rate")
    socks = []
    try:
        for _ in range(60):  # default: 20 per second, in bursts of 20
            try:
                s = socket.create_connection(
                    ("127.0.0.1", world.relay_port), timeout=5, source_address=(flood, 0)
                )
            except ConnectionResetError:
                # The relay accepted and reset the connection before connect()
                # read its result: a refusal seen early, not a failure.
                continue
            socks.append(s)
        wait_for(lambda: relay_refusals(world, "ip_rate") >= before + 20, what="rate refusals")
        assert get(world, "/small", other) == 200
    finally:
        for s in socks:
            s.close()


def test_bans_survive_a_restart_and_commands_work_offline(world: World) -> None:
    kept, offline, lifted = "127.0.0.26", "127.0.0.27", "127.0.0.28"
    assert bans(world, "add", kept, "--duration", "0").returncode == 0
    assert bans(world, "add", lifted, "--duration", "0").returncode == 0
    world.home.stop()
    path = world.root / "state" / "bans.json"
    path.chmod(0o640)
    if os.geteuid() == 0:  # the owner too, as when root edits the daemon user's file
        os.chown(path, 65534, 65534)

    listed = {b["ip"] for b in json.loads(bans(world, "list", "--json").stdout)}
    assert {kept, lifted, "127.0.0.21"} <= listed
    assert bans(world, "add", offline, "--duration", "1h").returncode == 0
    removed = bans(world, "remove", lifted)
    assert removed.returncode == 0 and removed.stdout.startswith(f"unbanned {lifted}")
    st = path.stat()
    assert st.st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)

    world.start_home()
    assert {kept, offline} <= set(home_bans(world)) and lifted not in home_bans(world)
    assert_refused_at_the_relay(world, offline)  # the full list went out on connect
    assert_refused_at_the_relay(world, kept)
    assert get(world, "/small", lifted) == 200


def test_kill_9_during_heavy_ban_churn_keeps_every_committed_ban(world: World) -> None:
    sock = world.root / "run" / "home.sock"
    committed: list[str] = []

    async def adder(worker: int) -> None:
        for i in range(2000):
            body = json.dumps({"ip": f"10.{worker}.{i // 256}.{i % 256}", "duration": "0"})
            try:
                status, _ = await request(sock, "POST", "/v1/bans", body=body.encode())
            except (ControlError, NotRunningError):
                return
            if status == 200:
                committed.append(json.loads(body)["ip"])

    async def churn() -> None:
        async with trio.open_nursery() as nursery:
            for worker in range(4):
                nursery.start_soon(adder, worker)
            await trio.sleep(1.0)
            world.home.popen.send_signal(signal.SIGKILL)

    trio.run(churn)
    world.home.popen.wait(10)
    assert len(committed) > 20, len(committed)
    stored = {r.ip for r in BanFile(world.root / "state" / "bans.json").read()}
    assert set(committed) <= stored
    world.start_home()
    wait_for(lambda: relay_has_every_ban(world), what="the full list at the relay")
    assert set(committed) <= set(home_bans(world))
