"""The real PgBouncer follower (``pgfailover pgbouncer follow``) as a process of the harness.

:class:`LocalCluster` (``follower=True``) and :class:`PatroniCluster` (``follower=True``)
start one :class:`FollowerProcess` next to their PgBouncer: ``python -m pgfailover.cli
pgbouncer follow`` in a session of its own, ended by PID with the cluster, its output in
``follower/follower.log`` under the cluster's directory. Passwords never reach its command
line: the DSNs it is given name no password, and a passfile of its own
(``follower/pgpass``, mode 0600, pointed at by ``PGPASSFILE``) holds them.

:func:`wait_points_at` is the deadline-bounded poll of ``SHOW DATABASES`` both clusters use
to wait for the follower's repoint instead of repointing PgBouncer themselves.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from ._process import ServerProcess
from .errors import HarnessError

#: Seconds between two rounds of the harness's followers when the cluster is given none:
#: shorter than the command's own default (0.5 s), so that a test's wait is short.
DEFAULT_INTERVAL = 0.1
_POLL = 0.02


def _passfile_field(text: str) -> str:
    """``text`` escaped for a libpq passfile field (``\\`` and ``:``)."""
    return text.replace("\\", "\\\\").replace(":", "\\:")


class FollowerProcess:
    """One ``pgfailover pgbouncer follow`` process of a cluster.

    ``root`` is its directory (created; the log and the passfile go there). ``admin_dsn``
    is PgBouncer's admin console, ``source`` the topology arguments (``["--hosts",
    "h:p,..."]`` or ``["--patroni", "url,..."]``), ``check_dsn`` the base conninfo of the
    in-band checks; neither DSN may hold a password: ``passwords`` maps each user to its
    password, written to the process's passfile. ``interval`` is the pause between its
    rounds, in seconds; ``extra`` more ``follow`` arguments (e.g. ``["--pause"]``).
    Started by :meth:`start`, ended by :meth:`stop` (SIGTERM, then SIGKILL of its group
    past the timeout).
    """

    def __init__(
        self,
        root: Path,
        *,
        admin_dsn: str,
        source: Sequence[str],
        check_dsn: str,
        passwords: dict[str, str],
        interval: float = DEFAULT_INTERVAL,
        extra: Sequence[str] = (),
    ) -> None:
        if not interval > 0:
            raise ValueError(f"follower interval must be > 0 seconds, got {interval!r}")
        self.root = root
        self.log_path = root / "follower.log"
        self.passfile = root / "pgpass"
        self.argv = [
            sys.executable,
            "-m",
            "pgfailover.cli",
            "pgbouncer",
            "follow",
            "--admin",
            admin_dsn,
            *source,
            "--check-dsn",
            check_dsn,
            "--interval",
            f"{interval:g}",
            *extra,
        ]
        self._passwords = dict(passwords)
        self.process: ServerProcess | None = None

    @property
    def running(self) -> bool:
        """Whether the follower process runs."""
        return self.process is not None and self.process.running

    @property
    def pid(self) -> int | None:
        """Its PID, None when it does not run."""
        return self.process.pid if self.process is not None and self.running else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the process (a no-op if it runs) and wait until it says it follows;
        :class:`HarnessError` if it exits or stays silent for ``timeout`` seconds."""
        if self.running:
            return
        self.root.mkdir(mode=0o700, exist_ok=True)
        lines = "".join(
            f"*:*:*:{_passfile_field(user)}:{_passfile_field(password)}\n"
            for user, password in self._passwords.items()
        )
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(lines)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSFILE=str(self.passfile), PYTHONUNBUFFERED="1")
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = ServerProcess(
            self.argv,
            log_path=self.log_path,
            cwd=self.root,
            env=env,
            description="pgbouncer follower",
        )
        deadline = time.monotonic() + timeout
        while "following " not in self.log_text(mark):
            if not self.running:
                raise HarnessError(
                    "the PgBouncer follower exited at start-up; log tail:\n"
                    + self.process.log_tail()
                )
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"the PgBouncer follower said nothing within {timeout:g}s; log tail:\n"
                    + self.process.log_tail()
                )
            time.sleep(_POLL)

    def log_text(self, offset: int = 0) -> str:
        """Its log from byte ``offset`` on ("" before it starts)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        """The log's size in bytes now (an offset for :meth:`log_text`)."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, and wait up to ``timeout`` seconds for the exit (then SIGKILL of its
        group); the exit status, None when it had to be killed or never ran."""
        process = self.process
        if process is None:
            return None
        if process.running:
            process.signal(signal.SIGTERM)
            if not process.wait(timeout):
                process.kill_group()
                return None
        return process._popen.returncode  # the harness's own process object

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<FollowerProcess {state} log {self.log_path}>"


def points_at(admin_dsn: str, host: str, port: int, databases: Sequence[str]) -> bool:
    """Whether ``SHOW DATABASES`` (admin console ``admin_dsn``) has every one of
    ``databases`` at ``host:port``."""
    with psycopg.connect(
        admin_dsn, autocommit=True, prepare_threshold=None, connect_timeout=5
    ) as conn:
        cur = conn.execute("SHOW DATABASES")  # no parameters: the simple protocol
        assert cur.description is not None
        names = [d.name for d in cur.description]
        found = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    rows = {str(r["name"]): r for r in found}
    return all(
        name in rows and (rows[name]["host"], int(rows[name]["port"])) == (host, port)
        for name in databases
    )


def wait_points_at(
    admin_dsn: str,
    host: str,
    port: int,
    databases: Sequence[str],
    *,
    timeout: float,
    follower: FollowerProcess | None = None,
) -> None:
    """Poll ``SHOW DATABASES`` until every one of ``databases`` points at ``host:port``;
    :class:`HarnessError` after ``timeout`` seconds (with the follower's log tail when
    ``follower`` is given), or at once when that follower has exited."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if points_at(admin_dsn, host, port, databases):
                return
        except psycopg.Error as ex:
            last_error = ex
        gone = follower is not None and not follower.running
        if gone or time.monotonic() >= deadline:
            why = "the follower exited" if gone else f"timed out after {timeout:.1f}s"
            detail = f" (last error: {last_error})" if last_error else ""
            tail = ""
            if follower is not None and follower.process is not None:
                tail = "; follower log tail:\n" + follower.process.log_tail()
            raise HarnessError(
                f"{why} waiting for PgBouncer to point at {host}:{port}{detail}{tail}"
            )
        time.sleep(_POLL)
