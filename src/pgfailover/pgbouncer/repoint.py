"""Point PgBouncer's databases at a new primary: rewrite pgbouncer.ini's ``[databases]``
entries atomically, ``RELOAD``, ``RECONNECT`` the databases whose server connections are
still bound to the old node, and check with ``SHOW DATABASES`` that it took. Optionally
(``pause``) the databases are held with ``PAUSE`` around the rewrite and ``RELOAD``, so
that clients wait instead of reaching the old node meanwhile.

Idempotent: when the file and the running configuration already point at the target,
nothing is written and nothing is reloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .admin import AdminConsole, AdminError, PauseTimeout
from .ini import IniError, Repointed, read_text, repoint_text


class RepointFailed(AdminError):
    """PgBouncer did not take the new address: after RELOAD, ``SHOW DATABASES`` still shows
    another one for a database (the file PgBouncer reads may not be the one rewritten)."""


#: Seconds between two looks at ``SHOW POOLS`` while clients wait for a server.
_SERVED_POLL = 0.02


@dataclass
class RepointResult:
    """What :func:`repoint` did: the ``path`` rewritten (or not: ``file_changed``), the
    ``entries`` it selected, whether it sent ``RELOAD`` (``reloaded``), the databases it
    sent ``RECONNECT`` for (``reconnected``), those it held with ``PAUSE`` while it
    rewrote and reloaded (``paused``, resumed since), ``waiting``: clients still waiting
    for a server connection when it stopped looking (see :func:`repoint`'s ``settle``), and
    ``lingering``: server connections still
    bound to another address afterwards (marked ``close_needed``: in session pooling they
    close when their client disconnects, or at the end of its transaction with
    ``server_fast_close``)."""

    target: str
    path: Path
    entries: list[Repointed] = field(default_factory=list)
    file_changed: bool = False
    reloaded: bool = False
    reconnected: list[str] = field(default_factory=list)
    lingering: int = 0
    paused: list[str] = field(default_factory=list)
    waiting: int = 0

    @property
    def changed(self) -> bool:
        """Whether anything was done (False: PgBouncer already pointed at the target)."""
        return self.file_changed or self.reloaded or bool(self.reconnected)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` atomically: a temporary file in the same
    directory, flushed to disk, given the old file's mode (and owner, when this process may
    set it), then renamed over ``path``. A reader sees the old or the new file, never a
    mix. Raises :class:`IniError` when it cannot be written."""
    try:
        info = path.stat()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as ex:
        raise IniError(f"cannot write {path}: {ex.strerror or ex}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, info.st_mode & 0o7777)
        with contextlib.suppress(PermissionError):
            os.chown(tmp, info.st_uid, info.st_gid)
        os.replace(tmp, path)
    except OSError as ex:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise IniError(f"cannot write {path}: {ex.strerror or ex}") from None


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file at ``path`` (the file now there: a lock taken
    on a file since renamed over is dropped and taken again). Waits up to ``timeout``
    seconds, polling; :class:`IniError` when the file cannot be opened or the lock is still
    held by another process then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as ex:
            raise IniError(f"cannot read {path}: {ex.strerror or ex}") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise IniError(
                            f"{path} is locked by another repoint for more than {timeout:g} s"
                        ) from None
                    time.sleep(0.02)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except OSError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)  # releases the lock


def _addresses(host: str, port: int) -> set[str]:
    """The addresses ``host`` resolves to (itself when it is an address or cannot be
    resolved)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            return {str(info[4][0]) for info in socket.getaddrinfo(host, port)} | {host}
        except OSError:
            return {host}
    return {host.strip("[]")}


def _conffile(admin: AdminConsole) -> Path:
    """The pgbouncer.ini the running PgBouncer read (``SHOW CONFIG``'s ``conffile``)."""
    conffile = admin.config().get("conffile")
    if conffile is None or not conffile.value:
        raise IniError("SHOW CONFIG names no conffile: pass the pgbouncer.ini path")
    return Path(conffile.value)


def _close_old(
    admin: AdminConsole,
    names: list[str],
    result: RepointResult,
    *,
    host: str,
    port: int,
    settle: float,
    log: Callable[[str], None],
) -> None:
    """RECONNECT each database of ``names`` with server connections to another address
    than ``host:port``; then count those left after up to ``settle`` seconds."""
    targets = _addresses(host, port)

    def old(database: str) -> int:
        return sum(
            1
            for s in admin.servers()
            if s.database == database and (s.addr not in targets or s.port != port)
        )

    for name in names:
        if count := old(name):
            admin.reconnect(name)
            result.reconnected.append(name)
            log(f"RECONNECT {name} ({count} server connection(s) on another address)")
    deadline = time.monotonic() + settle
    while True:  # idle servers close just after RECONNECT returns: give them a moment
        result.lingering = sum(old(name) for name in result.reconnected)
        if not result.lingering or time.monotonic() >= deadline:
            break
        time.sleep(0.05)


def _pause(
    admin: AdminConsole,
    names: list[str],
    result: RepointResult,
    *,
    timeout: float,
    log: Callable[[str], None],
) -> None:
    """PAUSE each database of ``names`` (each wait bounded by ``timeout`` seconds); one that
    does not pause in time is left running (logged), the repoint goes on without it."""
    for name in names:
        try:
            admin.pause(name, timeout=timeout)
        except PauseTimeout as ex:
            log(f"{ex}: repointing {name} without PAUSE")
            continue
        result.paused.append(name)
        log(f"PAUSE {name}")


def _resume(admin: AdminConsole, result: RepointResult, log: Callable[[str], None]) -> None:
    """RESUME every database :func:`_pause` paused (each tried, the first error raised)."""
    failed: AdminError | None = None
    for name in result.paused:
        try:
            admin.resume(name)
            log(f"RESUME {name}")
        except AdminError as ex:
            failed = failed or ex
    if failed is not None:
        raise failed


def _apply(
    admin: AdminConsole,
    result: RepointResult,
    *,
    host: str,
    port: int,
    databases: Iterable[str] | None,
    settle: float,
    pause: float | None,
    log: Callable[[str], None],
) -> list[str]:
    """The repoint proper, under the file lock; the names of the entries selected."""
    path = result.path
    text = read_text(path)
    new_text, entries = repoint_text(text, host, port, databases)
    if not entries:
        raise IniError(f"{path} has no [databases] entry with a TCP host: name them")
    result.entries = entries
    names = [e.name for e in entries]
    if pause is not None and _stale(admin, names, host, port):
        _pause(admin, names, result, timeout=pause, log=log)
    try:
        _rewrite_and_reload(admin, result, text, new_text, host=host, port=port, log=log)
    finally:
        _resume(admin, result, log)
    running = {row.name: row for row in admin.databases()}
    loaded = [n for n in names if n in running]
    if result.reloaded:
        _wait_served(admin, loaded, result, settle=settle, log=log)
    _close_old(admin, loaded, result, host=host, port=port, settle=settle, log=log)
    return names


def _wait_served(
    admin: AdminConsole,
    names: list[str],
    result: RepointResult,
    *,
    settle: float,
    log: Callable[[str], None],
) -> None:
    """Look at ``SHOW POOLS`` every 20 ms until no client of ``names`` waits for a server,
    for up to ``settle`` seconds; ``result.waiting`` counts those still waiting then.

    After failed server logins (the old node going away), PgBouncer opens the next server
    connection only once ``server_login_retry`` has passed *and* something wakes its event
    loop: with clients already queued and nothing else happening that is its maintenance
    timer, up to about a third of a second later. Each console command here is such an
    event, so the queued clients get a server on the new node as soon as PgBouncer allows.
    """
    wanted = set(names)
    start = time.monotonic()
    deadline = start + settle
    while True:
        result.waiting = sum(p.cl_waiting for p in admin.pools() if p.database in wanted)
        if not result.waiting or time.monotonic() >= deadline:
            break
        time.sleep(_SERVED_POLL)
    if result.waiting:
        log(f"{result.waiting} client(s) still waiting for a server after {settle:g} s")


def _stale(admin: AdminConsole, names: list[str], host: str, port: int) -> bool:
    """Whether a database of ``names`` runs pointed elsewhere than ``host:port``."""
    return any(
        row.name in names and (row.host, row.port) != (host, port) for row in admin.databases()
    )


def _rewrite_and_reload(
    admin: AdminConsole,
    result: RepointResult,
    text: str,
    new_text: str,
    *,
    host: str,
    port: int,
    log: Callable[[str], None],
) -> None:
    """Write the file when it changes, RELOAD when it changed or PgBouncer runs another
    address; :class:`RepointFailed` when ``SHOW DATABASES`` disagrees afterwards."""
    path = result.path
    entries = result.entries
    names = [e.name for e in entries]
    if new_text != text:
        write_atomically(path, new_text)
        result.file_changed = True
        moved = ", ".join(f"{e.name} {e.before}" for e in entries if e.changed)
        log(f"rewrote {path}: {moved} -> {host}:{port}")
    running = {row.name: row for row in admin.databases()}
    stale = [
        n for n in names if n in running and (running[n].host, running[n].port) != (host, port)
    ]
    if result.file_changed or stale:
        admin.reload()
        result.reloaded = True
        log("RELOAD")
        running = {row.name: row for row in admin.databases()}
    wrong = [
        f"{n} at {running[n].host}:{running[n].port}"
        for n in names
        if n in running and (running[n].host, running[n].port) != (host, port)
    ]
    if wrong:
        raise RepointFailed(
            f"after RELOAD, SHOW DATABASES still shows {', '.join(wrong)}, not {host}:{port}:"
            f" does PgBouncer read {path}?"
        )


def repoint(
    admin: AdminConsole,
    host: str,
    port: int,
    *,
    ini_path: str | Path | None = None,
    databases: Iterable[str] | None = None,
    log: Callable[[str], None] = lambda line: None,
    settle: float = 1.0,
    lock_timeout: float = 30.0,
    pause: float | None = None,
) -> RepointResult:
    """Point the ``[databases]`` entries of PgBouncer at ``host:port``.

    ``ini_path`` is the pgbouncer.ini to rewrite; None reads it from ``SHOW CONFIG``'s
    ``conffile`` (so this must run where that file is). ``databases`` selects entries by
    name; None selects every entry with a TCP host. ``log`` receives one line per action.
    ``settle`` is how long, in seconds, to wait for server connections on the old node to
    close after ``RECONNECT`` before counting the ones that stay (``lingering``; 0: count at
    once), and after a ``RELOAD`` for the clients queued for a server to get one
    (``waiting``; polling ``SHOW POOLS``, which also prompts PgBouncer to connect them).
    ``pause``: None (the default) rewrites and reloads while clients keep running; a number
    of seconds first sends ``PAUSE`` for each selected database when PgBouncer runs one
    pointed elsewhere (clients then wait instead of reaching the old node), and ``RESUME``
    after the ``RELOAD``, even on error; a database whose ``PAUSE`` does not complete within
    that many seconds (its clients hold server connections) is repointed without it.
    Concurrent repoints of one file on one machine take turns (an exclusive ``flock`` on the
    file, waited for up to ``lock_timeout`` seconds): the second finds the work done and
    changes nothing.
    Raises :class:`IniError` (file unreadable, unwritable, no entry selected),
    :class:`AdminError` (a console command failed) or :class:`RepointFailed`.
    """
    path = Path(ini_path) if ini_path is not None else _conffile(admin)
    result = RepointResult(f"{host}:{port}", path)
    with file_lock(path, timeout=lock_timeout):
        names = _apply(
            admin,
            result,
            host=host,
            port=port,
            databases=databases,
            settle=settle,
            pause=pause,
            log=log,
        )
    if not result.changed:
        log(f"already pointing {', '.join(names)} at {host}:{port}: nothing changed")
    else:
        log(f"SHOW DATABASES: {', '.join(names)} at {host}:{port}")
    if result.lingering:
        log(
            f"{result.lingering} server connection(s) still on the old node, marked "
            "close_needed: each closes when its client releases it (session pooling: at "
            "disconnect, or at the end of its transaction with server_fast_close = 1)"
        )
    return result
