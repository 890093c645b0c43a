"""Bench: latency, throughput, memory and load time across variants, batch sizes and scenarios.

``kiln.bench`` is both this package and the entry function (:func:`bench`): the package is callable,
so ``kiln.bench(repo, "digits", batch_sizes=[1, 8])`` works whichever Python bound to the name.
"""

from kiln import _callable_package
from kiln.bench.config import BenchConfig
from kiln.bench.runner import BenchResult, bench

__all__ = ["BenchConfig", "BenchResult", "bench"]

_callable_package(__name__, bench)
