"""PgBouncer and failovers: its admin console, the doctor's rules, the repoint.

- :mod:`.admin`: :class:`AdminConsole`, a typed client of the admin console (``SHOW
  VERSION``/``CONFIG``/``DATABASES``/``SERVERS``, ``RELOAD``, ``PAUSE``/``RESUME``,
  ``RECONNECT``, ``KILL``) with password-free errors;
- :mod:`.ini`: pgbouncer.ini parsing (``%include`` followed) and the byte-preserving
  rewrite of ``[databases]`` host/port;
- :mod:`.doctor`: the rules, pure functions of a :class:`BouncerConfig`;
- :mod:`.repoint`: :func:`repoint`, atomic rewrite + RELOAD + RECONNECT + check;
- :mod:`.follow`: :class:`Follower`, which keeps PgBouncers on a topology source's
  confirmed leader;
- :mod:`.cli`: ``pgfailover pgbouncer doctor|repoint|follow``.
"""

from __future__ import annotations

from .admin import (
    AdminAuthError,
    AdminConsole,
    AdminError,
    AdminInvalidDsn,
    AdminUnreachable,
    ConfigItem,
    DatabaseRow,
    NotAdminConsole,
    PauseTimeout,
    PoolRow,
    ServerRow,
    Version,
    parse_version,
)
from .doctor import (
    ASSUMED_VERSION,
    RULE_IDS,
    RULES,
    BouncerConfig,
    Finding,
    config_from_admin,
    config_from_ini,
    diagnose,
    merge,
)
from .follow import Follower
from .ini import DatabaseEntry, IniConfig, IniError, load_ini, parse_ini, repoint_text
from .repoint import RepointFailed, RepointResult, repoint, write_atomically

__all__ = [
    "ASSUMED_VERSION",
    "RULES",
    "RULE_IDS",
    "AdminAuthError",
    "AdminConsole",
    "AdminError",
    "AdminInvalidDsn",
    "AdminUnreachable",
    "BouncerConfig",
    "ConfigItem",
    "DatabaseEntry",
    "DatabaseRow",
    "Finding",
    "Follower",
    "IniConfig",
    "IniError",
    "NotAdminConsole",
    "PauseTimeout",
    "PoolRow",
    "RepointFailed",
    "RepointResult",
    "ServerRow",
    "Version",
    "config_from_admin",
    "config_from_ini",
    "diagnose",
    "load_ini",
    "merge",
    "parse_ini",
    "parse_version",
    "repoint",
    "repoint_text",
    "write_atomically",
]
