"""OpenVINO engine: an OpenVINO IR (``model.xml`` + ``model.bin``) or, failing that, the ONNX file read
directly, compiled for the CPU with a LATENCY or THROUGHPUT hint.

Run options (:class:`OpenVINOOptions`): ``hint`` (``"latency"`` or ``"throughput"``), ``num_requests``,
``static_shapes``.
With the THROUGHPUT hint a batch is split across the compiled model's optimal number of infer requests,
run at once (as ``benchmark_app`` drives it): one synchronous request leaves its extra streams idle. An
even split runs on static compiles of the part's shape (batch 16 over two streams: two of batch 8), 2–7 %
more rows/s than the dynamic model's requests on MobileNetV2 int8 at batches 2–16, measured here.
The precision is always set explicitly: on CPUs with AVX512-BF16 or AMX OpenVINO runs **bf16 by
default**, so an fp32 variant must ask for ``f32`` or it silently is not one.

Shapes: a model compiled for one static shape runs faster than the dynamic one (2–13 % for a CNN's
batch, 18–35 % for MiniLM at a fixed batch and length, measured here), so besides the dynamic model, which
serves every shape, the engine keeps static compiles of the shapes it sees: the batch sizes it will mostly
see (``EngineOptions.batch_sizes``; batch 1 and the serving preferred sizes by default) are compiled at load
when the other dims are fixed, and any shape that comes :data:`_COMPILE_AFTER` times (a text bucket, a
batch size the server forms often) is compiled in a background thread while the dynamic model serves it,
up to :data:`_MAX_STATIC` compiles per engine. Compiled models are cached on disk (OpenVINO's
``CACHE_DIR`` under ``KILN_CACHE_DIR/openvino``), so a reload compiles nothing again; ``compile_s`` says
what each compile took. Inputs are handed over without a copy (``share_inputs``) and outputs copied out
once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from kiln.engines.base import Engine, EngineOptions, LabelParts, RunOptions, cast_outputs, register
from kiln.errors import (
    CorruptModelError,
    EngineUnavailableError,
    MissingExtraError,
    UnsupportedError,
    first_line,
    pip_install,
)
from kiln.recipe import NO_CALIBRATION, PlanContext, Recipe, Skipped, step
from kiln.repository import IR_FILE, ONNX_FILE
from kiln.spec import ModelSpec

log = logging.getLogger("kiln.engines")
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


class OpenVINOOptions(RunOptions):
    hint: Literal["latency", "throughput"] = "latency"
    num_requests: int | None = Field(default=None, ge=1)
    static_shapes: bool = True  # also compile the shapes it sees most as static ones


_PRECOMPILED = 4  # expected batch sizes compiled at load, at most
_MAX_STATIC = 8  # static shapes compiled per engine, at most (each holds its own compiled graph)
_COMPILE_AFTER = 2  # calls at one shape before it gets a static compile of its own
_MAX_SEEN = 4096  # shapes counted before the counts start again (hostile shapes cannot grow it)
Shapes = tuple[tuple[int, ...], ...]  # every input's shape, in the compiled model's input order


_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def artifact_path(artifact_dir: Path) -> Path | None:
    """The IR when there is one, else the ONNX file (OpenVINO converts it on load), else None."""
    for name in (IR_FILE, ONNX_FILE):
        if (artifact_dir / name).is_file():
            return artifact_dir / name
    return None


def compile_config(options: EngineOptions, threads: int) -> dict[str, Any]:
    """The properties passed to ``Core.compile_model``; precision is never left to the default."""
    run = OpenVINOOptions.of(options)
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": HINTS[run.hint],
        "INFERENCE_PRECISION_HINT": _PRECISION[options.precision],
        "INFERENCE_NUM_THREADS": threads,
    }
    if run.num_requests is not None:
        config["PERFORMANCE_HINT_NUM_REQUESTS"] = run.num_requests
    return config


def _numpy_dtype(element_type: Any) -> np.dtype[Any] | None:
    """numpy's dtype for an OpenVINO element type; None where it has none (those inputs take ``infer``)."""
    try:
        return np.dtype(element_type.to_dtype())
    except Exception:  # a dynamic or string element type
        return None


@register
class OpenVINOEngine(Engine):
    name = "openvino"
    triton_platform = "openvino"
    triton_backend = "openvino"
    artifact = IR_FILE
    builds_from = ONNX_FILE  # its variants convert the imported ONNX file (ov-convert)
    conversion_passes = ("ov-convert",)
    Options = OpenVINOOptions
    devices = ("cpu",)
    precisions = ("fp32", "bf16")

    def __init__(
        self,
        spec: ModelSpec,
        options: EngineOptions,
        compiled: Any,
        static: Mapping[Shapes, Any] | None = None,
        compile_s: Mapping[str, float] | None = None,
        learn: tuple[Any, Any, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(spec, options)
        self.compiled = compiled
        self.compile_s = dict(compile_s or {})  # "dynamic" / "batch N" / "shape AxB" -> seconds
        self._input_names = [i.get_any_name() for i in compiled.inputs]
        self._input_dtypes = [_numpy_dtype(i.get_element_type()) for i in compiled.inputs]
        from openvino import Tensor

        self._tensor = Tensor  # resolved once, not per call
        # infer requests run at once: 1 with the LATENCY hint, the compiled model's optimal number with THROUGHPUT
        self._streams = parallel_requests(compiled, spec, options)
        # every input's shape -> infer requests (one a stream) of the model compiled for exactly those shapes
        self._static: dict[Shapes, list[Any]] = {
            key: [c.create_infer_request() for _ in range(self._streams)] for key, c in (static or {}).items()
        }
        self._keep = list((static or {}).values())  # the compiled models behind the requests
        # (core, model, config) to compile the shapes that come often, off the calling thread
        self._learn = learn if OpenVINOOptions.of(options).static_shapes and spec.serving.max_batch_size else None
        self._seen: dict[Shapes, int] = {}
        self._compiling: list[Future[None]] = []
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.request = compiled.create_infer_request()
        self._parallel = [self.request] + [compiled.create_infer_request() for _ in range(self._streams - 1)]
        names = [o.get_any_name() for o in compiled.outputs]
        wanted = [t.name for t in spec.outputs]
        # Outputs keep their ONNX names through conversion; fall back to order if a tool renamed them.
        self._outputs = [(w, w if w in names else names[i]) for i, w in enumerate(wanted)]
        # (spec name, position among the compiled outputs, the spec's dtype: reduced precision may give others)
        dtypes = {t.name: t.numpy_dtype for t in spec.outputs}
        self._picks = [(w, names.index(n), dtypes[w]) for w, n in self._outputs]

    @property
    def static_shapes(self) -> list[Shapes]:
        """The shapes that run on a static compile (those compiled at load and those learnt since)."""
        return sorted(self._static)

    def wait_compiled(self, timeout_s: float | None = None) -> None:
        """Wait until the static compiles under way have finished (tests, and timing the steady state)."""
        with self._lock:
            pending = list(self._compiling)
        for future in pending:
            future.result(timeout=timeout_s)

    @classmethod
    def available(cls) -> str | None:
        import importlib.util

        return (
            None
            if importlib.util.find_spec("openvino")
            else f"openvino is not installed ({pip_install('openvino nncf')})"
        )

    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> LabelParts:
        hint = options.get("hint", "latency")
        return LabelParts(tail=(f"[{hint}]",) if hint != "latency" else ())

    @classmethod
    def peer_key(cls, options: Mapping[str, Any]) -> tuple[Any, ...]:
        return (options.get("hint"),)

    @classmethod
    def candidates(cls, ctx: PlanContext) -> tuple[list[Recipe], list[Skipped]]:
        """Per performance hint: the converted IR at fp32 and bf16, and NNCF int8 with calibration data."""
        if ctx.device.kind != "cpu":
            return [], [Skipped("openvino variants", "kiln runs OpenVINO on the CPU only")]
        recipes: list[Recipe] = []
        convert = step("ov-convert")
        nncf = "nncf" in ctx.int8 and ctx.calibration is not None
        for hint in ctx.openvino_hints:
            opts = {"hint": hint}
            recipes.append(Recipe(engine=cls.name, passes=(convert,), options=opts))
            if ctx.bf16:
                recipes.append(Recipe(engine=cls.name, precision="bf16", passes=(convert,), options=opts))
            if nncf:
                quantized = (convert, step("nncf", calibration=ctx.calibration))
                recipes.append(Recipe(engine=cls.name, int8="nncf", passes=quantized, options=opts))
                if ctx.bf16:
                    recipes.append(Recipe(engine=cls.name, precision="bf16", int8="nncf", passes=quantized,
                                          options=opts))  # fmt: skip
        skipped = [Skipped("openvino int8 nncf", NO_CALIBRATION)] if "nncf" in ctx.int8 and not nncf else []
        qat, no_qat = ctx.qat_step(cls.name)  # quantization-aware training: NNCF on the torch model, run here
        skipped += no_qat
        if qat is not None:
            for hint in ctx.openvino_hints:
                recipes.append(Recipe(engine=cls.name, int8="nncf-qat", passes=(qat,), options={"hint": hint}))
        return recipes, skipped

    @classmethod
    def check_options(cls, artifact_dir: Path, options: EngineOptions) -> None:
        if artifact_path(artifact_dir) is None:
            raise EngineUnavailableError(
                f"engine 'openvino' needs {IR_FILE} or {ONNX_FILE} in {artifact_dir}, and neither is there"
            )
        if options.device.split(":")[0] not in cls.devices:
            raise UnsupportedError(f"engine 'openvino' runs on {list(cls.devices)} here, not {options.device!r}")
        if options.precision not in cls.precisions:
            raise UnsupportedError(
                f"engine 'openvino' supports precisions {list(cls.precisions)}, not {options.precision!r}"
            )
        if options.precision == "bf16":
            from kiln.hardware import detect

            support = detect().device("cpu").bf16
            if not support.supported:
                raise UnsupportedError(f"bf16 on cpu: {support.reason}")

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> OpenVINOEngine:
        try:
            import openvino as ov
        except ImportError:
            raise MissingExtraError(None, "openvino", "engine 'openvino'") from None
        from kiln.hardware import physical_cores

        path = artifact_path(artifact_dir)
        if path is None:  # check_options ran first; this keeps the type checker honest
            raise EngineUnavailableError(f"no OpenVINO artifact in {artifact_dir}")
        core = ov.Core()
        config = compile_config(options, options.intra_op_threads or physical_cores())
        _use_cache(core)
        times: dict[str, float] = {}
        try:
            model = core.read_model(str(path))
            t0 = time.perf_counter()
            compiled = core.compile_model(model, "CPU", config)
            times["dynamic"] = round(time.perf_counter() - t0, 3)
        except Exception as exc:  # openvino raises RuntimeError with long C++ traces
            first = first_line(exc)
            raise CorruptModelError(str(path), f"OpenVINO cannot compile it: {first}") from None
        static: dict[Shapes, Any] = {}
        sizes = part_sizes(static_batch_sizes(spec, options), parallel_requests(compiled, spec, options))
        for key in expected_shapes(model, sizes):
            try:
                t0 = time.perf_counter()
                static[key] = _compile_static(core, model, key, config)
                times[f"batch {key[0][0]}"] = round(time.perf_counter() - t0, 3)
            except Exception as exc:  # a model that cannot take this static shape: the dynamic one serves it
                log.info("OpenVINO: no static shape for batch %d of %s (%s); the dynamic model serves it",
                         key[0][0], path, first_line(exc))  # fmt: skip
        return cls(spec, options, compiled, static, times, learn=(core, model, config))

    @property
    def inference_precision(self) -> str:
        """What OpenVINO actually runs at (``f32``, ``bf16`` …), read back from the compiled model."""
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.request
        if self._streams > 1:
            first = next(iter(inputs.values()))
            rows = first.shape[0] if first.ndim else 0
            if rows > 1:  # the THROUGHPUT hint: rows spread over its streams
                return self._run_split(inputs, rows)
        if self._static or self._learn is not None:
            try:
                key: Shapes = tuple(inputs[n].shape for n in self._input_names)
            except (KeyError, AttributeError):  # OpenVINO's own error names what is wrong
                key = ()
            hit = self._static.get(key)
            if hit is not None:
                request = hit[0]
            elif key:
                self._count(key)
        tensors = self._shared_tensors(inputs)
        if tensors is not None:  # set on the request and run: 3 µs a call less than infer()'s argument handling
            for i, t in enumerate(tensors):
                request.set_input_tensor(i, t)
            request.infer()
            # The request reuses its output buffers on the next call: each output is copied out once.
            return {want: request.get_output_tensor(i).data.astype(dtype, copy=True) for want, i, dtype in self._picks}
        # Inputs are shared with the request (no copy: OpenVINO copies only what it must, such as read-only
        # or non-contiguous arrays); outputs are copied out once, as the request reuses its buffers.
        result = request.infer(inputs, share_inputs=True, share_outputs=True).to_tuple()
        return {want: result[i].astype(dtype, copy=True) for want, i, dtype in self._picks}

    def _shared_tensors(self, inputs: Mapping[str, np.ndarray]) -> list[Any] | None:
        """One tensor per model input, sharing the caller's memory, where every input is a writable
        C-contiguous array of the input's own dtype; None otherwise (``infer`` converts or copies, and its
        error names a missing input)."""
        if len(inputs) != len(self._input_names):
            return None
        out = []
        for name, dtype in zip(self._input_names, self._input_dtypes, strict=True):
            a = inputs.get(name)
            if type(a) is not np.ndarray or a.dtype != dtype or not (a.flags.c_contiguous and a.flags.writeable):
                return None
            out.append(self._tensor(a, shared_memory=True))
        return out

    def _count(self, key: Shapes) -> None:
        """Count a call at a shape with no static compile; the :data:`_COMPILE_AFTER`-th starts one."""
        if self._learn is None:
            return
        seen = self._seen.get(key, 0) + 1
        if len(self._seen) >= _MAX_SEEN:
            self._seen.clear()
        self._seen[key] = seen
        if seen != _COMPILE_AFTER:
            return
        with self._lock:
            self._compiling = [f for f in self._compiling if not f.done()]
            if len(self._static) + len(self._compiling) >= _MAX_STATIC:
                return
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="kiln-openvino-compile")
            self._compiling.append(self._worker.submit(self._compile_seen, key))

    def _compile_seen(self, key: Shapes) -> None:
        """Compile ``key`` as a static shape (the worker thread); the next call at it runs there."""
        if self._learn is None:
            return
        core, model, config = self._learn
        label = "shape " + ",".join("x".join(map(str, shape)) for shape in key)
        try:
            t0 = time.perf_counter()
            compiled = _compile_static(core, model, key, config)
            requests = [compiled.create_infer_request() for _ in range(self._streams)]
        except Exception as exc:  # the dynamic model goes on serving this shape
            log.info("OpenVINO: no static compile for %s of %s (%s)", label, self.spec.name, first_line(exc))
            return
        self.compile_s[label] = round(time.perf_counter() - t0, 3)
        self._keep.append(compiled)
        self._static[key] = requests  # one dict store: the calling thread sees it whole on its next call
        log.info("OpenVINO: %s of %s compiled static in %.2f s (it came %d times)",
                 label, self.spec.name, self.compile_s[label], _COMPILE_AFTER)  # fmt: skip

    def _run_split(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Rows split across the infer requests, started together, outputs joined in order. Equal parts run
        on a static compile of the part's shape once there is one (the dynamic model's requests meanwhile);
        uneven ones on the dynamic model."""
        k = min(rows, self._streams)
        bounds = np.linspace(0, rows, k + 1).astype(int)
        used = self._parallel[:k]
        if rows % k == 0 and (self._static or self._learn is not None):
            try:
                key: Shapes = tuple((rows // k, *inputs[n].shape[1:]) for n in self._input_names)
            except (KeyError, AttributeError):  # OpenVINO's own error names what is wrong
                key = ()
            hit = self._static.get(key)
            if hit is not None:
                used = hit[:k]
            elif key:
                self._count(key)
        parts = [{k: v[lo:hi] for k, v in inputs.items()} for lo, hi in itertools.pairwise(bounds)]
        for req, part in zip(used, parts, strict=True):  # ``parts`` keeps the shared slices alive until the waits
            req.start_async(part, share_inputs=True)
        for req in used:
            req.wait()
        return cast_outputs(self.spec, {
            want: np.concatenate([req.get_tensor(name).data for req in used]) for want, name in self._outputs
        })  # fmt: skip

    def close(self) -> None:
        worker, self._worker, self._learn = self._worker, None, None
        if worker is not None:  # a compile under way finishes first; queued ones never start
            worker.shutdown(wait=True, cancel_futures=True)
        self.request = None
        self._parallel = []
        self._static = {}
        self._keep = []
        self.compiled = None


def parallel_requests(compiled: Any, spec: ModelSpec, options: EngineOptions) -> int:
    """How many infer requests a batch is spread over: the THROUGHPUT hint's optimal number (one a stream)
    for a model that takes batches, else 1."""
    if OpenVINOOptions.of(options).hint != "throughput" or spec.serving.max_batch_size == 0:
        return 1
    return max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))


def part_sizes(batches: list[int], streams: int) -> list[int]:
    """The batch sizes to compile for ``batches`` spread over ``streams`` requests: each batch's equal part
    (a batch that does not split evenly runs on the dynamic model)."""
    parts = {n if n == 1 or streams == 1 else n // min(n, streams) for n in batches if n % min(n, streams) == 0}
    return sorted(parts)


def static_batch_sizes(spec: ModelSpec, options: EngineOptions) -> list[int]:
    """The batch sizes to compile as static shapes: those asked for, else batch 1 and the serving
    preferred sizes (the smallest :data:`_PRECOMPILED` of them)."""
    if not OpenVINOOptions.of(options).static_shapes or spec.serving.max_batch_size == 0:
        return []
    wanted = options.batch_sizes or (1, *spec.serving.preferred_batch_sizes)
    return sorted({n for n in wanted if n >= 1})[:_PRECOMPILED]


def expected_shapes(model: Any, batches: list[int]) -> list[Shapes]:
    """The full shapes of ``batches`` when every dim but the batch is fixed in the model (otherwise none:
    those dims take the sizes calls bring, learnt as they come)."""
    fixed: list[tuple[int, ...]] = []
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() == 0:
            return []
        rest = [shape[i] for i in range(1, shape.rank.get_length())]
        if not all(d.is_static for d in rest):
            return []
        fixed.append(tuple(d.get_length() for d in rest))
    return [tuple((n, *dims) for dims in fixed) for n in batches]


def _compile_static(core: Any, model: Any, key: Shapes, config: dict[str, Any]) -> Any:
    """The model reshaped to ``key`` (every input's shape) and compiled."""
    fixed = model.clone()
    fixed.reshape({port.get_any_name(): list(shape) for port, shape in zip(model.inputs, key, strict=True)})
    return core.compile_model(fixed, "CPU", config)


def _use_cache(core: Any) -> None:
    """Compiled models cached under ``KILN_CACHE_DIR/openvino`` (a reload or a restart compiles nothing)."""
    from kiln.environment import get_settings

    cache = get_settings().cache_dir / "openvino"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache)})
    except (OSError, RuntimeError) as exc:  # a read-only cache: compile every time, as without one
        log.info("OpenVINO compile cache off (%s): %s", cache, first_line(exc))
