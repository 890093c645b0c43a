"""PNG plots for the bench report (matplotlib, headless): in-process figures and served load."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np


def _f(value: Any) -> float:
    """A figure for an axis: None (JSON null) and non-numbers become NaN, which matplotlib leaves out."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


class PlotPNG(bytes):
    """A plot's PNG bytes, with ``alt``: the plot in words (title, each axis's label and tick labels),
    for the page's alt text, screen readers, and tests that cannot read pixels."""

    alt: str = ""


def _describe(fig: Any) -> str:
    parts = []
    for ax in fig.axes:
        axes = []
        for name, axis, (lo, hi) in (("x", ax.xaxis, ax.get_xlim()), ("y", ax.yaxis, ax.get_ylim())):
            low, high = min(lo, hi), max(lo, hi)
            labels = [label.get_text() for loc, label in zip(axis.get_majorticklocs(), axis.get_ticklabels(), strict=False)
                      if low <= loc <= high and label.get_text()]  # fmt: skip
            axes.append(f"{name}: {axis.get_label_text()}, ticks {', '.join(labels) or 'none'}")
        parts.append(f"{ax.get_title()}. " + "; ".join(axes))
    return " ".join(parts)


def _figure_saver() -> tuple[Any, dict[str, bytes], Callable[[Any, str], None]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        png = PlotPNG(buf.getvalue())
        png.alt = _describe(fig)  # after drawing: the tick labels are formatted then
        plt.close(fig)
        out[name] = png

    return plt, out, save


def _shown(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The variants measured (a variant shown under another's figures is drawn once, named for both)."""
    twins: dict[str, list[str]] = {}
    for v in data["variants"]:
        if v.get("same_as"):
            twins.setdefault(v["same_as"], []).append(v["variant"])
    return [(" = ".join([v["variant"], *twins.get(v["variant"], [])]), v) for v in data["variants"]
            if v["batches"] and not v.get("same_as")]  # fmt: skip


def bench_plots(data: dict[str, Any], pareto: list[dict[str, Any]] | None = None) -> dict[str, bytes]:
    """PNG bytes by name: latency and throughput vs batch size, latency distribution, accuracy Pareto.
    Every axis has labelled ticks (a log axis several, in plain numbers); each plot's title is its only
    caption."""
    plt, out, save = _figure_saver()
    variants = _shown(data)
    if variants:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, v in variants:
            xs = [b["batch"] for b in v["batches"]]
            p50 = [_f(b["latency"]["p50_ms"]) for b in v["batches"]]
            (line,) = ax.plot(xs, p50, marker="o", label=f"{name} p50")
            ax.fill_between(xs, p50, [_f(b["latency"]["p99_ms"]) for b in v["batches"]], alpha=0.15,
                            color=line.get_color(), label=None)  # fmt: skip
        ax.set(yscale="log", xlabel="batch size", ylabel="latency (ms), band up to p99", title="latency vs batch size")
        _batch_axis(ax, [v for _, v in variants])
        _log_ticks(ax.yaxis, *ax.get_ylim())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        save(fig, "latency_vs_batch")

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, v in variants:
            ax.plot([b["batch"] for b in v["batches"]], [_f(b["items_per_s"]) for b in v["batches"]], marker="o",
                    label=name)  # fmt: skip
        ax.set(xlabel="batch size", ylabel="items / s", title="throughput vs batch size")
        _batch_axis(ax, [v for _, v in variants])
        ax.yaxis.set_major_formatter(_formatter(ax.yaxis))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        save(fig, "throughput_vs_batch")

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, v in variants:
            first = v["batches"][0]
            if first["samples_ms"]:
                samples = np.asarray(first["samples_ms"])
                shown = samples[samples <= np.percentile(samples, 99.5)]  # the tail is in the table, not the axis
                ax.hist(shown, bins=50, alpha=0.5, label=f"{name} (batch {first['batch']})")
        ax.set(xlabel="latency (ms), up to the 99.5th percentile", ylabel="requests", title="latency distribution")
        ax.legend(fontsize=7, loc="best")
        save(fig, "latency_distribution")

    if pareto:
        out["accuracy_pareto"] = pareto_plot(pareto)
    return out


def pareto_plot(points: list[dict[str, Any]]) -> bytes:
    """Accuracy against batch-1 latency: ★ the chosen variant, ● the Pareto frontier (each labelled,
    where its label fits inside the axes without covering another), × the rest (the page's table below
    the plot names them all)."""
    plt, out, save = _figure_saver()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"chosen": ("*", 220, "#d62728", "chosen"), "frontier": ("o", 50, "#1f77b4", "Pareto frontier"),
              "other": ("x", 40, "#999999", "other variants")}  # fmt: skip
    for kind, (marker, size, color, legend) in styles.items():
        group = [p for p in points if _kind(p) == kind]
        if group:
            ax.scatter([p["latency_ms"] for p in group], [p["accuracy"] for p in group], marker=marker, s=size,
                       color=color, label=legend, zorder=3 if kind != "other" else 2)  # fmt: skip
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.18)
    ax.autoscale_view()
    lo, hi = ax.get_xlim()
    _log_ticks(ax.xaxis, lo, hi)
    ax.yaxis.set_major_formatter(_formatter(ax.yaxis))
    ax.grid(True, which="major", alpha=0.3)
    ax.set(xlabel="batch-1 latency (ms)", ylabel=metric_name(str(points[0].get("metric", "accuracy"))),
           title="accuracy vs latency (kiln optimize)")  # fmt: skip
    # Under the axes, so it never covers a point or leaves a label no room.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    _label_points(fig, ax, sorted((p for p in points if _kind(p) != "other"), key=lambda p: p["latency_ms"]))
    save(fig, "accuracy_pareto")
    return out["accuracy_pareto"]


def metric_name(metric: str) -> str:
    """The optimizer's accuracy metric in words, for an axis or a column."""
    return {"top1": "top-1 accuracy", "map50": "mAP@0.5", "agreement": "top-1 agreement with the original",
            "cosine": "cosine to the original", "max-abs": "max abs error (lower is better)"}.get(metric, metric)  # fmt: skip


def _kind(p: dict[str, Any]) -> str:
    return "chosen" if p.get("chosen") else "frontier" if p.get("frontier") else "other"


_OFFSETS = [(6, 6, "left", "bottom"), (6, -6, "left", "top"), (-6, 6, "right", "bottom"), (-6, -6, "right", "top"),
            (0, 10, "center", "bottom"), (0, -10, "center", "top"), (8, 18, "left", "bottom"),
            (8, -18, "left", "top"), (-8, 18, "right", "bottom"), (-8, -18, "right", "top")]  # fmt: skip


def _label_points(fig: Any, ax: Any, points: list[dict[str, Any]]) -> list[str]:
    """Label each point at the first offset whose text lies inside the axes and clear of the labels
    already placed, the legend and the other markers; the labels placed."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    marks = [ax.transData.transform((p["latency_ms"], p["accuracy"])) for p in points]
    placed = []
    for i, p in enumerate(points):
        for dx, dy, ha, va in _OFFSETS:
            text = ax.annotate(p["label"], (p["latency_ms"], p["accuracy"]), xytext=(dx, dy), textcoords="offset points",
                               ha=ha, va=va, fontsize=7, fontweight="bold" if p.get("chosen") else "normal")  # fmt: skip
            box = text.get_window_extent(renderer).expanded(1.04, 1.15)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clear = not any(box.overlaps(t) for t in taken) and not any(
                box.contains(x, y) for j, (x, y) in enumerate(marks) if j != i)  # fmt: skip
            if inside and clear:
                taken.append(box)
                placed.append(p["label"])
                break
            text.remove()
    return placed


def _log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Three to eight labelled ticks on a log axis between ``lo`` and ``hi``: powers of ten, then 1-2-5,
    then finer steps, then evenly spaced values when the range is under a factor of two; no minor
    labels (matplotlib's crowd each other on a short log axis)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

    ticks: list[float] = []
    if lo > 0 and hi > lo:
        decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
        for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)):
            ticks = [m * 10.0**e for e in decades for m in subs if lo <= m * 10.0**e <= hi]
            if len(ticks) >= 3:
                break
        if len(ticks) < 3:
            ticks = [t for t in MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi]
    if len(ticks) > 8:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(_formatter(axis))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())
    if axis is axis.axes.xaxis:  # a fixed locator must not move the limits
        axis.axes.set_xlim(lo, hi)
    else:
        axis.axes.set_ylim(lo, hi)


def _formatter(axis: Any) -> Any:
    """Tick labels in plain numbers (0.05, 0.1, 2, 20,000: no 10^x, no offset), with as many significant
    figures as it takes to tell the axis's ticks apart (0.9945, 0.995, 0.9955)."""
    from matplotlib.ticker import FuncFormatter

    def plain(value: float, digits: int) -> str:
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{float(f'{value:.{digits}g}'):g}" if value else "0"

    def text(value: float, _pos: Any) -> str:
        ticks = sorted(set(axis.get_majorticklocs()))
        digits = next((d for d in range(2, 7) if len({plain(t, d) for t in ticks}) == len(ticks)), 7)
        return plain(value, digits)

    return FuncFormatter(text)


def _batch_axis(ax: Any, variants: list[dict[str, Any]]) -> None:
    batches = sorted({b["batch"] for v in variants for b in v["batches"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    if len(batches) == 1:
        ax.set_xlim(batches[0] / 1.5, batches[0] * 1.5)


def load_plots(data: dict[str, Any]) -> dict[str, bytes]:
    """Served load: throughput and p50/p99 latency against the concurrency (or offered QPS) levels."""
    runs = data["runs"]
    if not runs:
        return {}
    plt, out, save = _figure_saver()
    open_loop = runs[0]["mode"] == "open"
    xs = [_f(r["target_qps"] if open_loop else r["concurrency"]) for r in runs]
    xlabel = "offered QPS" if open_loop else "concurrency (requests in flight)"
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(xs, [_f(r["throughput"]) for r in runs], marker="o")
    ax.set(xlabel=xlabel, ylabel="requests / s", title="throughput vs concurrency")
    save(fig, "throughput_vs_concurrency")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(xs, [_f(r["latency"].get("p50_ms")) for r in runs], marker="o", label="p50")
    ax.plot(xs, [_f(r["latency"].get("p99_ms")) for r in runs], marker="s", label="p99")
    ax.set(xlabel=xlabel, ylabel="latency (ms)", title="latency vs concurrency")
    ax.legend(fontsize=8)
    save(fig, "latency_vs_concurrency")
    return out
