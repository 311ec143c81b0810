"""``pgfailover pgbouncer doctor|repoint|follow``: the sub-commands' parsers and runners.

Exit codes: ``doctor`` 0 when no finding, 1 with findings, 2 when the configuration cannot
be read (file unreadable, admin console refused or unreachable) or for bad arguments;
``repoint`` 0 when PgBouncer points at the target (changed or already so), 1 when the
change did not take, 2 when the file or the console cannot be used or for bad arguments;
``follow`` 0 when stopped by SIGTERM or SIGINT, 2 for bad arguments. No password is ever
printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from psycopg import Error
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._secrets import scrub, secret_candidates
from ..topology import HostListTopology, PatroniTopology, TopologySource
from ..topology.patroni import normalize_url
from .admin import AdminConsole, AdminError
from .doctor import (
    RULE_IDS,
    BouncerConfig,
    config_from_admin,
    config_from_ini,
    diagnose,
    findings_json,
    format_findings,
    merge,
)
from .follow import PAUSE_TIMEOUT, Follower, admin_label
from .ini import IniError, load_ini
from .repoint import RepointFailed, repoint

_Out = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for an IPv6 address) as ``(host, port)``; an
    argparse error naming what is wrong otherwise."""
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not sep or not host or not 0 < port < 65536 or any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 1 to 65535), got {text!r}")
    return host, port


def _rule_id(text: str) -> str:
    if text not in RULE_IDS:
        raise argparse.ArgumentTypeError(f"unknown rule {text!r}; rules: {', '.join(RULE_IDS)}")
    return text


def _hosts(text: str) -> list[tuple[str, int]]:
    return [parse_endpoint(part.strip()) for part in text.split(",") if part.strip()] or [
        parse_endpoint(text)
    ]


def _urls(text: str) -> list[str]:
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if not urls:
        raise argparse.ArgumentTypeError(f"expected URL,... got {text!r}")
    try:
        return [normalize_url(url) for url in urls]
    except ValueError as ex:
        raise argparse.ArgumentTypeError(str(ex)) from None


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(
            f"expected seconds, more than 0, at most 3600, got {text!r}"
        )
    return value


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pgbouncer`` and its sub-commands ``doctor``, ``repoint`` and ``follow``."""
    parser = subparsers.add_parser(
        "pgbouncer",
        help="check PgBouncer's failover settings; repoint it at a new primary",
        description="PgBouncer and failovers: `doctor` checks the settings, `repoint` points "
        "its databases at a new primary.",
    )
    commands = parser.add_subparsers(dest="pgbouncer_command", required=True)
    doctor = commands.add_parser(
        "doctor",
        help="report PgBouncer settings that hurt during a failover, and their fix",
        description="Read PgBouncer's configuration from pgbouncer.ini (--ini) and/or its admin "
        "console (--admin: SHOW CONFIG, SHOW DATABASES, SHOW VERSION; with --admin alone the "
        "file SHOW CONFIG names is read too when it is readable) and report each setting "
        "that hurts during a failover: what happens, and the line that fixes it. Rules for "
        "settings the running version lacks are skipped; from the file alone, PgBouncer 1.18 "
        "is assumed. Exit status 0 when clean, 1 with findings, 2 when the configuration "
        "cannot be read.",
    )
    doctor.add_argument("--ini", type=Path, metavar="PATH", help="pgbouncer.ini to read")
    doctor.add_argument(
        "--admin",
        metavar="DSN",
        help="admin console conninfo or URL (dbname defaults to pgbouncer); prefer "
        "PGPASSWORD or a passfile to a password on the command line",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")
    doctor.add_argument(
        "--skip",
        type=_rule_id,
        action="append",
        default=[],
        metavar="RULE",
        help=f"leave a rule out (repeatable): {', '.join(RULE_IDS)}",
    )
    rep = commands.add_parser(
        "repoint",
        help="point PgBouncer's databases at a new primary (for Patroni's on_role_change)",
        description="Rewrite the host and port of pgbouncer.ini's [databases] entries "
        "atomically (every other byte kept), RELOAD, RECONNECT the databases whose server "
        "connections are still on another node, and check with SHOW DATABASES that it took. "
        "Running it again changes nothing. Exit status 0 when PgBouncer points at the "
        "target, 1 when the change did not take, 2 when the file or console cannot be used.",
    )
    rep.add_argument("--admin", required=True, metavar="DSN", help="admin console conninfo or URL")
    rep.add_argument(
        "--to", required=True, type=parse_endpoint, metavar="HOST:PORT", help="the new primary"
    )
    rep.add_argument(
        "--ini",
        type=Path,
        metavar="PATH",
        help="pgbouncer.ini to rewrite (default: the conffile SHOW CONFIG names)",
    )
    rep.add_argument(
        "--database",
        action="append",
        metavar="NAME",
        help="an entry to repoint (repeatable; default: every entry with a TCP host)",
    )
    rep.add_argument(
        "--pause",
        action="store_true",
        help="hold clients with PAUSE while rewriting and reloading, RESUME after (a PAUSE "
        "not done within 2 s is withdrawn) (default: off)",
    )
    _add_follow(commands)


def _add_follow(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fol = commands.add_parser(
        "follow",
        help="keep PgBouncer pointed at the cluster's confirmed leader (long-running)",
        description="Watch the topology (a host list checked in-band, or Patroni's REST API) "
        "and, when PgBouncer points elsewhere than the leader, confirm the leader in-band and "
        "repoint every given PgBouncer at it (as `repoint` does). No leader, or a leader not "
        "confirmed: nothing changes. One line per action; SIGTERM or SIGINT ends it with "
        "status 0; 2 for bad arguments.",
    )
    fol.add_argument(
        "--admin",
        required=True,
        action="append",
        metavar="DSN",
        help="a PgBouncer admin console conninfo or URL (repeatable)",
    )
    source = fol.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--hosts",
        type=_hosts,
        metavar="HOST:PORT,...",
        help="the PostgreSQL servers, checked in-band (pg_is_in_recovery(), timeline)",
    )
    source.add_argument(
        "--patroni", type=_urls, metavar="URL,...", help="Patroni REST API base URLs"
    )
    fol.add_argument(
        "--check-dsn",
        default="",
        metavar="DSN",
        help="base conninfo (user, dbname, password) of the in-band checks; host and port "
        "are each server's (default: libpq's environment: PGUSER, PGPASSFILE, ...)",
    )
    fol.add_argument(
        "--ini",
        type=Path,
        metavar="PATH",
        help="pgbouncer.ini to rewrite (default: each PgBouncer's conffile)",
    )
    fol.add_argument(
        "--database",
        action="append",
        metavar="NAME",
        help="an entry to repoint (repeatable; default: every entry with a TCP host)",
    )
    fol.add_argument(
        "--interval",
        type=_interval,
        default=0.5,
        metavar="SECONDS",
        help="pause between two looks at the topology (default: %(default)s)",
    )
    fol.add_argument(
        "--pause",
        action="store_true",
        help="hold clients with PAUSE while rewriting and reloading, RESUME after (a PAUSE "
        "not done within 2 s, clients holding server connections, is withdrawn and the "
        "repoint goes on without it) (default: off, repoint while clients run)",
    )


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse what argparse cannot (exit 2 with the sub-command's usage line): doctor
    without a source, an admin DSN that cannot be parsed."""
    if args.pgbouncer_command == "doctor" and args.ini is None and args.admin is None:
        parser.error("give --ini PATH, --admin DSN, or both")
    admins = args.admin if isinstance(args.admin, list) else [args.admin]
    dsns = [("--admin", dsn) for dsn in admins if dsn is not None]
    if getattr(args, "check_dsn", ""):
        dsns.append(("--check-dsn", args.check_dsn))
    for option, dsn in dsns:
        try:
            conninfo_to_dict(dsn)
        except Error as ex:
            reason = scrub(str(ex).splitlines()[0] if str(ex) else "", secret_candidates(dsn))
            parser.error(f"argument {option}: cannot parse the DSN: {reason}")


def run_command(args: argparse.Namespace, out: _Out = print, err: _Out = _stderr) -> int:
    """Run ``pgbouncer doctor`` or ``pgbouncer repoint`` with parsed ``args``; the exit code."""
    if args.pgbouncer_command == "doctor":
        return run_doctor(args, out, err)
    if args.pgbouncer_command == "follow":
        return run_follow(args, _stamped(out), err)
    return run_repoint(args, out, err)


def _stamped(out: _Out) -> _Out:
    """``out`` with each line prefixed by the UTC time and flushed (a log)."""

    def line(text: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        out(f"{now:%Y-%m-%dT%H:%M:%S.%f}"[:-3] + f"Z {text}")
        sys.stdout.flush()

    return line


def run_follow(args: argparse.Namespace, out: _Out = print, err: _Out = _stderr) -> int:
    """``follow``: rounds until SIGTERM or SIGINT (status 0); 2 when the topology source
    cannot be built from the arguments."""
    try:
        source: TopologySource
        if args.hosts is not None:
            hosts = ",".join(h for h, _ in args.hosts)
            ports = ",".join(str(p) for _, p in args.hosts)
            source = HostListTopology(make_conninfo(args.check_dsn, host=hosts, port=ports))
        else:
            source = PatroniTopology(args.patroni, conninfo=args.check_dsn)
        follower = Follower(
            source,
            args.admin,
            check_conninfo=args.check_dsn,
            ini=args.ini,
            databases=args.database,
            interval=args.interval,
            pause=args.pause,
            log=out,
        )
    except (ValueError, Error) as ex:
        reason = scrub(
            str(ex), [s for d in [args.check_dsn, *args.admin] for s in secret_candidates(d)]
        )
        err(f"pgfailover pgbouncer follow: {reason}")
        return 2
    stop = threading.Event()
    stopped_by: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    out(f"following {source.description} for {', '.join(admin_label(a) for a in args.admin)}")
    try:
        follower.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out(f"stopped ({stopped_by[0] if stopped_by else 'asked'})")
    return 0


def run_doctor(args: argparse.Namespace, out: _Out = print, err: _Out = _stderr) -> int:
    """``doctor``: 0 clean, 1 findings, 2 when the configuration cannot be read."""
    try:
        file_config: BouncerConfig | None = None
        if args.ini is not None:
            file_config = config_from_ini(load_ini(args.ini))
        config = file_config
        if args.admin is not None:
            with AdminConsole(args.admin) as admin:
                items = admin.config()
                running = config_from_admin(items, admin.databases(), admin.version)
            if file_config is None and (conffile := items.get("conffile")) and conffile.value:
                try:
                    file_config = config_from_ini(load_ini(conffile.value))
                except IniError as ex:
                    err(f"pgfailover pgbouncer doctor: note: {ex}; judging the console alone")
            config = running if file_config is None else merge(file_config, running)
    except (IniError, AdminError) as ex:
        err(f"pgfailover pgbouncer doctor: {ex}")
        return 2
    assert config is not None  # check_args requires --ini or --admin
    findings = [f for f in diagnose(config) if f.rule not in set(args.skip or ())]
    if getattr(args, "json", False):
        out(json.dumps(findings_json(findings, config), indent=1))
    else:
        out(format_findings(findings, config))
    return 1 if findings else 0


def run_repoint(args: argparse.Namespace, out: _Out = print, err: _Out = _stderr) -> int:
    """``repoint``: 0 done or already so, 1 did not take, 2 file or console unusable."""
    host, port = args.to
    try:
        with AdminConsole(args.admin) as admin:
            repoint(
                admin,
                host,
                port,
                ini_path=args.ini,
                databases=args.database,
                log=out,
                pause=PAUSE_TIMEOUT if args.pause else None,
            )
    except RepointFailed as ex:
        err(f"pgfailover pgbouncer repoint: {ex}")
        return 1
    except (IniError, AdminError, ValueError) as ex:
        err(f"pgfailover pgbouncer repoint: {ex}")
        return 2
    return 0


__all__ = [
    "add_command",
    "check_args",
    "parse_endpoint",
    "run_command",
    "run_doctor",
    "run_follow",
    "run_repoint",
]
