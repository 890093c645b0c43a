"""What a search found: each variant's figures and verdict (:class:`VariantResult`) and the whole run
(:class:`OptimizeResult`), as ``kiln optimize`` prints them and ``report/optimize.json`` keeps them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.optimize import accuracy, timing
from kiln.optimize.size import SizeFigures
from kiln.recipe import Recipe

Status = Literal["chosen", "accepted", "rejected", "skipped", "failed"]


@dataclass
class VariantResult:
    id: str
    label: str
    recipe: Recipe | None
    status: Status = "accepted"
    reason: str = ""
    built: bool = False
    accuracy: accuracy.AccuracyFigures | None = None
    timing: timing.Timing | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    pareto: bool = False
    speedup: float | None = None
    fresh: bool = False  # timed in this run (not read from figures.json)
    size: SizeFigures | None = None  # parameters, MACs, file size, peak memory

    def objective(self, objective: str) -> float | None:
        """Lower is better: batch-1 ms, or seconds per item."""
        if self.timing is None:
            return None
        return self.timing.latency_ms if objective == "latency" else 1.0 / self.timing.throughput

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "label": self.label, "status": self.status, "reason": self.reason, "built": self.built,
            "pareto": self.pareto, "speedup": self.speedup,
            "recipe": None if self.recipe is None else self.recipe.model_dump(mode="json"),
            "accuracy": None if self.accuracy is None else self.accuracy.to_dict(),
            "timing": None if self.timing is None else self.timing.to_dict(), "passes": self.passes,
            "size": None if self.size is None else self.size.to_dict(),
        }  # fmt: skip


@dataclass
class OptimizeResult:
    model: str
    version: int
    objective: str
    metric: str
    budget: str
    variants: list[VariantResult]
    chosen: str | None
    baseline: str | None
    data_source: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def built(self) -> int:
        return sum(v.built for v in self.variants)

    @property
    def reused(self) -> int:
        return sum(1 for v in self.variants if v.recipe is not None and not v.built and v.status != "skipped")

    def variant(self, variant_id: str) -> VariantResult:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    @property
    def chosen_variant(self) -> VariantResult | None:
        return None if self.chosen is None else self.variant(self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "objective": self.objective, "metric": self.metric,
            "budget": self.budget, "chosen": self.chosen, "baseline": self.baseline, "data": self.data_source,
            "notes": self.notes, "seconds": round(self.seconds, 1), "built": self.built, "reused": self.reused,
            "variants": [v.to_dict() for v in self.variants],
        }  # fmt: skip


def fmt_objective(v: VariantResult, objective: str) -> str:
    if v.timing is None:
        return "-"
    if objective == "latency":
        return f"{v.timing.latency_ms:.3f} ms"
    return f"{v.timing.throughput:.0f}/s"
