"""Keep psycopg 3 applications writing through a PostgreSQL failover.

The core: :func:`classify` turns an exception into a :class:`Verdict`; :class:`Connection`
and :class:`AsyncConnection` are psycopg connections that poison themselves when their node
can no longer write; :func:`probe` tells a primary from a standby; :func:`subscribe`
delivers :class:`FailoverEvent` records. The test bed lives in :mod:`pgfailover.testing`.
"""

from __future__ import annotations

from .classify import (
    RECOVERY_MESSAGE,
    Kind,
    Phase,
    Retry,
    Verdict,
    classify,
    is_failover_error,
    is_retryable,
    sqlstate_of,
)
from .connection import AsyncConnection, Connection
from .events import EventHook, FailoverEvent, NodeInfo, subscribe, unsubscribe
from .probe import Role, RoleReport, aprobe, probe

__all__ = [
    "RECOVERY_MESSAGE",
    "AsyncConnection",
    "Connection",
    "EventHook",
    "FailoverEvent",
    "Kind",
    "NodeInfo",
    "Phase",
    "Retry",
    "Role",
    "RoleReport",
    "Verdict",
    "aprobe",
    "classify",
    "is_failover_error",
    "is_retryable",
    "probe",
    "sqlstate_of",
    "subscribe",
    "unsubscribe",
]
