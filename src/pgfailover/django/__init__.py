"""pgfailover for Django: a database backend and a retried ``atomic``.

In settings, ``"ENGINE": "pgfailover.django"`` instead of
``"django.db.backends.postgresql"`` (see :mod:`pgfailover.django.base`); in code,
:func:`atomic` (a decorator), :func:`run_atomic` and :class:`AtomicRunner` run
``transaction.atomic`` under the retry policy, with a lost COMMIT looked up, never re-run
blindly. Needs the ``django`` extra (Django 4.2+, psycopg 3). See ``docs/django.md``.
"""

from __future__ import annotations

from ._atomic import AtomicRunner, NestedAtomicError, atomic, run_atomic

__all__ = ["AtomicRunner", "NestedAtomicError", "atomic", "run_atomic"]
