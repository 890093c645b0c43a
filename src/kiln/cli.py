"""The ``kiln`` command: one thin function per verb; the library does the work."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.console import console, error_line
from kiln.errors import KilnError, SpecError

app = typer.Typer(
    name="kiln",
    help="Take a model trained offline and turn it into fast, reliable online inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RepoOpt = Annotated[Path, typer.Option("--repo", "-r", help="model repository directory")]


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
        list[str] | None, typer.Option(help="example shape per input, batch first: 1,3,224,224")
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

    options: dict[str, Any] = {"name": name, "task": task, "weights": weights, "atol": atol, "rtol": rtol,
                               "opset": opset, "force": force}  # fmt: skip
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
        if not labels.is_file():
            raise SpecError(f"--labels {labels}: file not found")
        options["labels"] = [ln.strip() for ln in labels.read_text().splitlines() if ln.strip()]
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
    threads: Annotated[int | None, typer.Option(min=1, help="engine intra-op threads")] = None,
) -> None:
    """Predict over files in batches and write one JSON line per instance; bad files are reported and skipped."""
    from kiln.batch import count_items, plan, predict_files
    from kiln.console import err_console, predict_progress
    from kiln.predictor import load
    from kiln.processing import Pipeline
    from kiln.repository import Repository

    repository = Repository(repo)
    predictor = load(repository, model, version=version, engine=engine, threads=threads)
    _, version_dir = repository.resolve(model, predictor.version)
    pipeline = Pipeline.from_spec(predictor.spec, root=version_dir)
    try:
        files = plan(pipeline, inputs)
    except KilnError:
        predictor.close()
        raise
    sink = output.open("w", encoding="utf-8") if output is not None else sys.stdout
    try:
        with predict_progress(count_items(pipeline, files)) as advance:
            summary = predict_files(
                pipeline, predictor.predict, files, sink, batch_size, workers, prefetch, on_result=advance
            )
    finally:
        if output is not None:
            sink.close()
        predictor.close()
    for key, reason in summary.errors[:20]:
        err_console.print(f"[yellow]skipped[/] {key}: {reason}", markup=True, highlight=False)
    where = f" to {output}" if output is not None else ""
    err_console.print(f"{summary.succeeded} predictions{where}, {summary.failed} failed", highlight=False)
    if summary.failed:
        raise typer.Exit(1)


@app.command("list")
def list_cmd(repo: RepoOpt) -> None:
    """List the models and versions in a repository."""
    from rich.table import Table

    from kiln.repository import Repository

    repository = Repository(repo)
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
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="where the demo writes its repository")] = Path("kiln-demo"),
) -> None:
    """Train the digits CNN (once), import it, and run it on every engine this machine has."""
    from kiln.demo import run_demo

    run_demo(directory)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one red line and exit code 2, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)
    except KilnError as exc:
        error_line(str(exc))
        sys.exit(2)
    except typer.TyperException as exc:  # usage errors: a missing argument, a bad option value
        if type(exc).__name__ == "NoArgsIsHelpError":
            console.print(exc.format_message())
        else:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            error_line(exc.format_message() + hint)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        error_line("interrupted")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
