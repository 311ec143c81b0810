"""Reserve free loopback ports below the ephemeral range, safely across parallel workers.

Ports in Linux's ephemeral range (32768-60999) can self-connect and collide with TIME-WAIT
sockets, so servers get ports from 20000-32767. A reservation is a lock file holding the
owner's PID; a file whose owner is dead is stale and reused.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile
from pathlib import Path

from .errors import HarnessError

PORT_RANGE = range(20000, 32768)
_LOCK_DIR = Path(tempfile.gettempdir()) / "pgfailover-ports"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _try_lock(port: int) -> bool:
    lock = _LOCK_DIR / f"{port}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                return False
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def reserve_port(rng: random.Random | None = None) -> int:
    """Reserve and return a free loopback TCP port; give it back with :func:`release_port`."""
    _LOCK_DIR.mkdir(mode=0o1777, exist_ok=True)
    rng = rng or random.Random()  # noqa: S311 - spreading ports, not security
    for _ in range(200):
        port = rng.choice(PORT_RANGE)
        if _try_lock(port):
            if _bindable(port):
                return port
            release_port(port)
    raise HarnessError("no free loopback port found in 20000-32767 after 200 tries")


def release_port(port: int) -> None:
    """Drop this process's reservation of ``port`` (no-op if it holds none)."""
    lock = _LOCK_DIR / f"{port}.lock"
    with contextlib.suppress(OSError, ValueError):
        if int(lock.read_text()) == os.getpid():
            lock.unlink()
