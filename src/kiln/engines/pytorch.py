"""PyTorch engine: the ``torch.export`` program run under ``inference_mode``.

Run options (``EngineOptions.extra``, written by ``kiln optimize`` into a variant's recipe):

- ``cast``: with precision bf16/fp16, cast weights and inputs (default: autocast, weights stay fp32);
- ``quantize``: ``"dynamic-int8"`` quantizes Linear layers dynamically (``torch.ao``);
- ``compile``: a ``torch.compile`` mode (``default``, ``max-autotune``; ``reduce-overhead`` on CUDA),
  with the batch dimension marked dynamic; ``freezing`` lets inductor fold weights.

It runs models imported from PyTorch (they carry ``model.pt2``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engines.base import Engine, EngineOptions, cast_outputs, register
from kiln.errors import CorruptModelError, UnsupportedError
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
        self.compile_mode: str | None = options.extra.get("compile")
        self.freezing = bool(options.extra.get("freezing", False))
        self.cast = bool(options.extra.get("cast", False)) and options.precision != "fp32"
        self.quantized_linears = 0

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> TorchEngine:
        import torch

        from kiln.engines import torch_runtime
        from kiln.hardware import physical_cores

        torch.set_num_threads(options.intra_op_threads or physical_cores())
        module = load_exported(artifact_dir / cls.artifact)
        quantize = options.extra.get("quantize")
        made = 0
        if quantize is not None:
            if quantize != "dynamic-int8":
                raise UnsupportedError(f"torch engine quantize={quantize!r} is unknown; use 'dynamic-int8'")
            if options.device != "cpu":
                raise UnsupportedError("torch dynamic int8 quantization runs on the CPU only")
            module, made = torch_runtime.quantize_linear_dynamic(module)
        module.to(options.device)
        engine = cls(spec, options, module)
        engine.quantized_linears = made
        if engine.cast:
            module.to(engine._dtype())
        if engine.compile_mode:
            torch_runtime.configure_compile(engine.freezing)
            engine.module = torch_runtime.compile_module(module, engine.compile_mode, options.device)
        return engine

    def _dtype(self) -> Any:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.options.precision]

    def _context(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.options.precision != "fp32" and not self.cast:
            stack.enter_context(torch.autocast(self.options.device.split(":")[0], dtype=self._dtype()))
        return stack

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        device = self.options.device
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in self._input_names]
        if self.cast:
            args = [a.to(self._dtype()) if a.is_floating_point() else a for a in args]
        if self.compile_mode:
            from kiln.engines.torch_runtime import mark_batch_dynamic

            mark_batch_dynamic(args)
        with self._context():
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
