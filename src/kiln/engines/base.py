"""The Engine protocol and the registry of backends.

An engine runs one artifact of a model version on one device. Adding a backend is one module that
subclasses :class:`Engine` and decorates it with :func:`register`; nothing else changes.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from kiln.errors import EngineUnavailableError, MissingExtraError, UnsupportedError, spec_error
from kiln.spec import ModelSpec

if TYPE_CHECKING:
    from kiln.recipe import PlanContext, Recipe, Skipped

Precision = Literal["fp32", "bf16", "fp16"]

# Backends shipped with kiln: name -> module that registers it. Imported lazily so that a missing
# optional runtime fails only when that engine is asked for.
_BUILTIN: dict[str, str] = {
    "onnxruntime": "kiln.engines.ort",
    "torch": "kiln.engines.pytorch",
    "openvino": "kiln.engines.openvino",
}
_REGISTRY: dict[str, type[Engine]] = {}


@dataclass(frozen=True)
class EngineOptions:
    """How to run: device, precision and threads, plus the engine's own run options (``run``: a
    variant's recipe options, checked against the engine's :class:`RunOptions` model when it loads).
    Engines reject what they cannot honour."""

    device: str = "cpu"
    precision: Precision = "fp32"
    intra_op_threads: int | None = None  # default: physical cores (or KILN_NUM_THREADS)
    run: Mapping[str, Any] | RunOptions = field(default_factory=dict)
    # The batch sizes it will mostly run (batch 1, the serving preferred sizes, the bench's sizes): an engine
    # may compile a static shape for each (OpenVINO does), its dynamic model serving every other size.
    batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        from kiln.environment import MAX_THREADS
        from kiln.errors import SpecFieldError

        threads = self.intra_op_threads
        if threads is not None and (not _is_int(threads) or not 1 <= threads <= MAX_THREADS):
            raise SpecFieldError("engine option", "threads", f"must be a whole number from 1 to {MAX_THREADS} "
                                 f"(or None: the physical cores), not {threads!r}")  # fmt: skip
        bad = [n for n in self.batch_sizes if not _is_int(n) or n < 1]
        if bad:
            raise SpecFieldError("engine option", "batch_sizes", f"must be positive whole numbers, not {bad[0]!r}")


def _is_int(value: object) -> bool:
    """A whole number (numpy's too) that is not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


class RunOptions(BaseModel):
    """An engine's typed run options (what ``kiln optimize`` writes into a recipe's ``options``); an
    engine subclasses it and names it as its ``Options``. Unknown names are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, options: EngineOptions) -> Self:
        """``options.run`` as this model (checked when the engine was loaded through :func:`load_engine`)."""
        return cls.parse(options.run)

    @classmethod
    def parse(cls, run: Mapping[str, Any] | RunOptions, engine: str = "") -> Self:
        if isinstance(run, cls):
            return run
        try:
            return cls.model_validate(run.model_dump() if isinstance(run, RunOptions) else dict(run))
        except ValidationError as exc:
            known = ", ".join(cls.model_fields) or "none"
            raise spec_error(exc, f"engine {engine or cls.__name__!r} run option", empty="options",
                             fix=f"its options: {known}") from None  # fmt: skip


@dataclass(frozen=True)
class LabelParts:
    """What an engine adds to a variant's label from its run options: a word after the precision
    (`` cast``), words before the graph passes (``compile default``) and after them (``[throughput]``)."""

    precision_suffix: str = ""
    middle: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()


def release_memory() -> None:
    """After engines close: collect garbage and ask glibc to hand freed heap pages back to the OS, so
    an unload shows in RSS and a memory baseline taken next is not hidden in freed pages."""
    import contextlib
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl and others have no malloc_trim
            ctypes.CDLL(None).malloc_trim(0)


class Engine(abc.ABC):
    """A loaded model ready to run. Construct with :meth:`load`; the constructor stays cheap."""

    name: ClassVar[str]
    artifact: ClassVar[str]  # the file it runs, relative to the version (or variant) directory
    builds_from: ClassVar[str] = ""  # the imported file its variants are made from, when not ``artifact``
    conversion_passes: ClassVar[tuple[str, ...]] = ()  # passes that only change the format (no speed trick)
    Options: ClassVar[type[RunOptions]] = RunOptions
    cuda_stack: ClassVar[str] = ""  # whose CUDA it runs on ("torch", "onnxruntime"): what the bench checks and meters
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    dynamic_shapes: ClassVar[bool] = True
    releases_gil: ClassVar[bool] = True  # whether several instances can run in parallel threads
    concurrent_runs: ClassVar[bool] = False  # whether one loaded engine may run from several threads at once
    # Triton's names for this kind of model (tritonclient and perf_analyzer display them); empty: the name
    triton_platform: ClassVar[str] = ""
    triton_backend: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, options: EngineOptions) -> None:
        self.spec = spec
        self.options = options

    # ---- what the engine offers the optimizer ---------------------------------------------------------
    @classmethod
    def source_artifact(cls) -> str:
        return cls.builds_from or cls.artifact

    @classmethod
    def available(cls) -> str | None:
        """None when this engine can run here, else why not (a runtime that is not installed)."""
        return None

    @classmethod
    def candidates(cls, ctx: PlanContext) -> tuple[list[Recipe], list[Skipped]]:
        """The recipes worth building on ``ctx.device``, and the families left out with why."""
        return [ctx.plain(cls.name)], []

    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> LabelParts:
        """The words a variant's label gets from these run options."""
        return LabelParts()

    @classmethod
    def is_plain(cls, options: Mapping[str, Any]) -> bool:
        """Whether these run options leave the engine's plain run (no compilation and the like)."""
        return True

    @classmethod
    def reset_compiled(cls) -> None:
        """Drop process-wide compilation caches after a compiled engine closed (the optimizer builds many)."""
        return None

    @classmethod
    def peer_key(cls, options: Mapping[str, Any]) -> tuple[Any, ...]:
        """Run options that make variants comparable: int8 is judged against the fp32 variant with the
        same key (OpenVINO's performance hint)."""
        return ()

    @classmethod
    @abc.abstractmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> Engine:
        """Read the artifact from ``artifact_dir`` and prepare it to run."""

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Inputs are already validated against the spec."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines free on garbage collection
        """Release what the engine holds (sessions, device memory)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def check_options(cls, artifact_dir: Path, options: EngineOptions) -> None:
        """Raise a clear error when this engine cannot honour ``options`` here."""
        if not (artifact_dir / cls.artifact).is_file():
            raise EngineUnavailableError(
                f"engine {cls.name!r} needs {cls.artifact} in {artifact_dir}, which is not there"
                + ("; models imported from ONNX run on 'onnxruntime'" if cls.artifact.endswith(".pt2") else "")
            )
        kind = options.device.split(":")[0]
        if kind not in cls.devices:
            raise UnsupportedError(f"engine {cls.name!r} runs on {list(cls.devices)}, not {options.device!r}")
        if options.precision not in cls.precisions:
            raise UnsupportedError(
                f"engine {cls.name!r} supports precisions {list(cls.precisions)}, not {options.precision!r}"
            )
        if options.precision != "fp32":
            from kiln.hardware import detect

            dev = detect().device(options.device)
            support = dev.bf16 if options.precision == "bf16" else dev.fp16
            if not support.supported:
                raise UnsupportedError(f"{options.precision} on {dev.id} ({dev.name}): {support.reason}")


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make an engine available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def engine_modules() -> list[str]:
    """The modules that registered engines, so a child process (a process instance) can register the same."""
    return sorted({cls.__module__ for cls in _REGISTRY.values()})


def available_engines() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_engine(name: str) -> type[Engine]:
    if name not in _REGISTRY and name in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[name])
        except ImportError as exc:
            raise MissingExtraError(None, exc.name or "a package", f"engine {name!r}") from None
    if name not in _REGISTRY:
        raise EngineUnavailableError(f"unknown engine {name!r}; known engines: {available_engines()}")
    return _REGISTRY[name]


def load_engine(name: str, artifact_dir: Path, spec: ModelSpec, options: EngineOptions | None = None) -> Engine:
    cls = get_engine(name)
    options = options or EngineOptions()
    cls.check_options(artifact_dir, options)
    options = dataclasses.replace(options, run=cls.Options.parse(options.run, name))
    return cls.load(artifact_dir, spec, options)


def cast_outputs(spec: ModelSpec, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give outputs the dtypes the spec declares (engines at reduced precision may return others)."""
    want = {t.name: t.numpy_dtype for t in spec.outputs}
    return {k: (v if k not in want or v.dtype == want[k] else v.astype(want[k])) for k, v in outputs.items()}


EngineFactory = Callable[[Path, ModelSpec, EngineOptions], Engine]
