"""Two loaded variants of one model version behind one engine, chosen per call by the batch's rows.

The variant fastest at batch 1 is not always the fastest at large batches: on the digits CNN here ONNX
Runtime's int8 runs a single row in 17 µs against OpenVINO's 29 µs, while OpenVINO's int8 runs 16 rows at
1.2× the rows/s. When ``kiln optimize`` measures such a pair it stores the second as the model's
``chosen_large`` with the batch size from which it wins, and :func:`kiln.predictor.open_variant` loads
both behind a :class:`BatchRoutedEngine`; everything above the engine (``predict``, the server's batcher,
the bench) sees one engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kiln.engines.base import Engine, EngineOptions
from kiln.errors import UnsupportedError
from kiln.spec import ModelSpec


class BatchRoutedEngine(Engine):
    """Batches of fewer than ``from_rows`` rows run on ``small``, larger ones on ``large``. It reports
    ``small``'s name and artifact (what the chosen variant is), and runs in parallel threads only where
    both engines may."""

    name = "routed"
    artifact = ""

    def __init__(self, small: Engine, large: Engine, from_rows: int) -> None:
        super().__init__(small.spec, small.options)
        self.small, self.large, self.from_rows = small, large, from_rows
        for attr in ("name", "artifact", "cuda_stack", "triton_platform", "triton_backend", "dynamic_shapes"):
            setattr(self, attr, getattr(small, attr))
        setattr(self, "releases_gil", small.releases_gil and large.releases_gil)  # noqa: B010 (class default)
        setattr(self, "concurrent_runs", small.concurrent_runs and large.concurrent_runs)  # noqa: B010

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> Engine:
        raise UnsupportedError("a batch-routed engine is built from two loaded engines, not from a directory")

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for arr in inputs.values():  # the first input's rows (the feed was validated above the engine)
            if getattr(arr, "ndim", 0) and arr.shape[0] >= self.from_rows:
                return self.large.run(inputs)
            break
        return self.small.run(inputs)

    def close(self) -> None:
        try:
            self.small.close()
        finally:
            self.large.close()
