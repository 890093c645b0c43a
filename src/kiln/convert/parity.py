"""Compare an exported artifact's outputs with the source framework's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kiln.errors import ParityError
from kiln.repository import ONNX_FILE


@dataclass(frozen=True)
class ParityResult:
    artifact: str
    output: str
    batch: int
    max_abs_error: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    batch: int,
    atol: float,
    rtol: float,
    artifact: str = ONNX_FILE,
) -> list[ParityResult]:
    results = []
    for name, ref in reference.items():
        got = candidate[name]
        if got.shape != ref.shape:
            raise ParityError(name, batch, float("inf"), atol, rtol)
        if ref.dtype.kind in "fc":
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            err = float(diff.max()) if diff.size else 0.0
            ok = bool(np.all(diff <= atol + rtol * np.abs(ref.astype(np.float64))))
        else:
            err = float(np.count_nonzero(got != ref))
            ok = err == 0
        results.append(ParityResult(artifact, name, batch, err, ok))
    return results


def raise_on_failure(results: list[ParityResult], atol: float, rtol: float) -> None:
    for r in results:
        if not r.ok:
            raise ParityError(r.output, r.batch, r.max_abs_error, atol, rtol)


def random_inputs(
    specs: list[Any], batch: int, seed: int, shapes: Sequence[Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """Deterministic random inputs for a list of TensorSpecs: ``shapes`` when given, else the spec's
    shape with the batch dim at ``batch`` and other dynamic dims at the tensor's example shape (chosen
    at import), or 8 for a tensor without one."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for k, t in enumerate(specs):
        shape = list(shapes[k]) if shapes is not None else t.sample_shape(batch)
        dt = t.numpy_dtype
        if dt.kind == "f":
            out[t.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            out[t.name] = rng.integers(0, 10, size=shape).astype(dt)
        elif dt.kind == "b":
            out[t.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            out[t.name] = np.array([f"text {i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    return out
