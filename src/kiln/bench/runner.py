"""The in-process runner: each variant × batch size, warmed up, timed, repeated; memory, load time, size.

Results are plain dataclasses so ``report.py`` can turn them into tables, JSON and HTML, and a run
interrupted with Ctrl-C still returns (and writes) everything measured so far.

Load time and memory are measured fairly: each engine type is first loaded, run through the timing
code and closed, untimed (priming), so one-time start-up costs (the runtime's thread pools and
allocators, numpy's first median) are not charged to whichever variant happens to be measured first.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kiln.bench.config import BenchConfig
from kiln.bench.memory import GpuMeter, check_device, host_meter
from kiln.bench.stats import LatencyStats, latency_stats, spread, timed_loop
from kiln.console import ProgressHook
from kiln.convert.parity import random_inputs
from kiln.errors import NotFoundError
from kiln.predictor import CHOSEN, REFERENCE, Predictor, load
from kiln.repository import RECIPE_FILE, VARIANTS_DIR, Repository, read_recipe

MAX_SAMPLES = 2000


@dataclass
class BatchResult:
    batch: int
    latency: LatencyStats
    items_per_s: float
    per_item_ms: float
    repeat_p50_ms: list[float]
    spread_relative: float
    warnings: list[str] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)  # up to MAX_SAMPLES, for the distribution plot


@dataclass
class VariantResult:
    variant: str
    engine: str
    precision: str
    load_s: float
    first_run_ms: float
    size_bytes: int
    peak_memory_bytes: int  # host memory: peak resident set above the baseline before load
    memory_kind: str  # "vmhwm-delta" (Linux, the kernel's peak) or "rss-sampled-delta" (a sampler thread)
    label: str = ""  # what the variant is, in words ("onnxruntime int8 static-minmax + onnxslim")
    batches: list[BatchResult] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # what the optimizer measured (accuracy …)
    gpu_used_delta_bytes: dict[str, int] | None = None  # NVML used memory after - before, per device index
    torch_max_allocated_bytes: int | None = None  # torch.cuda.max_memory_allocated (torch engine on CUDA)


@dataclass
class ScenarioResult:
    scenario: str
    variant: str
    params: dict[str, Any]
    metrics: dict[str, Any]


@dataclass
class BenchResult:
    model: str
    version: int
    created: str
    config: dict[str, Any]
    machine: dict[str, Any]
    variants: list[VariantResult] = field(default_factory=list)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    kind: str = "in-process"
    repo: str = ""
    command: str = ""  # the kiln bench command that measures this again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_facts() -> dict[str, Any]:
    """What ``kiln doctor`` reports about this machine, with kiln's version."""
    from kiln import __version__
    from kiln.hardware import detect

    return {**detect().to_dict(), "kiln_version": __version__}


def resolve_variants(repository: Repository, model: str, version: int | None, wanted: list[str]) -> list[str]:
    """Turn 'reference' / 'chosen' / 'all' / ids into the variant ids to measure, without duplicates."""
    spec = repository.spec(model)
    _, vdir = repository.resolve(model, version)
    built = sorted(p.name for p in (vdir / VARIANTS_DIR).glob("*") if (p / RECIPE_FILE).is_file())
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
            raise NotFoundError(f"model {model!r} has no variant {name!r}; available: {['reference', *built]}")
    return list(dict.fromkeys(out))


def _recipe(repository: Repository, model: str, version: int, variant: str) -> tuple[str, dict[str, Any]]:
    """(engine name, run options) of a variant, read from its recipe without loading it."""
    if variant == REFERENCE:
        return "onnxruntime", {}  # what kiln.load runs for the reference
    _, vdir = repository.resolve(model, version)
    recipe = read_recipe(vdir / VARIANTS_DIR / variant, model, version)
    return recipe.engine, dict(recipe.options)


def artifact_size(predictor: Predictor) -> int:
    """Bytes of the files the engine runs (the version's own files, or the variant directory)."""
    root = predictor.path
    files = [p for p in root.iterdir() if p.is_file() and p.suffix not in (".json", ".yaml")]
    if predictor.variant == REFERENCE:
        artifact = type(predictor.engine).artifact
        files = [p for p in files if p.name.startswith(artifact)]
    return sum(p.stat().st_size for p in files)


def _figures(predictor: Predictor) -> dict[str, Any]:
    path = predictor.path / "figures.json"
    if predictor.variant != REFERENCE and path.is_file():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return {}


def _label(predictor: Predictor) -> str:
    """The optimizer's words for a variant (its recipe's ``label``), else the engine and precision."""
    fallback = f"{predictor.engine.name} {predictor.engine.options.precision}"
    path = predictor.path / "recipe.json"
    if predictor.variant != REFERENCE and path.is_file():
        return str(json.loads(path.read_text()).get("label") or fallback)
    return fallback


_PRIMING = BenchConfig(warmup_iters=0, min_time_s=1e-6, min_iters=2, max_iters=2, repeats=2)


def prime(repo: Repository, model: str, version: int, variant: str, config: BenchConfig) -> None:
    """Load ``variant``, run it through the timing code once and close it, untimed: the engine's
    runtime starts up here, and so do the bench's own first-use costs (numpy's median alone allocates
    megabytes on its first call), so neither is charged to the first variant measured."""
    predictor = load(repo, model, version=version, variant=variant, device=config.device, threads=config.threads)
    try:
        feed = random_inputs(predictor.spec.inputs, 1, seed=0)
        _time_batch(functools.partial(predictor.engine.run, feed), 1, _PRIMING)
    finally:
        predictor.close()


def primers(engines: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """One variant per engine type to prime with: the first that does not compile (so priming costs a
    load, not a torch.compile, and leaves no compiled-graph cache behind for a measured variant)."""
    chosen: dict[str, str] = {}
    for variant, (engine, options) in engines.items():
        if engine not in chosen or (options.get("compile") is None and engines[chosen[engine]][1].get("compile")):
            chosen[engine] = variant
    return chosen


def measure_variant(
    repo: Repository,
    model: str,
    version: int | None,
    variant: str,
    config: BenchConfig,
    step: Callable[[str], None],
    sink: list[VariantResult],
    engine: str = "onnxruntime",
) -> VariantResult:
    """Load one variant and time every batch size, appending to ``sink`` as soon as it loads, so a
    KeyboardInterrupt leaves every batch size measured so far in the results."""
    host, gpu = host_meter(), GpuMeter(config.device, engine)
    with host, gpu:
        t0 = time.perf_counter()
        predictor = load(repo, model, version=version, variant=variant, device=config.device, threads=config.threads)
        load_s = time.perf_counter() - t0
        result = VariantResult(
            variant=variant, engine=predictor.engine.name, precision=predictor.engine.options.precision,
            load_s=load_s, first_run_ms=float("nan"), size_bytes=artifact_size(predictor),
            peak_memory_bytes=0, memory_kind=host.kind, figures=_figures(predictor), label=_label(predictor),
        )  # fmt: skip
        sink.append(result)
        try:
            for i, batch in enumerate(config.batch_sizes):
                step(f"{variant} · batch {batch}")
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
    from kiln.bench import scenarios

    config = BenchConfig.build(config, **options)
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    number, _ = repository.resolve(model, version)
    variants = resolve_variants(repository, model, number, config.variants)
    engines = {v: _recipe(repository, model, number, v) for v in variants}
    device_warnings = check_device(config.device, {e for e, _ in engines.values()})  # refuse before anything runs
    result = BenchResult(
        model=model, version=number, created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config.model_dump(mode="json"), machine=machine_facts(), warnings=device_warnings,
        repo=str(repository.root), command=config.command(model, str(repository.root), number, variants),
    )  # fmt: skip
    total = len(variants) * len(config.batch_sizes) + len(variants) * len(config.scenarios)
    done = [0]

    def step(what: str) -> None:
        if progress is not None:
            progress(what, done[0], total)
        done[0] += 1

    try:
        for engine, variant in primers(engines).items():
            if progress is not None:
                progress(f"starting {engine}", 0, total)
            prime(repository, model, number, variant, config)
        for variant in variants:
            measured = measure_variant(repository, model, number, variant, config, step, result.variants,
                                       engine=engines[variant][0])  # fmt: skip
            result.warnings += [w for b in measured.batches for w in (f"{variant}: {x}" for x in b.warnings)]
        for scenario in config.scenarios:
            for variant in variants:
                step(f"{scenario} · {variant}")
                found = scenarios.run(scenario, repository, model, number, variant, config, result)
                if found is not None:
                    result.scenarios.append(found)
        if progress is not None:
            progress("done", total, total)
    except KeyboardInterrupt:
        result.interrupted = True
        result.warnings.append("interrupted: the results hold what was measured before Ctrl-C")
    return result
