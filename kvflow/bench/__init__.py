"""Benchmarks: seeded reference models, machine limits, throughput against peers."""
