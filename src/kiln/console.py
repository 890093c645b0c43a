"""Terminal output shared by the CLI and the demo: rich consoles and the tables kiln prints."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kiln.convert import ImportResult
    from kiln.hardware import HardwareInfo

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
PIPE_WIDTH = 240  # output to a file, a pipe or CI: as wide as kiln's widest table, so that no row wraps
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = PIPE_WIDTH  # a terminal's own width is used as it is (rich reads it)


def quiet_runtimes() -> None:
    """Silence ONNX Runtime's C++ log but for fatal errors: its warnings and a failed run's red ``[E:...]``
    lines would precede kiln's own message, and each such error reaches kiln as an exception that it reports
    (or records, for an optimizer variant); ``kiln -v`` leaves the log on."""
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a dependency of kiln
        return
    onnxruntime.set_default_logger_severity(4)


def stderr_is_terminal() -> bool:
    """Whether a person reads the logs: then they are text lines, else (a file, a collector) JSON."""
    return err_console.is_terminal


ProgressHook = Callable[[str, int, int], None]  # (what is happening, steps done, steps in all)


@contextlib.contextmanager
def progress_bar(console: Console, title: str) -> Iterator[ProgressHook]:
    """A rich bar with a total, transient; the hook takes (what, done, total) as optimize and bench report them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:  # fmt: skip
        task = progress.add_task(title, total=None)

        def hook(what: str, done: int, total: int) -> None:
            progress.update(task, description=f"{title}: {what}", completed=done, total=total)

        yield hook


def error_line(message: str) -> None:
    """One red line on stderr: what the CLI prints for any user error (its text is not markup: a fix such
    as ``pip install 'kiln[interop]'`` prints as written)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


@contextlib.contextmanager
def predict_progress(total: int) -> Iterator[Callable[[Any], None]]:
    """A progress bar on stderr for ``kiln predict``; yields the per-result callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task("predict", total=total)
        yield lambda _result: progress.advance(task)


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.1f} GiB"


def doctor_tables(info: HardwareInfo) -> list[Table]:
    machine = Table(title="This machine", show_header=False, title_justify="left")
    machine.add_column(style="bold")
    machine.add_column()
    machine.add_row("CPU", f"{info.cpu_model} ({info.architecture})")
    usable = f", {info.usable_cores} usable (affinity, cgroup)" if info.usable_cores < info.physical_cores else ""
    machine.add_row("cores", f"{info.physical_cores} physical, {info.logical_cores} logical{usable}")
    machine.add_row("memory", _gib(info.memory_bytes))
    machine.add_row("ISA", ", ".join(info.isa) or "none detected")
    for pkg, ver in info.versions.items():
        machine.add_row(pkg, ver or "[dim]not installed[/]")
    machine.add_row("ONNX Runtime providers", ", ".join(info.onnxruntime_providers) or "[dim]none[/]")
    machine.add_row("OpenVINO devices", ", ".join(info.openvino_devices) or "[dim]none[/]")

    devices = Table(title="Devices and precisions", title_justify="left")
    for col in ("device", "name", "memory", "bf16", "fp16", "int8"):
        devices.add_column(col)
    for d in info.devices:
        devices.add_row(
            d.id + (f" (cc {d.compute_capability})" if d.compute_capability else ""),
            d.name,
            _gib(d.memory_bytes),
            *(f"{_yes(s.supported)} [dim]{s.reason}[/]" for s in (d.bf16, d.fp16, d.int8)),
        )
    return [machine, devices]


def import_summary(result: ImportResult) -> Table:
    t = Table(title=f"{result.model} version {result.version}" + (" (already imported)" if result.reused else ""),
              title_justify="left", show_header=False)  # fmt: skip
    t.add_column(style="bold")
    t.add_column()
    t.add_row("path", str(result.path))
    t.add_row("exporter", result.manifest.exporter)
    for tensor in result.spec.inputs:
        t.add_row(f"input {tensor.name}", f"{tensor.dtype} {list(tensor.shape)}")
    for tensor in result.spec.outputs:
        t.add_row(f"output {tensor.name}", f"{tensor.dtype} {list(tensor.shape)}")
    worst: dict[str, float] = {}
    batches: dict[str, list[int]] = {}
    for p in result.manifest.parity:
        worst[p["artifact"]] = max(worst.get(p["artifact"], 0.0), p["max_abs_error"])
        seen = batches.setdefault(p["artifact"], [])
        if p.get("batch") is not None and p["batch"] not in seen:
            seen.append(p["batch"])
    for artifact, err in worst.items():
        at = batches.get(artifact) or []
        where = f" (batch{'es' if len(at) > 1 else ''} {' and '.join(map(str, at))})" if at else ""
        t.add_row(f"parity {artifact}", f"max abs error {err:.2e}{where}")
    for name, digest in result.manifest.artifacts.items():
        t.add_row(name, f"sha256 {digest[:16]}…")
    for note in result.notes:
        t.add_row("note", f"[yellow]{note}[/]")
    return t
