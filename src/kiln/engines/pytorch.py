"""PyTorch engine: the ``torch.export`` program run eagerly under ``inference_mode``, optionally with
bf16/fp16 autocast. It runs models imported from PyTorch (they carry ``model.pt2``)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engines.base import Engine, EngineOptions, cast_outputs, register
from kiln.errors import CorruptModelError
from kiln.spec import ModelSpec


@register
class TorchEngine(Engine):
    name = "torch"
    artifact = "model.pt2"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "bf16", "fp16")

    def __init__(self, spec: ModelSpec, options: EngineOptions, module: Any) -> None:
        super().__init__(spec, options)
        self.module = module
        self._input_names = [t.name for t in spec.inputs]
        self._output_names = [t.name for t in spec.outputs]

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> TorchEngine:
        import torch

        from kiln.hardware import physical_cores

        torch.set_num_threads(options.intra_op_threads or physical_cores())
        module = load_exported(artifact_dir / cls.artifact)
        module.to(options.device)
        return cls(spec, options, module)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.options.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(self.options.device.split(":")[0], dtype=dtype)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        device = self.options.device
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in self._input_names]
        with torch.inference_mode(), self._autocast():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else [out]
        arrays = {
            n: (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).cpu().numpy()
            for n, t in zip(self._output_names, outs, strict=True)
        }
        return cast_outputs(self.spec, arrays)

    def close(self) -> None:
        self.module = None


def load_exported(path: Path) -> Any:
    """Load a ``torch.export`` archive as a callable module (no arbitrary unpickling)."""
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise CorruptModelError(str(path), f"torch.export cannot load it: {exc}") from None
    return program.module()
