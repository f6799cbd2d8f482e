"""Example data and transforms shipped with the library (used by the demo, tests and benchmarks)."""
