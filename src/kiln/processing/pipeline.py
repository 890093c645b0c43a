"""The pipeline a spec declares: raw instances -> input arrays -> engine -> JSON-able results.

The server and ``kiln predict`` use it the same way::

    pipe = Pipeline.from_spec(spec, root=version_dir)
    batch = pipe.preprocess(instances)            # raises ProcessingError naming the bad instance
    outputs = engine.run(batch.inputs)
    results = pipe.postprocess(outputs, batch)     # one JSON-able value per instance

``preprocess_instance`` and ``collate`` split ``preprocess`` so that a caller can run the per-instance
part in worker threads and skip bad instances instead of failing the whole batch.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError, ProcessingError
from kiln.processing.registry import Batch, CollateOp, InstanceOp, OpContext, PostOp, build, check_steps
from kiln.spec import ModelSpec, ProcessingStep, TensorSpec


@dataclass
class Prepared:
    """One instance after the per-instance steps: its value and its meta record."""

    value: Any
    meta: dict[str, Any]


class Pipeline:
    """Pre- and post-processing built from a spec's ``preprocess``/``postprocess`` steps. Thread-safe:
    ops hold no per-call state, so one pipeline serves every worker."""

    def __init__(
        self,
        spec: ModelSpec,
        instance_ops: list[InstanceOp],
        collate_op: CollateOp | None,
        post_ops: list[PostOp],
    ) -> None:
        self.spec = spec
        self.instance_ops = instance_ops
        self.collate_op = collate_op
        self.post_ops = post_ops

    @classmethod
    def from_spec(cls, spec: ModelSpec, root: str | Path | None = None) -> Pipeline:
        """Build every op (reading files such as a ``tokenizer.json`` relative to ``root``)."""
        check_steps(spec.preprocess, spec.postprocess)
        context = OpContext(spec, Path(root) if root is not None else None)
        instance_ops: list[InstanceOp] = []
        collate_op: CollateOp | None = None
        for i, step in enumerate(spec.preprocess):
            op = build(step, f"preprocess step {i}", context)
            if isinstance(op, CollateOp):
                collate_op = op
            elif isinstance(op, InstanceOp):
                instance_ops.append(op)
        post_ops = [build(s, f"postprocess step {i}", context) for i, s in enumerate(spec.postprocess)]
        return cls(spec, instance_ops, collate_op, [op for op in post_ops if isinstance(op, PostOp)])

    @property
    def takes_raw_inputs(self) -> bool:
        """Whether the spec declares pre-processing (raw images or text in) rather than tensors."""
        return bool(self.instance_ops) or self.collate_op is not None

    @property
    def sorts_by_length(self) -> bool:
        """Whether batches should hold instances of similar :meth:`length` (text, padded to a batch's
        longest sentence); images and arrays stack at one shape and keep their order."""
        return self.collate_op is not None and self.collate_op.sorts_by_length

    def length(self, value: Any) -> int:
        """The sort key of a prepared instance's value (a sentence's token count); see :attr:`sorts_by_length`."""
        return self.collate_op.length(value) if self.collate_op is not None else 0

    # ---- pre-processing --------------------------------------------------------------------------------
    def preprocess_instance(self, raw: Any, index: int = 0) -> Prepared:
        """Run the per-instance steps on one raw instance; errors name ``index`` and the failing op."""
        meta: dict[str, Any] = {}
        value = raw
        for op in self.instance_ops:
            try:
                value = op(value, meta)
            except KilnError:
                raise
            except (ValueError, TypeError, OSError) as exc:
                raise ProcessingError(op.name, str(exc), index=index) from None
        if self.collate_op is None and self.spec.serving.max_batch_size:
            self._check_instance(value, index)
        return Prepared(value, meta)

    def _check_instance(self, value: Any, index: int) -> None:
        """An instance must fit the spec's input shape without the batch dim (rank and fixed sizes)."""
        if isinstance(value, Mapping):
            items = [(t, value.get(t.name)) for t in self.spec.inputs]
        elif len(self.spec.inputs) == 1:
            items = [(self.spec.inputs[0], value)]
        else:
            return  # stack_instances explains that several inputs need a dict
        for t, v in items:
            if v is None:
                continue
            shape = np.shape(v)
            want = t.shape[1:]
            if len(shape) != len(want) or any(w not in (-1, s) for w, s in zip(want, shape, strict=True)):
                raise ProcessingError(
                    "collate",
                    f"input {t.name!r} instances must have shape {_fmt(want)} (the spec's shape without the batch "
                    f"dim), got {list(shape)}",
                    index=index,
                )

    def collate(self, prepared: Sequence[Prepared]) -> Batch:
        """Turn prepared instances into the engine's input arrays."""
        if not prepared:
            raise ProcessingError("collate", "the batch is empty")
        values = [p.value for p in prepared]
        meta = [p.meta for p in prepared]
        if self.collate_op is not None:
            return Batch(self.collate_op(values, meta), meta)
        return Batch(stack_instances(values, self.spec.inputs), meta)

    def preprocess(self, instances: Sequence[Any]) -> Batch:
        return self.collate([self.preprocess_instance(x, i) for i, x in enumerate(instances)])

    # ---- post-processing -------------------------------------------------------------------------------
    def postprocess(self, outputs: Mapping[str, np.ndarray], batch: Batch | None = None) -> list[Any]:
        """Run the post-processing steps and return one JSON-able result per instance."""
        n = len(batch) if batch is not None and len(batch) else _batch_size(outputs)
        batch = batch if batch is not None else Batch({}, [{} for _ in range(n)])
        value: Any = dict(outputs)
        for op in self.post_ops:
            value = op(value, batch)
        return to_jsonable(value, n)


def stack_instances(values: Sequence[Any], inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Stack per-instance arrays (or ``{input: array}`` dicts) into batch arrays of the spec's dtypes."""
    if all(isinstance(v, Mapping) for v in values):
        names = [t.name for t in inputs]
        for i, v in enumerate(values):
            missing = [n for n in names if n not in v]
            if missing:
                raise ProcessingError("collate", f"missing inputs {missing}", index=i)
        per_input = {t.name: [np.asarray(v[t.name]) for v in values] for t in inputs}
    else:
        if len(inputs) != 1:
            names = [t.name for t in inputs]
            raise ProcessingError("collate", f"the model takes inputs {names}; give each instance as a dict of them")
        per_input = {inputs[0].name: [np.asarray(v) for v in values]}
    out = {}
    for t in inputs:
        arrays = per_input[t.name]
        common = collections.Counter(a.shape for a in arrays).most_common(1)[0][0]
        for i, a in enumerate(arrays):
            if a.shape != common:
                raise ProcessingError(
                    "collate",
                    f"input {t.name!r} has shape {list(a.shape)} but the other instances have {list(common)}; "
                    "resize or pad instances to one shape",
                    index=i,
                )
            if a.dtype != t.numpy_dtype and not np.can_cast(a.dtype, t.numpy_dtype, "same_kind"):
                raise ProcessingError("collate", f"input {t.name!r} must be {t.dtype}, got {a.dtype}", index=i)
        out[t.name] = np.stack(arrays).astype(t.numpy_dtype, copy=False)
    return out


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d == -1 else str(d) for d in shape) + "]"


def _batch_size(outputs: Mapping[str, np.ndarray]) -> int:
    for arr in outputs.values():
        return int(np.shape(arr)[0]) if np.ndim(arr) else 1
    return 0


def to_jsonable(value: Any, n: int) -> list[Any]:
    """One JSON-able result per instance from whatever the last op returned."""
    if isinstance(value, Mapping):
        return [{k: _plain(np.asarray(v)[i]) for k, v in value.items()} for i in range(n)]
    if isinstance(value, list) and len(value) == n:
        return [_plain(v) for v in value]
    raise ProcessingError("postprocess", f"the last step returned {type(value).__name__}, not one result per instance")


def _plain(v: Any) -> Any:
    if hasattr(v, "to_json"):
        return v.to_json()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def steps(raw: Sequence[Mapping[str, Any] | ProcessingStep] | None) -> list[ProcessingStep]:
    """Steps given as dicts (``{"op": ..., "args": ...}``) or ProcessingSteps, validated."""
    return [s if isinstance(s, ProcessingStep) else ProcessingStep.model_validate(s) for s in raw or []]
