"""pgbouncer.ini as PgBouncer reads it, and the one rewrite ``repoint`` makes. No I/O but
:func:`load_ini`'s reading of files.

PgBouncer's format (libusual's ``cfparser``): ``[section]`` lines, ``key = value`` lines,
comments starting with ``;`` or ``#``, and ``%include PATH`` lines that read another file in
place. Keys are case-insensitive. A ``[databases]`` value is a libpq-like connection string
(``host=db1 port=5432 dbname=app pool_mode=transaction connect_query='...'``; a value may be
single-quoted, ``''`` or ``\\'`` standing for a quote).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: How deep ``%include`` may nest before the file is refused (PgBouncer's own limit is 10).
MAX_INCLUDE_DEPTH = 10

_SECTION_RE = re.compile(r"^\s*\[\s*([^\]]*?)\s*\]\s*$")
_ENTRY_RE = re.compile(
    r'^(\s*)("(?:[^"]|"")*"|[^=\s]+)(\s*=[ \t]*)(.*?)([ \t]*)(\r?\n)?$', re.DOTALL
)
_INCLUDE_RE = re.compile(r"^\s*%include\s+(.+?)\s*$")
_PAIR_RE = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.|'')*'|[^\s']*)""")


class IniError(ValueError):
    """The configuration cannot be read: a file missing or unreadable, a line PgBouncer
    would refuse, an ``%include`` loop. The message names the file and line."""


@dataclass(frozen=True)
class DatabaseEntry:
    """One ``[databases]`` line: ``name`` (unquoted), ``params`` (the connection string's
    keys, lowercased, values unquoted), and where it was read (``path``, 1-based ``line``)."""

    name: str
    params: Mapping[str, str]
    path: Path | None = None
    line: int = 0

    @property
    def host(self) -> str | None:
        """``host=`` as written (a name, an address, a socket directory, or a list), or None
        when absent (PgBouncer then uses its Unix socket default)."""
        return self.params.get("host")

    @property
    def port(self) -> int:
        """``port=`` as a number (5432 when absent or not a number: PgBouncer's default)."""
        try:
            return int(self.params.get("port", "5432"))
        except ValueError:
            return 5432


@dataclass(frozen=True)
class IniConfig:
    """A parsed configuration: ``settings`` of ``[pgbouncer]`` (lowercased keys, values as
    written), ``databases`` in file order, ``user_pool_modes`` (the ``pool_mode=`` of every
    ``[users]`` line that has one) and ``files`` (every file read, includes after their
    includer). A setting absent here has PgBouncer's default."""

    settings: Mapping[str, str] = field(default_factory=dict)
    databases: tuple[DatabaseEntry, ...] = ()
    user_pool_modes: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()


def _pairs(text: str) -> Iterator[re.Match[str]]:
    """The ``key=value`` pairs of a connection string in order (a quoted value is one value,
    whatever it holds). Raises :class:`ValueError` for text that is not such pairs."""
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        match = _PAIR_RE.match(text, pos)
        if match is None or (match.end() < len(text) and not text[match.end()].isspace()):
            raise ValueError(f"expected key=value at {text[pos : pos + 20]!r}")
        yield match
        pos = match.end()


def parse_connstr(text: str) -> dict[str, str]:
    """The ``key=value`` pairs of a ``[databases]`` connection string, keys lowercased and
    values unquoted. Raises :class:`ValueError` for text that is not such pairs."""
    return {m.group(1).lower(): _unquote(m.group(2)) for m in _pairs(text)}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == "'" and value[-1] == "'":
        inner = value[1:-1]
        return re.sub(r"''|\\(.)", lambda m: m.group(1) or "'", inner)
    return value


def _db_name(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        return raw[1:-1].replace('""', '"')
    return raw


def parse_ini(
    text: str,
    *,
    path: Path | None = None,
    read: Callable[[Path], str] | None = None,
    _depth: int = 0,
) -> IniConfig:
    """Parse pgbouncer.ini ``text``. ``path`` names the file in errors and is the base of a
    relative ``%include`` (PgBouncer itself opens it from its working directory, which is
    usually the file's); ``read`` returns an included file's text (None: ``%include`` is
    refused). Raises :class:`IniError` for a line that is neither a section, an entry, a
    comment nor an include, and for a ``[databases]`` value that is not ``key=value``
    pairs."""
    where = str(path) if path is not None else "<text>"
    settings: dict[str, str] = {}
    databases: dict[str, DatabaseEntry] = {}
    user_modes: list[str] = []
    files: list[Path] = [path] if path is not None else []
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        include = _INCLUDE_RE.match(line)
        if include:
            sub = _include(include.group(1), path, read, _depth, f"{where}:{number}")
            settings.update(sub.settings)
            for db in sub.databases:
                databases.pop(db.name, None)
                databases[db.name] = db
            user_modes.extend(sub.user_pool_modes)
            files.extend(sub.files)
            continue
        heading = _SECTION_RE.match(line)
        if heading:
            section = heading.group(1).lower()
            continue
        entry = _ENTRY_RE.match(line)
        if entry is None:
            raise IniError(f"{where}:{number}: expected 'key = value', [section] or a comment")
        key, value = entry.group(2), entry.group(4)
        if section == "pgbouncer":
            settings[key.lower()] = value
        elif section in ("databases", "users"):
            try:
                params = parse_connstr(value)
            except ValueError as ex:
                raise IniError(f"{where}:{number}: {section[:-1]} {key}: {ex}") from None
            if section == "users":
                user_modes.extend([params["pool_mode"].lower()] if "pool_mode" in params else [])
                continue
            name = _db_name(key)
            databases.pop(name, None)
            databases[name] = DatabaseEntry(name, params, path, number)
    return IniConfig(settings, tuple(databases.values()), tuple(user_modes), tuple(files))


def _include(
    raw: str,
    path: Path | None,
    read: Callable[[Path], str] | None,
    depth: int,
    where: str,
) -> IniConfig:
    """The configuration of an ``%include`` line's file."""
    if read is None:
        raise IniError(f"{where}: %include is not supported here")
    if depth >= MAX_INCLUDE_DEPTH:
        raise IniError(f"{where}: %include nested deeper than {MAX_INCLUDE_DEPTH}")
    target = Path(raw)
    if not target.is_absolute() and path is not None:
        target = path.parent / target
    return parse_ini(read(target), path=target, read=read, _depth=depth + 1)


def read_text(path: Path) -> str:
    """A configuration file's text; :class:`IniError` (naming the file and why) when it
    cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as ex:
        reason = ex.strerror if isinstance(ex, OSError) and ex.strerror else str(ex)
        raise IniError(f"cannot read {path}: {reason}") from None


def load_ini(path: str | Path) -> IniConfig:
    """Read and parse the pgbouncer.ini at ``path``, following ``%include`` lines.
    Raises :class:`IniError`."""
    path = Path(path)
    return parse_ini(read_text(path), path=path, read=read_text)


# ---------------------------------------------------------------------- the repoint rewrite
@dataclass(frozen=True)
class Repointed:
    """One ``[databases]`` entry ``name`` that :func:`repoint_text` moved (``line``, 1-based)
    from ``before`` (``host:port`` as it was) to the new address; ``changed`` is False when
    it already pointed there."""

    name: str
    line: int
    before: str
    changed: bool


def quote_value(value: str) -> str:
    """``value`` as a connection string writes it: bare when it can be, else quoted (a
    quote doubled, a backslash escaped)."""
    if re.fullmatch(r"[^\s'\\]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def repoint_text(
    text: str, host: str, port: int, names: Iterable[str] | None = None
) -> tuple[str, list[Repointed]]:
    """``text`` (a pgbouncer.ini) with the ``host=`` and ``port=`` of its ``[databases]``
    entries set to ``host``/``port``, and what was done to each entry.

    ``names`` selects entries by database name (``*`` is the fallback entry); None selects
    every entry with a TCP ``host=`` (one not starting with ``/``: entries reaching a local
    Unix socket, or with no host, are left alone). Every other byte is kept: comments, other
    sections, other keys of a rewritten line and line endings. A missing ``port=`` is added
    after ``host=`` unless ``port`` is 5432. Raises :class:`IniError` when a selected name has
    no entry in ``text`` (an entry only in an included file cannot be rewritten here).
    """
    wanted = None if names is None else set(names)
    lines = text.splitlines(keepends=True)
    section = ""
    done: list[Repointed] = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#%":
            continue
        heading = _SECTION_RE.match(line)
        if heading:
            section = heading.group(1).lower()
            continue
        if section != "databases":
            continue
        entry = _ENTRY_RE.match(line)
        if entry is None:
            raise IniError(f"line {index + 1}: expected 'key = value', [section] or a comment")
        name = _db_name(entry.group(2))
        try:
            params = parse_connstr(entry.group(4))
        except ValueError as ex:
            raise IniError(f"line {index + 1}: database {name}: {ex}") from None
        current_host = params.get("host")
        if not _selected(name, current_host, wanted):
            continue
        before_port = params.get("port", "5432")
        before = f"{current_host or '(socket)'}:{before_port}"
        if current_host == host and before_port == str(port):
            done.append(Repointed(name, index + 1, before, changed=False))
            continue
        connstr = _set_pair(entry.group(4), "host", quote_value(host), after=None)
        if "port" in params or port != 5432:
            connstr = _set_pair(connstr, "port", str(port), after="host")
        lines[index] = (
            entry.group(1)
            + entry.group(2)
            + entry.group(3)
            + connstr
            + entry.group(5)
            + (entry.group(6) or "")
        )
        done.append(Repointed(name, index + 1, before, changed=True))
    if wanted is not None:
        missing = sorted(wanted - {r.name for r in done})
        if missing:
            raise IniError(
                "no [databases] entry in this file for "
                + ", ".join(missing)
                + " (entries in an %include file are not rewritten: pass that file)"
            )
    return "".join(lines), done


def _selected(name: str, host: str | None, wanted: set[str] | None) -> bool:
    """Whether ``repoint_text`` rewrites entry ``name`` (``host`` as written)."""
    if wanted is None:
        return bool(host) and not (host or "").startswith("/")
    return name in wanted


def _set_pair(connstr: str, key: str, value: str, *, after: str | None) -> str:
    """``connstr`` with ``key``'s value replaced, or ``key=value`` inserted after the pair
    ``after`` (at the start when None or absent)."""
    pairs = list(_pairs(connstr))
    for match in pairs:
        if match.group(1).lower() == key:
            return connstr[: match.start(2)] + value + connstr[match.end(2) :]
    if after is not None:
        for match in pairs:
            if match.group(1).lower() == after:
                return connstr[: match.end()] + f" {key}={value}" + connstr[match.end() :]
    return f"{key}={value} " + connstr if connstr else f"{key}={value}"
