"""Benchmarks: each module runs from the repository root as `python -m bench.NAME` (`python -m bench.run_all` runs
them all) and writes bench/results/NAME.json."""
