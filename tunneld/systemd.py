"""sd_notify over $NOTIFY_SOCKET (READY=1, STATUS=..., STOPPING=1) without libsystemd."""

from __future__ import annotations

import os
import socket


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
