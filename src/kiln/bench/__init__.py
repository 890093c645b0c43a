"""Bench: latency, throughput, memory and load time across variants, batch sizes and scenarios."""

from kiln.bench.config import BenchConfig
from kiln.bench.runner import BenchResult, bench

__all__ = ["BenchConfig", "BenchResult", "bench"]
