"""Benchmarks (not tests): `make bench` = `python -m bench [MODULE ...]`. See bench/README.md."""
