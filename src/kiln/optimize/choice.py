"""What the search records once every variant is measured, besides the fastest within the budget: the
earlier choice kept when a narrower rerun did not measure it, and a partner variant for large batches
(:class:`~kiln.spec.LargeBatchChoice`, run through :class:`~kiln.engines.routed.BatchRoutedEngine`)."""

from __future__ import annotations

from typing import Any, Protocol

from kiln.console import ProgressHook
from kiln.engines.base import Engine, EngineOptions, load_engine
from kiln.errors import KilnError
from kiln.optimize import accuracy, timing
from kiln.optimize.config import OptimizeConfig
from kiln.optimize.data import DataSplit
from kiln.optimize.results import VariantResult, fmt_objective
from kiln.repository import Variant
from kiln.spec import LargeBatchChoice, ModelSpec


class Search(Protocol):
    """What these choices read of the search under way."""

    config: OptimizeConfig
    split: DataSplit
    metric: str
    spec: ModelSpec
    threads: int
    timing_key: dict[str, Any]
    progress: ProgressHook

    def variant(self, vid: str) -> Variant: ...


PARTNER_GAIN = 1.03  # rows/s a large-batch partner must gain over the choice, as measured side by side


def better_earlier(
    search: Search, earlier: str | None, results: list[VariantResult], chosen: VariantResult
) -> str | None:
    """Why the earlier choice stays, when this run did not measure it (a narrower preset, other engines)
    and its own figures, measured on this machine with the same timing settings and on the same data,
    are within this run's budget and faster than this run's choice; else None (the new choice is
    recorded). A variant this run measured and did not choose is replaced: the run compared them."""
    measured = {v.id for v in results if v.timing is not None or v.status in ("rejected", "failed")}
    if earlier is None or earlier == chosen.id or earlier in measured or chosen.timing is None:
        return None
    try:
        variant = search.variant(earlier)
    except KilnError:
        return None
    figures = variant.figures()
    acc, tim = figures.get("accuracy"), figures.get("timing")
    if not acc or not tim or figures.get("timing_key") != search.timing_key:
        return None
    if acc.get("fingerprint") != search.split.fingerprint() or acc.get("metric") != search.metric:
        return None
    try:
        old = VariantResult(id=earlier, label=variant.label, recipe=None, timing=timing.Timing(**tim),
                            accuracy=accuracy.AccuracyFigures(**{k: v for k, v in acc.items() if k != "fingerprint"}))  # fmt: skip
        accuracy.check(earlier, old.accuracy, search.config)  # type: ignore[arg-type]
    except (KilnError, TypeError):  # out of this run's budget, or figures of another kiln
        return None
    objective = search.config.objective
    if (old.objective(objective) or float("inf")) >= (chosen.objective(objective) or float("inf")):
        return None
    return (f"kept the earlier choice {old.label} ({fmt_objective(old, objective)}), faster than this run's "
            f"{chosen.label} ({fmt_objective(chosen, objective)}) and not measured in this run; "
            "pass --replace to record this run's choice")  # fmt: skip


def large_batch_partner(search: Search, results: list[VariantResult], chosen: VariantResult) -> LargeBatchChoice | None:
    """The accepted variant with the most rows/s at the throughput batch, when it beats the (batch-1)
    choice there by :data:`PARTNER_GAIN`, with the batch size from which it wins: both timed
    round-robin at the powers of two up to the throughput batch; None when no such partner."""
    n = search.config.batch_size
    if search.config.objective != "latency" or search.spec.serving.max_batch_size == 0 or n < 2:
        return None
    timed = [v for v in results if v.status in ("accepted", "chosen") and v.timing is not None and v.recipe]
    if chosen.timing is None or chosen.recipe is None or not timed:
        return None
    best = max(timed, key=lambda v: v.timing.throughput if v.timing else 0.0)
    if best.id == chosen.id or best.timing is None or best.recipe is None:
        return None
    if best.timing.throughput < chosen.timing.throughput * PARTNER_GAIN:
        return None
    sizes = [s for s in (2, 4, 8, 16, 32, 64) if s < n] + [n]
    search.progress(f"large batches: {best.label} against {chosen.label} at {sizes}", 0, 1)
    wins: list[bool] = []
    engines: list[Engine] = []
    try:
        for v in (chosen, best):
            r = v.recipe
            assert r is not None  # filtered above
            options = EngineOptions(r.device, r.precision, search.threads, run=dict(r.options), batch_sizes=(*sizes,))
            engines.append(load_engine(r.engine, search.variant(v.id).path, search.spec, options))
        for size in sizes:
            feed = search.split.validation.first(size)
            for e in engines:  # warm-up at this size
                for _ in range(3):
                    e.run(feed)
            figures = timing.interleave([e.run for e in engines], feed, feed, min_time_s=search.config.min_time_s / 2)
            wins.append(figures[1][1] >= figures[0][1] * PARTNER_GAIN)
    finally:
        for e in engines:
            e.close()
    from_rows = crossover(sizes, wins)
    return None if from_rows is None else LargeBatchChoice(variant=best.id, from_rows=from_rows)


def crossover(sizes: list[int], wins: list[bool]) -> int | None:
    """The smallest of ``sizes`` (ascending) from which the partner wins at every larger size too; None when
    it does not win at the largest (timed again side by side, its lead was noise)."""
    if not wins or not wins[-1]:
        return None
    first = len(wins) - 1
    while first > 0 and wins[first - 1]:
        first -= 1
    return max(2, sizes[first])
