"""sd_notify over $NOTIFY_SOCKET without libsystemd: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
import socket

import trio


def notify(*lines: str) -> bool:
    """Send state lines to systemd; a no-op (False) when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.01)
    except ValueError:
        return None


async def run_watchdog(
    interval: float | None = None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping WATCHDOG=1 from the event loop itself.

    The pings depend on nothing but the loop running: a stalled loop stops
    them (and systemd restarts us), a relay or internet outage never does.
    """
    period = interval if interval is not None else watchdog_interval()
    task_status.started()
    if period is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(period)
