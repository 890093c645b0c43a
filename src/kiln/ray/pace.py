"""Where a Ray replica runs a batch (no Ray import here: the rest of kiln and its unit tests may import it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kiln.execution.admission import next_row_seconds
from kiln.execution.instances import Outputs

_INLINE_BELOW_S = 0.002  # a batch expected to take less runs on the replica's event loop, not in a thread


class Pace:
    """Where a replica runs a batch: on its event loop when the batch is expected to be short (no thread hop:
    about 0.15 ms of a ~1 ms handle round trip here), else in a thread, so that a long batch never holds up
    the loop that answers Serve's health checks and takes the next request. The expectation is the batch's
    rows times a running mean of seconds per row, seeded by warm-up (unknown: a thread)."""

    def __init__(self, row_seconds: float | None) -> None:
        self.row_seconds = row_seconds if row_seconds else float("inf")

    def inline(self, rows: int) -> bool:
        return self.row_seconds * rows < _INLINE_BELOW_S

    async def run(self, runner: Any, inputs: dict[str, np.ndarray]) -> Outputs:
        import asyncio
        import time

        rows = _rows(inputs)
        start = time.perf_counter()
        out = runner.run(inputs) if self.inline(rows) else await asyncio.to_thread(runner.run, inputs)
        self.row_seconds = next_row_seconds(self.row_seconds, time.perf_counter() - start, rows)
        return out


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    for arr in inputs.values():
        return int(arr.shape[0]) if getattr(arr, "ndim", 0) else 1
    return 1


__all__ = ["Pace"]
