"""Bad pool arguments never carry a password into an exception, its chain or its repr."""

from __future__ import annotations

from typing import Any

import pytest

import pgfailover

SECRET = "s3cret-Pa55w0rd"


def _chain(ex: BaseException | None) -> str:
    parts: list[str] = []
    seen: set[int] = set()
    while ex is not None and id(ex) not in seen:  # a chain may loop
        seen.add(id(ex))
        parts += [str(ex), repr(ex), *getattr(ex, "__notes__", [])]
        ex = ex.__cause__ or ex.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("pool_class", [pgfailover.ConnectionPool, pgfailover.AsyncConnectionPool])
def test_an_unparsable_url_raises_without_the_password_anywhere_in_the_chain(
    pool_class: Any,
) -> None:
    """InvalidConninfo is raised outside the parser's handler: psycopg's error, which
    quotes the whole URL, is not reachable as its context either."""
    with pytest.raises(pgfailover.InvalidConninfo) as info:
        pool_class(f"postgresql://app:{SECRET}@[db1/app", open=False)
    assert SECRET not in _chain(info.value)
    assert info.value.__context__ is None


@pytest.mark.parametrize("pool_class", [pgfailover.ConnectionPool, pgfailover.AsyncConnectionPool])
def test_a_conninfo_given_as_connection_class_is_named_by_type_only(pool_class: Any) -> None:
    """A DSN passed by mistake as ``connection_class`` is a TypeError that says what was
    given (a str) without echoing it."""
    with pytest.raises(TypeError, match="got a str") as info:
        pool_class("dbname=app", connection_class=f"password={SECRET}", open=False)
    assert SECRET not in _chain(info.value)
