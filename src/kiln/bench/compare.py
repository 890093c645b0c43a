"""``kiln bench --compare before.json after.json``: ratios after/before, and a gate CI can trust.

A comparison is refused (:class:`CompareError`, exit 2) when its answer would mislead: a different
model, runs of different kinds (in-process vs ``--url``), an interrupted run, or figures ``before``
has that ``after`` lacks (a gate must not pass because a batch size or scenario stopped being
measured). It warns when the runs differ in ways that change the numbers without making them
meaningless: another machine (CPU model, cores), device, threads, memory method or served URL.

A figure regresses when it moves the wrong way by more than ``threshold`` *and* by more than the noise
both runs measured: ``NOISE_K`` times the combined spread of its repeats (each run's (max - min) /
median, combined as the root of the sum of squares; a search's resolution for max QPS and streams).
Latency moving by less than ``LATENCY_FLOOR_MS`` a call (and throughput by as little) is never a
regression either. So two identical runs on a noisy machine compare clean, and a figure too noisy to
gate at the asked threshold says so in a warning instead of failing CI by chance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import CompareError

# Changes smaller than these are noise whatever their ratio (an allocator page, a cold file cache).
MEMORY_FLOOR_BYTES = 2_000_000
LOAD_FLOOR_S = 0.05  # one load, timed once: a busy machine stalls it by tens of ms (7 ms seen on a 1 ms load)
# A few microseconds a call: what two fresh sessions of one model differ by (cache and page placement,
# the timer and Python's call) however long each is timed; measured 1.5x on a 4 µs model back to back.
LATENCY_FLOOR_MS = 0.005
NOISE_K = 2.0  # how many combined spreads a change must exceed (a range of 3 repeats is ~1.7 σ)
_MACHINE_FACTS = ("cpu_model", "architecture", "physical_cores", "logical_cores")


@dataclass
class CompareRow:
    key: str
    metric: str
    before: float
    after: float
    higher_is_better: bool
    floor: float = 0.0  # an absolute change below this is never a regression
    noise: float = 0.0  # the combined relative spread of both runs' repeats (0: not measured)

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else (1.0 if self.after == self.before else math.inf)

    def allowed(self, threshold: float) -> float:
        """The relative change this row tolerates: the threshold, or its measured noise when larger."""
        return max(threshold, NOISE_K * self.noise)

    def regressed(self, threshold: float) -> bool:
        if abs(self.after - self.before) <= self.floor:
            return False
        limit = self.allowed(threshold)
        return self.ratio < 1 / (1 + limit) if self.higher_is_better else self.ratio > 1 + limit


@dataclass
class Comparison:
    rows: list[CompareRow]
    threshold: float
    regressions: list[CompareRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kind: str = "in-process"


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, list):
        raise CompareError(f"{path} is an old `kiln bench --url` list without machine facts; measure it again")
    if not isinstance(data, dict) or not ("variants" in data or data.get("kind") == "load"):
        raise CompareError(f"{path} is not a kiln bench JSON file (no 'variants' or 'runs')")
    return data


def _kind(data: dict[str, Any]) -> str:
    return str(data.get("kind") or "in-process")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare_files(before: Path, after: Path, threshold: float = 0.10) -> Comparison:
    return compare(load_json(before), load_json(after), threshold, names=(str(before), str(after)))


def compare(
    before: dict[str, Any], after: dict[str, Any], threshold: float = 0.10, names: tuple[str, str] = ("before", "after")
) -> Comparison:
    """Ratios after/before for every figure both runs hold; see the module doc for what is refused."""
    if threshold <= 0:
        raise CompareError(f"--threshold {threshold:g}: must be positive, e.g. 0.1 for 10 %")
    kinds = _kind(before), _kind(after)
    if kinds[0] != kinds[1]:
        raise CompareError(
            f"{names[0]} is a {kinds[0]} bench and {names[1]} a {kinds[1]} one; compare runs of one kind"
        )
    for name, data in zip(names, (before, after), strict=True):
        if data.get("interrupted"):
            raise CompareError(f"{name} is from an interrupted run (Ctrl-C): its figures are incomplete; measure again")
    if before.get("model") and after.get("model") and before["model"] != after["model"]:
        raise CompareError(
            f"{names[0]} measured model {before['model']!r} and {names[1]} model {after['model']!r}; "
            "compare runs of the same model (serve it under the same name for --url runs)"
        )
    warnings = _machine_warnings(before, after)
    pairs = _load_pairs if kinds[0] == "load" else _in_process_pairs
    rows: list[CompareRow] = []
    missing: list[str] = []
    for key, metric, old, new, higher, floor, noise in pairs(before, after, warnings):
        if old is None:
            continue
        if new is None:
            missing.append(f"{key} {metric}")
            continue
        rows.append(CompareRow(key, metric, old, new, higher, floor, noise))
    if missing:
        shown = "; ".join(missing[:8]) + (f"; and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CompareError(
            f"{names[1]} lacks figures {names[0]} has: {shown}. Measure the same variants, batch sizes, "
            "scenarios and levels in both runs"
        )
    if not rows:
        raise CompareError("the two files share no figure to compare")
    noisy = [r for r in rows if r.allowed(threshold) > threshold]
    if noisy:
        worst = max(noisy, key=lambda r: r.noise)
        warnings.append(
            f"{len(noisy)} figure(s) too noisy to gate at {threshold:.0%}: each allowed {NOISE_K:g}× the spread its "
            f"repeats measured (worst {worst.key} {worst.metric}, ±{worst.allowed(threshold):.0%}); more --repeats "
            "or --min-time, or a quieter machine, narrows it"
        )
    return Comparison(rows, threshold, [r for r in rows if r.regressed(threshold)], warnings, kinds[0])


Pair = tuple[str, str, float | None, float | None, bool, float, float]


def _rate_floor(items_per_s: Any, batch: Any) -> float:
    """The drop in items/s that adds :data:`LATENCY_FLOOR_MS` to each call of ``batch`` items: smaller
    drops are noise, as for latency."""
    rate = _num(items_per_s)
    if rate is None or rate <= 0 or not isinstance(batch, int) or batch < 1:
        return 0.0
    return rate - batch / (batch / rate + LATENCY_FLOOR_MS / 1e3)


def _noise(*spreads: Any) -> float:
    """The combined relative spread of the runs that measured one (root of the sum of squares)."""
    return math.sqrt(sum(x * x for s in spreads if (x := _num(s)) is not None))


def _batch_spread(b: dict[str, Any], figure: str) -> float | None:
    """A batch row's spread of ``figure``; files from before ``spread`` was stored have the p50's only."""
    spread = b.get("spread")
    if isinstance(spread, dict) and spread:
        return _num(spread.get(figure))
    if figure == "p50_ms" and len(b.get("repeat_p50_ms") or []) > 1:
        return _num(b.get("spread_relative"))
    return None


def _in_process_pairs(before: dict[str, Any], after: dict[str, Any], warnings: list[str]) -> Iterator[Pair]:
    new_variants = {v["variant"]: v for v in after.get("variants", [])}
    for v in before.get("variants", []):
        w = new_variants.get(v["variant"], {})
        new_batches = {b["batch"]: b for b in w.get("batches", [])}
        for b in v["batches"]:
            c = new_batches.get(b["batch"], {})
            key = f"{v['variant']} · batch {b['batch']}"
            lat, new_lat = b.get("latency", {}), c.get("latency", {})
            for metric, figure, old, new, higher, floor in (
                ("p50 ms", "p50_ms", lat.get("p50_ms"), new_lat.get("p50_ms"), False, LATENCY_FLOOR_MS),
                ("p99 ms", "p99_ms", lat.get("p99_ms"), new_lat.get("p99_ms"), False, LATENCY_FLOOR_MS),
                ("items/s", "items_per_s", b.get("items_per_s"), c.get("items_per_s"), True,
                 _rate_floor(b.get("items_per_s"), b["batch"])),
            ):  # fmt: skip
                yield key, metric, _num(old), _num(new), higher, floor, _noise(_batch_spread(b, figure),
                                                                              _batch_spread(c, figure))  # fmt: skip
        key = v["variant"]
        yield key, "load s", _num(v.get("load_s")), _num(w.get("load_s")), False, LOAD_FLOOR_S, 0.0
        if w and v.get("memory_kind") != w.get("memory_kind"):
            warnings.append(f"{key}: peak memory not compared, measured as {v.get('memory_kind')} before and "
                            f"{w.get('memory_kind')} after")  # fmt: skip
        else:
            yield key, "peak memory MB", _mb(v.get("peak_memory_bytes")), _mb(w.get("peak_memory_bytes")), False, \
                MEMORY_FLOOR_BYTES / 1e6, 0.0  # fmt: skip
        for field_name, label in (("torch_max_allocated_bytes", "torch max allocated MB"),
                                  ("gpu_used_delta_bytes", "GPU used MB")):  # fmt: skip
            old, new = _gpu(v.get(field_name)), _gpu(w.get(field_name))
            if old is not None and new is not None:
                yield key, label, old, new, False, MEMORY_FLOOR_BYTES / 1e6, 0.0
    new_scenarios = {(s["scenario"], s["variant"]): s for s in after.get("scenarios", [])}
    other_load: list[tuple[str, Any, Any]] = []  # server rows measured at different loads: p99 not comparable
    for s in before.get("scenarios", []):
        t = new_scenarios.get((s["scenario"], s["variant"]), {})
        m, n = s.get("metrics", {}), t.get("metrics", {})
        key = f"{s['scenario']} · {s['variant']}"
        for metric, higher in (("items_per_s", True), ("max_qps", True), ("max_streams", True), ("p90_ms", False)):
            if metric in m:
                noise = _noise((m.get("spread") or {}).get(metric), (n.get("spread") or {}).get(metric))
                floors = {"p90_ms": LATENCY_FLOOR_MS, "items_per_s": _rate_floor(m[metric], m.get("best_batch"))}
                yield key, metric, _num(m[metric]), _num(n.get(metric)), higher, floors.get(metric, 0.0), noise
        if s["scenario"] == "server" and "latency" in m:
            offered, new_offered = s.get("params", {}).get("qps"), t.get("params", {}).get("qps")
            if t and offered != new_offered:
                other_load.append((key, offered, new_offered))
            else:
                yield key, "p99 ms", _num(m["latency"].get("p99_ms")), _num(n.get("latency", {}).get("p99_ms")), \
                    False, LATENCY_FLOOR_MS, 0.0  # fmt: skip
    if other_load:
        key, offered, new_offered = other_load[0]
        more = f" (and {len(other_load) - 1} more variants)" if len(other_load) > 1 else ""
        warnings.append(f"{key}: p99 not compared, measured at {offered} QPS before and {new_offered} after{more} "
                        "(--find-max-qps picks the load; pass --qps for a fixed one)")  # fmt: skip


def _load_pairs(before: dict[str, Any], after: dict[str, Any], warnings: list[str]) -> Iterator[Pair]:
    if before.get("url") != after.get("url"):
        warnings.append(f"different servers: {before.get('url')} before, {after.get('url')} after")

    def key(r: dict[str, Any]) -> str:
        level = f"{r['target_qps']:g} qps" if r["mode"] == "open" else f"c={r['concurrency']}"
        return f"{r['protocol']} {'binary' if r['binary'] else 'json'} batch {r['batch']} · {level}"

    new_runs = {key(r): r for r in after.get("runs", [])}
    for r in before.get("runs", []):
        k = key(r)
        n = new_runs.get(k, {})
        if n.get("errors"):
            warnings.append(f"{k}: {sum(n['errors'].values())} request(s) failed after: {n['errors']}")
        yield k, "req/s", _num(r.get("throughput")), _num(n.get("throughput")), True, 0.0, 0.0
        yield k, "p50 ms", _num(r["latency"].get("p50_ms")), _num(n.get("latency", {}).get("p50_ms")), False, 0.0, 0.0
        yield k, "p99 ms", _num(r["latency"].get("p99_ms")), _num(n.get("latency", {}).get("p99_ms")), False, 0.0, 0.0


def _mb(value: Any) -> float | None:
    v = _num(value)
    return None if v is None else v / 1e6


def _gpu(value: Any) -> float | None:
    if isinstance(value, dict):
        return sum(float(x) for x in value.values()) / 1e6 if value else None
    return _mb(value)


def _machine_warnings(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    old, new = before.get("machine") or {}, after.get("machine") or {}
    if not old or not new:
        out.append("machine facts missing from a file: cannot tell whether both ran on the same machine")
    differ = [
        f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in _MACHINE_FACTS if old and new and old.get(k) != new.get(k)
    ]
    gpus = [[d.get("name") for d in m.get("devices", []) if d.get("kind") == "cuda"] for m in (old, new)]
    if old and new and gpus[0] != gpus[1]:
        differ.append(f"GPUs {gpus[0]} → {gpus[1]}")
    if differ:
        out.append("different machines, so ratios mix the change with the hardware: " + "; ".join(differ))
    for k in ("device", "threads"):
        a, b = (before.get("config") or {}).get(k), (after.get("config") or {}).get(k)
        if a != b:
            out.append(f"different {k}: {a!r} before, {b!r} after")
    return out
