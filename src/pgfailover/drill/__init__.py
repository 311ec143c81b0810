"""``pgfailover drill``: the same write workload through naive and protected stacks, across a
real failover on a local cluster, with every acknowledged write verified afterwards."""
