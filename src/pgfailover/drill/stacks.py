"""The application stacks the drill writes through: naive ones and pgfailover's.

Every stack is built the way an application would build it, from the same endpoint, and
writes one row per operation (``INSERT INTO <table> (k, stack) VALUES (key, name)``): a
plain ``psycopg_pool`` pool, a SQLAlchemy engine with ``pool_pre_ping``, pgfailover's pool,
an instrumented engine, and both of those under the retry runner. The drill's workers call
:meth:`Stack.write` and record what the application saw; nothing here hides an error.

Two Django stacks run only when ``--stacks`` names them (:data:`OPTIONAL_STACKS`; they need
Django): Django's stock PostgreSQL backend and ``pgfailover.django`` under
``pgfailover.django.atomic``'s runner, both with persistent connections and health checks
(``CONN_MAX_AGE`` 600, ``CONN_HEALTH_CHECKS``), each write a request's worth of Django:
the end-of-request check, the write through Django's cursor, the end-of-request check.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
import sqlalchemy as sa

from ..errors import CommitOutcomeUnknown
from ..pool import ConnectionPool
from ..retry import TransactionRunner
from ..sqlalchemy import instrument
from ..topology import PatroniTopology

logger = logging.getLogger("pgfailover.drill")

#: How long a stack waits for a pooled connection before the operation fails (seconds):
#: short, so that a stuck pool shows up as failures instead of one endless operation.
POOL_TIMEOUT = 2.0
#: The retry runner's deadline per operation (seconds).
RUNNER_TIMEOUT = 20.0


@dataclass(frozen=True)
class Endpoint:
    """Where the stacks connect: a libpq conninfo and the same as a SQLAlchemy URL.

    ``hosts`` is a list of ``(host, port)``: one for PgBouncer, several for a direct
    multi-host DSN (libpq tries them in order). ``session_attrs``: libpq's
    ``target_session_attrs`` for that conninfo (e.g. ``read-write``, what Patroni's docs
    recommend), None to leave it out. ``patroni_urls``: Patroni REST API base URLs; when
    given, pgfailover's pools connect through :class:`~pgfailover.PatroniTopology` over them
    (their conninfo then carries no host or port); the other stacks use ``hosts``.
    """

    hosts: Sequence[tuple[str, int]]
    dbname: str
    user: str
    password: str = field(repr=False)  # never in a repr or log line
    #: False behind PgBouncer in transaction mode (before 1.21 it cannot keep prepared
    #: statements: a client meets another server connection each transaction).
    prepare: bool = True
    session_attrs: str | None = None
    patroni_urls: tuple[str, ...] = ()

    def connect_kwargs(self) -> dict[str, Any]:
        """psycopg connection arguments every stack uses."""
        return {} if self.prepare else {"prepare_threshold": None}

    def conninfo(self) -> str:
        """The libpq conninfo (contains the password: never log it)."""
        extra = {"target_session_attrs": self.session_attrs} if self.session_attrs else {}
        return psycopg.conninfo.make_conninfo(
            host=",".join(h for h, _ in self.hosts),
            port=",".join(str(p) for _, p in self.hosts),
            dbname=self.dbname,
            user=self.user,
            password=self.password,
            connect_timeout=2,
            **extra,
        )

    def topology_conninfo(self) -> str:
        """The conninfo without host and port, for a pool with ``topology=`` (contains the
        password: never log it)."""
        return psycopg.conninfo.make_conninfo(
            dbname=self.dbname, user=self.user, password=self.password, connect_timeout=2
        )

    def topology(self) -> PatroniTopology | None:
        """A new :class:`~pgfailover.PatroniTopology` over ``patroni_urls`` (1 s REST
        budget per refresh), None without them."""
        if not self.patroni_urls:
            return None
        return PatroniTopology(self.patroni_urls, timeout=1.0)

    def url(self) -> sa.URL:
        """The SQLAlchemy URL (psycopg dialect; multi-host in the query as SQLAlchemy wants)."""
        hosts = [f"{h}:{p}" for h, p in self.hosts]
        host, port = self.hosts[0] if len(self.hosts) == 1 else (None, None)
        return sa.URL.create(
            "postgresql+psycopg",
            username=self.user,
            password=self.password,
            host=host,
            port=port,
            database=self.dbname,
            query={
                "connect_timeout": "2",
                **({"host": hosts} if len(hosts) > 1 else {}),
                **({"target_session_attrs": self.session_attrs} if self.session_attrs else {}),
            },
        )


class Stack:
    """One application stack: :meth:`write` one key or raise what the application sees."""

    name: str
    protected: bool
    description: str

    def __init__(self, endpoint: Endpoint, table: str, size: int) -> None:
        """Open the stack's pool (``size`` connections) on ``endpoint``, writing to ``table``."""

    def write(self, key: int) -> None:
        """Insert ``key``; raises the application's exception on failure."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the stack's connections."""
        raise NotImplementedError


def _insert(table: str, stack: str) -> Callable[[psycopg.Connection[Any], int], None]:
    sql = f"INSERT INTO {table} (k, stack) VALUES (%s, %s)"

    def work(conn: psycopg.Connection[Any], key: int) -> None:
        conn.execute(sql, (key, stack))

    return work


def _insert_sa(table: str, stack: str) -> Callable[[Any, int], None]:
    statement = sa.text(f"INSERT INTO {table} (k, stack) VALUES (:k, :stack)")

    def work(conn: Any, key: int) -> None:
        conn.execute(statement, {"k": key, "stack": stack})

    return work


class _PoolStack(Stack):
    """A psycopg_pool pool of ``pool_class``; the work under the runner if ``runner``."""

    pool_class: type[psycopg_pool.ConnectionPool[Any]]
    runner: bool

    def __init__(self, endpoint: Endpoint, table: str, size: int) -> None:
        # pgfailover's pool follows Patroni's leader when the endpoint names REST URLs
        topology = endpoint.topology() if issubclass(self.pool_class, ConnectionPool) else None
        extra: dict[str, Any] = {} if topology is None else {"topology": topology}
        self.pool = self.pool_class(
            endpoint.conninfo() if topology is None else endpoint.topology_conninfo(),
            kwargs=endpoint.connect_kwargs(),
            min_size=size,
            max_size=size,
            timeout=POOL_TIMEOUT,
            open=True,
            **extra,
        )
        self.work = _insert(table, self.name)

    def write(self, key: int) -> None:
        if self.runner:
            TransactionRunner(self.pool, timeout=RUNNER_TIMEOUT)(self.work, key)
        else:
            with self.pool.connection() as conn:
                self.work(conn, key)

    def close(self) -> None:
        self.pool.close(timeout=1.0)


class NaivePool(_PoolStack):
    name = "psycopg_pool"
    protected = False
    description = "plain psycopg_pool.ConnectionPool"
    pool_class = psycopg_pool.ConnectionPool
    runner = False


class ProtectedPool(_PoolStack):
    name = "pgfailover pool"
    protected = True
    description = "pgfailover.ConnectionPool"
    pool_class = ConnectionPool
    runner = False


class ProtectedPoolRunner(_PoolStack):
    name = "pgfailover pool + runner"
    protected = True
    description = "pgfailover.ConnectionPool under pgfailover.TransactionRunner"
    pool_class = ConnectionPool
    runner = True


class _EngineStack(Stack):
    """A SQLAlchemy engine: with ``pool_pre_ping`` (naive) or instrumented; the work under
    the runner if ``runner``."""

    instrumented: bool
    runner: bool

    def __init__(self, endpoint: Endpoint, table: str, size: int) -> None:
        self.engine = sa.create_engine(
            endpoint.url(),
            pool_size=size,
            max_overflow=0,
            pool_timeout=POOL_TIMEOUT,
            pool_pre_ping=not self.instrumented,
            connect_args=endpoint.connect_kwargs(),
        )
        if self.instrumented:
            instrument(self.engine)
        self.work = _insert_sa(table, self.name)

    def write(self, key: int) -> None:
        if self.runner:
            TransactionRunner(self.engine, timeout=RUNNER_TIMEOUT)(self.work, key)
        else:
            with self.engine.begin() as conn:
                self.work(conn, key)

    def close(self) -> None:
        self.engine.dispose()


class NaiveEngine(_EngineStack):
    name = "SQLAlchemy pre_ping"
    protected = False
    description = "SQLAlchemy engine with pool_pre_ping=True"
    instrumented = False
    runner = False


class ProtectedEngine(_EngineStack):
    name = "SQLAlchemy instrumented"
    protected = True
    description = "SQLAlchemy engine + pgfailover.sqlalchemy.instrument()"
    instrumented = True
    runner = False


class ProtectedEngineRunner(_EngineStack):
    name = "SQLAlchemy instrumented + runner"
    protected = True
    description = "instrumented SQLAlchemy engine under pgfailover.TransactionRunner"
    instrumented = True
    runner = True


#: Every stack, in display order: naive ones first (the names and order of
#: :data:`pgfailover.drill.options.STACK_NAMES`, which ``--stacks`` accepts).
STACKS: tuple[type[Stack], ...] = (
    NaivePool,
    NaiveEngine,
    ProtectedPool,
    ProtectedEngine,
    ProtectedPoolRunner,
    ProtectedEngineRunner,
)


def error_code(ex: BaseException) -> tuple[str, bool]:
    """What a failed write is filed under, and whether its outcome is unknown.

    The driver error's own SQLSTATE (looking through SQLAlchemy's wrapper, and through
    Django's: its ``django.db`` error has the driver's as ``__cause__``), else the class
    name of the error (``PoolTimeout``, ``NoPrimaryAvailable``, ``OperationalError`` for a
    lost connection...). Other causes are not looked into: a pool timeout is filed as one
    even when the connection attempts behind it failed with a SQLSTATE.
    :class:`~pgfailover.errors.CommitOutcomeUnknown` is filed under its name, unknown=True.
    """
    if isinstance(ex, CommitOutcomeUnknown):
        return type(ex).__name__, True
    if type(ex).__module__ == "django.db.utils" and ex.__cause__ is not None:
        ex = ex.__cause__  # Django's wrapper of the driver's error
    inner = getattr(ex, "orig", None) or ex
    sqlstate = getattr(inner, "sqlstate", None)
    return (sqlstate if isinstance(sqlstate, str) and sqlstate else type(inner).__name__), False


_django_lock = threading.Lock()
_django_aliases = itertools.count(1)


def _django_connections() -> Any:
    """Django's ``connections``, Django set up first if the process has not done it: with
    ``settings.configure()`` (no database of its own, Django's logging left alone) unless
    ``DJANGO_SETTINGS_MODULE`` names a settings module. Each Django stack adds its own
    alias to it, so several stacks (and drills) share one configured process."""
    with _django_lock:
        import django  # type: ignore[import-untyped]  # noqa: PLC0415 - optional
        from django.apps import apps  # type: ignore[import-untyped]  # noqa: PLC0415
        from django.conf import settings  # type: ignore[import-untyped]  # noqa: PLC0415

        if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
            settings.configure(DATABASES={}, INSTALLED_APPS=[], USE_TZ=True, LOGGING_CONFIG=None)
        if not apps.ready:
            django.setup(set_prefix=False)
        from django.db import connections  # type: ignore[import-untyped]  # noqa: PLC0415

        return connections


class _DjangoStack(Stack):
    """A Django database alias of ``engine``, persistent connections with health checks;
    each write one request: Django's end-of-request check before and after (what its
    ``request_started`` and ``request_finished`` signals run), the INSERT through Django's
    cursor in between, under ``pgfailover.django``'s runner if ``runner``.

    The alias (``pgfailover-drill-<n>``, unique in the process) is added to Django's
    connection settings and removed by :meth:`close`. Django keeps a connection per thread:
    each worker has its own, closed by :meth:`close` once the workers stopped."""

    engine: str
    runner: bool

    def __init__(self, endpoint: Endpoint, table: str, size: int) -> None:
        self.connections = _django_connections()
        self.alias = f"pgfailover-drill-{next(_django_aliases)}"
        options: dict[str, Any] = {"connect_timeout": 2}
        if endpoint.session_attrs:
            options["target_session_attrs"] = endpoint.session_attrs
        if endpoint.patroni_urls and self.runner:
            # pgfailover's backend follows Patroni's leader, like pgfailover's pools
            options["topology"] = {"kind": "patroni", "urls": list(endpoint.patroni_urls)}
            options["topology"]["timeout"] = 1.0
        entry = {
            "ENGINE": self.engine,
            "NAME": endpoint.dbname,
            "USER": endpoint.user,
            "PASSWORD": endpoint.password,
            "HOST": ",".join(h for h, _ in endpoint.hosts),
            "PORT": ",".join(str(p) for _, p in endpoint.hosts),
            "CONN_MAX_AGE": 600,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": options,
        }
        handler = self.connections
        # Django's defaults for the entry, as for the settings' own aliases
        handler.settings[self.alias] = handler.configure_settings(
            {"default": {}, self.alias: entry}
        )[self.alias]
        self.sql = f"INSERT INTO {table} (k, stack) VALUES (%s, %s)"
        self._wrappers: list[Any] = []
        self._lock = threading.Lock()
        self._atomic: Callable[..., None] | None = None
        if self.runner:
            from ..django import AtomicRunner  # noqa: PLC0415 - needs Django

            self._atomic = AtomicRunner(self.alias, timeout=RUNNER_TIMEOUT)

    def _wrapper(self) -> Any:
        wrapper = self.connections[self.alias]  # this thread's
        if not getattr(wrapper, "_pgf_drill_seen", False):
            wrapper._pgf_drill_seen = True
            with self._lock:
                self._wrappers.append(wrapper)
        return wrapper

    def _insert(self, wrapper: Any, key: int) -> None:
        with wrapper.cursor() as cur:
            cur.execute(self.sql, (key, self.name))

    def write(self, key: int) -> None:
        wrapper = self._wrapper()
        wrapper.close_if_unusable_or_obsolete()  # request_started
        try:
            if self._atomic is not None:
                self._atomic(self._insert, wrapper, key)
            else:
                self._insert(wrapper, key)
        finally:
            wrapper.close_if_unusable_or_obsolete()  # request_finished

    def close(self) -> None:
        # The wrappers belong to the (stopped) worker threads; Django would refuse to close
        # them from this one, so their driver connections are closed directly.
        with self._lock:
            wrappers, self._wrappers = self._wrappers, []
        try:
            for wrapper in wrappers:
                conn, wrapper.connection = wrapper.connection, None
                if conn is not None:
                    conn.close()
        finally:
            self.connections.settings.pop(self.alias, None)


class NaiveDjango(_DjangoStack):
    name = "Django postgresql"
    protected = False
    description = "Django's django.db.backends.postgresql, CONN_MAX_AGE + CONN_HEALTH_CHECKS"
    engine = "django.db.backends.postgresql"
    runner = False


class ProtectedDjangoRunner(_DjangoStack):
    name = "Django pgfailover + runner"
    protected = True
    description = "ENGINE pgfailover.django, each write under pgfailover.django.atomic"
    engine = "pgfailover.django"
    runner = True


#: Stacks that run only when ``--stacks`` names them (they need Django), with the names
#: and order of :data:`pgfailover.drill.options.OPTIONAL_STACK_NAMES`.
OPTIONAL_STACKS: tuple[type[Stack], ...] = (NaiveDjango, ProtectedDjangoRunner)


def close_quietly(stack: Stack) -> None:
    """Close ``stack``; an error (a connection to a server that is gone) is logged at
    debug level with its traceback, not raised: the drill's report comes first."""
    try:
        stack.close()
    except Exception:
        logger.debug("closing the %s stack failed", stack.name, exc_info=True)
