"""The ban list: keys, the state file (atomic, locked, crash-safe), the daemon's list,
the config keys, and the relay's side (matching, expiry, connection rate)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tunneld.config import load_config
from tunneld.errors import ConfigError, TunneldError
from tunneld.home.watchdog.bans import (
    BanFile,
    BanList,
    BanRecord,
    CorruptBanFile,
    ban_key,
    covering_keys,
    never_banned,
    parse_target,
)
from tunneld.relay.ratelimit import ConnectionRate
from tunneld.relay.registry import HomeSession
from tunneld.wire.events import Ban, BanEntry

REPO = Path(__file__).resolve().parent.parent.parent

# --- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prefix", "key"),
    [
        ("198.51.100.4", 128, "198.51.100.4"),
        (" ::ffff:198.51.100.4 ", 128, "198.51.100.4"),
        ("198.51.100.4/32", 64, "198.51.100.4"),
        ("2001:DB8::7", 128, "2001:db8::7"),
        ("2001:db8:1:2::7", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::7/64", 128, "2001:db8:1:2::/64"),
        ("2001:db8::7/128", 128, "2001:db8::7"),
    ],
)
def test_parse_target(text: str, prefix: int, key: str) -> None:
    assert parse_target(text, prefix) == key


@pytest.mark.parametrize("text", ["", "nope", "300.1.1.1", "10.0.0.0/8", "2001:db8::/48"])
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="address|network"):
        parse_target(text)


def test_keys_and_never_ban() -> None:
    assert ban_key("2001:db8:1:2::7", 64) == "2001:db8:1:2::/64"
    assert ban_key("192.0.2.1", 64) == "192.0.2.1"
    assert covering_keys("192.0.2.1") == ("192.0.2.1",)
    assert covering_keys("2001:db8:1:2::7") == ("2001:db8:1:2::7", "2001:db8:1:2::/64")
    nets = (ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("2001:db8:1:2::9/128"))
    assert never_banned("192.168.3.4", nets) == nets[0]
    assert never_banned("2001:db8:1:2::/64", nets) == nets[1]
    assert never_banned("192.0.2.1", nets) is None
    assert never_banned("2001:db8:1:3::/64", nets) is None


# --- the file --------------------------------------------------------------------------


def records(*ips: str, until: float | None = None) -> list[BanRecord]:
    return [BanRecord(ip, until, f"reason {ip}", 1000.0 + i) for i, ip in enumerate(ips)]


def test_file_round_trip_keeps_owner_and_mode(tmp_path: Path) -> None:
    file = BanFile(tmp_path / "state" / "bans.json")
    assert file.read() == []  # no file yet: no bans
    bans = records("192.0.2.1", "2001:db8:1:2::/64") + records("192.0.2.9", until=2e9)
    file.save(bans)
    assert file.read() == bans
    assert json.loads(file.path.read_text())["bans"][0]["ip"] == "192.0.2.1"
    assert file.path.stat().st_mode & 0o777 == 0o600
    file.path.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(file.path, 65534, 65534)
    file.save(bans[:1])
    st = file.path.stat()
    assert st.st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert file.read() == bans[:1]
    assert sorted(p.name for p in file.path.parent.iterdir()) == ["bans.json", "bans.json.lock"]


def test_bad_files_are_reported_with_their_path(tmp_path: Path) -> None:
    file = BanFile(tmp_path / "bans.json")
    for text in [
        "{",
        "[]",
        '{"bans": [{"ip": "nope"}]}',
        '{"bans": [{"ip": "1.2.3.4", "until": "x"}]}',
    ]:
        file.path.write_text(text)
        with pytest.raises(CorruptBanFile, match=str(file.path)):
            file.read()


def test_lock_is_exclusive_and_bounded(tmp_path: Path) -> None:
    file = BanFile(tmp_path / "bans.json")
    with file.locked():
        with pytest.raises(TunneldError, match="stayed locked"):
            with BanFile(file.path).locked(timeout=0.1):
                pass  # a second open file description: flock excludes it
    with file.locked(timeout=0.1):
        pass


def test_stale_temp_files_are_removed_on_load(tmp_path: Path) -> None:
    file = BanFile(tmp_path / "bans.json")
    file.save(records("192.0.2.1"))
    (tmp_path / ".bans.abc.tmp").write_text('{"bans": [')  # a crash mid-write
    assert file.load() == records("192.0.2.1")
    assert not (tmp_path / ".bans.abc.tmp").exists()


CHURN = textwrap.dedent(
    """
    import sys, random
    from tunneld.home.watchdog.bans import BanFile, BanRecord
    file = BanFile(sys.argv[1])
    bans = {r.ip: r for r in file.load()}
    rng = random.Random(int(sys.argv[2]))
    n = 0
    while True:
        n += 1
        ip = f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"
        bans[ip] = BanRecord(ip, None, "churn", float(n))
        if len(bans) > 50 and rng.random() < 0.4:  # unbans too, never a committed keeper
            victim = next(k for k in bans if k.startswith("10.") and k != ip)
            del bans[victim]
            print("-" + victim, flush=True)
        file.save(bans.values())
        print("+" + ip, flush=True)  # committed: the save returned
    """
)


def test_kill_9_during_churn_never_loses_or_tears_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    committed: dict[str, bool] = {}
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHURN, str(path), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(proc.stdout,))
        reader.start()
        # Kill mid-churn: after some commits (counted, not timed: the machine may be loaded).
        deadline = time.monotonic() + 30
        while sum(ln.startswith("+") for ln in list(lines)) < 10 + 20 * round_:
            assert time.monotonic() < deadline and proc.poll() is None, lines[:5]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        reader.join(10)
        adds = [ln[1:].strip() for ln in lines if ln.startswith("+")]
        assert len(adds) > 5, lines[:5]
        for ln in lines:
            committed[ln[1:].strip()] = ln.startswith("+")
        stored = {r.ip for r in BanFile(path).read()}  # parses: never torn
        kept = {ip for ip, present in committed.items() if present}
        assert kept <= stored
        # Only the one write the kill interrupted may differ from what was printed.
        assert len(stored - kept) <= 1


# --- the daemon's list -------------------------------------------------------------------


async def test_ban_list_persists_and_flush_means_on_disk(tmp_path: Path) -> None:
    file = BanFile(tmp_path / "bans.json")
    file.save([BanRecord("192.0.2.50", time.time() - 5, "expired already", 1.0)])
    bans = BanList(file)
    async with trio.open_nursery() as nursery:
        await nursery.start(bans.run)
        assert len(bans) == 0  # expired entries are not loaded
        bans.add("192.0.2.1", None, "forever")
        bans.add("192.0.2.2", 3600.0, "an hour")
        await bans.flush()
        assert [r.ip for r in file.read()] == ["192.0.2.1", "192.0.2.2"]
        bans.remove("192.0.2.1", "test")
        await bans.flush()
        assert [r.ip for r in file.read()] == ["192.0.2.2"]
        bans.add("192.0.2.3", None, "written on the way out")
        nursery.cancel_scope.cancel()
    assert [r.ip for r in file.read()] == ["192.0.2.2", "192.0.2.3"]
    again = BanList(file)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        assert [r.ip for r in again.active()] == ["192.0.2.2", "192.0.2.3"]
        assert again.covering("192.0.2.3") is not None
        nursery.cancel_scope.cancel()


async def test_a_failing_write_is_reported_to_flush(tmp_path: Path) -> None:
    file = BanFile(tmp_path / "bans.json")
    bans = BanList(file)
    async with trio.open_nursery() as nursery:
        await nursery.start(bans.run)
        file.path.mkdir()  # rename onto a directory fails
        bans.add("192.0.2.1", None, "x")
        with pytest.raises(TunneldError, match="could not be saved"):
            await bans.flush()
        assert bans.covering("192.0.2.1") is not None  # in effect all the same
        nursery.cancel_scope.cancel()


async def test_a_corrupt_file_is_set_aside_and_the_daemon_starts(tmp_path: Path) -> None:
    file = BanFile(tmp_path / "bans.json")
    file.path.write_text("not json")
    bans = BanList(file)
    async with trio.open_nursery() as nursery:
        await nursery.start(bans.run)
        assert len(bans) == 0
        nursery.cancel_scope.cancel()
    aside = list(tmp_path.glob("bans.json.bad-*"))  # noqa: ASYNC240 - a test's tmp dir
    assert len(aside) == 1 and aside[0].read_text() == "not json"  # noqa: ASYNC240


# --- config keys -------------------------------------------------------------------------

HOME = """
[relay]
url = "wss://relay.example.com/v1/tunnel"
token = "t0ken"
[tls]
hostnames = ["home.example.com"]
"""
RELAY = """
[relay]
hostname = "relay.example.com"
certificate = "relay.crt"
private_key = "relay.key"
token_public_key = "token.pub"
"""


def test_new_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "home.toml"
    path.write_text(HOME + "[watchdog]\nipv6_prefix = 64\n")
    config = load_config(path)
    assert config.watchdog.ipv6_prefix == 64  # type: ignore[union-attr]
    for bad in ("96", "true", '"64"'):
        path.write_text(HOME + f"[watchdog]\nipv6_prefix = {bad}\n")
        with pytest.raises(ConfigError, match=r"\[watchdog\] ipv6_prefix: expected 128"):
            load_config(path)
    path = tmp_path / "relay.toml"
    path.write_text(RELAY + "connections_per_ip_per_second = 0\n")
    assert load_config(path).relay.connections_per_ip_per_second == 0  # type: ignore[union-attr]
    path.write_text(RELAY + "connections_per_ip_per_second = -1\n")
    with pytest.raises(ConfigError, match=r"\[relay\] connections_per_ip_per_second"):
        load_config(path)


# --- the relay's side ----------------------------------------------------------------------


def session() -> HomeSession:
    return HomeSession(
        mux=None,  # type: ignore[arg-type]
        session_id="s",
        subject="home",
        token_id="t",
        version="0",
        hostnames=("home.test",),
        peer="192.0.2.200",
    )


def test_relay_matches_addresses_and_64s_and_expires_on_its_clock() -> None:
    home = session()
    now = time.time()
    home.apply_bans(
        Ban(
            (
                BanEntry("192.0.2.1", None),
                BanEntry("192.0.2.2", now + 60),
                BanEntry("2001:DB8::7", None),
                BanEntry("2001:db8:1:2::", None),  # a /64
            )
        )
    )
    assert home.is_banned("192.0.2.1") and home.is_banned("192.0.2.2")
    assert not home.is_banned("192.0.2.3")
    assert home.is_banned("2001:db8::7") and not home.is_banned("2001:db8::8")
    assert home.is_banned("2001:db8:1:2:abcd::1")
    assert not home.is_banned("2001:db8:1:3::1")
    assert not home.is_banned("192.0.2.2", now=now + 61)
    home.apply_bans(Ban((BanEntry("192.0.2.1", 0.0),), replace=False))  # lifted
    assert not home.is_banned("192.0.2.1")
    home.apply_bans(Ban((BanEntry("192.0.2.9", None),)))  # replace
    assert not home.is_banned("2001:db8::7") and home.is_banned("192.0.2.9")


def test_connection_rate_token_bucket() -> None:
    now = [0.0]
    rate = ConnectionRate(5, clock=lambda: now[0])
    assert [rate.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert rate.allow("b")  # another address has its own bucket
    now[0] += 0.2  # one token back
    assert rate.allow("a") and not rate.allow("a")
    now[0] += 10
    assert sum(rate.allow("a") for _ in range(20)) == 5  # refills to the burst, no more
    assert all(ConnectionRate(0).allow("a") for _ in range(100))


def test_connection_rate_table_is_bounded() -> None:
    now = [0.0]
    rate = ConnectionRate(2, clock=lambda: now[0], max_tracked=100)
    for i in range(1000):
        rate.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(rate) <= 100
    now[0] += 5
    for i in range(50):
        rate.allow(f"10.1.0.{i}")
    assert len(rate) <= 100
