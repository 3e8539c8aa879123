"""Benchmarks (`make bench` / `python -m benchmarks`): speed and memory as ratios
measured within one run, never asserted as wall-clock times in tests."""
