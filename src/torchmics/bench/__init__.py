"""Benchmarks: torchmics against its peers on the same hardware."""
