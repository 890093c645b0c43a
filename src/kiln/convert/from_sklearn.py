"""Import a scikit-learn estimator or pipeline through skl2onnx, checking ONNX Runtime against
scikit-learn's own ``predict``/``predict_proba``/``transform``.

Saved estimators are pickles (``.pkl``, ``.joblib``), and unpickling runs whatever code the file
names, so kiln loads one only with ``trust_pickle=True`` (``--trust-pickle``). An estimator object
passed to :func:`kiln.import_model` needs no such flag.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kiln.convert import onnx_io
from kiln.convert.importer import ImportConfig, Staged
from kiln.convert.parity import ParityResult, compare, raise_on_failure, random_inputs
from kiln.errors import ExportError, InvalidSourceError, MissingExtraError, UntrustedSourceError, first_line
from kiln.files import sha256_file
from kiln.spec import TensorSpec

PARITY_BATCHES = (1, 16)
INPUT_NAME = "input"


def load_pickle(path: Path, source: str, trust: bool) -> Any:
    if not trust:
        raise UntrustedSourceError(
            source,
            "scikit-learn models are pickles, and loading a pickle runs any code the file contains; "
            "pass --trust-pickle (trust_pickle=True) only for a file you made or trust",
        )
    if not path.is_file():
        raise InvalidSourceError(source, "file not found")
    try:
        if path.suffix == ".joblib":
            import joblib

            return joblib.load(path)
        with path.open("rb") as f:
            return pickle.load(f)
    except Exception as exc:
        raise InvalidSourceError(source, f"cannot unpickle it: {type(exc).__name__}: {exc}") from None


def _is_classifier(est: Any) -> bool:
    from sklearn.base import is_classifier

    return bool(is_classifier(est))


class SklearnImporter:
    framework = "sklearn"

    def __init__(self, source: Any, config: ImportConfig) -> None:
        self.config = config
        self.path: Path | None = None
        if isinstance(source, (str, Path)):
            self.path = Path(source)
            self.source = str(source)
            self.default_name = self.path.stem
            estimator = load_pickle(self.path, self.source, config.trust_pickle)
        else:
            estimator = source
            self.source = f"<{type(source).__name__}>"
            self.default_name = type(source).__name__.lower()
        if not hasattr(estimator, "get_params") or not (
            hasattr(estimator, "predict") or hasattr(estimator, "transform")
        ):
            raise InvalidSourceError(self.source, f"holds a {type(estimator).__name__}, not a scikit-learn estimator")
        n_features = getattr(estimator, "n_features_in_", None)
        if n_features is None:
            raise InvalidSourceError(
                self.source, "the estimator is not fitted (it has no n_features_in_); fit it first"
            )
        self.estimator = estimator
        self.n_features = int(n_features)
        name = (config.input_names or [INPUT_NAME])[0]
        self.input = TensorSpec(name=name, dtype="float32", shape=(-1, self.n_features))

    def source_hash(self) -> str:
        h = hashlib.sha256(b"sklearn|")
        h.update(sha256_file(self.path).encode() if self.path else pickle.dumps(self.estimator))
        cfg = self.config
        h.update(repr((self.input, cfg.output_names, cfg.opset, cfg.atol, cfg.rtol)).encode())
        return h.hexdigest()

    def stage(self, staging: Path) -> Staged:
        try:
            from skl2onnx import to_onnx
            from skl2onnx.common.data_types import FloatTensorType
        except ImportError:
            raise MissingExtraError("interop", "skl2onnx", "importing scikit-learn models") from None

        classifier = _is_classifier(self.estimator)
        try:
            model = to_onnx(
                self.estimator,
                initial_types=[(self.input.name, FloatTensorType([None, self.n_features]))],
                options={"zipmap": False} if classifier else None,
                target_opset=self.config.opset,
            )
        except Exception as exc:
            raise ExportError(f"skl2onnx cannot convert {self.source}: {first_line(exc, 400)}") from None
        graph_out = [o.name for o in model.graph.output]
        names = list(self.config.output_names or graph_out)
        if len(names) != len(graph_out):
            raise InvalidSourceError(
                self.source, f"the model has outputs {graph_out} but {len(names)} output names were given"
            )
        onnx_io.rename_io(model, {}, dict(zip(graph_out, names, strict=True)))
        onnx_io.name_batch_dim(model)
        dst = staging / onnx_io.ONNX_FILE
        onnx_io.save(model, dst)
        onnx_io.check(dst)
        onnx_io.infer_shapes(dst)
        inputs, outputs = onnx_io.graph_tensors(onnx_io.load(dst, external_data=False))
        parity = self._check_parity(dst, dict(zip(graph_out, names, strict=True)), outputs)
        labels = [str(c) for c in self.estimator.classes_] if classifier else None
        return Staged(
            self.framework,
            f"skl2onnx (scikit-learn {_version('sklearn')}, skl2onnx {_version('skl2onnx')})",
            inputs,
            outputs,
            True,
            parity,
            [],
            labels=labels,
            task="classification" if classifier else None,
        )

    def _reference(self, kind: str, x: np.ndarray) -> np.ndarray:
        est = self.estimator
        if kind == "label":
            return np.asarray(est.predict(x))
        if kind == "probabilities":
            return np.asarray(est.predict_proba(x), dtype=np.float32)
        out = est.predict(x) if hasattr(est, "predict") else est.transform(x)
        out = np.asarray(out, dtype=np.float32)
        return out.reshape(len(x), -1)

    def _check_parity(self, path: Path, renamed: dict[str, str], outputs: list[TensorSpec]) -> list[ParityResult]:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results: list[ParityResult] = []
        for batch in PARITY_BATCHES:
            feed = random_inputs([self.input], batch, seed=100 + batch)
            got = dict(zip([t.name for t in outputs], session.run(None, feed), strict=True))
            reference, candidate = {}, {}
            for original, name in renamed.items():
                kind = original if original in ("label", "probabilities") else "value"
                ref = self._reference(kind, feed[self.input.name])
                cand = got[name]
                if kind == "label" and ref.dtype.kind in "OUS":
                    ref, cand = ref.astype(str), cand.astype(str)
                elif kind == "label":
                    cand = cand.astype(ref.dtype)
                reference[name], candidate[name] = ref, cand.reshape(ref.shape) if cand.size == ref.size else cand
            found = compare(reference, candidate, batch, self.config.atol, self.config.rtol)
            raise_on_failure(found, self.config.atol, self.config.rtol)
            results.extend(found)
        return results


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scikit-learn" if package == "sklearn" else package)
    except PackageNotFoundError:
        return "unknown"
