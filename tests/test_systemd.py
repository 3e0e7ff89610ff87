"""sd_notify against a real unix datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tunneld import systemd


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's: collects (time, message) datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [line for _, msg in self.messages for line in msg.splitlines()]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(lst.path))
    try:
        yield lst
    finally:
        lst.close()


def test_notify_is_a_no_op_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_sends_lines(listener: NotifyListener) -> None:
    assert systemd.notify("READY=1", "STATUS=connecting")
    deadline = time.monotonic() + 5
    while len(listener.lines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.lines() == ["READY=1", "STATUS=connecting"]


def test_watchdog_interval_follows_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


def test_watchdog_pings_stop_while_the_loop_is_blocked(listener: NotifyListener) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(systemd.run_watchdog, 0.05)
            await trio.sleep(0.5)
            time.sleep(0.6)  # noqa: ASYNC251 - a stalled event loop on purpose
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()

    trio.run(main)
    times = [t for t, msg in listener.messages if msg == "WATCHDOG=1"]
    assert len(times) >= 10
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) >= 0.55  # the stall shows as one long silence
    assert sorted(gaps)[len(gaps) // 2] < 0.2  # otherwise regular pings


@pytest.mark.integration
def test_daemon_is_ready_and_pings_while_the_relay_is_down(
    tmp_path: Path, listener: NotifyListener
) -> None:
    from tests.integration.harness import PY, World, wait_for

    world = World(tmp_path / "w")
    try:
        world.start_app()
        world.start_relay()
        world.relay.stop()  # the relay is down for the whole test
        world.write_home_config()
        proc = world.spawn(
            "home",
            [PY, "-m", "tunneld", "run", "-c", str(world.home_config)],
            env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"},
        )
        wait_for(lambda: "READY=1" in listener.lines(), timeout=15, what="READY=1")
        ready_at = time.monotonic()
        wait_for(
            lambda: sum(t > ready_at + 1.0 for t, m in listener.messages if m == "WATCHDOG=1") >= 3,
            timeout=10,
            what="WATCHDOG=1 while the relay is unreachable",
        )
        assert any(line.startswith("STATUS=connecting") for line in listener.lines())
        assert proc.stop() == 0
        wait_for(lambda: "STOPPING=1" in listener.lines(), timeout=5, what="STOPPING=1")
    finally:
        world.stop_all()
