"""Benchmarks, not tests: each module runs on its own, e.g. ``python -m bench.ingress_throughput``.

They start the processes they measure on 127.0.0.1, create topics under a prefix of their own,
and stop and delete everything they started when they finish, fail or are interrupted. Results go
to docs/bench/; docs/performance.md explains them.
"""
