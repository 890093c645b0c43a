"""What a bench run measured, as plain dataclasses.

Their own module so that the runner, the scenarios and the report all read them without importing
each other; ``report.py`` turns them into tables, JSON and HTML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.bench.stats import LatencyStats


@dataclass
class BatchResult:
    batch: int
    latency: LatencyStats
    items_per_s: float
    per_item_ms: float
    repeat_p50_ms: list[float]
    spread_relative: float  # of the repeats' p50, (max - min) / median
    warnings: list[str] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)  # up to runner.MAX_SAMPLES, for the distribution plot
    repeat_p99_ms: list[float] = field(default_factory=list)
    repeat_items_per_s: list[float] = field(default_factory=list)
    # (max - min) / median of the repeats, per figure ("p50_ms", "p90_ms", "p99_ms", "items_per_s"): the noise
    # `kiln bench --compare` allows for before it calls a change a regression
    spread: dict[str, float] = field(default_factory=dict)


@dataclass
class VariantBench:
    """One variant measured in-process: load, memory, size and every batch size."""

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
    params: int | None = None  # parameters of the artifact it runs (kiln.optimize.size)
    macs: int | None = None  # multiply-accumulates per item at batch 1; None where not countable
    same_as: str = ""  # measured once under this name: the same artifact on the same engine (reference = chosen)


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
    variants: list[VariantBench] = field(default_factory=list)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    kind: str = "in-process"
    repo: str = ""
    command: str = ""  # the kiln bench command that measures this again
    chosen: str = ""  # the id of the variant `kiln optimize` chose, when one was measured
    skipped: list[str] = field(default_factory=list)  # what --time-budget left unmeasured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
