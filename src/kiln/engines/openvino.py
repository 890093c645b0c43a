"""OpenVINO engine: an OpenVINO IR (``model.xml`` + ``model.bin``) or, failing that, the ONNX file read
directly, compiled for the CPU with a LATENCY or THROUGHPUT hint.

Run options (:class:`OpenVINOOptions`): ``hint`` (``"latency"`` or ``"throughput"``), ``num_requests``.
With the THROUGHPUT hint a batch is split across the compiled model's optimal number of infer requests,
run at once (as ``benchmark_app`` drives it): one synchronous request leaves its extra streams idle.
The precision is always set explicitly: on CPUs with AVX512-BF16 or AMX OpenVINO runs **bf16 by
default**, so an fp32 variant must ask for ``f32`` or it silently is not one.
"""

from __future__ import annotations

from collections.abc import Mapping
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

HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


class OpenVINOOptions(RunOptions):
    hint: Literal["latency", "throughput"] = "latency"
    num_requests: int | None = Field(default=None, ge=1)


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

    def __init__(self, spec: ModelSpec, options: EngineOptions, compiled: Any) -> None:
        super().__init__(spec, options)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        streams = 1
        if OpenVINOOptions.of(options).hint == "throughput" and spec.serving.max_batch_size != 0:
            streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._parallel = [self.request] + [compiled.create_infer_request() for _ in range(streams - 1)]
        names = [o.get_any_name() for o in compiled.outputs]
        wanted = [t.name for t in spec.outputs]
        # Outputs keep their ONNX names through conversion; fall back to order if a tool renamed them.
        self._outputs = [(w, w if w in names else names[i]) for i, w in enumerate(wanted)]

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
        if ctx.qat and ctx.train is not None:  # quantization-aware training: NNCF on the torch model, run here
            if ctx.calibration is None:
                skipped.append(Skipped("openvino int8 qat", NO_CALIBRATION))
            else:
                qat = step("qat-int8", budget_s=ctx.train_budget_s, calibration=ctx.calibration, train=ctx.train)
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
        try:
            model = core.read_model(str(path))
            compiled = core.compile_model(
                model, "CPU", compile_config(options, options.intra_op_threads or physical_cores())
            )
        except Exception as exc:  # openvino raises RuntimeError with long C++ traces
            first = first_line(exc)
            raise CorruptModelError(str(path), f"OpenVINO cannot compile it: {first}") from None
        return cls(spec, options, compiled)

    @property
    def inference_precision(self) -> str:
        """What OpenVINO actually runs at (``f32``, ``bf16`` …), read back from the compiled model."""
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values()))) if inputs else 0
        if len(self._parallel) > 1 and rows > 1:
            return self._run_split(inputs, rows)
        result = self.request.infer(dict(inputs))
        # The request reuses its output buffers on the next call: copy them out.
        return cast_outputs(self.spec, {want: np.array(result[name], copy=True) for want, name in self._outputs})

    def _run_split(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Rows split across the infer requests, started together, outputs joined in order."""
        bounds = np.linspace(0, rows, min(rows, len(self._parallel)) + 1).astype(int)
        used = self._parallel[: len(bounds) - 1]
        for req, lo, hi in zip(used, bounds[:-1], bounds[1:], strict=True):
            req.start_async({k: v[lo:hi] for k, v in inputs.items()})
        for req in used:
            req.wait()
        return cast_outputs(self.spec, {
            want: np.concatenate([req.get_tensor(name).data for req in used]) for want, name in self._outputs
        })  # fmt: skip

    def close(self) -> None:
        self.request = None
        self._parallel = []
        self.compiled = None
