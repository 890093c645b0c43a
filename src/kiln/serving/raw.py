"""Raw inputs: images, texts and numeric instances in, through the model's declared processing.

Two front doors share this module, and both go through :meth:`Service.infer` (validation, cache, the
dynamic batcher, the timeout and the bounded queue) exactly like a tensor request:

- KServe V1: ``POST /v1/models/{m}:predict`` with ``{"instances": [...]}`` answers
  ``{"predictions": [...]}``. Images are ``{"b64": "..."}``, texts are strings, and for a model without
  pre-processing an instance is a nested list (or ``{input: nested list}`` for several inputs) of the
  spec's shape without the batch dim; the instances are stacked along it.
- V2 BYTES: a model whose spec declares pre-processing also takes one BYTES input named ``raw`` of
  shape ``[n]`` (one element per instance: encoded image bytes, or UTF-8 text), sent alone, and answers
  the BYTES output ``predictions`` of shape ``[n]``: each element one instance's post-processed result
  as a JSON document. The model's tensor outputs may be asked for by name beside it. Like a Triton
  ensemble's front model, the metadata lists ``raw`` and ``predictions`` next to the tensors, and the
  model configuration marks every input optional; tensor requests work unchanged.

Pre- and post-processing run in the server's processing thread pool, never on the event loop, and
never while holding an engine instance: instances are decoded while the engine runs other batches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ProcessingError, ProtocolError
from kiln.processing.pipeline import Pipeline
from kiln.processing.registry import Batch
from kiln.serving.protocol import numbers_from_json
from kiln.spec import ModelSpec, TensorSpec

RAW_INPUT = "raw"
PREDICTIONS = "predictions"


@dataclass(eq=False)
class RawModel:
    """A served model's processing: its pipeline and the spec V2 requests are decoded against."""

    spec: ModelSpec
    pipeline: Pipeline
    wire_spec: ModelSpec  # the spec plus ``raw`` in and ``predictions`` out when it takes raw inputs
    keep_bytes: frozenset[str]  # BYTES inputs decoded as bytes, not text
    takes_text: bool  # the first step reads text (tokenize), not encoded bytes (decode_image)

    @classmethod
    def build(cls, spec: ModelSpec, root: Path | None) -> RawModel:
        pipeline = Pipeline.from_spec(spec, root=root)
        wire = wire_spec(spec)
        if wire is None:
            return cls(spec, pipeline, spec, frozenset(), False)
        first = pipeline.instance_ops[0] if pipeline.instance_ops else pipeline.collate_op
        takes_text = first is not None and first.name == "tokenize"
        return cls(spec, pipeline, wire, frozenset({RAW_INPUT}), takes_text)

    @property
    def takes_raw(self) -> bool:
        """Whether V2 requests may carry the ``raw`` BYTES input."""
        return RAW_INPUT in self.keep_bytes

    # ---- instances from the wire ---------------------------------------------------------------------------
    def instances_from_tensor(self, arr: np.ndarray) -> list[Any]:
        """The elements of a V2 ``raw`` tensor (``[n]``, or ``[n, 1]``) as instances."""
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1 or arr.shape[0] == 0:
            raise ProtocolError(
                f"input {RAW_INPUT!r}: shape",
                f"must be [n] with n >= 1 (one element per instance), got {list(arr.shape)}",
            )
        return list(arr)

    # ---- the two halves that run in the processing pool ----------------------------------------------------
    def preprocess(self, instances: Sequence[Any]) -> Batch:
        """Raw instances (as JSON or V2 elements) -> the engine's input arrays; errors name the instance."""
        if self.spec.serving.max_batch_size == 0:
            return self._unbatched(instances)
        values = [self._instance(x, i) for i, x in enumerate(instances)]
        return self.pipeline.collate([self.pipeline.preprocess_instance(v, i) for i, v in enumerate(values)])

    def postprocess(self, outputs: Mapping[str, np.ndarray], batch: Batch) -> list[Any]:
        """One JSON-able prediction per instance: the post-processing result, else the output rows
        (the row itself for a one-output model, ``{output: row}`` for several)."""
        if self.pipeline.post_ops:
            return self.pipeline.postprocess(outputs, batch)
        if self.spec.serving.max_batch_size == 0:
            return [_rows(outputs, None)]
        return [_rows(outputs, i) for i in range(len(batch))]

    def _instance(self, x: Any, index: int) -> Any:
        if self.pipeline.takes_raw_inputs:
            if self.takes_text and isinstance(x, bytes):
                try:
                    return x.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProcessingError("tokenize", "the text is not valid UTF-8", index=index) from None
            return x
        specs = {t.name: t for t in self.spec.inputs}
        if isinstance(x, Mapping):
            unknown = sorted(set(x) - set(specs))
            if unknown:
                raise ProcessingError(
                    "instances", f"{unknown[0]!r} is not an input of the model; its inputs are {sorted(specs)}", index
                )
            return {k: _array(v, index, specs[k]) for k, v in x.items()}
        if len(specs) != 1:
            raise ProcessingError(
                "instances", f"the model takes inputs {sorted(specs)}; give each instance as a dict of them", index
            )
        return _array(x, index, self.spec.inputs[0], "instance")

    def _unbatched(self, instances: Sequence[Any]) -> Batch:
        if self.pipeline.takes_raw_inputs:
            raise ProtocolError(
                "instances", f"model {self.spec.name!r} has no batch dimension; raw instances need a batched model"
            )
        if len(instances) != 1:
            raise ProtocolError(
                "instances", f"model {self.spec.name!r} has no batch dimension: send exactly one instance"
            )
        value = self._instance(instances[0], 0)
        if not isinstance(value, Mapping):
            if len(self.spec.inputs) != 1:
                raise ProcessingError("collate", "the model takes several inputs; give the instance as a dict", 0)
            value = {self.spec.inputs[0].name: value}
        inputs: dict[str, np.ndarray] = {}
        for t in self.spec.inputs:
            if t.name not in value:
                raise ProcessingError("collate", f"missing input {t.name!r}", index=0)
            arr = value[t.name]
            if not np.can_cast(arr.dtype, t.numpy_dtype, "same_kind"):
                raise ProcessingError("collate", f"input {t.name!r} must be {t.dtype}, got {arr.dtype}", index=0)
            inputs[t.name] = arr.astype(t.numpy_dtype, copy=False)
        return Batch(inputs, [{}])


def wire_spec(spec: ModelSpec) -> ModelSpec | None:
    """The spec V2 clients see when the model takes raw inputs: ``raw`` in and ``predictions`` out added.

    None for a model without pre-processing, or one whose own tensors already use those names (its raw
    inputs then come through V1 only).
    """
    names = {t.name for t in spec.inputs} | {t.name for t in spec.outputs}
    if not spec.preprocess or names & {RAW_INPUT, PREDICTIONS}:
        return None
    return spec.model_copy(
        update={
            "inputs": [*spec.inputs, TensorSpec(name=RAW_INPUT, dtype="string", shape=(-1,))],
            "outputs": [*spec.outputs, TensorSpec(name=PREDICTIONS, dtype="string", shape=(-1,))],
        }
    )


def parse_instances(doc: Any) -> list[Any]:
    """The ``instances`` of a V1 predict body."""
    if not isinstance(doc, dict):
        raise ProtocolError("body", f"must be a JSON object with 'instances', got {type(doc).__name__}")
    instances = doc.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ProtocolError("instances", 'must be a non-empty list, e.g. {"instances": [{"b64": "..."}]}')
    return instances


def predictions_tensor(predictions: Sequence[Any]) -> np.ndarray:
    """The V2 ``predictions`` output: one JSON document per instance, as a BYTES tensor."""
    return np.array([json.dumps(p, separators=(",", ":")) for p in predictions], dtype=object)


def _array(x: Any, index: int, spec: TensorSpec, what: str | None = None) -> np.ndarray:
    """One instance's value for input ``spec``, held to its datatype as V2 JSON is: strings for a string
    input, true/false for bool, integers for integer types, numbers for floats; never converted."""
    what = what or f"input {spec.name!r}"
    if isinstance(x, dict):
        raise ProcessingError(
            "instances", f"{what} must be a nested list; this model declares no pre-processing", index
        )
    if spec.dtype == "string":
        bad = [v for v in _leaves(x) if not isinstance(v, str)]
        if bad:
            raise ProcessingError(
                "instances", f"{what} is a string input: it takes strings only, got {type(bad[0]).__name__}", index
            )
        try:
            return np.asarray(x).astype(object)
        except (ValueError, TypeError) as exc:
            raise ProcessingError("instances", f"{what} is not a rectangular array of strings ({exc})", index) from None
    if isinstance(x, (str, bytes)):
        raise ProcessingError(
            "instances", f"{what} must be numbers (a nested list); this model declares no pre-processing", index
        )
    try:
        arr = numbers_from_json(spec.name, x if isinstance(x, list) else [x], spec.numpy_dtype)
        return arr if isinstance(x, list) else arr.reshape(())
    except ProtocolError as exc:
        raise ProcessingError("instances", f"{what} {exc.problem}", index) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ProcessingError("instances", f"{what} is not a rectangular array of numbers ({exc})", index) from None


def _leaves(x: Any) -> list[Any]:
    stack, out = [x], []
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            out.append(v)
    return out


def _rows(outputs: Mapping[str, np.ndarray], i: int | None) -> Any:
    rows = {k: _plain(v if i is None else v[i]) for k, v in outputs.items()}
    return next(iter(rows.values())) if len(rows) == 1 else rows


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            return [_plain(x) for x in v]
        return v.tolist()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


__all__ = ["PREDICTIONS", "RAW_INPUT", "RawModel", "parse_instances", "predictions_tensor", "wire_spec"]
