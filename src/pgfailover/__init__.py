"""Keep psycopg 3 applications writing through a PostgreSQL failover.

The core: :func:`classify` turns an exception into a :class:`Verdict`; :class:`Connection`
and :class:`AsyncConnection` are psycopg connections that poison themselves when their node
can no longer write; :func:`probe` tells a primary from a standby; :func:`subscribe`
delivers :class:`FailoverEvent` records. The test bed lives in :mod:`pgfailover.testing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._runner import transaction
from .classify import (
    RECOVERY_MESSAGE,
    Kind,
    Phase,
    RetryCondition,
    Verdict,
    classify,
    is_failover_error,
    is_retryable,
    sqlstate_of,
)
from .connection import AsyncConnection, Connection
from .errors import CommitOutcomeUnknown, InvalidConninfo, NotWritable
from .events import (
    Event,
    EventHook,
    FailoverEvent,
    NodeInfo,
    PoolEvent,
    RetryEvent,
    TopologyEvent,
    subscribe,
    unsubscribe,
)
from .outcome import Outcome
from .policy import Decision, RetryPolicy
from .probe import Role, RoleReport, aprobe, probe
from .retry import TransactionRunner, run_transaction
from .retry_async import AsyncTransactionRunner, arun_transaction

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from .errors import NoPrimaryAvailable
    from .pool import ConnectionPool
    from .pool_async import AsyncConnectionPool
    from .readiness import health
    from .topology import (
        AsyncHostListTopology,
        AsyncPatroniTopology,
        HostListTopology,
        PatroniTopology,
    )

_POOL_NAMES = ("AsyncConnectionPool", "ConnectionPool", "NoPrimaryAvailable")
_POOL_MODULES = {
    "AsyncConnectionPool": "pool_async",
    "ConnectionPool": "pool",
    "NoPrimaryAvailable": "errors",
}

#: Topology sources, imported on first use (they bring urllib and the in-band checks).
_TOPOLOGY_NAMES = (
    "AsyncHostListTopology",
    "AsyncPatroniTopology",
    "HostListTopology",
    "PatroniTopology",
)


def __getattr__(name: str) -> object:
    """Import the optional integrations on first use: the pools need the ``pool`` extra
    (psycopg_pool), :mod:`pgfailover.sqlalchemy` the ``sqlalchemy`` extra; the topology
    sources (:mod:`pgfailover.topology`) and :func:`pgfailover.health`
    (:mod:`pgfailover.readiness`) need nothing extra."""
    if name == "health":
        from .readiness import health  # noqa: PLC0415 - lazy: only probes need it

        return health
    if name == "sqlalchemy":
        import importlib  # noqa: PLC0415 - lazy: the sqlalchemy extra is optional

        return importlib.import_module(".sqlalchemy", __name__)
    if name in _TOPOLOGY_NAMES:
        from . import topology  # noqa: PLC0415 - lazy: only clusters with a topology need it

        return getattr(topology, name)
    if name in _POOL_NAMES:
        import importlib  # noqa: PLC0415 - lazy: the pool extra is optional

        try:
            module = importlib.import_module(f".{_POOL_MODULES[name]}", __name__)
        except ImportError as ex:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                f"pgfailover.{name} needs psycopg_pool: pip install 'pgfailover[pool]'"
            ) from ex
        return getattr(module, name)
    raise AttributeError(f"module 'pgfailover' has no attribute {name!r}")


__all__ = [  # includes the lazily imported pool and topology names
    "RECOVERY_MESSAGE",
    "AsyncConnection",
    "AsyncConnectionPool",
    "AsyncHostListTopology",
    "AsyncPatroniTopology",
    "AsyncTransactionRunner",
    "CommitOutcomeUnknown",
    "Connection",
    "ConnectionPool",
    "Decision",
    "Event",
    "EventHook",
    "FailoverEvent",
    "HostListTopology",
    "InvalidConninfo",
    "Kind",
    "NoPrimaryAvailable",
    "NodeInfo",
    "NotWritable",
    "Outcome",
    "PatroniTopology",
    "Phase",
    "PoolEvent",
    "RetryCondition",
    "RetryEvent",
    "RetryPolicy",
    "Role",
    "RoleReport",
    "TopologyEvent",
    "TransactionRunner",
    "Verdict",
    "aprobe",
    "arun_transaction",
    "classify",
    "health",
    "is_failover_error",
    "is_retryable",
    "probe",
    "run_transaction",
    "sqlstate_of",
    "subscribe",
    "transaction",
    "unsubscribe",
]
