"""The drill's defaults, bounds and stack names, without its dependencies.

The command line builds its parser from this module for every command, ``probe`` included,
so it imports neither psycopg_pool nor SQLAlchemy: :class:`~pgfailover.drill.run.DrillOptions`
and the stack classes (:mod:`pgfailover.drill.stacks`) take their defaults, limits and names
from here.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "DEFAULT_AFTER",
    "DEFAULT_BEFORE",
    "DEFAULT_FOLLOWER_INTERVAL",
    "DEFAULT_RATE",
    "DEFAULT_REPOINT_DELAY",
    "DEFAULT_WORKERS",
    "FAULTS",
    "HA_KINDS",
    "MAX_RATE",
    "MAX_SECONDS",
    "MAX_WORKERS",
    "OPTIONAL_STACK_NAMES",
    "STACK_NAMES",
    "select_stacks",
    "stack_key",
]

#: Seconds from the promotion to PgBouncer's repoint.
DEFAULT_REPOINT_DELAY: Final = 2.0
#: Seconds between two rounds of the PgBouncer follower of ``--follower`` (the default of
#: ``pgfailover pgbouncer follow --interval``).
DEFAULT_FOLLOWER_INTERVAL: Final = 0.5
#: Seconds of writing before the failover.
DEFAULT_BEFORE: Final = 3.0
#: Seconds of writing after the primary is reachable again.
DEFAULT_AFTER: Final = 5.0
#: Writes per second per worker.
DEFAULT_RATE: Final = 20.0
#: Writer threads per stack (and connections in each stack's pool).
DEFAULT_WORKERS: Final = 2

#: What runs the failover: ``local`` (the harness promotes a standby of a
#: :class:`~pgfailover.testing.LocalCluster`) or ``patroni`` (Patroni elects a new leader of
#: a :class:`~pgfailover.testing.PatroniCluster`). The first is the default.
HA_KINDS: Final = ("local", "patroni")
#: The faults a Patroni drill can inflict on the leader, the first being the default:
#: ``crash`` (SIGKILL of its Patroni and postmaster), ``switchover`` (planned, through the
#: REST API), ``freeze`` (SIGSTOP of every process of the node: a hung machine; thawed and
#: healed once the new leader takes writes).
FAULTS: Final = ("crash", "switchover", "freeze")

#: Upper bound of every time option (seconds).
MAX_SECONDS: Final = 600.0
#: Upper bound of ``rate`` (writes per second per worker).
MAX_RATE: Final = 1000.0
#: Upper bound of ``workers`` (threads per stack).
MAX_WORKERS: Final = 16

#: The stacks' names as the report shows them, in display order (naive stacks first).
#: ``pgfailover.drill.stacks.STACKS`` has one class per name, in this order.
STACK_NAMES: Final = (
    "psycopg_pool",
    "SQLAlchemy pre_ping",
    "pgfailover pool",
    "SQLAlchemy instrumented",
    "pgfailover pool + runner",
    "SQLAlchemy instrumented + runner",
)

#: Stacks that run only when ``--stacks`` names them (they need Django: the stock backend,
#: and ``pgfailover.django`` under its runner). ``pgfailover.drill.stacks.OPTIONAL_STACKS``
#: has one class per name, in this order.
OPTIONAL_STACK_NAMES: Final = ("Django postgresql", "Django pgfailover + runner")
#: Display order of every stack: naive ones first, each group in its list's order.
_ORDER: Final = (
    *STACK_NAMES[:2],
    OPTIONAL_STACK_NAMES[0],
    *STACK_NAMES[2:],
    OPTIONAL_STACK_NAMES[1],
)


def stack_key(name: str) -> str:
    """The slug of a stack name: lower case, every run of other characters than letters and
    digits turned into one ``-`` (``"pgfailover pool + runner"`` -> ``pgfailover-pool-runner``).
    """
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


_BY_KEY: Final = {stack_key(name): name for name in _ORDER}


def select_stacks(text: str) -> tuple[str, ...]:
    """The stack names a comma-separated ``--stacks`` value selects, in display order.

    Each item is a stack's name as the report shows it or its slug (:func:`stack_key`),
    from :data:`STACK_NAMES` or :data:`OPTIONAL_STACK_NAMES`;
    case, spaces and punctuation do not matter (``psycopg_pool``, ``psycopg-pool`` and
    ``PSYCOPG POOL`` are the same stack). Raises ValueError naming the unknown items and
    listing the valid keys, or saying that none was given.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"choose at least one stack: {', '.join(_BY_KEY)}")
    unknown = [item for item in items if stack_key(item) not in _BY_KEY]
    if unknown:
        shown = ", ".join(repr(item) for item in unknown)
        raise ValueError(
            f"unknown stack{'s' if len(unknown) > 1 else ''} {shown}: choose from "
            f"{', '.join(_BY_KEY)} "
            "(or the names the report shows)"
        )
    chosen = {_BY_KEY[stack_key(item)] for item in items}
    return tuple(name for name in _ORDER if name in chosen)
