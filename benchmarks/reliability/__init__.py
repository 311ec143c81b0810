"""The reliability suite: checker workloads through every protected stack, sync and async,
across crashes, hangs and switchover churn, on real local clusters.

``make reliability`` runs ``python -m reliability`` (with ``benchmarks`` on the path) at
full size and writes ``docs/reliability.md`` and ``benchmarks/results/reliability.json``;
``tests/integration/test_reliability.py`` calls the same scenarios at CI size.

- :mod:`.workload`: the stacks, the checker workload and its verification;
- :mod:`.scenarios`: one runner per scenario kind;
- :mod:`.report`: the markdown report and the machine description;
- ``__main__``: the command line.
"""
