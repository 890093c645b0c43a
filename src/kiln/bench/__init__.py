"""Bench: latency, throughput, memory and load time across variants, batch sizes and scenarios.

The entry function is :func:`kiln.bench` (:func:`kiln.bench.runner.bench`); options are a
:class:`kiln.bench.config.BenchConfig`, results :mod:`kiln.bench.results`. This package imports nothing,
so that ``import kiln`` stays cheap.
"""
