"""Processing ops, registered by name, and the context they are built with.

A spec declares steps as ``{op: name, args: {...}}``. Each op is a class with a pydantic ``Args``
model (unknown or ill-typed arguments are spec errors) and one of three kinds:

- ``instance``: pre-processing of one raw instance (decode an image, resize, normalize …);
- ``collate``: pre-processing that turns a list of instances into the model's input arrays (tokenize
  and pad a batch of sentences); at most one, and last;
- ``post``: post-processing of a batch's outputs (softmax, top-k, box decode, NMS …).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from kiln.errors import SpecError, spec_error
from kiln.spec import ModelSpec, ProcessingStep

OpKind = Literal["instance", "collate", "post"]


class OpArgs(BaseModel):
    """Base of every op's arguments: strict about unknown names."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Batch:
    """A pre-processed batch: the engine's input arrays plus what post-processing needs to know.

    ``meta[i]`` is instance *i*'s record (original image size, letterbox scale and padding …).
    """

    inputs: dict[str, np.ndarray]
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.meta)


@dataclass(frozen=True)
class OpContext:
    """What ops may consult when they are built: the spec (labels, tensor names) and the directory that
    relative file arguments (a ``tokenizer.json``) are read from."""

    spec: ModelSpec | None = None
    root: Path | None = None

    def path(self, value: str) -> Path:
        """A step's file, relative to ``root``; with a ``root`` (a model version) it must lie inside it, so a
        ``model.yaml`` from elsewhere cannot make kiln read ``/etc/passwd`` or a file of another model."""
        if self.root is None:
            return Path(value)
        p = self.root / value
        try:
            inside = p.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError):  # a symbolic link loop
            inside = False
        if not inside:
            raise SpecError(f"processing step file {value!r} lies outside the model version; steps name the "
                            "files imported with it (--asset), relative to the version")  # fmt: skip
        return p

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.spec.inputs] if self.spec else []

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs] if self.spec else []


class Op(abc.ABC):
    """One processing step. The constructor may load small resources (a tokenizer); ops are shared by
    worker threads, so ``__call__`` must not mutate the op."""

    name: ClassVar[str]
    kind: ClassVar[OpKind]
    Args: ClassVar[type[OpArgs]] = OpArgs

    def __init__(self, args: OpArgs, context: OpContext) -> None:
        self.args = args
        self.context = context


class InstanceOp(Op):
    kind: ClassVar[OpKind] = "instance"

    @abc.abstractmethod
    def __call__(self, value: Any, meta: dict[str, Any]) -> Any:
        """Transform one instance; raise ``ValueError``/``TypeError`` with a reason for a bad one."""


class CollateOp(Op):
    kind: ClassVar[OpKind] = "collate"
    sorts_by_length: ClassVar[bool] = False
    """Whether the op pads a batch to its longest instance, so that batching instances of similar
    :meth:`length` together (as ``kiln predict`` does) saves work."""

    def length(self, value: Any) -> int:
        """A cheap size of one instance, the key batching sorts by when :attr:`sorts_by_length` is set:
        by default a string's character count (0 for anything else); ``tokenize`` counts tokens."""
        return len(value) if isinstance(value, str) else 0

    @abc.abstractmethod
    def __call__(self, values: Sequence[Any], meta: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Turn a list of instances into input arrays; raise ``ProcessingError`` naming a bad instance."""


class PostOp(Op):
    kind: ClassVar[OpKind] = "post"

    @abc.abstractmethod
    def __call__(self, value: Any, batch: Batch) -> Any:
        """Transform the outputs (first a ``{name: array}`` dict, then whatever the previous op gave)."""


_OPS: dict[str, type[Op]] = {}
_BUILTIN_MODULES = (
    "kiln.processing.image",
    "kiln.processing.text",
    "kiln.processing.post",
    "kiln.processing.detection",
)
OpT = TypeVar("OpT", bound=type[Op])


def register_op(cls: OpT) -> OpT:
    """Class decorator: make an op available to specs under its ``name``."""
    if cls.name in _OPS and _OPS[cls.name] is not cls:
        raise ValueError(f"processing op {cls.name!r} is registered twice")
    _OPS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def known_ops(kind: OpKind | None = None) -> list[str]:
    _load_builtins()
    return sorted(n for n, c in _OPS.items() if kind is None or c.kind == kind)


def get_op(name: str) -> type[Op]:
    _load_builtins()
    if name not in _OPS:
        raise SpecError(f"unknown processing op {name!r}; known ops: {known_ops()}")
    return _OPS[name]


def parse_args(cls: type[Op], step: ProcessingStep, where: str) -> OpArgs:
    try:
        return cls.Args.model_validate(step.args)
    except ValidationError as exc:
        raise spec_error(exc, f"{where} ({step.op}): argument", empty="args") from None


def check_steps(preprocess: Sequence[ProcessingStep], postprocess: Sequence[ProcessingStep]) -> None:
    """Validate names, kinds, order and arguments without building anything (no files are read)."""
    for i, step in enumerate(preprocess):
        cls = get_op(step.op)
        where = f"preprocess step {i}"
        if cls.kind == "post":
            raise SpecError(f"{where}: {step.op!r} is a post-processing op; move it to postprocess")
        if cls.kind == "collate" and i != len(preprocess) - 1:
            raise SpecError(f"{where}: {step.op!r} turns instances into a batch, so it must be the last step")
        parse_args(cls, step, where)
    for i, step in enumerate(postprocess):
        cls = get_op(step.op)
        where = f"postprocess step {i}"
        if cls.kind != "post":
            raise SpecError(f"{where}: {step.op!r} is a pre-processing op; move it to preprocess")
        parse_args(cls, step, where)


def build(step: ProcessingStep, where: str, context: OpContext) -> Op:
    cls = get_op(step.op)
    return cls(parse_args(cls, step, where), context)


OpFactory = Callable[[OpArgs, OpContext], Op]
