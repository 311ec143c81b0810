"""A connection string that cannot be parsed: a typed error that never shows the password."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgfailover
from pgfailover.errors import InvalidConninfo

MALFORMED = [
    "postgresql://app:{pw}@[bad/db",
    "postgresql://app:{pw}@db/app?bogus=1",
    "host=db password='{pw}",
    "host=db password={pw} bogus_option=1",
]


@pytest.mark.parametrize("template", MALFORMED)
@pytest.mark.parametrize("pool_class", ["ConnectionPool", "AsyncConnectionPool"])
def test_a_malformed_conninfo_raises_invalid_conninfo_without_the_password(
    template: str, pool_class: str
) -> None:
    """The pools' constructors raise InvalidConninfo (a psycopg.ProgrammingError and a
    ValueError) saying what is wrong, and neither the message nor the repr holds the
    password."""
    password = "s3cret-Pa55"
    conninfo = template.format(pw=password)
    with pytest.raises(InvalidConninfo) as info:
        getattr(pgfailover, pool_class)(conninfo, open=False)
    assert isinstance(info.value, psycopg.ProgrammingError)
    assert isinstance(info.value, ValueError)
    assert "cannot parse the connection string" in str(info.value)
    assert password not in str(info.value)
    assert password not in repr(info.value)


@given(
    password=st.text(
        alphabet=st.characters(
            min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="'\\@/?#[]:&=%"
        ),
        min_size=4,
        max_size=20,
    ),
    template=st.sampled_from(MALFORMED),
)
def test_no_password_survives_in_the_constructors_error(password: str, template: str) -> None:
    """Whatever the password's characters, a malformed conninfo's error does not show it."""
    conninfo = template.format(pw=password)
    with pytest.raises(InvalidConninfo) as info:
        pgfailover.ConnectionPool(conninfo, open=False)
    assert password not in str(info.value)
