"""What the ``kiln`` command needs besides its verbs: help that reads like a man page, the repository
checks, the Ctrl-C summary of ``kiln optimize``, the log format, and the Ray paths of predict and serve."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

import typer

from kiln.console import console, error_line
from kiln.errors import KilnError, SpecError


def print_version(value: bool) -> None:
    if value:
        from kiln._version import __version__

        console.print(f"kiln {__version__}", highlight=False)
        raise typer.Exit()


def repository_at(repo: Path) -> Any:
    """The repository at ``repo``; a path that is not one is a user error naming it (not an empty result)."""
    from kiln.errors import RepositoryUnreadableError
    from kiln.repository import Repository

    if not repo.exists():
        raise RepositoryUnreadableError(
            str(repo), "does not exist", f"import a model into it first with `kiln import MODEL --repo {repo}`"
        )
    if not repo.is_dir():
        raise RepositoryUnreadableError(
            str(repo), "is not a directory", "pass the directory that `kiln import MODEL --repo DIR` created"
        )
    return Repository(repo)


def say_what_optimize_kept(repository: Any, model: str, version: int | None) -> None:
    """Ctrl-C during ``kiln optimize``: what is on disk (every variant measured so far, reused by the next
    run) and that the model's choice is as it was."""
    try:
        number, vdir = repository.resolve(model, version)
        kept = [v for v in repository.variant_ids(model, number) if repository.variant(model, number, v).figures()]
    except KilnError:  # interrupted before the model was even read
        error_line("interrupted before any variant was built; nothing changed")
        return
    error_line(f"interrupted: {len(kept)} variant(s) measured and kept in {vdir / 'variants'} (the next run reuses "
               "them); the choice was not changed")  # fmt: skip


def log_format(choice: str) -> str:
    if choice not in ("auto", "text", "json"):
        raise SpecError(f"--log-format {choice!r}: must be text, json or auto (text on a terminal, else json)")
    if choice != "auto":
        return choice
    from kiln.console import stderr_is_terminal

    return "text" if stderr_is_terminal() else "json"


def predict_on_ray(
    repository: Any, model: str, version: int | None, engine: str | None, threads: int | None,
    inputs: list[Path], output: Path | None, batch_size: int, concurrency: int, address: str | None,
) -> Any:  # fmt: skip
    """``kiln predict --ray``: the inputs checked here, then read, pre-processed and run on Ray Data."""
    from kiln.batch import count_items, plan
    from kiln.console import predict_progress
    from kiln.processing import Pipeline
    from kiln.ray import connect, require_ray

    require_ray("kiln predict --ray")  # before any work: exit 2 naming the extra when Ray is missing
    number, version_dir = repository.resolve(model, version)
    pipeline = Pipeline.from_spec(repository.spec(model), root=version_dir)
    files = plan(pipeline, inputs)
    connect(address, "kiln predict --ray")
    from kiln.ray.data import predict_files_ray

    with predictions_sink(output, files) as sink, predict_progress(count_items(pipeline, files)) as advance:
        return predict_files_ray(repository.root, model, number, engine, threads, files, sink, batch_size,
                                 concurrency, on_result=advance)  # fmt: skip


def read_labels(path: Path) -> list[str]:
    """``--labels``: one class label per line, UTF-8 (a BOM is dropped); blank lines do not count."""
    from kiln.errors import SpecError

    if path.is_dir():
        raise SpecError(f"--labels {path}: is a directory; name a text file with one label per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SpecError(f"--labels {path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"--labels {path}: is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise SpecError(f"--labels {path}: cannot be read ({exc.strerror})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def check_output(output: Path, files: Sequence[Path]) -> None:
    """Refuse, before anything is written, an ``--output`` that cannot be written or that is an input."""
    from kiln.errors import OutputFileError

    shown = str(output)
    if output.is_dir():
        raise OutputFileError(shown, "is a directory", f"name a file, e.g. -o {output / 'predictions.jsonl'}")
    parent = output.parent
    if not parent.is_dir():
        problem = "does not exist" if not parent.exists() else "is not a directory"
        raise OutputFileError(shown, f"the folder {parent} {problem}", f"create it first (mkdir -p {parent})")
    if output.exists():
        for f in files:
            with contextlib.suppress(OSError):
                if os.path.samefile(f, output):
                    raise OutputFileError(shown, f"is also an input ({f}); writing it would destroy it",
                                          "write the predictions to another file")  # fmt: skip


@contextlib.contextmanager
def predictions_sink(output: Path | None, files: Sequence[Path]) -> Iterator[IO[str]]:
    """Where ``kiln predict`` writes its JSON lines: stdout, or ``output`` (checked by :func:`check_output`),
    which is replaced only once every line is written (a failure or Ctrl-C leaves it as it was). An OS error
    while writing it (a full disk) is one line naming the file."""
    from kiln.files import replacing

    if output is None:
        yield sys.stdout
        return
    check_output(output, files)
    in_body = False
    try:
        with replacing(output) as f:
            in_body = True
            yield cast(IO[str], _NamedWrites(f, output))
            in_body = False
    except OSError as exc:
        if in_body:  # not a write to the output (those are named by _NamedWrites)
            raise
        raise _write_error(output, exc) from None


def _write_error(output: Path, exc: OSError) -> KilnError:
    from kiln.errors import OutputFileError

    reason = exc.strerror or type(exc).__name__
    return OutputFileError(str(output), f"cannot be written ({reason}), so it was left as it was",
                           "free some space or fix its permissions, or name another file")  # fmt: skip


class _NamedWrites:
    """A text file whose write errors name ``path`` (what the user passed), not the temporary file."""

    def __init__(self, sink: IO[str], path: Path) -> None:
        self._sink = sink
        self._path = path

    def write(self, text: str) -> int:
        try:
            return self._sink.write(text)
        except OSError as exc:
            raise _write_error(self._path, exc) from None

    def flush(self) -> None:
        try:
            self._sink.flush()
        except OSError as exc:
            raise _write_error(self._path, exc) from None


def emit_ray_config(repo: Path, models: list[str], path: Path) -> None:
    from kiln.ray import require_ray
    from kiln.repository import Repository
    from kiln.serving.server import check_repository

    require_ray("kiln serve --ray")
    from kiln.ray.serve import emit_config

    check_repository(repo)
    repository = Repository(repo)
    emit_config(repository, models or repository.models(), path)
    console.print(f"wrote {path}: deploy the replicas with `serve deploy {path}`, then run "
                  f"`kiln serve {repo} --ray --ray-address auto` for the front end")  # fmt: skip


def readable_help(command: Any) -> Any:
    """Help that reads like a man page: ``SOURCE`` and ``PATH``-style metavars instead of typer's ``{source}``,
    ``<list[str]>`` and ``<bool>`` (a flag shows none), and brackets in help text (``kiln[ray]``) kept as written
    instead of read as rich markup."""
    from typing import get_args, get_origin

    from typer.core import TyperArgument

    names: dict[Any, str] = {bool: "", int: "INT", float: "NUMBER", str: "TEXT", Path: "PATH"}
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        cmd.get_help_option = _bare_help_option(cmd.get_help_option)  # --help, made when help is asked for
        for param in cmd.params:
            if getattr(param, "help", None):
                param.help = param.help.replace("[", "\\[")
            if param.metavar is not None:
                continue
            if isinstance(param, TyperArgument):
                name = (param.name or "value").upper()
                param.metavar = name
                shown = name if param.required else f"[{name}]"  # typer writes a required one as {name}
                usage = shown + ("..." if param.nargs != 1 else "")
                setattr(param, "_usage_display_name", lambda usage=usage: usage)  # noqa: B010
                setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010 - the name says it; no "<str>"
                continue
            kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            while get_origin(kind) is not None and get_args(kind):  # list[str], str | None -> str
                kind = next(a for a in get_args(kind) if a is not type(None))
            param.metavar = "" if getattr(param, "is_flag", False) else names.get(kind, "VALUE")
    return command


def _bare_help_option(make: Any) -> Any:
    def get_help_option(ctx: Any) -> Any:
        option = make(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return get_help_option


def valid_names(exc: Exception, ctx: Any) -> str:
    """For an unknown command or option with no close match, the valid ones (``; the commands are ...``)."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    if ctx is None or "Did you mean" in message or "Possible options" in message:
        return ""
    if message.startswith("No such command") and hasattr(ctx.command, "commands"):
        return f"; the commands are {', '.join(ctx.command.commands)}"
    if message.startswith("No such option"):
        options = [o for param in ctx.command.params for o in param.opts if o.startswith("--")]
        return f"; {ctx.command_path} takes {', '.join(options)}" if options else ""
    return ""
