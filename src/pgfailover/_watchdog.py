"""One watchdog per process: a statement in flight on a dead, blackholed or frozen server
ends within a bound, and a healthy long statement is left alone.

Why a watchdog: a server that stops answering without closing its sockets (a frozen
machine, a network blackhole, a proxy whose backend vanished) leaves a client blocked for
as long as the kernel keeps acknowledging, which is forever behind a proxy: libpq's
``connect_timeout``, keepalives and ``tcp_user_timeout`` do not end it, and cancelling an
async task makes psycopg wait a fixed 5 s + 5 s for a cancel the server never sees.

How it works (decisions in :func:`judge`, pure; the thread does the I/O):

- every :class:`pgfailover.Connection` / ``AsyncConnection`` registers itself (weakly)
  when it is made and counts the operations it waits for (one integer increment);
- every :data:`TICK` seconds the watchdog thread looks at each registered connection: one
  whose server status is ACTIVE on the same operation for at least the connection's
  ``silence_limit`` is *silent*;
- for a silent connection it asks the server, on a new side connection to the same
  endpoint bounded by ``probe_timeout``, whether it answers ``SELECT 1``. An answer means
  a slow statement on a live server: it is left alone (and asked about again after another
  ``silence_limit``). No answer (the side connection cannot be made, or made directly and
  then gets no answer) means the server is gone: the silent connection is *cut*;
- a connection past its ``deadline`` (set by the transaction runner to its own deadline)
  is cut without asking;
- cutting shuts the socket down (``shutdown(SHUT_RDWR)`` on a duplicate of its file
  descriptor): the waiting thread or event loop wakes at once with the driver's own
  connection error, which the connection classifies as a lost connection (poisoned; a
  COMMIT in flight is ``OUTCOME_UNKNOWN``; pools purge and record the outage) and notes
  why it was cut.

Through a multiplexing pooler a side connection that is made but gets no answer is not
proof (the pooler may have no free server connection): the connection is then left to its
deadline, if any.

Connections that are not pgfailover's (the DBAPI connections of an instrumented SQLAlchemy
engine: psycopg, psycopg2, asyncpg) are watched through a :class:`Watchable`, which says
from the driver's own state whether an operation is in flight, counts operations where the
driver does, and gives the socket to cut and a conninfo for the side probe. The same
:func:`judge` decides for both kinds; a pgfailover connection's path is unchanged (its
operation count stays one integer increment, and nothing else is asked of it).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.pq import Conninfo, TransactionStatus

if TYPE_CHECKING:
    from .connection import _FailoverAware

logger = logging.getLogger("pgfailover.watchdog")

#: How often the watchdog looks at the registered connections, in seconds: the precision
#: of every bound it enforces.
TICK = 0.25

_ACTIVE = TransactionStatus.ACTIVE
#: Connection options never copied to a side connection: routing options would send it
#: elsewhere, and the watchdog sets its own bounds.
_DROPPED_OPTIONS = frozenset(
    {"target_session_attrs", "load_balance_hosts", "connect_timeout", "application_name"}
)


class Action(enum.Enum):
    """What the watchdog does about one connection at one look."""

    NOTHING = "nothing"
    PROBE = "probe"  #: ask the server on a side connection whether it is alive
    CUT = "cut"  #: past its deadline: shut the socket down


@dataclass
class Watch:
    """What the watchdog remembers of one connection between looks."""

    ops: int = -1  #: the operation count seen last
    since: float = 0.0  #: since when that operation has been seen in flight
    asked: float = 0.0  #: when the server was last asked about it (0: never)


def judge(
    watch: Watch,
    *,
    active: bool,
    ops: int,
    now: float,
    silence_limit: float | None,
    deadline: float | None,
) -> Action:
    """What to do about a connection: pure, updates ``watch``.

    ``active``: the server is running an operation for it; ``ops``: its operation count
    (a change means progress); ``silence_limit``: seconds of silence before asking the
    server (None: never ask); ``deadline``: a monotonic time after which an operation in
    flight is cut (None: none).
    """
    if not active:
        watch.ops, watch.asked = -1, 0.0
        return Action.NOTHING
    if ops != watch.ops:
        watch.ops, watch.since, watch.asked = ops, now, 0.0
    if deadline is not None and now >= deadline:
        return Action.CUT
    if silence_limit is None:
        return Action.NOTHING
    last = watch.asked or watch.since
    if now - last >= silence_limit:
        watch.asked = now
        return Action.PROBE
    return Action.NOTHING


class Watchable:
    """A connection that is not a pgfailover connection, as the watchdog sees it.

    Subclasses read the driver's own state: :meth:`in_flight` (an operation waits for the
    server), :attr:`_pgf_ops` (an operation count; a constant where the driver keeps none:
    then an operation is *silent* once it has been seen in flight at every look for
    ``silence_limit``, so a connection kept busy by many short statements may be asked
    about, harmlessly, now and then), :meth:`socket_fd`, :meth:`endpoint` and
    :meth:`conninfo`. None of them may block or do I/O: the watchdog thread calls them
    while another thread or event loop uses the connection.

    The watchdog holds it weakly: whoever registers it keeps it alive as long as its
    connection lives. ``silence_limit``/``probe_timeout`` mean what they mean on
    :class:`pgfailover.Connection`; ``via_pooler`` too (None: unknown).
    """

    def __init__(self, silence_limit: float | None, probe_timeout: float) -> None:
        self.silence_limit = silence_limit
        self.probe_timeout = probe_timeout
        self.via_pooler: bool | None = None
        self._pgf_deadline: float | None = None  # monotonic; an operation past it is cut
        self._pgf_cut_reason: str | None = None  # why the watchdog cut the connection

    @property
    def _pgf_ops(self) -> int:
        """Operations the driver has performed (a change means progress); 0 if it cannot
        say."""
        return 0

    def in_flight(self) -> bool:
        """Whether an operation is waiting for the server (False once closed)."""
        raise NotImplementedError

    def socket_fd(self) -> int:
        """The file descriptor of the connection's socket (OSError or any error: closed)."""
        raise NotImplementedError

    def endpoint(self) -> str:
        """``host:port`` the connection was opened to."""
        raise NotImplementedError

    def conninfo(self) -> str:
        """A libpq conninfo reaching the same server with the same credentials. Holds the
        password: never log it."""
        raise NotImplementedError


class Watchdog:
    """The process's watchdog (see the module doc); :func:`watch` registers connections."""

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self._conns: weakref.WeakKeyDictionary[_FailoverAware[Any] | Watchable, Watch] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._probing: set[str] = set()  # endpoints with a side probe under way
        #: Side probes run and connections cut so far (for tests and metrics).
        self.probes_run = 0
        self.cuts = 0

    def watch(self, conn: _FailoverAware[Any] | Watchable) -> None:
        """Watch ``conn`` until it is garbage; starts the thread on first use."""
        with self._lock:
            self._conns[conn] = Watch()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pgfailover-watchdog", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            try:
                self._look(time.monotonic())
            except Exception:  # the watchdog must outlive any one connection's oddity
                logger.exception("the watchdog failed to look at its connections")

    def _look(self, now: float) -> None:
        with self._lock:
            watched = list(self._conns.items())
        silent: dict[str, list[_FailoverAware[Any] | Watchable]] = {}
        for conn, watch in watched:
            if conn._pgf_cut_reason is not None:
                continue  # cut already: its waiter is waking up, nothing more to do
            try:
                if isinstance(conn, Watchable):
                    active = conn.in_flight()
                else:
                    active = not conn.closed and conn.pgconn.transaction_status == _ACTIVE
            except Exception:  # finished under our feet: nothing to watch
                logger.debug("a watched connection cannot say its status", exc_info=True)
                active = False
            action = judge(
                watch,
                active=active,
                ops=conn._pgf_ops,
                now=now,
                silence_limit=conn.silence_limit,
                deadline=conn._pgf_deadline,
            )
            if action is Action.CUT:
                self.cuts += 1
                cut(conn, "the operation outlived its deadline")
            elif action is Action.PROBE:
                silent.setdefault(_endpoint(conn), []).append(conn)
        for endpoint, conns in silent.items():
            with self._lock:
                if endpoint in self._probing:
                    continue
                self._probing.add(endpoint)
            threading.Thread(
                target=self._probe,
                args=(endpoint, conns),
                name="pgfailover-watchdog-probe",
                daemon=True,
            ).start()

    def _probe(self, endpoint: str, conns: Iterable[_FailoverAware[Any] | Watchable]) -> None:
        try:
            conns = list(conns)
            first = conns[0]
            self.probes_run += 1
            why = side_probe(first, first.probe_timeout)
            if why is None:
                logger.debug("%s answers: its silent statements are slow, not stuck", endpoint)
                return
            for conn in conns:
                self.cuts += 1
                cut(conn, f"no answer for {conn.silence_limit:g} s, and {why}")
        except Exception:  # a probe must never die silently: the next look asks again
            logger.exception("the watchdog's side probe of %s failed", endpoint)
        finally:
            with self._lock:
                self._probing.discard(endpoint)


def _endpoint(conn: Any) -> str:
    try:
        return (
            conn.endpoint() if isinstance(conn, Watchable) else f"{conn.info.host}:{conn.info.port}"
        )
    except Exception:  # finished: any key will do, the probe will find it closed
        return "unknown"


def side_conninfo(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """A conninfo reaching the very server ``conn`` is connected to, with its credentials.

    Holds the password when ``conn`` was given one: never log it.
    """
    options = {
        opt.keyword.decode(): opt.val.decode()
        for opt in conn.pgconn.info
        if opt.val is not None and opt.keyword.decode() not in _DROPPED_OPTIONS
    }
    options["host"] = conn.info.host
    options["port"] = str(conn.info.port)
    options.pop("hostaddr", None)
    return make_conninfo("", **options)


def conninfo_of(options: Mapping[str, object]) -> str:
    """A conninfo of ``options`` (libpq keywords; None values skipped) for a side
    connection: keywords psycopg's libpq does not know (another driver's libpq may be newer)
    and those a side connection must not copy (routing, bounds) are left out. Holds the
    password if given: never log it."""
    known = _libpq_keywords()
    kept = {
        k: str(v)
        for k, v in options.items()
        if v is not None and k in known and k not in _DROPPED_OPTIONS
    }
    return make_conninfo("", **kept)


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(opt.keyword.decode() for opt in Conninfo.get_defaults())


def side_probe(conn: Any, timeout: float) -> str | None:
    """None if ``conn``'s server answers ``SELECT 1`` on a new connection within
    ``timeout`` seconds (twice that at most in all); else why it is judged gone.

    A failure to authenticate proves nothing about liveness: judged alive. Through a
    pooler (``conn.via_pooler`` not False), a connection made but not answered is judged
    alive too (the pooler may just have no free server connection).
    """
    try:
        side = _side_connect(conn, timeout)
    except psycopg.OperationalError as ex:
        text = str(ex).lower()
        refused_us = "password" in text or "authentication" in text or "pg_hba" in text
        return None if refused_us else f"a new connection to it failed ({type(ex).__name__})"
    if side is None:
        return None
    try:
        answered = _answers(side, timeout)
    except psycopg.Error as ex:
        return f"a new connection to it failed ({type(ex).__name__})"
    finally:
        with contextlib.suppress(Exception):
            side.pgconn.finish()  # never wait on it: it may be the stuck one now
    if answered or getattr(conn, "via_pooler", None) is not False:
        return None
    return f"a new connection to it got no answer within {timeout:g} s"


def _answers(side: psycopg.Connection[Any], timeout: float) -> bool:
    """Whether the server answers ``SELECT 1`` on ``side`` within ``timeout`` seconds (any
    answer counts, an error included: it is alive). libpq's non-blocking calls and a
    ``select()`` with a deadline: no psycopg wait, whose timeout argument not every psycopg
    3.3 release has."""
    pgconn = side.pgconn
    pgconn.send_query(b"SELECT 1")
    deadline = time.monotonic() + timeout
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            while pgconn.get_result() is not None:
                pass
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        select.select([pgconn.socket], [], [], remaining)


def _side_connect(conn: Any, timeout: float) -> psycopg.Connection[Any] | None:
    """A new connection to ``conn``'s server (None if ``conn`` was finished meanwhile)."""
    try:
        conninfo = conn.conninfo() if isinstance(conn, Watchable) else side_conninfo(conn)
    except Exception as ex:  # the silent connection was finished meanwhile
        logger.debug("cannot build the side conninfo: %s", type(ex).__name__)
        return None
    return psycopg.Connection.connect(
        conninfo,
        connect_timeout=max(2, round(timeout)),  # libpq's minimum is 2 s
        application_name="pgfailover-watchdog",
        autocommit=True,
    )


def cut(conn: _FailoverAware[Any] | Watchable, reason: str) -> None:
    """Shut ``conn``'s socket down: whoever waits on it wakes with a connection error.

    ``reason`` is kept on the connection, which adds it to the error's notes.
    """
    try:
        fd = conn.socket_fd() if isinstance(conn, Watchable) else conn.pgconn.socket
    except Exception:  # already finished: nothing to wake
        return
    conn._pgf_cut_reason = reason
    logger.warning("cutting a connection to %s: %s", _endpoint(conn), reason)
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError as ex:  # closed between the look and the cut
        logger.debug("cannot shut the socket down: %s", ex)


#: The process's watchdog.
WATCHDOG = Watchdog()


def watch(conn: _FailoverAware[Any] | Watchable) -> None:
    """Register ``conn`` with the process's watchdog."""
    WATCHDOG.watch(conn)
