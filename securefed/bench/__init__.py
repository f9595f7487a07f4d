"""Benchmark suites run by ``securefed bench SUITE``; scripts in benchmarks/ call these."""
