"""Validation and calibration data: from the user (a ``.npz`` file or ``module:callable``) or from a zoo
model's own split.

A ``.npz`` holds one array per model input (by name) and optionally ``labels`` (class ids, or for a
detection model ground-truth boxes padded to ``[N, M, 5]``: see :func:`kiln.task_metrics.pad_boxes`); arrays named
``calibration/<input>`` (or ``calib_<input>``) give separate calibration data. A callable returns an
array (one input), a dict of arrays, or ``(inputs, labels)``. Files are read with
``allow_pickle=False``: kiln never unpickles data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import DataError
from kiln.spec import ModelSpec

# Zoo models know their own data: manifest source -> "module:callable" returning (calibration, validation).
ZOO_DATA: dict[str, str] = {
    "kiln.zoo.digits:build_model": "kiln.zoo.digits:optimize_data",
    "kiln.zoo.detector:build_model": "kiln.zoo.detector:optimize_data",
    "kiln.zoo.detector:build_large_model": "kiln.zoo.detector:large_optimize_data",
    "kiln.zoo.minilm:build_model": "kiln.zoo.minilm:optimize_data",
}

# ... and their training split, for the passes that fine-tune (distill, qat-int8): source -> "module:callable"
# returning (inputs, labels).
ZOO_TRAIN: dict[str, str] = {
    "kiln.zoo.digits:build_model": "kiln.zoo.digits:train_data",
    "kiln.zoo.detector:build_model": "kiln.zoo.detector:train_data",
    "kiln.zoo.detector:build_large_model": "kiln.zoo.detector:large_train_data",
    "kiln.zoo.minilm:build_model": "kiln.zoo.minilm:train_data",
}


@dataclass
class Samples:
    """Inputs by name, all with the same leading (sample) dimension, and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, start: int, stop: int) -> Samples:
        labels = None if self.labels is None else self.labels[start:stop]
        return Samples({k: v[start:stop] for k, v in self.inputs.items()}, labels)

    def batches(self, size: int) -> list[dict[str, np.ndarray]]:
        return [{k: v[i : i + size] for k, v in self.inputs.items()} for i in range(0, len(self), size)]

    def fingerprint(self) -> str:
        """A hash of the arrays (names, dtypes, shapes, bytes) and labels."""
        h = hashlib.sha256()
        for k in sorted(self.inputs):
            arr = np.ascontiguousarray(self.inputs[k])
            h.update(f"{k}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]

    def first(self, n: int) -> dict[str, np.ndarray]:
        """``n`` samples (repeated when there are fewer) for timing at batch ``n``."""
        reps = -(-n // len(self))
        return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:n]) for k, v in self.inputs.items()}


@dataclass
class DataSplit:
    validation: Samples
    calibration: Samples | None
    source: str
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """Both parts: what accuracy figures are valid for."""
        return hashlib.sha256(
            "|".join(p.fingerprint() if p is not None else "none" for p in (self.validation, self.calibration)).encode()
        ).hexdigest()[:16]


def load_split(
    spec: ModelSpec,
    data: str | None,
    manifest_source: str,
    calibration_samples: int,
    validation_samples: int,
) -> DataSplit:
    """The data for one search; without any, validation falls back to random inputs (drift only)."""
    notes: list[str] = []
    calibration: Samples | None = None
    if data is not None:
        source = data
        validation, calibration = _from_user(spec, data)
    elif manifest_source in ZOO_DATA:
        source = f"zoo split ({ZOO_DATA[manifest_source]})"
        calibration, validation = _call(ZOO_DATA[manifest_source], spec, tuple_means="split")
    else:
        from kiln.convert.example_shapes import random_inputs_line
        from kiln.convert.parity import random_inputs

        source = "random inputs"
        validation = Samples(random_inputs(spec.inputs, batch=_random_count(spec, validation_samples), seed=1234))
        notes.append(
            "no validation data (pass --data): accuracy is output drift on random inputs, and static int8 "
            "variants are skipped rather than calibrated on noise"
        )
        if (shapes := random_inputs_line(spec.inputs)) is not None:
            notes.append(shapes)
    if validation.labels is not None and len(validation.labels) != len(validation):
        raise DataError(source, f"{len(validation.labels)} labels for {len(validation)} samples")
    if calibration is None and data is not None:
        n = len(validation)
        if n >= 2 * calibration_samples:
            calibration, validation = validation.take(0, calibration_samples), validation.take(calibration_samples, n)
        elif n > 0:
            calibration = validation.take(0, min(n, calibration_samples))
            notes.append(
                f"only {n} samples: calibration uses {len(calibration)} of the validation samples; give at least "
                f"{2 * calibration_samples} (or separate calibration/<input> arrays) to keep them apart"
            )
    if len(validation) > validation_samples:
        validation = validation.take(0, validation_samples)
    if calibration is not None and len(calibration) > calibration_samples:
        calibration = calibration.take(0, calibration_samples)
    _check(spec, validation, source)
    if calibration is not None:
        _check(spec, calibration, source)
    return DataSplit(validation, calibration, source, notes)


_RANDOM_BYTES = 64 * 2**20  # random validation inputs at large example shapes (640×640 images) stay this small


def _random_count(spec: ModelSpec, wanted: int) -> int:
    """How many random samples to make: ``wanted``, at most 64, and no more than fit in :data:`_RANDOM_BYTES`."""
    per_sample = sum(int(np.prod(t.sample_shape(1))) * max(t.numpy_dtype.itemsize, 8 if t.dtype == "string" else 1)
                     for t in spec.inputs)  # fmt: skip
    return max(1, min(wanted, 64, _RANDOM_BYTES // max(per_sample, 1)))


def _from_user(spec: ModelSpec, data: str) -> tuple[Samples, Samples | None]:
    if data.endswith(".npz"):
        return _from_npz(spec, Path(data))
    validation = _call(data, spec, tuple_means="labels")
    return validation, None


def _from_npz(spec: ModelSpec, path: Path) -> tuple[Samples, Samples | None]:
    if not path.is_file():
        raise DataError(str(path), "file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise DataError(str(path), f"cannot read it without unpickling ({exc}); save plain numeric arrays") from None
    except Exception as exc:
        raise DataError(str(path), f"not a readable .npz file: {exc}") from None
    names = [t.name for t in spec.inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(
            str(path), f"has arrays {sorted(arrays)}, but the model needs inputs {names} (missing {missing})"
        )
    validation = Samples({n: arrays[n] for n in names}, arrays.get("labels"))
    calib = {n: arrays.get(f"calibration/{n}", arrays.get(f"calib_{n}")) for n in names}
    calibration = Samples({n: a for n, a in calib.items() if a is not None}) if all(
        a is not None for a in calib.values()
    ) else None  # fmt: skip
    return validation, calibration


def _call(target: str, spec: ModelSpec, tuple_means: str) -> Any:
    from kiln.convert.factory import resolve
    from kiln.errors import InvalidSourceError

    try:
        fn: Callable[[], Any] = resolve(target)
    except InvalidSourceError as exc:
        raise DataError(target, exc.reason) from None
    if not callable(fn):
        raise DataError(target, f"{type(fn).__name__} is not callable")
    try:
        result = fn()
    except Exception as exc:
        raise DataError(target, f"calling it raised {type(exc).__name__}: {exc}") from None
    if tuple_means == "split":  # zoo: (calibration, validation) as (inputs, labels) pairs
        (calib_x, calib_y), (val_x, val_y) = result
        return _samples(spec, calib_x, calib_y, target=target), _samples(spec, val_x, val_y, target=target)
    if isinstance(result, tuple):
        if len(result) != 2:
            raise DataError(target, f"returned a tuple of {len(result)}; expected (inputs, labels)")
        return _samples(spec, result[0], result[1], target=target)
    return _samples(spec, result, None, target=target)


def _samples(spec: ModelSpec, inputs: Any, labels: Any, target: str) -> Samples:
    if isinstance(inputs, np.ndarray):
        if len(spec.inputs) != 1:
            raise DataError(target, f"returned one array, but the model has inputs {[t.name for t in spec.inputs]}")
        inputs = {spec.inputs[0].name: inputs}
    if not isinstance(inputs, Mapping):
        raise DataError(target, f"returned {type(inputs).__name__}; expected an array or a dict of arrays")
    arrays = {str(k): np.asarray(v) for k, v in inputs.items()}
    if len(arrays) == 1 and len(spec.inputs) == 1:  # one input: its name in the data does not matter
        arrays = {spec.inputs[0].name: next(iter(arrays.values()))}
    return Samples(arrays, None if labels is None else np.asarray(labels))


def _check(spec: ModelSpec, samples: Samples, source: str) -> None:
    lengths = {k: len(v) for k, v in samples.inputs.items()}
    if not lengths or min(lengths.values()) == 0:
        raise DataError(source, "holds no samples")
    if len(set(lengths.values())) != 1:
        raise DataError(source, f"inputs have different numbers of samples: {lengths}")
    for t in spec.inputs:
        if t.name not in samples.inputs:
            raise DataError(source, f"has no array for input {t.name!r}")
        arr = samples.inputs[t.name]
        if arr.dtype != t.numpy_dtype:
            if arr.dtype.kind == t.numpy_dtype.kind or (arr.dtype.kind in "iuf" and t.numpy_dtype.kind in "iuf"):
                samples.inputs[t.name] = arr.astype(t.numpy_dtype)
            else:
                raise DataError(source, f"input {t.name!r} is {arr.dtype}, the model takes {t.dtype}")
        if arr.ndim != len(t.shape) or any(w not in (-1, h) for w, h in zip(t.shape[1:], arr.shape[1:], strict=False)):
            raise DataError(source, f"input {t.name!r} has shape {list(arr.shape)}, the model takes {list(t.shape)}")
    if samples.labels is not None and len(samples.labels) != len(samples):
        raise DataError(source, f"{len(samples.labels)} labels for {len(samples)} samples")


def load_training(spec: ModelSpec, data: str | None, manifest_source: str) -> Samples | None:
    """The data to fine-tune on: the user's (``.npz`` with the inputs and optional ``labels``, or a
    ``module:callable`` returning ``inputs`` or ``(inputs, labels)``), else the zoo model's training
    split, else None: without it the fine-tuning passes are skipped, never run on random noise."""
    if data is not None:
        samples = _from_npz(spec, Path(data))[0] if data.endswith(".npz") else _call(data, spec, tuple_means="labels")
        source = data
    elif manifest_source in ZOO_TRAIN:
        source = ZOO_TRAIN[manifest_source]
        samples = _call(source, spec, tuple_means="labels")
    else:
        return None
    _check(spec, samples, source)
    return samples
