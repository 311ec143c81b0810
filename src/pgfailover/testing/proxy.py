"""A TCP proxy in front of PostgreSQL that switches backends and drops connections on cue.

:class:`FaultProxy` listens on a loopback port and relays every accepted connection to a
backend (the *target*). Tests use it for two things:

**An L4 endpoint that switches backends** (a virtual IP, a Kubernetes Service, HAProxy in
TCP mode): :meth:`FaultProxy.switch` sends *new* connections to another backend while the
existing ones keep relaying to the backend they were opened on, exactly what such endpoints
do; ``switch(..., drop_existing=True)`` resets the existing ones too.

**Faults at chosen protocol moments**, to test what a client makes of an unknown commit
outcome. :meth:`FaultProxy.drop_on` installs a :class:`FaultRule`: when a client message
matches (by default: a COMMIT, see :func:`is_commit`), the connection is dropped

- ``"before"`` the message is forwarded: the server never sees it (a COMMIT never reaches
  the server, which rolls the transaction back when the client vanishes);
- ``"after_forward"``: right after the message has been handed to the server's socket,
  without waiting for the reply. The client cannot know the outcome. (With this proxy the
  server does get the message, then end-of-file: it executes the message, its reply is
  read and thrown away, and the backend exits. A COMMIT therefore commits.)
- ``"after_reply"``: once the server has answered completely, i.e. up to and including the
  ReadyForQuery (``'Z'``) that concludes the message. The reply is thrown away: the server
  certainly processed the message, the client never learns the outcome.

*What "the message" is.* A simple-protocol Query (``'Q'``, which may hold several
statements, e.g. ``SELECT 1; COMMIT``) or a FunctionCall (``'F'``) is one message and one
unit. A message of the extended protocol (Parse ``'P'``, Bind ``'B'``, Describe ``'D'``,
Execute ``'E'``, Close ``'C'``, Flush ``'H'``) starts a unit that ends with the next Sync
(``'S'``) inclusive: ``"before"`` forwards nothing of the unit (messages that came earlier
were forwarded), ``"after_forward"`` drops the connection once the whole unit up to the Sync
has been forwarded, ``"after_reply"`` waits for the ReadyForQuery answering that Sync.
Whatever the client sends after the unit never reaches the server, and whatever the server
sends after the last ReadyForQuery *preceding* the unit's reply never reaches the client.
Any other message (``'d'``, ``'c'``, ``'f'``, ``'X'``, ``'p'``) is a unit of its own whose
reply is the next ReadyForQuery. A match uses up one of the rule's ``times`` even when the
connection ends before the fault's moment comes (say, the server exits before answering):
then no :class:`FiredFault` is recorded.

What psycopg 3.3 sends (observed through this proxy), all matched by :func:`is_commit`:

- ``conn.commit()`` and the end of a ``with conn.transaction()`` block (autocommit or not):
  a simple Query ``'Q' "COMMIT"`` (the transaction began with ``'Q' "BEGIN"``);
- in pipeline mode, ``conn.commit()``: Parse (unnamed) ``"COMMIT"``, Bind, Describe, Execute,
  then Sync, Sync, Flush, in the same batch as the statements before it (which have no Sync
  of their own); a ``transaction()`` block in a pipeline: the same with Sync, Flush, Sync,
  Flush after the Execute. "before" thus forwards the earlier statements, never the COMMIT;
- ``cur.execute("COMMIT", prepare=True)``: Parse ``"_pg3_N"`` + Sync (prepares only: not a
  match), then Bind ``"_pg3_N"``, Describe, Execute, Sync (the Bind matches).

*Other faults*: :meth:`~FaultProxy.blackhole` stops every relay (a network partition: data
is held, not lost, and flows again after :meth:`~FaultProxy.restore`);
:meth:`~FaultProxy.latency` delays every relayed chunk; :meth:`~FaultProxy.drop_all` resets
every connection.

*Observability*: :meth:`~FaultProxy.stats` (connections accepted and open, bytes relayed),
:attr:`~FaultProxy.faults` (a :class:`FiredFault` per fault that took effect, recorded before
the connection is closed), :meth:`~FaultProxy.connections`, :attr:`~FaultProxy.errors`, and
:meth:`~FaultProxy.wait_faults` / :meth:`~FaultProxy.wait_until` to poll with a deadline.

*Parsing.* The proxy follows the protocol to find message boundaries: the untyped start-up
packets (SSLRequest and GSSENCRequest, answered by one byte, then the startup message; a
CancelRequest is a connection on its own), then typed messages in both directions. When TLS
or GSSAPI encryption is negotiated (or a packet cannot be parsed) the proxy relays that
connection blindly, logs a warning and says so in :meth:`~FaultProxy.connections`: rules
cannot fire on it. The harness's servers run with ``ssl = off`` (libpq's default
``sslmode=prefer`` gets ``'N'`` and parsing goes on) and :meth:`~FaultProxy.dsn_for` adds
``sslmode=disable`` anyway. Backends are IPv4 addresses (loopback in tests).

*Why one thread with* :mod:`selectors` *rather than an asyncio loop in a thread*: a fault
must happen at an exact position in a byte stream relative to what has been handed to the
kernel ("after_forward" means the bytes were written to the server socket). With plain
non-blocking sockets every ``send`` is ours and that position is exact; asyncio transports
buffer writes out of sight. One thread that blocks in ``select`` (commands arrive through a
socketpair, timers bound the wait) never busy-loops, shares nothing with the test's own
event loop, and serves sync and async tests alike. Public methods hand their work to that
thread and wait for it (bounded), so when e.g. :meth:`~FaultProxy.drop_all` returns, the
connections are closed.

Nothing here logs or shows payloads: passwords travel in them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import itertools
import logging
import re
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._ports import release_port, reserve_port
from .errors import HarnessError

logger = logging.getLogger("pgfailover.testing.proxy")

#: The selector's timeout resolution (epoll's: whole milliseconds, rounded up).
_SELECTOR_RESOLUTION = 0.001
#: The longest sleep while a delayed message is due in less than that: bounds both the
#: error of a sub-millisecond latency and how late a newly ready socket is noticed.
_FINE_STEP = 0.0002

#: When a matched connection is dropped: see the module documentation.
When: TypeAlias = Literal["before", "after_forward", "after_reply"]
#: ``"all"``: every connection, open or future; ``"new"``: connections accepted after the
#: rule was installed.
Scope: TypeAlias = Literal["all", "new"]

T = TypeVar("T")

_WHENS: tuple[str, ...] = ("before", "after_forward", "after_reply")
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_MAX_STARTUP = 10_000  # the server's own limit for a startup packet
_READ_SIZE = 65536
_BACKLOG_LIMIT = 4 * 1024 * 1024  # stop reading a side while this much waits to be written
_EXTENDED = frozenset("PBDECH")  # messages whose unit extends to the next Sync
_SYNC_POINTS = frozenset("QSF")  # client messages that the server answers with one 'Z'
_INT32 = struct.Struct("!i")
_LINGER_RST = struct.pack("ii", 1, 0)


class ProxyError(HarnessError):
    """The proxy failed: it could not start, its thread died or did not stop in time, or an
    exception was raised inside it (a matcher's, for instance)."""


class Endpoint(Protocol):
    """Anything with a ``host`` and a ``port``, such as :class:`~pgfailover.testing.Node`."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class HasDsn(Protocol):
    """Anything with a ``dsn(**params)`` method, such as a Node or a PgBouncer."""

    def dsn(self, **params: Any) -> str: ...


@dataclass(frozen=True)
class ClientMessage:
    """A complete client message, as given to a rule's matcher.

    ``type`` is the one-character message type (``"Q"``, ``"P"``, ``"B"``, ``"S"``, ...;
    never the untyped start-up packets). ``payload`` is everything after the length word (not
    shown in the repr: it can hold a password). ``query`` is the SQL text of a Query or a
    Parse, or of the named prepared statement a Bind refers to; None otherwise (and for a
    Bind of the unnamed statement: its Parse already carried the text). ``statement`` is the
    prepared statement's name for a Parse or a Bind (``""``: the unnamed one), else None.
    """

    type: str
    payload: bytes = field(repr=False)
    query: str | None
    connection_id: int
    statement: str | None = None


#: A rule's matcher: True when the message should trigger the fault.
Matcher: TypeAlias = Callable[[ClientMessage], bool]


@dataclass(frozen=True, eq=False)
class FaultRule:
    """A fault installed by :meth:`FaultProxy.drop_on` (compared by identity).

    ``times`` is how many matches it fires on (None: every match, until removed).
    ``first_connection`` is the smallest connection id it applies to (0 for scope ``"all"``).
    """

    id: int
    when: When
    match: Matcher
    times: int | None
    scope: Scope
    first_connection: int
    name: str


@dataclass(frozen=True)
class FiredFault:
    """A fault that took effect: ``at`` is the ``time.monotonic()`` of the drop, ``query``
    the matched message's SQL text (see :class:`ClientMessage`)."""

    rule: FaultRule
    when: When
    connection_id: int
    message_type: str
    query: str | None
    at: float


@dataclass(frozen=True)
class ProxyStats:
    """Counters since start: ``accepted`` client connections, ``open`` ones (until both of
    their sockets are closed), ``backend_failures`` (the backend refused the connection: the
    client was closed), ``faults`` fired, and payload bytes written to each side."""

    accepted: int
    open: int
    backend_failures: int
    faults: int
    bytes_to_server: int
    bytes_to_client: int


@dataclass(frozen=True)
class ProxiedConnection:
    """One open connection: its id (1, 2, ... in accept order), the backend it relays to,
    when it was accepted (monotonic) and why it is relayed blindly (None: it is parsed)."""

    id: int
    backend: tuple[str, int]
    accepted_at: float
    blind: str | None


# ---------------------------------------------------------------------- matching COMMIT
_MAYBE_COMMIT = re.compile(r"commit|end", re.IGNORECASE)
_COMMIT_START = re.compile(r"(?:commit|end)\b", re.IGNORECASE)
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")


def split_statements(sql: str) -> list[str]:
    """Split SQL text on ``;`` into stripped, non-empty statements, comments removed.

    Minimal on purpose: ``;`` inside '...' and "..." (doubled quotes as escapes), dollar
    quotes and comments (``--`` and non-nested ``/* */``) does not split; backslash escapes
    in ``E'...'`` strings are not understood.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
            current.append(" ")
        elif c == "/" and sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            current.append(" ")
        elif c in "'\"":
            j = i + 1
            while True:
                j = sql.find(c, j)
                if j < 0:
                    j = n
                    break
                if sql.startswith(c, j + 1):
                    j += 2
                    continue
                j += 1
                break
            current.append(sql[i:j])
            i = j
        elif c == "$" and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            m = _DOLLAR_TAG.match(sql, i)
            if m:
                end = sql.find(m.group(), m.end())
                j = n if end < 0 else end + len(m.group())
            else:
                j = i + 1
            current.append(sql[i:j])
            i = j
        elif c == ";":
            statements.append("".join(current).strip())
            current = []
            i += 1
        else:
            current.append(c)
            i += 1
    statements.append("".join(current).strip())
    return [s for s in statements if s]


def contains_commit(sql: str) -> bool:
    """Whether one of the statements of ``sql`` starts with COMMIT or END (any case)."""
    if not _MAYBE_COMMIT.search(sql):
        return False
    return any(_COMMIT_START.match(s) for s in split_statements(sql))


def is_commit(message: ClientMessage) -> bool:
    """The default matcher: a COMMIT about to run.

    That is a Query, a Parse of the unnamed statement (sent with its Bind and Execute) or a
    Bind of a named prepared statement, whose SQL text has a statement starting with COMMIT
    or END (any case; COMMIT PREPARED and COMMIT AND CHAIN included). A Parse of a *named*
    statement only prepares it (psycopg sends it with a Sync of its own, then the Bind): it
    does not match, the Bind that executes it does.
    """
    if message.query is None or message.type not in "QPB":
        return False
    if message.type == "P" and message.statement:
        return False
    return contains_commit(message.query)


def query_matches(pattern: str | re.Pattern[str]) -> Matcher:
    """A matcher for a Query, Parse or Bind whose SQL text ``re.search``-es ``pattern``."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern

    def match(message: ClientMessage) -> bool:
        return (
            message.type in "QPB"
            and message.query is not None
            and bool(regex.search(message.query))
        )

    match.__qualname__ = f"query_matches({regex.pattern!r})"
    return match


# ---------------------------------------------------------------------- internals
class _Action:
    """A step in a pipe that runs once every byte queued before it has been written."""

    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Callable[[], None]) -> None:
        self.name = name
        self.fn = fn


@dataclass
class _Armed:
    """A matched rule waiting for its moment on one connection."""

    rule: FaultRule
    message_type: str
    query: str | None
    reply_index: int = 0  # for after_reply: the number of the 'Z' that concludes the unit


class _Pipe:
    """Bytes (and actions) flowing towards one socket, each due at a monotonic time."""

    __slots__ = ("last_due", "out", "queue", "queued")

    def __init__(self) -> None:
        self.queue: deque[tuple[float, bytes | _Action]] = deque()
        self.out = bytearray()  # due bytes not yet accepted by the kernel
        self.queued = 0  # bytes in queue
        self.last_due = 0.0

    def push(self, item: bytes | _Action, delay: float) -> None:
        # later chunks never overtake earlier ones, even when the latency goes down
        due = max(time.monotonic() + delay, self.last_due)
        self.last_due = due
        self.queue.append((due, item))
        if isinstance(item, bytes):
            self.queued += len(item)

    @property
    def backlog(self) -> int:
        return self.queued + len(self.out)

    def clear(self) -> None:
        self.queue.clear()
        self.out.clear()
        self.queued = 0


class _Conn:
    """State of one proxied connection; only the proxy thread touches it."""

    def __init__(
        self, cid: int, client: socket.socket, server: socket.socket, backend: tuple[str, int]
    ) -> None:
        self.id = cid
        self.client: socket.socket | None = client
        self.server: socket.socket | None = server
        self.backend = backend
        self.accepted_at = time.monotonic()
        self.connected = False
        self.c2s = _Pipe()
        self.s2c = _Pipe()
        self.client_eof = False
        self.server_eof = False
        self.client_masks = 0
        self.server_masks = 0
        self.discard_client = False  # a fault is under way: the client's data goes nowhere
        self.discard_server = False  # draining the server until it closes
        self.blind: str | None = None
        # client -> server parsing
        self.c_buf = bytearray()
        self.c_state: Literal["startup", "await_answer", "typed", "blind"] = "startup"
        self.syncs = 0  # messages forwarded that the server answers with one 'Z'
        self.statements: dict[str, str] = {}
        self.unit: _Armed | None = None  # matched extended message waiting for its Sync
        # server -> client parsing
        self.s_buf = bytearray()
        self.s_state: Literal["answer", "typed", "blind"] = "typed"
        self.zs = 0  # ReadyForQuery messages seen
        self.reply_fault: _Armed | None = None

    @property
    def closed(self) -> bool:
        return self.client is None and self.server is None

    def info(self) -> ProxiedConnection:
        return ProxiedConnection(self.id, self.backend, self.accepted_at, self.blind)


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


# ---------------------------------------------------------------------- the proxy
class FaultProxy:
    """A loopback TCP proxy to ``target`` (``(host, port)`` or a Node/PgBouncer) with faults.

    ``host`` is the listen address, ``port`` the listen port (None: a free port reserved in
    20000-32767 and released on close). ``command_timeout`` bounds every wait for the proxy
    thread (commands and :meth:`close`), in seconds. Use it as a context manager, or call
    :meth:`start` and :meth:`close`::

        with FaultProxy(cluster.primary) as proxy:
            conn = psycopg.connect(proxy.dsn_for(cluster.primary))
            proxy.drop_on("after_reply")  # the next COMMIT, from any connection
            ...
    """

    def __init__(
        self,
        target: tuple[str, int] | Endpoint,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        command_timeout: float = 5.0,
    ) -> None:
        if command_timeout <= 0:
            raise ValueError(f"command_timeout must be > 0 seconds, got {command_timeout}")
        self._target = _address(target)
        self._host = host
        self._port = port
        self._own_port = port is None
        self.command_timeout = command_timeout
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._rule_ids = itertools.count(1)
        self._rules: dict[FaultRule, int | None] = {}  # installed rule -> remaining (None: inf)
        self._faults: list[FiredFault] = []
        self._errors: list[BaseException] = []
        self._next_id = 1
        self._accepted = 0
        self._backend_failures = 0
        self._bytes_to_server = 0
        self._bytes_to_client = 0
        self._conns: dict[int, _Conn] = {}
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._blackholed = False
        self._latency = 0.0
        self._stopping = False
        self._started = False
        self._closed = False
        self._crash: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        """Bind the listen port and start the proxy thread; returns the proxy."""
        if self._started:
            raise ProxyError("the proxy was already started")
        self._started = True
        try:
            if self._port is None:
                self._port = reserve_port()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener = listener
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._host, self._port))
            listener.listen(128)
            listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel = selectors.DefaultSelector()
            self._sel.register(listener, selectors.EVENT_READ, "listener")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wakeup")
        except OSError as ex:
            self._release_resources()
            self._closed = True
            raise ProxyError(f"the proxy cannot listen on {self._display}: {ex}") from ex
        except BaseException:
            self._release_resources()
            self._closed = True
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"pgfailover-proxy-{self._port}", daemon=True
        )
        self._thread.start()
        logger.info("proxy %s:%s -> %s:%s started", self._host, self._port, *self._target)
        return self

    def close(self, timeout: float | None = None) -> None:
        """Close every connection and the listener, and join the thread. Idempotent.

        Waits at most ``timeout`` seconds (None: ``command_timeout``) for the thread.
        Raises :class:`ProxyError` when the thread did not stop in time, died unexpectedly,
        or recorded exceptions (see :attr:`errors`); everything is closed all the same.
        """
        if self._closed:
            return
        self._closed = True
        timeout = self.command_timeout if timeout is None else timeout
        thread = self._thread
        stuck = False
        if thread is not None and thread.is_alive():
            self._stopping = True
            self._wake()
            thread.join(timeout)
            stuck = thread.is_alive()
        if stuck:  # last resort: close the sockets under the thread's feet
            for conn in list(self._conns.values()):
                _close(conn.client)
                _close(conn.server)
        self._release_resources()
        logger.info("proxy %s:%s closed", self._host, self._port)
        if stuck:
            raise ProxyError(f"the proxy thread did not stop within {timeout:.1f}s")
        self._raise_errors()

    def __enter__(self) -> FaultProxy:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except ProxyError:  # don't hide the exception in flight; it is logged already
            logger.exception("proxy failed while the with-block raised")

    # ------------------------------------------------------------------ addressing
    @property
    def host(self) -> str:
        """The listen address."""
        return self._host

    @property
    def port(self) -> int:
        """The listen port (known once started, or when given)."""
        if self._port is None:
            raise ProxyError("the proxy has no port before start()")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` the proxy listens on."""
        return f"{self.host}:{self.port}"

    @property
    def target(self) -> tuple[str, int]:
        """The backend new connections go to."""
        with self._lock:
            return self._target

    def dsn_for(self, source: str | HasDsn, **params: Any) -> str:
        """``source``'s conninfo with host and port replaced by the proxy's.

        ``source`` is a conninfo string or an object with ``dsn(**params)`` (a Node, a
        PgBouncer: ``params`` such as ``user``/``dbname`` are passed to it). ``sslmode=disable``
        is added unless set already (the proxy cannot parse TLS); ``params`` override the rest.
        The result contains the password: never log it.
        """
        if isinstance(source, str):
            info = conninfo_to_dict(source)
            info.update(params)
        else:
            info = conninfo_to_dict(source.dsn(**params))
        info.pop("hostaddr", None)
        info["host"] = self.host
        info["port"] = str(self.port)
        info.setdefault("sslmode", "disable")
        return make_conninfo("", **info)

    # ------------------------------------------------------------------ controls
    def switch(
        self, host: str | Endpoint, port: int | None = None, *, drop_existing: bool = False
    ) -> None:
        """Send connections accepted from now on to ``host:port`` (or to a Node's address).

        Existing connections keep relaying to their backend, unless ``drop_existing``: then
        they are reset (both sides), like an L4 balancer that resets on backend change.
        """
        if isinstance(host, str):
            if port is None:
                raise ValueError("switch(host, port): port is missing")
            new: tuple[str, int] = (host, int(port))
        else:
            if port is not None:
                raise ValueError("switch(endpoint) takes no port")
            new = _address(host)

        def command() -> None:
            with self._lock:
                old, self._target = self._target, new
            dropped = self._drop_all() if drop_existing else 0
            logger.info(
                "proxy %s switched %s:%s -> %s:%s (%d existing connection(s) dropped)",
                self.address,
                *old,
                *new,
                dropped,
            )

        self._call(command)

    def drop_on(
        self,
        when: When,
        match: Matcher | None = None,
        *,
        times: int | None = 1,
        scope: Scope = "all",
        name: str | None = None,
    ) -> FaultRule:
        """Install a rule: drop a connection ``when`` a client message satisfies ``match``.

        ``match`` defaults to :func:`is_commit`. The rule fires on ``times`` matches (None:
        on every match until :meth:`remove_rule`), on connections open or future (``scope
        "all"``) or only on those accepted from now on (``"new"``). Rules are tried in
        installation order; the first that matches fires. Evaluated from the next message
        the proxy parses.
        """
        if when not in _WHENS:
            raise ValueError(f"when must be one of {_WHENS}, got {when!r}")
        if scope not in ("all", "new"):
            raise ValueError(f"scope must be 'all' or 'new', got {scope!r}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, got {times}")
        matcher = match or is_commit
        with self._lock:
            rid = next(self._rule_ids)
            rule = FaultRule(
                id=rid,
                when=when,
                match=matcher,
                times=times,
                scope=scope,
                first_connection=self._next_id if scope == "new" else 0,
                name=name or f"rule{rid}:{when}:{getattr(matcher, '__qualname__', matcher)}",
            )
            self._rules[rule] = times
        logger.info("proxy %s: installed %s", self._display, rule.name)
        return rule

    def remove_rule(self, rule: FaultRule) -> None:
        """Uninstall ``rule`` (no-op when it is gone); a fault already armed still happens."""
        with self._lock:
            self._rules.pop(rule, None)

    def clear_rules(self) -> None:
        """Uninstall every rule."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[FaultRule]:
        """Installed rules that can still fire, in installation order."""
        with self._lock:
            return list(self._rules)

    def remaining(self, rule: FaultRule) -> int | None:
        """How many more times ``rule`` fires: None when unlimited, 0 when used up or removed."""
        with self._lock:
            if rule in self._rules:
                return self._rules[rule]
            return 0

    def blackhole(self) -> None:
        """Stop relaying in both directions: connections stay open and new ones are
        accepted, but nothing passes (data waits in the proxy and the kernel's buffers, like
        during a network partition) until :meth:`restore`."""
        self._call(lambda: self._set_blackhole(True))

    def restore(self) -> None:
        """End a :meth:`blackhole`: held data flows again. No-op when not blackholed."""
        self._call(lambda: self._set_blackhole(False))

    @property
    def blackholed(self) -> bool:
        """Whether a :meth:`blackhole` is in effect."""
        return self._blackholed

    def latency(self, seconds: float) -> None:
        """Delay every chunk relayed from now on by ``seconds``, in each direction (so a
        round trip gets twice that). 0 removes the delay; the order of bytes is kept."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {seconds}")

        def command() -> None:
            self._latency = float(seconds)

        self._call(command)

    def drop_all(self) -> int:
        """Reset every current connection (both sides, with a TCP RST); returns how many."""
        return self._call(self._drop_all)

    # ------------------------------------------------------------------ observability
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats()

    @property
    def faults(self) -> list[FiredFault]:
        """Every fault that took effect, in order."""
        with self._lock:
            return list(self._faults)

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised inside the proxy thread (bugs, matchers that raised); each was
        logged. Network errors of a connection are not errors: they close the connection."""
        with self._lock:
            return list(self._errors)

    def connections(self) -> list[ProxiedConnection]:
        """The open connections, in accept order."""
        return self._call(lambda: [c.info() for c in self._conns.values()])

    def wait_faults(self, count: int = 1, timeout: float = 5.0) -> list[FiredFault]:
        """Wait until at least ``count`` faults have fired in total; returns them all.

        Raises :class:`ProxyError` after ``timeout`` seconds or when the thread died.
        """
        with self._changed:
            self._changed.wait_for(
                lambda: len(self._faults) >= count or self._crash is not None, timeout
            )
            if len(self._faults) < count:
                self._raise_crash()
                raise ProxyError(
                    f"{len(self._faults)} fault(s) fired within {timeout:.1f}s, expected {count}"
                )
            return list(self._faults)

    def wait_until(
        self, predicate: Callable[[ProxyStats], bool], timeout: float = 5.0
    ) -> ProxyStats:
        """Wait until ``predicate(stats())`` is true; returns those stats.

        Re-checked whenever a counter changes. Raises :class:`ProxyError` after ``timeout``
        seconds or when the thread died.
        """
        with self._changed:
            ok = self._changed.wait_for(
                lambda: predicate(self._stats()) or self._crash is not None, timeout
            )
            self._raise_crash()
            if not ok:
                raise ProxyError(f"timed out after {timeout:.1f}s; stats: {self._stats()}")
            return self._stats()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._started else "new")
        with self._lock:
            s = self._stats()
        return (
            f"<FaultProxy {self._display} -> {self._target[0]}:{self._target[1]} {state} "
            f"accepted={s.accepted} open={s.open} faults={s.faults}>"
        )

    # ------------------------------------------------------------------ calling the thread
    @property
    def _display(self) -> str:
        return f"{self._host}:{self._port}"

    def _stats(self) -> ProxyStats:
        return ProxyStats(
            accepted=self._accepted,
            open=len(self._conns),
            backend_failures=self._backend_failures,
            faults=len(self._faults),
            bytes_to_server=self._bytes_to_server,
            bytes_to_client=self._bytes_to_client,
        )

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the proxy thread and return its result (inline before start)."""
        if self._closed:
            raise ProxyError("the proxy is closed")
        if not self._started or threading.current_thread() is self._thread:
            return fn()  # before start (nothing to race with) or from a matcher
        self._raise_crash()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.append((fn, future))
        self._wake()
        try:
            return future.result(self.command_timeout)
        except concurrent.futures.TimeoutError:
            self._raise_crash()
            raise ProxyError(
                f"the proxy thread did not answer within {self.command_timeout:.1f}s"
            ) from None

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def _raise_crash(self) -> None:
        if self._crash is not None:
            raise ProxyError(f"the proxy thread died: {self._crash!r}") from self._crash

    def _raise_errors(self) -> None:
        self._raise_crash()
        errors = self.errors
        if errors:
            listed = "; ".join(repr(e) for e in errors[:5])
            raise ProxyError(
                f"{len(errors)} exception(s) were raised in the proxy thread: {listed}"
            ) from errors[0]

    def _record_error(self, ex: BaseException, what: str) -> None:
        logger.error("proxy %s: %s", self._display, what, exc_info=ex)
        with self._changed:
            self._errors.append(ex)
            self._changed.notify_all()

    def _release_resources(self) -> None:
        if self._sel is not None:
            with contextlib.suppress(Exception):
                self._sel.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            _close(sock)
        self._listener = None
        if self._own_port and self._port is not None:
            release_port(self._port)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        assert self._sel is not None
        try:
            while not self._stopping:
                for key, mask in self._wait_events():
                    self._dispatch(key, mask)
                self._run_commands()
                self._pump_all()
        except BaseException as ex:
            logger.critical("proxy %s: the proxy thread died", self._display, exc_info=ex)
            with self._changed:
                self._crash = ex
                self._changed.notify_all()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for conn in list(self._conns.values()):
            self._finish(conn)
        why = f"the proxy thread died: {self._crash!r}" if self._crash else "the proxy stopped"
        while self._commands:
            _, future = self._commands.popleft()
            if not future.done():
                future.set_exception(ProxyError(why))

    def _run_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as ex:
                future.set_exception(ex)
            for conn in list(self._conns.values()):
                self._update_interest(conn)

    def _wait_events(self) -> list[tuple[selectors.SelectorKey, int]]:
        """The ready sockets, waiting at most until the next delayed message is due.

        epoll's timeout has a resolution of 1 ms (rounded up), which would turn a latency of
        0.25 ms into 1 ms: a wait shorter than that is a non-blocking look followed by a
        sleep of at most :data:`_FINE_STEP`.
        """
        assert self._sel is not None
        timeout = self._next_timeout()
        if timeout is None or timeout >= _SELECTOR_RESOLUTION or timeout == 0:
            return self._sel.select(timeout)
        events = self._sel.select(0)
        if not events:
            time.sleep(min(timeout, _FINE_STEP))
        return events

    def _next_timeout(self) -> float | None:
        if self._blackholed:
            return None
        due: float | None = None
        for conn in self._conns.values():
            pipes = (conn.c2s, conn.s2c) if conn.connected else (conn.s2c,)
            for pipe in pipes:
                if pipe.queue and not pipe.out:
                    head = pipe.queue[0][0]
                    due = head if due is None else min(due, head)
        if due is None:
            return None
        return max(0.0, due - time.monotonic())

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        if data == "listener":
            self._accept()
            return
        if data == "wakeup":
            with contextlib.suppress(BlockingIOError, OSError):
                while self._wake_r is not None and self._wake_r.recv(4096):
                    pass
            return
        conn, side = data
        if conn.closed:
            return
        try:
            if side == "server" and not conn.connected:
                self._connected(conn)
            elif mask & selectors.EVENT_READ:
                self._read(conn, side)
            if not conn.closed and mask & selectors.EVENT_WRITE:
                self._pump(conn)
        except Exception as ex:
            self._record_error(ex, f"connection {conn.id} failed")
            self._finish(conn, reset=True)
        if not conn.closed:
            self._update_interest(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        assert self._sel is not None
        for _ in range(64):  # then let the other sockets have their turn
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up before we accepted
            try:
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as ex:  # out of file descriptors, for instance
                _close(client)
                self._record_error(ex, "cannot serve an accepted connection")
                return
            server.setblocking(False)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._changed:
                cid = self._next_id
                self._next_id += 1
                self._accepted += 1
                backend = self._target
                conn = _Conn(cid, client, server, backend)
                self._conns[cid] = conn
                self._changed.notify_all()
            try:
                err = server.connect_ex(backend)
            except OSError as ex:  # a host name that does not resolve, for instance
                err = ex.errno or errno.EHOSTUNREACH
            logger.debug("proxy %s: connection %d -> %s:%s", self._display, cid, *backend)
            if err not in (0, errno.EINPROGRESS):
                self._backend_failed(conn, err)
                continue
            self._update_interest(conn)

    def _connected(self, conn: _Conn) -> None:
        assert conn.server is not None
        err = conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._backend_failed(conn, err)
            return
        conn.connected = True
        self._pump(conn)

    def _backend_failed(self, conn: _Conn, err: int) -> None:
        logger.info(
            "proxy %s: connection %d: backend %s:%s refused (%s); closing the client",
            self._display,
            conn.id,
            *conn.backend,
            errno.errorcode.get(err, str(err)),
        )
        with self._changed:
            self._backend_failures += 1
        self._finish(conn, reset=True)

    def _read(self, conn: _Conn, side: str) -> None:
        sock = conn.client if side == "client" else conn.server
        if sock is None:
            return
        try:
            data = sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as ex:
            logger.debug("proxy %s: connection %d: %s: %s", self._display, conn.id, side, ex)
            self._finish(conn, reset=True)
            return
        if side == "client":
            if not data:  # pass the end-of-file on after what was forwarded
                conn.client_eof = True
                conn.c2s.push(_Action("eof", lambda: self._shut_write(conn, "server")), 0)
            elif not conn.discard_client:
                self._from_client(conn, data)
        elif not data:
            conn.server_eof = True
            if conn.discard_server:
                self._close_side(conn, "server")
            else:
                conn.s2c.push(_Action("eof", lambda: self._shut_write(conn, "client")), 0)
        elif not conn.discard_server:
            self._from_server(conn, data)
        self._pump(conn)

    # ------------------------------------------------------------------ relaying
    def _pump_all(self) -> None:
        for conn in list(self._conns.values()):
            if not conn.closed:
                try:
                    self._pump(conn)
                except Exception as ex:
                    self._record_error(ex, f"connection {conn.id} failed")
                    self._finish(conn, reset=True)
            if not conn.closed:
                self._update_interest(conn)

    def _pump(self, conn: _Conn) -> None:
        """Move due items of both pipes to their sockets; run actions in order."""
        if self._blackholed:
            return
        if conn.connected:
            self._pump_pipe(conn, conn.c2s, "server")
        if not conn.closed:
            self._pump_pipe(conn, conn.s2c, "client")

    def _pump_pipe(self, conn: _Conn, pipe: _Pipe, side: str) -> None:
        now = time.monotonic()
        while True:
            sock = conn.server if side == "server" else conn.client
            if sock is None:  # nobody to write to: drop the bytes, still run the actions
                actions = [item for _, item in pipe.queue if isinstance(item, _Action)]
                pipe.clear()
                for action in actions:
                    action.fn()
                return
            if pipe.out and not self._send(conn, pipe, sock, side):
                return
            if not pipe.queue or pipe.queue[0][0] > now:
                return
            _, item = pipe.queue.popleft()
            if isinstance(item, bytes):
                pipe.queued -= len(item)
                pipe.out += item
            else:
                item.fn()
                if conn.closed:
                    return

    def _send(self, conn: _Conn, pipe: _Pipe, sock: socket.socket, side: str) -> bool:
        """Write what the kernel takes of ``pipe.out``; True when all of it was written."""
        try:
            sent = sock.send(pipe.out)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as ex:
            logger.debug("proxy %s: connection %d: %s", self._display, conn.id, ex)
            self._finish(conn, reset=True)
            return False
        del pipe.out[:sent]
        with self._changed:
            if side == "server":
                self._bytes_to_server += sent
            else:
                self._bytes_to_client += sent
            self._changed.notify_all()
        return not pipe.out

    def _update_interest(self, conn: _Conn) -> None:
        assert self._sel is not None
        live = not self._blackholed
        if conn.client is not None:
            mask = 0
            if (
                live
                and not conn.client_eof
                and (conn.discard_client or conn.c2s.backlog < _BACKLOG_LIMIT)
            ):
                mask |= selectors.EVENT_READ
            if live and conn.s2c.out:
                mask |= selectors.EVENT_WRITE
            conn.client_masks = self._register(conn.client, conn.client_masks, mask, conn, "client")
        if conn.server is not None:
            mask = 0
            if not conn.connected:
                mask = selectors.EVENT_WRITE  # completing connect() is not relaying
            else:
                if (
                    live
                    and not conn.server_eof
                    and (conn.discard_server or conn.s2c.backlog < _BACKLOG_LIMIT)
                ):
                    mask |= selectors.EVENT_READ
                if live and conn.c2s.out:
                    mask |= selectors.EVENT_WRITE
            conn.server_masks = self._register(conn.server, conn.server_masks, mask, conn, "server")

    def _register(self, sock: socket.socket, old: int, new: int, conn: _Conn, side: str) -> int:
        assert self._sel is not None
        if old == new:
            return new
        if old and new:
            self._sel.modify(sock, new, (conn, side))
        elif new:
            self._sel.register(sock, new, (conn, side))
        else:
            self._sel.unregister(sock)
        return new

    def _shut_write(self, conn: _Conn, side: str) -> None:
        """Pass an end-of-file on: shut down writing towards ``side``."""
        sock = conn.server if side == "server" else conn.client
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        if conn.client_eof and conn.server_eof:
            self._finish(conn)

    def _close_side(self, conn: _Conn, side: str) -> None:
        sock = conn.client if side == "client" else conn.server
        if sock is None:
            return
        mask = conn.client_masks if side == "client" else conn.server_masks
        if mask and self._sel is not None:
            self._sel.unregister(sock)
        _close(sock)
        if side == "client":
            conn.client, conn.client_masks = None, 0
        else:
            conn.server, conn.server_masks = None, 0
        if conn.closed:
            with self._changed:
                self._conns.pop(conn.id, None)
                self._changed.notify_all()
            logger.debug("proxy %s: connection %d closed", self._display, conn.id)

    def _finish(self, conn: _Conn, *, reset: bool = False) -> None:
        """Close both sides of ``conn`` (``reset``: with a TCP RST)."""
        if reset:
            for sock in (conn.client, conn.server):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self._close_side(conn, "client")
        self._close_side(conn, "server")

    def _drop_all(self) -> int:
        conns = list(self._conns.values())
        for conn in conns:
            self._finish(conn, reset=True)
        return len(conns)

    def _set_blackhole(self, on: bool) -> None:
        if self._blackholed != on:
            logger.info("proxy %s: %s", self._display, "blackhole" if on else "restored")
        self._blackholed = on

    # ------------------------------------------------------------------ parsing: client
    def _go_blind(self, conn: _Conn, reason: str) -> None:
        if conn.blind is None:
            conn.blind = reason
            logger.warning(
                "proxy %s: connection %d is relayed blindly (%s): rules cannot fire on it",
                self._display,
                conn.id,
                reason,
            )
        conn.c_state = "blind"
        conn.s_state = "blind"

    def _from_client(self, conn: _Conn, data: bytes) -> None:
        self._relay(
            data,
            blind=conn.c_state == "blind",
            buf=conn.c_buf,
            pipe=conn.c2s,
            step=lambda out, delay: self._client_step(conn, out, delay),
            discarding=lambda: conn.discard_client,
        )

    def _relay(
        self,
        data: bytes,
        *,
        blind: bool,
        buf: bytearray,
        pipe: _Pipe,
        step: Callable[[bytearray, float], bool],
        discarding: Callable[[], bool],
    ) -> None:
        """Take ``data`` from one side into its buffer ``buf`` and push what its parser
        passes on to ``pipe``, delayed by the latency of now.

        ``step(out, delay)`` handles the buffer's next message, appending what goes on to
        ``out``; False when it needs more data. ``discarding()`` is True while this side's
        data is thrown away (a dropped connection). A ``blind`` side relays as it comes,
        after whatever its buffer still held when the other side made the connection blind.
        """
        delay = self._latency
        if blind:
            if buf:
                data = bytes(buf) + data
                buf.clear()
            pipe.push(data, delay)
            return
        buf += data
        out = bytearray()
        while not discarding() and step(out, delay):
            pass
        if discarding():
            buf.clear()
        if out:
            pipe.push(bytes(out), delay)

    def _client_step(self, conn: _Conn, out: bytearray, delay: float) -> bool:
        """Handle the next packet of the client's buffer; False when more data is needed."""
        buf = conn.c_buf
        if conn.c_state == "startup":
            return self._client_startup(conn, out)
        if conn.c_state == "await_answer" and buf:
            self._go_blind(conn, "client data before the encryption answer")
        if conn.c_state in ("await_answer", "blind"):
            out += buf
            buf.clear()
            return False
        try:
            raw = _take_message(buf)
        except ValueError:
            self._go_blind(conn, "bad client message length")
            return True
        if raw is None:
            return False
        self._client_message(conn, raw, out, delay)
        return True

    def _client_startup(self, conn: _Conn, out: bytearray) -> bool:
        """An untyped start-up packet: SSL/GSS/Cancel request or the startup message."""
        buf = conn.c_buf
        if buf[:1] == b"\x16":  # a TLS record (a start-up packet starts with 0)
            self._go_blind(conn, "direct TLS")
            return True
        if len(buf) < 8:
            return False
        length, code = struct.unpack_from("!ii", buf)
        if not 8 <= length <= _MAX_STARTUP:
            self._go_blind(conn, "bad start-up packet")
            return True
        if len(buf) < length:
            return False
        out += buf[:length]
        del buf[:length]
        if code in (_SSL_REQUEST, _GSSENC_REQUEST):
            conn.c_state = "await_answer"
            conn.s_state = "answer"
        elif code == _CANCEL_REQUEST:
            conn.c_state = "blind"  # nothing more to parse: not a "blind" connection
            conn.s_state = "blind"
        else:
            conn.c_state = "typed"
            conn.syncs += 1  # the start-up ends with a ReadyForQuery
        return True

    def _client_message(self, conn: _Conn, raw: bytes, out: bytearray, delay: float) -> None:
        """Handle one complete typed client message: forward it to ``out``, or act."""
        mtype = chr(raw[0])
        payload = raw[5:]
        query = self._track_statements(conn, mtype, payload)
        armed = conn.unit
        if armed is None and self._rules:
            statement = _statement_name(mtype, payload)
            rule = self._match(conn, ClientMessage(mtype, payload, query, conn.id, statement))
            if rule is not None:
                matched = _Armed(rule, mtype, query)
                if rule.when == "before":
                    self._flush(conn, out, delay)
                    conn.c2s.push(self._fire_action(conn, matched), delay)
                    conn.discard_client = True
                    return
                out += raw
                if mtype in _SYNC_POINTS:
                    conn.syncs += 1
                if mtype in _EXTENDED:
                    conn.unit = matched
                else:
                    self._unit_forwarded(conn, matched, out, delay)
                return
        out += raw
        if mtype in _SYNC_POINTS:
            conn.syncs += 1
        if armed is not None and mtype == "S":
            conn.unit = None
            self._unit_forwarded(conn, armed, out, delay)

    def _unit_forwarded(self, conn: _Conn, armed: _Armed, out: bytearray, delay: float) -> None:
        conn.discard_client = True  # nothing after the unit reaches the server
        if armed.rule.when == "after_forward":
            self._flush(conn, out, delay)
            conn.c2s.push(self._fire_action(conn, armed), delay)
        else:
            armed.reply_index = max(conn.syncs, conn.zs + 1)
            conn.reply_fault = armed

    @staticmethod
    def _flush(conn: _Conn, out: bytearray, delay: float) -> None:
        if out:
            conn.c2s.push(bytes(out), delay)
            out.clear()

    @staticmethod
    def _track_statements(conn: _Conn, mtype: str, payload: bytes) -> str | None:
        """The SQL text of a Query, Parse or Bind (named statement); remember prepared ones."""
        if mtype == "Q":
            return payload.split(b"\0", 1)[0].decode("utf-8", "replace")
        if mtype == "P":
            name, _, rest = payload.partition(b"\0")
            query = rest.split(b"\0", 1)[0].decode("utf-8", "replace")
            conn.statements[name.decode("utf-8", "replace")] = query
            return query
        if mtype == "B":
            statement = _statement_name(mtype, payload)
            return conn.statements.get(statement) if statement else None
        if mtype == "C" and payload[:1] == b"S":
            conn.statements.pop(payload[1:].split(b"\0", 1)[0].decode("utf-8", "replace"), None)
        return None

    def _match(self, conn: _Conn, message: ClientMessage) -> FaultRule | None:
        with self._lock:
            candidates = [
                r for r, left in self._rules.items() if left != 0 and conn.id >= r.first_connection
            ]
        for rule in candidates:
            try:
                matched = rule.match(message)
            except Exception as ex:
                self._record_error(ex, f"the matcher of {rule.name} raised")
                continue
            if not matched:
                continue
            with self._lock:
                if rule not in self._rules:
                    continue  # removed meanwhile
                left = self._rules[rule]
                if left is not None:
                    if left <= 1:
                        del self._rules[rule]
                    else:
                        self._rules[rule] = left - 1
            logger.debug(
                "proxy %s: %s matched a %r message on connection %d",
                self._display,
                rule.name,
                message.type,
                conn.id,
            )
            return rule
        return None

    # ------------------------------------------------------------------ parsing: server
    def _from_server(self, conn: _Conn, data: bytes) -> None:
        self._relay(
            data,
            blind=conn.s_state == "blind",
            buf=conn.s_buf,
            pipe=conn.s2c,
            step=lambda out, delay: self._server_step(conn, out, delay),
            discarding=lambda: conn.discard_server,
        )

    def _server_step(self, conn: _Conn, out: bytearray, delay: float) -> bool:
        """Handle the next message of the server's buffer; False when more data is needed."""
        buf = conn.s_buf
        if conn.s_state == "answer":
            if not buf:
                return False
            answer = buf[0]
            out += buf[:1]
            del buf[:1]
            if answer == ord("N"):
                conn.s_state = "typed"
                conn.c_state = "startup"
            else:
                reason = {ord("S"): "TLS", ord("G"): "GSSAPI encryption"}.get(
                    answer, f"unexpected answer {answer:#x} to an encryption request"
                )
                self._go_blind(conn, reason)
            return True
        if conn.s_state == "blind":
            out += buf
            buf.clear()
            return False
        try:
            raw = _take_message(buf)
        except ValueError:
            self._go_blind(conn, "bad server message length")
            return True
        if raw is None:
            return False
        reply = conn.zs + 1  # the number of the 'Z' this message leads up to
        is_ready = raw[0] == ord("Z")
        if is_ready:
            conn.zs += 1
        armed = conn.reply_fault
        if armed is None or reply < armed.reply_index:
            out += raw
        elif is_ready and reply == armed.reply_index:
            conn.reply_fault = None
            conn.discard_server = True  # the reply itself is thrown away
            if out:
                conn.s2c.push(bytes(out), delay)
                out.clear()
            conn.s2c.push(self._fire_action(conn, armed), delay)
        return True

    # ------------------------------------------------------------------ faults
    def _fire_action(self, conn: _Conn, armed: _Armed) -> _Action:
        return _Action("fault", lambda: self._fire(conn, armed))

    def _fire(self, conn: _Conn, armed: _Armed) -> None:
        """Record the fault, then close the client and drain the server until it closes."""
        fault = FiredFault(
            rule=armed.rule,
            when=armed.rule.when,
            connection_id=conn.id,
            message_type=armed.message_type,
            query=armed.query,
            at=time.monotonic(),
        )
        with self._changed:
            self._faults.append(fault)
            self._changed.notify_all()
        logger.info(
            "proxy %s: %s fired on connection %d (%r message)",
            self._display,
            armed.rule.name,
            conn.id,
            armed.message_type,
        )
        conn.discard_client = True
        conn.discard_server = True
        conn.reply_fault = None
        conn.unit = None
        conn.c2s.clear()
        conn.s2c.clear()
        self._close_side(conn, "client")
        # FIN after every byte written, and read until the server closes: what was
        # forwarded is processed (no RST can destroy it) and the backend exits on EOF
        if conn.server is not None:
            if conn.server_eof:
                self._close_side(conn, "server")
            else:
                with contextlib.suppress(OSError):
                    conn.server.shutdown(socket.SHUT_WR)


def _statement_name(mtype: str, payload: bytes) -> str | None:
    """The prepared statement a Parse or a Bind names (``""``: unnamed); None otherwise."""
    if mtype == "P":
        return payload.split(b"\0", 1)[0].decode("utf-8", "replace")
    if mtype == "B":
        parts = payload.split(b"\0", 2)
        return parts[1].decode("utf-8", "replace") if len(parts) > 1 else ""
    return None


def _take_message(buf: bytearray) -> bytes | None:
    """Remove and return the next complete typed message of ``buf`` (None: incomplete).

    Raises ValueError when the length word is impossible.
    """
    if len(buf) < 5:
        return None
    length = _INT32.unpack_from(buf, 1)[0]
    if length < 4:
        raise ValueError(f"message length {length}")
    if len(buf) < 1 + length:
        return None
    raw = bytes(buf[: 1 + length])
    del buf[: 1 + length]
    return raw


def _address(target: tuple[str, int] | Endpoint) -> tuple[str, int]:
    if isinstance(target, tuple):
        host, port = target
        return (str(host), int(port))
    return (target.host, int(target.port))
