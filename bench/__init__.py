"""Benchmarks that print tables measured side by side in one run. Run from the repository root as
`python -m bench.<name>`; what several share is in `bench/common.py`."""
