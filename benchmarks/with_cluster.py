"""Run a benchmark script against a fresh LocalCluster primary, passing ``--dsn`` to it.

python benchmarks/with_cluster.py benchmarks/bench_connection.py --rounds 30
"""

from __future__ import annotations

import subprocess
import sys

from pgfailover.testing import LocalCluster


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with LocalCluster(standbys=0, pgbouncer=None) as cluster:
        argv = [sys.executable, *sys.argv[1:], "--dsn", cluster.primary.dsn()]
        return subprocess.call(argv)


if __name__ == "__main__":
    sys.exit(main())
