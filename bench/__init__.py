"""Benchmark suites: ``python -m bench.<suite> [--device cpu|cuda] [--quick]``; results in bench/results/."""
