"""What one instance of a served model runs batches on: the chosen variant, with the reference fp32
variant as a fallback, in this process (engines that release the GIL) or in a child process.

When the chosen variant raises, the batch is rerun on the reference; the failure is logged and
counted, and after ``fallback_after`` consecutive failures the model version stays on the reference
until it is reloaded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from kiln.predictor import REFERENCE, Predictor, load
from kiln.spec import ModelSpec

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
    """Runs a batch on ``primary``; on failure reruns it on the reference (loaded on first need)."""

    def __init__(
        self,
        primary: Any,
        load_reference: Callable[[], Any] | None,
        state: FallbackState,
        label: str,
        on_fallback: Callable[[], None] | None = None,
    ) -> None:
        self.primary = primary  # anything with run(dict) -> dict and close()
        self._load_reference = load_reference
        self._reference: Any = None
        self.state = state
        self.label = label
        self._on_fallback = on_fallback

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        if self.state.latched and self._load_reference is not None:
            return self.reference().run(inputs)
        try:
            out = self.primary.run(inputs)
        except Exception as exc:
            if self._load_reference is None:
                raise
            latched = self.state.failed()
            log.error(
                "chosen variant of %s failed; rerunning the batch on the reference fp32 variant%s",
                self.label,
                " (from now on, until reloaded)" if latched else "",
                exc_info=exc,
                extra={"model": self.label, "consecutive_failures": self.state.consecutive},
            )
            if self._on_fallback is not None:
                self._on_fallback()
            return self.reference().run(inputs)
        self.state.succeeded()
        return out

    def reference(self) -> Any:
        if self._reference is None:
            if self._load_reference is None:
                raise RuntimeError("no reference variant to fall back on")
            self._reference = self._load_reference()
        return self._reference

    def close(self) -> None:
        for e in (self.primary, self._reference):
            if e is not None:
                e.close()
        self.primary = None
        self._reference = None


def warmup_inputs(spec: ModelSpec, rows: int = 1) -> dict[str, np.ndarray]:
    """Zero (or empty-string) inputs of the spec's shape, ``rows`` in the batch and 1 in other dynamic dims."""
    batched = spec.serving.max_batch_size > 0
    feed: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = [(rows if (i == 0 and batched) else 1) if d == -1 else d for i, d in enumerate(t.shape)]
        if t.dtype == "string":
            feed[t.name] = np.full(shape, "", dtype=object)
        else:
            feed[t.name] = np.zeros(shape, dtype=t.numpy_dtype)
    return feed


# ---- instances -------------------------------------------------------------------------------------------
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
    """

    def __init__(self, repo: Path, model: str, version: int, variant: str, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main, args=(child, str(repo), model, version, variant, threads), daemon=True
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        status, payload = self._conn.recv()
        if status != "ok":
            self.close()
            raise payload
        self.variant, self.spec = payload

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        with self._lock:
            self._conn.send(dict(inputs))
            status, payload = self._conn.recv()
        if status != "ok":
            raise payload
        out: Outputs = payload
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


def _child_main(conn: Connection, repo: str, model: str, version: int, variant: str, threads: int) -> None:
    try:
        predictor = load(repo, model, version=version, variant=variant, threads=threads)
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


def open_instance(repo: Path, model: str, version: int, variant: str, threads: int, process: bool) -> Any:
    """Load one instance of ``model`` ``version`` (``variant`` 'chosen' or 'reference')."""
    if process:
        return ProcessEngine(repo, model, version, variant, threads)
    return InProcessEngine(load(repo, model, version=version, variant=variant, threads=threads))


__all__ = ["REFERENCE", "FallbackState", "InProcessEngine", "ModelRunner", "ProcessEngine", "open_instance"]
