"""pgbouncer.ini parsing and the repoint rewrite, without servers: sections, comments,
quoting, ``%include``, errors, and a rewrite that keeps every other byte."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgfailover.pgbouncer.ini import (
    IniError,
    load_ini,
    parse_connstr,
    parse_ini,
    quote_value,
    repoint_text,
)
from pgfailover.pgbouncer.repoint import file_lock, write_atomically

SAMPLE = """\
; PgBouncer for app
[databases]
app = host=10.0.0.1 port=5432 dbname=app{TRAILING}
my_db = host=db1.example.com dbname=x connect_query='SET search_path = ''a b'''
local = dbname=app
* = host=10.0.0.1

[users]
batch = pool_mode=session

[pgbouncer]
Pool_Mode = transaction
listen_port=6432
# done
""".replace("{TRAILING}", "   ")


def test_parse_sections_settings_and_databases() -> None:
    """Settings keys are lowercased; connection-string values unquoted (doubled quotes
    undone); [users] pool modes collected; line numbers kept. (PgBouncer 1.18 has no
    inline comments: a value runs to the end of its line.)"""
    ini = parse_ini(SAMPLE)
    assert ini.settings == {"pool_mode": "transaction", "listen_port": "6432"}
    names = [db.name for db in ini.databases]
    assert names == ["app", "my_db", "local", "*"]
    my = ini.databases[1]
    assert my.params["connect_query"] == "SET search_path = 'a b'"
    assert (my.host, my.port, my.line) == ("db1.example.com", 5432, 4)
    assert ini.databases[2].host is None
    assert ini.user_pool_modes == ("session",)


def test_parse_refuses_garbage_with_the_line_number() -> None:
    """A line that is not a section, entry, comment or include is an IniError naming it."""
    with pytest.raises(IniError, match=r"<text>:2: expected"):
        parse_ini("[pgbouncer]\nthis is not a setting\n")
    with pytest.raises(IniError, match=r"<text>:2: database app"):
        parse_ini("[databases]\napp = host='unterminated\n")


def test_include_is_followed_relative_to_the_file(tmp_path: Path) -> None:
    """%include reads another file in place (relative paths from the including file's
    directory); its settings override earlier ones; an include loop is refused."""
    (tmp_path / "extra.ini").write_text("[pgbouncer]\nserver_login_retry = 1\n")
    main = tmp_path / "pgbouncer.ini"
    main.write_text("[pgbouncer]\nserver_login_retry = 15\n%include extra.ini\n")
    ini = load_ini(main)
    assert ini.settings["server_login_retry"] == "1"
    assert ini.files == (main, tmp_path / "extra.ini")
    (tmp_path / "loop.ini").write_text("%include loop.ini\n")
    with pytest.raises(IniError, match="nested deeper"):
        load_ini(tmp_path / "loop.ini")
    with pytest.raises(IniError, match="not supported"):
        parse_ini("%include x.ini\n")


def test_unreadable_file_is_an_ini_error(tmp_path: Path) -> None:
    """A missing file and a non-UTF-8 file are IniErrors naming the path."""
    with pytest.raises(IniError, match=r"cannot read .*missing\.ini"):
        load_ini(tmp_path / "missing.ini")
    bad = tmp_path / "bad.ini"
    bad.write_bytes(b"\xff\xfe[")
    with pytest.raises(IniError, match=r"bad\.ini"):
        load_ini(bad)


def test_repoint_rewrites_only_host_and_port() -> None:
    """Repointing changes the host and port of entries with a TCP host, adds a missing
    port, leaves socket/hostless entries, comments, quoting, trailing blanks and other keys
    byte for byte."""
    text, done = repoint_text(SAMPLE, "10.0.0.9", 5433)
    assert [(r.name, r.changed) for r in done] == [("app", True), ("my_db", True), ("*", True)]
    lines = text.splitlines()
    assert lines[2] == "app = host=10.0.0.9 port=5433 dbname=app   "
    assert lines[3] == (
        "my_db = host=10.0.0.9 port=5433 dbname=x connect_query='SET search_path = ''a b'''"
    )
    assert lines[4] == "local = dbname=app"
    assert lines[5] == "* = host=10.0.0.9 port=5433"
    untouched = [i for i in range(len(lines)) if i not in (2, 3, 5)]
    before = SAMPLE.splitlines()
    assert [lines[i] for i in untouched] == [before[i] for i in untouched]


def test_repoint_is_idempotent_and_names_select() -> None:
    """A second repoint to the same place changes nothing and says so; --database names
    select entries, a hostless one included; an unknown name is an IniError."""
    once, _ = repoint_text(SAMPLE, "10.0.0.9", 5433)
    twice, done = repoint_text(once, "10.0.0.9", 5433)
    assert twice == once
    assert not any(r.changed for r in done)
    text, done = repoint_text(SAMPLE, "10.0.0.9", 5432, ["local"])
    assert [r.name for r in done] == ["local"]
    assert "local = host=10.0.0.9 dbname=app" in text
    with pytest.raises(IniError, match="nope"):
        repoint_text(SAMPLE, "h", 1, ["nope"])


def test_repoint_keeps_crlf_line_endings() -> None:
    """Windows line endings survive the rewrite."""
    text = "[databases]\r\napp = host=a port=1\r\n[pgbouncer]\r\n"
    new, _ = repoint_text(text, "b", 2)
    assert new == "[databases]\r\napp = host=b port=2\r\n[pgbouncer]\r\n"


_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=0, max_size=20
)


@settings(deadline=None)  # pure and fast, but the test machine may be loaded
@given(_values)
def test_quote_value_round_trips(value: str) -> None:
    """Any value quoted by quote_value parses back to itself."""
    assert parse_connstr(f"host=x connect_query={quote_value(value)}")["connect_query"] == value


_comment = st.text(alphabet="abc ;#=[]'", max_size=15).map(lambda s: "; " + s)


@settings(deadline=None)  # pure and fast, but the test machine may be loaded
@given(
    st.lists(_comment, max_size=4),
    st.lists(st.sampled_from(["10.0.0.1", "db.example.com", "h1,h2"]), min_size=1, max_size=3),
    st.integers(min_value=1, max_value=65535),
)
def test_repoint_changes_only_database_lines(
    comments: list[str], hosts: list[str], port: int
) -> None:
    """Whatever the file holds, a repoint changes only [databases] entry lines, every entry
    with a TCP host then points at the target, and a second repoint changes nothing."""
    entries = [f"db{i} = host={h} port=5432 dbname=db{i}" for i, h in enumerate(hosts)]
    text = "\n".join([*comments, "[databases]", *entries, *comments, "[pgbouncer]", "x = 1"]) + "\n"
    new, done = repoint_text(text, "10.9.9.9", port)
    old_lines, new_lines = text.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = {i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b}
    assert changed == {r.line - 1 for r in done}
    for db in parse_ini(new).databases:
        assert (db.host, db.port) == ("10.9.9.9", port)
    assert repoint_text(new, "10.9.9.9", port)[0] == new


def test_write_atomically_keeps_the_mode(tmp_path: Path) -> None:
    """The rewritten file has the old one's permission bits and no temporary file is left."""
    path = tmp_path / "pgbouncer.ini"
    path.write_text("old\n")
    os.chmod(path, 0o640)
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgbouncer.ini"]
    with pytest.raises(IniError, match="cannot write"):
        write_atomically(tmp_path / "missing" / "x.ini", "new\n")


def test_file_lock_serializes_and_follows_a_renamed_file(tmp_path: Path) -> None:
    """A second holder waits for the first (and gives up with an IniError after its
    timeout); a waiter gets the lock once the first lets go and, whether it opened the file
    before or after the file was renamed over, holds it on the new file."""
    path = tmp_path / "pgbouncer.ini"
    path.write_text("old\n")
    order: list[str] = []
    with file_lock(path, timeout=1):
        with (
            pytest.raises(IniError, match="locked by another repoint"),
            file_lock(path, timeout=0.1),
        ):
            pass  # pragma: no cover - never acquired
        started = threading.Event()

        def waiter() -> None:
            started.set()
            with file_lock(path, timeout=10):
                order.append(path.read_text())

        thread = threading.Thread(target=waiter)
        thread.start()
        started.wait(5)
        write_atomically(path, "new\n")  # the waiter's inode is no longer the file
        order.append("renamed")
    thread.join(10)
    assert order == ["renamed", "new\n"]
