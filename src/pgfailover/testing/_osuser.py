"""Run servers as an unprivileged OS user when the harness itself runs as root.

PostgreSQL and PgBouncer refuse to run as root. As root, the harness runs every server
program through ``setpriv`` as a dedicated system user, created once and reused.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import HarnessError

DEFAULT_OS_USER = "pgfailover"


@dataclass(frozen=True)
class OsUser:
    """The identity server programs run as."""

    name: str
    uid: int
    gid: int

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs as this user (``setpriv`` execs: the PID is kept)."""
        if self.uid == os.geteuid():
            return list(argv)
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            *argv,
        ]

    def own(self, path: Path) -> None:
        """Give ``path`` to this user (no-op when it is the current user)."""
        if self.uid != os.geteuid():
            os.chown(path, self.uid, self.gid)


def server_user(name: str | None = None) -> OsUser:
    """The user servers run as.

    Not root: the current user. Root: ``name``, else ``$PGFAILOVER_OS_USER``, else
    ``pgfailover``, created as a system user with no login shell if it does not exist.
    """
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    name = name or os.environ.get("PGFAILOVER_OS_USER") or DEFAULT_OS_USER
    if name == "root":
        raise HarnessError("PostgreSQL refuses to run as root: choose another PGFAILOVER_OS_USER")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        result = subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:  # another worker may have created it at the same moment
            entry = pwd.getpwnam(name)
        except KeyError:
            raise HarnessError(
                f"cannot create the OS user {name!r} to run PostgreSQL: {result.stderr.strip()}"
            ) from None
    return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
