"""Passwords out of messages: what in a conninfo may be a secret, and masking it. No I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable

import psycopg
from psycopg.conninfo import conninfo_to_dict

_SECRET_KEYS = ("password", "sslpassword")
_KEYWORD_SECRET_RE = re.compile(
    r"""(?:^|\s)(?:ssl)?password\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)""", re.IGNORECASE
)
_URL_SECRET_RE = re.compile(r"""^[a-z][a-z0-9+.\-]*://[^:/@\s]*:([^@/\s]*)@""", re.IGNORECASE)
_URL_QUERY_SECRET_RE = re.compile(r"""[?&](?:ssl)?password=([^&\s]*)""", re.IGNORECASE)


def secret_candidates(conninfo: str) -> list[str]:
    """Every string of ``conninfo`` that may be a password (parsed or not)."""
    found: list[str] = []
    for regex in (_KEYWORD_SECRET_RE, _URL_SECRET_RE, _URL_QUERY_SECRET_RE):
        for match in regex.finditer(conninfo):
            value = match.group(1)
            found += [value, value.strip("'")]
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        params = {}
    found.extend(str(params[key]) for key in _SECRET_KEYS if params.get(key))
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(message: str, secrets: Iterable[str]) -> str:
    """``message`` with every quoted piece containing a secret, then the secret, masked."""
    for secret in secrets:
        if secret in message:
            message = re.sub(r'"[^"]*' + re.escape(secret) + r'[^"]*"', '"***"', message)
            message = message.replace(secret, "***")
    return message
