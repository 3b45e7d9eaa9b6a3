"""sd_notify(3) in a few lines: datagram to $NOTIFY_SOCKET (path or abstract '@name')."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's $NOTIFY_SOCKET (a path or ``@abstract`` name).
    Returns False when the variable is not set (not run by systemd with Type=notify); raises
    OSError when the socket cannot be reached."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True
