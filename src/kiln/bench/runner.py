"""The in-process runner: each variant × batch size, warmed up, timed, repeated; memory, load time, size.

Results are the plain dataclasses of ``results.py``, and a run interrupted with Ctrl-C still returns
(and writes) everything measured so far.

Load time and memory are measured fairly: each engine type is first loaded, run through the timing
code and closed, untimed (priming), so one-time start-up costs (the runtime's thread pools and
allocators, numpy's first median) are not charged to whichever variant happens to be measured first.

Timing is fair too: every variant is loaded and warmed first, then the repeats go round-robin (repeat 1
of every variant and batch size, then repeat 2 …), so a machine that drifts slows every variant alike
instead of whichever was measured last. Variants that run the same files on the same engine with the
same options (the reference and an unchanged "onnxruntime fp32" variant) are measured once and shown
under both names: timing one file twice only measures the machine's noise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from kiln.convert.example_shapes import random_inputs_line
from kiln.convert.parity import random_inputs
from kiln.engines.base import get_engine
from kiln.errors import NotFoundError
from kiln.memory import check_batch_memory, host_meter
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


def same_artifacts(variants: list[Variant]) -> dict[str, str]:
    """Variants that run the same files on the same engine with the same precision and options, each
    mapped to the first such variant in ``variants``: the bench measures that one only. Files are
    compared by size first and hashed only where sizes agree."""
    first: dict[tuple[Any, ...], list[Variant]] = {}
    digests: dict[str, str] = {}

    def digest(v: Variant) -> str:
        if v.id not in digests:
            digests[v.id] = _digest(_artifacts(v))
        return digests[v.id]

    out: dict[str, str] = {}
    for v in variants:
        candidates = first.setdefault(_cheap_identity(v), [])
        twin = next((c for c in candidates if digest(c) == digest(v)), None)
        if twin is None:
            candidates.append(v)
        else:
            out[v.id] = twin.id
    return out


def _artifacts(variant: Variant) -> list[Path]:
    return sorted(variant.artifact_files(get_engine(variant.engine).artifact))


def _cheap_identity(variant: Variant) -> tuple[Any, ...]:
    options = json.dumps(variant.options, sort_keys=True, default=str)
    return variant.engine, variant.precision, options, tuple((p.name, p.stat().st_size) for p in _artifacts(variant))


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---- how long a run takes, said before it starts ---------------------------------------------------------
SEARCH_TRIALS = 9  # a --find-max-qps or multi-stream search: doubling from the estimate, then bisecting
LOAD_GUESS_S = 1.0  # load, first runs and warm-up of one variant, when nothing better is known
ANNOUNCE_FROM_S = 20.0  # the CLI says how long a run will take from this estimate on


@dataclass(frozen=True)
class Plan:
    """What a run will measure and about how long it takes (from the timing settings and, where the
    optimizer timed a variant, its batch-1 latency)."""

    variants: int  # measured ones: identical artifacts count once
    batch_sizes: int
    scenarios: list[str]
    seconds: float
    budget_s: float | None = None

    @property
    def text(self) -> str:
        what = f"{self.variants} variant{'s' if self.variants != 1 else ''} × {self.batch_sizes} batch size" + (
            "s" if self.batch_sizes != 1 else "")  # fmt: skip
        searches = [s for s in self.scenarios if s in ("server", "multi-stream")]
        if searches:
            what += ", then " + " and ".join(f"the {s} scenario" for s in searches) + " on each"
        cap = f"capped at {_duration(self.budget_s)} by --time-budget" if self.budget_s else "--time-budget to cap"
        return f"≈ {_duration(self.seconds)} for {what}; {cap}"


def _duration(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def estimate(variants: list[Variant], config: BenchConfig) -> Plan:
    """How long measuring ``variants`` under ``config`` takes, roughly."""
    per_scenario = 0.0
    if "server" in config.scenarios:
        per_scenario += config.scenario_seconds * ((SEARCH_TRIALS if config.find_max_qps else 0)
                                                   + (1 if config.server_qps or not config.find_max_qps else 0))  # fmt: skip
    if "multi-stream" in config.scenarios:
        per_scenario += config.scenario_seconds * SEARCH_TRIALS
    seconds = 0.0
    for v in variants:
        call_s = _figure(v.figures().get("timing"), "latency_ms") / 1e3
        for batch in config.batch_sizes:
            calls = min(config.max_iters, config.min_iters) * config.repeats
            seconds += max(config.min_time_s, calls * call_s * batch) + (config.warmup_iters + 1) * call_s * batch
        seconds += LOAD_GUESS_S + per_scenario
    return Plan(len(variants), len(config.batch_sizes), list(config.scenarios), seconds, config.time_budget_s)


def _figure(data: Any, key: str) -> float:
    value = data.get(key) if isinstance(data, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def plan(
    repo: str | Path | Repository, model: str, config: BenchConfig | None = None, *, version: int | None = None,
    **options: Any,
) -> Plan:  # fmt: skip
    """What :func:`bench` with the same arguments will measure, and about how long it will take."""
    config = BenchConfig.build(config, **options)
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    number, _ = repository.resolve(model, version)
    variants = resolve_variants(repository, model, number, config.variants)
    aliases = same_artifacts(variants)
    return estimate([v for v in variants if v.id not in aliases], config)


# ---- measuring -------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    """A variant loaded and warmed at every batch size, waiting for its turns at the timing rounds."""

    variant: Variant
    predictor: Any
    result: VariantBench
    calls: dict[int, Callable[[], object]]
    repeats: dict[int, list[list[float]]] = field(default_factory=dict)

    def time(self, batch: int, config: BenchConfig) -> None:
        call = self.calls[batch]
        call()  # untimed: another variant ran since this one did, so caches and thread pools start cold
        times = timed_loop(call, config.min_time_s / config.repeats, config.min_iters, config.max_iters)
        self.repeats.setdefault(batch, []).append(times)
        self.result.batches = [_batch_result(b, reps, config) for b, reps in sorted(self.repeats.items())]


def load_variant(variant: Variant, config: BenchConfig, sink: list[VariantBench]) -> _Loaded:
    """Load one variant and run it once and through the warm-up at every batch size, under the memory
    meters (so its peak memory covers loading and running every batch size), appending its result to
    ``sink`` as soon as it loads; the timing rounds come later (:func:`bench`). On any failure or
    Ctrl-C the variant is closed again."""
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

        def read_meters() -> None:  # while the engine still holds its memory
            host.stop()
            gpu.stop()
            result.peak_memory_bytes = host.delta
            result.gpu_used_delta_bytes, result.torch_max_allocated_bytes = gpu.used_delta, gpu.torch_max_allocated

        calls: dict[int, Callable[[], object]] = {}
        try:
            for i, batch in enumerate(config.batch_sizes):
                feed = random_inputs(predictor.spec.inputs, batch, seed=batch)
                call = functools.partial(predictor.engine.run, feed)
                t0 = time.perf_counter()
                call()
                if i == 0:
                    result.first_run_ms = (time.perf_counter() - t0) * 1e3
                for _ in range(config.warmup_iters):
                    call()
                calls[batch] = call
        except BaseException:
            read_meters()
            predictor.close()
            raise
        read_meters()
    return _Loaded(variant, predictor, result, calls)


def _counts(variant: Variant) -> tuple[int | None, int | None]:
    """Parameters and MACs: what the optimizer recorded in the variant's figures, else counted now (the
    reference, or a variant an older kiln measured)."""
    from kiln.optimize.size import SizeFigures, count_size

    size = SizeFigures.from_dict(variant.figures().get("size")) or count_size(variant)
    return size.params, size.macs


def _time_batch(fn: Callable[[], object], batch: int, config: BenchConfig) -> BatchResult:
    """Every repeat of one batch size back to back (priming only: measured variants take turns)."""
    repeats = [timed_loop(fn, config.min_time_s / config.repeats, config.min_iters, config.max_iters)
               for _ in range(config.repeats)]  # fmt: skip
    return _batch_result(batch, repeats, config)


def _batch_result(batch: int, repeats: list[list[float]], config: BenchConfig) -> BatchResult:
    all_times = [t for times in repeats for t in times]
    repeat_p50 = [float(np.median(times)) * 1e3 for times in repeats]
    repeat_p99 = [float(np.percentile(times, 99)) * 1e3 for times in repeats]
    repeat_ips = [batch * len(times) / s if (s := float(np.sum(times))) else float("nan") for times in repeats]
    stats = latency_stats(all_times)
    total = float(np.sum(all_times))
    sp = spread(repeat_p50)
    repeat_p90 = [float(np.percentile(times, 90)) * 1e3 for times in repeats]  # for single-stream's p90
    spreads = {} if len(repeats) < 2 else {
        "p50_ms": sp.relative, "p90_ms": spread(repeat_p90).relative, "p99_ms": spread(repeat_p99).relative,
        "items_per_s": spread(repeat_ips).relative}  # fmt: skip
    warnings = []
    if len(repeats) > 1 and sp.relative > config.spread_warning:
        warnings.append(
            f"batch {batch}: repeats disagree by {sp.relative:.0%} (p50 {sp.min:.3f}…{sp.max:.3f} ms); "
            "the machine is noisy, compare figures from one run only"
        )
    return BatchResult(
        batch=batch, latency=stats, items_per_s=batch * len(all_times) / total if total else float("nan"),
        per_item_ms=stats.p50_ms / batch, repeat_p50_ms=repeat_p50, spread_relative=sp.relative, warnings=warnings,
        samples_ms=[t * 1e3 for t in all_times[:: max(1, len(all_times) // MAX_SAMPLES)]][:MAX_SAMPLES],
        repeat_p99_ms=repeat_p99, repeat_items_per_s=repeat_ips, spread=spreads,
    )  # fmt: skip


def _noise_warning(result: BenchResult, config: BenchConfig) -> str | None:
    """One line for every batch size whose repeats disagreed (each is also marked in its table row)."""
    noisy = [(v.variant, b) for v in result.variants if not v.same_as for b in v.batches if b.warnings]
    if not noisy:
        return None
    if len(noisy) == 1:
        return f"{noisy[0][0]}: {noisy[0][1].warnings[0]}"
    measured = sum(len(v.batches) for v in result.variants if not v.same_as)
    name, worst = max(noisy, key=lambda vb: vb[1].spread_relative)
    return (f"repeats disagreed by more than {config.spread_warning:.0%} in {len(noisy)} of {measured} measurements "
            f"(worst: {name} batch {worst.batch}, {worst.spread_relative:.0%}): the machine is noisy, compare "
            "figures from one run only (kiln bench --compare allows for the spread it measured)")  # fmt: skip


def bench(
    repo: str | Path | Repository,
    model: str,
    config: BenchConfig | None = None,
    *,
    version: int | None = None,
    progress: ProgressHook | None = None,
    **options: Any,
) -> BenchResult:
    """Measure ``model``'s variants in-process; Ctrl-C stops early and returns what was measured, and
    so does ``time_budget_s`` (listing what it skipped). :func:`plan` says beforehand how long it takes.

    ``options`` are :class:`BenchConfig` fields that override ``config``:
    ``kiln.bench(repo, "digits", batch_sizes=[1, 8], scenarios=["server"], find_max_qps=True)``.
    """
    started = time.monotonic()
    config = BenchConfig.build(config, **options)
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    number, _ = repository.resolve(model, version)
    variants = resolve_variants(repository, model, number, config.variants)
    device_warnings = check_device(config.device, {v.engine for v in variants})  # refuse before anything runs
    spec = repository.spec(model)
    check_batch_memory(spec, max(config.batch_sizes), "bench option", "batch_sizes")
    chosen = spec.chosen_variant or ""
    shapes = random_inputs_line(spec.inputs)  # what the figures hold for, where the model's dims are dynamic
    warnings = device_warnings + ([shapes] if shapes else [])
    result = BenchResult(
        model=model, version=number, created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config.model_dump(mode="json"), machine=machine_facts(), warnings=warnings,
        repo=str(repository.root), command=config.command(model, str(repository.root), number, [v.id for v in variants]),
        chosen=chosen if chosen in {v.id for v in variants} else "",
    )  # fmt: skip
    aliases = same_artifacts(variants)
    measured = [v for v in variants if v.id not in aliases]
    total = len(measured) * len(config.batch_sizes) * config.repeats + len(measured) * len(config.scenarios)
    done = [0]

    def step(what: str) -> None:
        if progress is not None:
            progress(what, done[0], total)
        done[0] += 1

    def over_budget(what: str) -> bool:
        if config.time_budget_s is None or time.monotonic() - started <= config.time_budget_s:
            return False
        result.skipped.append(what)
        return True

    loaded: list[_Loaded] = []
    try:
        for engine, primer in primers(measured).items():
            if progress is not None:
                progress(f"starting {engine}", 0, total)
            prime(primer, config)
        try:
            for variant in measured:
                if not over_budget(f"{variant.id}: not loaded"):
                    if progress is not None:
                        progress(f"loading {variant.id}", done[0], total)
                    loaded.append(load_variant(variant, config, result.variants))
            for r in range(config.repeats):  # round-robin: repeat r of every variant, then repeat r + 1
                for item in loaded:
                    for batch in config.batch_sizes:
                        if not over_budget(f"{item.variant.id}: batch {batch} repeat {r + 1}/{config.repeats}"):
                            step(f"{item.variant.id} · batch {batch} · {r + 1}/{config.repeats}")
                            item.time(batch, config)
        finally:
            for item in loaded:
                item.predictor.close()
        for scenario in config.scenarios:
            for item in loaded:
                if over_budget(f"{item.variant.id}: {scenario} scenario"):
                    continue
                step(f"{scenario} · {item.variant.id}")
                found = scenarios.run(scenario, repository, model, number, item.variant.id, config, result,
                                      deadline=None if config.time_budget_s is None
                                      else started + config.time_budget_s)  # fmt: skip
                if found is not None:
                    result.scenarios.append(found)
        if progress is not None:
            progress("done", total, total)
    except KeyboardInterrupt:
        result.interrupted = True
        result.warnings.append("interrupted: the results hold what was measured before Ctrl-C")
    _show_twice(result, aliases, variants)
    if (noise := _noise_warning(result, config)) is not None:
        result.warnings.append(noise)
    if result.skipped:
        result.warnings.append(_budget_warning(result.skipped, config, time.monotonic() - started))
    return result


def _show_twice(result: BenchResult, aliases: dict[str, str], variants: list[Variant]) -> None:
    """Each variant measured under another name appears under its own too, with its own label and
    optimizer figures (``same_as`` names whose timing it shows), in the order the variants were asked for."""
    if not aliases:
        return
    by_id = {v.variant: v for v in result.variants}
    for v in variants:
        twin = aliases.get(v.id)
        if twin in by_id:
            by_id[v.id] = dataclasses.replace(by_id[twin], variant=v.id, label=v.label, figures=v.figures(),
                                              same_as=twin)  # fmt: skip
    order = [v.id for v in variants]
    result.variants = [by_id[v] for v in order if v in by_id]
    twins = [dataclasses.replace(s, variant=alias) for s in result.scenarios for alias, twin in aliases.items()
             if s.variant == twin]  # fmt: skip
    scenario_order = {name: i for i, name in enumerate(result.config.get("scenarios", []))}
    result.scenarios = sorted([*result.scenarios, *twins],
                              key=lambda s: (scenario_order.get(s.scenario, 99), order.index(s.variant)))  # fmt: skip


def _budget_warning(skipped: list[str], config: BenchConfig, elapsed: float) -> str:
    shown = "; ".join(skipped[:6]) + (f"; and {len(skipped) - 6} more" if len(skipped) > 6 else "")
    return (f"--time-budget {config.time_budget_s:g} s reached after {elapsed:.0f} s: started no new measurement, "
            f"skipped {len(skipped)}: {shown}")  # fmt: skip
