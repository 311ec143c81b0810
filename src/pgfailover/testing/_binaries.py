"""Locate the PostgreSQL server binaries and PgBouncer on this machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BinariesNotFound

#: Programs the harness runs from the PostgreSQL bindir.
PG_PROGRAMS = ("initdb", "postgres", "pg_basebackup", "pg_rewind", "pg_controldata")


@dataclass(frozen=True)
class PostgresBinaries:
    """A PostgreSQL bindir that holds every program the harness needs."""

    bindir: Path
    major: int

    def path(self, program: str) -> str:
        """Absolute path of ``program`` in this bindir."""
        return str(self.bindir / program)


def _major_version(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if match is None:
        raise BinariesNotFound(f"cannot read the version of {bindir / 'postgres'}: {out!r}")
    return int(match.group(1))


def _debian_bindirs() -> list[Path]:
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return []
    versions = [p for p in root.iterdir() if p.name.isdigit() and (p / "bin").is_dir()]
    return [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip())


def find_postgres(bindir: str | os.PathLike[str] | None = None) -> PostgresBinaries:
    """Find a PostgreSQL bindir.

    Looks, in order, at ``bindir``, ``$PGFAILOVER_PG_BINDIR``, ``pg_config --bindir``, the
    directory of ``initdb`` on ``PATH``, then ``/usr/lib/postgresql/*/bin`` newest first.
    An explicit ``bindir`` or environment variable that lacks a program is an error rather
    than silently skipped, so a typo is reported instead of hidden.
    """
    explicit = bindir or os.environ.get("PGFAILOVER_PG_BINDIR")
    if explicit:
        path = Path(explicit)
        missing = [p for p in PG_PROGRAMS if not (path / p).exists()]
        if missing:
            raise BinariesNotFound(
                f"PostgreSQL bindir {path} lacks {', '.join(missing)}: point "
                "PGFAILOVER_PG_BINDIR (or --pg-bindir) at a directory holding the server programs"
            )
        return PostgresBinaries(path, _major_version(path))

    candidates: list[Path] = []
    from_config = _pg_config_bindir()
    if from_config is not None:
        candidates.append(from_config)
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    candidates.extend(_debian_bindirs())
    for path in candidates:
        if all((path / p).exists() for p in PG_PROGRAMS):
            return PostgresBinaries(path, _major_version(path))
    tried = ", ".join(str(c) for c in candidates) or "nothing"
    raise BinariesNotFound(
        f"no PostgreSQL server binaries found (tried {tried}): install them "
        "(Debian: apt-get install postgresql) or set PGFAILOVER_PG_BINDIR"
    )


def find_pgbouncer(path: str | os.PathLike[str] | None = None) -> Path:
    """Find the ``pgbouncer`` program: ``path``, ``$PGFAILOVER_PGBOUNCER``, ``PATH``, /usr/sbin."""
    explicit = path or os.environ.get("PGFAILOVER_PGBOUNCER")
    if explicit:
        if not Path(explicit).is_file():
            raise BinariesNotFound(f"PgBouncer program {explicit} does not exist")
        return Path(explicit)
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None
    )
    if found is None:
        raise BinariesNotFound(
            "pgbouncer not found: install it (Debian: apt-get install pgbouncer) or set "
            "PGFAILOVER_PGBOUNCER"
        )
    return Path(found)
