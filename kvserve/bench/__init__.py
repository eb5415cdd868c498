"""Benchmark clients (`kvserve bench ...`)."""
