"""Offline batch prediction over files (``kiln predict``): images, text files (one sentence a line) and
``.npy`` arrays go through the model's declared pre-processing, the engine and post-processing, in
batches, with the next batches decoded while the engine runs; each result is one JSON line, in input
order. Sentences are batched by length (within a bounded window: see
:func:`kiln.processing.prefetch.predict_overlapped`), so a batch of text pads little.

A file that cannot be read or decoded becomes an error record (and a warning), never a silent gap
and never the end of the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from kiln.errors import DataError, ProcessingError, SpecError
from kiln.processing.pipeline import Pipeline
from kiln.processing.prefetch import Result, predict_overlapped

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
TEXT_SUFFIXES = frozenset({".txt"})
ARRAY_SUFFIXES = frozenset({".npy"})
KNOWN_SUFFIXES = IMAGE_SUFFIXES | TEXT_SUFFIXES | ARRAY_SUFFIXES
Kind = Literal["image", "text", "array", "missing", "unknown"]


@dataclass(frozen=True)
class Item:
    """One instance to predict: where it comes from (``key``, written to the output) and how to load it."""

    key: str
    kind: Kind
    path: Path
    text: str | None = None
    row: int | None = None


@dataclass
class Summary:
    total: int = 0
    failed: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def succeeded(self) -> int:
        return self.total - self.failed


def _kind(path: Path) -> Kind:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in ARRAY_SUFFIXES:
        return "array"
    return "unknown"


def expand(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and directories as their files with known suffixes (sorted, recursive)."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in KNOWN_SUFFIXES))
        else:
            files.append(p)
    return files


def iter_items(files: Sequence[Path], input_rank: int | None) -> Iterator[Item]:
    """Items in order: one per image, per non-empty line of a text file, per ``.npy`` file (or per row
    when the array's rank equals the model input's, i.e. it already holds a batch)."""
    for path in files:
        if not path.is_file():
            yield Item(str(path), "missing", path)
            continue
        kind = _kind(path)
        if kind == "text":
            try:
                with path.open(encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            yield Item(f"{path}:{lineno}", "text", path, text=line.rstrip("\r\n"))
            except (OSError, UnicodeDecodeError) as exc:
                yield Item(str(path), "unknown", path, text=f"cannot read text: {exc}")
        elif kind == "array" and input_rank is not None:
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception:
                yield Item(str(path), "array", path)  # load() reports the error
                continue
            if arr.ndim == input_rank:
                for i in range(arr.shape[0]):
                    yield Item(f"{path}[{i}]", "array", path, row=i)
            else:
                yield Item(str(path), "array", path)
        else:
            yield Item(str(path), kind, path)


def load_item(item: Item) -> Any:
    """Read one raw instance (in a worker thread): image bytes, a sentence, or an array."""
    if item.kind == "missing":
        raise ProcessingError("load", f"{item.path}: no such file")
    if item.kind == "unknown":
        reason = item.text or f"unsupported file type {item.path.suffix or '(none)'!r}"
        raise ProcessingError("load", f"{item.path}: {reason}; kiln predict reads {sorted(KNOWN_SUFFIXES)}")
    if item.kind == "text":
        return item.text
    if item.kind == "image":
        return item.path.read_bytes()
    try:
        arr = np.load(item.path, mmap_mode="r" if item.row is not None else None, allow_pickle=False)
    except Exception as exc:
        raise ProcessingError("load", f"{item.path}: not a readable .npy array ({exc})") from None
    return np.array(arr[item.row]) if item.row is not None else arr


def check_fit(pipeline: Pipeline, files: Sequence[Path]) -> None:
    """Refuse up front what cannot work: images or text for a model that declares no pre-processing."""
    if pipeline.takes_raw_inputs:
        return
    raw = sorted({f.suffix for f in files if _kind(f) in ("image", "text")})
    if raw:
        raise SpecError(
            f"model {pipeline.spec.name!r} declares no pre-processing, so it takes arrays (.npy), not {raw} files; "
            "import it with preprocess steps (decode_image, resize, normalize … or tokenize)"
        )


def plan(pipeline: Pipeline, inputs: Sequence[str | Path]) -> list[Path]:
    """The files to read, after refusing what cannot work (so errors come before any output)."""
    if pipeline.spec.serving.max_batch_size == 0:
        raise SpecError(f"model {pipeline.spec.name!r} has no batch dimension; kiln predict needs one")
    files = expand(inputs)
    if not files:
        raise DataError(
            ", ".join(map(str, inputs)), f"no input files found; kiln predict reads {sorted(KNOWN_SUFFIXES)}"
        )
    check_fit(pipeline, files)
    return files


def predict_files(
    pipeline: Pipeline,
    run: Callable[[Any], Any],
    files: Sequence[Path],
    out: IO[str],
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 2,
    on_result: Callable[[Result[Item]], None] | None = None,
) -> Summary:
    """Predict every instance in ``files`` (see :func:`plan`) and write one JSON line per instance to
    ``out``: ``{"input": key, "output": ...}`` or ``{"input": key, "error": "..."}``."""
    summary = Summary()
    items = iter_items(files, input_rank(pipeline))
    for result in predict_overlapped(items, load_item, pipeline, run, batch_size, workers, prefetch):
        summary.total += 1
        record: dict[str, Any] = {"input": result.item.key}
        if result.ok:
            record["output"] = result.output
        else:
            summary.failed += 1
            summary.errors.append((result.item.key, result.error or ""))
            record["error"] = result.error
        out.write(json.dumps(record) + "\n")
        if on_result is not None:
            on_result(result)
    return summary


def input_rank(pipeline: Pipeline) -> int | None:
    """The model input's rank when instances are arrays (a ``.npy`` of that rank holds a batch)."""
    return len(pipeline.spec.inputs[0].shape) if not pipeline.takes_raw_inputs else None


def count_items(pipeline: Pipeline, files: Sequence[Path]) -> int:
    """How many instances ``files`` hold, for a progress bar (reads text files and .npy headers only)."""
    return sum(1 for _ in iter_items(files, input_rank(pipeline)))
