"""Loopback ports: a free one for a process we start, and waiting until it listens there."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def wait_until_listening(port: int, *, timeout: float, check_alive: Callable[[], None], host: str = LOOPBACK,
                         interval: float = 0.3) -> bool:
    """Whether something accepts connections on host:port within `timeout` seconds.

    `check_alive` is called before each try and raises if the process that should listen has
    exited, so a crash is reported at once rather than after the timeout.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive()
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(interval)
    return False


def free_loopback_port() -> int:
    """A port nothing listens on now (the OS's choice); the caller's process binds it next."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
