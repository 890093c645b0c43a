"""Passes: each a function from the artifact in a work directory plus parameters to a new artifact
there, registered by name and recorded (with its parameters) in the variant's recipe.

- graph: ``onnxslim``, ``ort-optimize`` (ONNX Runtime's offline-optimized graph), ``fold-conv-bn``
  (torch), ``ov-convert`` (ONNX → OpenVINO IR);
- precision: ``ort-fp16`` (CUDA only; on CPU ONNX Runtime runs fp16 slower than fp32). bf16 for torch
  and OpenVINO is a run option of the engine (autocast/cast, the inference-precision hint);
- int8: ``ort-dynamic``, ``ort-static`` (QDQ with MinMax/Entropy/Percentile calibration),
  ``nncf`` (post-training quantization of the OpenVINO IR), ``torch-dynamic`` (Linear layers; the
  engine quantizes at load, this pass checks there is something to quantize).
"""

from __future__ import annotations

from kiln.optimize.passes.base import (
    PassContext,
    PassFn,
    PassReport,
    get_pass,
    known_passes,
    register_pass,
    run_passes,
)

__all__ = [
    "PassContext",
    "PassFn",
    "PassReport",
    "get_pass",
    "known_passes",
    "register_pass",
    "run_passes",
]
