"""Baselines the benchmarks compare against (not part of the installed package)."""
