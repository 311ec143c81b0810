"""Client logins through the harness's PgBouncer: what its userlist costs per login.

    python benchmarks/bench_pgbouncer_login.py [--logins 100] [--rounds 3] [--pool-mode transaction]

On a :class:`~pgfailover.testing.LocalCluster` (one primary, PgBouncer with
``auth_type = scram-sha-256``), each round times ``--logins`` sequential logins (connect,
``SELECT 1``, close, one after the other) and ``--logins`` concurrent ones (as many threads,
released together). Every login is a SCRAM exchange with PgBouncer; PgBouncer's own server
connections stay pooled, so what is measured is the client side of PgBouncer's
authentication: with a plaintext password in ``auth_file`` PgBouncer derives the SCRAM key
(PBKDF2, 4096 iterations) at each login, with a SCRAM secret it does not. The client (libpq)
derives its own key at every login either way. Prints, per round and as the median over
rounds, the wall-clock time and the CPU time the PgBouncer process used meanwhile (from
``/proc``: PgBouncer runs one thread, so its CPU time per login bounds its login rate
whatever else loads the machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Literal, cast

import psycopg

from pgfailover.testing import LocalCluster


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _login(dsn: str) -> None:
    with psycopg.connect(dsn, prepare_threshold=None, connect_timeout=10) as conn:
        conn.execute("SELECT 1")


def sequential(dsn: str, logins: int) -> float:
    """Seconds ``logins`` logins take one after the other."""
    t0 = time.perf_counter()
    for _ in range(logins):
        _login(dsn)
    return time.perf_counter() - t0


def concurrent(dsn: str, logins: int) -> float:
    """Seconds from releasing ``logins`` threads together until each has logged in once."""
    start = threading.Barrier(logins + 1)
    errors: list[BaseException] = []

    def one() -> None:
        start.wait()
        try:
            _login(dsn)
        except BaseException as ex:  # reported after the round
            errors.append(ex)

    threads = [threading.Thread(target=one) for _ in range(logins)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {logins} logins failed; first: {errors[0]!r}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-mode", choices=("transaction", "session"), default="transaction")
    args = parser.parse_args()
    mode = cast(Literal["transaction", "session"], args.pool_mode)
    with LocalCluster(standbys=0, pgbouncer=mode) as cluster:
        assert cluster.pgbouncer is not None
        dsn = cluster.pgbouncer.dsn()
        _login(dsn)  # PgBouncer's first server connection is not what is measured
        assert cluster.pgbouncer.process is not None
        pid = cluster.pgbouncer.process.pid
        runs: dict[str, Callable[[str, int], float]] = {
            "sequential": sequential,
            "concurrent": concurrent,
        }
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                before = _cpu_seconds(pid)
                wall[name].append(run(dsn, args.logins))
                cpu[name].append(_cpu_seconds(pid) - before)
        userlist = (cluster.pgbouncer.root / "userlist.txt").read_text()
        kind = "SCRAM secrets" if "SCRAM-SHA-256$" in userlist else "plaintext passwords"
    print(f"{args.logins} logins through PgBouncer ({mode} mode), userlist holds {kind}\n")
    print("| logins | wall s, each round | median s | PgBouncer CPU s, each round | median s |")
    print("|---|---|---:|---|---:|")
    for name in runs:
        print(
            f"| {name} | {', '.join(f'{v:.3f}' for v in wall[name])} | "
            f"{statistics.median(wall[name]):.3f} | {', '.join(f'{v:.2f}' for v in cpu[name])} | "
            f"{statistics.median(cpu[name]):.2f} |"
        )


if __name__ == "__main__":
    main()
