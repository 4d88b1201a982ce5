"""Benchmarks of the ticketing platform (not part of the test suite)."""
