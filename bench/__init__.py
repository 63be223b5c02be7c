"""Benchmarks of Transformer Surgery (never timed tests): ``python -m bench [--quick]``; results in README.md."""
