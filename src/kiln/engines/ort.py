"""ONNX Runtime engine: CPU here; CUDA and TensorRT execution providers when present and asked for."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engines.base import Engine, EngineOptions, cast_outputs, register
from kiln.errors import CorruptModelError, UnsupportedError
from kiln.spec import ModelSpec


def providers_for(device: str, available: list[str], tensorrt: bool = False) -> list[Any]:
    """Execution providers in priority order for ``device``; CPU is always last as the fallback."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    dev_opts = {"device_id": int(index or 0)}
    chosen: list[Any] = []
    if tensorrt and "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", dev_opts))
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
        providers = options.extra.get("providers") or providers_for(
            options.device, ort.get_available_providers(), tensorrt=bool(options.extra.get("tensorrt"))
        )
        path = artifact_dir / cls.artifact
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
