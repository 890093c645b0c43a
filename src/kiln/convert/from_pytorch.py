"""Import a PyTorch model: build it from a factory, load weights safely, export with ``torch.export``
(saved as ``model.pt2`` for the torch engine) and to ONNX with a dynamic batch dimension, then check
that ONNX Runtime and the exported program agree with eager PyTorch."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kiln.convert import onnx_io
from kiln.convert.factory import resolve
from kiln.convert.importer import ImportConfig, Staged
from kiln.convert.parity import ParityResult, compare, raise_on_failure, random_inputs
from kiln.errors import ExportError, InvalidSourceError
from kiln.spec import DType, TensorSpec

log = logging.getLogger(__name__)

PT2_FILE = "model.pt2"
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
        raise InvalidSourceError(source, f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise InvalidSourceError(source, f"weights {path} hold a {type(state).__name__}, expected a state_dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidSourceError(source, f"weights {path} do not fit the model: {str(exc).splitlines()[0]}") from None


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
        dtypes: list[DType] = list(config.input_dtypes or ["float32"] * len(shapes))
        if len(dtypes) != len(shapes):
            raise InvalidSourceError(self.source, f"{len(shapes)} input shapes but {len(dtypes)} input dtypes")
        names = list(config.input_names or self._forward_names(len(shapes)))
        if len(names) != len(shapes):
            raise InvalidSourceError(self.source, f"{len(shapes)} input shapes but {len(names)} input names")
        batch = -1 if config.dynamic_batch else None
        self.inputs = [
            TensorSpec(name=n, dtype=d, shape=(batch or s[0], *s[1:]) if s else ())
            for n, d, s in zip(names, dtypes, shapes, strict=True)
        ]

    def _forward_names(self, n: int) -> list[str]:
        params = [
            p.name for p in inspect.signature(self.module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]  # fmt: skip
        return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]

    def source_hash(self) -> str:
        import torch

        h = hashlib.sha256(f"pytorch|{type(self.module).__qualname__}|{self.source}".encode())
        for key, tensor in self.module.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        cfg = self.config
        h.update(repr((self.inputs, cfg.output_names, cfg.dynamic_batch, cfg.opset, cfg.atol, cfg.rtol)).encode())
        return h.hexdigest()

    # ---- export ----------------------------------------------------------------------------------------
    def _example(self, batch: int) -> tuple[Any, ...]:
        import torch

        return tuple(torch.from_numpy(a) for a in random_inputs(self.inputs, batch, seed=batch).values())

    def _eager(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(a) for a in feed.values()))
        return [
            t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
            for t in flatten_outputs(out)[0]
        ]

    def stage(self, staging: Path) -> Staged:
        with quiet_exporter():
            return self._stage(staging)

    def _stage(self, staging: Path) -> Staged:
        import torch

        notes: list[str] = []
        batched = self.config.dynamic_batch
        example = self._example(_EXPORT_BATCH if batched else self.inputs[0].shape[0] if self.inputs[0].shape else 1)
        with torch.no_grad():
            probe = self.module(*example)
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
            dim = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
            dyn = tuple({0: dim} if batched and t.shape else None for t in self.inputs)
            program = torch.export.export(module, example, dynamic_shapes=dyn if batched else None)
            torch.export.save(program, str(staging / PT2_FILE))
        except Exception as exc:
            notes.append(f"torch.export failed ({_first_line(exc)}); the torch engine is not available for this model")
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
        parity = self._check_parity(staging, program, outputs, batched)
        return Staged(self.framework, exporter, self.inputs, outputs, batched, parity, notes)

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
                onnx_io.save(model, dst)
                return f"torch.onnx dynamo exporter (torch {torch.__version__})"
            except Exception as exc:
                notes.append(
                    f"the dynamo ONNX exporter failed ({_first_line(exc)}); used the legacy TorchScript exporter"
                )
        dynamic_axes = {n: {0: "batch"} for n in [*in_names, *out_names]} if self.config.dynamic_batch else None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            try:
                torch.onnx.export(
                    module, example, str(path), dynamo=False, input_names=in_names, output_names=out_names,
                    dynamic_axes=dynamic_axes, opset_version=self.config.opset or 17,
                )  # fmt: skip
            except Exception as exc:
                raise ExportError(f"cannot export {self.source} to ONNX: {_first_line(exc)}") from None
            onnx_io.save(onnx_io.load(path), dst)
        for note in notes:
            log.warning(note)
        return f"torch.onnx legacy TorchScript exporter (torch {torch.__version__})"

    def _check_parity(
        self, staging: Path, program: Any, outputs: list[TensorSpec], batched: bool
    ) -> list[ParityResult]:
        import onnxruntime as ort
        import torch

        session = ort.InferenceSession(str(staging / onnx_io.ONNX_FILE), providers=["CPUExecutionProvider"])
        exported = program.module() if program is not None else None
        names = [t.name for t in outputs]
        results: list[ParityResult] = []
        for batch in PARITY_BATCHES if batched else (self.inputs[0].shape[0] if self.inputs[0].shape else 1,):
            feed = random_inputs(self.inputs, batch, seed=100 + batch)
            reference = dict(zip(names, self._eager(feed), strict=True))
            candidates = [(onnx_io.ONNX_FILE, dict(zip(names, session.run(names, feed), strict=True)))]
            if exported is not None:
                with torch.inference_mode():
                    out = exported(*(torch.from_numpy(a) for a in feed.values()))
                candidates.append(
                    (PT2_FILE, dict(zip(names, [t.numpy() for t in flatten_outputs(out)[0]], strict=True)))
                )
            for artifact, cand in candidates:
                found = compare(reference, cand, batch, self.config.atol, self.config.rtol, artifact)
                raise_on_failure(found, self.config.atol, self.config.rtol)
                results.extend(found)
        return results


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Hide the exporters' chatter (torchvision op registration, deprecations); real errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
