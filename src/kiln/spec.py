"""ModelSpec: what a model takes and gives, what it is for, and how it is served.

Stored as ``repo/<model>/model.yaml``. Every later stage reads it: the optimizer for the task metric,
engines for dtypes, the server for validation and batching.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.errors import InputError, SpecError, spec_error

Task = Literal["classification", "embedding", "detection", "generic"]
Transport = Literal["http", "grpc"]  # the wire protocols kiln serves and the bench drives
DType = Literal[
    "float32", "float16", "float64", "bfloat16",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "bool", "string",
]  # fmt: skip

# Names that the V2 protocol (and Triton) use for the same types.
V2_DATATYPES: dict[str, str] = {
    "float32": "FP32", "float16": "FP16", "float64": "FP64", "bfloat16": "BF16",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "bool": "BOOL", "string": "BYTES",
}  # fmt: skip

# A model name: what ``repository.check_model_name`` enforces wherever a name arrives (HTTP, gRPC, CLI).
MODEL_NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}"
_NAME = f"^{MODEL_NAME_PATTERN}$"


def dtype_name(dtype: np.dtype[Any] | type | str) -> str:
    """The spec's name for a numpy dtype (``object`` and unicode/bytes arrays are ``string``)."""
    dt = np.dtype(dtype)
    if dt.kind in ("O", "U", "S"):
        return "string"
    return str(dt.name)


# A Triton model-config parameter ("kiln.example_shape.<input>": "1,48") naming a shape each input was checked
# to run with: the server states it, a remote client (kiln bench --url) reads it to size dynamic dims.
EXAMPLE_SHAPE_PARAMETER = "kiln.example_shape."


class TensorSpec(BaseModel):
    """One input or output tensor. ``-1`` in ``shape`` marks a dynamic dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    dtype: DType
    shape: tuple[int, ...]
    example_shape: tuple[int, ...] | None = Field(
        default=None, repr=False,
        description="a shape the model runs with (batch 1), for inputs with dynamic dims besides batch: what "
        "random inputs use (import check, bench and optimize without data); chosen at import or set with --dim",
    )  # fmt: skip

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        for d in shape:
            if d == 0 or d < -1:
                raise ValueError(f"dimension {d} is invalid: use a positive size, or -1 for a dynamic one")
        return shape

    @model_validator(mode="after")
    def _example_fits(self) -> TensorSpec:
        ex = self.example_shape
        if ex is not None and (
            len(ex) != len(self.shape)
            or any(e < 1 or (d != -1 and e != d) for d, e in zip(self.shape, ex, strict=True))
        ):
            raise ValueError(
                f"example_shape {list(ex)} does not fit shape {_fmt(self.shape)}: give a positive size for every "
                "dim, equal to the fixed ones"
            )
        return self

    def __eq__(self, other: object) -> bool:
        """The signature (name, dtype, shape): the example shape is a hint for random inputs, so a new version
        with other example sizes keeps the model's signature."""
        if not isinstance(other, TensorSpec):
            return NotImplemented
        return (self.name, self.dtype, self.shape) == (other.name, other.dtype, other.shape)

    def __hash__(self) -> int:
        return hash((self.name, self.dtype, self.shape))

    def sample_shape(self, batch: int, default: int = 8) -> list[int]:
        """The shape of a random input: the batch dim (a dynamic axis 0) at ``batch``, other dynamic dims at
        the example shape's sizes, else at ``default``."""
        ex = self.example_shape
        return [batch if i == 0 and d == -1 else d if d != -1 else ex[i] if ex is not None else default
                for i, d in enumerate(self.shape)]  # fmt: skip

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(object) if self.dtype == "string" else np.dtype(self.dtype)

    @property
    def datatype(self) -> str:
        return V2_DATATYPES[self.dtype]


class ProcessingStep(BaseModel):
    """One pre- or post-processing op, found by name in ``kiln.processing``'s registry."""

    model_config = ConfigDict(extra="forbid")

    op: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)


class RayServing(BaseModel):
    """How ``kiln serve --ray`` runs this model on Ray Serve: its replicas and their autoscaling."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0, description="replicas kept however idle the model is")
    max_replicas: int = Field(default=2, ge=1, description="replicas autoscaling may add under load")
    initial_replicas: int | None = Field(default=None, ge=0, description="replicas at deploy; default: min")
    target_ongoing_requests: float = Field(
        default=1.0, gt=0, description="batches in flight per replica autoscaling aims for (the ingress batches)"
    )
    upscale_delay_s: float = Field(default=2.0, ge=0, description="load held this long before a replica is added")
    downscale_delay_s: float = Field(default=30.0, ge=0, description="idle this long before a replica is removed")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs Ray reserves per replica")
    engine_threads: int | None = Field(
        default=None, ge=1, description="intra-op threads per replica; default: num_cpus"
    )
    max_replicas_per_node: int | None = Field(default=None, ge=1, description="spread replicas over nodes")
    multiplex: bool = Field(
        default=False, description="share replicas with the repository's other multiplexed models (Ray Serve "
        "model multiplexing) instead of replicas of its own; the replica settings of kiln-shared apply",
    )  # fmt: skip

    @model_validator(mode="after")
    def _bounds(self) -> RayServing:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"initial_replicas {initial} must lie in min_replicas..max_replicas")
        return self


class ServingSettings(BaseModel):
    """How the server batches and limits this model."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=0, description="0 disables batching (the model has no batch dim)")
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_delay_us: int = Field(default=0, ge=0)
    max_queue_size: int = Field(default=256, ge=1)
    dynamic_batching: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="merge requests into batches: auto, requests queued behind a busy engine merge (free where "
        "rows/s is flat, a gain where it rises), but a batch waits (max_queue_delay_us) only for the rows the "
        "batch-size curve measured at load shows pay on this machine; on, waits for the preferred or maximum "
        "size whatever it measures; off, each request runs as sent",
    )
    instances: int = Field(default=1, ge=1)
    response_cache: bool = False
    version_policy: Literal["latest", "all", "specific"] = Field(
        default="latest", description="which versions the server loads: the latest N, all, or the listed ones"
    )
    num_versions: int = Field(default=1, ge=1, description="N for version_policy 'latest'")
    versions: list[int] = Field(default_factory=list, description="the versions for version_policy 'specific'")
    timeout_ms: int | None = Field(default=None, ge=1, description="per-request timeout; default: the server's")
    warmup: bool = Field(default=True, description="run a batch at load, before the model reports ready")
    fallback_after: int = Field(
        default=3, ge=1, description="consecutive failures of the chosen variant before staying on the reference"
    )
    fallback: bool = Field(
        default=True,
        description="load the reference fp32 variant beside the chosen one and rerun a failed batch on it",
    )
    queue_budget_ms: float | None = Field(
        default=None,
        gt=0,
        description="the longest wait a request without a timeout of its own may face: one whose expected wait "
        "is longer is refused at once (503, Retry-After). Default: 16 batch-1 service times as measured for "
        "a burst (at least 10 ms), 3 while demand outruns the engine (at least 2 ms)",
    )
    compute_timeout_ms: int | None = Field(
        default=None,
        ge=1,
        description="a batch that runs longer is answered 503 and the model reloads (a process instance is "
        "killed); default: the request timeout",
    )
    unhealthy_after: int = Field(
        default=5, ge=1, description="failed batches in a row (after any fallback) before the model is marked "
        "not ready and reloaded",
    )  # fmt: skip
    ray: RayServing = Field(default_factory=RayServing, description="replicas and autoscaling under --ray")

    @model_validator(mode="after")
    def _preferred(self) -> ServingSettings:
        bad = [b for b in self.preferred_batch_sizes if b < 1 or (self.max_batch_size and b > self.max_batch_size)]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} must lie in 1..max_batch_size ({self.max_batch_size})")
        if self.version_policy == "specific" and not self.versions:
            raise ValueError("version_policy 'specific' needs the list of versions to serve, e.g. versions: [1, 3]")
        return self


class InputCheck:
    """A spec's input rules precomputed for the hot path: a feed that satisfies them passes in a few
    attribute reads per tensor; anything else goes through :meth:`ModelSpec.validate_inputs`, which
    raises the error naming the tensor. Build one per loaded model (the spec must not change after)."""

    __slots__ = ("_batched", "_rules", "_spec")

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._batched = spec.serving.max_batch_size != 0
        self._rules = tuple(
            (t.name, None if t.dtype == "string" else t.numpy_dtype, len(t.shape),
             tuple((axis, d) for axis, d in enumerate(t.shape) if d != -1))
            for t in spec.inputs
        )  # fmt: skip

    def passes(self, inputs: Mapping[str, Any], max_batch: int | None = None) -> bool:
        """Whether ``inputs`` satisfy the spec (False says nothing of why: validate for the error)."""
        if (type(inputs) is not dict and not isinstance(inputs, Mapping)) or len(inputs) != len(self._rules):
            return False
        batch = -1
        for name, dtype, rank, fixed in self._rules:
            arr = inputs.get(name)
            if type(arr) is not np.ndarray or dtype is None or arr.dtype != dtype or arr.ndim != rank:
                return False
            shape = arr.shape
            for axis, d in fixed:
                if shape[axis] != d:
                    return False
            if self._batched and rank:
                if batch == -1:
                    batch = shape[0]
                elif shape[0] != batch:
                    return False
        return max_batch is None or batch <= max_batch

    def __call__(self, inputs: Mapping[str, Any], max_batch: int | None = None) -> None:
        """Return when ``inputs`` are valid, else raise the :class:`InputError` that names the tensor."""
        if not self.passes(inputs, max_batch):
            self._spec.validate_inputs(inputs, max_batch)


class LargeBatchChoice(BaseModel):
    """The variant that runs batches of at least ``from_rows`` rows, when it is faster there than the chosen
    one (ONNX Runtime's int8 at batch 1, OpenVINO's at 16, say): measured and set by ``kiln optimize``."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    from_rows: int = Field(ge=2)


class ModelSpec(BaseModel):
    """A model's contract: tensors, task, labels, processing and serving settings."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    task: Task = "generic"
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] | None = None
    description: str = ""
    preprocess: list[ProcessingStep] = Field(default_factory=list)
    postprocess: list[ProcessingStep] = Field(default_factory=list)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    chosen_variant: str | None = Field(default=None, description="set by `kiln optimize`; used by default")
    chosen_large: LargeBatchChoice | None = Field(
        default=None, description="set by `kiln optimize` when another variant runs large batches faster"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ModelSpec:
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            names = [t.name for t in tensors]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique; repeated: {dupes}")
        return self

    # ---- I/O -------------------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=False)
        for t in data["inputs"] + data["outputs"]:
            t["shape"] = list(t["shape"])
            if t.get("example_shape") is None:
                t.pop("example_shape", None)  # most tensors have none: keep model.yaml as it was
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "the spec") -> ModelSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # its text spans lines (a caret under a quote of the line): one line here
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise SpecError(f"{source} is not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{source} must hold a mapping of spec fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise spec_error(exc, f"{source} is not a valid model spec:", empty="spec") from None

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SpecError(f"{path} is missing: every model directory needs its model.yaml") from None
        return cls.from_yaml(text, source=str(path))

    # ---- request validation ----------------------------------------------------------------------------
    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise InputError(name, "name", f"one of {[t.name for t in self.inputs]}", repr(name))

    def validate_inputs(self, inputs: Mapping[str, Any], max_batch: int | None = None) -> None:
        """Check names, dtypes, rank and fixed dimensions; raise :class:`InputError` naming the tensor.

        With ``max_batch`` (the server passes its limit) the shared batch dimension is bounded too.
        """
        expected = {t.name for t in self.inputs}
        for name in inputs:
            if name not in expected:
                raise InputError(name, "name", f"one of {sorted(expected)}", repr(name), "unknown input")
        batch: int | None = None
        for t in self.inputs:
            if t.name not in inputs:
                raise InputError(t.name, "presence", "given", "missing", f"the model needs inputs {sorted(expected)}")
            arr = inputs[t.name]
            if not isinstance(arr, np.ndarray):
                raise InputError(t.name, "type", "a numpy array", type(arr).__name__)
            got = dtype_name(arr.dtype)
            if got != t.dtype:
                raise InputError(t.name, "dtype", t.dtype, got, f"convert with .astype('{t.dtype}')")
            if arr.ndim != len(t.shape):
                raise InputError(
                    t.name,
                    "rank",
                    f"{len(t.shape)} (shape {_fmt(t.shape)})",
                    f"{arr.ndim} (shape {_fmt(arr.shape)})",
                )
            for axis, (want, have) in enumerate(zip(t.shape, arr.shape, strict=True)):
                if want != -1 and want != have:
                    raise InputError(
                        t.name,
                        f"dimension {axis}",
                        want,
                        f"{have} (shape {_fmt(arr.shape)}, expected {_fmt(t.shape)})",
                    )
            if self.serving.max_batch_size and arr.ndim:
                if batch is not None and arr.shape[0] != batch:
                    raise InputError(t.name, "batch size", f"{batch} like the other inputs", arr.shape[0])
                batch = arr.shape[0]
                if max_batch is not None and batch > max_batch:
                    raise InputError(t.name, "batch size", f"at most {max_batch}", batch)


def _fmt(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join("?" if d == -1 else str(d) for d in shape) + "]"
