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


def _figure_saver() -> tuple[Any, dict[str, bytes], Callable[[Any, str], None]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()

    return plt, out, save


def bench_plots(data: dict[str, Any], pareto: list[dict[str, Any]] | None = None) -> dict[str, bytes]:
    """PNG bytes by name: latency and throughput vs batch size, latency distribution, accuracy Pareto."""
    plt, out, save = _figure_saver()
    variants = [v for v in data["variants"] if v["batches"]]
    if variants:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for v in variants:
            xs = [b["batch"] for b in v["batches"]]
            p50 = [_f(b["latency"]["p50_ms"]) for b in v["batches"]]
            ax.plot(xs, p50, marker="o", label=f"{v['variant']} p50")
            ax.fill_between(xs, p50, [_f(b["latency"]["p99_ms"]) for b in v["batches"]], alpha=0.2)
        ax.set(yscale="log", xlabel="batch size", ylabel="latency (ms), band to p99", title="latency vs batch size")
        _batch_axis(ax, variants)
        ax.legend(fontsize=8)
        save(fig, "latency_vs_batch")

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for v in variants:
            ax.plot([b["batch"] for b in v["batches"]], [_f(b["items_per_s"]) for b in v["batches"]], marker="o",
                    label=v["variant"])  # fmt: skip
        ax.set(xlabel="batch size", ylabel="items / s", title="throughput vs batch size")
        _batch_axis(ax, variants)
        ax.legend(fontsize=8)
        save(fig, "throughput_vs_batch")

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for v in variants:
            first = v["batches"][0]
            if first["samples_ms"]:
                samples = np.asarray(first["samples_ms"])
                shown = samples[samples <= np.percentile(samples, 99.5)]  # the tail is in the table, not the axis
                ax.hist(shown, bins=50, alpha=0.5, label=f"{v['variant']} (batch {first['batch']})")
        ax.set(xlabel="latency (ms)", ylabel="requests", title="latency distribution")
        ax.legend(fontsize=8)
        save(fig, "latency_distribution")

    if pareto:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for p in pareto:
            marker = "*" if p.get("chosen") else ("o" if p.get("frontier") else "x")
            ax.scatter(p["latency_ms"], p["accuracy"], marker=marker, s=120 if p.get("chosen") else 40)
            ax.annotate(
                p["label"], (p["latency_ms"], p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set(xscale="log", xlabel="batch-1 latency (ms)", ylabel=pareto[0].get("metric", "accuracy"),
               title="accuracy vs latency (optimizer; * chosen, o Pareto frontier)")  # fmt: skip
        save(fig, "accuracy_pareto")
    return out


def _batch_axis(ax: Any, variants: list[dict[str, Any]]) -> None:
    batches = sorted({b["batch"] for v in variants for b in v["batches"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()


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
