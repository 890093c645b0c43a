"""``kiln predict --ray``: the same batch prediction as :mod:`kiln.batch`, on Ray Data.

The driver plans the files (as the local path does) and builds a dataset of file references. Ray tasks
expand each file into its instances (one per image, per non-empty text line, per ``.npy`` or per row of
a ``.npy`` batch), read them and run kiln's per-instance pre-processing, so reading is spread over the
cluster and instances of varying shapes (images of different sizes) leave this stage already at the
model's fixed shape. An actor pool of ``concurrency`` engines (each loads the predictor once) collates
batches of ``batch_size``, runs the engine and post-processes. The driver streams the rows back, in
input order, and writes the same JSON lines as ``kiln predict`` without ``--ray``.

A file that cannot be read or decoded becomes an error row (reported in the summary), never the end of
the job. Every node must see the repository and the input files at the same paths (one machine, or a
shared file system).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from kiln.batch import Item, Summary, iter_items, load_item
from kiln.errors import KilnError
from kiln.processing.pipeline import Pipeline, Prepared
from kiln.processing.prefetch import Result, collate, one_line, run_collated

FEATURE = "kiln predict --ray"
READER_CPUS = 0.25  # per read-and-pre-process task; unlike the engines' share, so Ray Data keeps the stages apart


@functools.lru_cache(maxsize=8)
def _pipeline(root: str, model: str, version: int) -> Pipeline:
    """The model's pipeline, built once per worker process."""
    from kiln.repository import Repository

    repository = Repository(root)
    _, version_dir = repository.resolve(model, version)
    return Pipeline.from_spec(repository.spec(model), root=version_dir)


def _input_rank(pipeline: Pipeline) -> int | None:
    from kiln.batch import input_rank

    return input_rank(pipeline)


def expand_file(row: dict[str, Any], *, root: str, model: str, version: int) -> list[dict[str, Any]]:
    """One file reference -> its instances, each ``{"key", "item"}`` (the :class:`Item`; Ray Data carries it
    between the cluster's own workers as it carries every Python object)."""
    given, path = str(row["path"]), Path(row["absolute"])
    try:
        items = list(iter_items([path], _input_rank(_pipeline(root, model, version))))
    except Exception as exc:  # anything iter_items does not already turn into an error item
        items = [Item(str(path), "unknown", path, text=f"cannot read: {one_line(exc)}")]
    prefix = len(str(path))
    return [{"key": given + it.key[prefix:], "item": it} for it in items]


def prepare_batch(batch: dict[str, np.ndarray], *, root: str, model: str, version: int) -> dict[str, Any]:
    """Read and pre-process a batch of instances; a bad one gets its reason in ``error``."""
    pipeline = _pipeline(root, model, version)
    prepared: list[Prepared | None] = []
    errors: list[str] = []
    for i, item in enumerate(batch["item"]):
        try:
            prepared.append(pipeline.preprocess_instance(load_item(item), i))
            errors.append("")
        except Exception as exc:  # a bad file, an undecodable image: this instance only
            prepared.append(None)
            errors.append(one_line(exc))
    return {"key": list(batch["key"]), "prepared": prepared, "error": errors}


class EngineActor:
    """One engine in the actor pool: collates, runs and post-processes batches of prepared instances."""

    def __init__(
        self, root: str, model: str, version: int, engine: str | None, threads: int | None, variant: str | None
    ) -> None:
        from kiln.predictor import load
        from kiln.repository import Repository

        repository = Repository(root)
        self.predictor = load(repository, model, version=version, engine=engine, threads=threads, variant=variant)
        _, version_dir = repository.resolve(model, self.predictor.version)
        self.pipeline = Pipeline.from_spec(self.predictor.spec, root=version_dir)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-post")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keys = [str(k) for k in batch["key"]]
        errors: list[str | None] = [str(e) or None for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if e is None]
        futures: list[Future[Prepared]] = []
        for i in good:
            fut: Future[Prepared] = Future()
            fut.set_result(batch["prepared"][i])
            futures.append(fut)
        results: list[Result[str]] = [Result(k, error=e) for k, e in zip(keys, errors, strict=True)]
        if good:
            collated = collate([keys[i] for i in good], futures, self.pipeline)
            done = run_collated(collated, self.pipeline, self.predictor.predict, self.pool).result()
            for i, r in zip(good, done, strict=True):
                results[i] = r
        lines = [json.dumps(_record(r)) for r in results]
        return {"key": keys, "line": lines, "error": [r.error or "" for r in results]}


def _record(result: Result[str]) -> dict[str, Any]:
    """The JSON line of :func:`kiln.batch.predict_files`, key for key."""
    record: dict[str, Any] = {"input": result.item}
    if result.ok:
        record["output"] = result.output
    else:
        record["error"] = result.error
    return record


def _kiln_cause(exc: BaseException) -> KilnError | None:
    """The KilnError behind a Ray task or actor failure (a version or engine that cannot load …)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KilnError) and type(current).__module__.startswith("kiln"):
            return current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def predict_files_ray(
    repository_root: str | Path,
    model: str,
    version: int,
    engine: str | None,
    threads: int | None,
    files: Sequence[Path],
    sink: IO[str],
    batch_size: int = 32,
    concurrency: int = 1,
    on_result: Callable[[Result[str]], None] | None = None,
    *,
    variant: str | None = None,
    engine_cpus: float | None = None,
) -> Summary:
    """Predict every instance in ``files`` (planned by :func:`kiln.batch.plan`) on the connected Ray cluster
    and write one JSON line per instance to ``sink``, in input order. ``on_result`` gets a :class:`Result`
    per instance whose ``item`` is the instance's key (its ``output`` is left None: the line holds it).

    Each engine actor asks for ``engine_cpus`` (default: one CPU, less when ``concurrency`` engines would
    leave the readers none, which would stall the job)."""
    from kiln.ray import require_ray

    require_ray(FEATURE)  # one clear line naming the extra, not an ImportError
    import ray.data

    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be at least 1")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # kiln draws its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines would bury kiln's summary
    root = str(Path(repository_root).resolve())
    where = {"root": root, "model": model, "version": version}
    # Workers read absolute paths; keys name the files as given, like the local path.
    refs = [{"path": str(f), "absolute": str(Path(f).absolute())} for f in files]
    ds = ray.data.from_items(refs, override_num_blocks=max(1, min(len(refs), 64)))
    if engine_cpus is None:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        engine_cpus = min(1.0, max(0.05, (cpus - READER_CPUS) / concurrency))
    if engine_cpus == READER_CPUS:
        engine_cpus -= 0.01  # equal asks would fuse reading into the engine actors
    ds = ds.flat_map(expand_file, fn_kwargs=where, num_cpus=READER_CPUS)
    ds = ds.map_batches(
        prepare_batch, fn_kwargs=where, batch_size=batch_size, batch_format="numpy", num_cpus=READER_CPUS
    )
    ds = ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={**where, "engine": engine, "threads": threads, "variant": variant},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=engine_cpus,
    )
    summary = Summary()
    try:
        for row in _rows(ds):
            summary.total += 1
            error = str(row["error"]) or None
            if error is not None:
                summary.failed += 1
                summary.errors.append((str(row["key"]), error))
            sink.write(str(row["line"]) + "\n")
            if on_result is not None:
                on_result(Result(str(row["key"]), error=error))
    except Exception as exc:
        cause = _kiln_cause(exc)
        if cause is not None:
            raise cause from None
        raise
    return summary


def _rows(ds: Any) -> Iterator[dict[str, Any]]:
    yield from ds.select_columns(["key", "line", "error"]).iter_rows()


__all__ = ["EngineActor", "expand_file", "predict_files_ray", "prepare_batch"]
