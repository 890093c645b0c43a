"""What ``kiln bench`` shows and writes: rich tables, JSON, PNG plots and a self-contained HTML page,
for in-process runs (:class:`BenchResult`) and served load (:class:`LoadReport`). Comparison lives in
:mod:`kiln.bench.compare` (re-exported here)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from kiln.bench.compare import CompareRow, Comparison, compare, compare_files, load_json
from kiln.bench.loadgen import LoadReport, LoadResult
from kiln.bench.plots import bench_plots, load_plots
from kiln.bench.results import BenchResult
from kiln.console import progress_bar
from kiln.files import write_atomic
from kiln.optimize.table import count_text

__all__ = [
    "CompareRow", "Comparison", "bench_table", "compare", "compare_files", "compare_table",
    "jsonable", "load_json", "load_table", "pareto_points", "plots", "progress_bar", "scenario_table",
    "variant_table", "write_html", "write_json", "write_load_html", "write_outputs",
]  # fmt: skip
plots = bench_plots  # the name earlier callers use


def _n(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    """A figure for a table; a missing one (NaN, or null read back from JSON) shows as a dash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:{spec}}{suffix}"


def _data(result: BenchResult | LoadReport | dict[str, Any]) -> dict[str, Any]:
    return result if isinstance(result, dict) else result.to_dict()


# ---- terminal -----------------------------------------------------------------------------------------
def bench_table(result: BenchResult | dict[str, Any]) -> Table:
    data = _data(result)
    table = Table(title=f"{data['model']} v{data['version']}: in-process latency and throughput", title_justify="left")
    for col, just in (("variant", "left"), ("runs as", "left"), ("batch", "right"), ("p50 ms", "right"),
                      ("p90 ms", "right"), ("p99 ms", "right"), ("items/s", "right"), ("ms/item", "right"),
                      ("spread", "right")):  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for v in data["variants"]:
        for i, b in enumerate(v["batches"]):
            lat = b["latency"]
            spread = _n(b["spread_relative"], ".0%")
            table.add_row(
                v["variant"] if i == 0 else "", _label(v) if i == 0 else "", str(b["batch"]),
                _n(lat["p50_ms"]), _n(lat["p90_ms"]), _n(lat["p99_ms"]), _n(b["items_per_s"], ",.0f"),
                _n(b["per_item_ms"], ".4f"), f"[yellow]{spread}[/]" if b["warnings"] else spread,
            )  # fmt: skip
    return table


def variant_table(result: BenchResult | dict[str, Any]) -> Table:
    data = _data(result)
    gpu = any(v.get("gpu_used_delta_bytes") or v.get("torch_max_allocated_bytes") for v in data["variants"])
    table = Table(title="load, size and memory", title_justify="left")
    for col in ("variant", "load s", "first run ms", "size MB", "params", "MACs", "peak memory MB",
                *(("GPU MB",) if gpu else ())):  # fmt: skip
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in data["variants"]:
        cells = [v["variant"], _n(v["load_s"]), _n(v["first_run_ms"], ".1f"), _n(v["size_bytes"] / 1e6, ".2f"),
                 count_text(v.get("params")), count_text(v.get("macs")),
                 f"{_n(v['peak_memory_bytes'] / 1e6, '.1f')} ({v['memory_kind']})"]  # fmt: skip
        if gpu:
            cells.append(_gpu_cell(v))
        table.add_row(*cells)
    return table


def _gpu_cell(v: dict[str, Any]) -> str:
    parts = []
    if v.get("gpu_used_delta_bytes"):
        parts.append(f"{sum(v['gpu_used_delta_bytes'].values()) / 1e6:.1f} (nvml-used-delta)")
    if v.get("torch_max_allocated_bytes") is not None:
        parts.append(f"{v['torch_max_allocated_bytes'] / 1e6:.1f} (torch-max-allocated)")
    return ", ".join(parts) or "–"


def scenario_table(result: BenchResult | dict[str, Any]) -> Table | None:
    data = _data(result)
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
        return f"p90 {_n(m['p90_ms'])} ms at batch 1"
    if s["scenario"] == "offline":
        return f"{_n(m['items_per_s'], ',.0f')} items/s (best at batch {m['best_batch']})"
    if s["scenario"] == "server":
        head = f"max {_n(m['max_qps'], ',.1f')} QPS with p99 ≤ {s['params']['slo_ms']} ms; " if "max_qps" in m else ""
        return head + (f"at {_n(s['params']['qps'], ',.1f')} QPS: achieved {_n(m.get('achieved_qps'), ',.1f')}, "
                       f"p99 {_n(m['latency']['p99_ms'], '.2f')} ms, {m['rejected']} rejected"
                       + ("" if m.get("meets_slo", True) else " (this run missed the SLO)"))  # fmt: skip
    if s["scenario"] == "multi-stream":
        return f"{m['max_streams']} streams of {s['params']['fps']:g} FPS (p99 ≤ {s['params']['deadline_ms']:.1f} ms)"
    return json.dumps(jsonable(m))[:200]


def load_table(rows: LoadReport | list[LoadResult]) -> Table:
    """One row per load level from :mod:`kiln.bench.loadgen`."""
    runs = rows.runs if isinstance(rows, LoadReport) else rows
    table = Table(title="served load", title_justify="left")
    for col in ("url", "mode", "level", "sent", "ok", "errors", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("url", "mode", "errors") else "right")
    for r in runs:
        table.add_row(r.url, f"{r.mode} {'binary' if r.binary else 'json'}",
                      r.level + (" [yellow](interrupted)[/]" if r.interrupted else ""), str(r.sent), str(r.succeeded),
                      ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "0", f"{r.throughput:,.1f}",
                      _n(r.latency.get("p50_ms")), _n(r.latency.get("p99_ms")))  # fmt: skip
    return table


def compare_table(result: Comparison) -> Table:
    table = Table(title=f"after / before (regression beyond {result.threshold:.0%} is red)", title_justify="left")
    for col in ("what", "metric", "before", "after", "ratio"):
        table.add_column(col, justify="left" if col in ("what", "metric") else "right")
    for r in result.rows:
        bad = r.regressed(result.threshold)
        table.add_row(r.key, r.metric, f"{r.before:,.3f}", f"{r.after:,.3f}",
                      f"[{'red' if bad else 'green'}]{r.ratio:.3f}×[/]")  # fmt: skip
    return table


# ---- files --------------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, so the JSON is standard (null, never NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(result: BenchResult | LoadReport, path: Path) -> None:
    write_atomic(path, json.dumps(jsonable(result.to_dict()), indent=2, default=str, allow_nan=False))


def _page(title: str, heading: str, facts: list[tuple[str, str]], images: dict[str, bytes], body: str,
          warnings: list[str], command: str) -> str:  # fmt: skip
    esc = html.escape
    figs = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(name.replace('_', ' '))}</figcaption></figure>"
        for name, png in images.items()
    )
    warn = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1100px}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:.5rem}}img{{max-width:520px}}
.warn{{color:#a60}}code{{white-space:pre-wrap}}
</style></head><body>
<h1>{esc(heading)}</h1>
<table>{"".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts)}</table>
<h2>Plots</h2>{figs}
{body}
{'<h2>Warnings</h2><ul class="warn">' + warn + "</ul>" if warn else ""}
<p>Reproduce: <code>{esc(command)}</code></p>
</body></html>
"""


def _machine_facts(data: dict[str, Any]) -> list[tuple[str, str]]:
    machine = data.get("machine") or {}
    cpu: dict[str, Any] = next((d for d in machine.get("devices", []) if d.get("id") == "cpu"), {})
    gpus = [f"{d.get('id')} {d.get('name')}" for d in machine.get("devices", []) if d.get("kind") == "cuda"]
    return [
        ("CPU", f"{machine.get('cpu_model')} · {machine.get('physical_cores')} cores"),
        ("ISA", ", ".join(machine.get("isa", []))),
        ("bf16 on CPU", f"{cpu.get('bf16', {}).get('supported')} ({cpu.get('bf16', {}).get('reason', '')})"),
        *((("GPUs", ", ".join(gpus)),) if gpus else ()),
        ("versions", ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v)),
        ("created", str(data.get("created"))),
    ]


def _write_pngs(images: dict[str, bytes], png_dir: Path) -> dict[str, Path]:
    png_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, png in images.items():
        written[name] = png_dir / f"{name}.png"
        write_atomic(written[name], png)
    return written


def write_html(
    result: BenchResult | LoadReport,
    path: Path,
    pareto: list[dict[str, Any]] | None = None,
    png_dir: Path | None = None,
) -> dict[str, Path]:
    """A self-contained page (plots embedded as data URIs); the PNGs are also written to ``png_dir``."""
    if isinstance(result, LoadReport):
        return write_load_html(result, path, png_dir)
    data = result.to_dict()
    images = bench_plots(data, pareto)
    written = _write_pngs(images, png_dir or path.with_name(path.stem + "_plots"))
    esc = html.escape
    rows = []
    for v in data["variants"]:
        for b in v["batches"]:
            lat = b["latency"]
            rows.append(
                f"<tr><td>{esc(v['variant'])}</td><td>{esc(_label(v))}</td><td>{b['batch']}</td>"
                f"<td>{_n(lat['p50_ms'])}</td><td>{_n(lat['p90_ms'])}</td><td>{_n(lat['p99_ms'])}</td>"
                f"<td>{_n(b['items_per_s'], ',.0f')}</td><td>{_n(b['spread_relative'], '.0%')}</td></tr>"
            )
    memory = "".join(
        f"<tr><td>{esc(v['variant'])}</td><td>{_n(v['load_s'])}</td><td>{_n(v['first_run_ms'], '.1f')}</td>"
        f"<td>{_n(v['size_bytes'] / 1e6, '.2f')}</td><td>{count_text(v.get('params'))}</td>"
        f"<td>{count_text(v.get('macs'))}</td><td>{_n(v['peak_memory_bytes'] / 1e6, '.1f')} "
        f"({esc(v['memory_kind'])})</td><td>{esc(_gpu_cell(v))}</td></tr>"
        for v in data["variants"]
    )
    scen = "".join(f"<tr><td>{esc(s['scenario'])}</td><td>{esc(s['variant'])}</td><td>{esc(_scenario_summary(s))}</td></tr>"
                   for s in data["scenarios"])  # fmt: skip
    body = (
        "<h2>Latency and throughput</h2><table><tr><th>variant</th><th>runs as</th><th>batch</th><th>p50 ms</th>"
        f"<th>p90 ms</th><th>p99 ms</th><th>items/s</th><th>spread</th></tr>{''.join(rows)}</table>"
        "<h2>Load, size and memory</h2><table><tr><th>variant</th><th>load s</th><th>first run ms</th>"
        f"<th>size MB</th><th>params</th><th>MACs</th><th>peak memory MB</th><th>GPU MB</th></tr>{memory}</table>"
        + ("<h2>Scenarios</h2><table><tr><th>scenario</th><th>variant</th><th>result</th></tr>" + scen + "</table>"
           if scen else "")
    )  # fmt: skip
    command = data.get("command") or f"kiln bench {data['model']}"
    heading = f"kiln bench · {data['model']} v{data['version']}{' (interrupted)' if data['interrupted'] else ''}"
    write_atomic(path, _page(f"kiln bench · {data['model']}", heading, _machine_facts(data), images, body,
                             data["warnings"], command))  # fmt: skip
    return written


def write_load_html(report: LoadReport, path: Path, png_dir: Path | None = None) -> dict[str, Path]:
    """The served-load page: throughput and p50/p99 against concurrency, one table row per level."""
    data = report.to_dict()
    images = load_plots(data)
    written = _write_pngs(images, png_dir or path.with_name(path.stem + "_plots"))
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r['protocol'])} {'binary' if r['binary'] else 'json'}</td><td>{esc(run.level)}</td>"
        f"<td>{r['sent']}</td><td>{r['succeeded']}</td>"
        f"<td>{esc(', '.join(f'{k}={v}' for k, v in r['errors'].items()) or '0')}</td>"
        f"<td>{_n(r['throughput'], ',.1f')}</td><td>{_n(r['latency'].get('p50_ms'))}</td>"
        f"<td>{_n(r['latency'].get('p99_ms'))}</td></tr>"
        for r, run in zip(data["runs"], report.runs, strict=True)
    )
    body = ("<h2>Served load</h2><table><tr><th>mode</th><th>level</th><th>sent</th><th>ok</th><th>errors</th>"
            f"<th>req/s</th><th>p50 ms</th><th>p99 ms</th></tr>{rows}</table>")  # fmt: skip
    facts = [("server", report.url), ("model", report.model), *_machine_facts(data)]
    heading = f"kiln bench · {report.model} at {report.url}{' (interrupted)' if report.interrupted else ''}"
    write_atomic(path, _page(f"kiln bench · {report.model} (served)", heading, facts, images, body, report.warnings,
                             report.command))  # fmt: skip
    return written


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


def write_outputs(result: BenchResult | LoadReport, json_path: Path | None, html_path: Path | None) -> list[Path]:
    """Write the JSON and/or HTML a run asked for (the HTML of an in-process run carries the optimizer's
    accuracy-vs-latency points when the repository has them); the paths written."""
    written: list[Path] = []
    if json_path is not None:
        write_json(result, json_path)
        written.append(json_path)
    if html_path is not None:
        pareto = None
        if isinstance(result, BenchResult) and result.repo:
            pareto = pareto_points(result.repo, result.model, result.version)
        write_html(result, html_path, pareto)
        written.append(html_path)
    return written
