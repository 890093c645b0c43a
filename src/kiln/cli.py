"""The ``kiln`` command: one thin function per verb; the library does the work."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln import cli_support as support
from kiln.console import console, error_line
from kiln.environment import MAX_THREADS
from kiln.errors import KilnError, SpecError, spec_error

app = typer.Typer(
    name="kiln",
    help="Take a model trained offline and turn it into fast, reliable online inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RepoOpt = Annotated[Path, typer.Option("--repo", "-r", help="model repository directory")]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join ('auto' or HOST:PORT; implies --ray); default: a private local one"),
]


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=support.print_version, is_eager=True, help="print kiln's version and exit"),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also show the runtimes' own logs (ONNX Runtime's C++ log)")
    ] = False,
) -> None:
    """Options before the verb: kiln --version, kiln -v import ..."""
    if ctx.invoked_subcommand is not None:
        from kiln.environment import get_settings

        get_settings()  # a bad KILN_* variable is one line before any work, whichever verb reads it
    if ctx.invoked_subcommand is not None and not verbose:
        from kiln.console import quiet_runtimes

        quiet_runtimes()


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' or '1x3x224x224' -> (1, 3, 224, 224)."""
    parts = [p for p in re.split(r"[,x×\s]+", text.strip()) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SpecError(f"--input-shape {text!r}: expected positive integers like 1,3,224,224")
    return tuple(int(p) for p in parts)


@app.command("import")
def import_cmd(
    source: Annotated[
        str,
        typer.Argument(
            help="an .onnx, .keras/.h5, .pkl/.joblib (scikit-learn), .pt (TorchScript) or .pt2 file, "
            "or a PyTorch factory 'package.module:callable'"
        ),
    ],
    repo: RepoOpt,
    name: Annotated[str | None, typer.Option(help="model name in the repository")] = None,
    input_shape: Annotated[
        list[str] | None, typer.Option(help="example shape per input, batch first: 1,3,224,224 (ONNX too)")
    ] = None,
    dim: Annotated[
        list[str] | None, typer.Option(help="size of an ONNX model's dynamic dim, NAME=SIZE (seq=128); repeatable")
    ] = None,
    input_dtype: Annotated[list[str] | None, typer.Option(help="dtype per input (default float32)")] = None,
    input_name: Annotated[list[str] | None, typer.Option(help="name per input")] = None,
    output_name: Annotated[list[str] | None, typer.Option(help="name per output")] = None,
    weights: Annotated[Path | None, typer.Option(help="safetensors or state_dict file (PyTorch)")] = None,
    task: Annotated[str, typer.Option(help="classification, embedding, detection or generic")] = "generic",
    labels: Annotated[Path | None, typer.Option(help="text file with one class label per line")] = None,
    atol: Annotated[float, typer.Option(help="parity tolerance, absolute")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="parity tolerance, relative")] = 1e-3,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's)")] = None,
    force: Annotated[bool, typer.Option(help="import again even if this source is already a version")] = False,
    # -- interop options (issue 6) --
    dynamic_axis: Annotated[
        list[str] | None, typer.Option(help="a dynamic dim besides batch, INPUT:AXIS[:NAME], e.g. ids:1:seq")
    ] = None,
    trust_pickle: Annotated[
        bool, typer.Option(help="allow loading a pickle (scikit-learn .pkl/.joblib); it runs code from the file")
    ] = False,
    processing: Annotated[
        Path | None, typer.Option(help="YAML file with 'preprocess' and/or 'postprocess' step lists for the spec")
    ] = None,
    asset: Annotated[
        list[Path] | None, typer.Option(help="file copied into the version, e.g. tokenizer.json (steps name it)")
    ] = None,
) -> None:
    """Import a trained model into the repository as a validated ONNX artifact plus a spec."""
    from kiln.console import import_summary
    from kiln.convert import import_model
    from kiln.convert.example_shapes import parse_dims

    options: dict[str, Any] = {"name": name, "task": task, "weights": weights, "atol": atol, "rtol": rtol,
                               "opset": opset, "force": force, "dims": parse_dims(dim) if dim else None}  # fmt: skip
    if input_shape:
        options["input_shapes"] = [parse_shape(s) for s in input_shape]
    for key, value in (
        ("input_dtypes", input_dtype),
        ("input_names", input_name),
        ("output_names", output_name),
    ):
        if value:
            options[key] = value
    options.update(interop_options(dynamic_axis, trust_pickle, processing))
    if asset:
        options["assets"] = asset
    if labels is not None:
        options["labels"] = support.read_labels(labels)
    with console.status(f"importing {source} …"):
        result = import_model(source, repo, **options)
    console.print(import_summary(result))


# ---- interop: import options and `kiln predict` (issue 6) ---------------------------------------------
def parse_dynamic_axis(text: str) -> tuple[str, int, str]:
    """'ids:1:seq' -> ('ids', 1, 'seq'); the name defaults to '<input>_<axis>'."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].isdigit():
        raise SpecError(f"--dynamic-axis {text!r}: expected INPUT:AXIS[:NAME], like ids:1:seq or image:2:height")
    name = parts[2] if len(parts) == 3 and parts[2] else f"{parts[0]}_{parts[1]}"
    return parts[0], int(parts[1]), name


def interop_options(dynamic_axis: list[str] | None, trust_pickle: bool, processing: Path | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if dynamic_axis:
        axes: dict[str, dict[int, str]] = {}
        for text in dynamic_axis:
            inp, axis, dim = parse_dynamic_axis(text)
            axes.setdefault(inp, {})[axis] = dim
        options["dynamic_axes"] = axes
    if trust_pickle:
        options["trust_pickle"] = True
    if processing is not None:
        import yaml

        if not processing.is_file():
            raise SpecError(f"--processing {processing}: file not found")
        try:
            data = yaml.safe_load(processing.read_text())
        except yaml.YAMLError as exc:
            raise SpecError(f"--processing {processing} is not valid YAML: {exc}") from None
        if not isinstance(data, dict) or not set(data) <= {"preprocess", "postprocess"}:
            raise SpecError(f"--processing {processing} must be a mapping with 'preprocess' and/or 'postprocess' lists")
        options.update({k: v for k, v in data.items() if v is not None})
    return options


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="model name in the repository")],
    inputs: Annotated[
        list[Path], typer.Argument(help="image files, text files (one sentence a line), .npy, or folders")
    ],
    repo: RepoOpt,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSONL file (default: stdout)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="instances per engine call")] = 32,
    workers: Annotated[int, typer.Option(min=1, help="threads that read and pre-process files")] = 2,
    prefetch: Annotated[int, typer.Option(min=0, help="batches decoded ahead of the engine")] = 2,
    version: Annotated[int | None, typer.Option(help="model version (default: latest)")] = None,
    engine: Annotated[str | None, typer.Option(help="engine (default: the chosen variant, else onnxruntime)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, max=MAX_THREADS, help="engine intra-op threads")] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="run on Ray Data: reading spread over the cluster, engines in actors")
    ] = False,
    ray_address: RayAddressOpt = None,
    concurrency: Annotated[int, typer.Option(min=1, help="engine actors with --ray")] = 1,
) -> None:
    """Predict over files in batches and write one JSON line per instance; bad files are reported and skipped."""
    from kiln.batch import count_items, plan, predict_files
    from kiln.console import err_console, predict_progress
    from kiln.predictor import load
    from kiln.processing import Pipeline

    repository = support.repository_at(repo)
    if ray or ray_address is not None:
        summary = support.predict_on_ray(repository, model, version, engine, threads, inputs, output,
                                         batch_size, concurrency, ray_address)  # fmt: skip
    else:
        predictor = load(repository, model, version=version, engine=engine, threads=threads)
        _, version_dir = repository.resolve(model, predictor.version)
        pipeline = Pipeline.from_spec(predictor.spec, root=version_dir)
        try:
            files = plan(pipeline, inputs)
        except KilnError:
            predictor.close()
            raise
        try:
            with (
                support.predictions_sink(output, files) as sink,
                predict_progress(count_items(pipeline, files)) as advance,
            ):
                summary = predict_files(
                    pipeline, predictor.predict, files, sink, batch_size, workers, prefetch, on_result=advance
                )
        finally:
            predictor.close()
    from rich.markup import escape

    for key, reason in summary.errors[:20]:
        err_console.print(f"[yellow]skipped[/] {escape(f'{key}: {reason}')}", markup=True, highlight=False)
    where = f" to {output}" if output is not None else ""
    err_console.print(f"{summary.succeeded} predictions{where}, {summary.failed} failed", highlight=False)
    if summary.failed:
        raise typer.Exit(1)


@app.command("list")
def list_cmd(repo: RepoOpt) -> None:
    """List the models and versions in a repository."""
    from rich.table import Table

    repository = support.repository_at(repo)
    if not repository.models():
        console.print(f"repository {repo} holds no models; import one with `kiln import MODEL --repo {repo}`",
                      highlight=False, markup=False)  # fmt: skip
        return
    table = Table(title=str(repo), title_justify="left")
    for col in ("model", "task", "versions", "inputs", "outputs"):
        table.add_column(col)
    for m in repository.models():
        spec = repository.spec(m)
        table.add_row(
            m, spec.task, ", ".join(map(str, repository.versions(m))),
            ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in spec.inputs),
            ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in spec.outputs),
        )  # fmt: skip
    console.print(table)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Show what this machine can do: CPU ISA, devices, bf16/fp16 support, runtimes and providers."""
    from kiln.hardware import detect

    info = detect()
    if as_json:
        sys.stdout.write(json.dumps(info.to_dict(), indent=2) + "\n")
        return
    from kiln.console import doctor_tables

    for table in doctor_tables(info):
        console.print(table)
    for note in info.notes:
        console.print(f"[yellow]note:[/] {note}")


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="model name in the repository")],
    repo: RepoOpt,
    version: Annotated[int | None, typer.Option(help="version (default: the latest)")] = None,
    preset: Annotated[str | None, typer.Option(help="cpu-latency, cpu-throughput, quick, compress or thorough")] = None,
    objective: Annotated[str | None, typer.Option(help="latency (batch 1) or throughput (batch N)")] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu (default), cuda or cuda:N: where variants run and are timed")
    ] = None,
    max_drop: Annotated[
        float | None, typer.Option(help="allowed drop of top-1, agreement, mean cosine or mAP@0.5")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="auto, top1, agreement, cosine, map50, sqnr or max-abs")] = None,
    min_sqnr_db: Annotated[float | None, typer.Option(help="budget when the metric is sqnr")] = None,
    max_abs_error: Annotated[float | None, typer.Option(help="also bound the max abs error")] = None,
    data: Annotated[str | None, typer.Option(help="validation/calibration data: a .npz or 'module:callable'")] = None,
    engine: Annotated[list[str] | None, typer.Option(help="engines to try (default: all)")] = None,
    int8: Annotated[list[str] | None, typer.Option(help="ort-dynamic, ort-static, nncf, torch-dynamic")] = None,
    no_int8: Annotated[bool, typer.Option("--no-int8", help="build no int8 variants")] = False,
    compile_mode: Annotated[
        list[str] | None, typer.Option("--compile", help="torch.compile modes: default, max-autotune")
    ] = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="skip torch.compile")] = False,
    prune: Annotated[
        list[float] | None, typer.Option(help="prune this share of channels (0.5), then distill; repeatable")
    ] = None,
    prune_keep: Annotated[
        list[str] | None, typer.Option(help="a module pruning leaves whole (e.g. features.0); repeatable")
    ] = None,
    qat: Annotated[bool, typer.Option("--qat", help="also quantization-aware training (NNCF, on OpenVINO)")] = False,
    train_data: Annotated[
        str | None, typer.Option(help="data to fine-tune on: a .npz or 'module:callable' (default: a zoo split)")
    ] = None,
    train_budget: Annotated[
        str | None, typer.Option(help="time each fine-tuning pass may take: 120s, 2m or seconds")
    ] = None,
    include: Annotated[list[str] | None, typer.Option(help="only variants whose label contains this")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="drop variants whose label contains this")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch for throughput and accuracy runs")] = None,
    threads: Annotated[int | None, typer.Option(min=1, max=MAX_THREADS, help="intra-op threads")] = None,
    min_time: Annotated[float | None, typer.Option(help="seconds timed per variant and batch size")] = None,
    retime: Annotated[bool, typer.Option(help="time cached variants again")] = False,
    choose: Annotated[bool, typer.Option(help="record the choice in the model's spec")] = True,
    replace: Annotated[bool, typer.Option("--replace", help="record this choice over a faster earlier one")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Build, check and time this machine's variants; choose the fastest within the accuracy budget."""
    from kiln.console import progress_bar
    from kiln.optimize.search import optimize as run_optimize
    from kiln.optimize.table import result_table, summary_lines

    options: dict[str, Any] = {
        "preset": preset, "objective": objective, "device": device, "max_drop": max_drop, "metric": metric,
        "min_sqnr_db": min_sqnr_db, "max_abs_error": max_abs_error, "data": data, "engines": engine,
        "int8": [] if no_int8 else int8, "compile_modes": [] if no_compile else compile_mode,
        "include": include, "exclude": exclude, "batch_size": batch_size, "threads": threads,
        "min_time_s": min_time, "retime": retime or None, "replace": replace or None, "choose": choose, "prune": prune, "prune_keep": prune_keep, "qat": qat or None,
        "train_data": train_data, "train_budget_s": None if train_budget is None else _seconds(train_budget),
    }  # fmt: skip
    options = {k: v for k, v in options.items() if v is not None}
    repository = support.repository_at(repo)
    try:
        with progress_bar(console, f"optimizing {model}") as hook:
            result = run_optimize(repository, model, version=version, progress=hook, **options)
    except KeyboardInterrupt:
        support.say_what_optimize_kept(repository, model, version)
        raise typer.Exit(130) from None
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    console.print(result_table(result))
    for line in summary_lines(result):
        console.print(line)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="where the demo writes its repository")] = Path("kiln-demo"),
) -> None:
    """Train the digits CNN (once), import it, and run it on every engine this machine has."""
    from kiln.demo import run_demo

    run_demo(directory)


def _seconds(text: str) -> float:
    """``120s``, ``2m``, ``1.5h`` or plain seconds."""
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    unit = t[-1] if t[-1:] in scale else "s"
    try:
        return float(t.rstrip("smh")) * scale[unit]
    except ValueError:
        raise SpecError(f"--train-budget {text!r}: expected a duration such as 120s, 2m or 90") from None


def _csv(text: str, kind: type = str) -> list[Any]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [kind(p) for p in items]
    except ValueError:
        raise SpecError(f"{text!r}: expected a comma-separated list of {kind.__name__} values, e.g. 1,4,8") from None


@app.command("bench")
def bench_cmd(
    model: Annotated[str | None, typer.Argument(help="model in --repo to measure in-process")] = None,
    repo: Annotated[Path | None, typer.Option("--repo", "-r", help="model repository directory")] = None,
    version: Annotated[int | None, typer.Option(help="model version (default: the latest)")] = None,
    variants: Annotated[
        str, typer.Option(help="reference, chosen, all, or variant ids, comma-separated")
    ] = "reference,chosen",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,2,4,8,16,32",
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            help="single-stream, offline, server, multi-stream (default: single-stream and offline, "
            "plus server with --qps or --find-max-qps)"
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every figure as JSON")] = None,
    report_out: Annotated[Path | None, typer.Option("--report", help="write a self-contained HTML report")] = None,
    min_time: Annotated[float, typer.Option(help="seconds of timed runs per batch size")] = 1.0,
    repeats: Annotated[int, typer.Option(help="repeats per batch size (spread is reported)")] = 3,
    threads: Annotated[int | None, typer.Option(min=1, max=MAX_THREADS, help="engine intra-op threads")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    qps: Annotated[float | None, typer.Option(help="server scenario / open loop: offered queries per second")] = None,
    find_max_qps: Annotated[
        bool, typer.Option(help="server scenario: search the highest QPS meeting --slo-ms")
    ] = False,
    slo_ms: Annotated[float, typer.Option(help="server scenario: p99 latency bound")] = 20.0,
    fps: Annotated[float, typer.Option(help="multi-stream scenario: frames per second per stream")] = 30.0,
    seconds: Annotated[float, typer.Option(help="length of each server / multi-stream trial")] = 3.0,
    url: Annotated[
        str | None, typer.Option(help="drive a running V2 server: http://127.0.0.1:8000 or grpc://…")
    ] = None,
    concurrency: Annotated[str, typer.Option(help="--url: closed-loop concurrency levels, comma-separated")] = "1",
    requests: Annotated[int, typer.Option(help="--url: at most this many requests per level")] = 1000,
    duration: Annotated[float, typer.Option(help="--url: at most this many seconds per level")] = 10.0,
    batch: Annotated[int, typer.Option(help="--url: batch size of each request")] = 1,
    json_tensors: Annotated[bool, typer.Option(help="--url: send JSON tensors instead of binary")] = False,
    allow_remote: Annotated[bool, typer.Option(help="--url: allow a non-loopback server")] = False,
    request_timeout: Annotated[float, typer.Option(help="--url: seconds before one request counts as failed")] = 30.0,
    compare: Annotated[
        list[Path] | None, typer.Option(help="compare two bench JSON files: --compare a.json b.json")
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="--compare: regression threshold (0.1 = 10 %); noisier figures allow their spread")
    ] = 0.10,
    time_budget: Annotated[
        float | None, typer.Option(help="seconds: start no new measurement past it, and list what was skipped")
    ] = None,
) -> None:
    """Measure latency, throughput, memory and load time; drive a V2 server; compare two runs."""
    from kiln.bench import report

    def finish(result: report.BenchResult | report.LoadReport) -> None:
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        for path in report.write_outputs(result, json_out, report_out):
            console.print(f"wrote {path}")
        if result.interrupted:
            raise typer.Exit(130)

    if compare:
        # `--compare a.json b.json` leaves b.json as the MODEL argument; `--compare a --compare b` works too.
        files = [*compare, *([Path(model)] if model is not None else [])]
        if len(files) != 2:
            raise SpecError(f"--compare takes exactly two JSON files (--compare a.json b.json), got {len(files)}")
        diff = report.compare_files(files[0], files[1], threshold)
        console.print(report.compare_table(diff))
        for warning in diff.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        if diff.regressions:
            console.print(f"[red]{len(diff.regressions)} regression(s) beyond {threshold:.0%}[/]")
            raise typer.Exit(1)
        return
    if url is not None:
        from kiln.bench import loadgen

        if model is None:
            raise SpecError("--url needs the MODEL to load, e.g. kiln bench digits --url http://127.0.0.1:8000")
        with report.progress_bar(console, "load") as hook:
            served = loadgen.sweep(url, model, concurrency=_csv(concurrency, int), qps=qps, requests=requests,
                                   seconds=duration, batch=batch, binary=not json_tensors, allow_remote=allow_remote,
                                   request_timeout_s=request_timeout, progress=hook)  # fmt: skip
        console.print(report.load_table(served))
        finish(served)
        return
    if model is None or repo is None:
        raise SpecError("kiln bench needs MODEL and --repo (or --url, or --compare)")
    from kiln.bench.config import BenchConfig
    from kiln.bench.runner import ANNOUNCE_FROM_S, bench, plan

    options: dict[str, Any] = {"scenarios": scenario} if scenario else {}
    if not scenario and (find_max_qps or qps):
        console.print("[dim]--qps / --find-max-qps without --scenario: running single-stream, offline and server[/]")
    config = BenchConfig.from_options(
        variants=_csv(variants), batch_sizes=_csv(batch_sizes, int), min_time_s=min_time, repeats=repeats,
        threads=threads, device=device, server_qps=qps, find_max_qps=find_max_qps, slo_ms=slo_ms, stream_fps=fps,
        scenario_seconds=seconds, time_budget_s=time_budget, **options,
    )  # fmt: skip
    support.repository_at(repo)  # a path that is no repository is said as such, not as a missing model
    expected = plan(repo, model, config, version=version)
    if expected.seconds >= ANNOUNCE_FROM_S:
        console.print(f"[dim]{expected.text}[/]")
    with report.progress_bar(console, "bench") as hook:
        result = bench(repo, model, config, version=version, progress=hook)
    console.print(report.bench_table(result))
    console.print(report.variant_table(result))
    if (table := report.scenario_table(result)) is not None:
        console.print(table)
    if (line := report.headline(result)) is not None:
        from rich.markup import escape

        console.print(f"[bold]{escape(line)}[/]")
    finish(result)


@app.command()
def serve(
    ctx: typer.Context,
    # readable=False: the server checks the repository itself and names the fix (click's check names none)
    repo: Annotated[
        Path | None, typer.Argument(help="model repository directory (or --repo)", show_default=False, readable=False)
    ] = None,
    repo_opt: Annotated[
        Path | None,
        typer.Option(
            "--repo", "-r", help="model repository directory (or as REPO)", show_default=False, readable=False
        ),
    ] = None,
    http_port: Annotated[int, typer.Option(help="HTTP port (0 picks a free one)")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one, -1 turns gRPC off)")] = 8001,
    host: Annotated[
        str, typer.Option(help="interface to bind; 0.0.0.0 exposes the server to the network")
    ] = "127.0.0.1",
    token: Annotated[
        str | None, typer.Option(envvar="KILN_SERVE_TOKEN", help="bearer token for the model-repository endpoints")
    ] = None,
    max_memory: Annotated[str | None, typer.Option(help="memory budget for loaded models, e.g. 2GB (LRU)")] = None,
    model: Annotated[list[str] | None, typer.Option(help="preload only these models (repeatable)")] = None,
    lazy: Annotated[bool, typer.Option(help="load each model on its first request instead of at start")] = False,
    engine_threads: Annotated[
        int | None, typer.Option(min=1, max=MAX_THREADS, help="intra-op threads per engine (default: cores - 1)")
    ] = None,
    max_body_bytes: Annotated[str, typer.Option(help="largest request body, e.g. 64MB")] = "64MB",
    timeout: Annotated[float, typer.Option(help="request timeout in seconds")] = 30.0,
    drain_timeout: Annotated[float, typer.Option(help="seconds to finish in-flight requests on SIGTERM")] = 30.0,
    log_format: Annotated[
        str, typer.Option(help="text, json, or auto: text lines on a terminal, JSON lines otherwise")
    ] = "auto",
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
    ray: Annotated[
        bool, typer.Option("--ray", help="run the models' replicas on Ray Serve (kiln[ray]); kiln stays the front end")
    ] = False,
    ray_address: RayAddressOpt = None,
    emit_config: Annotated[
        Path | None,
        typer.Option(
            help="write a Ray Serve config file (for `serve deploy`) of the replicas and exit (implies --ray)"
        ),
    ] = None,
) -> None:
    """Serve the repository over the Open Inference Protocol (HTTP and gRPC) until SIGTERM."""
    from pydantic import ValidationError

    from kiln.serving import ServerSettings
    from kiln.serving import serve as run_server

    if (repo is None) == (repo_opt is None):
        problem = "given twice" if repo is not None else "missing"
        raise typer.BadParameter(f"{problem}; pass the repository once, as `kiln serve REPO` or `kiln serve --repo REPO`",
                                 ctx=ctx, param_hint="REPO / --repo")  # fmt: skip
    fields: dict[str, Any] = {
        "repo": repo if repo is not None else repo_opt, "host": host, "http_port": http_port,
        "grpc_port": None if grpc_port < 0 else grpc_port,
        "token": token, "max_memory": max_memory, "models": model or [], "load_mode": "lazy" if lazy else "preload",
        "max_body_bytes": max_body_bytes, "request_timeout_s": timeout, "drain_timeout_s": drain_timeout,
        "log_format": support.log_format(log_format), "access_log": access_log,
    }  # fmt: skip
    if engine_threads is not None:
        fields["engine_threads"] = engine_threads
    ray = ray or ray_address is not None or emit_config is not None  # either implies --ray, as for predict
    fields.update(ray=ray, ray_address=ray_address)
    if emit_config is not None:
        support.emit_ray_config(fields["repo"], model or [], emit_config)
        return
    try:  # the repository itself is checked by the server, before it binds a port
        settings = ServerSettings(**fields)
    except ValidationError as exc:
        options = {"request_timeout_s": "--timeout", "drain_timeout_s": "--drain-timeout", "load_mode": "--lazy"}
        raise spec_error(exc, "", flag=True, options=options) from None
    code = run_server(settings)
    if code:
        raise typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one red line and exit code 2, never a traceback."""
    try:
        code = support.readable_help(typer.main.get_command(app)).main(
            args=argv, prog_name="kiln", standalone_mode=False
        )
    except KilnError as exc:
        error_line(str(exc))
        sys.exit(2)
    except typer.TyperException as exc:  # usage errors: a missing argument, a bad option value
        if type(exc).__name__ == "NoArgsIsHelpError":
            console.print(exc.format_message())
        else:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            valid = support.valid_names(exc, ctx)
            error_line((exc.format_message().rstrip(".") + valid if valid else exc.format_message()) + hint)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        error_line("interrupted")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
