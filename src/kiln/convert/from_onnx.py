"""Import an ONNX file: check it, infer shapes, read its tensors into a spec, and store it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from kiln.convert import onnx_io
from kiln.convert.importer import ImportConfig, Staged
from kiln.convert.parity import random_inputs
from kiln.errors import CorruptModelError, first_line
from kiln.files import sha256_file
from kiln.spec import TensorSpec


class OnnxImporter:
    framework = "onnx"

    def __init__(self, source: str | Path, config: ImportConfig) -> None:
        self.path = Path(source)
        self.config = config
        self.default_name = self.path.stem
        onnx_io.check(self.path)  # fail early, naming the user's file

    def source_hash(self) -> str:
        """The file's bytes, the external data files it names, and the options that change the result."""
        h = hashlib.sha256(sha256_file(self.path).encode())
        header = onnx_io.load(self.path, external_data=False)
        for location in sorted(onnx_io.external_locations(header)):
            h.update(sha256_file(self.path.parent / location).encode())
        h.update(repr((self.config.input_names, self.config.output_names)).encode())
        return h.hexdigest()

    def stage(self, staging: Path) -> Staged:
        external = bool(onnx_io.external_locations(onnx_io.load(self.path, external_data=False)))
        model = onnx_io.load(self.path)
        inputs, outputs = onnx_io.graph_tensors(model)
        onnx_io.rename_io(
            model,
            {t.name: n for t, n in zip(inputs, self.config.input_names or [], strict=False) if t.name != n},
            {t.name: n for t, n in zip(outputs, self.config.output_names or [], strict=False) if t.name != n},
        )
        dst = staging / onnx_io.ONNX_FILE
        onnx_io.save(model, dst, force_external=external)
        del model
        onnx_io.infer_shapes(dst)
        inputs, outputs = onnx_io.graph_tensors(onnx_io.load(dst, external_data=False))
        batched = all(t.shape and t.shape[0] == -1 for t in inputs)
        _smoke_run(dst, inputs)
        return Staged(
            framework=self.framework,
            exporter="onnx file (checked, shapes inferred)",
            inputs=inputs,
            outputs=outputs,
            batched=batched,
        )


def _smoke_run(path: Path, inputs: list[TensorSpec]) -> None:
    """Run the model once, so that a model ONNX Runtime cannot execute fails at import, not at serve."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, random_inputs(inputs, batch=1, seed=0))
    except Exception as exc:
        raise CorruptModelError(str(path), f"ONNX Runtime cannot run it: {first_line(exc)}") from None
