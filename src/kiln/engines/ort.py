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

from kiln.engines.base import Engine, EngineOptions, cast_outputs, register
from kiln.errors import CorruptModelError, UnsupportedError
from kiln.spec import ModelSpec


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
    artifact = "model.onnx"
    devices = ("cpu", "cuda")
    # Reduced precision is a property of the ONNX graph (the ort-fp16 pass), not a run flag; fp16 is
    # accepted so that such a variant states it, and the hardware check keeps it to CUDA.
    precisions = ("fp32", "fp16")
    concurrent_runs = True  # InferenceSession.run is thread-safe

    def __init__(self, spec: ModelSpec, options: EngineOptions, session: Any) -> None:
        super().__init__(spec, options)
        self.session = session
        self._output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> OrtEngine:
        import onnxruntime as ort

        from kiln.hardware import physical_cores

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads or physical_cores()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if "optimized_model_filepath" in options.extra:
            so.optimized_model_filepath = str(options.extra["optimized_model_filepath"])
        path = artifact_dir / cls.artifact
        if options.precision == "fp16" and not options.extra.get("tensorrt") and not _has_fp16_weights(path):
            raise UnsupportedError(
                f"{path} holds fp32 weights: for ONNX Runtime fp16 is a converted graph, not a run option; "
                "`kiln optimize --device cuda` builds one (or run this graph at fp32)"
            )
        trt = _tensorrt_options(path, options) if options.extra.get("tensorrt") else None
        providers = options.extra.get("providers") or providers_for(options.device, ort.get_available_providers(), trt)
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise CorruptModelError(str(path), f"ONNX Runtime cannot load it: {exc}") from None
        return cls(spec, options, session)

    @property
    def active_providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._output_names, dict(inputs))
        return cast_outputs(self.spec, dict(zip(self._output_names, outs, strict=True)))

    def close(self) -> None:
        self.session = None


def _has_fp16_weights(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def _tensorrt_options(path: Path, options: EngineOptions) -> dict[str, Any]:
    """TensorRT provider options: fp16 when asked, and an engine cache per artifact in kiln's cache."""
    import hashlib

    from kiln.repository import sha256_file
    from kiln.settings import get_settings

    key = hashlib.sha256(f"{sha256_file(path)}:{options.device}:{options.precision}".encode()).hexdigest()[:16]
    cache = get_settings().cache_dir / "tensorrt" / key
    cache.mkdir(parents=True, exist_ok=True)
    return {
        "trt_fp16_enable": options.precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
    }
