"""Import saved PyTorch programs: TorchScript (``.pt``, via ``torch.jit.load``) and ``torch.export``
archives (``.pt2``, via ``torch.export.load``).

A ``.pt2`` archive may store weights, constants and sample inputs with pickle, and ``torch.export.load``
falls back to a full unpickle (which runs whatever code the file names) when the safe one fails; kiln
loads it with every ``torch.load`` held to ``weights_only=True`` and refuses a file that needs more
unless ``trust_pickle=True`` (``--trust-pickle``). A TorchScript module is converted to an
exported program when ``torch`` can (``TS2EPConverter``), so the torch engine runs it too; ONNX comes
from the dynamo exporter or, failing that, the TorchScript one. A ``.pt2`` keeps its own dynamic dims.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.convert import onnx_io
from kiln.convert.example_shapes import with_example
from kiln.convert.from_pytorch import (
    _EXPORT_BATCH,
    TorchExport,
    flatten_outputs,
    quiet_exporter,
)
from kiln.convert.importer import ImportConfig, Staged
from kiln.convert.parity import ParityResult, compare, raise_on_failure, random_inputs
from kiln.errors import CorruptModelError, ExportError, InvalidSourceError, UntrustedSourceError, first_line
from kiln.files import sha256_file
from kiln.repository import PT2_FILE
from kiln.spec import DType, TensorSpec, dtype_name

DEFAULT_DYNAMIC_SIZE = 8


_PLAIN_PAYLOADS = ("weight_", "tensor_")  # tensors stored as raw bytes; anything else is an object


def _refuse_pickled_payloads(path: Path, source: str) -> None:
    """Read the archive's weight and constant tables before torch does: an entry stored with pickle, or
    as a custom or opaque object (which ``torch.export.load`` unpickles with plain ``pickle``), needs
    ``--trust-pickle``. Legacy payloads go through ``torch.load`` and meet :func:`_tensors_only`."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            tables = [n for n in archive.namelist() if n.endswith(("_weights_config.json", "_constants_config.json"))]
            for name in tables:
                for fqn, entry in (json.loads(archive.read(name)).get("config") or {}).items():
                    stored = str(entry.get("path_name", ""))
                    if entry.get("use_pickle") or not stored.startswith(_PLAIN_PAYLOADS):
                        raise UntrustedSourceError(
                            source,
                            f"{fqn!r} is stored as a pickled object ({stored}), and loading it runs the code it "
                            "names; pass --trust-pickle (trust_pickle=True) only for a file you made or trust",
                        )
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError, OSError) as exc:
        raise CorruptModelError(source, f"not a torch.export archive: {first_line(exc)}") from None


_TORCH_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _tensors_only() -> Iterator[None]:
    """Hold every ``torch.load`` to ``weights_only=True`` while torch reads an archive: its fallback to a
    full unpickle then fails with ``pickle.UnpicklingError`` instead of running the file's code."""
    import torch

    real = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **{**kwargs, "weights_only": True})

    with _TORCH_LOAD_LOCK:
        torch.load = load
        try:
            yield
        finally:
            torch.load = real


def _finite(bound: Any, default: int) -> int:
    """A sympy range bound as an int (``default`` for infinity)."""
    if bound.is_finite is not True:
        return default
    try:
        return int(bound)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return default


class TorchScriptImporter:
    framework = "torchscript"

    def __init__(self, source: Any, config: ImportConfig) -> None:
        import torch

        self.path = Path(source)
        self.source = str(source)
        self.config = config
        self.default_name = self.path.stem
        try:
            script = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:
            raise CorruptModelError(
                self.source,
                f"not a TorchScript archive ({first_line(exc)}); a state_dict saved with torch.save is imported "
                "as --weights of a factory 'package.module:callable'",
            ) from None
        self.script = script.eval()
        shapes = config.input_shapes
        if not shapes:
            raise InvalidSourceError(
                self.source, "TorchScript models need an example input shape, e.g. --input-shape 1,3,224,224"
            )
        schema_names = [a.name for a in script.forward.schema.arguments[1:]]
        names = list(config.input_names or (schema_names if len(schema_names) == len(shapes) else []))
        if not names:
            names = [f"input_{i}" for i in range(len(shapes))]
        self.export = TorchExport.from_config(
            self.script, self.source, config, names, list(shapes), framework=self.framework
        )

    def source_hash(self) -> str:
        h = hashlib.sha256(f"torchscript|{sha256_file(self.path)}".encode())
        h.update(self.export.fingerprint().encode())
        return h.hexdigest()

    def stage(self, staging: Path) -> Staged:
        notes: list[str] = []
        with quiet_exporter():
            module = self._to_exportable(notes)
        if module is not None:
            self.export.module = module  # exported like a PyTorch module; parity still against TorchScript
        staged = self.export.stage(staging)
        staged.notes[:0] = notes
        return staged

    def _to_exportable(self, notes: list[str]) -> Any:
        """The TorchScript module as an ``nn.Module`` torch.export can trace, via TS2EPConverter."""
        import torch

        try:
            from torch._export.converter import TS2EPConverter

            example = tuple(
                torch.from_numpy(a)
                for a in random_inputs(self.export.inputs, 2, 0, self.export.shapes_at(_EXPORT_BATCH)).values()
            )
            return TS2EPConverter(self.script, example).convert().module()
        except Exception as exc:
            notes.append(f"TorchScript could not be converted to an exported program ({first_line(exc)})")
            return None


class ExportedProgramImporter:
    framework = "torch.export"

    def __init__(self, source: Any, config: ImportConfig) -> None:
        import torch

        self.path = Path(source)
        self.source = str(source)
        self.config = config
        self.default_name = self.path.stem
        if not config.trust_pickle:
            _refuse_pickled_payloads(self.path, self.source)
        try:
            with contextlib.nullcontext() if config.trust_pickle else _tensors_only():
                self.program = torch.export.load(str(self.path))
        except pickle.UnpicklingError as exc:
            raise UntrustedSourceError(
                self.source,
                "the archive holds pickled objects other than tensors, and loading them runs the code they name "
                f"({first_line(exc)}); pass --trust-pickle (trust_pickle=True) only for a file you made or trust",
            ) from None
        except Exception as exc:
            raise CorruptModelError(self.source, f"torch.export cannot load it: {first_line(exc)}") from None
        self.inputs, self.example_shapes, self.batched = self._read_inputs()

    def _read_inputs(self) -> tuple[list[TensorSpec], list[tuple[int, ...]], bool]:
        """Inputs from the program's placeholders: symbolic dims become -1, with example sizes inside
        the program's range constraints (``--input-shape`` overrides them)."""
        sig = self.program.graph_signature
        nodes = {n.name: n for n in self.program.graph.nodes if n.op == "placeholder"}
        names = list(self.config.input_names or sig.user_inputs)
        if len(names) != len(sig.user_inputs):
            raise InvalidSourceError(self.source, f"the program takes {len(sig.user_inputs)} inputs, not {len(names)}")
        given = self.config.input_shapes
        inputs, examples = [], []
        self._symbols: list[dict[int, str]] = []  # per input: dynamic non-batch axis -> its symbol
        batched = True
        for k, (user, name) in enumerate(zip(sig.user_inputs, names, strict=True)):
            val = nodes[user].meta.get("val")
            if val is None or not hasattr(val, "shape"):
                raise InvalidSourceError(
                    self.source, f"input {user!r} is not a tensor; kiln imports tensor inputs only"
                )
            shape, example = [], []
            symbols: dict[int, str] = {}
            for axis, d in enumerate(val.shape):
                if isinstance(d, int):
                    shape.append(d)
                    example.append(d)
                else:
                    shape.append(-1)
                    example.append(self._example_size(d, axis))
                    if axis > 0:
                        symbols[axis] = str(d)
            self._symbols.append(symbols)
            if not shape or shape[0] != -1:
                batched = False
            if given is not None:
                if len(given) != len(sig.user_inputs) or len(given[k]) != len(shape):
                    raise InvalidSourceError(self.source, f"--input-shape does not match input {name!r} {shape}")
                example = list(given[k])
            dtype: DType = dtype_name(str(val.dtype).replace("torch.", ""))  # type: ignore[assignment]
            inputs.append(TensorSpec(name=name, dtype=dtype, shape=tuple(shape)))
            examples.append(tuple(example))
        batched = batched and self.config.dynamic_batch
        return [with_example(t, e, batched) for t, e in zip(inputs, examples, strict=True)], examples, batched

    def _range(self, dim: Any) -> tuple[int, int]:
        lo, hi = 2, 1 << 30
        for sym, vr in self.program.range_constraints.items():
            if str(sym) == str(dim):
                lo = max(2, _finite(vr.lower, lo))
                hi = _finite(vr.upper, hi)
        return lo, hi

    def _example_size(self, dim: Any, axis: int) -> int:
        lo, hi = self._range(dim)
        want = _EXPORT_BATCH if axis == 0 else DEFAULT_DYNAMIC_SIZE
        return min(max(want, lo), hi)

    def _varied(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The shapes with every dynamic non-batch dim at another size than the example, within the
        program's range (one symbol, one size): a dim the ONNX export fixed then fails parity."""
        sizes: dict[str, int] = {}
        out = []
        for shape, symbols in zip(shapes, self._symbols, strict=True):
            new = list(shape)
            for axis, sym in symbols.items():
                if sym not in sizes:
                    lo, hi = self._range(sym)
                    now = shape[axis]
                    sizes[sym] = next((c for c in (now + 3, now + 1, now - 1, lo) if lo <= c <= hi and c != now), now)
                new[axis] = sizes[sym]
            out.append(tuple(new))
        return out

    def source_hash(self) -> str:
        h = hashlib.sha256(f"torch.export|{sha256_file(self.path)}".encode())
        cfg = self.config
        h.update(repr((self.inputs, self.example_shapes, cfg.output_names, cfg.opset, cfg.atol, cfg.rtol)).encode())
        return h.hexdigest()

    def _shapes(self, batch: int | None) -> list[tuple[int, ...]]:
        return [(batch, *s[1:]) if batch is not None and self.batched else s for s in self.example_shapes]

    def stage(self, staging: Path) -> Staged:
        with quiet_exporter():
            return self._stage(staging)

    def _stage(self, staging: Path) -> Staged:
        import torch

        shutil.copyfile(self.path, staging / PT2_FILE)
        example_feed = random_inputs(self.inputs, _EXPORT_BATCH, 0, self._shapes(_EXPORT_BATCH))
        example = tuple(torch.from_numpy(a) for a in example_feed.values())
        try:
            module = self.program.module()
        except Exception as exc:
            raise CorruptModelError(self.source, f"torch.export cannot rebuild its module: {first_line(exc)}") from None
        with torch.no_grad():
            tensors, dict_names = flatten_outputs(module(*example))
        out_names = list(self.config.output_names or dict_names or (
            ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
        ))  # fmt: skip
        if len(out_names) != len(tensors):
            raise InvalidSourceError(self.source, f"the program returns {len(tensors)} outputs, not {len(out_names)}")
        try:
            onnx_program = torch.onnx.export(
                self.program, example, dynamo=True, opset_version=self.config.opset, optimize=True, verbose=False
            )
            if onnx_program is None:
                raise ExportError("torch.onnx.export returned no program")
            model = onnx_program.model_proto
        except Exception as exc:
            raise ExportError(f"cannot export {self.source} to ONNX: {first_line(exc)}") from None
        graph_in = [v.name for v in model.graph.input]
        graph_out = [v.name for v in model.graph.output]
        onnx_io.rename_io(
            model,
            dict(zip(graph_in, [t.name for t in self.inputs], strict=True)),
            dict(zip(graph_out, out_names, strict=True)),
        )
        if self.batched:
            onnx_io.name_batch_dim(model)
        dst = staging / onnx_io.ONNX_FILE
        onnx_io.save(model, dst)
        onnx_io.check(dst)
        onnx_io.infer_shapes(dst)
        _, outputs = onnx_io.graph_tensors(onnx_io.load(dst, external_data=False))
        parity = self._check_parity(dst, module, [t.name for t in outputs])
        return Staged(self.framework, f"torch.onnx dynamo exporter (torch {torch.__version__})", self.inputs,
                      outputs, self.batched, parity)  # fmt: skip

    def _check_parity(self, path: Path, module: Any, names: list[str]) -> list[ParityResult]:
        import onnxruntime as ort
        import torch

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results: list[ParityResult] = []
        for batch in (1, 4) if self.batched else (None,):
            shapes = self._varied(self._shapes(batch)) if batch == 4 else self._shapes(batch)
            feed = random_inputs(self.inputs, batch or 1, 100 + (batch or 1), shapes)
            with torch.inference_mode():
                ref_t = flatten_outputs(module(*(torch.from_numpy(a) for a in feed.values())))[0]
            reference = {n: t.detach().numpy() for n, t in zip(names, ref_t, strict=True)}
            candidate = dict(zip(names, session.run(names, feed), strict=True))
            found = compare(reference, candidate, batch or 1, self.config.atol, self.config.rtol)
            raise_on_failure(found, self.config.atol, self.config.rtol)
            results.extend(found)
        return results
