"""Did a transaction whose COMMIT was lost commit? Pure decisions, no I/O.

When the connection dies while COMMIT is in flight, the transaction may or may not have
committed. PostgreSQL can say, given the transaction's id: ``pg_xact_status(xid)`` is
``committed``, ``aborted`` or ``in progress``. But after a failover (or a crash restart)
the answer comes from a server whose history was cut: if no WAL record carrying the xid
reached it, it may since have given the same number to another transaction, and its
"committed" would then be somebody else's. So the runner records, at the start of the
transaction, where and when it runs (:class:`CommitRecord`: xid, system identifier,
timeline, WAL position, server time), observes the current primary after reconnecting
(:class:`Observation`), and :func:`resolve` decides.

The WAL position is a *marker*: ``pg_logical_emit_message(true, 'pgfailover', '')``
writes one small WAL record carrying the xid and returns where it ends. Replaying any
record carrying an xid moves the replaying server's next xid past it, so a server whose
recovery ended at or after the marker can never give that number to anybody else: its
``pg_xact_status`` is about our transaction. A server whose recovery ended before the
marker has nothing of the transaction (its COMMIT comes after the marker). Either way the
outcome is known, with synchronous or asynchronous replication alike. Roles that may not
execute ``pg_logical_emit_message`` (it is granted to PUBLIC by default; some managed
services revoke it) get the WAL insert position instead (found out once per connection,
see :func:`record_sql`), and the case below that needs the marker stays UNKNOWN for them.
The resolution rules:

1. Another system identifier: a different cluster: UNKNOWN.
2. The same timeline and the server has run without restarting since the transaction
   began (or restarted cleanly, or its crash recovery replayed past the transaction's
   start): the xid means the same transaction, and ``pg_xact_status`` is the answer.
3. The next timeline (one failover) on a server that was already running when the
   transaction began, or the same timeline after a crash restart:
   ``pg_last_wal_replay_lsn()`` on it is where its recovery ended, the point where the
   history was cut. If that is before the marker, nothing of the transaction after the
   marker (its COMMIT included) is in the kept history: NOT_COMMITTED. Else an
   ``aborted``, ``in progress`` or not-yet-assigned xid means our commit is not in the
   kept history (had it been replayed, the xid would read ``committed``): NOT_COMMITTED,
   and a ``committed`` xid is ours (the marker was replayed, so the number was never
   given again): COMMITTED. Without a marker (the role may not emit one) a ``committed``
   may be ours or a later transaction's that reused the number: UNKNOWN, unless the
   caller can check for the work's own effect (an idempotency key).
4. Anything else (several timelines later, a server restarted since): UNKNOWN.

``in progress`` on the same timeline is PENDING: ask again a little later.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

#: Whether the session's role may write the marker (see the module doc).
_MARKER_ALLOWED_SQL = (
    "pg_catalog.has_function_privilege("
    "'pg_catalog.pg_logical_emit_message(boolean,text,text)', 'EXECUTE')"
)
#: The marker: a WAL record carrying the transaction's xid; where it ends, as text.
_MARKER_SQL = "pg_catalog.pg_logical_emit_message(true, 'pgfailover', '')::text"
_INSERT_LSN_SQL = "pg_catalog.pg_current_wal_insert_lsn()::text"

#: A postmaster's identity column when it is not known yet: its start time (epoch, to the
#: microsecond), the system identifier, and whether the session may write the marker.
#: ``pg_control_system()`` opens and reads the control file on every call, so it is read
#: once per connection and server.
_IDENTITY_SQL = (
    "extract(epoch FROM pg_catalog.pg_postmaster_start_time())::text || ' ' || "
    "(pg_catalog.pg_control_system()).system_identifier::text || ' ' || "
    f"{_MARKER_ALLOWED_SQL}::text"
)


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """A running postmaster: when it started, and its cluster's system identifier; and
    whether the connection's role may write the WAL marker there.

    A system identifier cannot change while a postmaster runs, and two postmasters do not
    start in the same microsecond, so a server whose start time matches ``started_at`` has
    this ``system_id``. ``marker`` (the role may execute ``pg_logical_emit_message``) is
    read with the rest, once per connection and server.
    """

    started_at: datetime
    system_id: str
    marker: bool = False


def record_sql(
    known: ServerIdentity | None = None, *, same_server: bool = False, marker: bool | None = None
) -> str:
    """The statement recording where a transaction runs, for a transaction already begun.

    Five text columns (see :func:`parse_record`): the xid (``pg_current_xact_id()``
    assigns it, and goes first: on a standby it fails with the standby's own 25006, which
    the classifier knows, before the WAL functions would fail with 55000), the WAL file
    of the insert position (the timeline is in its name), the marker's end (or the WAL
    insert position without a marker), the server's clock (epoch), and the server's
    identity: NULL when the postmaster is the one ``known`` describes (CASE evaluates the
    other branch lazily: no control-file read), else its start time, system identifier and
    marker privilege. Plain columns, no subquery: planning is part of the cost of every
    transaction.

    ``marker``: write the WAL marker (True) or read the insert position (False); None
    means as ``known`` says, and True for an unknown server. PostgreSQL checks a
    function's EXECUTE privilege when the statement starts, even in a branch never taken,
    so the privilege cannot be tested in the same statement: a role that may not write the
    marker gets the server's permission error, and the caller sends the record again with
    ``marker=False`` and no ``known`` (:func:`pgfailover._runner.begin_and_record` does).

    ``same_server=True`` says the connection cannot have changed servers since ``known``
    was read (a direct connection: a server restart ends it; only a pooler can hand a
    client connection another server): the identity column is then a plain NULL, which
    spares the comparison (a third of the record's server time, measured).
    """
    if marker is None:
        marker = known.marker if known is not None else True
    position = _MARKER_SQL if marker else _INSERT_LSN_SQL
    if known is None:
        identity = _IDENTITY_SQL
    elif same_server:
        identity = "NULL"
    else:
        started = known.started_at.isoformat()  # ISO 8601: parsed alike in any DateStyle
        identity = (
            f"CASE WHEN pg_catalog.pg_postmaster_start_time() = '{started}' "
            f"THEN NULL ELSE {_IDENTITY_SQL} END"
        )
    return _record(position, identity)


def _record(position: str, identity: str) -> str:
    return (
        "SELECT pg_catalog.pg_current_xact_id()::text, "
        "pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), "
        f"{position}, extract(epoch FROM pg_catalog.clock_timestamp())::text, {identity}"
    )


#: :func:`record_sql` without a known server (reads the system identifier).
RECORD_SQL = record_sql()
#: The same without the marker: for a role that may not write it.
UNMARKED_RECORD_SQL = record_sql(marker=False)
#: The server's identity alone (one row, one column, as the record's last column), for
#: callers that read it before their first record (see :func:`parse_identity`).
IDENTITY_SQL = f"SELECT {_IDENTITY_SQL}"
#: The bytes of the marker's call in a record statement.
MARKER_CALL = _MARKER_SQL.encode()
#: Sent instead of a bare BEGIN (one round trip either way): opens the transaction and
#: records where it runs.
BEGIN_SQL = "BEGIN; " + RECORD_SQL


def parse_record(
    values: Sequence[str | None], known: ServerIdentity | None = None, endpoint: str = ""
) -> tuple[CommitRecord, ServerIdentity]:
    """The :class:`CommitRecord` in a :func:`record_sql` row, and the server's identity
    (to pass to the next :func:`record_sql` on the same connection).

    Raises ValueError for a malformed row, or a NULL identity without ``known``.
    """
    try:
        *required, identity_text = values
        xid, walfile, lsn, epoch = map(_not_null, required)
        identity = _identity(identity_text, known)
        record = CommitRecord(
            xid=str(int(xid)),
            system_id=identity.system_id,
            timeline=timeline_of(walfile),
            start_lsn=lsn,
            server_time=_from_epoch(epoch),
            endpoint=endpoint,
            # What the statement wrote: it chose by `known` when there was one (a server
            # changed behind a pooler is read anew, but the position was already chosen).
            marked=(known or identity).marker,
        )
        lsn_value(lsn)
    except (ValueError, TypeError) as ex:
        raise ValueError(f"not a commit record: {values!r} ({ex})") from None
    return record, identity


def _not_null(value: str | None) -> str:
    if value is None:
        raise ValueError("a NULL where the record has none")
    return value


def parse_identity(text: str) -> ServerIdentity:
    """The :class:`ServerIdentity` in an :data:`IDENTITY_SQL` value (ValueError if it is
    not one)."""
    try:
        return _identity(text, None)
    except (ValueError, TypeError) as ex:
        raise ValueError(f"not a server identity: {text!r} ({ex})") from None


def _identity(text: str | None, known: ServerIdentity | None) -> ServerIdentity:
    if text is None:
        if known is None:
            raise ValueError("the record reuses a server identity nobody knows")
        return known
    started, system_id, marker = text.split(" ")
    int(system_id)
    if marker not in ("true", "false"):
        raise ValueError(f"not a boolean: {marker!r}")
    return ServerIdentity(_from_epoch(started), system_id, marker == "true")


def _from_epoch(epoch: str) -> datetime:
    """``'1795000000.123456'`` (seconds since 1970, UTC) as an aware datetime, exactly."""
    whole, _, fraction = epoch.partition(".")
    if not whole.lstrip("-").isdigit() or (fraction and not fraction.isdigit()):
        raise ValueError(f"not an epoch: {epoch!r}")
    micros = int((fraction + "000000")[:6])
    return _EPOCH + timedelta(seconds=int(whole), microseconds=micros)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: What the current primary says, in one round trip (parameter: the xid as text).
OBSERVE_SQL = (
    "SELECT (SELECT system_identifier FROM pg_catalog.pg_control_system())::text, "
    "pg_catalog.pg_is_in_recovery(), "
    "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
    "ELSE pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()) END, "
    "pg_catalog.pg_last_wal_replay_lsn()::text, pg_catalog.pg_postmaster_start_time(), "
    "CASE WHEN %(xid)s::text::xid8 < pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) "
    "THEN pg_catalog.pg_xact_status(%(xid)s::text::xid8) ELSE 'future' END"
)


class Outcome(enum.Enum):
    """What :func:`resolve` concluded about a transaction whose COMMIT was lost."""

    COMMITTED = "committed"  #: it committed: report success, never run it again
    NOT_COMMITTED = "not committed"  #: it did not: running it again is safe
    PENDING = "pending"  #: still in progress on the same server: ask again shortly
    UNKNOWN = "unknown"  #: cannot tell: raise CommitOutcomeUnknown, never guess


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """Where and when a transaction ran, recorded when it began.

    ``xid`` is the full (epoch-extended) transaction id as text; ``timeline`` is the
    timeline it began on; ``start_lsn`` is where the WAL marker carrying the xid ends when
    ``marked`` (the module doc says why that settles a cut history), else the WAL insert
    position when it began; ``server_time`` is the server's clock then; ``endpoint`` is
    ``host:port`` as the client saw it (for messages).
    """

    xid: str
    system_id: str
    timeline: int
    start_lsn: str
    server_time: datetime
    endpoint: str = ""
    marked: bool = False


@dataclass(frozen=True, slots=True)
class Observation:
    """What the server believed to be the primary said, from :data:`OBSERVE_SQL`.

    ``timeline`` is None on a standby; ``replay_end_lsn`` is ``pg_last_wal_replay_lsn()``:
    where the recovery the server ran since it started ended (None after a clean start);
    ``status`` is ``pg_xact_status`` of the xid (``committed``, ``aborted``,
    ``in progress``), ``future`` if the xid is not assigned yet there, or None if it is too
    old to know.
    """

    system_id: str
    in_recovery: bool
    timeline: int | None
    replay_end_lsn: str | None
    started_at: datetime
    status: str | None

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> Observation:
        """Build from an :data:`OBSERVE_SQL` row."""
        system_id, in_recovery, walfile, replay, started, status = row
        assert isinstance(started, datetime)
        return cls(
            str(system_id),
            bool(in_recovery),
            timeline_of(str(walfile)) if walfile else None,
            str(replay) if replay is not None else None,
            started,
            str(status) if status is not None else None,
        )


def timeline_of(walfile: str) -> int:
    """The timeline in a WAL file name (its first 8 hex digits)."""
    return int(walfile[:8], 16)


def lsn_value(lsn: str) -> int:
    """``'16/B374D848'`` as a number, for comparisons."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def resolve(record: CommitRecord, seen: Observation) -> tuple[Outcome, str]:
    """Decide what became of the transaction ``record`` describes (see the module doc).

    Returns the outcome and one sentence saying why (for logs and errors).
    """
    if seen.in_recovery or seen.timeline is None:
        return Outcome.UNKNOWN, "the server asked is a standby: ask the primary"
    if seen.system_id != record.system_id:
        return Outcome.UNKNOWN, (
            f"the primary belongs to another system ({seen.system_id}, the transaction ran "
            f"on {record.system_id})"
        )
    status = seen.status
    up_since_begin = seen.started_at < record.server_time
    if seen.timeline == record.timeline:
        if up_since_begin or seen.replay_end_lsn is None:
            # Running since, or restarted cleanly (a shutdown checkpoint keeps the next xid
            # past every assigned one): the number was never given to anybody else.
            return _by_status(status, "on the same timeline")
        # A crash restart: pg_current_xact_id() writes no WAL, so the xid is reusable unless
        # a record of the transaction was replayed, which nothing here can prove.
        return _after_a_loss(record, seen, "after a crash restart on the same timeline")
    if seen.timeline == record.timeline + 1 and up_since_begin:
        return _after_a_loss(record, seen, "on the new timeline")
    return Outcome.UNKNOWN, (
        f"the primary is on timeline {seen.timeline} (the transaction ran on "
        f"{record.timeline}) and "
        + ("has restarted since" if not up_since_begin else "several failovers happened")
    )


def _after_a_loss(record: CommitRecord, seen: Observation, where: str) -> tuple[Outcome, str]:
    """History may have been cut (a failover, a crash): the xid may have been reused.

    If the history kept on the server ends before the transaction's marker (or start),
    nothing after it survived. Otherwise an aborted, in-progress or unassigned xid means
    our commit is not there (had it survived, the xid would read committed and could not
    have been reused); a committed one is ours when the marker was replayed (the number
    was never given again), and may be somebody else's without a marker.
    """
    status = seen.status
    if seen.replay_end_lsn is None:
        return Outcome.NOT_COMMITTED, (
            f"{where}: the server ran no recovery since it started, before the transaction "
            "began: it never had the transaction's WAL"
        )
    if lsn_value(seen.replay_end_lsn) < lsn_value(record.start_lsn):
        return Outcome.NOT_COMMITTED, (
            f"{where}: the kept history ends at {seen.replay_end_lsn}, before the transaction "
            f"began at {record.start_lsn}: nothing of it survived"
        )
    if status in ("aborted", "in progress", "future"):
        return Outcome.NOT_COMMITTED, (
            f"xid {record.xid} is {status} {where}: the commit did not survive"
        )
    if status == "committed" and record.marked:
        return Outcome.COMMITTED, (
            f"xid {record.xid} is committed {where}, and the history kept there (to "
            f"{seen.replay_end_lsn}) holds the marker carrying it (to {record.start_lsn}): "
            "the number was never given again"
        )
    if status == "committed":
        return Outcome.UNKNOWN, (
            f"xid {record.xid} is committed {where}, but the number may belong to a later "
            "transaction (the history was cut after the transaction began, and the role may "
            "not write the marker that would tell: grant it EXECUTE on "
            "pg_logical_emit_message(boolean, text, text))"
        )
    return Outcome.UNKNOWN, f"xid {record.xid} is too old for its status to be known"


def _by_status(status: str | None, where: str) -> tuple[Outcome, str]:
    if status == "committed":
        return Outcome.COMMITTED, f"the transaction is committed {where}"
    if status == "aborted":
        return Outcome.NOT_COMMITTED, f"the transaction is aborted {where}"
    if status == "in progress":
        return Outcome.PENDING, f"the transaction is still in progress {where}"
    if status == "future":
        return Outcome.UNKNOWN, f"the xid is not assigned yet {where}: an inconsistent answer"
    return Outcome.UNKNOWN, f"the transaction is too old for its status to be known {where}"
