"""``OPTIONS {"topology": ...}`` for ``ENGINE: "pgfailover.django"``: where the leader is.

The value is either a sync topology source object (a
:class:`~pgfailover.topology.PatroniTopology` or
:class:`~pgfailover.topology.HostListTopology`, built in the settings module and shared as
it is), or a spec a settings file can hold as plain data (JSON, environment):

- ``{"kind": "patroni", "urls": ["http://db1:8008", ...], "timeout": 2, "max_age": 10}``:
  a :class:`~pgfailover.topology.PatroniTopology` over those REST API URLs;
- ``{"kind": "hosts", "timeout": 2, "max_age": 10}``: a
  :class:`~pgfailover.topology.HostListTopology` over the alias's own ``HOST``/``PORT``
  list (``"db1,db2"``), with its ``NAME``, ``USER`` and ``PASSWORD``.

Other keys are the source's keyword arguments. A spec is built once per alias and spec in
a process, so every thread (every ``DatabaseWrapper``) of an alias shares one source and
its single-flight refreshes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from psycopg.conninfo import make_conninfo

from ..topology import AsyncTopologySource, HostListTopology, PatroniTopology, TopologySource
from ..topology.model import ROUTING_KEYS

__all__ = ["base_conninfo", "topology_from"]

#: The spec kinds ``OPTIONS["topology"]`` accepts.
KINDS = ("patroni", "hosts")

_built: dict[tuple[str, str], TopologySource] = {}
_built_lock = threading.Lock()
_libpq_keys: frozenset[str] | None = None


def _libpq_keywords() -> frozenset[str]:
    global _libpq_keys  # noqa: PLW0603 - computed once, the same for the whole process
    if _libpq_keys is None:
        _libpq_keys = frozenset(
            d.keyword.decode() for d in psycopg.pq.Conninfo.get_defaults() if d.keyword
        )
    return _libpq_keys


def base_conninfo(params: Mapping[str, Any]) -> str:
    """The libpq conninfo of Django's connection parameters without host, port and the
    other routing keys (see :data:`~pgfailover.topology.model.ROUTING_KEYS`): the part a
    topology completes with the leader's host and port. Only libpq keywords are kept
    (psycopg's own arguments such as ``context`` or ``prepare_threshold`` are not
    conninfo). Contains the password: never log it."""
    keys = _libpq_keywords()
    return make_conninfo(
        "",
        **{
            k: str(v)
            for k, v in params.items()
            if k in keys and k not in ROUTING_KEYS and v is not None
        },
    )


def topology_from(alias: str, spec: Any, settings_dict: Mapping[str, Any]) -> TopologySource | None:
    """The topology source ``OPTIONS["topology"]`` of ``alias`` names (see the module doc);
    None for None. Raises ``ImproperlyConfigured`` naming the alias and what to fix (never
    the password) for anything else."""
    if spec is None:
        return None
    where = f"DATABASES[{alias!r}]['OPTIONS']['topology']"
    if isinstance(spec, TopologySource):
        return spec
    if isinstance(spec, AsyncTopologySource):
        raise ImproperlyConfigured(
            f"{where}: {type(spec).__name__} is an async source; Django's database layer is "
            "sync: use PatroniTopology or HostListTopology"
        )
    if not isinstance(spec, Mapping):
        raise ImproperlyConfigured(
            f"{where} must be a PatroniTopology or HostListTopology, or a spec such as "
            '{"kind": "patroni", "urls": ["http://db1:8008"]} or {"kind": "hosts"}; '
            f"got {type(spec).__name__}"
        )
    try:
        key = (alias, json.dumps(spec, sort_keys=True))
    except (TypeError, ValueError):
        raise ImproperlyConfigured(
            f"{where}: a spec holds plain data only (strings, numbers, lists)"
        ) from None
    with _built_lock:
        source = _built.get(key)
        if source is None:
            source = _built[key] = _build(where, dict(spec), settings_dict)
        return source


def _build(where: str, spec: dict[str, Any], settings_dict: Mapping[str, Any]) -> TopologySource:
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ImproperlyConfigured(
            f"{where}['kind'] must be one of {', '.join(map(repr, KINDS))}, got {kind!r}"
        )
    try:
        if kind == "patroni":
            if "urls" not in spec:
                raise ImproperlyConfigured(
                    f"{where}: a 'patroni' spec needs 'urls' (Patroni REST API base URLs, "
                    "e.g. ['http://db1:8008'])"
                )
            return PatroniTopology(spec.pop("urls"), **spec)
        host = str(settings_dict.get("HOST") or "")
        if "," not in host:
            raise ImproperlyConfigured(
                f"{where}: a 'hosts' spec follows the alias's HOST list; HOST must list the "
                f'members ("db1,db2", PORT one port or one per host), got {host!r}'
            )
        options = settings_dict.get("OPTIONS") or {}
        conninfo = make_conninfo(
            "",
            host=host,
            port=str(settings_dict.get("PORT") or "") or None,
            dbname=settings_dict.get("NAME") or None,
            user=settings_dict.get("USER") or None,
            password=settings_dict.get("PASSWORD") or None,
            sslmode=options.get("sslmode"),
        )
        return HostListTopology(conninfo, **spec)
    except (TypeError, ValueError, psycopg.Error) as ex:
        # the sources' messages hold no password (their conninfo errors are scrubbed)
        raise ImproperlyConfigured(f"{where}: {type(ex).__name__}: {ex}") from None
