"""Section (c) of ``benchmarks/suite.py``: what one open pool costs the client process.

For each kind (psycopg_pool and pgfailover; sync, then async inside ``asyncio.run``),
``POOLS`` pools with min_size = max_size = 4 are opened in this process, waited for and
warmed up (``WARM_CHECKOUTS`` checkouts of ``SELECT 1``, so every connection has served),
and kept open while the process is measured against the moment before the first was
opened, after ``gc.collect()``:

- threads: ``threading.active_count()`` delta (sync) or ``len(asyncio.all_tasks())`` delta
  (async: the pool's workers are tasks there);
- Python heap: ``tracemalloc`` current size delta, in a pass of its own with tracemalloc on
  (it would slow and inflate the other pass);
- RSS: ``VmRSS`` delta from /proc/self/status (includes libpq's C allocations and thread
  stacks, which tracemalloc cannot see), each snapshot taken after glibc's
  ``malloc_trim(0)`` so that memory freed earlier and kept by the allocator does not hide
  new allocations; still coarse (page granularity, arenas).

Every figure is divided by ``POOLS``. One pool of each kind is opened and closed first
(imports, caches), and the RSS pass runs twice, kinds in either order, and is averaged, so
that neither kind inherits the other's freed memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import psycopg_pool
from _suite_common import log, table, vmrss_kib

from pgfailover.pool import ConnectionPool
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster

POOLS = 5
SIZE = 4
WARM_CHECKOUTS = 3 * SIZE
KINDS = ("psycopg_pool", "pgfailover")

SyncFactory = Callable[[], psycopg_pool.ConnectionPool[Any]]
AsyncFactory = Callable[[], psycopg_pool.AsyncConnectionPool[Any]]


def _sync_factories(dsn: str) -> dict[str, SyncFactory]:
    kw: dict[str, Any] = {"min_size": SIZE, "max_size": SIZE, "open": False}
    return {
        "psycopg_pool": lambda: psycopg_pool.ConnectionPool(dsn, **kw),
        "pgfailover": lambda: ConnectionPool[Any](dsn, **kw),
    }


def _async_factories(dsn: str) -> dict[str, AsyncFactory]:
    kw: dict[str, Any] = {"min_size": SIZE, "max_size": SIZE, "open": False}
    return {
        "psycopg_pool": lambda: psycopg_pool.AsyncConnectionPool(dsn, **kw),
        "pgfailover": lambda: AsyncConnectionPool[Any](dsn, **kw),
    }


def _malloc_trim() -> None:
    """Give freed C heap back to the OS (glibc), so RSS counts memory in use, not memory
    an earlier batch freed and the allocator kept."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _snapshot(tasks: int | None) -> dict[str, float]:
    gc.collect()
    _malloc_trim()
    return {
        "threads": threading.active_count(),
        "tasks": float("nan") if tasks is None else tasks,
        "rss_kib": vmrss_kib(),
        "traced_kib": tracemalloc.get_traced_memory()[0] / 1024
        if tracemalloc.is_tracing()
        else float("nan"),
    }


def _delta(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / n for k in before}


def _sync_batch(factory: SyncFactory, n: int) -> dict[str, float]:
    before = _snapshot(None)
    pools = []
    try:
        for _ in range(n):
            pool = factory()
            pools.append(pool)
            pool.open(wait=True)
            for _ in range(WARM_CHECKOUTS):
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
        after = _snapshot(None)
    finally:
        for pool in pools:
            pool.close()
    return _delta(before, after, n)


async def _async_batch(factory: AsyncFactory, n: int) -> dict[str, float]:
    before = _snapshot(len(asyncio.all_tasks()))
    pools = []
    try:
        for _ in range(n):
            pool = factory()
            pools.append(pool)
            await pool.open(wait=True)
            for _ in range(WARM_CHECKOUTS):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
        await asyncio.sleep(0)
        after = _snapshot(len(asyncio.all_tasks()))
    finally:
        for pool in pools:
            await pool.close()
    return _delta(before, after, n)


def _combine(rss_passes: list[dict[str, float]], traced: dict[str, float]) -> dict[str, Any]:
    return {
        "threads": rss_passes[0]["threads"],
        "tasks": rss_passes[0]["tasks"],
        "rss_kib": sum(p["rss_kib"] for p in rss_passes) / len(rss_passes),
        "rss_kib_passes": [p["rss_kib"] for p in rss_passes],
        "traced_kib": traced["traced_kib"],
    }


def _run_sync(dsn: str) -> dict[str, dict[str, Any]]:
    factories = _sync_factories(dsn)
    for factory in factories.values():
        _sync_batch(factory, 1)  # warm-up: imports, caches
    passes: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for order in (KINDS, KINDS[::-1]):
        for kind in order:
            passes[kind].append(_sync_batch(factories[kind], POOLS))
    traced: dict[str, dict[str, float]] = {}
    tracemalloc.start()
    try:
        for kind in KINDS:
            traced[kind] = _sync_batch(factories[kind], POOLS)
    finally:
        tracemalloc.stop()
    return {kind: _combine(passes[kind], traced[kind]) for kind in KINDS}


async def _run_async(dsn: str) -> dict[str, dict[str, Any]]:
    factories = _async_factories(dsn)
    for factory in factories.values():
        await _async_batch(factory, 1)
    passes: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for order in (KINDS, KINDS[::-1]):
        for kind in order:
            passes[kind].append(await _async_batch(factories[kind], POOLS))
    traced: dict[str, dict[str, float]] = {}
    tracemalloc.start()
    try:
        for kind in KINDS:
            traced[kind] = await _async_batch(factories[kind], POOLS)
    finally:
        tracemalloc.stop()
    return {kind: _combine(passes[kind], traced[kind]) for kind in KINDS}


def run(cluster: LocalCluster) -> dict[str, Any]:
    """Sync and async pools of both kinds; the raw results (see :func:`render`)."""
    dsn = cluster.primary.dsn()
    log(f"resources: sync pools, {POOLS} per kind")
    sync = _run_sync(dsn)
    log(f"resources: async pools, {POOLS} per kind")
    asynchronous = asyncio.run(_run_async(dsn))
    return {"pools_per_kind": POOLS, "size": SIZE, "sync": sync, "async": asynchronous}


def render(out: dict[str, Any]) -> str:
    """Markdown: one row per pool class."""
    lines = [
        f"### (c) Resources per open pool (min_size = max_size = {SIZE}, opened and warmed up)",
        "",
        f"Averages over {POOLS} pools of each kind open at once in this process. Threads =",
        "threading.active_count() delta (sync); tasks = asyncio.all_tasks() delta (async);",
        "Python heap = tracemalloc current size delta after gc (own pass); RSS = VmRSS delta,",
        "mean of two passes (kinds in either order). KiB per pool.",
        "",
    ]
    rows = []
    for mode, prefix in (("sync", ""), ("async", "Async")):
        for kind in KINDS:
            r = out[mode][kind]
            cls = f"{kind}.{prefix}ConnectionPool"
            added = r["threads"] if mode == "sync" else r["tasks"]
            rows.append(
                [
                    cls,
                    f"{added:.1f} {'threads' if mode == 'sync' else 'tasks'}",
                    f"{r['threads']:.1f}",
                    f"{r['traced_kib']:.1f}",
                    f"{r['rss_kib']:.0f}",
                ]
            )
    lines.append(
        table(
            [
                "pool",
                "workers added",
                "threads added",
                "Python heap KiB (tracemalloc)",
                "RSS KiB",
            ],
            rows,
            [False, True, True, True, True],
        )
    )
    return "\n".join(lines)
