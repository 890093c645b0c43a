"""Import a Keras 3 model (``.keras``, legacy ``.h5``, or a model object) on the torch backend, so
TensorFlow is not needed: on that backend a Keras model is a ``torch.nn.Module``, which kiln exports
like any PyTorch model (``model.pt2`` + ONNX) and checks against Keras itself.

``.keras`` files load with ``safe_mode=True``: a ``Lambda`` layer's pickled Python code is refused.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from kiln.convert.from_pytorch import TorchExport, update_with_state
from kiln.convert.importer import ImportConfig, Staged
from kiln.errors import EngineUnavailableError, InvalidSourceError, MissingExtraError, first_line
from kiln.files import sha256_file
from kiln.spec import DType, dtype_name

DEFAULT_DYNAMIC_SIZE = 8  # example size for a dimension Keras leaves open (None), unless --input-shape says


def import_keras() -> Any:
    """Keras on the torch backend; refuses a Keras that was already imported on another backend."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"  # read once, when keras is first imported
    try:
        import keras
    except ImportError:
        raise MissingExtraError("interop", "keras", "importing Keras models") from None
    backend = keras.backend.backend()
    if backend != "torch":
        raise EngineUnavailableError(
            f"keras was already imported with the {backend!r} backend; kiln needs 'torch' "
            "(set KERAS_BACKEND=torch before anything imports keras)"
        )
    return keras


def _wrap(model: Any) -> Any:
    """A torch module calling the Keras model in inference mode with positional tensors."""
    import torch

    class KerasModule(torch.nn.Module):
        def __init__(self, inner: Any, n_inputs: int) -> None:
            super().__init__()
            self.inner = inner
            self.n_inputs = n_inputs

        def forward(self, *args: torch.Tensor) -> Any:
            out = self.inner(args[0] if self.n_inputs == 1 else list(args), training=False)
            if isinstance(out, dict):
                return {str(k): v for k, v in out.items()}
            return tuple(out) if isinstance(out, (list, tuple)) else out

    return KerasModule(model, len(model.inputs)).eval()


class KerasImporter:
    framework = "keras"

    def __init__(self, source: Any, config: ImportConfig) -> None:
        keras = import_keras()
        self.config = config
        self.path: Path | None = None
        if isinstance(source, (str, Path)):
            self.path = Path(source)
            self.source = str(source)
            self.default_name = self.path.stem
            try:
                model = keras.saving.load_model(str(self.path), compile=False, safe_mode=True)
            except Exception as exc:
                raise InvalidSourceError(self.source, f"Keras cannot load it: {first_line(exc, 400)}") from None
        else:
            model = source
            self.source = f"<{type(source).__name__}>"
            self.default_name = getattr(model, "name", None) or "keras_model"
        self.model = model
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise InvalidSourceError(
                self.source, "the Keras model has no defined inputs; build it with keras.Input(...) or call it once"
            )
        names = list(config.input_names or [_input_name(t, i) for i, t in enumerate(inputs)])
        shapes, auto = [], {}
        given = config.input_shapes
        if given is not None and len(given) != len(inputs):
            raise InvalidSourceError(
                self.source, f"the model has {len(inputs)} inputs but {len(given)} shapes were given"
            )
        for i, t in enumerate(inputs):
            shape = list(t.shape)
            example = list(given[i]) if given else [2 if d is None and k == 0 else d for k, d in enumerate(shape)]
            if len(example) != len(shape):
                raise InvalidSourceError(
                    self.source, f"input {names[i]!r} has rank {len(shape)} but --input-shape has {len(example)} dims"
                )
            auto[names[i]] = {k: f"{names[i]}_{k}" for k, d in enumerate(shape) if d is None and k > 0}
            shapes.append(tuple(int(e) if e is not None else DEFAULT_DYNAMIC_SIZE for e in example))
        dtypes: list[DType] = [dtype_name(str(t.dtype)) for t in inputs]  # type: ignore[misc]
        module = _wrap(model)
        self.export = TorchExport.from_config(
            module, self.source, config, names, shapes, auto_dims=auto, framework=self.framework, dtypes=dtypes
        )
        self.output_names = _output_names(model)

    def source_hash(self) -> str:
        h = hashlib.sha256(b"keras|")
        if self.path is not None:
            h.update(sha256_file(self.path).encode())
        else:
            update_with_state(h, self.export.module)
        h.update(self.export.fingerprint().encode())
        return h.hexdigest()

    def stage(self, staging: Path) -> Staged:
        if self.config.output_names is None and self.output_names:
            self.export.config = self.config.model_copy(update={"output_names": self.output_names})
        return self.export.stage(staging)


def _input_name(tensor: Any, index: int) -> str:
    name = str(getattr(tensor, "name", "") or "")
    return name if name.isidentifier() else f"input_{index}"


def _output_names(model: Any) -> list[str] | None:
    """Names of a functional model's outputs (the layers that produce them), if Keras knows them."""
    names = getattr(model, "output_names", None)
    outputs = getattr(model, "outputs", None)
    if names and outputs and len(names) == len(outputs) and len(set(names)) == len(names):
        return [str(n) for n in names]
    return None
