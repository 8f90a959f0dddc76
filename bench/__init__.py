"""Benchmarks of the sidecar on a local stack; `python -m bench --help` (or `make bench`). Not collected by pytest."""
