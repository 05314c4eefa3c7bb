"""Benchmarks: each script times a stage against a baseline measured in the same run and writes JSON that
docs/ tables are rendered from (top layer, beside ``jobs``)."""
