"""The doctor's rules: PgBouncer settings that hurt during a failover, as pure functions of
a configuration (:class:`BouncerConfig`), each returning :class:`Finding` values that say
what happens during a failover and the exact line that fixes it. No I/O.

A configuration comes from pgbouncer.ini (:func:`config_from_ini`), from the admin console
(:func:`config_from_admin`: ``SHOW CONFIG``, ``SHOW DATABASES``, ``SHOW VERSION``), or both
(:func:`merge`: the running values win, the file adds what the console does not show, such
as a database's ``connect_query``). A setting neither gives has PgBouncer's default for the
version. Rules for settings the version does not have are skipped; without a version (the
file alone) the oldest supported one, :data:`ASSUMED_VERSION`, is assumed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from .admin import ConfigItem, DatabaseRow, Version
from .ini import DatabaseEntry, IniConfig, quote_value

#: The version assumed when none is known: 1.18, the one Debian 12 ships and the oldest
#: this doctor supports.
ASSUMED_VERSION = Version(1, 18, 0)

#: Thresholds, in PgBouncer's units (seconds unless named otherwise).
MAX_LOGIN_RETRY = 1.0
MAX_CHECK_DELAY = 5.0
MAX_DNS_TTL = 5.0
MAX_DEAD_SERVER_SECONDS = 60.0
MAX_QUERY_WAIT = 60.0
#: Linux's keepalive defaults, used when PgBouncer leaves them to the system (value 0):
#: net.ipv4.tcp_keepalive_time, _intvl and _probes.
OS_KEEPIDLE, OS_KEEPINTVL, OS_KEEPCNT = 7200.0, 75.0, 9.0

Severity = Literal["warning", "info"]

_DEFAULTS: dict[str, str] = {
    "pool_mode": "session",
    "server_login_retry": "15",
    "server_check_query": "select 1",
    "server_check_delay": "30",
    "server_fast_close": "0",
    "dns_max_ttl": "15",
    "tcp_keepalive": "1",
    "tcp_keepidle": "0",
    "tcp_keepintvl": "0",
    "tcp_keepcnt": "0",
    "tcp_user_timeout": "0",
    "query_wait_timeout": "120",
    "server_reset_query": "DISCARD ALL",
    "server_reset_query_always": "0",
    "max_prepared_statements": "0",
}


def default(key: str, version: Version) -> str:
    """PgBouncer's default for setting ``key`` at ``version`` ("" when not tabled)."""
    if key == "max_prepared_statements" and version >= (1, 24):
        return "200"
    if key == "server_check_query" and version >= (1, 25):
        return ""
    return _DEFAULTS.get(key, "")


@dataclass(frozen=True)
class Finding:
    """One setting that hurts during a failover.

    ``rule`` is the rule's id; ``setting`` and ``value`` what was found (``value`` as
    written or shown, the default when unset); ``databases`` the databases concerned (empty:
    every database); ``failover`` what happens during a failover; ``fix`` the exact line(s)
    to put in ``section`` (``[pgbouncer]``, a ``[databases]`` entry, or the client's code).
    """

    rule: str
    severity: Severity
    setting: str
    value: str
    failover: str
    fix: str
    section: str = "[pgbouncer]"
    databases: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The finding as a JSON-ready dict."""
        return {
            "rule": self.rule,
            "severity": self.severity,
            "setting": self.setting,
            "value": self.value,
            "databases": list(self.databases),
            "failover": self.failover,
            "fix": self.fix,
            "section": self.section,
        }


@dataclass(frozen=True)
class BouncerConfig:
    """What the rules look at: ``settings`` known explicitly (lowercased keys), the
    ``databases`` (their connection-string keys: ``host``, ``port``, ``pool_mode``,
    ``connect_query``...), the ``pool_mode`` of ``[users]`` entries, and the ``version``
    (None: unknown, :data:`ASSUMED_VERSION` is used)."""

    settings: Mapping[str, str] = field(default_factory=dict)
    databases: tuple[DatabaseEntry, ...] = ()
    user_pool_modes: tuple[str, ...] = ()
    version: Version | None = None

    @property
    def effective_version(self) -> Version:
        """The version the rules assume."""
        return self.version or ASSUMED_VERSION

    def get(self, key: str) -> str:
        """Setting ``key``: as known, else PgBouncer's default for the version."""
        value = self.settings.get(key)
        return default(key, self.effective_version) if value is None else value

    def modes(self) -> dict[str, tuple[str, ...]]:
        """Each pool mode in use -> the databases that use it (empty tuple: the global
        ``pool_mode``, or a ``[users]`` override, which reaches every database)."""
        found: dict[str, list[str]] = {}
        overridden = []
        for db in self.databases:
            mode = db.params.get("pool_mode")
            if mode:
                found.setdefault(mode.lower(), []).append(db.name)
                overridden.append(db.name)
        if not self.databases or len(overridden) < len(self.databases):
            found.setdefault(self.get("pool_mode").lower(), []).clear()
        for mode in self.user_pool_modes:
            found.setdefault(mode, []).clear()
        return {mode: tuple(names) for mode, names in found.items()}


def config_from_ini(ini: IniConfig, version: Version | None = None) -> BouncerConfig:
    """The configuration a pgbouncer.ini gives (``version``: the running one, if known)."""
    return BouncerConfig(ini.settings, ini.databases, ini.user_pool_modes, version)


def config_from_admin(
    config: Mapping[str, ConfigItem], databases: Iterable[DatabaseRow], version: Version
) -> BouncerConfig:
    """The configuration the admin console shows (``SHOW CONFIG``, ``SHOW DATABASES``
    without the console's own ``pgbouncer`` entry, ``SHOW VERSION``). ``SHOW DATABASES``
    does not show a database's ``connect_query``: the rules that need it see nothing."""
    settings = {k: item.value for k, item in config.items() if item.value is not None}
    entries = []
    for row in databases:
        if row.name == "pgbouncer" and row.host is None:
            continue
        params = {"port": str(row.port), "dbname": row.database}
        if row.host is not None:
            params["host"] = row.host
        if row.pool_mode:
            params["pool_mode"] = row.pool_mode
        entries.append(DatabaseEntry(row.name, params))
    return BouncerConfig(settings, tuple(entries), (), version)


def merge(file: BouncerConfig, running: BouncerConfig) -> BouncerConfig:
    """The file's configuration overlaid with the running one: running settings and version
    win; a database keeps the file's keys (``connect_query``...) under the running ones."""
    by_name = {db.name: db for db in file.databases}
    databases = []
    for db in running.databases:
        base = by_name.pop(db.name, None)
        params = {**(base.params if base else {}), **db.params}
        if base is not None and "pool_mode" not in db.params:
            params.pop("pool_mode", None)  # the console shows the effective override
        databases.append(DatabaseEntry(db.name, params, base.path if base else None))
    databases.extend(by_name.values())  # in the file, not (yet) loaded
    return BouncerConfig(
        {**file.settings, **running.settings},
        tuple(databases),
        file.user_pool_modes,
        running.version or file.version,
    )


# ---------------------------------------------------------------------- value parsing
def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def _bool(text: str) -> bool | None:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "on", "true"):
        return True
    if lowered in ("0", "no", "off", "false"):
        return False
    return None


def _fmt(value: float) -> str:
    return f"{value:g}"


# ---------------------------------------------------------------------- rules
Rule = Callable[[BouncerConfig], list[Finding]]


def rule_login_retry(config: BouncerConfig) -> list[Finding]:
    """``server_login_retry`` above :data:`MAX_LOGIN_RETRY` (PgBouncer's default is 15 s)."""
    value = _number(config.get("server_login_retry"))
    if value is None or value <= MAX_LOGIN_RETRY:
        return []
    return [
        Finding(
            "login-retry",
            "warning",
            "server_login_retry",
            config.get("server_login_retry"),
            f"After one failed server login (the old primary shutting down, the new one not "
            f"yet promoted) PgBouncer opens no new server connection for {_fmt(value)} s, "
            f"and RELOAD does not reset that wait: every new client of the database gets an "
            f"error or waits that long on top of the failover.",
            "server_login_retry = 1",
        )
    ]


_STANDBY_SAFE_RE = re.compile(r"pg_is_in_recovery|txid_current\b|pg_current_xact_id", re.I)


def rule_check_query(config: BouncerConfig) -> list[Finding]:
    """``server_check_query`` that a standby answers like a primary: ``select 1``, empty,
    or any query that does not look at the role (``pg_is_in_recovery()``...)."""
    query = config.get("server_check_query")
    if _STANDBY_SAFE_RE.search(query):
        return []
    return [
        Finding(
            "check-query",
            "warning",
            "server_check_query",
            query,
            "A standby answers this query like a primary, so a server connection whose node "
            "was demoted (behind a moved VIP or DNS name, or before a repoint) passes the "
            "check and is handed to clients, whose writes then fail with 25006. A query "
            "that fails on a standby makes PgBouncer drop that connection and open a new one.",
            "server_check_query = select 1 / (1 - pg_is_in_recovery()::int)",
        )
    ]


def rule_check_delay(config: BouncerConfig) -> list[Finding]:
    """``server_check_delay`` above :data:`MAX_CHECK_DELAY` (default 30 s)."""
    value = _number(config.get("server_check_delay"))
    if value is None or value <= MAX_CHECK_DELAY:
        return []
    return [
        Finding(
            "check-delay",
            "warning",
            "server_check_delay",
            config.get("server_check_delay"),
            f"A server connection released less than {_fmt(value)} s ago is handed out "
            f"again without running server_check_query: on a busy pool the check never "
            f"runs, and a connection to a demoted node keeps serving clients.",
            "server_check_delay = 1",
        )
    ]


def rule_fast_close(config: BouncerConfig) -> list[Finding]:
    """Session pooling without ``server_fast_close`` (PgBouncer 1.10+)."""
    if config.effective_version < (1, 10):
        return []
    modes = config.modes()
    if "session" not in modes or _bool(config.get("server_fast_close")):
        return []
    return [
        Finding(
            "fast-close",
            "warning",
            "server_fast_close",
            config.get("server_fast_close"),
            "In session pooling a server connection to the old node is only marked "
            "close_needed after a RELOAD or RECONNECT: it stays bound to its client until "
            "that client disconnects, so a client that never disconnects (a pooled "
            "connection) writes to the demoted node for good. With server_fast_close PgBouncer "
            "closes it at the end of the current transaction.",
            "server_fast_close = 1",
            databases=modes["session"],
        )
    ]


def rule_prepared_statements(config: BouncerConfig) -> list[Finding]:
    """Transaction or statement pooling with clients' prepared statements: before 1.21 the
    fix is on the client (psycopg's ``prepare_threshold=None``); from 1.21 it is
    ``max_prepared_statements`` (0 by default until 1.24)."""
    modes = config.modes()
    pooled = tuple(sorted({*modes.get("transaction", ()), *modes.get("statement", ())}))
    if "transaction" not in modes and "statement" not in modes:
        return []
    if config.effective_version < (1, 21):
        return [
            Finding(
                "prepared-statements",
                "warning",
                "max_prepared_statements",
                f"(absent before 1.21; running {config.effective_version})",
                "psycopg prepares a statement after 5 executions (prepare_threshold=5); "
                "through transaction pooling the next transaction may run on another server "
                "connection, and after a failover every connection is new: the statement "
                "fails with 26000 or 42P05 (prepared statement does not exist / already "
                "exists). This PgBouncer cannot track prepared statements: turn them off in "
                "the client.",
                "psycopg.connect(conninfo, prepare_threshold=None)",
                section="client",
                databases=pooled,
            )
        ]
    value = _number(config.get("max_prepared_statements"))
    if value is None or value > 0:
        return []
    return [
        Finding(
            "prepared-statements",
            "warning",
            "max_prepared_statements",
            config.get("max_prepared_statements"),
            "Prepared-statement tracking is off: through transaction pooling psycopg's "
            "automatic prepared statements fail with 26000 or 42P05 once a transaction "
            "runs on another server connection, as every one does after a failover. With "
            "it on, PgBouncer prepares them again on the new server itself.",
            "max_prepared_statements = 200",
            databases=pooled,
        )
    ]


def _is_dns_name(host: str) -> bool:
    if not host or host.startswith("/"):
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    return False


def rule_dns_ttl(config: BouncerConfig) -> list[Finding]:
    """A database host given as a DNS name with ``dns_max_ttl`` above
    :data:`MAX_DNS_TTL` (default 15 s)."""
    named = tuple(
        db.name
        for db in config.databases
        if any(_is_dns_name(h.strip()) for h in (db.host or "").split(","))
    )
    value = _number(config.get("dns_max_ttl"))
    if not named or value is None or value <= MAX_DNS_TTL:
        return []
    return [
        Finding(
            "dns-ttl",
            "warning",
            "dns_max_ttl",
            config.get("dns_max_ttl"),
            f"PgBouncer keeps a resolved address for up to {_fmt(value)} s: when a "
            f"failover moves the DNS name to the new primary, new server connections still "
            f"go to the old address that long.",
            "dns_max_ttl = 1",
            databases=named,
        )
    ]


def dead_server_seconds(config: BouncerConfig) -> float | None:
    """How long an idle server connection to a vanished host (no RST: power loss, network
    partition) goes unnoticed: keepalive idle + interval x count, Linux defaults for 0;
    None when keepalives are off (never noticed)."""
    if not _bool(config.get("tcp_keepalive")):
        return None
    idle = _number(config.get("tcp_keepidle")) or OS_KEEPIDLE
    interval = _number(config.get("tcp_keepintvl")) or OS_KEEPINTVL
    count = _number(config.get("tcp_keepcnt")) or OS_KEEPCNT
    return idle + interval * count


def rule_keepalive(config: BouncerConfig) -> list[Finding]:
    """TCP keepalive off, or slower than :data:`MAX_DEAD_SERVER_SECONDS` to notice a dead
    server (``tcp_keepidle`` 0 means the system's 7200 s)."""
    seconds = dead_server_seconds(config)
    if seconds is not None and seconds <= MAX_DEAD_SERVER_SECONDS:
        return []
    after = "never" if seconds is None else f"after {_fmt(seconds)} s"
    keys = ("tcp_keepalive", "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt")
    value = ", ".join(config.get(key) for key in keys)
    fix = "tcp_keepidle = 10\ntcp_keepintvl = 5\ntcp_keepcnt = 3"
    if seconds is None:
        fix = "tcp_keepalive = 1\n" + fix
    return [
        Finding(
            "keepalive",
            "warning",
            ", ".join(keys),
            value,
            f"When the primary's host dies without closing its connections (power loss, "
            f"network partition), PgBouncer notices an idle server connection {after} "
            f"(Linux defaults for values left at 0) and keeps it in the pool until then.",
            fix,
        )
    ]


def rule_user_timeout(config: BouncerConfig) -> list[Finding]:
    """``tcp_user_timeout`` (PgBouncer 1.13+, milliseconds) off or above
    :data:`MAX_DEAD_SERVER_SECONDS`."""
    if config.effective_version < (1, 13):
        return []
    value = _number(config.get("tcp_user_timeout"))
    if value is None or 0 < value <= MAX_DEAD_SERVER_SECONDS * 1000:
        return []
    return [
        Finding(
            "user-timeout",
            "warning",
            "tcp_user_timeout",
            config.get("tcp_user_timeout"),
            "A query sent to a primary whose host died waits for TCP retransmissions to give "
            "up, about 15 minutes on Linux, before PgBouncer sees the server is gone; the "
            "client waits as long. tcp_user_timeout (milliseconds) bounds it.",
            "tcp_user_timeout = 15000",
        )
    ]


def rule_query_wait(config: BouncerConfig) -> list[Finding]:
    """``query_wait_timeout`` 0 (wait forever) or above :data:`MAX_QUERY_WAIT` (default
    120 s)."""
    value = _number(config.get("query_wait_timeout"))
    if value is None or 0 < value <= MAX_QUERY_WAIT:
        return []
    waits = "forever" if value == 0 else f"up to {_fmt(value)} s"
    return [
        Finding(
            "query-wait",
            "warning",
            "query_wait_timeout",
            config.get("query_wait_timeout"),
            f"While PgBouncer cannot open a server connection (the primary down, a login "
            f"refused, the pool paused) a client's query waits {waits} for one. Typical "
            f"client timeouts (psycopg_pool's 30 s, an HTTP request's) expire first: the "
            f"application sees its own timeout, not an error it can classify and retry.",
            "query_wait_timeout = 30",
        )
    ]


def rule_read_only_leak(config: BouncerConfig) -> list[Finding]:
    """Transaction or statement pooling with no reset between clients
    (``server_reset_query_always`` off). What clients SET is not in the configuration:
    this rule says what the configuration allows, not that a client does it."""
    modes = config.modes()
    if "transaction" not in modes and "statement" not in modes:
        return []
    if _bool(config.get("server_reset_query_always")):
        return []
    return [
        Finding(
            "read-only-leak",
            "info",
            "server_reset_query_always",
            config.get("server_reset_query_always"),
            "In transaction pooling a client's SET outside a transaction stays on the server "
            "connection: after one client's SET default_transaction_read_only = on (or SET "
            "SESSION CHARACTERISTICS AS TRANSACTION READ ONLY), the next clients of that "
            "connection get 25006 on the primary, which failover handling takes for a "
            "demoted node. Either clients use SET LOCAL, or PgBouncer resets every "
            "connection after each transaction (one more round trip per transaction).",
            "server_reset_query_always = 1",
            databases=tuple(sorted({*modes.get("transaction", ()), *modes.get("statement", ())})),
        )
    ]


_READ_ONLY_RE = re.compile(
    r"(default_)?transaction_read_only\s*(=|\bto\b)\s*'?(on|true|1|yes)\b"
    r"|session\s+characteristics\s+as\s+transaction\s+read\s+only"
    r"|default_transaction_read_only=(on|true|1|yes)\b",
    re.I,
)


def rule_read_only_database(config: BouncerConfig) -> list[Finding]:
    """A ``[databases]`` entry whose ``connect_query`` or ``options`` make every session
    read-only (seen in pgbouncer.ini only: the console does not show them)."""
    found = []
    for db in config.databases:
        for key in ("connect_query", "options"):
            text = db.params.get(key, "")
            if _READ_ONLY_RE.search(text):
                found.append(
                    Finding(
                        "read-only-database",
                        "warning",
                        key,
                        text,
                        f"Every server connection of database {db.name} starts read-only: "
                        f"its writes fail with 25006 on the new primary as on a standby, so "
                        f"after a failover it looks as if no primary came back. If this "
                        f"database takes writes, remove the setting from {key}.",
                        _entry_without(db, key),
                        section="[databases]",
                        databases=(db.name,),
                    )
                )
    return found


def _entry_without(db: DatabaseEntry, key: str) -> str:
    """``db``'s ``[databases]`` line without ``key``."""
    pairs = " ".join(f"{k}={quote_value(v)}" for k, v in db.params.items() if k != key)
    name = (
        db.name if re.fullmatch(r"[^\s=\"]+", db.name) else '"' + db.name.replace('"', '""') + '"'
    )
    return f"{name} = {pairs}"


#: Every rule, in report order.
RULES: tuple[Rule, ...] = (
    rule_login_retry,
    rule_check_query,
    rule_check_delay,
    rule_fast_close,
    rule_prepared_statements,
    rule_dns_ttl,
    rule_keepalive,
    rule_user_timeout,
    rule_query_wait,
    rule_read_only_leak,
    rule_read_only_database,
)

#: Every rule id, in report order.
RULE_IDS: tuple[str, ...] = (
    "login-retry",
    "check-query",
    "check-delay",
    "fast-close",
    "prepared-statements",
    "dns-ttl",
    "keepalive",
    "user-timeout",
    "query-wait",
    "read-only-leak",
    "read-only-database",
)


def diagnose(config: BouncerConfig) -> list[Finding]:
    """Every finding of every rule, in :data:`RULES` order (empty: nothing to fix)."""
    return [finding for rule in RULES for finding in rule(config)]


def format_findings(findings: Iterable[Finding], config: BouncerConfig) -> str:
    """The findings as text, headed by the version they were judged for."""
    findings = list(findings)
    version = (
        f"PgBouncer {config.version}"
        if config.version
        else f"PgBouncer version unknown (judged as {ASSUMED_VERSION}, the oldest supported)"
    )
    if not findings:
        return f"{version}: no setting found that hurts during a failover"
    lines = [f"{version}: {len(findings)} finding(s)"]
    for f in findings:
        where = f" (databases: {', '.join(f.databases)})" if f.databases else ""
        lines.append("")
        lines.append(f"[{f.severity}] {f.rule}: {f.setting} = {f.value}{where}")
        lines.append("  during a failover: " + f.failover)
        lines.append(f"  fix, in {f.section}:")
        lines.extend("    " + line for line in f.fix.splitlines())
    return "\n".join(lines)


def findings_json(findings: Iterable[Finding], config: BouncerConfig) -> dict[str, object]:
    """The findings as a JSON-ready dict: ``version`` (None when unknown),
    ``judged_as`` (the version the rules assumed) and ``findings``."""
    return {
        "version": str(config.version) if config.version else None,
        "judged_as": str(config.effective_version),
        "findings": [f.to_json() for f in findings],
    }
