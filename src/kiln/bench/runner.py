"""The in-process runner: each variant × batch size, warmed up, timed, repeated; memory, load time, size.

Results are the plain dataclasses of ``results.py``, and a run interrupted with Ctrl-C still returns
(and writes) everything measured so far.

Load time and memory are measured fairly: each engine type is first loaded, run through the timing
code and closed, untimed (priming), so one-time start-up costs (the runtime's thread pools and
allocators, numpy's first median) are not charged to whichever variant happens to be measured first.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kiln.bench import scenarios
from kiln.bench.config import BenchConfig
from kiln.bench.memory import GpuMeter, check_device
from kiln.bench.results import BatchResult, BenchResult, VariantBench
from kiln.bench.stats import latency_stats, spread, timed_loop
from kiln.console import ProgressHook
from kiln.convert.parity import random_inputs
from kiln.engines.base import get_engine
from kiln.errors import NotFoundError
from kiln.memory import host_meter
from kiln.predictor import open_variant
from kiln.repository import CHOSEN, REFERENCE, Repository, Variant

MAX_SAMPLES = 2000


def machine_facts() -> dict[str, Any]:
    """What ``kiln doctor`` reports about this machine, with kiln's version."""
    from kiln._version import __version__
    from kiln.hardware import detect

    return {**detect().to_dict(), "kiln_version": __version__}


def resolve_variants(repository: Repository, model: str, version: int, wanted: list[str]) -> list[Variant]:
    """Turn 'reference' / 'chosen' / 'all' / ids into the variants to measure, without duplicates."""
    spec = repository.spec(model)
    built = repository.variant_ids(model, version)
    out: list[str] = []
    for name in wanted:
        if name == "all":
            out += [REFERENCE, *built]
        elif name == CHOSEN:
            if spec.chosen_variant and spec.chosen_variant in built:
                out.append(spec.chosen_variant)
        elif name == REFERENCE or name in built:
            out.append(name)
        else:
            raise NotFoundError("variant", name, [REFERENCE, *built], owner=f"model {model!r}")
    return [repository.variant(model, version, v) for v in dict.fromkeys(out)]


_PRIMING = BenchConfig(warmup_iters=0, min_time_s=1e-6, min_iters=2, max_iters=2, repeats=2)


def prime(variant: Variant, config: BenchConfig) -> None:
    """Load ``variant``, run it through the timing code once and close it, untimed: the engine's
    runtime starts up here, and so do the bench's own first-use costs (numpy's median alone allocates
    megabytes on its first call), so neither is charged to the first variant measured."""
    predictor = open_variant(variant, device=config.device, threads=config.threads)
    try:
        feed = random_inputs(predictor.spec.inputs, 1, seed=0)
        _time_batch(functools.partial(predictor.engine.run, feed), 1, _PRIMING)
    finally:
        predictor.close()


def primers(variants: list[Variant]) -> dict[str, Variant]:
    """One variant per engine type to prime with: the first that does not compile (so priming costs a
    load, not a torch.compile, and leaves no compiled-graph cache behind for a measured variant)."""
    chosen: dict[str, Variant] = {}
    for v in variants:
        if v.engine not in chosen or (_plain(v) and not _plain(chosen[v.engine])):
            chosen[v.engine] = v
    return chosen


def _plain(variant: Variant) -> bool:
    return get_engine(variant.engine).is_plain(variant.options)


def measure_variant(
    variant: Variant, config: BenchConfig, step: Callable[[str], None], sink: list[VariantBench]
) -> VariantBench:
    """Load one variant and time every batch size, appending to ``sink`` as soon as it loads, so a
    KeyboardInterrupt leaves every batch size measured so far in the results."""
    params, macs = _counts(variant)  # before the meters start: counting loads the artifact
    host, gpu = host_meter(), GpuMeter(config.device, variant.engine)
    with host, gpu:
        t0 = time.perf_counter()
        predictor = open_variant(variant, device=config.device, threads=config.threads,
                                 batch_sizes=tuple(config.batch_sizes))  # fmt: skip
        load_s = time.perf_counter() - t0
        result = VariantBench(
            variant=variant.id, engine=predictor.engine.name, precision=predictor.engine.options.precision,
            load_s=load_s, first_run_ms=float("nan"), size_bytes=variant.artifact_bytes(type(predictor.engine).artifact),
            peak_memory_bytes=0, memory_kind=host.kind, figures=variant.figures(),
            label=variant.label, params=params, macs=macs,
        )  # fmt: skip
        sink.append(result)
        try:
            for i, batch in enumerate(config.batch_sizes):
                step(f"{variant.id} · batch {batch}")
                feed = random_inputs(predictor.spec.inputs, batch, seed=batch)
                call = functools.partial(predictor.engine.run, feed)
                t0 = time.perf_counter()
                call()
                if i == 0:
                    result.first_run_ms = (time.perf_counter() - t0) * 1e3
                for _ in range(config.warmup_iters):
                    call()
                result.batches.append(_time_batch(call, batch, config))
        finally:
            # Read every meter while the engine still holds its memory, then free it.
            host.stop()
            gpu.stop()
            result.peak_memory_bytes = host.delta
            result.gpu_used_delta_bytes, result.torch_max_allocated_bytes = gpu.used_delta, gpu.torch_max_allocated
            predictor.close()
    return result


def _counts(variant: Variant) -> tuple[int | None, int | None]:
    """Parameters and MACs: what the optimizer recorded in the variant's figures, else counted now (the
    reference, or a variant an older kiln measured)."""
    from kiln.optimize.size import SizeFigures, count_size

    size = SizeFigures.from_dict(variant.figures().get("size")) or count_size(variant)
    return size.params, size.macs


def _time_batch(fn: Callable[[], object], batch: int, config: BenchConfig) -> BatchResult:
    all_times: list[float] = []
    repeat_p50: list[float] = []
    for _ in range(config.repeats):
        times = timed_loop(fn, config.min_time_s / config.repeats, config.min_iters, config.max_iters)
        all_times += times
        repeat_p50.append(float(np.median(times)) * 1e3)
    stats = latency_stats(all_times)
    total = float(np.sum(all_times))
    sp = spread(repeat_p50)
    warnings = []
    if config.repeats > 1 and sp.relative > config.spread_warning:
        warnings.append(
            f"batch {batch}: repeats disagree by {sp.relative:.0%} (p50 {sp.min:.3f}…{sp.max:.3f} ms); "
            "the machine is noisy, compare figures from one run only"
        )
    return BatchResult(
        batch=batch, latency=stats, items_per_s=batch * len(all_times) / total if total else float("nan"),
        per_item_ms=stats.p50_ms / batch, repeat_p50_ms=repeat_p50, spread_relative=sp.relative, warnings=warnings,
        samples_ms=[t * 1e3 for t in all_times[:: max(1, len(all_times) // MAX_SAMPLES)]][:MAX_SAMPLES],
    )  # fmt: skip


def bench(
    repo: str | Path | Repository,
    model: str,
    config: BenchConfig | None = None,
    *,
    version: int | None = None,
    progress: ProgressHook | None = None,
    **options: Any,
) -> BenchResult:
    """Measure ``model``'s variants in-process; Ctrl-C stops early and returns what was measured.

    ``options`` are :class:`BenchConfig` fields that override ``config``:
    ``kiln.bench(repo, "digits", batch_sizes=[1, 8], scenarios=["server"], find_max_qps=True)``.
    """
    config = BenchConfig.build(config, **options)
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    number, _ = repository.resolve(model, version)
    variants = resolve_variants(repository, model, number, config.variants)
    device_warnings = check_device(config.device, {v.engine for v in variants})  # refuse before anything runs
    result = BenchResult(
        model=model, version=number, created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config.model_dump(mode="json"), machine=machine_facts(), warnings=device_warnings,
        repo=str(repository.root), command=config.command(model, str(repository.root), number, [v.id for v in variants]),
    )  # fmt: skip
    total = len(variants) * len(config.batch_sizes) + len(variants) * len(config.scenarios)
    done = [0]

    def step(what: str) -> None:
        if progress is not None:
            progress(what, done[0], total)
        done[0] += 1

    try:
        for engine, primer in primers(variants).items():
            if progress is not None:
                progress(f"starting {engine}", 0, total)
            prime(primer, config)
        for variant in variants:
            measured = measure_variant(variant, config, step, result.variants)
            result.warnings += [w for b in measured.batches for w in (f"{variant.id}: {x}" for x in b.warnings)]
        for scenario in config.scenarios:
            for variant in variants:
                step(f"{scenario} · {variant.id}")
                found = scenarios.run(scenario, repository, model, number, variant.id, config, result)
                if found is not None:
                    result.scenarios.append(found)
        if progress is not None:
            progress("done", total, total)
    except KeyboardInterrupt:
        result.interrupted = True
        result.warnings.append("interrupted: the results hold what was measured before Ctrl-C")
    return result
