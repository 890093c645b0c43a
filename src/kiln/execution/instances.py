"""What one instance of a served model runs batches on: the chosen variant, with the reference fp32
variant as a fallback, in this process (engines that release the GIL) or in a child process.

When the chosen variant raises, the batch is rerun on the reference; the failure is logged and
counted, and after ``fallback_after`` consecutive failures the model version stays on the reference
until it is reloaded. The reference is loaded and warmed with the model (in the loading thread, never
on the event loop), once for all instances where its engine can run batches from several threads at
once, and counted in the model's memory.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from kiln.engines.base import engine_modules
from kiln.execution.errors import InstanceExitedError
from kiln.predictor import Predictor, open_variant
from kiln.repository import Variant
from kiln.spec import ModelSpec, ServingSettings

log = logging.getLogger("kiln.serving")
Outputs = dict[str, np.ndarray]


class FallbackState:
    """Shared by the instances of one model version: counts failures and latches the fallback."""

    def __init__(self, fallback_after: int) -> None:
        self.fallback_after = fallback_after
        self.consecutive = 0
        self.total = 0
        self.latched = False
        self._lock = threading.Lock()

    def failed(self) -> bool:
        """Record a failure; True when the model now stays on the fallback."""
        with self._lock:
            self.consecutive += 1
            self.total += 1
            if self.consecutive >= self.fallback_after:
                self.latched = True
            return self.latched

    def succeeded(self) -> None:
        if self.consecutive:
            with self._lock:
                self.consecutive = 0


class ModelRunner:
    """Runs a batch on ``primary``; on failure reruns it on ``reference`` (already loaded, maybe shared).

    ``owns_reference``: whether :meth:`close` closes the reference (one of the instances sharing it does).
    """

    def __init__(
        self,
        primary: Any,
        reference: Any | None,
        state: FallbackState,
        label: str,
        on_fallback: Callable[[], None] | None = None,
        owns_reference: bool = True,
    ) -> None:
        self.primary = primary  # anything with run(dict) -> dict and close()
        self.reference = reference
        self.owns_reference = owns_reference
        self.state = state
        self.label = label
        self._on_fallback = on_fallback

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        if self.state.latched and self.reference is not None:
            return self.reference.run(inputs)
        try:
            out = self.primary.run(inputs)
        except Exception as exc:
            if self.reference is None:
                raise
            try:
                out = self.reference.run(inputs)
            except Exception:
                raise exc from None  # both refuse it: the inputs are at fault, not the chosen variant
            latched = self.state.failed()  # counted only when the reference runs what the chosen one could not
            log.error(
                "chosen variant of %s failed; reran the batch on the reference fp32 variant%s",
                self.label,
                " (from now on, until reloaded)" if latched else "",
                exc_info=exc,
                extra={"model": self.label, "consecutive_failures": self.state.consecutive},
            )
            if self._on_fallback is not None:
                self._on_fallback()
            return out
        self.state.succeeded()
        return out

    async def run_async(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        """:meth:`run` awaited, for a primary that can be (a Ray Serve handle; its replicas fall back themselves,
        so there is no reference here)."""
        out: Outputs = await self.primary.run_async(inputs)
        self.state.succeeded()
        return out

    def abort(self) -> None:
        """Stop a hung run where the instance can be stopped (a process): see :meth:`ProcessEngine.abort`."""
        for engine in (self.primary, self.reference):
            abort = getattr(engine, "abort", None)
            if abort is not None:
                abort()

    def close(self) -> None:
        if self.primary is not None:
            self.primary.close()
        if self.reference is not None and self.owns_reference:
            self.reference.close()
        self.primary = None
        self.reference = None


def warmup_inputs(spec: ModelSpec, rows: int = 1) -> dict[str, np.ndarray]:
    """Zero (or empty-string) inputs of the spec's shape, ``rows`` in the batch and other dynamic dims at the
    model's example shape (found at import: a stride-32 network may not run at 1), else 1."""
    batched = spec.serving.max_batch_size > 0
    feed: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = t.sample_shape(rows if batched else 1, default=1)
        if t.dtype == "string":
            feed[t.name] = np.full(shape, "", dtype=object)
        else:
            feed[t.name] = np.zeros(shape, dtype=t.numpy_dtype)
    return feed


def warmup_sizes(s: ServingSettings) -> list[int]:
    """Batch sizes to warm: 1, the largest preferred size and ``max_batch_size`` (the shapes batches reach),
    and with ``dynamic_batching: auto`` the powers of two between, which trace the batch-size curve."""
    sizes = {1}
    if s.max_batch_size > 0:
        sizes.add(s.max_batch_size)
        if s.preferred_batch_sizes:
            sizes.add(max(s.preferred_batch_sizes))
        if s.dynamic_batching == "auto":
            sizes.update(2**i for i in range(1, s.max_batch_size.bit_length()) if 2**i < s.max_batch_size)
    return sorted(sizes)


_TIMED_RUNS = 3  # warm runs timed per size on the first instance (the fastest counts: the others saw noise)
_TIMED_MIN_S = 0.03  # ... and more, up to 5 in all, while they take less than this together (a noisy machine)


def warm_up(runners: Sequence[ModelRunner], spec: ModelSpec) -> dict[int, float]:
    """Run each instance, and each reference once, at every warm-up size; the first instance's warm time
    per size in seconds (the fastest of a few warm runs), which seeds the batcher's estimates and, under
    ``dynamic_batching: auto``, how far it merges requests."""
    sizes = warmup_sizes(spec.serving)
    engines: list[Any] = []
    for r in runners:
        engines.append(r.primary)
        if r.reference is not None and all(r.reference is not e for e in engines):
            engines.append(r.reference)
    times: dict[int, float] = {}
    for engine in engines:
        for rows in sizes:
            feed = warmup_inputs(spec, rows)
            engine.run(feed)
            if engine is runners[0].primary:
                spent, runs = 0.0, 0
                while runs < _TIMED_RUNS or (runs < 5 and spent < _TIMED_MIN_S):
                    t0 = time.perf_counter()
                    engine.run(feed)
                    took = time.perf_counter() - t0
                    times[rows] = min(times.get(rows, took), took)
                    spent, runs = spent + took, runs + 1
    return times


# ---- instances -------------------------------------------------------------------------------------------
def shareable(engine: Any) -> bool:
    """Whether the instances of a model version may share one loaded copy of ``engine``."""
    return bool(getattr(engine, "concurrent_runs", False)) and bool(engine.releases_gil)


@dataclass
class Instances:
    """What :func:`open_instances` loaded for one model version."""

    runners: list[ModelRunner]
    variant: str  # the variant served: an id, or 'reference'
    engine: str  # the engine running it (a name in the engines registry)
    reference_engine: str | None  # the fallback's engine; None when the reference itself is served
    reference_copies: int  # 0, 1 (shared by the instances) or one per instance
    fallback: FallbackState


def open_instances(
    served: Variant, reference: Variant, threads: int, on_fallback: Callable[[], None] | None = None
) -> Instances:
    """Load ``spec.serving.instances`` instances of the ``served`` variant and, when that is not the
    reference, the ``reference`` to fall back on. Slow: call it from a worker thread."""
    s = served.spec.serving
    name, version = served.model, served.version
    first = open_instance(served, threads, process=False)
    primaries = [first]
    references: list[Any] = []
    try:
        engine = first.predictor.engine.name
        in_process = first.predictor.engine.releases_gil or s.instances == 1
        if not in_process:
            first.close()
            primaries = []
        while len(primaries) < s.instances:
            primaries.append(open_instance(served, threads, process=not in_process))
        reference_engine = None
        if not served.is_reference and s.fallback:
            ref = open_instance(reference, threads, process=False)
            references.append(ref)
            reference_engine = ref.predictor.engine.name
            if shareable(ref.predictor.engine):
                references = [ref] * s.instances
            elif ref.predictor.engine.releases_gil or s.instances == 1:
                while len(references) < s.instances:
                    references.append(open_instance(reference, threads, process=False))
            else:  # a reference that holds the GIL: one child process per instance, like the chosen variant
                ref.close()
                references = []
                while len(references) < s.instances:
                    references.append(open_instance(reference, threads, process=True))
    except BaseException:
        for e in [*primaries, *{id(r): r for r in references}.values()]:
            e.close()
        raise
    state = FallbackState(s.fallback_after)
    label = f"{name}:{version}"
    runners = []
    for i, inst in enumerate(primaries):
        ref = references[i] if references else None
        owns = ref is not None and all(ref is not references[j] for j in range(i))
        runners.append(ModelRunner(inst, ref, state, label, on_fallback, owns_reference=owns))
    copies = len({id(r) for r in references})
    return Instances(runners, first.variant, engine, reference_engine, copies, state)


class InProcessEngine:
    """A predictor's engine, called directly (for engines that release the GIL)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.variant = predictor.variant
        self.spec = predictor.spec

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        return self.predictor.engine.run(inputs)

    def close(self) -> None:
        self.predictor.close()


class ProcessEngine:
    """The same model loaded in a child process, for engines that hold the GIL while they run.

    Arrays cross the pipe pickled (protocol 5); the child answers ``("ok", outputs)`` or ``("err", exc)``.
    A child that dies (killed, out of memory, a crash in the engine) fails the run it held at once with
    :class:`InstanceExitedError`, and the next run starts a fresh child. :meth:`abort` kills a hung one.
    """

    def __init__(self, variant: Variant, threads: int) -> None:
        self._args = (variant, threads)
        self.model = variant.model
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._spawn()

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_child_main, args=(child, *self._args, engine_modules()), daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, conn
        try:
            status, payload = conn.recv()
        except EOFError:
            self.close()
            raise InstanceExitedError(self.model, proc.exitcode) from None
        if status != "ok":
            self.close()
            raise payload
        self.variant, self.spec = payload

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._respawn()
            assert self._conn is not None
            try:
                self._conn.send(dict(inputs))
                status, payload = self._conn.recv()
            except (EOFError, OSError):  # the child died with the run: fail it now, restart at the next one
                self._proc.join(5)
                code = self._proc.exitcode
                log.error("the process instance of model %s exited (code %s); restarting it", self.model, code)
                raise InstanceExitedError(self.model, code) from None
        if status != "ok":
            raise payload
        out: Outputs = payload
        return out

    def _respawn(self) -> None:
        self._close_conn()
        self._spawn()

    def abort(self) -> None:
        """Kill the child (a hung run): the run it held fails with :class:`InstanceExitedError`."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._close_conn()


def _child_main(conn: Connection, variant: Variant, threads: int, modules: Sequence[str] = ()) -> None:
    try:
        for module in modules:  # engines registered in the parent (plug-ins) are registered here too
            importlib.import_module(module)
        predictor = open_variant(variant, threads=threads)
    except BaseException as exc:
        conn.send(("err", exc))
        return
    conn.send(("ok", (predictor.variant, predictor.spec)))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        try:
            conn.send(("ok", predictor.engine.run(msg)))
        except BaseException as exc:
            conn.send(("err", exc))
    predictor.close()


def open_instance(variant: Variant, threads: int, process: bool) -> Any:
    """Load one instance of ``variant``, in this process or in a child process."""
    if process:
        return ProcessEngine(variant, threads)
    return InProcessEngine(open_variant(variant, threads=threads))


__all__ = [
    "FallbackState",
    "InProcessEngine",
    "Instances",
    "ModelRunner",
    "ProcessEngine",
    "open_instance",
    "open_instances",
    "warm_up",
    "warmup_sizes",
]
