"""ONNX Runtime engine: CPU here; on ``cuda`` devices the CUDA execution provider, and TensorRT's in
front of it when a variant asks for it (``tensorrt`` run option; fp16 with precision ``fp16``).

TensorRT builds an engine for the graph when the session starts (minutes for a large model): kiln
keeps them in its cache (``KILN_CACHE_DIR/tensorrt``), keyed by the artifact, so that is paid once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engines.base import Engine, EngineOptions, LabelParts, RunOptions, register
from kiln.errors import CorruptModelError, UnsupportedError
from kiln.recipe import NO_CALIBRATION, PlanContext, Recipe, Skipped, step
from kiln.repository import ONNX_FILE
from kiln.spec import ModelSpec


class OrtOptions(RunOptions):
    tensorrt: bool = False  # run on TensorRT's execution provider (CUDA devices)
    providers: list[Any] | None = None  # explicit execution providers, in priority order
    optimized_model_filepath: str | None = None  # where ONNX Runtime saves the graph it optimized


def providers_for(device: str, available: list[str], tensorrt: dict[str, Any] | None = None) -> list[Any]:
    """Execution providers in priority order for ``device``; CPU is always last as the fallback.
    ``tensorrt`` holds TensorRT provider options when the variant runs on TensorRT."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        if tensorrt is not None:
            raise UnsupportedError("TensorRT runs on CUDA devices only; load this variant with device='cuda'")
        return ["CPUExecutionProvider"]
    dev_opts = {"device_id": int(index or 0)}
    chosen: list[Any] = []
    if tensorrt is not None:
        if "TensorrtExecutionProvider" not in available:
            raise UnsupportedError(
                f"this variant runs on TensorRT, but this onnxruntime has {available}; install onnxruntime-gpu "
                "with TensorRT, or choose another variant"
            )
        chosen.append(("TensorrtExecutionProvider", {**dev_opts, **tensorrt}))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", dev_opts))
    if not chosen:
        raise UnsupportedError(
            f"device {device!r} needs onnxruntime's CUDA execution provider; this onnxruntime has {available}. "
            "Install onnxruntime-gpu"
        )
    return [*chosen, "CPUExecutionProvider"]


@register
class OrtEngine(Engine):
    name = "onnxruntime"
    triton_platform = "onnxruntime_onnx"
    triton_backend = "onnxruntime"
    artifact = ONNX_FILE
    Options = OrtOptions
    devices = ("cpu", "cuda")
    cuda_stack = "onnxruntime"
    # Reduced precision is a property of the ONNX graph (the ort-fp16 pass), not a run flag; fp16 is
    # accepted so that such a variant states it, and the hardware check keeps it to CUDA.
    precisions = ("fp32", "fp16")
    concurrent_runs = True  # InferenceSession.run is thread-safe

    def __init__(self, spec: ModelSpec, options: EngineOptions, session: Any) -> None:
        super().__init__(spec, options)
        self.session = session
        self._output_names = [o.name for o in session.get_outputs()]
        want = {t.name: t.numpy_dtype for t in spec.outputs}
        # the spec's dtype per output where the graph's may differ (an fp16 graph); None where they agree
        self._want = [
            None if want.get(o.name) == _graph_dtype(o.type) else want.get(o.name) for o in session.get_outputs()
        ]
        self._cast = any(w is not None for w in self._want)  # False on most graphs: outputs go back as they come
        # The session's C++ run, past the Python wrapper's input checks (kiln validated the inputs already)
        # and its execution-provider fallback (which only a GPU provider uses): 5-10 µs a call, 8 % of a
        # small CNN. Where a future onnxruntime moves it, or on a GPU, the public run is used.
        inner = getattr(session, "_sess", None)
        self._fast = (
            inner.run if inner is not None and hasattr(inner, "run") and session.get_providers() == ["CPUExecutionProvider"]
            else None
        )  # fmt: skip

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> OrtEngine:
        import onnxruntime as ort

        from kiln.hardware import physical_cores

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        run = OrtOptions.of(options)
        if run.optimized_model_filepath is not None:
            so.optimized_model_filepath = run.optimized_model_filepath
        path = artifact_dir / cls.artifact
        if options.precision == "fp16" and not run.tensorrt and not _has_fp16_weights(path):
            raise UnsupportedError(
                f"{path} holds fp32 weights: for ONNX Runtime fp16 is a converted graph, not a run option; "
                "`kiln optimize --device cuda` builds one (or run this graph at fp32)"
            )
        trt = _tensorrt_options(path, options) if run.tensorrt else None
        providers = run.providers or providers_for(options.device, ort.get_available_providers(), trt)
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise CorruptModelError(str(path), f"ONNX Runtime cannot load it: {exc}") from None
        return cls(spec, options, session)

    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> LabelParts:
        return LabelParts(tail=("[tensorrt]",) if options.get("tensorrt") else ())

    @classmethod
    def candidates(cls, ctx: PlanContext) -> tuple[list[Recipe], list[Skipped]]:
        """fp32, the graph optimized for this machine, int8 (dynamic; static per calibration method), and
        on CUDA fp16 and TensorRT."""
        from kiln.hardware import machine_fingerprint

        recipes = [Recipe(engine=cls.name)]
        skipped: list[Skipped] = []
        slim = [step("onnxslim")] if ctx.graph_passes else []
        if ctx.graph_passes:
            # level "all" lays the graph out for this CPU and this ONNX Runtime: another machine builds its own
            tuned = step("ort-optimize", level="all", machine=machine_fingerprint("onnxruntime"))
            recipes.append(Recipe(engine=cls.name, passes=(*slim, tuned)))
        cuda = ctx.device.kind == "cuda"
        if "fp16" in ctx.precisions:
            if cuda and ctx.fp16:
                recipes.append(Recipe(engine=cls.name, precision="fp16", passes=(*slim, step("ort-fp16"))))
            else:
                skipped.append(Skipped("onnxruntime fp16", "ONNX Runtime runs fp16 fast on CUDA only; on CPU it is slower than fp32"))  # fmt: skip
        if cuda:
            if _has_tensorrt():
                recipes.append(Recipe(engine=cls.name, passes=tuple(slim), options={"tensorrt": True}))
                if ctx.fp16:
                    recipes.append(Recipe(engine=cls.name, precision="fp16", passes=tuple(slim),
                                          options={"tensorrt": True}))  # fmt: skip
            else:
                skipped.append(Skipped("onnxruntime tensorrt", "this onnxruntime has no TensorrtExecutionProvider"))
        # On a CPU whose int8 kernels saturate (no VNNI) the weights are quantized to 7 bits
        from kiln.hardware import int8_saturates

        narrow = {"reduce_range": True} if ctx.device.kind == "cpu" and int8_saturates() else {}
        if "ort-dynamic" in ctx.int8:
            recipes.append(Recipe(engine=cls.name, int8="ort-dynamic", passes=(*slim, step("ort-dynamic", **narrow))))
        if "ort-static" in ctx.int8:
            if ctx.calibration is None:
                skipped.append(Skipped("onnxruntime int8 static", NO_CALIBRATION))
            for method in ctx.calibration_methods if ctx.calibration is not None else ():
                static = step("ort-static", method=method, per_channel=ctx.per_channel, calibration=ctx.calibration,
                              fold_scaling=True, **narrow)  # fmt: skip
                recipes.append(Recipe(engine=cls.name, int8="ort-static", passes=(*slim, static)))
        qat, no_qat = ctx.qat_step(cls.name)  # NNCF's fine-tuned quantizers as QDQ pairs, fused at load
        skipped += no_qat
        if qat is not None and cuda:
            skipped.append(Skipped("onnxruntime int8 qat", "ONNX Runtime fuses QDQ int8 graphs on the CPU; on CUDA it runs them unfused"))  # fmt: skip
        elif qat is not None:
            recipes.append(Recipe(engine=cls.name, int8="nncf-qat", passes=(qat,)))
        return recipes, skipped

    @property
    def active_providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = inputs if type(inputs) is dict else dict(inputs)
        if self._fast is not None:
            try:
                outs = self._fast(self._output_names, feed, None)
            except Exception:  # the public run again, for its message (it names missing inputs)
                outs = self.session.run(self._output_names, feed)
        else:
            outs = self.session.run(self._output_names, feed)
        if not self._cast:
            return dict(zip(self._output_names, outs, strict=True))
        return {
            name: out if dtype is None or out.dtype == dtype else out.astype(dtype)
            for name, out, dtype in zip(self._output_names, outs, self._want, strict=True)
        }

    def close(self) -> None:
        self.session = None


def _graph_dtype(ort_type: str) -> np.dtype[Any] | None:
    """numpy's dtype for an ONNX Runtime type string (``tensor(float)``); None where there is none."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    try:
        return np.dtype({"float": "float32", "double": "float64", "string": "object"}.get(name, name))
    except TypeError:
        return None


def _has_tensorrt() -> bool:
    import onnxruntime as ort

    return "TensorrtExecutionProvider" in ort.get_available_providers()


def _has_fp16_weights(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def _tensorrt_options(path: Path, options: EngineOptions) -> dict[str, Any]:
    """TensorRT provider options: fp16 when asked, and an engine cache per artifact in kiln's cache."""
    import hashlib

    from kiln.environment import get_settings
    from kiln.files import sha256_file

    key = hashlib.sha256(f"{sha256_file(path)}:{options.device}:{options.precision}".encode()).hexdigest()[:16]
    cache = get_settings().cache_dir / "tensorrt" / key
    cache.mkdir(parents=True, exist_ok=True)
    return {
        "trt_fp16_enable": options.precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
    }
