"""What ``kiln bench`` shows and writes: a rich table, JSON, PNG plots and a self-contained HTML page,
plus ``compare`` between two JSON files (so CI and users can gate on regressions)."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from kiln.bench.runner import BenchResult
from kiln.errors import KilnError
from kiln.repository import write_atomic


class CompareError(KilnError):
    """A bench JSON file that cannot be compared."""


# ---- terminal -----------------------------------------------------------------------------------------
def bench_table(result: BenchResult | dict[str, Any]) -> Table:
    data = result.to_dict() if isinstance(result, BenchResult) else result
    table = Table(title=f"{data['model']} v{data['version']}: in-process latency and throughput", title_justify="left")
    for col, just in (("variant", "left"), ("runs as", "left"), ("batch", "right"), ("p50 ms", "right"),
                      ("p90 ms", "right"), ("p99 ms", "right"), ("items/s", "right"), ("ms/item", "right"),
                      ("spread", "right")):  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for v in data["variants"]:
        for i, b in enumerate(v["batches"]):
            lat = b["latency"]
            spread = b["spread_relative"]
            table.add_row(
                v["variant"] if i == 0 else "", _label(v) if i == 0 else "", str(b["batch"]),
                f"{lat['p50_ms']:.3f}", f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}", f"{b['items_per_s']:,.0f}",
                f"{b['per_item_ms']:.4f}", f"[yellow]{spread:.0%}[/]" if b["warnings"] else f"{spread:.0%}",
            )  # fmt: skip
    return table


def variant_table(result: BenchResult | dict[str, Any]) -> Table:
    data = result.to_dict() if isinstance(result, BenchResult) else result
    table = Table(title="load, size and memory", title_justify="left")
    for col in ("variant", "load s", "first run ms", "size MB", "peak memory MB"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in data["variants"]:
        table.add_row(v["variant"], f"{v['load_s']:.3f}", f"{v['first_run_ms']:.1f}", f"{v['size_bytes'] / 1e6:.2f}",
                      f"{v['peak_memory_bytes'] / 1e6:.1f} ({v['memory_kind']})")  # fmt: skip
    return table


def scenario_table(result: BenchResult | dict[str, Any]) -> Table | None:
    data = result.to_dict() if isinstance(result, BenchResult) else result
    if not data["scenarios"]:
        return None
    table = Table(title="scenarios", title_justify="left")
    for col in ("scenario", "variant", "result"):
        table.add_column(col)
    for s in data["scenarios"]:
        table.add_row(s["scenario"], s["variant"], _scenario_summary(s))
    return table


def _scenario_summary(s: dict[str, Any]) -> str:
    m = s["metrics"]
    if s["scenario"] == "single-stream":
        return f"p90 {m['p90_ms']:.3f} ms at batch 1"
    if s["scenario"] == "offline":
        return f"{m['items_per_s']:,.0f} items/s (best at batch {m['best_batch']})"
    if s["scenario"] == "server":
        head = f"max {m['max_qps']:,.1f} QPS with p99 ≤ {s['params']['slo_ms']} ms; " if "max_qps" in m else ""
        return head + f"at {s['params']['qps']:,.1f} QPS: p99 {m['latency']['p99_ms']:.2f} ms, {m['rejected']} rejected"
    if s["scenario"] == "multi-stream":
        return f"{m['max_streams']} streams of {s['params']['fps']:g} FPS (p99 ≤ {s['params']['deadline_ms']:.1f} ms)"
    return json.dumps(m)[:200]


# ---- files --------------------------------------------------------------------------------------------
def write_json(result: BenchResult, path: Path) -> None:
    write_atomic(path, json.dumps(result.to_dict(), indent=2, default=str))


def plots(data: dict[str, Any], pareto: list[dict[str, Any]] | None = None) -> dict[str, bytes]:
    """PNG bytes by name: latency and throughput vs batch size, latency distribution, accuracy Pareto."""
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

    variants = [v for v in data["variants"] if v["batches"]]
    if variants:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for v in variants:
            xs = [b["batch"] for b in v["batches"]]
            ax.plot(xs, [b["latency"]["p50_ms"] for b in v["batches"]], marker="o", label=f"{v['variant']} p50")
            ax.fill_between(xs, [b["latency"]["p50_ms"] for b in v["batches"]],
                            [b["latency"]["p99_ms"] for b in v["batches"]], alpha=0.2)  # fmt: skip
        ax.set(yscale="log", xlabel="batch size", ylabel="latency (ms), band to p99", title="latency vs batch size")
        _batch_axis(ax, variants)
        ax.legend(fontsize=8)
        save(fig, "latency_vs_batch")

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for v in variants:
            ax.plot([b["batch"] for b in v["batches"]], [b["items_per_s"] for b in v["batches"]], marker="o",
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


def write_html(
    result: BenchResult, path: Path, pareto: list[dict[str, Any]] | None = None, png_dir: Path | None = None
) -> dict[str, Path]:
    """A self-contained page (plots embedded as data URIs); the PNGs are also written to ``png_dir``."""
    data = result.to_dict()
    images = plots(data, pareto)
    png_dir = png_dir or path.with_name(path.stem + "_plots")
    png_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, png in images.items():
        written[name] = png_dir / f"{name}.png"
        write_atomic(written[name], png)
    esc = html.escape
    rows = []
    for v in data["variants"]:
        for b in v["batches"]:
            lat = b["latency"]
            rows.append(
                f"<tr><td>{esc(v['variant'])}</td><td>{esc(_label(v))}</td><td>{b['batch']}</td>"
                f"<td>{lat['p50_ms']:.3f}</td><td>{lat['p90_ms']:.3f}</td><td>{lat['p99_ms']:.3f}</td>"
                f"<td>{b['items_per_s']:,.0f}</td><td>{b['spread_relative']:.0%}</td></tr>"
            )
    scen = "".join(f"<tr><td>{esc(s['scenario'])}</td><td>{esc(s['variant'])}</td><td>{esc(_scenario_summary(s))}</td></tr>"
                   for s in data["scenarios"])  # fmt: skip
    machine = data["machine"]
    cpu: dict[str, Any] = next((d for d in machine.get("devices", []) if d.get("id") == "cpu"), {})
    facts = [
        ("CPU", f"{machine.get('cpu_model')} · {machine.get('physical_cores')} cores"),
        ("ISA", ", ".join(machine.get("isa", []))),
        ("bf16 on CPU", f"{cpu.get('bf16', {}).get('supported')} ({cpu.get('bf16', {}).get('reason', '')})"),
        ("versions", ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v)),
        ("created", data["created"]),
    ]
    figs = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(name.replace('_', ' '))}</figcaption></figure>"
        for name, png in images.items()
    )
    warnings = "".join(f"<li>{esc(w)}</li>" for w in data["warnings"])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kiln bench · {esc(data["model"])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1100px}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:.5rem}}img{{max-width:520px}}
.warn{{color:#a60}}
</style></head><body>
<h1>kiln bench · {esc(data["model"])} v{data["version"]}{" (interrupted)" if data["interrupted"] else ""}</h1>
<table>{"".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts)}</table>
<h2>Plots</h2>{figs}
<h2>Latency and throughput</h2>
<table><tr><th>variant</th><th>runs as</th><th>batch</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>items/s</th><th>spread</th></tr>{"".join(rows)}</table>
{"<h2>Scenarios</h2><table><tr><th>scenario</th><th>variant</th><th>result</th></tr>" + scen + "</table>" if scen else ""}
{'<h2>Warnings</h2><ul class="warn">' + warnings + "</ul>" if warnings else ""}
<p>Reproduce: <code>kiln bench {esc(data["model"])} --batch-sizes {",".join(str(b) for b in data["config"]["batch_sizes"])}</code></p>
</body></html>
"""
    write_atomic(path, page)
    return written


# ---- compare ------------------------------------------------------------------------------------------
@dataclass
class CompareRow:
    key: str
    metric: str
    before: float
    after: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else float("inf")

    def regressed(self, threshold: float) -> bool:
        return self.ratio < 1 / (1 + threshold) if self.higher_is_better else self.ratio > 1 + threshold


@dataclass
class Comparison:
    rows: list[CompareRow]
    threshold: float
    regressions: list[CompareRow] = field(default_factory=list)


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or "variants" not in data:
        raise CompareError(f"{path} is not a kiln bench JSON file (no 'variants')")
    return data


def compare(before: dict[str, Any], after: dict[str, Any], threshold: float = 0.10) -> Comparison:
    """Ratios after/before for every (variant, batch) and scenario both runs measured."""
    rows: list[CompareRow] = []
    old = {(v["variant"], b["batch"]): b for v in before["variants"] for b in v["batches"]}
    for v in after["variants"]:
        for b in v["batches"]:
            prev = old.get((v["variant"], b["batch"]))
            if prev is None:
                continue
            key = f"{v['variant']} · batch {b['batch']}"
            rows.append(CompareRow(key, "p50 ms", prev["latency"]["p50_ms"], b["latency"]["p50_ms"], False))
            rows.append(CompareRow(key, "items/s", prev["items_per_s"], b["items_per_s"], True))
    old_s = {(s["scenario"], s["variant"]): s["metrics"] for s in before.get("scenarios", [])}
    for s in after.get("scenarios", []):
        prev = old_s.get((s["scenario"], s["variant"]))
        if not prev:
            continue
        for metric, higher in (("items_per_s", True), ("max_qps", True), ("max_streams", True), ("p90_ms", False)):
            if metric in prev and metric in s["metrics"]:
                rows.append(CompareRow(f"{s['scenario']} · {s['variant']}", metric, float(prev[metric]),
                                       float(s["metrics"][metric]), higher))  # fmt: skip
    if not rows:
        raise CompareError("the two files share no variant and batch size to compare")
    return Comparison(rows, threshold, [r for r in rows if r.regressed(threshold)])


def compare_table(result: Comparison) -> Table:
    table = Table(title=f"after / before (regression beyond {result.threshold:.0%} is red)", title_justify="left")
    for col in ("what", "metric", "before", "after", "ratio"):
        table.add_column(col, justify="left" if col in ("what", "metric") else "right")
    for r in result.rows:
        bad = r.regressed(result.threshold)
        table.add_row(r.key, r.metric, f"{r.before:,.3f}", f"{r.after:,.3f}",
                      f"[{'red' if bad else 'green'}]{r.ratio:.3f}×[/]")  # fmt: skip
    return table


def load_table(rows: list[Any]) -> Table:
    """One row per load level from :mod:`kiln.bench.loadgen`."""
    table = Table(title="served load", title_justify="left")
    for col in ("url", "mode", "level", "sent", "ok", "errors", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("url", "mode", "errors") else "right")
    for r in rows:
        level = f"{r.target_qps:g} qps" if r.mode == "open" else f"c={r.concurrency}"
        table.add_row(r.url, f"{r.mode} {'binary' if r.binary else 'json'}", level, str(r.sent), str(r.succeeded),
                      ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "0", f"{r.throughput:,.1f}",
                      f"{r.latency['p50_ms']:.3f}", f"{r.latency['p99_ms']:.3f}")  # fmt: skip
    return table


def _label(v: dict[str, Any]) -> str:
    return str(v.get("label") or f"{v['engine']} {v['precision']}")


def pareto_points(repo: Path | str, model: str, version: int) -> list[dict[str, Any]]:
    """Accuracy vs batch-1 latency of every variant the optimizer measured (its ``report/optimize.json``)."""
    from kiln.optimize.search import REPORT_FILE
    from kiln.repository import Repository

    _, vdir = Repository(repo).resolve(model, version)
    path = vdir / "report" / REPORT_FILE
    if not path.is_file():
        return []
    search = json.loads(path.read_text())
    points = []
    for v in search.get("variants", []):
        accuracy, timing = v.get("accuracy") or {}, v.get("timing") or {}
        value, latency = accuracy.get("value"), timing.get("latency_ms")
        if isinstance(value, (int, float)) and isinstance(latency, (int, float)):
            points.append({"label": v.get("label", v.get("id")), "accuracy": float(value), "latency_ms": float(latency),
                           "metric": accuracy.get("metric", search.get("metric", "accuracy")),
                           "chosen": v.get("status") == "chosen", "frontier": bool(v.get("pareto")),
                           "status": v.get("status")})  # fmt: skip
    return points
