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
    source: Annotated[str, typer.Argument(help="an .onnx file, or a PyTorch factory 'package.module:callable'")],
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
    if labels is not None:
        if not labels.is_file():
            raise SpecError(f"--labels {labels}: file not found")
        options["labels"] = [ln.strip() for ln in labels.read_text().splitlines() if ln.strip()]
    with console.status(f"importing {source} …"):
        result = import_model(source, repo, **options)
    console.print(import_summary(result))


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
def optimize(
    model: Annotated[str, typer.Argument(help="model name in the repository")],
    repo: RepoOpt,
    version: Annotated[int | None, typer.Option(help="version (default: the latest)")] = None,
    preset: Annotated[str | None, typer.Option(help="cpu-latency, cpu-throughput, quick or thorough")] = None,
    objective: Annotated[str | None, typer.Option(help="latency (batch 1) or throughput (batch N)")] = None,
    max_drop: Annotated[float | None, typer.Option(help="allowed drop of top-1, agreement or mean cosine")] = None,
    metric: Annotated[str | None, typer.Option(help="auto, top1, agreement, cosine, sqnr or max-abs")] = None,
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
    include: Annotated[list[str] | None, typer.Option(help="only variants whose label contains this")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="drop variants whose label contains this")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch for throughput and accuracy runs")] = None,
    threads: Annotated[int | None, typer.Option(help="intra-op threads")] = None,
    min_time: Annotated[float | None, typer.Option(help="seconds timed per variant and batch size")] = None,
    retime: Annotated[bool, typer.Option(help="time cached variants again")] = False,
    choose: Annotated[bool, typer.Option(help="record the choice in the model's spec")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Build, check and time this machine's variants; choose the fastest within the accuracy budget."""
    from kiln.optimize import optimize as run_optimize
    from kiln.optimize.report import progress_bar, result_table, summary_lines

    options: dict[str, Any] = {
        "preset": preset, "objective": objective, "max_drop": max_drop, "metric": metric,
        "min_sqnr_db": min_sqnr_db, "max_abs_error": max_abs_error, "data": data, "engines": engine,
        "int8": [] if no_int8 else int8, "compile_modes": [] if no_compile else compile_mode,
        "include": include, "exclude": exclude, "batch_size": batch_size, "threads": threads,
        "min_time_s": min_time, "retime": retime or None, "choose": choose,
    }  # fmt: skip
    options = {k: v for k, v in options.items() if v is not None}
    with progress_bar(console, f"optimizing {model}") as hook:
        result = run_optimize(repo, model, version=version, progress=hook, **options)
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
