"""PyTorch engine: the ``torch.export`` program run under ``inference_mode``.

Run options (:class:`TorchOptions`, written by ``kiln optimize`` into a variant's recipe):

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
from typing import Any, Literal

import numpy as np

from kiln.engines.base import Engine, EngineOptions, LabelParts, RunOptions, cast_outputs, register
from kiln.errors import CorruptModelError, UnsupportedError
from kiln.recipe import PlanContext, PrecisionName, Recipe, Skipped, step
from kiln.repository import PT2_FILE
from kiln.spec import ModelSpec


class TorchOptions(RunOptions):
    cast: bool | None = None  # bf16/fp16: cast weights and inputs (True) or autocast (False / unset)
    quantize: Literal["dynamic-int8"] | None = None
    compile: str | None = None  # a torch.compile mode
    freezing: bool = False


@register
class TorchEngine(Engine):
    name = "torch"
    triton_platform = "pytorch_libtorch"
    triton_backend = "pytorch"
    artifact = PT2_FILE
    Options = TorchOptions
    devices = ("cpu", "cuda")
    cuda_stack = "torch"
    precisions = ("fp32", "bf16", "fp16")

    def __init__(self, spec: ModelSpec, options: EngineOptions, module: Any) -> None:
        super().__init__(spec, options)
        self.module = module
        self._input_names = [t.name for t in spec.inputs]
        self._output_names = [t.name for t in spec.outputs]
        run = TorchOptions.of(options)
        self.compile_mode: str | None = run.compile
        self.freezing = run.freezing
        self.cast = bool(run.cast) and options.precision != "fp32"
        self.quantized_linears = 0

    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> LabelParts:
        cast = options.get("cast")
        suffix = "" if cast is None else " cast" if cast else " autocast"
        compiled = options.get("compile")
        middle = (f"compile {compiled}" + (" +freezing" if options.get("freezing") else ""),) if compiled else ()
        return LabelParts(precision_suffix=suffix, middle=middle)

    @classmethod
    def is_plain(cls, options: Mapping[str, Any]) -> bool:
        return not options.get("compile")

    @classmethod
    def reset_compiled(cls) -> None:
        import torch

        torch._dynamo.reset()

    @classmethod
    def candidates(cls, ctx: PlanContext) -> tuple[list[Recipe], list[Skipped]]:
        """Eager fp32; bf16/fp16 cast and autocast; conv-bn folded; dynamic int8 (CPU); torch.compile."""
        recipes = [Recipe(engine=cls.name)]
        skipped: list[Skipped] = []
        reduced: tuple[tuple[PrecisionName, bool], ...] = (("bf16", ctx.bf16), ("fp16", ctx.fp16))
        for precision, ok in reduced:
            if ok:
                recipes.append(Recipe(engine=cls.name, precision=precision, options={"cast": False}))
                recipes.append(Recipe(engine=cls.name, precision=precision, options={"cast": True}))
        if ctx.graph_passes:
            recipes.append(Recipe(engine=cls.name, passes=(step("fold-conv-bn"),)))
        if "torch-dynamic" in ctx.int8:
            if ctx.device.kind == "cpu":
                recipes.append(Recipe(engine=cls.name, int8="torch-dynamic", passes=(step("torch-dynamic"),),
                                      options={"quantize": "dynamic-int8"}))  # fmt: skip
            else:
                skipped.append(Skipped("torch int8 dynamic", "torch dynamic quantization runs on the CPU only"))
        low: PrecisionName = "bf16" if ctx.bf16 else "fp32"
        for mode in ctx.compile_modes:
            if mode == "reduce-overhead" and ctx.device.kind == "cpu":
                skipped.append(Skipped("torch compile reduce-overhead", "uses CUDA graphs: CUDA only"))
                continue
            opts: dict[str, Any] = {"compile": mode, "freezing": True}
            recipes.append(
                Recipe(engine=cls.name, precision=low, options={**opts, "cast": True} if low != "fp32" else opts)
            )
            if ctx.compile_fp32 and low != "fp32":
                recipes.append(Recipe(engine=cls.name, options=opts))
        if "max-autotune" not in ctx.compile_modes and ctx.compile_modes:
            skipped.append(Skipped("torch compile max-autotune", "slow to build and rarely wins on CPU; preset 'thorough' or --compile max-autotune"))  # fmt: skip
        return recipes, skipped

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> TorchEngine:
        import torch

        from kiln.engines import torch_runtime
        from kiln.hardware import physical_cores

        torch.set_num_threads(options.intra_op_threads or physical_cores())
        module = load_exported(artifact_dir / cls.artifact)
        made = 0
        if TorchOptions.of(options).quantize is not None:
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
