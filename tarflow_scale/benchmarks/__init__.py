"""Benchmarks behind `tarflow-bench`: scripts that print figures (never timed tests), shipped so a cluster node
can measure itself after `pip install`."""
