"""The in-process runner: each variant × batch size, warmed up, timed, repeated; memory, load time, size.

Results are plain dataclasses so ``report.py`` can turn them into tables, JSON and HTML, and a run
interrupted with Ctrl-C still returns (and writes) everything measured so far.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kiln.bench.config import BenchConfig
from kiln.bench.stats import LatencyStats, latency_stats, spread, timed_loop
from kiln.convert.parity import random_inputs
from kiln.errors import NotFoundError
from kiln.predictor import CHOSEN, REFERENCE, Predictor, load
from kiln.repository import RECIPE_FILE, VARIANTS_DIR, Repository

Progress = Callable[[str], None]
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
    peak_memory_bytes: int
    memory_kind: str  # "rss-delta" on CPU, "cuda-max-allocated" on GPU
    label: str = ""  # what the variant is, in words ("onnxruntime int8 static-minmax + onnxslim")
    batches: list[BatchResult] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # what the optimizer measured (accuracy …)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PeakMemory:
    """Peak resident memory of this process above a baseline, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._interval = interval_s
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-peak-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)


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


def artifact_size(predictor: Predictor) -> int:
    """Bytes of the files the engine runs (the version's own files, or the variant directory)."""
    root = predictor.path
    files = [p for p in root.iterdir() if p.is_file() and p.suffix not in (".json", ".yaml")]
    if predictor.variant == REFERENCE:
        artifact = type(predictor.engine).artifact
        files = [p for p in files if p.name.startswith(artifact)]
    return sum(p.stat().st_size for p in files)


def _cuda_peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str, memory: PeakMemory) -> tuple[int, str]:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda-max-allocated"
    return memory.delta, "rss-delta"


def _figures(predictor: Predictor) -> dict[str, Any]:
    import json

    path = predictor.path / "figures.json"
    if predictor.variant != REFERENCE and path.is_file():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return {}


def _label(predictor: Predictor) -> str:
    """The optimizer's words for a variant (its recipe's ``label``), else the engine and precision."""
    import json

    fallback = f"{predictor.engine.name} {predictor.engine.options.precision}"
    path = predictor.path / "recipe.json"
    if predictor.variant != REFERENCE and path.is_file():
        return str(json.loads(path.read_text()).get("label") or fallback)
    return fallback


def measure_variant(
    repo: Repository,
    model: str,
    version: int | None,
    variant: str,
    config: BenchConfig,
    say: Progress,
    sink: list[VariantResult],
) -> VariantResult:
    """Load one variant and time every batch size, appending to ``sink`` as soon as it loads, so a
    KeyboardInterrupt leaves every batch size measured so far in the results."""
    memory = PeakMemory()
    _cuda_peak_reset(config.device)
    with memory:
        t0 = time.perf_counter()
        predictor = load(repo, model, version=version, variant=variant, device=config.device, threads=config.threads)
        load_s = time.perf_counter() - t0
        result = VariantResult(
            variant=variant, engine=predictor.engine.name, precision=predictor.engine.options.precision,
            load_s=load_s, first_run_ms=float("nan"), size_bytes=artifact_size(predictor),
            peak_memory_bytes=0, memory_kind="rss-delta", figures=_figures(predictor), label=_label(predictor),
        )  # fmt: skip
        sink.append(result)
        try:
            for i, batch in enumerate(config.batch_sizes):
                say(f"{variant} · batch {batch}")
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
            result.peak_memory_bytes, result.memory_kind = _peak_memory(config.device, memory)
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
    progress: Progress | None = None,
) -> BenchResult:
    """Measure ``model``'s variants in-process; Ctrl-C stops early and returns what was measured."""
    from kiln import __version__
    from kiln.bench import scenarios
    from kiln.hardware import detect

    config = config or BenchConfig()
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    number, _ = repository.resolve(model, version)
    say = progress or (lambda _msg: None)
    variants = resolve_variants(repository, model, number, config.variants)
    result = BenchResult(
        model=model, version=number, created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config.model_dump(mode="json"), machine={**detect().to_dict(), "kiln_version": __version__},
    )  # fmt: skip
    try:
        for variant in variants:
            measured = measure_variant(repository, model, number, variant, config, say, result.variants)
            result.warnings += [w for b in measured.batches for w in (f"{variant}: {x}" for x in b.warnings)]
        for scenario in config.scenarios:
            for variant in variants:
                say(f"{scenario} · {variant}")
                found = scenarios.run(scenario, repository, model, number, variant, config, result)
                if found is not None:
                    result.scenarios.append(found)
    except KeyboardInterrupt:
        result.interrupted = True
        result.warnings.append("interrupted: the results hold what was measured before Ctrl-C")
    return result
