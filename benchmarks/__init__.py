"""Benchmarks of mergeprobe (run as modules, e.g. ``python -m benchmarks.mergebench.run``)."""
