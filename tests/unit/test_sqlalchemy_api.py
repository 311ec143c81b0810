"""pgfailover.sqlalchemy.instrument: idempotent, removable, clear errors (no server needed)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

import pgfailover.sqlalchemy as pgsa

URL = "postgresql+psycopg://app:secret@127.0.0.1:1/app"  # never connected to


def _listeners(engine: sa.Engine) -> int:
    return sum(
        len(getattr(target.dispatch, name))
        for target, name in (
            (engine.dialect, "handle_error"),
            (engine.dialect, "do_connect"),
            (engine.pool, "checkout"),
            (engine.pool, "checkin"),
        )
    )


def test_instrument_twice_returns_the_same_instrumentation_without_doubling_listeners() -> None:
    """A second instrument() call with the same options changes nothing."""
    engine = sa.create_engine(URL)
    first = pgsa.instrument(engine)
    count = _listeners(engine)
    assert count == 3
    assert pgsa.instrument(engine) is first
    assert _listeners(engine) == count
    assert pgsa.instrumentation_of(engine) is first


def test_remove_takes_every_listener_away_and_allows_instrumenting_again() -> None:
    """remove() (or uninstrument()) leaves the engine as it was; instrument() works again."""
    engine = sa.create_engine(URL)
    before = _listeners(engine)
    instrumentation = pgsa.instrument(engine)
    instrumentation.remove()
    assert _listeners(engine) == before
    assert not instrumentation.installed
    assert pgsa.instrumentation_of(engine) is None
    instrumentation.remove()  # idempotent
    again = pgsa.instrument(engine, recheck_interval=None)
    assert again is not instrumentation
    assert pgsa.uninstrument(engine) is True
    assert pgsa.uninstrument(engine) is False
    assert _listeners(engine) == before


def test_remove_after_dispose_still_removes_the_pool_listeners() -> None:
    """engine.dispose() replaces the pool (listeners are copied over); removal still works."""
    engine = sa.create_engine(URL)
    before = _listeners(engine)
    pgsa.instrument(engine)
    engine.dispose()
    assert pgsa.uninstrument(engine)
    assert _listeners(engine) == before


def test_instrument_with_other_options_asks_to_remove_first() -> None:
    """Instrumenting again with different options is a clear ValueError, not a silent merge."""
    engine = sa.create_engine(URL)
    pgsa.instrument(engine, recheck_interval=5)
    with pytest.raises(ValueError, match="uninstrument"):
        pgsa.instrument(engine, recheck_interval=1)


def test_async_engine_is_instrumented_through_its_sync_engine() -> None:
    """An AsyncEngine is accepted; its sync_engine carries the listeners."""
    engine = create_async_engine(URL)
    instrumentation = pgsa.instrument(engine)
    assert pgsa.instrumentation_of(engine.sync_engine) is instrumentation
    assert _listeners(engine.sync_engine) == 3
    assert pgsa.uninstrument(engine)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recheck_interval": -1}, "recheck_interval"),
        ({"timeout": -0.5}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
    ],
)
def test_bad_options_are_rejected_with_the_parameter_named(
    kwargs: dict[str, object], message: str
) -> None:
    """Negative or NaN durations raise ValueError naming the parameter (a non-number is a
    TypeError: see test_options_of_the_wrong_type_or_range_name_the_option)."""
    engine = sa.create_engine(URL)
    with pytest.raises(ValueError, match=message):
        pgsa.instrument(engine, **kwargs)  # type: ignore[arg-type]
    assert pgsa.instrumentation_of(engine) is None


def test_non_postgresql_engine_is_rejected() -> None:
    """Only PostgreSQL engines can be instrumented."""
    with pytest.raises(ValueError, match="PostgreSQL"):
        pgsa.instrument(sa.create_engine("sqlite://"))
    with pytest.raises(TypeError, match="Engine"):
        pgsa.instrument("postgresql://")  # type: ignore[arg-type]


def test_default_timeout_follows_the_pool() -> None:
    """Without timeout=, new connections wait as long as the pool's own checkout timeout."""
    assert pgsa.instrument(sa.create_engine(URL, pool_timeout=7)).options.timeout == 7.0
    assert pgsa.instrument(sa.create_engine(URL, poolclass=sa.NullPool)).options.timeout == 30.0


def test_listeners_are_sqlalchemy_listeners() -> None:
    """The handle_error hook is registered on the engine as an ordinary event listener."""
    engine = sa.create_engine(URL)
    instrumentation = pgsa.instrument(engine)
    assert event.contains(engine, "handle_error", instrumentation._on_error)


def test_an_option_engine_resolves_to_its_base_engine_and_adds_no_listener() -> None:
    """``engine.execution_options(...)`` shares the engine's pool: instrumenting it after
    (or before) the engine returns the one instrumentation, with one set of listeners."""
    engine = sa.create_engine(URL)
    first = pgsa.instrument(engine)
    count = _listeners(engine)
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    assert type(serializable) is not sa.Engine
    assert pgsa.instrument(serializable) is first
    assert _listeners(engine) == count
    assert pgsa.instrumentation_of(serializable) is first
    other = sa.create_engine(URL)
    via_options = pgsa.instrument(other.execution_options(postgresql_readonly=True))
    assert pgsa.instrument(other) is via_options
    assert pgsa.uninstrument(other.execution_options(isolation_level="AUTOCOMMIT"))
    assert _listeners(other) == 0


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("recheck_interval", "5", TypeError, "recheck_interval must be a number of seconds"),
        ("timeout", "30", TypeError, "timeout must be a number of seconds"),
        ("recheck_interval", -1, ValueError, "recheck_interval must be a number of seconds >= 0"),
        ("pooler", "yes", TypeError, "pooler must be True, False or None"),
    ],
)
def test_options_of_the_wrong_type_or_range_name_the_option(
    option: str, value: object, error: type[Exception], message: str
) -> None:
    """A wrong type or value raises TypeError/ValueError naming the option and what it takes."""
    engine = sa.create_engine(URL)
    with pytest.raises(error, match=message):
        pgsa.instrument(engine, **{option: value})  # type: ignore[arg-type]
    assert pgsa.instrumentation_of(engine) is None
