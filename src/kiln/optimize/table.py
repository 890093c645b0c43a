"""Terminal output for ``kiln optimize``: a rich progress bar while it works and the result table,
sorted by the objective, marking the chosen variant (★) and the Pareto frontier (◆), with each
variant's size (parameters, MACs, file, peak memory) and how it compares with the baseline's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from kiln.optimize.search import OptimizeResult, VariantResult
    from kiln.optimize.size import SizeFigures

_RATIOS = (("params", "params"), ("macs", "MACs"), ("file_bytes", "file"))  # peak memory is too noisy to quote


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


def _three(value: float) -> str:
    """Three significant figures, never in exponent form (999.6 → 1000)."""
    decimals = max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:.{decimals}f}"


def count_text(n: int | None) -> str:
    """1234 → 1.23k, 4.9e6 → 4.90M: parameters and MACs at three significant figures."""
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return _three(n / scale) + unit
    return str(n)


def bytes_text(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{_three(n / scale)} {unit}"
    return f"{n} B"


def _size_cells(v: VariantResult) -> list[str]:
    s = v.size
    if s is None:
        return ["", ""]
    return [f"{count_text(s.params)} · {count_text(s.macs)}",
            f"{bytes_text(s.file_bytes)} · {bytes_text(s.peak_memory_bytes)}"]  # fmt: skip


def ratio_text(size: SizeFigures | None, base: SizeFigures | None) -> str:
    """The figures that differ from the baseline's by 2 % or more, as ratios ("0.42× MACs"): what a
    compression or a format changed, not the few buffers one export keeps and another folds."""
    if size is None or base is None:
        return ""
    ratios = size.ratios(base)
    parts = [f"{ratios[k]:.2f}× {word}" for k, word in _RATIOS if k in ratios and abs(ratios[k] - 1) >= 0.02]
    return " · ".join(parts) or "same"


FAILURE_WIDTH = 60  # characters of a failure the table shows; figures.json keeps the whole text


def failure_summary(reason: str, width: int = FAILURE_WIDTH) -> str:
    """A failure in one short line for the table: its first line, cut at ``width`` characters."""
    line = " ".join(reason.split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def result_table(result: OptimizeResult, show_skipped: bool = False) -> Table:
    batch = next((v.timing.batch for v in result.variants if v.timing is not None), None)
    metric = {"top1": "top-1", "agreement": "agreement", "cosine": "cosine", "map50": "mAP@0.5"}.get(result.metric)
    table = Table(
        title=f"{result.model} v{result.version}: objective {result.objective}, budget {result.budget}",
        title_justify="left",
        caption="★ chosen  ◆ Pareto frontier (accuracy vs speed)  speed-up and size vs "
        + (next((v.label for v in result.variants if v.id == result.baseline), "-"))
        + "  MACs per item at batch 1; peak mem: resident growth while loading and timing",
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
    base = next((v for v in result.variants if v.id == result.baseline), None)
    sized = any(v.size is not None for v in result.variants)
    if sized:
        table.add_column("params · MACs", justify="right", no_wrap=True)
        table.add_column("file · peak mem", justify="right", no_wrap=True)
        table.add_column("vs baseline", justify="right", min_width=10)
    table.add_column("verdict", overflow="fold", min_width=12)
    for v in result.variants:
        if v.status == "skipped" and not show_skipped:
            continue
        mark = ("★" if v.status == "chosen" else " ") + ("◆" if v.pareto else " ")
        t = v.timing
        style = {"chosen": "bold green", "rejected": "dim", "failed": "red", "skipped": "dim"}.get(v.status, "")
        verdict = {"chosen": "chosen", "accepted": "ok"}.get(v.status, f"{v.status}: {v.reason}")
        if v.status == "failed":
            verdict = f"failed: {failure_summary(v.reason)}"
        cells = [mark, v.label]
        if metric:
            cells.append(_metric_cell(v))
        cells += [
            _drift_cell(v),
            f"{t.latency_ms:.3f} ms" if t else "",
            f"{t.throughput:,.0f}" if t else "",
            f"{v.speedup:.2f}×" if v.speedup else "",
        ]
        if sized:
            cells += [*_size_cells(v), "" if v is base else ratio_text(v.size, base.size if base else None)]
        cells.append(escape(verdict))  # library text such as "[ONNXRuntimeError]" is not markup
        table.add_row(*cells, style=style)
    return table


def plain_runtime_ratio(result: OptimizeResult, engine: str = "onnxruntime") -> float | None:
    """The chosen variant's speed against ``engine`` at plain fp32 (ONNX Runtime: the best plain runtime,
    what a user gets without kiln; torch: eager PyTorch) on the search's objective, when that was timed."""
    chosen = result.chosen_variant
    plain = next((v for v in result.variants if v.timing is not None and v.recipe is not None
                  and v.recipe.engine == engine and v.recipe.precision == "fp32" and v.recipe.int8 is None
                  and not v.recipe.passes and not v.recipe.options), None)  # fmt: skip
    if chosen is None or plain is None or chosen.timing is None:
        return None
    return (plain.objective(result.objective) or 0) / (chosen.objective(result.objective) or 1)


def summary_lines(result: OptimizeResult) -> list[str]:
    chosen = result.chosen_variant
    lines = []
    if chosen is not None:
        speed = f", {chosen.speedup:.2f}× the baseline" if chosen.speedup else ""
        plain = plain_runtime_ratio(result)
        speed += f", {plain:.2f}× plain ONNX Runtime fp32" if plain is not None else ""
        lines.append(f"chosen: [bold]{chosen.label}[/] ({chosen.id}){speed}; `kiln.load` now uses it by default")
        base = next((v for v in result.variants if v.id == result.baseline), None)
        if base is not None and base is not chosen and base.size is not None and chosen.size is not None:
            lines.append("size, baseline → chosen: " + _before_after(base.size, chosen.size))
    lines.append(
        f"built {result.built} new variant(s), reused {result.reused} from the cache, in {result.seconds:.1f} s; "
        f"data: {result.data_source}"
    )
    failed = [v for v in result.variants if v.status == "failed"]
    if failed:
        lines.append(
            f"[red]{len(failed)} variant(s) failed[/]: each reason is in `kiln optimize --json` and "
            "report/optimize.json, and a built variant's whole error in its variants/<id>/figures.json"
        )
    lines += [f"[yellow]note:[/] {n}" for n in result.notes]
    lines += [f"[dim]not built: {v.label}: {v.reason}[/]" for v in result.variants if v.status == "skipped"]
    return lines


def _before_after(before: SizeFigures, after: SizeFigures) -> str:
    pairs = (
        ("params", count_text(before.params), count_text(after.params)),
        ("MACs", count_text(before.macs), count_text(after.macs)),
        ("file", bytes_text(before.file_bytes), bytes_text(after.file_bytes)),
        ("peak memory", bytes_text(before.peak_memory_bytes), bytes_text(after.peak_memory_bytes)),
    )
    return ", ".join(f"{word} {a} → {b}" for word, a, b in pairs)
