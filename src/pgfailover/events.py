"""Failover events: one structured record per incident, logged once, delivered to hooks.

Every event is logged once, at WARNING, on the ``pgfailover.events`` logger (the library
never configures handlers), with the SQLSTATE, the message, the node, whether it came
through a pooler, the verdict, the action taken and the caller's stack: psycopg strips its
own traceback from the exceptions it raises, so without this the stack would be lost.

Applications (and metrics exporters) subscribe with :func:`subscribe`; a hook receives the
frozen :class:`FailoverEvent`. A hook that raises is logged and never breaks the caller.
Nothing in an event holds a password: the node is a host and port, and messages pass
through the classifier's scrubbing.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .classify import Verdict
from .outcome import Outcome

logger = logging.getLogger("pgfailover.events")

#: Diagnostic fields copied from a psycopg error, when the server sent them.
DIAG_FIELDS = (
    "severity_nonlocalized",
    "message_detail",
    "message_hint",
    "context",
    "schema_name",
    "table_name",
    "column_name",
    "constraint_name",
    "source_function",
)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Where an event happened, as the client sees it.

    ``host``/``port`` are the endpoint the client connected to (a pooler's, through one).
    ``backend_pid`` is the PID the client was given at start-up: through a multiplexing
    pooler it is the pooler's, not the server's. ``via_pooler`` is None when unknown.
    ``server`` is the ``host:port`` of the PostgreSQL server behind the endpoint as of the
    connection's last query probe, None if never probed.
    """

    host: str | None
    port: int | None
    backend_pid: int | None
    via_pooler: bool | None
    server: str | None = None

    def __str__(self) -> str:
        where = f"{self.host}:{self.port}" if self.host else "unknown node"
        pid = f" pid {self.backend_pid}" if self.backend_pid else ""
        pooled = {True: " via pooler", False: " direct", None: ""}[self.via_pooler]
        server = f" (server {self.server})" if self.server and self.via_pooler else ""
        return f"{where}{pid}{pooled}{server}"


@dataclass(frozen=True, slots=True)
class FailoverEvent:
    """One failover incident seen on a connection, and what pgfailover did about it.

    ``action`` says what was done (e.g. "connection poisoned"); ``error_type`` is the
    exception's qualified class name; ``diagnostics`` holds the server's diagnostic fields
    that were present; ``stack`` is the caller's stack at the failing call, formatted;
    ``timestamp`` is wall-clock (``time.time()``) and ``monotonic`` is ``time.monotonic()``.
    """

    verdict: Verdict
    node: NodeInfo
    action: str
    error_type: str
    diagnostics: Mapping[str, str] = field(default_factory=dict)
    stack: str = ""
    timestamp: float = field(default_factory=time.time)
    monotonic: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """One line: SQLSTATE (``(no SQLSTATE)`` for an error without one, e.g. a lost
        connection), message, node, verdict, action."""
        v = self.verdict
        return (
            f"{v.sqlstate or '(no SQLSTATE)'} {self.error_type}: {v.message} | node {self.node} | "
            f"verdict {v.kind.value} (retry: {v.retry.value}) | {v.reason} | action: {self.action}"
        )


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A unit of work failed and pgfailover decided what to do next.

    ``attempt`` is the number of the attempt that failed (1 for the first); ``wait`` the
    seconds slept before the next one (0 if none follows); ``action`` says what happens
    next (``retry``, ``give up``, ``committed``: a lost COMMIT turned out to have
    committed, ...); ``cause`` is the verdict of the failure; ``error_type`` its qualified
    class name; ``elapsed`` the seconds since the first attempt began. ``outcome`` is set
    when the failure was a lost COMMIT whose fate was settled: ``Outcome.COMMITTED`` (action
    ``committed``), ``Outcome.NOT_COMMITTED`` (looked up, or taken as such for read-only or
    idempotent work: then retried or given up) or ``Outcome.UNKNOWN`` (given up:
    ``CommitOutcomeUnknown`` raised); None for every other failure.
    """

    attempt: int
    wait: float
    action: str
    cause: Verdict
    error_type: str
    elapsed: float
    detail: str = ""
    stack: str = ""
    outcome: Outcome | None = None
    timestamp: float = field(default_factory=time.time)
    monotonic: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """One line: attempt, cause (its SQLSTATE or ``(no SQLSTATE)``), action, wait."""
        v = self.cause
        wait = f" in {self.wait:.3f} s" if self.wait else ""
        detail = f" | {self.detail}" if self.detail else ""
        return (
            f"attempt {self.attempt} failed after {self.elapsed:.3f} s: "
            f"{v.sqlstate or '(no SQLSTATE)'} {self.error_type}: {v.message} | verdict "
            f"{v.kind.value} (retry: {v.retry.value}) | action: {self.action}{wait}{detail}"
        )


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """A pool (or an instrumented SQLAlchemy engine) acted on a failover.

    ``action`` is ``generation purged`` (every connection opened before now is closed when
    idle or returned; ``reason`` says why) or ``primary reached again`` (the first new
    connection to a writable primary after an outage; ``recovery`` is the seconds since
    the outage was noticed, None for other actions). ``pool`` names the pool (its
    ``name``, or the engine's URL without password); ``generation`` is the pool's
    generation after the action.
    """

    action: str
    pool: str
    generation: int
    reason: str = ""
    recovery: float | None = None
    stack: str = ""
    timestamp: float = field(default_factory=time.time)
    monotonic: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """One line: pool, action, why or how long."""
        how = f" after {self.recovery:.3f} s" if self.recovery is not None else ""
        why = f": {self.reason}" if self.reason else ""
        return f"pool {self.pool}: {self.action}{how} (generation {self.generation}){why}"


@dataclass(frozen=True, slots=True)
class TopologyEvent:
    """A topology source (:mod:`pgfailover.topology`) saw something a human should know.

    ``action`` is ``in-band fallback`` (the Patroni REST API failed: the last known members
    are checked in-band instead; emitted once until the API answers again), ``REST API
    answers again``, ``fenced`` (an endpoint that says it is a writable primary was refused:
    it is not the leader, or is on an older timeline) or ``split brain`` (in-band checks
    found several primaries; ``detail`` says which one was chosen, if any). ``source`` names
    the source (its class and where it looks), ``leader`` is the leader's ``host:port``
    when one is known, ``detail`` says what was seen. Nothing in it holds a password.
    """

    action: str
    source: str
    detail: str = ""
    leader: str | None = None
    timestamp: float = field(default_factory=time.time)
    monotonic: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """One line: source, action, what was seen, the leader."""
        leader = f" (leader {self.leader})" if self.leader else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"topology {self.source}: {self.action}{detail}{leader}"


#: Everything a hook can receive.
Event = FailoverEvent | RetryEvent | PoolEvent | TopologyEvent


class EventHook(Protocol):
    """A subscriber: called once per event, in the thread (or task) that hit the failure.

    It receives a :class:`FailoverEvent` (a connection found its node unusable), a
    :class:`RetryEvent` (a unit of work failed; what happens next), a :class:`PoolEvent`
    (a pool purged a generation, or reached a primary again) or a :class:`TopologyEvent`
    (a topology source fell back, fenced a node, saw a split brain); tell them apart with
    ``isinstance``.
    """

    def __call__(self, event: Event, /) -> None: ...


_hooks: list[EventHook] = []  # replaced whole under the lock, read without it
_hooks_lock = threading.Lock()


def subscribe(hook: EventHook) -> Callable[[], None]:
    """Deliver every later event to ``hook``; returns a function that unsubscribes it.

    Subscribing the same hook twice delivers each event to it once.
    """
    with _hooks_lock:
        if hook not in _hooks:
            _hooks[:] = [*_hooks, hook]
    return lambda: unsubscribe(hook)


def unsubscribe(hook: EventHook) -> None:
    """Stop delivering events to ``hook`` (no-op if it is not subscribed)."""
    with _hooks_lock:
        _hooks[:] = [h for h in _hooks if h != hook]


def caller_stack(skip_modules: tuple[str, ...] = ("pgfailover", "psycopg")) -> str:
    """The current stack, formatted, without the innermost frames of ``skip_modules``.

    Frames of the library and the driver at the top of the stack say nothing about the
    caller; frames of user code above and below them are kept.
    """
    frames = traceback.extract_stack()[:-1]
    while frames and any(f"/{m}/" in frames[-1].filename for m in skip_modules):
        frames.pop()
    return "".join(traceback.format_list(frames))


def diagnostics_of(exc: BaseException) -> dict[str, str]:
    """The server's diagnostic fields present on a psycopg error (empty for other errors)."""
    diag = getattr(exc, "diag", None)
    if diag is None:
        return {}
    found: dict[str, str] = {}
    for name in DIAG_FIELDS:
        try:
            value = getattr(diag, name)
        except Exception:  # a diagnostics object must never break reporting
            logger.debug("cannot read diagnostic field %s", name, exc_info=True)
            continue
        if value:
            found[name] = str(value)
    return found


def _emit(event: Event) -> None:
    """Log ``event`` once and deliver it to every subscribed hook.

    Failover events are logged at WARNING with the caller's stack; retry events at INFO
    when the work goes on, at WARNING when it gives up; pool and topology events at
    WARNING, without a stack (they are the pool's or the source's, not a caller's).
    """
    if isinstance(event, RetryEvent) and event.action == "retry":
        logger.info("%s", event.summary(), extra={"pgfailover_event": event})
    elif isinstance(event, (PoolEvent, TopologyEvent)):
        logger.warning("%s", event.summary(), extra={"pgfailover_event": event})
    else:
        logger.warning(
            "%s\nStack (most recent call last):\n%s",
            event.summary(),
            event.stack.rstrip(),
            extra={"pgfailover_event": event},
        )
    for hook in tuple(_hooks):
        try:
            hook(event)
        except Exception:
            logger.exception("pgfailover event hook %r raised; the event was: %s", hook, event)
