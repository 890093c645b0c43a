"""Import a PyTorch model: build it from a factory, load weights safely, export with ``torch.export``
(saved as ``model.pt2`` for the torch engine) and to ONNX with a dynamic batch dimension, then check
that ONNX Runtime and the exported program agree with eager PyTorch."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kiln.convert import onnx_io
from kiln.convert.diagnose import core_line, expectation, fixed_shape, state_dict_mismatch
from kiln.convert.example_shapes import with_example
from kiln.convert.factory import resolve
from kiln.convert.importer import ImportConfig, Staged
from kiln.convert.parity import ParityResult, compare, raise_on_failure, random_inputs
from kiln.errors import ExportError, InvalidSourceError, first_line
from kiln.repository import PT2_FILE
from kiln.spec import DType, TensorSpec

log = logging.getLogger(__name__)

PARITY_BATCHES = (1, 4)
_EXPORT_BATCH = 2  # torch.export specialises a dimension of size 1, so trace the batch at 2
_MAX_BATCH = 1 << 16


def load_weights(module: Any, path: Path, source: str) -> None:
    """Load a safetensors file or a plain state_dict (never arbitrary pickles: ``weights_only=True``)."""
    import torch

    if not path.is_file():
        raise InvalidSourceError(source, f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as exc:
        raise InvalidSourceError(source, f"cannot read weights {path}: {first_line(exc)}") from None
    if not isinstance(state, dict):
        raise InvalidSourceError(source, f"weights {path} hold a {type(state).__name__}, expected a state_dict")
    problems = state_dict_mismatch(module, state)
    if problems:
        raise InvalidSourceError(
            source, f"weights {path} do not fit the model ({type(module).__name__}): {problems}; pass the weights "
            "saved from this model's state_dict(), or the factory that builds the model they came from"
        )  # fmt: skip
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidSourceError(source, f"weights {path} do not fit the model: {first_line(exc)}") from None


def flatten_outputs(out: Any) -> tuple[list[Any], list[str] | None]:
    """Model outputs as a list of tensors, plus names when the model returns a dict."""
    if isinstance(out, dict):
        return list(out.values()), [str(k) for k in out]
    if isinstance(out, (tuple, list)):
        return list(out), None
    return [out], None


class _Flat:
    """Wrap a module whose forward returns a dict so that exporters see a tuple."""

    @staticmethod
    def wrap(module: Any) -> Any:
        import torch

        class FlatOutputs(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *args: Any) -> Any:
                return tuple(flatten_outputs(self.inner(*args))[0])

        return FlatOutputs(module).eval()


class TorchImporter:
    framework = "pytorch"

    def __init__(self, source: Any, config: ImportConfig) -> None:
        import torch

        self.config = config
        self.source = source if isinstance(source, str) else f"<{type(source).__name__}>"
        obj = resolve(source) if isinstance(source, str) else source
        if isinstance(obj, torch.nn.Module):
            module = obj
        elif callable(obj):
            try:
                module = obj()
            except Exception as exc:
                raise InvalidSourceError(
                    self.source, f"calling the factory raised {type(exc).__name__}: {exc}"
                ) from None
        else:
            raise InvalidSourceError(self.source, f"{type(obj).__name__} is neither a torch.nn.Module nor a callable")
        if not isinstance(module, torch.nn.Module):
            raise InvalidSourceError(
                self.source, f"the factory returned {type(module).__name__}, not a torch.nn.Module"
            )
        if config.weights is not None:
            load_weights(module, Path(config.weights), self.source)
        self.module = module.eval()
        self.default_name = (source.rpartition(":")[2] if isinstance(source, str) else type(module).__name__).lower()
        shapes = config.input_shapes
        if not shapes:
            raise InvalidSourceError(
                self.source, "PyTorch models need an example input shape, e.g. --input-shape 1,3,224,224"
            )
        names = list(config.input_names or forward_names(self.module, len(shapes)))
        self.export = TorchExport.from_config(self.module, self.source, config, names, shapes)
        self.inputs = self.export.inputs

    def source_hash(self) -> str:
        h = hashlib.sha256(f"pytorch|{type(self.module).__qualname__}|{self.source}".encode())
        update_with_state(h, self.module)
        h.update(self.export.fingerprint().encode())
        return h.hexdigest()

    def stage(self, staging: Path) -> Staged:
        return self.export.stage(staging)


def forward_names(module: Any, n: int) -> list[str]:
    """The first ``n`` positional parameter names of ``module.forward`` (``input_i`` when it has fewer)."""
    try:
        params = [
            p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]  # fmt: skip
    except (TypeError, ValueError):
        params = []
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]


def update_with_state(h: Any, module: Any) -> None:
    import torch

    for key, tensor in module.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def dynamic_dims(
    source: str, names: list[str], shapes: list[tuple[int, ...]], config: ImportConfig, auto: dict[str, dict[int, str]]
) -> dict[str, dict[int, str]]:
    """Named dynamic dimensions other than batch, per input: ``auto`` (from the source) plus
    ``config.dynamic_axes``; checked against the inputs' ranks."""
    dims: dict[str, dict[int, str]] = {n: dict(auto.get(n, {})) for n in names}
    for name, axes in (config.dynamic_axes or {}).items():
        if name not in dims:
            raise InvalidSourceError(source, f"--dynamic-axis names input {name!r}; the inputs are {names}")
        rank = len(shapes[names.index(name)])
        for axis, dim in axes.items():
            if not 0 <= axis < rank:
                raise InvalidSourceError(source, f"input {name!r} has {rank} dimensions; axis {axis} does not exist")
            if axis == 0 and config.dynamic_batch:
                continue  # the batch dimension is dynamic already
            dims[name][axis] = dim
    return dims


class TorchExport:
    """Export one module to ``model.pt2`` (torch.export) and ``model.onnx`` (dynamo exporter, the legacy
    one as a fallback), with dynamic batch and named dynamic dims, then check both against ``reference``
    (by default the module run eagerly) at batch 1 and 4 on different sizes of every dynamic dim."""

    def __init__(
        self,
        module: Any,
        source: str,
        config: ImportConfig,
        inputs: list[TensorSpec],
        example_shapes: list[tuple[int, ...]],
        dims: dict[str, dict[int, str]],
        framework: str = "pytorch",
        reference: Any = None,
    ) -> None:
        self.module = module
        self.source = source
        self.config = config
        self.inputs = inputs
        self.example_shapes = example_shapes
        self.dims = dims
        self.framework = framework
        self.reference = reference or module

    @classmethod
    def from_config(
        cls,
        module: Any,
        source: str,
        config: ImportConfig,
        names: list[str],
        shapes: list[tuple[int, ...]],
        auto_dims: dict[str, dict[int, str]] | None = None,
        framework: str = "pytorch",
        reference: Any = None,
        dtypes: list[DType] | None = None,
    ) -> TorchExport:
        dtypes = list(config.input_dtypes or dtypes or ["float32"] * len(shapes))
        if len(dtypes) != len(shapes):
            raise InvalidSourceError(source, f"{len(shapes)} input shapes but {len(dtypes)} input dtypes")
        if len(names) != len(shapes):
            raise InvalidSourceError(source, f"{len(shapes)} input shapes but {len(names)} input names")
        dims = dynamic_dims(source, names, shapes, config, auto_dims or {})
        batched = config.dynamic_batch
        inputs = []
        for n, d, s in zip(names, dtypes, shapes, strict=True):
            shape = [(-1 if (i == 0 and batched) or i in dims[n] else v) for i, v in enumerate(s)]
            for axis in dims[n]:
                if s[axis] < 2:
                    raise InvalidSourceError(
                        source, f"input {n!r} axis {axis} is dynamic, so its example size must be at least 2 "
                        f"(got {s[axis]}): torch.export treats sizes 0 and 1 as constants"
                    )  # fmt: skip
            inputs.append(with_example(TensorSpec(name=n, dtype=d, shape=tuple(shape)), s, batched))
        return cls(module, source, config, inputs, [tuple(s) for s in shapes], dims, framework, reference)

    def fingerprint(self) -> str:
        cfg = self.config
        return repr((self.inputs, self.example_shapes, self.dims, cfg.output_names, cfg.dynamic_batch, cfg.opset,
                     cfg.atol, cfg.rtol))  # fmt: skip

    @property
    def batched(self) -> bool:
        return self.config.dynamic_batch and all(t.shape for t in self.inputs)

    def shapes_at(self, batch: int, vary: bool = False) -> list[tuple[int, ...]]:
        """Example shapes at ``batch``; with ``vary``, every dynamic dim takes another size than the example."""
        out = []
        for t, s in zip(self.inputs, self.example_shapes, strict=True):
            shape = list(s)
            if self.batched and shape:
                shape[0] = batch
            if vary:
                for axis in self.dims[t.name]:
                    shape[axis] = s[axis] // 2 if s[axis] >= 4 else s[axis] + 1
            out.append(tuple(shape))
        return out

    # ---- export ----------------------------------------------------------------------------------------
    def _example(self, batch: int) -> tuple[Any, ...]:
        import torch

        feed = random_inputs(self.inputs, batch, seed=batch, shapes=self.shapes_at(batch))
        return tuple(torch.from_numpy(a) for a in feed.values())

    def _eager(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.reference(*(torch.from_numpy(a) for a in feed.values()))
        return [
            t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
            for t in flatten_outputs(out)[0]
        ]

    def _probe(self, example: tuple[Any, ...]) -> Any:
        """The model run once on the example; a model that refuses it (a wrong --input-shape, a forgotten
        batch dim) is a user error naming the shape given and what the refusing layer expects."""
        import torch

        stack: list[tuple[str, Any, list[int] | None]] = []
        culprit: list[tuple[str, Any, list[int] | None]] = []
        handles = []
        if isinstance(self.reference, torch.nn.Module) and not isinstance(self.reference, torch.jit.ScriptModule):

            def enter(name: str) -> Any:
                def hook(mod: Any, args: Any) -> None:
                    first = args[0] if args else None
                    stack.append((name, mod, list(first.shape) if isinstance(first, torch.Tensor) else None))
                    culprit[:] = stack[-1:]

                return hook

            def leave(_mod: Any, _args: Any, _out: Any) -> None:
                stack.pop()
                culprit[:] = []

            for name, mod in self.reference.named_modules():
                if name:  # the root itself is what the user called
                    handles.append(mod.register_forward_pre_hook(enter(name)))
                    handles.append(mod.register_forward_hook(leave))
        try:
            with torch.no_grad():
                return self.reference(*example)
        except Exception as exc:
            where = culprit[0] if culprit else None
            raise InvalidSourceError(self.source, self._rejection(example, where, exc)) from None
        finally:
            for h in handles:
                h.remove()

    def _rejection(self, example: tuple[Any, ...], where: tuple[str, Any, list[int] | None] | None,
                   exc: Exception) -> str:  # fmt: skip
        given = " ".join(f"--input-shape {','.join(map(str, s))}" for s in self.example_shapes)
        shapes = [list(t.shape) for t in example]
        batch = f", run at batch {shapes[0][0]} as {shapes[0] if len(shapes) == 1 else shapes}" if self.batched else ""
        head = f"the model rejects {given}{batch}"
        if where is not None:
            name, mod, got = where
            expects = expectation(mod)
            problem = f"{name} ({type(mod).__name__}) {expects}, got {got}" if expects and got else (
                f"{name} ({type(mod).__name__}) raised {core_line(exc)}")  # fmt: skip
        else:
            problem = core_line(exc)
        fix = self._suggest(where)
        return f"{head}: {problem}; {fix}"

    def _suggest(self, where: tuple[str, Any, list[int] | None] | None) -> str:
        """A shape the model runs at, when one is near the given one: the batch dim put in front, or (one
        input) the dim the refusing layer names set as it expects."""
        import torch.nn as nn

        if (
            where is not None
            and isinstance(where[1], nn.Embedding)
            and any(t.dtype.startswith("float") for t in self.inputs)
        ):
            return (
                f"token ids are integers, and the inputs were {[t.dtype for t in self.inputs]}: pass --input-dtype "
                "int64 for the id inputs (one --input-dtype per input, in order)"
            )
        batched = [(1, *s) for s in self.example_shapes]
        if self._runs(batched):
            flags = " ".join(f"--input-shape {','.join(map(str, s))}" for s in batched)
            return f"the first number of --input-shape is the batch dim, and it seems missing: pass {flags}"
        if where is not None and len(self.example_shapes) == 1:
            wanted = fixed_shape(where[1], self.example_shapes[0])
            if wanted is not None and self._runs([wanted]):
                return f"pass the shape the model takes, e.g. --input-shape {','.join(map(str, wanted))}"
        return "pass the example shape the model takes, batch first (--input-shape 1,C,H,W for one image)"

    def _runs(self, shapes: list[tuple[int, ...]]) -> bool:
        import torch

        try:
            batch = 2 if self.batched else shapes[0][0]
            sized = [(batch, *s[1:]) if self.batched else s for s in shapes]
            feed = random_inputs(self.inputs_for(sized), batch, seed=0, shapes=sized)
            with torch.no_grad():
                self.reference(*(torch.from_numpy(a) for a in feed.values()))
            return True
        except Exception:
            return False

    def inputs_for(self, shapes: list[tuple[int, ...]]) -> list[TensorSpec]:
        """The inputs with the rank of ``shapes`` (what a suggested shape would give)."""
        return [t.model_copy(update={"shape": tuple(-1 for _ in s)}) for t, s in zip(self.inputs, shapes, strict=True)]

    def dynamic_shapes(self, module: Any = None, auto: bool = False) -> tuple[Any, ...] | None:
        """torch.export's ``dynamic_shapes`` for ``module`` (a ``forward(*args)`` takes them as one tuple);
        ``auto`` lets torch infer each dim's range (and equalities) instead of ``1..65536``."""
        import torch

        if not self.batched and not any(self.dims.values()):
            return None
        made: dict[str, Any] = {}

        def dim(name: str) -> Any:
            key = re.sub(r"\W", "_", name)
            if auto:
                return torch.export.Dim.AUTO
            if key not in made:
                made[key] = torch.export.Dim(key, min=1, max=_MAX_BATCH)
            return made[key]

        spec = []
        for t in self.inputs:
            axes = {0: dim("batch")} if self.batched and t.shape else {}
            axes.update({axis: dim(n) for axis, n in self.dims[t.name].items()})
            spec.append(axes or None)
        if module is not None and _takes_varargs(module):
            return (tuple(spec),)
        return tuple(spec)

    def stage(self, staging: Path) -> Staged:
        with quiet_exporter():
            return self._stage(staging)

    def _stage(self, staging: Path) -> Staged:
        import torch

        notes: list[str] = []
        example = self._example(
            _EXPORT_BATCH if self.batched else self.example_shapes[0][0] if self.inputs[0].shape else 1
        )
        probe = self._probe(example)
        tensors, dict_names = flatten_outputs(probe)
        out_names = list(self.config.output_names or dict_names or (
            ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
        ))  # fmt: skip
        if len(out_names) != len(tensors):
            raise InvalidSourceError(
                self.source,
                f"the model returns {len(tensors)} outputs but {len(out_names)} output names were given",
            )
        module = _Flat.wrap(self.module) if dict_names else self.module

        program = None
        try:
            if isinstance(module, torch.jit.ScriptModule):
                raise ExportError("a TorchScript module cannot be traced by torch.export")
            try:
                program = torch.export.export(module, example, dynamic_shapes=self.dynamic_shapes(module))
            except Exception as exc:
                if "Constraints violated" not in str(exc):
                    raise
                # The model needs narrower ranges (e.g. height >= 3 after a stride-2 conv): let torch infer them.
                program = torch.export.export(module, example, dynamic_shapes=self.dynamic_shapes(module, auto=True))
                notes.append("torch.export inferred the ranges of the dynamic dims (the model limits them)")
            torch.export.save(program, str(staging / PT2_FILE))
        except Exception as exc:
            notes.append(f"torch.export failed ({first_line(exc)}); the torch engine is not available for this model")
            program = None

        exporter = self._export_onnx(module, program, example, out_names, staging / onnx_io.ONNX_FILE, notes)
        dst = staging / onnx_io.ONNX_FILE
        onnx_io.check(dst)
        onnx_io.infer_shapes(dst)
        graph_inputs, outputs = onnx_io.graph_tensors(onnx_io.load(dst, external_data=False))
        if [t.name for t in graph_inputs] != [t.name for t in self.inputs]:
            raise ExportError(
                f"the exported ONNX graph has inputs {[t.name for t in graph_inputs]}, expected {[t.name for t in self.inputs]}"
            )
        parity = self._check_parity(staging, program, outputs)
        return Staged(self.framework, exporter, self.inputs, outputs, self.batched, parity, notes)

    def _export_onnx(
        self,
        module: Any,
        program: Any,
        example: tuple[Any, ...],
        out_names: list[str],
        dst: Path,
        notes: list[str],
    ) -> str:
        import torch

        in_names = [t.name for t in self.inputs]
        if program is not None:
            try:
                onnx_program = torch.onnx.export(
                    program, example, dynamo=True, opset_version=self.config.opset, optimize=True, verbose=False
                )
                if onnx_program is None:
                    raise ExportError("torch.onnx.export returned no program")
                model = onnx_program.model_proto
                graph_in = [v.name for v in model.graph.input]
                graph_out = [v.name for v in model.graph.output]
                if len(graph_in) != len(in_names) or len(graph_out) != len(out_names):
                    raise ExportError(f"the exported graph has {len(graph_in)} inputs and {len(graph_out)} outputs")
                onnx_io.rename_io(
                    model, dict(zip(graph_in, in_names, strict=True)), dict(zip(graph_out, out_names, strict=True))
                )
                onnx_io.name_batch_dim(model)
                onnx_io.name_dims(model, self.dims)
                onnx_io.save(model, dst)
                return f"torch.onnx dynamo exporter (torch {torch.__version__})"
            except Exception as exc:
                notes.append(
                    f"the dynamo ONNX exporter failed ({first_line(exc)}); used the legacy TorchScript exporter"
                )
        dynamic_axes: dict[str, dict[int, str]] = {}
        for n in [*in_names, *out_names]:
            axes = {0: "batch"} if self.batched else {}
            axes.update(self.dims.get(n, {}))
            if axes:
                dynamic_axes[n] = axes
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / onnx_io.ONNX_FILE
            try:
                torch.onnx.export(
                    module, example, str(path), dynamo=False, input_names=in_names, output_names=out_names,
                    dynamic_axes=dynamic_axes or None, opset_version=self.config.opset or 17,
                )  # fmt: skip
            except Exception as exc:
                raise ExportError(f"cannot export {self.source} to ONNX: {first_line(exc)}") from None
            onnx_io.save(onnx_io.load(path), dst)
        for note in notes:
            log.warning(note)
        return f"torch.onnx legacy TorchScript exporter (torch {torch.__version__})"

    def _check_parity(self, staging: Path, program: Any, outputs: list[TensorSpec]) -> list[ParityResult]:
        import onnxruntime as ort
        import torch

        session = ort.InferenceSession(str(staging / onnx_io.ONNX_FILE), providers=["CPUExecutionProvider"])
        exported = program.module() if program is not None else None
        names = [t.name for t in outputs]
        results: list[ParityResult] = []
        batches = PARITY_BATCHES if self.batched else (self.example_shapes[0][0] if self.inputs[0].shape else 1,)
        for k, batch in enumerate(batches):
            feed = random_inputs(self.inputs, batch, seed=100 + batch, shapes=self.shapes_at(batch, vary=k > 0))
            try:
                reference = dict(zip(names, self._eager(feed), strict=True))
            except Exception as exc:
                shapes = [list(a.shape) for a in feed.values()]
                raise InvalidSourceError(
                    self.source,
                    f"the model rejects inputs of shapes {shapes}, the example with its dynamic dims at "
                    f"other sizes: {core_line(exc)}; a dim marked dynamic (--dynamic-axis) may be fixed by the model",
                ) from None
            candidates = [(onnx_io.ONNX_FILE, dict(zip(names, session.run(names, feed), strict=True)))]
            if exported is not None:
                try:
                    with torch.inference_mode():
                        out = exported(*(torch.from_numpy(a) for a in feed.values()))
                except Exception as exc:
                    raise ExportError(
                        f"the exported program rejects inputs of shapes {[list(a.shape) for a in feed.values()]}: "
                        f"{first_line(exc)}; a dim marked dynamic may be fixed by the model"
                    ) from None
                candidates.append(
                    (PT2_FILE, dict(zip(names, [t.numpy() for t in flatten_outputs(out)[0]], strict=True)))
                )
            for artifact, cand in candidates:
                found = compare(reference, cand, batch, self.config.atol, self.config.rtol, artifact)
                raise_on_failure(found, self.config.atol, self.config.rtol)
                results.extend(found)
        return results


def _takes_varargs(module: Any) -> bool:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_POSITIONAL for p in params)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The settings ``torch.export`` runs under: the exporters' chatter hidden (torchvision op registration,
    deprecations; real errors still raise) and dynamo's process-wide ``backed_size_oblivious`` off.

    A compiled engine in the same process switches that flag on (one graph for batch 1…N); left on during
    an export, it turns a dynamic batch into a guard ``batch != 1`` for modules such as
    ``nn.MultiheadAttention``, and the exported program then rejects a batch of 1.
    """
    import torch.fx.experimental._config as fx_config

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), fx_config.patch(backed_size_oblivious=False):  # type: ignore[attr-defined]
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
