"""What ``kiln bench`` shows and writes: rich tables, JSON, PNG plots and a self-contained HTML page,
for in-process runs (:class:`BenchResult`) and served load (:class:`LoadReport`). Comparison lives in
:mod:`kiln.bench.compare` (re-exported here).

The page opens with one headline (what was chosen, how much faster than torch eager and plain ONNX
Runtime fp32, at what accuracy), read from the optimizer's report where the repository has one."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from kiln.bench.compare import CompareRow, Comparison, compare, compare_files, load_json
from kiln.bench.loadgen import LoadReport, LoadResult
from kiln.bench.plots import bench_plots, load_plots, metric_name
from kiln.bench.results import BenchResult
from kiln.console import progress_bar
from kiln.files import write_atomic
from kiln.optimize.table import count_text, plain_runtime_ratio

if TYPE_CHECKING:
    from kiln.optimize.search import OptimizeResult

__all__ = [
    "CompareRow", "Comparison", "bench_table", "compare", "compare_files", "compare_table", "headline",
    "jsonable", "load_json", "load_table", "optimizer_report", "pareto_points", "plots", "progress_bar",
    "scenario_table", "variant_table", "write_html", "write_json", "write_load_html", "write_outputs",
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
                _name(v, data) if i == 0 else "", _label(v) if i == 0 else "", str(b["batch"]),
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
        cells = [_name(v, data), _n(v["load_s"]), _n(v["first_run_ms"], ".1f"), _n(v["size_bytes"] / 1e6, ".2f"),
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
        return _server_summary(s["params"], m)
    if s["scenario"] == "multi-stream":
        return f"{m['max_streams']} streams of {s['params']['fps']:g} FPS (p99 ≤ {s['params']['deadline_ms']:.1f} ms)"
    return json.dumps(jsonable(m))[:200]


def _server_summary(params: dict[str, Any], m: dict[str, Any]) -> str:
    """One consistent sentence: with --find-max-qps the figures are those of the best passing trial (so
    never a miss at the load called the maximum); a --qps run beside the search is reported as such."""
    slo = f"p99 ≤ {params['slo_ms']:g} ms"
    cut = " (search cut short by --time-budget)" if m.get("stopped_by_budget") else ""
    lat = m.get("latency") or {}
    at = (f"achieved {_n(m.get('achieved_qps'), ',.1f')} QPS, p99 {_n(lat.get('p99_ms'), '.2f')} ms, "
          f"{m.get('rejected', 0)} rejected")  # fmt: skip
    if "max_qps" not in m:
        verdict = "" if m.get("meets_slo", True) else f", missing {slo}"
        return f"at {_n(params.get('qps'), ',.1f')} QPS: {at}{verdict}"
    if not m["max_qps"]:
        tried = f"; at {_n(params.get('qps'), ',.1f')} QPS: {at}" if lat else ""
        return f"no load tried met {slo}{tried}{cut}"
    head = f"max {_n(m['max_qps'], ',.1f')} QPS with {slo}{cut}"
    if params.get("qps") == m["max_qps"]:
        return f"{head} ({at} in that trial)"
    verdict = "" if m.get("meets_slo", True) else f", missing {slo} at this load"
    return f"{head}; at --qps {_n(params.get('qps'), ',.1f')}: {at}{verdict}"


def load_table(rows: LoadReport | list[LoadResult]) -> Table:
    """One row per load level from :mod:`kiln.bench.loadgen`."""
    runs = rows.runs if isinstance(rows, LoadReport) else rows
    shapes = runs[0].shapes if runs else {}
    sent = ", ".join(f"{name} {'×'.join(map(str, shape))}" for name, shape in shapes.items())
    table = Table(title="served load" + (f" (each request: {sent})" if sent else ""), title_justify="left")
    for col in ("url", "mode", "level", "sent", "ok", "errors", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("url", "mode", "errors") else "right")
    for r in runs:
        table.add_row(r.url, f"{r.mode} {'binary' if r.binary else 'json'}",
                      r.level + (" [yellow](interrupted)[/]" if r.interrupted else ""), str(r.sent), str(r.succeeded),
                      ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "0", f"{r.throughput:,.1f}",
                      _n(r.latency.get("p50_ms")), _n(r.latency.get("p99_ms")))  # fmt: skip
    return table


def compare_table(result: Comparison) -> Table:
    table = Table(title=f"after / before (red: worse by more than {result.threshold:.0%} and more than the noise "
                        "the repeats measured)", title_justify="left")  # fmt: skip
    for col in ("what", "metric", "before", "after", "ratio", "allowed"):
        table.add_column(col, justify="left" if col in ("what", "metric") else "right")
    for r in result.rows:
        bad = r.regressed(result.threshold)
        allowed = r.allowed(result.threshold)
        table.add_row(r.key, r.metric, f"{r.before:,.3f}", f"{r.after:,.3f}",
                      f"[{'red' if bad else 'green'}]{r.ratio:.3f}×[/]",
                      f"±{allowed:.0%}" + (" (noise)" if allowed > result.threshold else ""))  # fmt: skip
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


def _img(name: str, png: bytes) -> str:
    """One plot, embedded; its title inside the image is its caption (no second one under it)."""
    alt = getattr(png, "alt", "") or name.replace("_", " ")
    return (f'<figure><img data-plot="{html.escape(name)}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>')  # fmt: skip


def _page(title: str, heading: str, facts: list[tuple[str, str]], images: dict[str, bytes], body: str,
          warnings: list[str], command: str, headline: str | None = None) -> str:  # fmt: skip
    esc = html.escape
    figs = "".join(_img(name, png) for name, png in images.items())
    warn = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1100px}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}}
td:first-child,th:first-child,td.t,th.t,table.facts td{{text-align:left}}
figure{{display:inline-block;margin:.5rem 0}}img{{max-width:540px}}
.headline{{font-size:1.1rem;line-height:1.4;margin:.5rem 0 1rem;padding:.5rem .8rem;background:#f3f7ee;border-left:4px solid #5a8f29}}.dim{{color:#777}}
.warn{{color:#a60}}code{{white-space:pre-wrap}}
</style></head><body>
<h1>{esc(heading)}</h1>
{f'<p class="headline" id="headline">{esc(headline)}</p>' if headline else ""}
<table class="facts">{"".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts)}</table>
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
    """A self-contained page (plots embedded as data URIs); the PNGs are also written to ``png_dir``.
    ``pareto`` defaults to the optimizer's points when the run's repository has its report."""
    if isinstance(result, LoadReport):
        return write_load_html(result, path, png_dir)
    data = result.to_dict()
    search = optimizer_report(result.repo, result.model, result.version) if result.repo else None
    if pareto is None and search is not None:
        pareto = _points(search)
    images = bench_plots(data, pareto)
    written = _write_pngs(images, png_dir or path.with_name(path.stem + "_plots"))
    esc = html.escape
    rows = []
    for v in data["variants"]:
        for b in v["batches"]:
            lat = b["latency"]
            rows.append(
                f"<tr><td>{esc(_name(v, data))}</td><td class=t>{esc(_label(v))}</td><td>{b['batch']}</td>"
                f"<td>{_n(lat['p50_ms'])}</td><td>{_n(lat['p90_ms'])}</td><td>{_n(lat['p99_ms'])}</td>"
                f"<td>{_n(b['items_per_s'], ',.0f')}</td><td>{_n(b['spread_relative'], '.0%')}</td></tr>"
            )
    memory = "".join(
        f"<tr><td>{esc(_name(v, data))}</td><td>{_n(v['load_s'])}</td><td>{_n(v['first_run_ms'], '.1f')}</td>"
        f"<td>{_n(v['size_bytes'] / 1e6, '.2f')}</td><td>{count_text(v.get('params'))}</td>"
        f"<td>{count_text(v.get('macs'))}</td><td>{_n(v['peak_memory_bytes'] / 1e6, '.1f')} "
        f"({esc(v['memory_kind'])})</td><td>{esc(_gpu_cell(v))}</td></tr>"
        for v in data["variants"]
    )
    scen = "".join(f"<tr><td>{esc(s['scenario'])}</td><td class=t>{esc(s['variant'])}</td>"
                   f"<td class=t>{esc(_scenario_summary(s))}</td></tr>" for s in data["scenarios"])  # fmt: skip
    same = [v for v in data["variants"] if v.get("same_as")]
    note = "".join(f"<p class=dim>{esc(v['variant'])} runs the same artifact on the same engine as "
                   f"{esc(v['same_as'])}: measured once, shown under both names.</p>" for v in same)  # fmt: skip
    body = (
        _pareto_section(images.get("accuracy_pareto"), pareto or [])
        + "<h2>Latency and throughput</h2><table><tr><th>variant</th><th class=t>runs as</th><th>batch</th>"
        "<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>items/s</th><th>spread</th></tr>"
        f"{''.join(rows)}</table>{note}"
        "<h2>Load, size and memory</h2><table><tr><th>variant</th><th>load s</th><th>first run ms</th>"
        f"<th>size MB</th><th>params</th><th>MACs</th><th>peak memory MB</th><th>GPU MB</th></tr>{memory}</table>"
        + ("<h2>Scenarios</h2><table><tr><th>scenario</th><th class=t>variant</th><th class=t>result</th></tr>"
           + scen + "</table>" if scen else "")
    )  # fmt: skip
    command = data.get("command") or f"kiln bench {data['model']}"
    heading = f"kiln bench · {data['model']} v{data['version']}{' (interrupted)' if data['interrupted'] else ''}"
    plots_shown = {k: v for k, v in images.items() if k != "accuracy_pareto"}
    write_atomic(path, _page(f"kiln bench · {data['model']}", heading, _machine_facts(data), plots_shown, body,
                             data["warnings"], command, headline(data, search)))  # fmt: skip
    return written


def _pareto_section(png: bytes | None, points: list[dict[str, Any]]) -> str:
    """The optimizer's accuracy-vs-latency plot, and every point it shows in a table under it."""
    if png is None or not points:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{'★' if p.get('chosen') else ''}{'◆' if p.get('frontier') else ''}</td>"
        f"<td class=t>{esc(str(p['label']))}</td><td>{_n(p['latency_ms'], '.4f')}</td><td>{_n(p['accuracy'], '.4f')}</td>"
        f"<td class=t>{esc(str(p.get('status') or ''))}</td></tr>"
        for p in sorted(points, key=lambda p: p["latency_ms"])
    )
    metric = esc(metric_name(str(points[0].get("metric", "accuracy"))))
    return (f"<h2>What kiln optimize chose from</h2>{_img('accuracy_pareto', png)}"
            f"<table><tr><th></th><th class=t>variant (★ chosen, ◆ Pareto frontier: labelled on the plot)</th>"
            f"<th>batch-1 ms</th><th>{metric}</th><th class=t>verdict</th></tr>{rows}</table>")  # fmt: skip


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


def _name(v: dict[str, Any], data: dict[str, Any]) -> str:
    """A variant's id, marked when it is the optimizer's choice, and naming whose figures it shows
    ("ort-fp32-… (chosen) = reference")."""
    chosen = " (chosen)" if data.get("chosen") and v["variant"] == data["chosen"] else ""
    return f"{v['variant']}{chosen}" + (f" = {v['same_as']}" if v.get("same_as") else "")


def optimizer_report(repo: Path | str, model: str, version: int) -> dict[str, Any] | None:
    """The optimizer's report for this version (``report/optimize.json``), if ``kiln optimize`` ran."""
    from kiln.optimize.search import REPORT_FILE
    from kiln.repository import Repository

    _, vdir = Repository(repo).resolve(model, version)
    path = vdir / "report" / REPORT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def pareto_points(repo: Path | str, model: str, version: int) -> list[dict[str, Any]]:
    """Accuracy vs batch-1 latency of every variant the optimizer measured (its ``report/optimize.json``)."""
    search = optimizer_report(repo, model, version)
    return [] if search is None else _points(search)


def _points(search: dict[str, Any]) -> list[dict[str, Any]]:
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


# ---- the headline ----------------------------------------------------------------------------------------
def headline(result: BenchResult | dict[str, Any], search: dict[str, Any] | None = None) -> str | None:
    """One line a person reads first: "chosen: X · 16.1× torch eager, 1.62× ONNX Runtime fp32 (batch-1
    latency, as kiln optimize timed them) · top-1 99.72 % (reference 99.44 %) · here at batch 1: 1.69× the
    reference". Ratios come from the optimizer's report (``search``; read from the run's repository when
    not given) and this run's own batch-1 figures; a part that cannot be computed is left out. None when
    there is nothing to say (no optimizer report and no chosen variant measured)."""
    data = _data(result)
    if search is None and data.get("repo"):
        search = optimizer_report(data["repo"], data["model"], data["version"])
    optimized = _optimize_result(search) if search is not None else None
    here = _measured_ratio(data)
    if optimized is None or (chosen := optimized.chosen_variant) is None:
        entry = next((v for v in data["variants"] if data.get("chosen") and v["variant"] == data["chosen"]), None)
        if entry is None:
            return None
        return f"chosen: {_label(entry)}" + (f" · {here}" if here else "")
    parts = [f"chosen: {chosen.label}"]
    ratios = [f"{_times(r)} {name}" for name, r in (("torch eager", plain_runtime_ratio(optimized, "torch")),
                                                     ("ONNX Runtime fp32", plain_runtime_ratio(optimized)))
              if r is not None and math.isfinite(r) and r > 0]  # fmt: skip
    if ratios and chosen.timing is not None:
        what = "batch-1 latency" if optimized.objective == "latency" else f"throughput at batch {chosen.timing.batch}"
        parts.append(", ".join(ratios) + f" ({what}, as kiln optimize timed them)")
    if (accuracy := _accuracy_text(chosen)) is not None:
        parts.append(accuracy)
    if here:
        parts.append(here)
    return " · ".join(parts)


def _times(ratio: float) -> str:
    return f"{ratio:.3g}×"


def _optimize_result(search: dict[str, Any]) -> OptimizeResult | None:
    """The optimizer's result as it saved it, for the ratios :mod:`kiln.optimize.table` computes (None for
    a report an older or newer kiln wrote in another shape)."""
    from kiln.optimize.accuracy import AccuracyFigures
    from kiln.optimize.search import OptimizeResult, VariantResult
    from kiln.optimize.timing import Timing
    from kiln.recipe import Recipe

    try:
        variants = [
            VariantResult(
                id=v["id"],
                label=v["label"],
                status=v["status"],
                pareto=bool(v.get("pareto")),
                speedup=v.get("speedup"),
                recipe=Recipe.model_validate(v["recipe"]) if v.get("recipe") else None,
                timing=Timing(**v["timing"]) if v.get("timing") else None,
                accuracy=AccuracyFigures(**v["accuracy"]) if v.get("accuracy") else None,
            )
            for v in search["variants"]
        ]
        result = OptimizeResult(model=search["model"], version=search["version"], objective=search["objective"],
                                metric=search["metric"], budget=search.get("budget", ""), variants=variants,
                                chosen=search.get("chosen"), baseline=search.get("baseline"),
                                data_source=search.get("data", ""))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None
    if result.chosen is not None and all(v.id != result.chosen for v in variants):
        return None
    return result


def _accuracy_text(v: Any) -> str | None:
    a = v.accuracy
    if a is None or not math.isfinite(a.value):
        return None
    reference = f" (reference {a.reference_value:.2%})" if math.isfinite(a.reference_value) else ""
    if a.metric == "top1":
        return f"top-1 {a.value:.2%}{reference}"
    if a.metric == "map50":
        return f"mAP@0.5 {a.value:.4f}" + (f" (reference {a.reference_value:.4f})" if reference else "")
    if a.metric == "agreement":
        return f"top-1 agreement with the original {a.value:.2%}"
    if a.metric == "cosine":
        return f"cosine to the original {a.value:.5f}"
    if a.metric == "max-abs":
        return f"max abs error {a.value:.3g}"
    return f"{a.metric} {a.value:.4g}"


def _measured_ratio(data: dict[str, Any]) -> str | None:
    """This run's batch-1 p50 of the reference over the chosen variant's, when it measured both."""
    by_id = {v["variant"]: v for v in data["variants"]}
    chosen, reference = by_id.get(data.get("chosen") or ""), by_id.get("reference")
    if chosen is None or reference is None:
        return None
    if chosen.get("same_as") == "reference":
        return "here the chosen variant is the reference's artifact (measured once)"

    def p50(v: dict[str, Any]) -> float | None:
        b1 = next((b for b in v["batches"] if b["batch"] == 1), None)
        value = (b1 or {}).get("latency", {}).get("p50_ms")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None

    ref, new = p50(reference), p50(chosen)
    if ref is None or new is None:
        return None
    return f"measured here at batch 1: {_times(ref / new)} the reference ({_label(reference)})"


def write_outputs(result: BenchResult | LoadReport, json_path: Path | None, html_path: Path | None) -> list[Path]:
    """Write the JSON and/or HTML a run asked for (the HTML of an in-process run carries the optimizer's
    accuracy-vs-latency points when the repository has them); the paths written."""
    written: list[Path] = []
    if json_path is not None:
        write_json(result, json_path)
        written.append(json_path)
    if html_path is not None:
        write_html(result, html_path)
        written.append(html_path)
    return written
