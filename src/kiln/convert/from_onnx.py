"""Import an ONNX file: check it, infer shapes, read its tensors into a spec, and store it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from kiln.convert import example_shapes, onnx_io
from kiln.convert.importer import ImportConfig, Staged
from kiln.errors import CorruptModelError, first_line
from kiln.files import sha256_file
from kiln.spec import TensorSpec

log = logging.getLogger(__name__)


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
        if self.config.dims or self.config.input_shapes:  # other example shapes: another version
            h.update(repr((sorted((self.config.dims or {}).items()), self.config.input_shapes)).encode())
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
        header = onnx_io.load(dst, external_data=False)
        inputs, outputs = onnx_io.graph_tensors(header)
        batched = all(t.shape and t.shape[0] == -1 for t in inputs)
        choice = _smoke_run(str(self.path), dst, inputs, header, batched, self.config)
        inputs = [t if e is None else t.model_copy(update={"example_shape": e})
                  for t, e in zip(inputs, choice.example, strict=True)]  # fmt: skip
        if choice.summary:
            log.info("%s: %s", self.path, choice.summary)
        return Staged(
            framework=self.framework,
            exporter="onnx file (checked, shapes inferred)",
            inputs=inputs,
            outputs=outputs,
            batched=batched,
            notes=[choice.summary] if choice.summary else [],
        )


def _smoke_run(source: str, path: Path, inputs: list[TensorSpec], header: Any, batched: bool,
               config: ImportConfig) -> example_shapes.Choice:  # fmt: skip
    """Run the model at sizes it accepts for its dynamic dims, so that a model ONNX Runtime cannot execute
    fails at import, not at serve; one session, its C++ log silenced (a failed trial is expected)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: at 3 ONNX Runtime still logs each failed trial's error
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CorruptModelError(source, f"ONNX Runtime cannot load it: {first_line(exc)}") from None
    return example_shapes.choose(
        source, inputs, onnx_io.input_dims(header), batched, example_shapes.analyse(header),
        lambda feed: session.run(None, feed), dims=config.dims, shapes=config.input_shapes,
    )  # fmt: skip
