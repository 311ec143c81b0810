"""Server processes started by the harness, and the guarantee that each one is ended.

Every process is started in a session of its own (so a terminal's Ctrl-C reaches only the
test program, which then stops its servers in order) and recorded in a registry until it
is reaped. ``atexit`` ends whatever is left, by PID, then the rest of its process group.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import HarnessError

_live: dict[int, ServerProcess] = {}
_live_lock = threading.Lock()


def live_pids() -> list[int]:
    """PIDs of processes this interpreter started through the harness and has not reaped."""
    with _live_lock:
        return sorted(_live)


class ServerProcess:
    """One server program (postgres postmaster or pgbouncer) running in its own session."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path,
        env: Mapping[str, str],
        description: str,
    ) -> None:
        self.description = description
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self._popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        self.pid = self._popen.pid
        with _live_lock:
            _live[self.pid] = self

    @property
    def running(self) -> bool:
        """True until the process has exited (and been reaped)."""
        if self._popen.poll() is None:
            return True
        self._forget()
        return False

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process if it still runs."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True if it did."""
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._forget()
        return True

    def wait_group_gone(self, timeout: float) -> bool:
        """Wait until no process of this server's process group is left (children included)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            time.sleep(0.01)
        return False

    def stop(self, sig: int, timeout: float = 60.0) -> None:
        """Send ``sig``, wait for the exit; past ``timeout`` kill the whole group and raise."""
        self.signal(sig)
        if not self.wait(timeout):
            self.kill_group()
            raise HarnessError(f"{self.description} did not exit within {timeout:.0f}s of {sig!r}")
        self.wait_group_gone(timeout)

    def kill_group(self) -> None:
        """SIGKILL the process and whatever is left of its process group, then reap it."""
        self.signal(signal.SIGKILL)
        self.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.wait_group_gone(10)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the process's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _forget(self) -> None:
        with _live_lock:
            _live.pop(self.pid, None)


def _end_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live.values())
    for proc in leftovers:
        proc.signal(signal.SIGQUIT)
    for proc in leftovers:
        if not proc.wait(5):
            proc.kill_group()


atexit.register(_end_leftovers)
