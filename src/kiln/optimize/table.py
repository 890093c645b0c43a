"""Terminal output for ``kiln optimize``: a rich progress bar while it works and the result table,
sorted by the objective, marking the chosen variant (★) and the Pareto frontier (◆)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from kiln.optimize.search import OptimizeResult, VariantResult


def _metric_cell(v: VariantResult) -> str:
    a = v.accuracy
    if a is None:
        return ""
    if a.metric == "top1" and a.top1 is not None:
        return f"{a.top1:.2%}"
    if a.metric in ("agreement", "cosine"):
        return f"{a.value:.5f}"
    if a.metric == "map50":
        return f"{a.value:.4f}"
    return ""


def _drift_cell(v: VariantResult) -> str:
    a = v.accuracy
    if a is None:
        return ""
    sqnr = "∞" if math.isinf(a.sqnr_db) else f"{a.sqnr_db:.1f}"
    return f"{sqnr} dB · {a.max_abs_error:.2g}"


def result_table(result: OptimizeResult, show_skipped: bool = False) -> Table:
    batch = next((v.timing.batch for v in result.variants if v.timing is not None), None)
    metric = {"top1": "top-1", "agreement": "agreement", "cosine": "cosine", "map50": "mAP@0.5"}.get(result.metric)
    table = Table(
        title=f"{result.model} v{result.version}: objective {result.objective}, budget {result.budget}",
        title_justify="left",
        caption="★ chosen  ◆ Pareto frontier (accuracy vs speed)  speed-up vs "
        + (next((v.label for v in result.variants if v.id == result.baseline), "-")),
        caption_justify="left",
    )
    table.add_column("", no_wrap=True)
    table.add_column("variant")
    if metric:
        table.add_column(metric, justify="right")
    table.add_column("SQNR · max err", justify="right")
    table.add_column("p50 b=1", justify="right")
    table.add_column(f"items/s b={batch}", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("verdict", overflow="fold", min_width=12)
    for v in result.variants:
        if v.status == "skipped" and not show_skipped:
            continue
        mark = ("★" if v.status == "chosen" else " ") + ("◆" if v.pareto else " ")
        t = v.timing
        style = {"chosen": "bold green", "rejected": "dim", "failed": "red", "skipped": "dim"}.get(v.status, "")
        verdict = {"chosen": "chosen", "accepted": "ok"}.get(v.status, f"{v.status}: {v.reason}")
        cells = [mark, v.label]
        if metric:
            cells.append(_metric_cell(v))
        cells += [
            _drift_cell(v),
            f"{t.latency_ms:.3f} ms" if t else "",
            f"{t.throughput:,.0f}" if t else "",
            f"{v.speedup:.2f}×" if v.speedup else "",
            verdict,
        ]
        table.add_row(*cells, style=style)
    return table


def summary_lines(result: OptimizeResult) -> list[str]:
    chosen = result.chosen_variant
    lines = []
    if chosen is not None:
        speed = f", {chosen.speedup:.2f}× the baseline" if chosen.speedup else ""
        lines.append(f"chosen: [bold]{chosen.label}[/] ({chosen.id}){speed}; `kiln.load` now uses it by default")
    lines.append(
        f"built {result.built} new variant(s), reused {result.reused} from the cache, in {result.seconds:.1f} s; "
        f"data: {result.data_source}"
    )
    lines += [f"[yellow]note:[/] {n}" for n in result.notes]
    lines += [f"[dim]not built: {v.label}: {v.reason}[/]" for v in result.variants if v.status == "skipped"]
    return lines
