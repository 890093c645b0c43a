"""``kiln demo``: the whole road on the built-in digits model, end to end, on this machine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kiln.console import console, import_summary
from kiln.errors import AccuracyError, KilnError

if TYPE_CHECKING:
    from kiln.optimize.search import OptimizeResult
    from kiln.predictor import Predictor

MIN_ACCURACY = 0.97


@dataclass(frozen=True)
class EngineResult:
    engine: str
    precision: str
    accuracy: float
    p50_ms: float
    p90_ms: float


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured: each engine on the validation set, the optimizer's choice, what the
    server answered (protocol, predicted, label) and the report it wrote."""

    engines: list[EngineResult]
    chosen: str | None
    served: list[tuple[str, int, int]]
    report: Path


def evaluate(predictor: Predictor, x: np.ndarray, y: np.ndarray, warmup: int = 20) -> tuple[float, list[float]]:
    """Accuracy over the set and per-request latency, one image at a time (batch 1)."""
    name = predictor.spec.inputs[0].name
    for i in range(warmup):
        predictor.predict({name: x[i : i + 1]})
    times: list[float] = []
    correct = 0
    for i in range(len(x)):
        t0 = time.perf_counter()
        out = predictor.predict({name: x[i : i + 1]})
        times.append(time.perf_counter() - t0)
        correct += int(next(iter(out.values())).argmax() == y[i])
    return correct / len(x), times


def run_demo(directory: Path) -> DemoResult:
    import kiln
    from kiln.hardware import detect
    from kiln.zoo import digits

    repo = directory / "repo"
    console.rule("[bold]kiln demo[/]: the digits CNN, trained offline on scikit-learn's digits")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:  # fmt: skip
        task = progress.add_task("training the digits CNN (once; cached afterwards)", total=digits.RECIPE["epochs"])
        trained = digits.train(progress=lambda done, total: progress.update(task, completed=done))
    how = "reused cached weights" if trained.cached else f"trained in {trained.train_seconds:.1f} s"
    console.print(f"[bold]1. train[/]  {how}: validation accuracy {trained.val_accuracy:.2%} → {trained.weights}")

    with console.status("importing: torch.export → ONNX, parity check at batch 1 and 4 …"):
        result = kiln.import_model(
            digits.FACTORY, repo, name="digits", weights=trained.weights, input_shapes=[digits.INPUT_SHAPE],
            input_names=[digits.INPUT_NAME], output_names=["logits"], task="classification", labels=digits.LABELS,
        )  # fmt: skip
    console.print("[bold]2. import[/]")
    console.print(import_summary(result))

    data = digits.load_data()
    cpu = detect().device("cpu")
    runs: list[tuple[str, str]] = [("onnxruntime", "fp32"), ("torch", "fp32")]
    if cpu.bf16.supported:
        runs.append(("torch", "bf16"))
    results: list[EngineResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as progress:  # fmt: skip
        task = progress.add_task("running the validation set at batch 1", total=len(runs))
        for engine, precision in runs:
            progress.update(task, description=f"{engine} {precision}: {len(data.y_val)} images at batch 1")
            with kiln.load(repo, "digits", engine=engine, precision=precision) as predictor:  # type: ignore[arg-type]
                acc, times = evaluate(predictor, data.x_val, data.y_val)
            ms = np.array(times) * 1e3
            results.append(EngineResult(engine, precision, acc, float(np.median(ms)), float(np.percentile(ms, 90))))
            progress.advance(task)

    table = Table(title=f"3. run: {len(data.y_val)} validation images, batch 1, {cpu.name}", title_justify="left")
    for col, justify in (("engine", "left"), ("precision", "left"), ("accuracy", "right"),
                         ("p50 latency", "right"), ("p90 latency", "right")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results:
        colour = "green" if r.accuracy >= MIN_ACCURACY else "red"
        table.add_row(
            r.engine,
            r.precision,
            f"[{colour}]{r.accuracy:.2%}[/]",
            f"{r.p50_ms:.3f} ms",
            f"{r.p90_ms:.3f} ms",
        )
    console.print(table)
    if not cpu.bf16.supported:
        console.print(f"[dim]bf16 skipped: {cpu.bf16.reason}[/]")

    search = optimize_step(repo)
    served = serve_step(repo, data.x_val[:4], data.y_val[:4])
    report = bench_step(repo, directory)
    print_next(repo)
    worst = min(results, key=lambda r: r.accuracy)
    if worst.accuracy < MIN_ACCURACY:
        raise AccuracyError(
            f"{worst.engine} {worst.precision} reached {worst.accuracy:.2%} on the digits validation set, "
            f"below the demo's {MIN_ACCURACY:.0%}; delete the cached weights ({trained.weights}) and run again"
        )
    return DemoResult(results, search.chosen, served, report)


def print_next(repo: Path) -> None:
    console.print("\n[bold]next[/]")
    for cmd, why in (
        (f"kiln list --repo {repo}", "what the repository holds"),
        ("kiln doctor", "what this machine can run: bf16, VNNI, CUDA …"),
        (f"kiln optimize digits --repo {repo}", "the full search, torch.compile included"),
        (f"kiln serve {repo}", "Open Inference Protocol on 127.0.0.1: HTTP :8000, gRPC :8001"),
        (f"kiln import model.onnx --repo {repo}", "bring your own ONNX model"),
        (f"kiln import mypkg.models:build --weights w.safetensors --input-shape 1,3,224,224 --repo {repo}",
         "or a PyTorch model"),
    ):  # fmt: skip
        console.print(f"  [dim]# {why}[/]\n  [bold cyan]{cmd}[/]", highlight=False)


def bench_step(repo: Path, directory: Path) -> Path:
    """A short bench of the reference and the chosen variant, written as an HTML report."""
    from kiln.bench import report as bench_report
    from kiln.bench.config import BenchConfig
    from kiln.bench.runner import bench
    from kiln.console import progress_bar

    config = BenchConfig(variants=["reference", "chosen"], batch_sizes=[1, 8, 32], min_time_s=0.3, repeats=2)
    with progress_bar(console, "6. bench") as hook:
        result = bench(repo, "digits", config, progress=hook)
    console.print("[bold]6. bench[/]  the reference and the chosen variant, in process")
    console.print(bench_report.bench_table(result))
    page = directory / "report.html"
    bench_report.write_html(result, page, bench_report.pareto_points(repo, "digits", result.version))
    console.print(f"  report with plots → {page}")
    return page


# ---- serve: the same model behind the V2 protocol, driven by Triton's own clients -------------------------
def serve_step(repo: Path, images: np.ndarray, labels: np.ndarray) -> list[tuple[str, int, int]]:
    """Start ``kiln serve`` in process, classify a few images over HTTP and gRPC, and shut down."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from kiln.serving import ServerSettings
    from kiln.serving.server import ServerThread

    settings = ServerSettings(repo=repo, http_port=0, grpc_port=0, models=["digits"], log_level="WARNING")
    answers: list[tuple[str, int, int]] = []
    with console.status("serving: starting kiln serve on 127.0.0.1 …"), ServerThread(settings) as server:
        for protocol, module, url in (
            ("http", httpclient, f"127.0.0.1:{server.http_port}"),
            ("grpc", grpcclient, f"127.0.0.1:{server.grpc_port}"),
        ):
            client: Any = module.InferenceServerClient(url)
            for image, label in zip(images, labels, strict=True):
                x = image[None].astype(np.float32)
                inp = module.InferInput("pixels", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                logits = client.infer("digits", [inp]).as_numpy("logits")
                answers.append((protocol, int(logits.argmax()), int(label)))
            client.close()
        ports = f"HTTP :{server.http_port}, gRPC :{server.grpc_port}"
    table = Table(title=f"5. serve: kiln serve ({ports}), Triton's clients, binary tensors", title_justify="left")
    for col in ("protocol", "predicted", "label"):
        table.add_column(col)
    for protocol, predicted, label in answers:
        colour = "green" if predicted == label else "red"
        table.add_row(protocol, f"[{colour}]{predicted}[/]", str(label))
    console.print(table)
    console.print(f"  [dim]kiln serve {repo} --http-port 8000 --grpc-port 8001   # the same, from the shell[/]")
    return answers


# ---- optimize: the fastest variant within the accuracy budget ---------------------------------------
def optimize_step(repo: Path) -> OptimizeResult:
    """Search the digits model's variants with the quick preset (no torch.compile: seconds, not
    minutes), show the table, and leave the choice in the spec for `kiln.load` and `kiln serve`."""
    import kiln
    from kiln.console import progress_bar
    from kiln.optimize.table import result_table, summary_lines

    with progress_bar(console, "4. optimize") as hook:
        result = kiln.optimize(repo, "digits", preset="quick", max_drop=0.005, progress=hook)
    console.print("[bold]4. optimize[/]  every variant this machine runs, checked on the validation split and timed")
    console.print(result_table(result))
    for line in summary_lines(result):
        console.print(line)
    console.print(f"[dim]the full search, torch.compile included: kiln optimize digits --repo {repo}[/]")
    return result


__all__ = ["DemoResult", "EngineResult", "KilnError", "evaluate", "optimize_step", "run_demo", "serve_step"]
