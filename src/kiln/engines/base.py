"""The Engine protocol and the registry of backends.

An engine runs one artifact of a model version on one device. Adding a backend is one module that
subclasses :class:`Engine` and decorates it with :func:`register`; nothing else changes.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from kiln.errors import EngineUnavailableError, UnsupportedError
from kiln.spec import ModelSpec

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
    """How to run: device, precision and threads. Engines reject what they cannot honour."""

    device: str = "cpu"
    precision: Precision = "fp32"
    intra_op_threads: int | None = None  # default: physical cores (or KILN_NUM_THREADS)
    extra: Mapping[str, Any] = field(default_factory=dict)  # backend-specific, e.g. ORT providers


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
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    dynamic_shapes: ClassVar[bool] = True
    releases_gil: ClassVar[bool] = True  # whether several instances can run in parallel threads
    concurrent_runs: ClassVar[bool] = False  # whether one loaded engine may run from several threads at once

    def __init__(self, spec: ModelSpec, options: EngineOptions) -> None:
        self.spec = spec
        self.options = options

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
            raise EngineUnavailableError(f"engine {name!r} needs a package that is not installed: {exc}") from None
    if name not in _REGISTRY:
        raise EngineUnavailableError(f"unknown engine {name!r}; known engines: {available_engines()}")
    return _REGISTRY[name]


def load_engine(name: str, artifact_dir: Path, spec: ModelSpec, options: EngineOptions | None = None) -> Engine:
    cls = get_engine(name)
    options = options or EngineOptions()
    cls.check_options(artifact_dir, options)
    return cls.load(artifact_dir, spec, options)


def cast_outputs(spec: ModelSpec, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give outputs the dtypes the spec declares (engines at reduced precision may return others)."""
    want = {t.name: t.numpy_dtype for t in spec.outputs}
    return {k: (v if k not in want or v.dtype == want[k] else v.astype(want[k])) for k, v in outputs.items()}


EngineFactory = Callable[[Path, ModelSpec, EngineOptions], Engine]
